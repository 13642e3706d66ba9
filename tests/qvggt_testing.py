"""Helpers shared by tests across folders: a module with its own name, so that test modules import it wherever pytest
collects them from (``from conftest import`` finds whichever conftest.py was imported first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data_files"


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the released VGGT-1B checkpoint (tests/data_files/vggt_1b_state_dict.txt)."""
    shapes = {}
    for line in (DATA / "vggt_1b_state_dict.txt").read_text().splitlines():
        name, shape = line.split("\t")
        shapes[name] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return shapes


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b||."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny_with_mlp_outlier() -> torch.nn.Module:
    """The tiny preset (seed 0) whose every aggregator MLP produces one massive hidden channel (fc1 bias +30): fc2's
    inputs carry the channel outlier that per-token activation scales handle worst and no fold before GELU smooths."""
    from qvggt.model import load_vggt
    from qvggt.model.layers import Block

    torch.manual_seed(0)
    model = load_vggt(preset="tiny").eval()
    with torch.no_grad():
        for blk in model.aggregator.modules():
            if isinstance(blk, Block):
                blk.mlp.fc1.bias[5] += 30.0
    return model


def planted_small_model() -> tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """The committed small model with the stress recipe's massive channels planted (+-40 on channels 7 and 71 of
    every camera / register token; no fine-tune), 2 calibration batches and 2 held-out scenes of 4 frames."""
    from qvggt.calib.stress import plant_massive_activations_
    from qvggt.config import DataConfig
    from qvggt.eval.datasets import SyntheticEvalDataset
    from qvggt.model import load_vggt
    from qvggt.quant.command import calibration_batches

    small = Path(__file__).resolve().parents[1] / "models" / "small" / "model.safetensors"
    if not small.is_file():
        pytest.fail(f"{small} is missing: it is the repository's embedded model (git checkout models/small)")
    model = load_vggt(small).eval()
    plant_massive_activations_(model)
    calib, _ = calibration_batches(DataConfig(), 2, 4, model.cfg.default_image_hw)
    h, w = model.cfg.default_image_hw
    ds = SyntheticEvalDataset.from_config(2, "eval", data=DataConfig(), num_frames=4, height=h, width=w)
    return model, calib, [torch.from_numpy(s.images)[None] for s in ds]


def quantized_block(block: torch.nn.Module, w_fmt: object, a_fmt: object) -> torch.nn.Module:
    """A copy of a transformer Block whose qkv, proj, fc1 and fc2 are RTN ``QuantLinear``s in these formats."""
    import copy

    from qvggt.quant.linear import QuantLinear

    block = copy.deepcopy(block)
    for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
        setattr(parent, name, QuantLinear.from_float(getattr(parent, name), w_fmt, a_fmt))
    return block
