"""fp8 flash attention (``qvggt.kernels.attention``): kernel vs twin under the Triton interpreter, twin vs exact
attention, and (marker ``cuda``) the compiled kernel at VGGT's sizes.

The interpreter (switched on by tests/conftest.py where there is no GPU) proves indexing, masking of ragged query
and key blocks, padding, the prep's quantization (bit-exact) and the online-softmax algebra, with fp8 dots it runs
exactly. It cannot prove GPU code generation: wgmma operand layouts (k loaded transposed, v stored transposed),
the hardware fp8 cast of P (the interpreter path rounds in software first), ``ex2.approx``, pipelining, bf16
loads/stores, or speed. The ``cuda`` tests below check those on a GPU (``pytest -m cuda tests/kernels``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from qvggt.kernels import has_triton
from qvggt.kernels.aot import bundled_ptxas
from qvggt.kernels.attention_reference import (
    exact_attention,
    fp8_attention_prep_ref,
    fp8_attention_ref,
    hadamard,
)

if has_triton():
    import qvggt.kernels.attention as att

interp = pytest.mark.skipif(
    not (has_triton() and att.kernel_is_interpreted()),
    reason="needs the Triton interpreter, which tests/conftest.py turns on where there is no GPU",
)

SMALL = att.AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1) if has_triton() else None
# e4m3 keeps 3 mantissa bits: q/k, P and v each add ~2-4% relative error to a random-input attention output
# (measured on unit Gaussians, N=300: q/k 3.7%, P 2.3%, v 2.6%, together 5.0%). 7e-2 bounds that with margin;
# an indexing or scaling bug gives O(1) errors.
FP8_REL_BOUND = 7e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _qkv(b: int, h: int, n: int, m: int, d: int = 64, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, h, m, d, generator=gen)
    v = torch.randn(b, h, m, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _with_outliers(q: torch.Tensor, k: torch.Tensor, amp: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two outlier channels, as qk activations have; scaled so scores stay moderate (the fp8 step is the issue)."""
    q, k = q.clone(), k.clone()
    q[..., [3, 17]] *= amp / 4
    k[..., [3, 17]] *= amp / 4
    return q, k


# --------------------------------------------------------------------------------------------------------------
# Twin and exact attention (no kernel)


def test_hadamard_is_orthonormal_and_preserves_scores() -> None:
    hm = hadamard(64)
    torch.testing.assert_close(hm @ hm.T, torch.eye(64), rtol=0, atol=1e-6)
    q, k, _ = _qkv(1, 1, 7, 9)
    torch.testing.assert_close((q @ hm) @ (k @ hm).transpose(-1, -2), q @ k.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


@pytest.mark.parametrize("had", [False, True])
@pytest.mark.parametrize(
    ("b", "h", "n", "m", "block_n"), [(1, 1, 300, 300, 128), (2, 3, 97, 97, 16), (1, 2, 64, 200, 64)]
)
def test_twin_close_to_exact_attention(b: int, h: int, n: int, m: int, block_n: int, had: bool) -> None:
    q, k, v = _qkv(b, h, n, m, seed=n + m)
    out = fp8_attention_ref(q, k, v, hadamard=had, block_n=block_n)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, exact_attention(q, k, v)) < FP8_REL_BOUND


def test_twin_honours_sm_scale() -> None:
    q, k, v = _qkv(1, 2, 50, 50, seed=3)
    out = fp8_attention_ref(q, k, v, sm_scale=0.05, block_n=16)
    assert _rel(out, exact_attention(q, k, v, sm_scale=0.05)) < FP8_REL_BOUND


@pytest.mark.parametrize("amp", [30.0, 100.0])
def test_hadamard_helps_with_outlier_channels(amp: float) -> None:
    q, k, v = _qkv(2, 4, 300, 300, seed=1)
    q, k = _with_outliers(q, k, amp)
    want = exact_attention(q, k, v)
    plain = _rel(fp8_attention_ref(q, k, v, hadamard=False), want)
    rotated = _rel(fp8_attention_ref(q, k, v, hadamard=True), want)
    # Measured (this seed): 16% -> 6% at amp 30, 36% -> 11% at amp 100.
    assert rotated < 0.5 * plain


def test_twin_prep_scales_and_codes() -> None:
    q, k, v = _qkv(1, 2, 21, 21, seed=5)
    qi = fp8_attention_prep_ref(q, k, v, False, 8)
    assert qi.q_scale.shape == (1, 2, 21) and qi.k_scale.shape == (1, 2, 3) and qi.v_scale.shape == (1, 2, 3)
    torch.testing.assert_close(qi.q_scale, q.abs().amax(-1) / 448, rtol=0, atol=0)
    torch.testing.assert_close(qi.k_scale[:, :, 2], k[:, :, 16:].abs().amax((-1, -2)) / 448, rtol=0, atol=0)
    assert float(qi.q8.float().abs().amax()) == 448.0
    deq = qi.v8.float().view(1, 2, 21, 64) * qi.v_scale.repeat_interleave(8, dim=2)[:, :, :21, None]
    assert _rel(deq, v) < 0.05


# --------------------------------------------------------------------------------------------------------------
# Kernel vs twin under the interpreter

KERNEL_CASES = [
    # (b, h, n, m, block_m, block_n)
    (1, 1, 1, 1, 16, 16),  # single token
    (1, 1, 2, 3, 16, 16),  # fewer tokens than a block, q and k ragged differently
    (1, 1, 5, 5, 128, 128),  # default blocks, tiny N
    (2, 3, 37, 37, 16, 16),  # batch and heads, ragged last blocks, several key blocks
    (1, 2, 50, 33, 32, 16),  # cross lengths, BLOCK_M != BLOCK_N
    (1, 1, 32, 48, 16, 32),  # key count a multiple of BLOCK_N (no masked block), several query blocks
    (3, 1, 17, 17, 16, 16),  # batch > 1 with one head
]


@interp
@pytest.mark.parametrize("had", [False, True])
@pytest.mark.parametrize(("b", "h", "n", "m", "bm", "bn"), KERNEL_CASES)
def test_kernel_matches_twin(b: int, h: int, n: int, m: int, bm: int, bn: int, had: bool) -> None:
    q, k, v = _qkv(b, h, n, m, seed=b * 1000 + n * 10 + m)
    cfg = att.AttentionConfig(block_m=bm, block_n=bn, num_warps=4, num_stages=1)
    calls, falls = att.KERNEL_CALLS["fp8_attention"], att.FALLBACK_CALLS["fp8_attention"]
    out = att.fp8_attention(q, k, v, hadamard=had, config=cfg)
    assert att.KERNEL_CALLS["fp8_attention"] == calls + 1 and att.FALLBACK_CALLS["fp8_attention"] == falls
    assert out.shape == (b, h, n, 64) and out.dtype == torch.float32
    want = fp8_attention_ref(q, k, v, hadamard=had, block_n=bn)
    # Same quantization and online softmax; only float32 summation order and exp2 ulps differ (measured <= 2e-7).
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert _rel(out, exact_attention(q, k, v)) < (FP8_REL_BOUND if n * m > 16 else 0.15)


@interp
@pytest.mark.parametrize(("n", "m", "bn"), [(37, 37, 16), (5, 70, 32), (1, 1, 16)])
def test_prep_kernel_is_bit_exact_without_hadamard(n: int, m: int, bn: int) -> None:
    q, k, v = _qkv(2, 2, n, m, seed=n + m)
    cfg = att.AttentionConfig(block_m=16, block_n=bn, num_warps=4, num_stages=1)
    p = att.fp8_attention_prep(q, k, v, hadamard=False, config=cfg)
    want = fp8_attention_prep_ref(q, k, v, False, bn)
    got = p.logical()
    for name in ("q8", "k8", "v8"):
        # Values, not bytes: the interpreter's fp8 cast turns -0 into +0 (same value; the GPU keeps the sign).
        assert torch.equal(getattr(got, name).float(), getattr(want, name).float()), name
    for name in ("q_scale", "k_scale", "v_scale"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # The padding the attention loop reads without masks must be zero.
    assert not p.k8[:, :, m:].float().any() and not p.v8t[:, :, :, m:].float().any()
    assert p.k8.shape[2] == p.v8t.shape[3] == -(-m // bn) * bn


@interp
def test_prep_kernel_with_hadamard_matches_twin() -> None:
    q, k, v = _qkv(2, 2, 37, 37, seed=9)
    q, k = _with_outliers(q, k)
    p = att.fp8_attention_prep(q, k, v, hadamard=True, config=SMALL).logical()
    want = fp8_attention_prep_ref(q, k, v, True, 16)
    # The rotation's float32 sums run in another order: scales within a few ulps, codes at most one e4m3 step.
    for name in ("q_scale", "k_scale"):
        torch.testing.assert_close(getattr(p, name), getattr(want, name), rtol=4 * 2.0**-23, atol=0)
    for name in ("q8", "k8"):
        a, b = getattr(p, name).float(), getattr(want, name).float()
        assert float(((a - b).abs() / b.abs().clamp_min(2.0**-6)).max()) <= 0.125 + 1e-6, name
    assert torch.equal(p.v8.float(), want.v8.float())


@interp
def test_kernel_strided_inputs_and_fp16() -> None:
    # q, k, v as views into a packed [B, N, 3, H, D] tensor (VGGT's qkv layout before the head split).
    b, n, h, d = 2, 21, 3, 64
    packed = torch.randn(b, n, 3, h, d)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = att.fp8_attention(q, k, v, config=SMALL)
    torch.testing.assert_close(out, fp8_attention_ref(q, k, v, block_n=16), rtol=1e-5, atol=1e-5)
    out16 = att.fp8_attention(q.half(), k.half(), v.half(), config=SMALL)
    assert out16.dtype == torch.float16
    want16 = fp8_attention_ref(q.half(), k.half(), v.half(), block_n=16)
    torch.testing.assert_close(out16, want16, rtol=2e-3, atol=2e-3)  # one fp16 rounding of each output


@interp
def test_kernel_sm_scale_and_large_logits() -> None:
    q, k, v = _qkv(1, 2, 40, 40, seed=11)
    out = att.fp8_attention(q, k, v, sm_scale=0.05, config=SMALL)
    torch.testing.assert_close(out, fp8_attention_ref(q, k, v, sm_scale=0.05, block_n=16), rtol=1e-5, atol=1e-5)
    # Logits in the thousands: the running max must keep exp2 from overflowing; the row max dominates.
    big = att.fp8_attention(q * 30, k * 30, v, config=SMALL)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, fp8_attention_ref(q * 30, k * 30, v, block_n=16), rtol=1e-5, atol=1e-5)


@interp
@pytest.mark.parametrize("had", [False, True])
def test_zero_rows_give_no_nan(had: bool) -> None:
    q, k, v = _qkv(1, 2, 37, 37, seed=13)
    q[:, :, [0, 5, 36]] = 0.0  # all-zero query rows: scale floors at tiny, scores 0, uniform attention
    k[:, :, 16:32] = 0.0  # a whole all-zero key block: its scale floors at tiny
    v[:, :, 32:] = 0.0  # an all-zero value block (the ragged last one)
    out = att.fp8_attention(q, k, v, hadamard=had, config=SMALL)
    want = fp8_attention_ref(q, k, v, hadamard=had, block_n=16)
    assert torch.isfinite(out).all() and torch.isfinite(want).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # A zero query attends uniformly: its output is the mean of the (quantized) values.
    vq = fp8_attention_prep_ref(q, k, v, had, 16)
    v_deq = vq.v8.float() * vq.v_scale.repeat_interleave(16, dim=2)[:, :, :37, None]
    torch.testing.assert_close(out[:, :, 5], v_deq.mean(2), rtol=1e-4, atol=1e-5)
    zeros = att.fp8_attention(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), config=SMALL)
    assert torch.equal(zeros, torch.zeros_like(q))


@interp
def test_bf16_on_cpu_takes_the_twin() -> None:
    # The interpreter truncates bf16 casts, so bf16 CPU tensors run the twin (counted as a fallback).
    q, k, v = _qkv(1, 1, 9, 9, dtype=torch.bfloat16)
    falls = att.FALLBACK_CALLS["fp8_attention"]
    out = att.fp8_attention(q, k, v, config=SMALL)
    assert att.FALLBACK_CALLS["fp8_attention"] == falls + 1
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fp8_attention_ref(q, k, v, block_n=16))


@pytest.mark.skipif(not has_triton(), reason="the launcher module needs triton importable")
def test_launcher_rejects_bad_inputs() -> None:
    q, k, v = _qkv(1, 2, 8, 8)
    cases = [
        ((q[0], k, v), {}, ValueError, "4-D"),
        ((q, k.double(), v), {}, ValueError, "float32, bfloat16 or float16"),
        ((q, k.half(), v), {}, ValueError, "share a dtype"),
        ((q, k, v[:, :, :5]), {}, ValueError, "same shape"),
        ((q, k[:, :1], v[:, :1]), {}, ValueError, "batch, heads and head dim"),
        ((q[..., :48], k[..., :48], v[..., :48]), {}, ValueError, "head dim 48"),
        ((q, k, v), {"sm_scale": 0.0}, ValueError, "positive"),
        ((q, k, v), {"sm_scale": float("nan")}, ValueError, "positive"),
        ((q.numpy(), k, v), {}, TypeError, "torch.Tensor"),
        ((q[:, :, :0], k, v), {}, ValueError, "empty"),
    ]
    for args, kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            att.fp8_attention(*args, **kwargs)
    with pytest.raises(ValueError, match="power of two"):
        att.AttentionConfig(block_m=48)
    with pytest.raises(ValueError, match="power of two"):
        att.AttentionConfig(block_n=8)


@pytest.mark.skipif(not has_triton(), reason="the launcher module needs triton importable")
def test_cuda_shape_limits_name_the_head_dim_and_the_fallback() -> None:
    """Compiled for a GPU, an 8-bit tl.dot needs K >= 32: head dim 16 (tiny preset) and block_n 16 are refused there
    with the fallback named (the AOT test below shows they do not compile for sm_90a)."""
    for d in (32, 64, 128):
        att.check_cuda_shape(d)
    with pytest.raises(ValueError, match=r"head dim 16 .*attention='sdpa'.*fp8_attention_ref"):
        att.check_cuda_shape(16)
    with pytest.raises(ValueError, match="block_n 16"):
        att.check_cuda_shape(64, SMALL)


@interp
def test_head_dim_16_still_runs_on_cpu() -> None:
    """The CPU paths keep head dim 16 (the tiny preset): the interpreter's kernel for float32, the twin for bf16."""
    q, k, v = _qkv(1, 2, 20, 20, d=16, seed=4)
    out = att.fp8_attention(q, k, v, config=SMALL)
    torch.testing.assert_close(out, fp8_attention_ref(q, k, v, block_n=16), rtol=1e-5, atol=1e-5)
    out16 = att.fp8_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out16.shape == q.shape and torch.isfinite(out16).all()


# --------------------------------------------------------------------------------------------------------------
# Hopper code generation without a GPU: compile both kernels for sm_90 ahead of time (triton ships ptxas)

_AOT_SCRIPT = r"""
import dataclasses, json
from qvggt.kernels.aot import compile_for_hopper
import qvggt.kernels.attention as A

cfg = A.DEFAULT_CONFIG
ptrs = {"q_ptr": "*fp8e4nv", "qs_ptr": "*fp32", "k_ptr": "*fp8e4nv", "ks_ptr": "*fp32", "v_ptr": "*fp8e4nv",
        "vs_ptr": "*fp32", "o_ptr": "*bf16"}
ints = {n: "i32" for n in ("H", "N", "M", "M_pad", "NB", "stride_ob", "stride_oh", "stride_on")}
const = {"SOFT_ROUND": False, "D": 64, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
out = {"ATTN": compile_for_hopper(A._fp8_attn_fwd_kernel, {**ptrs, **ints, "qk_coef": "fp32"}, const,
                                  [*ptrs, "M_pad", "stride_ob", "stride_oh", "stride_on"], cfg.num_warps,
                                  cfg.num_stages)}
names = ["x_ptr", "h_ptr", "out_ptr", "scale_ptr", "stride_xb", "stride_xh", "stride_xt", "stride_ot", "stride_od",
         "H", "T", "T_OUT", "out_bh_stride", "scale_bh_stride"]
sig = {n: ("*bf16" if n == "x_ptr" else "*fp8e4nv" if n == "out_ptr" else "*fp32" if n.endswith("_ptr") else "i32")
       for n in names}
for per_row in (True, False):
    const = {"PER_ROW": per_row, "HADAMARD": True, "D": 64, "BLOCK_T": cfg.block_n}
    out[f"QUANT{per_row}"] = compile_for_hopper(A._fp8_quant_kernel, sig, const,
                                                ["x_ptr", "h_ptr", "out_ptr", "scale_ptr"], cfg.prep_warps)
print("JSON" + json.dumps({k: dataclasses.asdict(v) for k, v in out.items()}))
"""


@pytest.mark.skipif(torch.cuda.is_available() or bundled_ptxas() is None, reason="CPU-only AOT check; needs ptxas")
def test_kernels_compile_for_hopper_with_fp8_wgmma_and_no_spills(tmp_path) -> None:
    """What the interpreter cannot show: the default config lowers to fp8 wgmma for both dots, pipelines its
    loads with cp.async, fits shared memory and compiles without register spills (measured: 166 registers,
    56 KB shared memory). Still unproven without a GPU: numerics of the compiled code, and speed."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    reports = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("JSON"))[4:])
    attn = reports["ATTN"]
    cfg = att.DEFAULT_CONFIG
    # Both dots on fp8 tensor cores: S = q k^T (n = BLOCK_N) and O += P v (n = D = 64).
    assert set(attn["wgmma"]) == {f"m64n{cfg.block_n}k32.f32.e4m3.e4m3", "m64n64k32.f32.e4m3.e4m3"}
    assert attn["shared_bytes"] <= 227 * 1024 and attn["spill_bytes"] == 0 and attn["registers"] <= 255
    assert attn["cp_async"] > 0
    for per_row in ("True", "False"):
        assert reports["QUANT" + per_row]["spill_bytes"] == 0  # no spills in the prep kernel


_AOT_LIMITS_SCRIPT = r"""
import dataclasses, json
from qvggt.kernels.aot import compile_for_hopper
import qvggt.kernels.attention as A

ptrs = {"q_ptr": "*fp8e4nv", "qs_ptr": "*fp32", "k_ptr": "*fp8e4nv", "ks_ptr": "*fp32", "v_ptr": "*fp8e4nv",
        "vs_ptr": "*fp32", "o_ptr": "*bf16"}
ints = {n: "i32" for n in ("H", "N", "M", "M_pad", "NB", "stride_ob", "stride_oh", "stride_on")}
out = {}
for d, bn in ((16, 128), (32, 128), (64, 16)):
    const = {"SOFT_ROUND": False, "D": d, "BLOCK_M": 128, "BLOCK_N": bn}
    try:
        r = compile_for_hopper(A._fp8_attn_fwd_kernel, {**ptrs, **ints, "qk_coef": "fp32"}, const,
                               [*ptrs, "M_pad", "stride_ob", "stride_oh", "stride_on"], 8, 2)
        out[f"{d},{bn}"] = dataclasses.asdict(r)
    except Exception as exc:
        out[f"{d},{bn}"] = type(exc).__name__
print("JSON" + json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available() or bundled_ptxas() is None, reason="CPU-only AOT check; needs ptxas")
def test_head_dim_and_block_n_limits_for_hopper(tmp_path) -> None:
    """Why ``check_cuda_shape`` refuses head dim 16 and block_n 16 on a GPU: they do not compile for sm_90a (8-bit
    dots need K >= 32), while head dim 32 (the small model) compiles to fp8 wgmma."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = subprocess.run(
        [sys.executable, "-c", _AOT_LIMITS_SCRIPT], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    reports = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("JSON"))[4:])
    assert reports["16,128"] == "CompilationError" and reports["64,16"] == "CompilationError"
    assert "m64n32k32.f32.e4m3.e4m3" in reports["32,128"]["wgmma"] and reports["32,128"]["spill_bytes"] == 0


@pytest.mark.cuda
def test_cuda_refuses_head_dim_16() -> None:
    q = torch.randn(1, 2, 40, 16, device="cuda").bfloat16()
    with pytest.raises(ValueError, match="head dim 16"):
        att.fp8_attention(q, q, q)


# --------------------------------------------------------------------------------------------------------------
# CUDA: the compiled kernel (deselected without a GPU by tests/conftest.py; run by scripts/gpu_check.sh)


def _cuda_qkv(b: int, h: int, n: int, seed: int, outliers: bool = False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, 64, device="cuda", generator=gen) for _ in range(3))
    if outliers:
        q, k = _with_outliers(q, k)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


@pytest.mark.cuda
@pytest.mark.parametrize("had", [False, True])
@pytest.mark.parametrize(("b", "h", "n"), [(1, 16, 1041), (1, 16, 8328), (4, 16, 1041), (2, 3, 77)])
def test_cuda_kernel_matches_twin_and_sdpa(b: int, h: int, n: int, had: bool) -> None:
    q, k, v = _cuda_qkv(b, h, n, seed=n + b)
    calls, falls = att.KERNEL_CALLS["fp8_attention"], att.FALLBACK_CALLS["fp8_attention"]
    out = att.fp8_attention(q, k, v, hadamard=had)
    torch.cuda.synchronize()
    assert att.KERNEL_CALLS["fp8_attention"] == calls + 1 and att.FALLBACK_CALLS["fp8_attention"] == falls
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # Twin in float32 on the same device (the bf16 inputs are exact in float32), default block_n.
    twin = fp8_attention_ref(q.float(), k.float(), v.float(), hadamard=had, block_n=att.DEFAULT_CONFIG.block_n)
    # GPU: ex2.approx, fma contraction and another dot order flip a few fp8 codes of P; bf16 output rounding.
    assert _rel(out, twin) < 1e-2
    sdpa = F.scaled_dot_product_attention(q, k, v)
    exact = exact_attention(q, k, v)
    assert _rel(out, sdpa) < FP8_REL_BOUND
    assert _rel(out, exact) < 1.05 * _rel(twin, exact) + 2e-3  # no worse than its specification


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1041, 5, 8328])
def test_cuda_prep_is_bit_exact(n: int) -> None:
    q, k, v = _cuda_qkv(2, 16, n, seed=n)
    p = att.fp8_attention_prep(q, k, v, hadamard=False)
    # The twin on CPU copies: on CUDA torch divides a tensor by a Python scalar (absmax / 448) as a multiplication
    # by the reciprocal, 1 ulp off now and then; the kernel's div_rn is IEEE division, as the CPU's.
    got = p.logical()
    want = fp8_attention_prep_ref(q.cpu(), k.cpu(), v.cpu(), False, att.DEFAULT_CONFIG.block_n)
    for name in ("q8", "k8", "v8"):
        # Values, not bytes: the interpreter's fp8 cast turns -0 into +0 (same value; the GPU keeps the sign).
        assert torch.equal(getattr(got, name).cpu().float(), getattr(want, name).float()), name
    for name in ("q_scale", "k_scale", "v_scale"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name
    m = k.shape[2]
    assert not p.k8[:, :, m:].float().any() and not p.v8t[:, :, :, m:].float().any()


@pytest.mark.cuda
def test_cuda_hadamard_helps_with_outliers_and_zero_rows() -> None:
    q, k, v = _cuda_qkv(1, 16, 1041, seed=7, outliers=True)
    exact = exact_attention(q, k, v)
    plain = _rel(att.fp8_attention(q, k, v), exact)
    rotated = _rel(att.fp8_attention(q, k, v, hadamard=True), exact)
    assert rotated < 0.5 * plain
    q[:, :, :7] = 0
    k[:, :, 128:256] = 0
    out = att.fp8_attention(q, k, v)
    assert torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 2)])
def test_cuda_alternative_configs(cfg: tuple[int, int, int, int]) -> None:
    config = att.AttentionConfig(block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2], num_stages=cfg[3])
    q, k, v = _cuda_qkv(2, 16, 1041, seed=3)
    out = att.fp8_attention(q, k, v, config=config)
    twin = fp8_attention_ref(q.float(), k.float(), v.float(), block_n=config.block_n)
    assert _rel(out, twin) < 1e-2


@pytest.mark.cuda
def test_cuda_bench_function_runs() -> None:
    # Structure only (no timing assertions): the benchmark command relies on these keys.
    rows = att.bench_attention([333], heads=2, warmup_ms=1, rep_ms=2)
    assert len(rows) == 1
    row = rows[0]
    for key in ("fp8_ms", "fp8_attn_only_ms", "sdpa_bf16_ms", "fp8_tflops", "sdpa_tflops", "speedup"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["rel_l2_vs_sdpa"] < FP8_REL_BOUND
