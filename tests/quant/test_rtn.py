"""RTN end to end on the tiny VGGT: accuracy ordering by bits, overrides, validation, summary, save/load."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from qvggt.model import build_model, get_preset
from qvggt.model.init import fill_name_seeded_
from qvggt.quant.api import quantization_summary, quantize_
from qvggt.quant.config import RTNConfig, weight_activation_formats
from qvggt.quant.coverage import select_linears
from qvggt.quant.linear import QuantConv2d, QuantLinear

OUTPUTS = ("depth", "world_points", "pose_enc")


def tiny_model() -> nn.Module:
    # Name-seeded weights: deterministic whatever the global seed, and LayerScale ~0.1 (not 0.01), so the
    # aggregator blocks' quantization error reaches the outputs.
    return fill_name_seeded_(build_model(get_preset("tiny"))).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(1, 2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return tiny_model()(images)


def run(config: RTNConfig, images: torch.Tensor, **kw) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = quantize_(tiny_model(), config, **kw)
    with torch.no_grad():
        return model, model(images)


def errors(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: rel(out[k], ref[k]) for k in OUTPUTS}


def test_error_grows_as_bits_shrink(images: torch.Tensor, reference: dict[str, torch.Tensor]) -> None:
    errs = {}
    for wb, ab in [(8, 8), (4, 8), (4, 4), (2, 2)]:
        w, a = weight_activation_formats(wb, ab)
        model, out = run(RTNConfig(weight=w, activation=a), images)
        errs[f"W{wb}A{ab}"] = errors(out, reference)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 32  # 4 linears x 2 x depth 4
    assert all(e < 0.05 for e in errs["W8A8"].values()), errs["W8A8"]
    for k in ("depth", "world_points"):
        chain = [errs[c][k] for c in ("W8A8", "W4A8", "W4A4", "W2A2")]
        assert chain == sorted(chain), (k, chain)
        assert chain[-1] > 10 * chain[0], (k, chain)
    assert errs["W2A2"]["pose_enc"] > 10 * errs["W8A8"]["pose_enc"]


def test_summary_counts_layers_and_bytes(images: torch.Tensor) -> None:
    model, _ = run(RTNConfig(), images)  # W8A8 default coverage
    s = quantization_summary(model)
    float_layers = select_linears(tiny_model(), "default")
    numel = sum(m.weight.numel() for m in float_layers.values())
    rows = sum(m.out_features for m in float_layers.values())
    assert (s.num_layers, s.num_linear, s.num_conv) == (32, 32, 0)
    assert s.weight_formats == {"int8-sym-channel": 32} and s.activation_formats == {"int8-sym-token": 32}
    assert s.weight_numel == numel and s.weight_bytes_before == 4 * numel
    assert s.weight_bytes_after == numel + 4 * rows  # int8 codes + one float32 scale per output channel
    assert 3.5 < s.compression < 4 and 8 < s.bits_per_weight < 8.5
    w4 = quantization_summary(quantize_(tiny_model(), RTNConfig(weight="int4-sym-group32")))
    assert w4.weight_bytes_after == numel // 2 + 4 * numel // 32


def test_layer_overrides_mixed_precision(images: torch.Tensor) -> None:
    overrides = {
        "aggregator.global_blocks.3.mlp.fc2": "int8-sym-channel",  # exact name beats the pattern below
        "aggregator.global_blocks.*": 4,  # bits override of the base format
        "aggregator.frame_blocks.0.*": None,  # keep in full precision
    }
    model, _ = run(RTNConfig(weight="int6-sym-channel", layer_overrides=overrides), images)
    mods = dict(model.named_modules())
    assert mods["aggregator.global_blocks.3.mlp.fc2"].weight_fmt.name == "int8-sym-channel"
    assert mods["aggregator.global_blocks.0.attn.qkv"].weight_fmt.name == "int4-sym-channel"
    assert mods["aggregator.frame_blocks.1.mlp.fc1"].weight_fmt.name == "int6-sym-channel"
    assert type(mods["aggregator.frame_blocks.0.attn.qkv"]) is nn.Linear
    s = quantization_summary(model)
    assert s.num_layers == 28 and s.weight_formats == {
        "int4-sym-channel": 15,
        "int6-sym-channel": 12,
        "int8-sym-channel": 1,
    }


def test_invalid_configs_fail_before_touching_the_model() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"aggregator\.global_blocks\.9\.mlp\.fc1"):
        quantize_(model, RTNConfig(layer_overrides={"aggregator.global_blocks.9.mlp.fc1": 4}))
    with pytest.raises(ValueError, match=r"camera_head\.\*"):  # exists, but not in the default coverage
        quantize_(model, RTNConfig(layer_overrides={"camera_head.*": 4}))
    # tiny: embed_dim 64, MLP hidden 256; group 48 divides neither, and the message names layer and width
    w, a = weight_activation_formats(4, 8, group_size=48)
    with pytest.raises(
        ValueError,
        match=r"aggregator\.frame_blocks\.0\.attn\.qkv \(weight int4-sym-group48: "
        r"in_features 64 is not divisible by 48\)",
    ):
        quantize_(model, RTNConfig(weight=w, activation=a))
    with pytest.raises(ValueError, match=r"mlp\.fc2 \(activation int8-sym-group96: in_features 256"):
        quantize_(model, RTNConfig(activation="int8-sym-group96", weight="int8-sym-group32"))
    assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in model.modules())
    # quantizing twice finds nothing left to quantize
    quantize_(model, RTNConfig())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, RTNConfig())


def test_filter_fn_and_full_coverage(images: torch.Tensor, reference: dict[str, torch.Tensor]) -> None:
    only_global = RTNConfig()
    model, _ = run(only_global, images, filter_fn=lambda m, name: "global_blocks" in name)
    assert quantization_summary(model).num_layers == 16
    model, out = run(RTNConfig(coverage="full"), images)
    s = quantization_summary(model)
    n_full = len(select_linears(tiny_model(), "full"))
    assert s.num_layers == n_full and s.num_conv > 0 and s.activation_formats["none"] == s.num_conv
    mods = dict(model.named_modules())
    assert isinstance(mods["camera_head.embed_pose"], QuantLinear)
    assert isinstance(mods["depth_head.resize_layers.0"], QuantConv2d) and mods["depth_head.resize_layers.0"].transposed
    assert isinstance(mods["aggregator.patch_embed.patch_embed.proj"], QuantConv2d)
    # the tracker's packed attention projection is a bare parameter: documented to stay full precision
    attn = mods["track_head.tracker.updateformer.time_blocks.0.attn"]
    assert attn.in_proj_weight.dtype == torch.float32 and isinstance(attn.out_proj, QuantLinear)
    assert all(e < 0.1 for e in errors(out, reference).values()), errors(out, reference)


def test_clip_search_lowers_weight_error() -> None:
    def weight_err(model: nn.Module) -> float:
        ref = select_linears(tiny_model(), "default")
        return sum(
            float((m.dequantized_weight() - ref[n].weight.detach()).square().sum())
            for n, m in model.named_modules()
            if isinstance(m, QuantLinear)
        )

    plain = quantize_(tiny_model(), RTNConfig(weight="int3-sym-channel", activation=None))
    clipped = quantize_(tiny_model(), RTNConfig(weight="int3-sym-channel", activation=None, clip_search=True))
    assert weight_err(clipped) < 0.95 * weight_err(plain)


def test_quantized_model_state_dict_round_trip(images: torch.Tensor) -> None:
    config = RTNConfig(weight="int4-asym-group32", activation="int8-sym-token")
    model, out = run(config, images)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = quantize_(build_model(get_preset("tiny")).eval(), config)  # different (default-init) weights
    other.load_state_dict(state, strict=True)
    # the checkpoint path: quantized structure built on meta (no memory), then tensors assigned
    on_meta = quantize_(build_model(get_preset("tiny"), "meta"), config)
    on_meta.load_state_dict(state, strict=True, assign=True)
    for loaded in (other, on_meta.eval()):
        with torch.no_grad():
            again = loaded(images)
        for k in OUTPUTS:
            assert torch.equal(again[k], out[k]), k


def test_group_size_falls_back_per_layer_where_it_does_not_divide() -> None:
    """vggt-1b, full coverage, int4 group 128: the few odd widths (camera-head input 9, DPT 567...) fall back to
    per-channel scales with a warning naming them; every other layer keeps its groups."""
    from qvggt.model import build_model, get_preset
    from qvggt.quant.coverage import plan_layers
    from qvggt.quant.formats import Granularity, parse_format

    model = build_model(get_preset("vggt-1b"), "meta")
    with pytest.warns(UserWarning, match="fall back to per-channel") as record:
        plans = plan_layers(model, "full", parse_format("int4-sym-group128"), None)
    message = str(record[0].message)
    linears = {n: p for n, p in plans.items() if not p.is_conv}
    channel = {n for n, p in linears.items() if p.weight.granularity is Granularity.CHANNEL}
    assert channel and len(channel) < 0.1 * len(linears)
    assert all(linears[n].module.in_features % 128 for n in channel)
    assert all(p.weight.group_size == 128 for n, p in linears.items() if n not in channel)
    assert next(iter(sorted(channel))) in message or "more" in message
