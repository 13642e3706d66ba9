"""The inference engine: VGGT on fused Triton kernels (bf16 fused path and int8 / fp8 / int4 quantized paths).

``build_engine(model)`` converts a float or quantized VGGT; ``load_engine(path)`` loads a quantized checkpoint (or a
float one) straight into an engine on a device. Imports only torch (+ triton inside the kernel modules).
"""

from __future__ import annotations

from qvggt.engine.build import Engine, EngineOptions, build_engine, kernel_call_counts, reset_kernel_call_counts
from qvggt.engine.load import load_quantized
from qvggt.engine.operands import UnsupportedLayerError

__all__ = [
    "Engine",
    "EngineOptions",
    "UnsupportedLayerError",
    "build_engine",
    "kernel_call_counts",
    "load_quantized",
    "reset_kernel_call_counts",
]
