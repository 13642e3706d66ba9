"""QuantLinear / QuantConv2d: RTN error bounds, exact reference forward, packed storage, state_dict round trips."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvggt.quant.formats import parse_format
from qvggt.quant.linear import QuantConv2d, QuantLinear
from qvggt.quant.quantizer import compute_scales, fake_quantize, mse_clip_search, quantize, scale_view

WEIGHT_FORMATS = ["int8-sym-channel", "int4-sym-group16", "int3-asym-group8", "int4-asym-channel", "int8-sym-tensor"]


def make_linear(k: int = 48, n: int = 20, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight[3, 5] = 0.9  # an outlier, so scales differ across rows/groups
        if bias:
            lin.bias.normal_()
    return lin


def roundtrip(module: nn.Module, fresh: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    return fresh


@pytest.mark.parametrize("name", WEIGHT_FORMATS)
def test_dequantized_weight_error_is_at_most_half_a_step(name: str) -> None:
    fmt = parse_format(name)
    lin = make_linear()
    q = QuantLinear.from_float(lin, fmt)
    w = lin.weight.detach()
    err = scale_view(q.dequantized_weight() - w, fmt).abs()
    scale, _ = compute_scales(w, fmt)
    assert torch.equal(q.weight_scale, scale)
    assert bool((err <= scale / 2 * (1 + 1e-6)).all()), float((err / scale).max())
    assert float(err.max()) > 0  # really quantized


@pytest.mark.parametrize("name", ["int4-sym-group16", "int3-asym-group8", "int8-sym-channel", "fp8_e4m3-channel"])
def test_codes_match_the_quantize_primitive(name: str) -> None:
    fmt = parse_format(name)
    lin = make_linear()
    q = QuantLinear.from_float(lin, fmt)
    scale, zp = compute_scales(lin.weight.detach(), fmt)
    assert torch.equal(q._codes(), quantize(lin.weight.detach(), fmt, scale, zp))


@pytest.mark.parametrize("act", [None, "int8-sym-token", "int4-asym-token", "int8-sym-group16", "fp8_e4m3-token"])
@pytest.mark.parametrize("wname", ["int4-sym-group16", "int8-asym-channel"])
def test_forward_equals_linear_of_fake_quantized_input(act: str | None, wname: str) -> None:
    afmt = None if act is None else parse_format(act)
    lin = make_linear()
    q = QuantLinear.from_float(lin, parse_format(wname), afmt)
    x = torch.randn(2, 7, 48) * 3
    xq = x if afmt is None else fake_quantize(x, afmt)
    assert torch.equal(q(x), F.linear(xq, q.dequantized_weight(), lin.bias))
    # bf16 input: computed and returned in bf16, exactly the reference in bf16
    xb = x.to(torch.bfloat16)
    xbq = xb if afmt is None else fake_quantize(xb, afmt)
    out = q(xb)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(xbq, q.dequantized_weight(torch.bfloat16), lin.bias.to(torch.bfloat16)))


def test_int8_w8a8_close_and_int2_much_worse() -> None:
    lin = make_linear(k=64, n=32)
    x = torch.randn(16, 64)
    ref = lin(x).detach()

    def rel(fmt_w: str, fmt_a: str) -> float:
        out = QuantLinear.from_float(lin, parse_format(fmt_w), parse_format(fmt_a))(x).detach()
        return float((out - ref).norm() / ref.norm())

    e8, e2 = rel("int8-sym-channel", "int8-sym-token"), rel("int2-sym-channel", "int2-sym-token")
    assert e8 < 0.02 and e2 > 10 * e8


def test_int4_packed_storage_halves_the_bytes() -> None:
    lin = make_linear(k=48, n=20)
    q4 = QuantLinear.from_float(lin, parse_format("int4-sym-channel"))
    q8 = QuantLinear.from_float(lin, parse_format("int8-sym-channel"))
    assert not hasattr(q4, "weight_q") and q4.weight_packed.dtype == torch.uint8
    assert tuple(q4.weight_packed.shape) == (20, 24) and tuple(q8.weight_q.shape) == (20, 48)
    assert q4.weight_packed.numel() * 2 == q8.weight_q.numel() * q8.weight_q.element_size()
    scale_bytes = q8.weight_scale.numel() * 4
    assert q4.weight_nbytes - scale_bytes == (q8.weight_nbytes - scale_bytes) // 2
    assert q8.float_weight_nbytes == 20 * 48 * 4
    # odd K is padded to a whole byte per row and still dequantizes exactly the same codes
    odd_lin = make_linear(k=7, n=4)
    fmt = parse_format("int4-sym-channel")
    odd = QuantLinear.from_float(odd_lin, fmt)
    assert tuple(odd.weight_packed.shape) == (4, 4)
    assert torch.equal(odd._codes(), quantize(odd_lin.weight.detach(), fmt, *compute_scales(odd_lin.weight, fmt)))


@pytest.mark.parametrize(
    ("wname", "act"),
    [("int4-asym-group16", "int8-sym-token"), ("int8-sym-channel", None), ("fp8_e4m3-channel", "fp8_e4m3-token")],
)
def test_state_dict_round_trip_gives_identical_outputs(wname: str, act: str | None) -> None:
    wfmt, afmt = parse_format(wname), None if act is None else parse_format(act)
    q = QuantLinear.from_float(make_linear(), wfmt, afmt)
    fresh = roundtrip(q, QuantLinear(48, 20, wfmt, afmt, bias=True))
    for key, value in q.state_dict().items():
        assert fresh.state_dict()[key].dtype == value.dtype and torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(5, 48)
    assert torch.equal(fresh(x), q(x))
    # a module of another format does not silently accept the tensors
    with pytest.raises(RuntimeError):
        QuantLinear(48, 20, parse_format("int6-sym-group16"), afmt).load_state_dict(q.state_dict())


def test_clip_ratio_from_mse_search_lowers_weight_error() -> None:
    lin = make_linear(k=64, n=16)
    fmt = parse_format("int3-sym-channel")
    w = lin.weight.detach()
    plain = QuantLinear.from_float(lin, fmt)
    clipped = QuantLinear.from_float(lin, fmt, clip_ratio=mse_clip_search(w, fmt))
    e_plain = (plain.dequantized_weight() - w).square().sum(1)
    e_clip = (clipped.dequantized_weight() - w).square().sum(1)
    assert bool((e_clip <= e_plain * (1 + 1e-6)).all()) and float(e_clip.sum()) < float(e_plain.sum())


def test_group_size_not_dividing_width_and_bad_formats_raise() -> None:
    with pytest.raises(ValueError, match="does not divide the width 48"):
        QuantLinear.from_float(make_linear(k=48), parse_format("int4-sym-group32"))
    with pytest.raises(ValueError, match="per token, group or tensor"):
        QuantLinear.from_float(make_linear(), parse_format("int8-sym-channel"), parse_format("int8-sym-channel"))
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(nn.Conv2d(3, 3, 1), parse_format("int8-sym-channel"))  # type: ignore[arg-type]


def test_extra_repr_and_no_bias() -> None:
    q = QuantLinear.from_float(
        make_linear(bias=False), parse_format("int4-sym-group16"), parse_format("int8-sym-token")
    )
    r = repr(q)
    assert "int4-sym-group16" in r and "packed" in r and "int8-sym-token" in r and "bias=False" in r
    assert q.bias is None
    x = torch.randn(3, 48)
    assert torch.equal(q(x), F.linear(fake_quantize(x, q.act_fmt), q.dequantized_weight()))


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(6, 10, 3, padding=1, stride=2),
        lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=False),
        lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
        lambda: nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2),
    ],
)
def test_quant_conv_is_weight_only_per_output_channel(conv) -> None:
    torch.manual_seed(1)
    c = conv()
    fmt = parse_format("int8-sym-channel")
    q = QuantConv2d.from_float(c, fmt)
    w = c.weight.detach()
    wq = q.dequantized_weight()
    assert wq.shape == w.shape
    # per-output-channel scale: the error of output channel j is at most half of its own scale
    out_dim = 1 if q.transposed else 0
    err = (wq - w).abs().transpose(0, out_dim).flatten(1).amax(1)
    assert bool((err <= q.weight_scale.flatten() / 2 * (1 + 1e-6)).all())
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        ref, out = c(x), q(x)
        assert out.shape == ref.shape and float((out - ref).norm() / ref.norm()) < 0.01
        c_deq = conv()
        c_deq.load_state_dict({**c.state_dict(), "weight": wq})
        assert torch.allclose(out, c_deq(x), atol=1e-6, rtol=0)  # inputs are not quantized
        q4 = QuantConv2d.from_float(c, parse_format("int4-asym-channel"))
        fresh = roundtrip(q4, QuantConv2d.from_float(conv(), parse_format("int4-asym-channel")))
        assert torch.equal(fresh(x), q4(x))
    assert "weight-only" in repr(q)
