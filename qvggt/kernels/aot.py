"""Ahead-of-time compilation of a Triton kernel for Hopper (sm_90a) on a machine without a GPU.

What the interpreter cannot show but the compiler can, with no device: whether a kernel's dots lower to Hopper's
``wgmma`` tensor-core instructions (and which ones: bf16, e4m3 or s8), whether its tiles fit shared memory, how
many registers it needs and whether it spills, and whether loads are pipelined with ``cp.async``. Triton ships
``ptxas``; this module compiles to PTX with ``triton.compile`` and assembles with ``ptxas -v`` for the numbers.

Must run in a process where ``TRITON_INTERPRET`` was not set before triton was imported (the tests start a
subprocess). The numerics of the compiled code and its speed still need a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AotReport", "bundled_ptxas", "compile_for_hopper"]


@dataclass(frozen=True)
class AotReport:
    """Facts about one compiled kernel variant."""

    wgmma: tuple[str, ...]  # distinct wgmma instruction shapes and types, e.g. "m64n128k32.f32.e4m3.e4m3"
    shared_bytes: int
    registers: int
    spill_bytes: int
    cp_async: int  # asynchronous copies (software pipelining of the loads)


def bundled_ptxas() -> Path | None:
    """The ``ptxas`` that ships with triton's NVIDIA backend, or None (no triton, or a build without it)."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.is_file() else None


def compile_for_hopper(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    aligned: list[str],
    num_warps: int,
    num_stages: int = 3,
) -> AotReport:
    """Compile ``fn`` (a ``@triton.jit`` kernel) for sm_90a.

    Args:
        signature: argument name -> Triton type ("*bf16", "*fp8e4nv", "*i8", "*u8", "*fp32", "i32", "fp32").
        constexprs: constexpr argument name -> value.
        aligned: arguments promised 16-byte aligned (pointers, and strides divisible by 16): what the launcher's
            specialisation would see for real tensors.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_for_hopper needs a process without TRITON_INTERPRET=1")
    ptxas = bundled_ptxas()
    if ptxas is None:
        raise RuntimeError("triton's bundled ptxas was not found")
    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(
        ASTSource(fn, sig, constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        info = subprocess.run(
            [str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(src.with_suffix(".cubin"))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    regs = re.search(r"Used (\d+) registers", info.stderr)
    return AotReport(
        wgmma=tuple(sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k\d+\.[\w.]+?)\s", ptx)))),
        shared_bytes=int(kernel.metadata.shared),
        registers=int(regs.group(1)) if regs else -1,
        spill_bytes=sum(int(x) for x in re.findall(r"(\d+) bytes spill", info.stderr)),
        cp_async=ptx.count("cp.async"),
    )
