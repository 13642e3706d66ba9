"""quantvggt's options: GPTQ weights on the rotated + smoothed Hessians, online rotation of the LayerNorm-output
inputs (qkv, fc1), and method options passed through make_config / run_quantize."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from qvggt_testing import tiny_with_mlp_outlier

from qvggt.model import load_vggt, save_checkpoint
from qvggt.quant.api import quantize_
from qvggt.quant.command import make_config, run_quantize
from qvggt.quant.export import load_quantized, read_manifest
from qvggt.quant.linear import QuantLinear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def outlier_model() -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    """Tiny VGGT whose MLPs produce one massive hidden channel (fc1 bias +30), 1 calibration and 1 test batch."""
    model = tiny_with_mlp_outlier()
    calib = [torch.rand(1, 2, 3, 56, 84, generator=torch.Generator().manual_seed(7))]
    return model, calib, torch.rand(1, 2, 3, 56, 84, generator=torch.Generator().manual_seed(2))


def test_gptq_weights_beat_rtn_weights_inside_quantvggt(outlier_model) -> None:
    model, calib, images = outlier_model
    with torch.no_grad():
        ref = model(images)["pose_enc"]
    err = {}
    for gptq in (False, True):
        config = make_config("quantvggt", 4, 4, None, "default", False, {"gptq": gptq})
        q = quantize_(copy.deepcopy(model), config, calibration_data=calib)
        with torch.no_grad():
            err[gptq] = _rel(q(images)["pose_enc"], ref)
    assert err[True] < 0.8 * err[False], err  # measured 0.58x


def test_norm_input_rotation_rotates_qkv_and_fc1_online_and_drops_their_smoothing(outlier_model) -> None:
    model, calib, images = outlier_model
    config = make_config("quantvggt", 8, 8, None, "default", False, {"norm_input_rotation": True})
    q = quantize_(copy.deepcopy(model), config, calibration_data=calib)
    blk = q.aggregator.frame_blocks[0]
    assert blk.attn.qkv.input_hadamard == 64 and blk.mlp.fc1.input_hadamard == 64 and blk.mlp.fc2.input_hadamard == 128
    assert blk.attn.proj.input_hadamard == 0  # folded per head, offline
    orig = model.aggregator.frame_blocks[0]
    assert torch.equal(blk.norm1.weight, orig.norm1.weight) and torch.equal(blk.norm2.weight, orig.norm2.weight)
    with torch.no_grad():
        assert _rel(q(images)["pose_enc"], model(images)["pose_enc"]) < 0.05


def test_without_smoothing_nothing_is_folded_and_the_rest_still_runs(outlier_model) -> None:
    """The "without smoothing" ablation: LayerNorm affines and V rows keep their float values (the per-head
    rotation aside), the rotations stay, and reconstruction learns the clipping alone."""
    model, calib, images = outlier_model
    orig = model.aggregator.frame_blocks[0]
    out = {}
    for smooth in (True, False):
        config = make_config("quantvggt", 4, 4, None, "default", False, {"smooth": smooth, "recon_epochs": 1})
        q = quantize_(copy.deepcopy(model), config, calibration_data=calib)
        blk = q.aggregator.frame_blocks[0]
        folded = not torch.equal(blk.norm1.weight, orig.norm1.weight) or not torch.equal(
            blk.norm2.bias, orig.norm2.bias
        )
        assert folded is smooth
        assert blk.mlp.fc2.input_hadamard == 128
        with torch.no_grad():
            out[smooth] = _rel(q(images)["pose_enc"], model(images)["pose_enc"])
    assert out[False] < 0.5 and out[False] != out[True], out


def test_unknown_options_are_refused_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) \['gptq'\].*act_order"):
        make_config("gptq", 4, 8, None, "default", False, {"gptq": True})
    with pytest.raises(ValueError, match="weight"):
        make_config("rtn", 4, 8, None, "default", False, {"weight": "int8-sym-channel"})


def test_options_reach_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "base.safetensors")
    options = {"gptq": True, "norm_input_rotation": True}
    result = run_quantize("quantvggt", 4, 8, tmp_path / "q", base, calib_scenes=1, calib_frames=2, options=options)
    manifest = read_manifest(result.path)
    assert manifest["quant_config"]["gptq"] is True and len(manifest["input_hadamard"]) == 24  # 8 x qkv/fc1/fc2
    loaded = load_quantized(result.path)
    assert dict(loaded.named_modules())["aggregator.global_blocks.1.mlp.fc1"].input_hadamard == 64
    assert isinstance(dict(loaded.named_modules())["aggregator.global_blocks.1.mlp.fc1"], QuantLinear)


def test_an_fc2_rotation_block_that_does_not_divide_the_mlp_width_is_refused(outlier_model) -> None:
    model, calib, _ = outlier_model
    m = copy.deepcopy(model)
    config = make_config("quantvggt", 4, 4, None, "default", False, {"fc2_rotation_block": 512, "reconstruct": False})
    with pytest.raises(ValueError, match=r"fc2_rotation_block=512 .*\[256\].* power of two from 2 to 256"):
        quantize_(m, config, calibration_data=calib)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    ok = make_config("quantvggt", 4, 4, None, "default", False, {"fc2_rotation_block": 256, "reconstruct": False})
    q = quantize_(copy.deepcopy(model), ok, calibration_data=calib)
    assert q.aggregator.frame_blocks[0].mlp.fc2.input_hadamard == 256


def test_special_token_bits_below_the_activation_bits_are_refused_equal_ones_are_a_no_op(outlier_model) -> None:
    model, calib, _ = outlier_model
    below = make_config("quantvggt", 4, 8, None, "default", False, {"special_token_abits": 6, "reconstruct": False})
    with pytest.raises(ValueError, match=r"special_token_abits=6 is below the 8-bit activations"):
        quantize_(copy.deepcopy(model), below, calibration_data=calib)
    equal = make_config("quantvggt", 4, 8, None, "default", False, {"reconstruct": False})  # the default 8 at A8
    q = quantize_(copy.deepcopy(model), equal, calibration_data=calib)
    assert not any(getattr(x, "special_tokens", 0) for x in q.modules())
