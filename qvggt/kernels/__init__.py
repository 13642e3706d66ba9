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

__all__ = ["has_triton"]


@lru_cache(maxsize=1)
def has_triton() -> bool:
    """Whether triton is importable (checked via ``find_spec``: nothing is imported, CUDA is not touched)."""
    return importlib.util.find_spec("triton") is not None
