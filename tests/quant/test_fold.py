"""Folding/smoothing transforms are identities on the whole tiny VGGT (fp64 <= 1e-9, fp32 <= 1e-4)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from qvggt_testing import rel_l2
from torch import nn

from qvggt.model import build_model, get_preset
from qvggt.model.init import fill_name_seeded_
from qvggt.model.layers import LayerScale
from qvggt.quant.fold import (
    aggregator_blocks,
    fold_all_layernorms_,
    fold_all_layerscales_,
    fold_layernorm_affine_,
    fold_layerscale_,
    smooth_into_layernorm_,
    smooth_into_qkv_v_,
)
from qvggt.quant.formats import parse_format
from qvggt.quant.linear import QuantLinear

OUTPUTS = ("depth", "world_points", "pose_enc")
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def tiny_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    # Name-seeded: LN weights 1 + 0.05 z, biases 0.02 z, LayerScale 0.1 + 0.02 z (all non-trivial).
    return fill_name_seeded_(build_model(get_preset("tiny"))).to(dtype).eval()


def random_scales(n: int, seed: int) -> torch.Tensor:
    """Positive scales spanning ~[0.02, 50]: a wide range, so a wrong fold cannot hide in rounding."""
    return torch.exp(2.0 * torch.randn(n, generator=torch.Generator().manual_seed(seed))).clamp(0.02, 50.0)


def smooth_all_random_(model: nn.Module) -> nn.Module:
    for i, (_, block) in enumerate(aggregator_blocks(model)):
        c = block.norm1.normalized_shape[0]
        smooth_into_qkv_v_(block.attn, random_scales(c, 3 * i))  # before qkv's own smoothing: order-free anyway
        smooth_into_layernorm_(block.norm1, [block.attn.qkv], random_scales(c, 3 * i + 1))
        smooth_into_layernorm_(block.norm2, [block.mlp.fc1], random_scales(c, 3 * i + 2))
    return model


def fold_then_smooth_(model: nn.Module) -> nn.Module:
    return smooth_all_random_(fold_all_layerscales_(fold_all_layernorms_(model)))


TRANSFORMS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "fold_all_layernorms_": fold_all_layernorms_,
    "fold_all_layerscales_": fold_all_layerscales_,
    "smooth_random": smooth_all_random_,
    "fold_then_smooth": fold_then_smooth_,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_is_identity_on_model_output(name: str, dtype: torch.dtype) -> None:
    model = tiny_model(dtype)
    images = torch.rand(1, 2, 3, 28, 42, generator=torch.Generator().manual_seed(1), dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(images)
        TRANSFORMS[name](model)
        out = model(images)
    after = model.state_dict()
    # Same checkpoint structure, and the transform really changed the weights.
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert any(not torch.equal(after[k], before[k]) for k in before)
    errs = {k: rel_l2(out[k], ref[k]) for k in OUTPUTS}
    assert all(e <= TOL[dtype] for e in errs.values()), errs


def test_folded_parameters_are_neutral() -> None:
    model = fold_all_layerscales_(fold_all_layernorms_(tiny_model()))
    blocks = list(aggregator_blocks(model))
    assert len(blocks) == 2 * 4 and blocks[0][0] == "aggregator.frame_blocks.0"
    for _, b in blocks:
        for norm in (b.norm1, b.norm2):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
        assert torch.equal(b.ls1.gamma, torch.ones_like(b.ls1.gamma))
        assert torch.equal(b.ls2.gamma, torch.ones_like(b.ls2.gamma))
    # the encoder's and camera head's blocks are not aggregator blocks and stay untouched
    enc = model.aggregator.patch_embed.blocks[0]
    assert not torch.equal(enc.norm1.weight, torch.ones_like(enc.norm1.weight))
    assert len(list(aggregator_blocks(model.aggregator))) == 8


def test_layernorm_fold_creates_bias_for_biasless_linear() -> None:
    torch.manual_seed(0)
    norm, lin = nn.LayerNorm(12).double(), nn.Linear(12, 5, bias=False).double()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    with torch.no_grad():
        ref = lin(norm(x))
        fold_layernorm_affine_(norm, [lin])
        out = lin(norm(x))
    assert lin.bias is not None and lin.bias.shape == (5,)
    assert rel_l2(out, ref) < 1e-12


def test_layerscale_fold_on_single_linear() -> None:
    torch.manual_seed(0)
    lin, ls = nn.Linear(6, 8).double(), LayerScale(8, 0.1).double()
    with torch.no_grad():
        ls.gamma.normal_(0.1, 0.05)
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = ls(lin(x))
        fold_layerscale_(lin, ls)
        out = ls(lin(x))
    assert rel_l2(out, ref) < 1e-12 and torch.equal(ls.gamma, torch.ones(8, dtype=torch.float64))


def test_invalid_inputs_raise() -> None:
    model = tiny_model()
    _, block = next(aggregator_blocks(model))
    c = block.norm1.normalized_shape[0]
    with pytest.raises(ValueError, match=r"shape \[64\]"):
        smooth_into_layernorm_(block.norm1, [block.attn.qkv], torch.ones(c + 1))
    with pytest.raises(ValueError, match="finite and > 0"):
        smooth_into_qkv_v_(block.attn, torch.zeros(c))
    with pytest.raises(ValueError, match="in_features"):
        fold_layernorm_affine_(block.norm2, [block.mlp.fc2])  # fc2 reads the 256-wide hidden, not norm2
    with pytest.raises(ValueError, match="Linear"):
        fold_layernorm_affine_(block.norm1, [])
    with pytest.raises(TypeError, match="LayerScale"):
        fold_layerscale_(block.attn.proj, nn.Identity())  # type: ignore[arg-type]
    block.attn.qkv = QuantLinear.from_float(block.attn.qkv, parse_format("int8-sym-channel"))
    with pytest.raises(TypeError, match="not yet quantized"):
        smooth_into_qkv_v_(block.attn, torch.ones(c))
