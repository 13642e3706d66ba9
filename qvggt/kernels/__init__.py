"""Fused Triton kernels for quantized VGGT inference (Hopper), each with a pure-torch twin in ``reference.py``.

Importing this package is cheap and safe on any machine: it imports neither triton nor touches CUDA. Kernel
modules (``qvggt.kernels.layernorm_quant``, ...) import triton only behind ``has_triton()`` and fall back to their
torch twin when no kernel can run (CPU tensors outside the Triton interpreter). Each launcher records which path
ran in module-level counters (``KERNEL_CALLS`` / ``FALLBACK_CALLS``) so an engine or test can prove kernels ran.

Testing on CPU: set ``TRITON_INTERPRET=1`` *before* a kernel module is imported (triton decides at ``@triton.jit``
time whether a kernel is interpreted); the interpreter runs kernels in NumPy, one program at a time.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

__all__ = ["check_fallback_allowed", "has_triton", "require_kernels"]


@lru_cache(maxsize=1)
def has_triton() -> bool:
    """Whether triton is importable (checked via ``find_spec``: nothing is imported, CUDA is not touched)."""
    return importlib.util.find_spec("triton") is not None


_STRICT = {"on": False}


def require_kernels(on: bool = True) -> None:
    """Make every kernel launcher raise instead of running its torch twin for CUDA tensors.

    An engine turns this on when it runs on a GPU: there a silent fallback to torch would be a slower success that
    hides a broken kernel path. CPU tensors (the twins are the CPU path) are never affected.
    """
    _STRICT["on"] = bool(on)


def check_fallback_allowed(launcher: str, tensor: object) -> None:
    """Raise if ``launcher`` is about to fall back to its torch twin for a CUDA tensor under ``require_kernels``."""
    if _STRICT["on"] and getattr(tensor, "is_cuda", False):
        raise RuntimeError(
            f"{launcher}: the Triton kernel cannot run here (is triton installed and importable?) and "
            "qvggt.kernels.require_kernels is on, so the torch fallback is refused; fix the triton install or call "
            "require_kernels(False) to accept the slow path"
        )
