"""Per-kernel timings at VGGT's shapes against measured rooflines (CUDA only).

Ceilings are measured in the same run: a large bf16 matrix product (TFLOP/s) and a device-to-device copy (GB/s,
bytes read + written). Each GEMM variant runs at the aggregator's four Linear shapes with M tokens and the engine's
epilogue of that Linear (qkv: bias; proj and fc2: bias, LayerScale and residual add; fc1: bias and GELU, plus a
variant that also quantizes its output for fc2, as the quantized engine does); LayerNorm ->
quantization is compared with ``F.layer_norm`` and judged by bytes moved. Medians by ``triton.testing.do_bench``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qvggt.kernels.gemm import default_tiles, pack_int4_blocked, scaled_gemm
from qvggt.kernels.layernorm_quant import layernorm_quant
from qvggt.kernels.reference import token_quant_ref

__all__ = ["VGGT_LINEAR_SHAPES", "bench_gemms", "bench_layernorm", "measure_ceilings"]

# (name, K, N) of the aggregator block Linears (dim 1024, MLP 4096).
VGGT_LINEAR_SHAPES = [("qkv", 1024, 3072), ("proj", 1024, 1024), ("fc1", 1024, 4096), ("fc2", 4096, 1024)]


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_ceilings() -> dict[str, float]:
    """Measured bf16 matmul rate (TFLOP/s, 8192^3, random data) and copy bandwidth (GB/s, 2 GiB read + write)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b)
    src = torch.randn(2**29, device="cuda")  # 2 GiB of fp32
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    return {"bf16_tflops": 2 * 8192**3 / ms / 1e9, "copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6}


def bench_gemms(tokens: int, seed: int = 0) -> list[dict]:
    """Every GEMM variant at each VGGT Linear shape with ``tokens`` rows; TFLOP/s and speedup over torch bf16."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [row for name, k, n in VGGT_LINEAR_SHAPES for row in _bench_shape(name, tokens, k, n, gen)]


def _bench_shape(name: str, tokens: int, k: int, n: int, gen: torch.Generator) -> list[dict]:
    rows: list[dict] = []
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    gamma = torch.rand(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    # Epilogues as the engine runs them (qvggt.engine.block): proj and fc2 add LayerScale * out to the residual
    # stream, fc1 applies GELU, qkv only adds its bias.
    res = (
        torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, generator=gen) if name in ("proj", "fc2") else None
    )
    gelu = name == "fc1"
    qf8, sf8 = token_quant_ref(x, "fp8_e4m3")
    wf8, swf8 = token_quant_ref(w, "fp8_e4m3")
    qi8, si8 = token_quant_ref(x, "int8")
    wi8, swi8 = token_quant_ref(w, "int8")
    # 1 x 128 activation tiles: the scales fc1's epilogue hands to fc2 in the engine.
    qf8g, sf8g = token_quant_ref(x.reshape(-1, 128), "fp8_e4m3")
    qf8g, sf8g = qf8g.view(tokens, k), sf8g.view(tokens, k // 128)
    w4, sw4 = token_quant_ref(w, "int4")
    w4p = pack_int4_blocked(w4, default_tiles(torch.int8).block_k)
    epi = {"bias": bias, "gelu": gelu}
    if res is not None:
        epi.update(gamma=gamma, residual=res)

    def torch_bf16():
        y = F.linear(x, w, bias)
        if gelu:
            y = F.gelu(y)
        if res is not None:
            y = res + gamma * y
        return y

    variants: dict[str, Callable[[], object]] = {
        "torch bf16 (+eager epilogue)": torch_bf16,
        "torch bf16 GEMM only": lambda: x @ w.T,
        "triton bf16 fused": lambda: scaled_gemm(x, w, **epi),
        "triton fp8 fused": lambda: scaled_gemm(qf8, wf8, a_scale=sf8, w_scale=swf8, **epi),
        "triton fp8 fused, 1x128 act scales": lambda: scaled_gemm(qf8g, wf8, a_scale=sf8g, w_scale=swf8, **epi),
        "triton int8 fused": lambda: scaled_gemm(qi8, wi8, a_scale=si8, w_scale=swi8, **epi),
        "triton w4a8-fp8 fused": lambda: scaled_gemm(qf8, w4p, a_scale=sf8, w_scale=sw4, w_int4_k=k, **epi),
        "triton w4a8-int8 fused": lambda: scaled_gemm(qi8, w4p, a_scale=si8, w_scale=sw4, w_int4_k=k, **epi),
    }
    if name == "fc1":
        # The engine's quantized fc1 also quantizes its GELU output per (token, 128 columns) for fc2 in the epilogue.
        variants["triton fp8 fused + fp8 out quant (engine fc1)"] = lambda: scaled_gemm(
            qf8, wf8, a_scale=sf8, w_scale=swf8, out_quant="fp8_e4m3", **epi
        )
    if hasattr(torch, "_scaled_mm"):
        wf8_t = wf8.T  # column-major B, as _scaled_mm wants
        variants["torch _scaled_mm fp8 rowwise"] = lambda: torch._scaled_mm(
            qf8, wf8_t, scale_a=sf8, scale_b=swf8.T.contiguous(), out_dtype=torch.bfloat16, bias=bias
        )
    flops = 2 * tokens * k * n
    base = None
    for vname, fn in variants.items():
        try:
            ms = _median_ms(fn)
        except Exception as exc:  # noqa: BLE001  (record and go on: one variant must not sink the table)
            rows.append({"shape": name, "M": tokens, "K": k, "N": n, "variant": vname, "error": repr(exc)[:300]})
            continue
        base = ms if vname.startswith("torch bf16 (") else base
        rows.append({
            "shape": name, "M": tokens, "K": k, "N": n, "variant": vname, "ms": ms,
            "tflops": flops / ms / 1e9, "speedup_vs_torch_bf16": (base / ms) if base else None,
        })  # fmt: skip
    return rows


def bench_layernorm(tokens: int, dim: int = 1024, seed: int = 0) -> list[dict]:
    """Fused LayerNorm -> fp8/int8 per-token quantization (plain, with its Hadamard stage, with special-token rows)
    vs ``F.layer_norm`` (bf16 in, bf16 out); GB/s moved."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.rand(dim, device="cuda", generator=gen)
    b = torch.randn(dim, device="cuda", generator=gen)
    rows = []
    for name, fn, out_bytes in (
        ("F.layer_norm bf16", lambda: F.layer_norm(x, (dim,), w.bfloat16(), b.bfloat16(), 1e-6), 2),
        ("layernorm_quant fp8", lambda: layernorm_quant(x, w, b, 1e-6, "fp8_e4m3"), 1),
        ("layernorm_quant int8", lambda: layernorm_quant(x, w, b, 1e-6, "int8"), 1),
        # The rotation stage (quarot / quantvggt+lnrot: full-width Hadamard in registers) and quantvggt W4A4's
        # special-token rows (P = 1041 tokens per frame at 518x392): each should cost ~nothing on a memory-bound pass.
        ("layernorm_quant int8 + Hadamard", lambda: layernorm_quant(x, w, b, 1e-6, "int8", hadamard=dim), 1),
        (
            "layernorm_quant int4 + special rows",
            lambda: layernorm_quant(x, w, b, 1e-6, "int4", special_period=1041, special_count=5),
            1,
        ),
    ):
        try:
            ms = _median_ms(fn)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not cost the rest of a GPU session
            rows.append({"kernel": name, "M": tokens, "K": dim, "error": repr(exc)[:300]})
            continue
        moved = tokens * dim * (2 + out_bytes) + tokens * 4 * (out_bytes == 1)
        rows.append({"kernel": name, "M": tokens, "K": dim, "ms": ms, "gbps": moved / ms / 1e6})
    return rows
