"""Pure-torch twins of the Triton kernels in ``qvggt.kernels``: the specification each kernel is tested against.

Every twin reuses ``qvggt.quant.quantizer`` so kernels inherit exactly the project's quantization semantics:
symmetric int8 on the restricted range [-127, 127] with round half to even, fp8 e4m3 saturated to +-448 before
the cast to ``torch.float8_e4m3fn``, per-token scale ``absmax / qmax`` floored at ``finfo(float32).tiny``.

Shape legend:
    M  rows (tokens; VGGT's [B, S, P, C] activations flattened to [B*S*P, C])
    K  row width (channels; 1024 for VGGT-1B, 64/128 for the tiny presets)
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from qvggt.quant.formats import QuantFormat
from qvggt.quant.quantizer import compute_scales, quantize

__all__ = ["TokenQuantFormat", "dequant_ref", "layernorm_quant_ref", "token_format", "token_quant_ref"]

TokenQuantFormat = Literal["int8", "fp8_e4m3"]
_KINDS = {"int8": "int", "fp8_e4m3": "fp8_e4m3"}


def token_format(fmt: str) -> QuantFormat:
    """The per-token symmetric 8-bit ``QuantFormat`` named by ``fmt`` ("int8" or "fp8_e4m3")."""
    if fmt not in _KINDS:
        raise ValueError(f"fmt={fmt!r} is not supported: expected one of {sorted(_KINDS)}")
    return QuantFormat(kind=_KINDS[fmt], bits=8, symmetric=True, granularity="token")


def token_quant_ref(x: Tensor, fmt: TokenQuantFormat) -> tuple[Tensor, Tensor]:
    """Dynamic per-token quantization of ``x`` [M, K]: twin of ``token_quant`` (no normalization).

    Returns:
        q: [M, K] int8 codes in [-127, 127] or float8_e4m3fn values in [-448, 448].
        scale: [M, 1] float32, ``max(absmax(row) / qmax, finfo(float32).tiny)``; ``x ~= q * scale``.
    """
    qf = token_format(fmt)
    x32 = x.float()
    scale, _ = compute_scales(x32, qf)
    return quantize(x32, qf, scale), scale


def layernorm_quant_ref(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fmt: TokenQuantFormat,
) -> tuple[Tensor, Tensor]:
    """LayerNorm over the last dim (in float32), then dynamic per-token quantization: twin of ``layernorm_quant``.

    Args:
        x: [M, K] float32, bfloat16 or float16.
        weight, bias: [K] LayerNorm affine (any float dtype, used in float32), or None.
        eps: LayerNorm epsilon.
        fmt: "int8" or "fp8_e4m3".

    Returns:
        q: [M, K] int8 or float8_e4m3fn; scale: [M, 1] float32. ``dequant_ref(q, scale)`` equals
        ``fake_quantize(F.layer_norm(x.float(), ...), QuantFormat(kind, 8, True, "token"))`` bit for bit.
    """
    k = x.shape[-1]
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (k,), w, b, eps)
    return token_quant_ref(y, fmt)


def dequant_ref(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` in float32: q [M, K] (int8 or float8_e4m3fn), scale [M, 1] -> [M, K] float32."""
    return q.float() * scale
