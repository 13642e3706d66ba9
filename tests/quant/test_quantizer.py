"""Property tests of the quantize/dequantize primitives, STE gradients, MSE clipping and observers.

Checks go through a reference "groups view" built here independently of the implementation: every granularity
is a reshape of x to [M, E] (M scale groups of E elements each), and scales reshape to [M, 1].
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvggt.quant.formats import QuantFormat, parse_format
from qvggt.quant.quantizer import (
    MinMaxObserver,
    compute_scales,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    mse_clip_search,
    quantize,
    scale_view,
)

FAST = settings(
    max_examples=int(os.environ.get("QVGGT_HYPOTHESIS_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def groups(t: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Reference [M, E] view: one row per scale group, in the order scales flatten."""
    gran = fmt.granularity.value
    if gran == "tensor":
        return t.reshape(1, -1)
    if gran == "channel":
        return t.reshape(t.shape[0], -1)
    if gran == "token":
        return t.reshape(-1, t.shape[-1])
    return t.reshape(-1, fmt.group_size)


def expected_scale_shape(shape: tuple[int, ...], fmt: QuantFormat) -> tuple[int, ...]:
    gran = fmt.granularity.value
    if gran == "tensor":
        return (1,) * len(shape)
    if gran == "channel":
        return (shape[0],) + (1,) * (len(shape) - 1)
    if gran == "token":
        return (*shape[:-1], 1)
    return (*shape[:-1], shape[-1] // fmt.group_size, 1)


def make_data(kind: str, shape: tuple[int, ...], magnitude: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=g)
    elif kind == "uniform":
        x = torch.rand(shape, generator=g) * 2 - 1
    elif kind == "positive":
        x = torch.rand(shape, generator=g) + 0.5
    elif kind == "negative":
        x = -(torch.rand(shape, generator=g) + 0.5)
    elif kind == "constant":
        x = torch.full(shape, -0.73)
    elif kind == "zeros":
        x = torch.zeros(shape)
    else:  # "outliers": Student-t-like heavy tails
        x = torch.randn(shape, generator=g) / torch.rand(shape, generator=g).clamp_min(1e-3)
    return x * magnitude


@st.composite
def int_cases(draw: st.DrawFn) -> tuple[QuantFormat, torch.Tensor, float]:
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    gran = draw(st.sampled_from(["tensor", "channel", "token", "group"]))
    lead = draw(st.lists(st.integers(1, 5), min_size=0 if gran != "channel" else 1, max_size=2))
    if gran == "group":
        gs = draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16]))
        k = gs * draw(st.integers(1, 4))
    else:
        gs, k = None, draw(st.integers(1, 33))
    fmt = QuantFormat(kind="int", bits=bits, symmetric=symmetric, granularity=gran, group_size=gs)
    kind = draw(st.sampled_from(["normal", "uniform", "positive", "negative", "constant", "zeros", "outliers"]))
    magnitude = 10.0 ** draw(st.floats(-6, 4))
    x = make_data(kind, (*lead, k), magnitude, draw(st.integers(0, 2**31 - 1)))
    clip = draw(st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.31]))
    return fmt, x, clip


@FAST
@given(int_cases())
def test_int_round_trip_error_within_half_a_step(case: tuple[QuantFormat, torch.Tensor, float]) -> None:
    fmt, x, clip = case
    scale, zp = compute_scales(x, fmt, clip_ratio=clip)
    assert tuple(scale.shape) == expected_scale_shape(tuple(x.shape), fmt)
    assert scale.dtype == torch.float32 and torch.isfinite(scale).all() and (scale > 0).all()
    q = quantize(x, fmt, scale, zp)
    assert q.dtype == fmt.storage_dtype and q.shape == x.shape
    assert int(q.min()) >= fmt.qmin and int(q.max()) <= fmt.qmax
    x_hat = dequantize(q, fmt, scale, zp)
    assert torch.equal(fake_quantize(x, fmt, clip_ratio=clip), x_hat)  # one code path, bit-identical

    xr, xh = groups(x, fmt).double(), groups(x_hat, fmt).double()
    s = scale.reshape(-1, 1).double()
    if fmt.symmetric:
        assert zp is None
        amax = xr.abs().amax(dim=1, keepdim=True)
        lo, hi = -clip * amax, clip * amax
    else:
        z = zp.reshape(-1, 1)
        assert zp.shape == scale.shape and torch.equal(z, z.round()) and (z >= 0).all() and (z <= fmt.qmax).all()
        lo = clip * xr.amin(dim=1, keepdim=True).clamp(max=0)
        hi = clip * xr.amax(dim=1, keepdim=True).clamp(min=0)
        # x = 0 is exactly representable in asymmetric formats.
        assert (xh[xr == 0] == 0).all()
    inside = (xr >= lo) & (xr <= hi)
    err = (xr - xh).abs()
    bound = s / 2 + s * 1e-4 + xr.abs() * 1e-6
    assert (err <= bound)[inside].all(), float((err - bound)[inside].max())
    if clip == 1.0:
        assert inside.all()
    # Clipped elements saturate to the extreme code on their side.
    qr = groups(q, fmt).long()
    assert (qr[xr > hi] == fmt.qmax).all() and (qr[xr < lo] == fmt.qmin).all()


@st.composite
def fp8_cases(draw: st.DrawFn) -> tuple[QuantFormat, torch.Tensor]:
    gran = draw(st.sampled_from(["tensor", "channel", "token", "group"]))
    lead = draw(st.lists(st.integers(1, 5), min_size=0 if gran != "channel" else 1, max_size=2))
    gs = draw(st.sampled_from([1, 3, 8])) if gran == "group" else None
    k = gs * draw(st.integers(1, 4)) if gs else draw(st.integers(1, 33))
    kind = draw(st.sampled_from(["normal", "uniform", "positive", "constant", "zeros", "outliers"]))
    x = make_data(kind, (*lead, k), 10.0 ** draw(st.floats(-6, 4)), draw(st.integers(0, 2**31 - 1)))
    return QuantFormat(kind="fp8_e4m3", granularity=gran, group_size=gs), x


@FAST
@given(fp8_cases())
def test_fp8_round_trip_relative_error(case: tuple[QuantFormat, torch.Tensor]) -> None:
    fmt, x = case
    scale, zp = compute_scales(x, fmt)
    assert zp is None and torch.isfinite(scale).all() and (scale > 0).all()
    q = quantize(x, fmt, scale)
    assert q.dtype == torch.float8_e4m3fn and not torch.isnan(q.float()).any()
    assert q.float().abs().max() <= 448
    x_hat = dequantize(q, fmt, scale)
    assert torch.equal(fake_quantize(x, fmt), x_hat)
    xr, xh, s = groups(x, fmt).double(), groups(x_hat, fmt).double(), scale.reshape(-1, 1).double()
    # e4m3: 3 mantissa bits -> relative half-step 2^-4 for normals; subnormals (|x/s| < 2^-6) have an absolute
    # spacing of 2^-9, half-step 2^-10 (in units of the scale).
    bound = 2.0**-4 * xr.abs() + 2.0**-10 * s + 1e-6 * xr.abs()
    assert ((xr - xh).abs() <= bound).all()


def test_fp8_saturates_instead_of_nan() -> None:
    fmt = parse_format("fp8_e4m3-tensor")
    x = torch.tensor([1.0, -1.0, 1e3, -1e3, 0.0])
    q = quantize(x, fmt, torch.ones(1))
    assert q.float().tolist() == [1.0, -1.0, 448.0, -448.0, 0.0]


def test_round_half_to_even_and_sign_symmetry() -> None:
    fmt = parse_format("int8-sym-tensor")
    one = torch.ones(1)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 300.0, -300.0])
    assert quantize(x, fmt, one).tolist() == [0, 2, 2, 0, -2, 126, 127, -127]
    y = torch.randn(64, 48)
    s, _ = compute_scales(y, parse_format("int4-sym-channel"))
    f4 = parse_format("int4-sym-channel")
    assert torch.equal(quantize(-y, f4, s), -quantize(y, f4, s))  # restricted range: -x -> -q


@pytest.mark.parametrize(
    "name", ["int2-sym-tensor", "int2-asym-channel", "int4-asym-token", "int8-sym-group1", "fp8_e4m3-token"]
)
@pytest.mark.parametrize(
    "x",
    [torch.zeros(3, 8), torch.full((3, 8), 5.0), torch.full((3, 8), -1e-30), torch.tensor([[2.5]]), torch.zeros(1, 4)],
    ids=["zeros", "constant", "tiny-constant", "single", "single-row-zeros"],
)
def test_degenerate_inputs_give_finite_positive_scales(name: str, x: torch.Tensor) -> None:
    fmt = parse_format(name)
    scale, _ = compute_scales(x, fmt)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    x_hat = fake_quantize(x, fmt)
    assert torch.isfinite(x_hat).all()
    if name.startswith("int"):
        assert torch.allclose(x_hat, x, rtol=0, atol=float(scale.max()) / 2 * (1 + 1e-5))
    if (x == 0).all():
        assert (x_hat == 0).all()


def test_extreme_range_does_not_overflow() -> None:
    x = torch.tensor([[-3.0e38, 3.0e38, 0.0, 1.0]])
    for name in ["int8-asym-tensor", "int4-sym-token", "fp8_e4m3-tensor"]:
        scale, _ = compute_scales(x, parse_format(name))
        assert torch.isfinite(scale).all() and (scale > 0).all(), name
        assert torch.isfinite(fake_quantize(x, parse_format(name))).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(6, 32).to(dtype)
    for name in ["int4-asym-group8", "fp8_e4m3-token", "int8-sym-channel"]:
        fmt = parse_format(name)
        out = fake_quantize(x, fmt)
        assert out.dtype == dtype and out.shape == x.shape
        scale, _ = compute_scales(x, fmt)
        assert scale.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        if dtype != torch.float64:  # low-precision input: same math as its exact float32 upcast
            assert torch.equal(out, fake_quantize(x.float(), fmt).to(dtype))


def test_static_scales_and_argument_errors() -> None:
    x = torch.randn(4, 16)
    fmt = parse_format("int8-asym-tensor")
    scale, zp = compute_scales(x, fmt)
    assert torch.equal(fake_quantize(x, fmt, scale=scale, zero_point=zp), fake_quantize(x, fmt))
    with pytest.raises(ValueError, match="zero_point is required"):
        quantize(x, fmt, scale)
    with pytest.raises(ValueError, match="zero_point must be None"):
        quantize(x, parse_format("int8-sym-tensor"), scale, zp)
    with pytest.raises(ValueError, match="clip_ratio applies to dynamic scales only"):
        fake_quantize(x, fmt, clip_ratio=0.5, scale=scale, zero_point=zp)
    with pytest.raises(ValueError, match="zero_point was given without a scale"):
        fake_quantize(x, fmt, zero_point=zp)
    with pytest.raises(ValueError, match=r"clip_ratio must be a float in \(0, 1\]"):
        compute_scales(x, fmt, clip_ratio=1.5)
    with pytest.raises(ValueError, match=r"clip_ratio must be a float in \(0, 1\]"):
        compute_scales(x, fmt, clip_ratio=0.0)
    # A per-channel ratio of shape [N] would silently broadcast to [N, N] against [N, 1]: rejected.
    with pytest.raises(ValueError, match=r"clip_ratio of shape \(4,\) does not broadcast to the scale shape \(4, 1\)"):
        compute_scales(x, parse_format("int8-sym-channel"), clip_ratio=torch.full((4,), 0.9))
    with pytest.raises(ValueError, match="does not broadcast against"):
        quantize(x, parse_format("int8-sym-channel"), torch.ones(5, 1))
    with pytest.raises(ValueError, match=r"dtype torch\.uint8"):
        dequantize(torch.zeros(4, 16, dtype=torch.int8), fmt, scale, zp)
    with pytest.raises(ValueError, match="floating-point"):
        compute_scales(torch.ones(4, 16, dtype=torch.int32), fmt)
    with pytest.raises(ValueError, match="empty"):
        compute_scales(torch.ones(0, 16), fmt)
    with pytest.raises(ValueError, match="needs at least a 1-D"):
        compute_scales(torch.tensor(1.0), parse_format("int8-sym-token"))


def test_group_size_must_divide_width() -> None:
    fmt = parse_format("int4-sym-group128")
    for fn in (lambda t: compute_scales(t, fmt), lambda t: fake_quantize(t, fmt), MinMaxObserver(fmt).update):
        with pytest.raises(ValueError, match=r"group_size=128 does not divide the last dim K=200"):
            fn(torch.randn(3, 200))


def test_scale_view_shapes() -> None:
    x = torch.randn(2, 3, 12)
    assert scale_view(x, parse_format("int4-sym-group4")).shape == (2, 3, 3, 4)
    assert scale_view(x, parse_format("int4-sym-token")) is x


# ------------------------------------------------------------------ straight-through estimator


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["int4-sym-channel", "int3-asym-channel", "int4-sym-group16", "fp8_e4m3-channel"])
def test_ste_gradients_reach_input_and_learnable_clip(name: str, device: str) -> None:
    fmt = parse_format(name)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(8, 64, generator=g) * torch.linspace(0.1, 3, 64)).to(device).requires_grad_(True)
    n_scales = 8 if fmt.granularity.value == "channel" else 8 * 64 // 16
    shape = (8, 1) if fmt.granularity.value == "channel" else (8, 4, 1)
    logit = torch.full(shape, 1.0, device=device, requires_grad=True)  # sigmoid(1) = 0.73: some clipping
    clip = torch.sigmoid(logit)
    w_hat = fake_quantize_ste(w, fmt, clip_ratio=clip)
    # Forward equals the non-differentiable path (up to float rounding of the STE trick).
    ref = fake_quantize(w.detach(), fmt, clip_ratio=clip.detach())
    assert torch.equal(w_hat.detach(), ref)
    loss = (w_hat - w.detach() * 0.9).square().sum()
    loss.backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(logit.grad).all()
    assert (logit.grad != 0).sum() == n_scales
    # d w_hat / d w is the identity inside the clipped range and 0 outside it.
    w.grad = None
    fake_quantize_ste(w, fmt, clip_ratio=clip.detach()).sum().backward()
    wg = scale_view(w.detach(), fmt)
    amax = wg.abs().amax(dim=-1, keepdim=True) if fmt.granularity.value == "group" else wg.abs().amax(1, keepdim=True)
    if fmt.symmetric:
        limit = clip.detach() * amax
        inside = wg.abs() < limit * (1 - 1e-6)
        outside = wg.abs() > limit * (1 + 1e-6)
        grad = scale_view(w.grad, fmt)
        assert (grad[inside] == 1).all() and (grad[outside] == 0).all() and outside.any() and inside.any()
    else:
        assert set(w.grad.unique().tolist()) <= {0.0, 1.0} and (w.grad == 0).any() and (w.grad == 1).any()


def test_ste_learnable_static_scale_gets_gradient() -> None:
    fmt = parse_format("int4-asym-token")
    x = torch.randn(5, 32)
    s0, zp = compute_scales(x, fmt)
    scale = s0.clone().requires_grad_(True)
    fake_quantize_ste(x, fmt, scale=scale, zero_point=zp).square().sum().backward()
    assert torch.isfinite(scale.grad).all() and (scale.grad != 0).all()


# ------------------------------------------------------------------ MSE clipping search


def student_t(shape: tuple[int, ...], df: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((df, *shape), generator=g).square().sum(0)
    return z / (chi2 / df).sqrt()


def group_errors(x: torch.Tensor, fmt: QuantFormat, ratio: torch.Tensor | float) -> torch.Tensor:
    return groups((fake_quantize(x, fmt, clip_ratio=ratio).double() - x.double()).square(), fmt).sum(1)


@pytest.mark.parametrize(
    ("name", "max_gain"),  # measured error ratios: 0.77, 0.80, 0.93, 0.86; 8 bits: nothing to gain
    [("int4-sym-channel", 0.85), ("int3-asym-channel", 0.85), ("int4-sym-group32", 0.97), ("int4-asym-token", 0.92)],
)
def test_mse_clip_search_helps_on_heavy_tails(name: str, max_gain: float) -> None:
    fmt = parse_format(name)
    x = student_t((16, 256), df=2, seed=3)
    ratio = mse_clip_search(x, fmt, grid=50, min_ratio=0.2)
    assert ratio.shape == compute_scales(x, fmt)[0].shape and ratio.dtype == torch.float32
    assert (ratio >= 0.2 - 1e-6).all() and (ratio <= 1).all() and (ratio < 1).any()
    e1, eb = group_errors(x, fmt, 1.0), group_errors(x, fmt, ratio)
    assert (eb <= e1 * (1 + 1e-6)).all()
    assert eb.sum() < max_gain * e1.sum()


def test_mse_clip_search_helps_with_a_few_huge_outliers() -> None:
    fmt = parse_format("int4-sym-tensor")
    x = torch.randn(64, 64)
    x[0, 0], x[5, 9] = 40.0, -35.0
    ratio = mse_clip_search(x, fmt, min_ratio=0.05)
    assert ratio.item() < 0.5
    assert group_errors(x, fmt, ratio).sum() < 0.6 * group_errors(x, fmt, 1.0).sum()  # measured: 0.56


@settings(max_examples=40, deadline=None)
@given(int_cases(), st.integers(1, 40), st.sampled_from([0.05, 0.5, 1.0]))
def test_mse_clip_search_never_worse_and_chunking_invariant(case, grid: int, min_ratio: float) -> None:
    fmt, x, _ = case
    ratio = mse_clip_search(x, fmt, grid=grid, min_ratio=min_ratio)
    assert torch.equal(ratio, mse_clip_search(x, fmt, grid=grid, min_ratio=min_ratio, max_elements=1))
    assert (ratio >= min_ratio - 1e-6).all() and (ratio <= 1).all()
    e1, eb = group_errors(x, fmt, 1.0), group_errors(x, fmt, ratio)
    assert (eb <= e1 * (1 + 1e-5) + 1e-30).all()


def test_mse_clip_search_argument_errors() -> None:
    x = torch.randn(4, 8)
    fmt = parse_format("int4-sym-channel")
    for kwargs in ({"grid": 0}, {"min_ratio": 0.0}, {"min_ratio": 1.5}, {"norm": 0.0}):
        with pytest.raises(ValueError):
            mse_clip_search(x, fmt, **kwargs)


# ------------------------------------------------------------------ observers


@pytest.mark.parametrize("name", ["int8-sym-tensor", "int4-asym-tensor", "fp8_e4m3-tensor", "int8-asym-group8"])
def test_observer_streaming_equals_one_shot(name: str) -> None:
    fmt = parse_format(name)
    chunks = [student_t((n, 5, 24), df=3, seed=n) * (n + 1) for n in (1, 4, 2, 7)]
    streamed, one_shot = MinMaxObserver(fmt), MinMaxObserver(fmt)
    for c in chunks:
        streamed.update(c)
    one_shot.update(torch.cat(chunks))
    s1, z1 = streamed.calculate()
    s2, z2 = one_shot.calculate()
    assert torch.equal(s1, s2) and (z1 is None) == (z2 is None) and (z1 is None or torch.equal(z1, z2))
    assert streamed.num_updates == 4 and torch.isfinite(s1).all() and (s1 > 0).all()
    if fmt.granularity.value == "tensor":  # the same as dynamic scales of the whole concatenation
        s3, z3 = compute_scales(torch.cat(chunks), fmt)
        assert s1.shape == () and torch.equal(s1, s3.reshape(())) and (z1 is None or torch.equal(z1, z3.reshape(())))
    else:
        assert s1.shape == (3, 1)
        x = torch.cat(chunks)
        x_hat = fake_quantize(x, fmt, scale=s1, zero_point=z1)  # static [K/G, 1] broadcasts over tokens
        assert x_hat.shape == x.shape


def test_channel_observer_streams_along_other_dims() -> None:
    fmt = parse_format("int4-asym-channel")
    w = torch.randn(6, 40)
    obs = MinMaxObserver(fmt)
    for part in w.split([7, 13, 20], dim=1):
        obs.update(part)
    s, z = obs.calculate()
    s_ref, z_ref = compute_scales(w, fmt)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    with pytest.raises(ValueError, match="statistics of shape"):
        obs.update(torch.randn(5, 40))


def test_observer_errors() -> None:
    with pytest.raises(ValueError, match="static per-token observer is not possible"):
        MinMaxObserver(parse_format("int8-sym-token"))
    obs = MinMaxObserver(parse_format("int8-sym-tensor"))
    with pytest.raises(ValueError, match=r"call update\(\) first"):
        obs.calculate()
    obs.update(torch.zeros(3, 3))
    scale, _ = obs.calculate()
    assert torch.isfinite(scale) and scale > 0
    assert scale == torch.finfo(torch.float32).tiny  # the documented floor for an all-zero input
    obs.update(torch.full((2, 3), -4.0))
    assert obs.calculate(clip_ratio=0.5)[0] == 2.0 / 127
    obs.reset()
    assert obs.min_val is None and obs.num_updates == 0


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_device(device: str) -> None:
    x = torch.randn(4, 3, 64, device=device)
    for name in ["int4-sym-group32", "int8-asym-token", "fp8_e4m3-channel"]:
        fmt = parse_format(name)
        scale, zp = compute_scales(x, fmt)
        q = quantize(x, fmt, scale, zp)
        assert q.device.type == device and scale.device.type == device
        x_hat = dequantize(q, fmt, scale, zp)
        assert torch.equal(x_hat, fake_quantize(x, fmt))
        assert mse_clip_search(x, fmt, grid=8).device.type == device
    cpu = fake_quantize(x.cpu(), parse_format("int4-sym-group32"))
    torch.testing.assert_close(fake_quantize(x, parse_format("int4-sym-group32")).cpu(), cpu, rtol=0, atol=1e-6)
