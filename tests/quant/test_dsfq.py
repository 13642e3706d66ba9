"""quantvggt (DSFQ): exact rotations, a win where activation outliers live, and a checkpoint that keeps its
online rotation through save / load and into the engine."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from qvggt_testing import tiny_with_mlp_outlier

from qvggt.model import load_vggt, save_checkpoint
from qvggt.model.layers import Block
from qvggt.model.rope import RotaryEmbedding2D, grid_positions
from qvggt.quant.api import quantize_
from qvggt.quant.command import make_config, run_quantize
from qvggt.quant.dsfq import QuantVGGTConfig, rotate_fc2_input_, rotate_heads_
from qvggt.quant.export import load_quantized, read_manifest
from qvggt.quant.linear import QuantLinear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_rotations_leave_the_block_function_unchanged() -> None:
    torch.manual_seed(0)
    block = Block(256, 4, init_values=1.0, qk_norm=True, rope=RotaryEmbedding2D(100.0)).eval().double()
    pos = grid_positions(2, 4, 8, 5, torch.device("cpu"))
    x = torch.randn(2, 37, 256, dtype=torch.float64)
    rotated = copy.deepcopy(block)
    w_proj = rotated.attn.proj.weight.clone()
    with torch.no_grad():
        rotate_heads_(rotated)
        handle = rotate_fc2_input_(rotated.mlp.fc2, 128)
        assert _rel(rotated(x, pos), block(x, pos)) < 1e-12
    assert not torch.allclose(rotated.attn.proj.weight, w_proj)  # the weights did change
    handle.remove()


@pytest.mark.parametrize("block", [3, -128, True])
def test_bad_rotation_block_is_refused(block: object) -> None:
    with pytest.raises(ValueError, match="fc2_rotation_block"):
        QuantVGGTConfig(fc2_rotation_block=block)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def outlier_model() -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    """Tiny VGGT whose MLPs all produce one massive hidden channel (fc1 bias +30): fc2's inputs carry the kind of
    channel outlier that defeats per-token scales, and that no fold before GELU can smooth."""
    model = tiny_with_mlp_outlier()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.rand(1, 2, 3, 56, 84, generator=gen) for _ in range(2)]
    return model, calib, torch.rand(1, 2, 3, 56, 84, generator=gen)


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_quantvggt_beats_rtn_and_smoothquant_on_outliers(outlier_model, bits: tuple[int, int]) -> None:
    model, calib, test = outlier_model
    with torch.no_grad():
        ref = model(test)["world_points"]
    err = {}
    for method in ("rtn", "smoothquant", "quantvggt"):
        # quantvggt without its reconstruction time limit: a loaded machine must not change what is compared.
        options = {"recon_time_budget_s": None} if method == "quantvggt" else None
        q = quantize_(
            copy.deepcopy(model), make_config(method, *bits, None, "default", False, options),
            calibration_data=None if method == "rtn" else calib,
        )  # fmt: skip
        with torch.no_grad():
            err[method] = _rel(q(test)["world_points"], ref)
    assert err["quantvggt"] < 0.8 * min(err["rtn"], err["smoothquant"]), err


def test_checkpoint_keeps_the_online_rotation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "base.safetensors")
    result = run_quantize("quantvggt", 4, 8, tmp_path / "q", base, calib_scenes=2, calib_frames=2)
    manifest = read_manifest(result.path)
    assert manifest["method"] == "QuantVGGTConfig" and len(manifest["input_hadamard"]) == 8  # tiny: 8 blocks
    loaded = load_quantized(result.path)
    fc2 = dict(loaded.named_modules())["aggregator.frame_blocks.0.mlp.fc2"]
    assert isinstance(fc2, QuantLinear) and fc2.input_hadamard == 128
    images = torch.rand(1, 2, 3, 56, 84)
    with torch.no_grad():
        want = loaded(images)["depth"]
        x = torch.randn(5, fc2.in_features)
        y = fc2(x)
        fc2.input_hadamard = 0  # the stored weight is W Hb: without the rotation the layer is another function
        assert _rel(fc2(x), y) > 0.5
        fc2.input_hadamard = 128

    import qvggt

    engine = qvggt.load_quantized(result.path)  # the engine applies the rotation between fc1 and fc2
    assert _rel(engine(images)["depth"], want) < 0.02
