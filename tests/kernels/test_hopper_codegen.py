"""Hopper code generation of every kernel variant the engine launches, checked without a GPU.

Each variant is compiled ahead of time for sm_90a (``qvggt.kernels.aot``: Triton to PTX, then the ptxas Triton
ships) in a subprocess without the interpreter. Asserted: the dots lower to Hopper ``wgmma`` of the intended type
(bf16, e4m3 or s8: an int4 weight must reach the 8-bit units, never an emulated path), loads are pipelined with
``cp.async``, shared memory fits the 227 KB a block may use, and no register spills. Numerics of the compiled code
and speed still need a GPU (tests/kernels/test_kernels_cuda.py, scripts/gpu_check.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qvggt.kernels.aot import bundled_ptxas

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or bundled_ptxas() is None, reason="CPU-only AOT check; needs triton's bundled ptxas"
)

_SCRIPT = r"""
import dataclasses, json, os, sys
import torch
from qvggt.kernels.aot import compile_for_hopper
import qvggt.kernels.gemm as G
import qvggt.kernels.layernorm_quant as L
import qvggt.kernels.qk_rope as R

TINY = torch.finfo(torch.float32).tiny
INTS = ["M", "N", "K", "stride_am", "stride_wn", "stride_asm", "stride_wsn", "stride_rm", "stride_om", "stride_osm",
        "out_special_period", "out_special_count"]
PTRS = ["a_ptr", "w_ptr", "a_scale_ptr", "w_scale_ptr", "bias_ptr", "gamma_ptr", "res_ptr", "out_ptr", "out_scale_ptr",
        "had_ptr"]
out = {}

def gemm(name, a, w, o, a_kind, int4, a_scale, w_scale, **epi):
    tiles = G.default_tiles(torch.bfloat16 if a == "bf16" else torch.int8)
    sig = {"a_ptr": "*" + a, "w_ptr": "*" + w, "out_ptr": "*" + o, "bias_ptr": "*bf16", "gamma_ptr": "*bf16",
           "res_ptr": "*bf16", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "out_scale_ptr": "*fp32",
           "had_ptr": "*fp32"}
    sig.update({n: "i32" for n in INTS})
    const = dict(A_KIND=a_kind, W_INT4=int4, A_SCALE=a_scale, W_SCALE=w_scale, GROUPED=2 in (a_scale, w_scale),
                 HAS_BIAS=True, GELU=False, HAS_GAMMA=False, HAS_RES=False, OUT_HADAMARD=False, OUT_QUANT=0,
                 OUT_QMAX=448.0, OUT_SPECIAL=False, SPECIAL_QMAX=127.0, TINY=TINY,
                 BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m)
    const.update(epi)
    aligned = PTRS + ["K", "N", "stride_am", "stride_wn", "stride_rm", "stride_om"]
    r = compile_for_hopper(G._scaled_gemm_kernel, sig, const, aligned, tiles.num_warps, tiles.num_stages)
    out[name] = dataclasses.asdict(r)

# The engine's block: qkv (bias), proj / fc2 (LayerScale + residual), fc1 (GELU, output quantized for fc2).
gemm("bf16 proj", "bf16", "bf16", "bf16", 0, False, 0, 0, HAS_GAMMA=True, HAS_RES=True)
gemm("bf16 fc1", "bf16", "bf16", "bf16", 0, False, 0, 0, GELU=True)
gemm("fp8 qkv", "fp8e4nv", "fp8e4nv", "bf16", 2, False, 1, 1)
gemm("fp8 fc1 -> fp8", "fp8e4nv", "fp8e4nv", "fp8e4nv", 2, False, 1, 1, GELU=True, OUT_QUANT=2)
gemm("fp8 fc2 (1x128 act scales)", "fp8e4nv", "fp8e4nv", "bf16", 2, False, 2, 1, HAS_GAMMA=True, HAS_RES=True)
gemm("int8 qkv", "i8", "i8", "bf16", 1, False, 1, 1)
gemm("int8 fc2 (1x128 act scales)", "i8", "i8", "bf16", 1, False, 2, 1, HAS_GAMMA=True, HAS_RES=True)
gemm("w4a8-fp8 qkv", "fp8e4nv", "u8", "bf16", 2, True, 1, 1)
gemm("w4a8-int8 fc1 -> int8", "i8", "u8", "i8", 1, True, 1, 1, GELU=True, OUT_QUANT=1, OUT_QMAX=127.0)
gemm("w4a8-int8 group128", "i8", "u8", "bf16", 1, True, 1, 2)
gemm("fp8 fc1 -> hadamard -> fp8", "fp8e4nv", "fp8e4nv", "fp8e4nv", 2, False, 1, 1, GELU=True, OUT_HADAMARD=True,
     OUT_QUANT=2)
gemm("w4a8-int8 fc1 -> hadamard -> int8", "i8", "u8", "i8", 1, True, 1, 1, GELU=True, OUT_HADAMARD=True, OUT_QUANT=1,
     OUT_QMAX=127.0)
# W4A4 with special-token rows (quantvggt): fc2's input on the int4 grid, camera/register rows on the int8 grid.
gemm("w4a4 fc1 -> hadamard -> int4 + special rows", "i8", "u8", "i8", 1, True, 1, 1, GELU=True, OUT_HADAMARD=True,
     OUT_QUANT=1, OUT_QMAX=7.0, OUT_SPECIAL=True)

sig = {"x_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
       "stride_xm": "i32", "stride_qm": "i32", "K": "i32", "eps": "fp32", "special_period": "i32",
       "special_count": "i32"}

def lnq(name, fp8, norm=True, had=0, block_k=1024, special=False):
    s = dict(sig, q_ptr="*fp8e4nv" if fp8 else "*i8")
    const = dict(HAS_W=norm, HAS_B=norm, APPLY_NORM=norm, LOG2_HAD=had.bit_length() - 1 if had else 0,
                 HAD_NORM=had**0.5 if had else 1.0, IS_FP8=fp8,
                 QMAX=448.0 if fp8 else (7.0 if special else 127.0), SPECIAL=special, SPECIAL_QMAX=127.0, TINY=TINY,
                 BLOCK_K=block_k)
    r = compile_for_hopper(L._layernorm_quant_kernel, s, const, ["x_ptr", "q_ptr", "stride_xm", "stride_qm"],
                           4 if block_k <= 1024 else 8)  # the launcher's choice
    out[name] = dataclasses.asdict(r)

for fp8 in (True, False):
    lnq("layernorm_quant " + ("fp8" if fp8 else "int8"), fp8)
# The rotation stage as the engine launches it: qkv / fc1 of vggt-1b (quarot: full width 1024; a 128 block),
# the small preset (128), and token quantization of a quarot fc2 input (4096 wide, full-width block).
lnq("layernorm_hadamard_quant fp8 b1024", True, had=1024)
lnq("layernorm_hadamard_quant int8 b1024", False, had=1024)
lnq("layernorm_hadamard_quant int8 b128", False, had=128)
lnq("layernorm_hadamard_quant fp8 b128 (small, K=128)", True, had=128, block_k=128)
lnq("layernorm_hadamard_quant int8 b64 (tiny, K=64)", False, had=64, block_k=64)
lnq("token_hadamard_quant fp8 b4096 (fc2)", True, norm=False, had=4096, block_k=4096)
lnq("token_hadamard_quant int8 b1024 (proj)", False, norm=False, had=1024)
# W4A4 with special-token rows: int4 grid, camera/register rows on the int8 grid (qkv / fc1 and proj inputs).
lnq("layernorm_hadamard_quant int4 b1024 + special rows", False, had=1024, special=True)
lnq("token_quant int4 + special rows", False, norm=False, special=True)

sig = {n: "*bf16" for n in ("qkv_ptr", "q_ptr", "k_ptr", "v_ptr")}
sig.update({"yx_ptr": "*i64", "inv_freq_ptr": "*fp32", "qw_ptr": "*fp32", "qb_ptr": "*fp32", "kw_ptr": "*fp32",
            "kb_ptr": "*fp32", "T": "i32", "N": "i32", "H": "i32", "eps": "fp32"})
r = compile_for_hopper(R._qk_norm_rope_kernel, sig, dict(HAS_NORM=True, HAS_ROPE=True, D=64, BLOCK_T=32),
                       ["qkv_ptr", "q_ptr", "k_ptr", "v_ptr"], 4)
out["qk_norm_rope"] = dataclasses.asdict(r)
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("JSON"))
    return json.loads(line[4:])


@pytest.mark.parametrize(
    "variant,dot",
    [
        ("bf16 proj", "bf16.bf16"),
        ("bf16 fc1", "bf16.bf16"),
        ("fp8 qkv", "e4m3.e4m3"),
        ("fp8 fc1 -> fp8", "e4m3.e4m3"),
        ("fp8 fc2 (1x128 act scales)", "e4m3.e4m3"),
        ("int8 qkv", "s8.s8"),
        ("int8 fc2 (1x128 act scales)", "s8.s8"),
        ("w4a8-fp8 qkv", "e4m3.e4m3"),
        ("w4a8-int8 fc1 -> int8", "s8.s8"),
        ("w4a8-int8 group128", "s8.s8"),
        ("fp8 fc1 -> hadamard -> fp8", "e4m3.e4m3"),
        ("w4a8-int8 fc1 -> hadamard -> int8", "s8.s8"),
        ("w4a4 fc1 -> hadamard -> int4 + special rows", "s8.s8"),
    ],
)
def test_gemm_variants_use_wgmma_fit_and_do_not_spill(reports: dict[str, dict], variant: str, dot: str) -> None:
    r = reports[variant]
    main = [w for w in r["wgmma"] if not w.endswith("tf32.tf32")]  # the epilogue Hadamard is a tf32 wgmma
    assert main and all(w.endswith(dot) for w in main), r["wgmma"]
    assert ("hadamard" in variant) == any(w.endswith("tf32.tf32") for w in r["wgmma"])
    assert r["cp_async"] > 0  # loads software-pipelined
    assert 0 < r["shared_bytes"] <= 227 * 1024
    assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255


ROTATION_VARIANTS = [
    "layernorm_hadamard_quant fp8 b1024",
    "layernorm_hadamard_quant int8 b1024",
    "layernorm_hadamard_quant int8 b128",
    "layernorm_hadamard_quant fp8 b128 (small, K=128)",
    "layernorm_hadamard_quant int8 b64 (tiny, K=64)",
    "token_hadamard_quant fp8 b4096 (fc2)",
    "token_hadamard_quant int8 b1024 (proj)",
    "layernorm_hadamard_quant int4 b1024 + special rows",
]


@pytest.mark.parametrize(
    "variant",
    [
        "layernorm_quant fp8",
        "layernorm_quant int8",
        "token_quant int4 + special rows",
        "qk_norm_rope",
        *ROTATION_VARIANTS,
    ],
)
def test_elementwise_kernels_compile_without_spills(reports: dict[str, dict], variant: str) -> None:
    r = reports[variant]
    assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 and not r["wgmma"]
    assert r["shared_bytes"] <= 227 * 1024


@pytest.mark.parametrize("variant", ROTATION_VARIANTS)
def test_rotation_stage_stays_in_registers_and_a_row_of_shared_memory(reports: dict[str, dict], variant: str) -> None:
    """The butterflies exchange lanes through shared memory (layout conversions), never more than the row itself:
    no Hadamard matrix is staged (a dense 1024 x 1024 fp32 one would be 4 MB), so occupancy stays high."""
    r = reports[variant]
    block_k = int(variant.split("K=")[1].rstrip(")")) if "K=" in variant else (4096 if "b4096" in variant else 1024)
    assert 0 < r["shared_bytes"] <= 4 * block_k  # at most one float32 row
    assert r["registers"] <= 128
