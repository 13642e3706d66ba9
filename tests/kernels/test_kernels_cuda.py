"""CUDA checks of the Triton kernels and the engine: what the CPU interpreter cannot prove.

Run on a GPU by ``scripts/gpu_check.sh`` (``pytest -m cuda``); on a machine without CUDA every test here is
deselected by the ``cuda`` marker's collection hook in ``tests/conftest.py`` rather than reported as passing.
Covers bf16 dots (the interpreter multiplies bit patterns), the hardware fp8/int8 paths at VGGT's real sizes,
GPU rounding of the quantizers, and that the engine runs its kernels with no torch fallback.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.cuda

if torch.cuda.is_available():
    from qvggt.engine import EngineOptions, build_engine, kernel_call_counts, reset_kernel_call_counts
    from qvggt.engine.block import FusedBlock
    from qvggt.kernels import gemm, layernorm_quant
    from qvggt.kernels.reference import layernorm_quant_ref, scaled_gemm_ref, token_quant_ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# Kernel vs twin tolerances of the quantized GEMMs, per dot kind:
# * int8 dots (int8 activations, int4 weights unpacked to int8) accumulate exactly in int32; the twin's float32
#   matmul of the same codes is exact too (|sums| < 2^24), so only the scale multiplications' order differs: 1e-5.
# * fp8 dots: Hopper's fp8 wgmma accumulates with a reduced (~13-14 bit) mantissa unless the kernel promotes the
#   accumulator to fp32 every few k-steps, and Triton does not by default on sm_90 (max_num_imprecise_acc defaults
#   to 2^30 there: never promote). That costs ~1e-3 relative L2 against the exact float32 twin at K = 1024 .. 4096
#   (DeepSeek-V3 reports up to ~2% per element at K = 4096). The kernels keep that numerics (it is what the engine
#   runs), so the tests allow 5e-3 rel L2 for outputs and 1e-2 relative per element for the scales derived from an
#   fp8 GEMM's output (fc1's epilogue quantization); an indexing or scaling bug gives O(1) errors.
INT_DOT_REL = 1e-5
FP8_DOT_REL_L2 = 5e-3
FP8_DOT_SCALE_RTOL = 1e-2


def _dot_rel(kind: str) -> float:
    """Rel L2 bound of a quantized GEMM against its float32 twin for activation kind ``kind`` (see above)."""
    return FP8_DOT_REL_L2 if kind.startswith("fp8") else INT_DOT_REL


@pytest.mark.parametrize("m,k,n", [(33312, 1024, 3072), (1041, 4096, 1024), (777, 1024, 4096), (5, 1024, 1024)])
def test_bf16_gemm_with_epilogue_matches_fp32(m: int, k: int, n: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).bfloat16()
    bias, gamma = torch.randn(n, device="cuda", generator=gen), torch.rand(n, device="cuda", generator=gen)
    res = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    out = torch.full((m, n), float("nan"), device="cuda").bfloat16()  # poisoned: every element must be written
    out = gemm.scaled_gemm(x, w, bias=bias, gelu=True, gamma=gamma, residual=res)
    want = res.float() + gamma * F.gelu(x.float() @ w.float().T + bias)
    assert not out.isnan().any()
    assert _rel(out, want) < 1e-2  # bf16 operands and output


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("int4", [False, True])
@pytest.mark.parametrize("m", [33312, 1041, 3])
def test_quantized_gemm_matches_twin_at_vggt_sizes(kind: str, int4: bool, m: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(m)
    k, n = 1024, 3072
    x = torch.randn(m, k, device="cuda", generator=gen)
    w = torch.randn(n, k, device="cuda", generator=gen)
    a, sa = token_quant_ref(x, kind)
    if int4:
        codes, sw = token_quant_ref(w, "int4")
        wq, int4_k = gemm.pack_int4_blocked(codes), k
    else:
        wq, sw = token_quant_ref(w, kind)
        int4_k = None
    bias = torch.randn(n, device="cuda", generator=gen)
    calls = gemm.KERNEL_CALLS["scaled_gemm"]
    got = gemm.scaled_gemm(a, wq, a_scale=sa, w_scale=sw, bias=bias, w_int4_k=int4_k, out_dtype=torch.float32)
    assert gemm.KERNEL_CALLS["scaled_gemm"] == calls + 1
    want = scaled_gemm_ref(a, wq, a_scale=sa, w_scale=sw, bias=bias, w_int4_k=int4_k, out_dtype=torch.float32)
    assert _rel(got, want) < _dot_rel(kind)  # int4 weights run on the activation kind's dots


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3", "int4"])
def test_fc1_to_fc2_handoff_on_gpu(kind: str, rotate: bool) -> None:
    """fc1's epilogue quantizes GELU output per (token, 128 columns); fc2 consumes codes + group scales."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    m, d, hdim = 2083, 1024, 4096
    x = torch.randn(m, d, device="cuda", generator=gen)
    w1 = torch.randn(hdim, d, device="cuda", generator=gen) / d**0.5
    w2 = torch.randn(d, hdim, device="cuda", generator=gen) / hdim**0.5
    act = "int8" if kind == "int4" else kind
    a, sa = token_quant_ref(x, act if kind != "int4" else "int4")
    wq1, s1 = token_quant_ref(w1, act)
    wq2, s2 = token_quant_ref(w2, act)
    f, fs = gemm.scaled_gemm(a, wq1, a_scale=sa, w_scale=s1, gelu=True, out_quant=kind, out_hadamard=rotate)
    fr, fsr = scaled_gemm_ref(a, wq1, a_scale=sa, w_scale=s1, gelu=True, out_quant=kind, out_hadamard=rotate)
    assert fs.shape == (m, hdim // 128)
    # fc1's output scales come from its GEMM: exact accumulation on int8 dots, reduced-precision on fp8 ones.
    torch.testing.assert_close(fs, fsr, rtol=FP8_DOT_SCALE_RTOL if act.startswith("fp8") else 1e-5, atol=0)
    # Codes next to a rounding boundary flip with the output's error: rare after exact int8 dots; after fp8 dots
    # (~1e-3 relative, e4m3 steps of 1/8 .. 1/16 relative) up to a few percent.
    assert (f.float() != fr.float()).float().mean() < (0.05 if act.startswith("fp8") else 0.01)
    y = gemm.scaled_gemm(f, wq2, a_scale=fs, w_scale=s2, out_dtype=torch.float32)
    yr = scaled_gemm_ref(f, wq2, a_scale=fs, w_scale=s2, out_dtype=torch.float32)
    assert _rel(y, yr) < _dot_rel(act)  # same codes in both: only fc2's accumulation differs


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "int4"])
def test_layernorm_quant_on_gpu_matches_twin(fmt: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = (torch.randn(33312, 1024, device="cuda", generator=gen) * 3).bfloat16()
    w, b = torch.rand(1024, device="cuda", generator=gen), torch.randn(1024, device="cuda", generator=gen)
    q, s = layernorm_quant.layernorm_quant(x, w, b, 1e-6, fmt)
    qr, sr = layernorm_quant_ref(x, w, b, 1e-6, fmt)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    assert (q.float() != qr.float()).float().mean() < 1e-3  # LayerNorm's reduction order moves rare ties


def test_fused_block_on_gpu_runs_kernels_and_matches_cpu_twins() -> None:
    from qvggt.model.layers import Block
    from qvggt.model.rope import RotaryEmbedding2D, grid_positions
    from qvggt.quant.config import weight_activation_formats
    from qvggt.quant.linear import QuantLinear

    torch.manual_seed(0)
    block = Block(1024, 16, init_values=1.0, qk_norm=True, rope=RotaryEmbedding2D(100.0)).eval()
    w_fmt, a_fmt = weight_activation_formats(8, 8, fp8=True)
    for parent, name in [(block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")]:
        setattr(parent, name, QuantLinear.from_float(getattr(parent, name), w_fmt, a_fmt))
    pos = grid_positions(2, 28, 37, 5, torch.device("cpu"))
    x = torch.randn(2, 5 + 28 * 37, 1024).bfloat16()
    with torch.no_grad():
        cpu = FusedBlock(copy.deepcopy(block), "cpu")(x, pos).float()
        fused = FusedBlock(copy.deepcopy(block), "gpu").cuda()
        gpu_pos = grid_positions(2, 28, 37, 5, torch.device("cuda"))
        reset_kernel_call_counts()
        out = fused(x.cuda(), gpu_pos).float().cpu()
    counts = kernel_call_counts()
    assert counts["kernel"]["scaled_gemm"] == 4 and counts["kernel"]["layernorm_quant"] == 2
    assert sum(counts["fallback"].values()) == 0
    assert _rel(out, cpu) < 2e-2  # bf16 residual, different attention kernels


def test_engine_refuses_torch_fallback_on_cuda() -> None:
    from qvggt.kernels import check_fallback_allowed, require_kernels

    require_kernels(True)
    try:
        with pytest.raises(RuntimeError, match="require_kernels"):
            check_fallback_allowed("scaled_gemm", torch.zeros(1, device="cuda"))
    finally:
        require_kernels(False)


def test_engine_end_to_end_on_gpu_tiny() -> None:
    from qvggt.model import build_model, get_preset
    from qvggt.model.init import fill_name_seeded_
    from qvggt.quant.api import quantize_
    from qvggt.quant.config import RTNConfig, weight_activation_formats

    model = fill_name_seeded_(build_model(get_preset("tiny"))).eval()
    images = torch.rand(1, 3, 3, 56, 84)
    with torch.no_grad():
        ref = model(images)
    q = copy.deepcopy(model)
    w, a = weight_activation_formats(4, 8)
    quantize_(q, RTNConfig(weight=w, activation=a))
    engine = build_engine(q, EngineOptions(head_dtype=torch.float32)).cuda()
    reset_kernel_call_counts()
    out = engine(images.cuda())
    counts = kernel_call_counts()
    assert counts["kernel"]["scaled_gemm"] > 0 and sum(counts["fallback"].values()) == 0
    assert _rel(out["depth"].cpu(), ref["depth"]) < 0.05


@pytest.mark.parametrize("batch,grid", [(32, (28, 37)), (1, (28 * 8, 37))])
def test_qk_norm_rope_on_gpu_matches_twin(batch: int, grid: tuple[int, int]) -> None:
    from qvggt.kernels import qk_rope
    from qvggt.kernels.reference import qk_norm_rope_ref, rope_inv_freq
    from qvggt.model.rope import grid_positions

    gen = torch.Generator(device="cuda").manual_seed(3)
    pos = grid_positions(batch, grid[0], grid[1], 5, torch.device("cuda"))
    n = 5 + grid[0] * grid[1]
    qkv = torch.randn(batch * n, 3 * 1024, device="cuda", generator=gen).bfloat16()
    norms = [(torch.randn(64, device="cuda", generator=gen), torch.randn(64, device="cuda", generator=gen), 1e-5)
             for _ in range(2)]  # fmt: skip
    inv = rope_inv_freq(64, 100.0).cuda()
    q, k, v = qk_rope.qk_norm_rope(qkv, batch, 16, *norms, pos.yx, inv)
    q0, k0, v0 = qk_norm_rope_ref(qkv.float(), batch, 16, *norms, pos.yx, inv)
    assert _rel(q, q0) < 5e-3 and _rel(k, k0) < 5e-3  # bf16 output rounding
    assert torch.equal(v.float(), v0)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("k,b", [(1024, 1024), (1024, 128), (128, 128), (64, 64)])
def test_layernorm_hadamard_quant_on_gpu_matches_twin(fmt: str, k: int, b: int) -> None:
    """The rotation stage as compiled for the GPU: vggt-1b (full width and 128 blocks), small and tiny widths."""
    gen = torch.Generator(device="cuda").manual_seed(k + b)
    x = (torch.randn(33312, k, device="cuda", generator=gen) * 3).bfloat16()
    w, bias = torch.rand(k, device="cuda", generator=gen), torch.randn(k, device="cuda", generator=gen)
    calls = layernorm_quant.KERNEL_CALLS["layernorm_hadamard_quant"]
    q, s = layernorm_quant.layernorm_quant(x, w, bias, 1e-6, fmt, hadamard=b)
    assert layernorm_quant.KERNEL_CALLS["layernorm_hadamard_quant"] == calls + 1
    qr, sr = layernorm_quant_ref(x, w, bias, 1e-6, fmt, hadamard=b)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    assert (q.float() != qr.float()).float().mean() < 1e-3  # LayerNorm's reduction order moves rare ties


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("k,b", [(4096, 4096), (1024, 1024), (4096, 128)])
def test_token_hadamard_quant_on_gpu_is_bit_exact(fmt: str, k: int, b: int) -> None:
    """Without LayerNorm the kernel's butterflies add in the twin's order and divide the same way: identical.

    The twin runs on a CPU copy: on CUDA torch computes ``tensor / python_scalar`` (the Hadamard's 1/sqrt(b), the
    scale's absmax / qmax) as a multiplication by the reciprocal, 1 ulp off IEEE division now and then, while the
    kernel divides with ``div_rn`` as the CPU does."""
    gen = torch.Generator(device="cuda").manual_seed(k * b)
    x = torch.randn(4099, k, device="cuda", generator=gen).bfloat16()
    x[:, 17] = 300.0
    q, s = layernorm_quant.token_quant(x, fmt, hadamard=b)
    qr, sr = token_quant_ref(x.cpu(), fmt, b)
    assert torch.equal(s.cpu(), sr)
    assert torch.equal(q.cpu().float(), qr.float())


def test_engine_runs_a_rotated_checkpoint_on_gpu() -> None:
    """quarot (online Hadamard on every Linear's input) on the engine: kernels only, close to the CPU twins."""
    from qvggt.model import build_model, get_preset
    from qvggt.model.init import fill_name_seeded_
    from qvggt.quant.api import quantize_
    from qvggt.quant.config import weight_activation_formats
    from qvggt.quant.quarot import QuaRotConfig

    model = fill_name_seeded_(build_model(get_preset("tiny"))).eval()
    w, a = weight_activation_formats(8, 8, fp8=True)
    quantize_(model, QuaRotConfig(weight=w, activation=a))
    images = torch.rand(1, 3, 3, 56, 84)
    cpu = build_engine(copy.deepcopy(model), EngineOptions(head_dtype=torch.float32))(images)
    engine = build_engine(model, EngineOptions(head_dtype=torch.float32, cuda_graphs=False)).cuda()
    reset_kernel_call_counts()
    out = engine(images.cuda())
    counts = kernel_call_counts()
    assert counts["kernel"]["layernorm_hadamard_quant"] == 16 and counts["kernel"]["token_hadamard_quant"] == 16
    assert sum(counts["fallback"].values()) == 0
    assert _rel(out["depth"].cpu(), cpu["depth"]) < 0.02 and _rel(out["pose_enc"].cpu(), cpu["pose_enc"]) < 0.05


@pytest.mark.parametrize("period", [1041, 7])  # vggt-1b at 518 x 392: 5 + 37 * 28 tokens per frame; a short one
def test_special_rows_on_gpu_match_twins(period: int) -> None:
    """Special-token rows (camera/register tokens on the int8 grid in int4 activations) as compiled for the GPU:
    LayerNorm -> Hadamard -> quant and token quant bit-exact up to LayerNorm ulps, fc1's epilogue per row tile."""
    gen = torch.Generator(device="cuda").manual_seed(period)
    m, k = 3 * period + 11, 1024
    x = (torch.randn(m, k, device="cuda", generator=gen) * 3).bfloat16()
    x[:, 17] += 200.0 * (torch.arange(m, device="cuda") % period < 5)  # the special tokens' massive channel
    w, bias = torch.rand(k, device="cuda", generator=gen), torch.randn(k, device="cuda", generator=gen)
    q, s = layernorm_quant.layernorm_quant(x, w, bias, 1e-6, "int4", 1024, period, 5)
    qr, sr = layernorm_quant_ref(x, w, bias, 1e-6, "int4", 1024, period, 5)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    assert (q != qr).float().mean() < 1e-3
    special = torch.arange(m, device="cuda") % period < 5
    assert bool((q[special].abs().amax(1) == 127).all()) and int(q[~special].abs().max()) <= 7
    q, s = layernorm_quant.token_quant(x, "int4", 0, period, 5)
    qr, sr = token_quant_ref(x.cpu(), "int4", 0, period, 5)  # CPU twin: IEEE division, as the kernel (see above)
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)
    a, sa = token_quant_ref(x, "int8")
    wq, sw = token_quant_ref(torch.randn(4096, k, device="cuda", generator=gen), "int8")
    kw = {"a_scale": sa, "w_scale": sw, "gelu": True, "out_quant": "int4", "out_hadamard": True,
          "out_special_period": period, "out_special_count": 5}  # fmt: skip
    f, fs = gemm.scaled_gemm(a, wq, **kw)
    fr, fsr = scaled_gemm_ref(a, wq, **kw)
    torch.testing.assert_close(fs, fsr, rtol=1e-5, atol=0)
    assert (f != fr).float().mean() < 0.01
    assert bool((f[special].abs().amax(1) > 7).all()) and int(f[~special].abs().max()) <= 7
