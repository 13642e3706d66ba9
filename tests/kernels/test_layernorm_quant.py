"""Fused LayerNorm -> per-token quantization kernel vs its torch twin, under the Triton interpreter (CPU).

The interpreter is switched on for the whole test session by ``tests/conftest.py`` (it must be on before triton
is first imported). What the interpreter cannot prove: GPU codegen (that ``(v + 1.5*2^23) - 1.5*2^23`` is not
folded, ``div_rn`` / ``sqrt_rn`` lowering, the hardware fp8 cast), bf16 arithmetic inside kernels, and speed: those
are checked by tests/kernels/test_kernels_cuda.py on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvggt.kernels import has_triton
from qvggt.kernels.reference import (
    dequant_ref,
    layernorm_quant_ref,
    token_format,
    token_quant_ref,
)
from qvggt.quant.quantizer import fake_quantize

if has_triton():
    import qvggt.kernels.layernorm_quant as lq

pytestmark = pytest.mark.skipif(
    not (has_triton() and lq.kernel_is_interpreted()),
    reason="needs the Triton interpreter, which tests/conftest.py turns on where there is no GPU",
)


EPS = 1e-6
SHAPES = [(m, k) for m in (1, 3, 17) for k in (64, 65, 100, 1000, 1024)]


def _inputs(m: int, k: int, affine: bool, dtype: torch.dtype = torch.float32):
    # Per-row offsets and spreads, plus a few outlier channels: the activation shape LayerNorm sees in VGGT.
    x = torch.randn(m, k) * torch.rand(m, 1) * 4 + torch.randn(m, 1)
    x[:, :: max(1, k // 7)] *= 8
    w = torch.randn(k) * 0.5 + 1 if affine else None
    b = torch.randn(k) * 0.1 if affine else None
    return x.to(dtype), w, b


def _fp8_steps(a: torch.Tensor) -> torch.Tensor:
    """e4m3 grid step at each value a (>= 0, in units of the scale): 2^(max(floor(log2 a), -6) - 3)."""
    e = torch.floor(torch.log2(a.clamp_min(2.0**-6)))
    return torch.exp2(e - 3)


def test_interpreter_is_active() -> None:
    assert lq.kernel_is_interpreted()


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize(("m", "k"), SHAPES)
def test_int8_kernel_matches_twin(m: int, k: int, affine: bool) -> None:
    x, w, b = _inputs(m, k, affine)
    before = lq.KERNEL_CALLS["layernorm_quant"]
    q, s = lq.layernorm_quant(x, w, b, EPS, "int8")
    assert lq.KERNEL_CALLS["layernorm_quant"] == before + 1
    qr, sr = layernorm_quant_ref(x, w, b, EPS, "int8")
    assert q.dtype == torch.int8 and q.shape == (m, k) and s.dtype == torch.float32 and s.shape == (m, 1)
    # LayerNorm's reductions run in another order than F.layer_norm's: scales agree to a few float32 ulps.
    torch.testing.assert_close(s, sr, rtol=4 * 2.0**-23, atol=0.0)
    # Codes: equal unless an ulp of LayerNorm difference pushes x/scale across a .5 boundary; then one code apart.
    # Measured: 0 of 94,626 codes over this shape matrix (another seed); the quantization stage alone is bit-exact
    # (test_quantization_stage_is_bit_exact_on_ties).
    diff = (q.int() - qr.int()).abs()
    assert int(diff.max()) <= 1
    assert int((diff != 0).sum()) <= max(1, q.numel() // 1000)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize(("m", "k"), [(1, 64), (3, 65), (17, 100), (3, 1000), (17, 1024)])
def test_fp8_kernel_matches_twin(m: int, k: int, affine: bool) -> None:
    x, w, b = _inputs(m, k, affine)
    q, s = lq.layernorm_quant(x, w, b, EPS, "fp8_e4m3")
    qr, sr = layernorm_quant_ref(x, w, b, EPS, "fp8_e4m3")
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k)
    torch.testing.assert_close(s, sr, rtol=4 * 2.0**-23, atol=0.0)
    # Against the exact normalized value, each quantized value is within half an e4m3 step (in units of the scale).
    exact = F.layer_norm(x.double(), (k,), None if w is None else w.double(), None if b is None else b.double(), EPS)
    v = exact / s.double()
    err = (q.double() - v).abs()
    assert bool((err <= _fp8_steps(v.abs()) * 0.5 * (1 + 1e-4) + 1e-9).all())
    # And against the twin: identical values, except where an ulp of LayerNorm difference flips a rounding tie to
    # the neighbouring grid point (measured: 2 of 94,626 values over this shape matrix).
    qk, qt = q.double(), qr.double()
    flips = qk != qt
    assert int(flips.sum()) <= max(1, q.numel() // 1000)
    assert bool(((qk - qt).abs() <= _fp8_steps(qt.abs().clamp_min(qk.abs())) * (1 + 1e-6)).all())
    torch.testing.assert_close(dequant_ref(q, s), dequant_ref(qr, sr), rtol=2.0**-4, atol=0.0)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(fmt: str, dtype: torch.dtype) -> None:
    x, w, b = _inputs(5, 100, True, dtype)
    q, s = lq.layernorm_quant(x, w.to(dtype), b.to(dtype), EPS, fmt)
    qr, sr = layernorm_quant_ref(x, w.to(dtype), b.to(dtype), EPS, fmt)
    torch.testing.assert_close(s, sr, rtol=4 * 2.0**-23, atol=0.0)
    assert int((q.float() != qr.float()).sum()) <= 1  # 500 codes; at most one LayerNorm-ulp tie flip


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_quantization_stage_is_bit_exact_on_ties(fmt: str) -> None:
    """token_quant (the same kernel without LayerNorm) vs twin on exact rounding ties, zeros and random rows."""
    k = 100
    qmax = float(token_format(fmt).qmax)
    if fmt == "int8":
        # amax == 127 -> scale == 1 exactly, so x / scale hits every .5 tie: half-even must give ..., -2, 0, 0, 2, ...
        ties = torch.arange(-50, 50, dtype=torch.float32) + 0.5
    else:
        # amax == 448 -> scale == 1; midpoints between e4m3 neighbours (normal and subnormal), both even/odd sides.
        grid = torch.tensor(
            [2.0**-9 * i for i in range(8)] + [2.0**e * (1 + j / 8) for e in range(-6, 8) for j in range(8)]
        )
        ties = ((grid[1:] + grid[:-1]) / 2)[:k]
        ties = torch.cat([ties, -ties])[:k]
    ties = torch.nn.functional.pad(ties, (0, k - ties.numel()))
    ties[-1] = qmax
    x = torch.stack([ties, -ties, torch.zeros(k), torch.randn(k) * 1e-3, torch.randn(k) * 1e4])
    before = lq.KERNEL_CALLS["token_quant"]
    q, s = lq.token_quant(x, fmt)
    assert lq.KERNEL_CALLS["token_quant"] == before + 1
    qr, sr = token_quant_ref(x, fmt)
    assert torch.equal(s, sr)
    # Equal values; compared as floats because the interpreter's fp8 cast drops the sign of -0.0 (-2^-10 rounds to
    # -0 in torch, +0 here); both dequantize to 0.
    assert torch.equal(q.float(), qr.float())
    assert float(s[2]) == torch.finfo(torch.float32).tiny  # all-zero row: floored scale, zero codes
    if fmt == "int8":
        assert q[0, :4].tolist() == [-50, -48, -48, -46]  # -49.5, -48.5, -47.5, -46.5 -> even


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_matches_fake_quantize(fmt: str, dtype: torch.dtype) -> None:
    x, w, b = _inputs(7, 65, True, dtype)
    qr, sr = layernorm_quant_ref(x, w, b, EPS, fmt)
    expected = fake_quantize(F.layer_norm(x.float(), (65,), w, b, EPS), token_format(fmt))
    assert torch.equal(dequant_ref(qr, sr), expected)


def test_bad_inputs_raise() -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="2-D"):
        lq.layernorm_quant(x.reshape(2, 2, 64))
    with pytest.raises(ValueError, match=r"weight must have shape \[K\] = \[64\]"):
        lq.layernorm_quant(x, torch.ones(63))
    with pytest.raises(ValueError, match=r"bias must have shape"):
        lq.layernorm_quant(x, None, torch.ones(65))
    with pytest.raises(ValueError, match="contiguous"):
        lq.layernorm_quant(torch.randn(64, 4).t())
    with pytest.raises(ValueError, match="fmt="):
        lq.layernorm_quant(x, fmt="int2")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        lq.layernorm_quant(x.double())


def test_fallback_off_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors without the interpreter run the twin and count a fallback."""
    monkeypatch.setattr(lq, "kernel_is_interpreted", lambda: False)
    x, w, b = _inputs(3, 65, True)
    before = dict(lq.FALLBACK_CALLS)
    q, s = lq.layernorm_quant(x, w, b, EPS, "int8")
    assert lq.FALLBACK_CALLS["layernorm_quant"] == before["layernorm_quant"] + 1
    qr, sr = layernorm_quant_ref(x, w, b, EPS, "int8")
    assert torch.equal(q, qr) and torch.equal(s, sr)


def test_int4_grid_for_w4a4_activations() -> None:
    """fmt="int4": codes on the 4-bit grid [-7, 7] in int8 storage, bit-identical to the twin."""
    x = torch.randn(37, 96) * 3
    q, s = lq.layernorm_quant(x, None, None, 1e-5, "int4")
    qr, sr = layernorm_quant_ref(x, None, None, 1e-5, "int4")
    assert q.dtype == torch.int8 and int(q.abs().max()) == 7
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    assert (q != qr).float().mean() < 0.01


# ---------------------------------------------------------------------------------------------------------------------
# Rotation stage: LayerNorm -> block Hadamard (QuantLinear.input_hadamard) -> per-token quantization
# ---------------------------------------------------------------------------------------------------------------------

# (M, K, b): 1 token, odd token counts; full-width blocks (tiny 64, small 128, vggt-1b 1024, its fc2 4096), blocks
# smaller than the row, rows that are not a power of two (96 = 3 x 32, 1000 = 125 x 8: padded lanes in the kernel).
ROT_SHAPES = [(1, 64, 64), (3, 96, 32), (17, 1024, 1024), (5, 1000, 8), (2, 4096, 4096), (9, 128, 128), (4, 256, 2)]


def _dense_block_rotation(y: torch.Tensor, b: int) -> torch.Tensor:
    """Independent float64 reference: y [M, K] times blockdiag(H_b, ...) / sqrt(b) with H_b from a dense matrix."""
    from qvggt.quant.hadamard import dense

    h = dense(b, normalize=True, dtype=torch.float64)
    m, k = y.shape
    return (y.double().view(m, k // b, b) @ h).view(m, k)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "int4"])
@pytest.mark.parametrize(("m", "k", "b"), ROT_SHAPES)
def test_rotation_stage_is_bit_exact_with_twin(m: int, k: int, b: int, fmt: str) -> None:
    """token_quant with a rotation (the kernel minus LayerNorm): codes and scales identical to the twin's.

    The kernel's butterflies add in the twin's order and divide by the same float32 sqrt(b), so nothing differs.
    """
    x = torch.randn(m, k) * 3
    x[:, 5] = 40.0  # an outlier channel: the case the rotation is for
    before = lq.KERNEL_CALLS["token_hadamard_quant"]
    q, s = lq.token_quant(x, fmt, hadamard=b)
    assert lq.KERNEL_CALLS["token_hadamard_quant"] == before + 1
    qr, sr = token_quant_ref(x, fmt, b)
    assert q.shape == (m, k) and s.shape == (m, 1)
    assert torch.equal(s, sr)
    assert torch.equal(q.float(), qr.float())


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize(("m", "k", "b"), ROT_SHAPES)
def test_layernorm_hadamard_kernel_matches_twin(m: int, k: int, b: int, fmt: str) -> None:
    x, w, bias = _inputs(m, k, affine=True)
    before = lq.KERNEL_CALLS["layernorm_hadamard_quant"]
    q, s = lq.layernorm_quant(x, w, bias, EPS, fmt, hadamard=b)
    assert lq.KERNEL_CALLS["layernorm_hadamard_quant"] == before + 1
    qr, sr = layernorm_quant_ref(x, w, bias, EPS, fmt, hadamard=b)
    assert q.dtype == qr.dtype and q.shape == (m, k)
    # LayerNorm's reduction order moves the normalized row by an ulp or so; the rotation mixes b such values.
    torch.testing.assert_close(s, sr, rtol=16 * 2.0**-23, atol=0.0)
    flips = q.float() != qr.float()
    assert int(flips.sum()) <= max(1, q.numel() // 500)
    # Independent of the twin: dequantized codes reproduce the float64 rotation of the exact LayerNorm to within
    # half a quantization step (int8: scale / 2; fp8: half an e4m3 step, relative) plus the float32 noise.
    exact = _dense_block_rotation(F.layer_norm(x.double(), (k,), w.double(), bias.double(), EPS), b)
    v = exact / s.double()
    half = 0.5 * (_fp8_steps(v.abs()) if fmt == "fp8_e4m3" else torch.ones_like(v))
    assert bool(((q.double() - v).abs() <= half * (1 + 1e-3) + 1e-4).all())


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_rotated_twin_is_what_quant_linear_computes(fmt: str) -> None:
    """The twin with hadamard=b is QuantLinear's input path (rotate, then fake-quantize per token) bit for bit."""
    from qvggt.quant.hadamard import block_hadamard_transform

    x, w, b = _inputs(7, 256, True)
    for block in (2, 64, 256):
        qr, sr = layernorm_quant_ref(x, w, b, EPS, fmt, hadamard=block)
        y = block_hadamard_transform(F.layer_norm(x.float(), (256,), w, b, EPS), block)
        assert torch.equal(dequant_ref(qr, sr), fake_quantize(y, token_format(fmt)))


def test_rotation_spreads_an_outlier_channel() -> None:
    """What the stage is for: one huge channel costs the other channels their resolution, unless rotated."""
    x = torch.randn(8, 1024)
    x[:, 3] = 300.0
    plain_q, plain_s = lq.token_quant(x, "int8")
    rot_q, rot_s = lq.token_quant(x, "int8", hadamard=1024)
    from qvggt.quant.hadamard import block_hadamard_transform

    err_plain = (dequant_ref(plain_q, plain_s) - x).norm()
    err_rot = (block_hadamard_transform(dequant_ref(rot_q, rot_s), 1024) - x).norm()  # H is its own inverse
    assert err_rot < 0.2 * err_plain


def test_bad_hadamard_blocks_raise() -> None:
    x = torch.randn(4, 96)
    for bad, match in ((3, "power of two"), (48, "power of two"), (64, "dividing"), (1, ">= 2"), (-2, "power")):
        with pytest.raises(ValueError, match=match):
            lq.layernorm_quant(x, hadamard=bad)
    with pytest.raises(TypeError, match="hadamard"):
        lq.token_quant(x, hadamard=True)
    with pytest.raises(ValueError, match="dividing"):
        lq.token_quant(x, "fp8_e4m3", hadamard=128)


def test_rotated_fallback_off_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the interpreter (CPU), the rotated launchers run the twin and count it under their own names."""
    monkeypatch.setattr(lq, "kernel_is_interpreted", lambda: False)
    x, w, b = _inputs(3, 128, True)
    before = dict(lq.FALLBACK_CALLS)
    q, s = lq.layernorm_quant(x, w, b, EPS, "int8", hadamard=128)
    assert lq.FALLBACK_CALLS["layernorm_hadamard_quant"] == before["layernorm_hadamard_quant"] + 1
    qr, sr = layernorm_quant_ref(x, w, b, EPS, "int8", hadamard=128)
    assert torch.equal(q, qr) and torch.equal(s, sr)
