"""Kernel-ready GEMM operands built once from ``nn.Linear`` / ``QuantLinear`` layers.

The checkpoint layout (``qvggt.quant.linear``) is for storage; the engine converts each layer when it is built:
float weights to bf16, int8 / fp8 codes kept as they are, int4 codes repacked into the GEMM kernel's blocked
nibble layout (``pack_int4_blocked``), scales to float32 [N, 1] or [N, K / 128]. Formats the kernels cannot run
exactly as stored are refused with the reason, never approximated silently.

Special-token rows (``QuantLinear.special_tokens`` / ``special_act_fmt``, quantvggt's camera and register tokens on
an 8-bit grid inside 4-bit activation layers) become ``GemmOperand.special_tokens``: the activation kernels quantize
those rows with qmax 127 into the same int8 codes, so the operand itself (weights, GEMM) does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from qvggt.kernels.gemm import GemmTiles, default_tiles, pack_int4_blocked
from qvggt.quant.formats import Granularity, QuantFormat
from qvggt.quant.linear import QuantLinear, is_packed_format

__all__ = ["GemmOperand", "UnsupportedLayerError", "act_kind", "prepare_linear"]

ActKind = str  # "bf16" (no activation quantization), "int8", "fp8_e4m3", "int4" (int4 grid in int8 codes)


class UnsupportedLayerError(ValueError):
    """A layer's quantization format has no kernel path in the engine (the message says which and why)."""


def act_kind(fmt: QuantFormat | None, where: str) -> ActKind:
    """The kernel activation kind for a QuantLinear's dynamic input format."""
    if fmt is None:
        return "bf16"
    if fmt.granularity is not Granularity.TOKEN or not fmt.symmetric:
        raise UnsupportedLayerError(
            f"{where}: activation format {fmt.name} is not symmetric per-token; the engine's fused LayerNorm/GEMM "
            "kernels quantize activations per token (re-quantize with a per-token activation format)"
        )
    if fmt.is_float:
        return "fp8_e4m3"
    if fmt.bits == 8:
        return "int8"
    if fmt.bits == 4:
        return "int4"
    raise UnsupportedLayerError(f"{where}: {fmt.bits}-bit activations have no kernel path (use 4 or 8 bits)")


@dataclass
class GemmOperand:
    """One linear layer as the GEMM kernel consumes it.

    Attributes:
        weight: bf16 [N, K]; int8 / float8_e4m3fn codes [N, K]; or int4 codes packed [N, Kp / 2] (uint8).
        scale: float32 [N, 1] or [N, K / block_k]; None for bf16 weights.
        int4_k: K when ``weight`` is int4-packed, else None.
        bias: bf16 [N] or None.
        act: the activation kind the layer's input is quantized to ("bf16" = not quantized).
        tiles: the kernel tile configuration the operand was packed for.
        input_hadamard: block size of the online Hadamard applied to the input before quantization (0: none;
            the weight already holds the rotation, ``QuantLinear.input_hadamard``). On qkv / fc1 it is the fused
            LayerNorm kernel's rotation stage, on proj / fc2 the quantization kernel's (or fc1's epilogue).
        special_tokens: special-token rows per frame (0: none; ``QuantLinear.special_tokens``): input rows r with
            r % token_period < special_tokens are quantized per token on the int8 grid (int4 layers; int8 layers
            are on it already). ``FusedBlock.token_period`` supplies the period at run time.
    """

    weight: Tensor
    scale: Tensor | None
    int4_k: int | None
    bias: Tensor | None
    act: ActKind
    tiles: GemmTiles
    input_hadamard: int = 0
    special_tokens: int = 0

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def nbytes(self) -> int:
        """Bytes the operand occupies on the device (weights, scales, bias)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.bias) if t is not None)

    def to(self, device: torch.device | str) -> GemmOperand:
        """The operand on ``device``; every non-tensor field (act, tiles, rotation, special rows) carried over."""
        move = lambda t: None if t is None else t.to(device)
        return replace(self, weight=move(self.weight), scale=move(self.scale), bias=move(self.bias))


def _weight_only_to_bf16(layer: QuantLinear) -> Tensor:
    return layer.dequantized_weight(torch.float32).to(torch.bfloat16)


def prepare_linear(layer: nn.Module, where: str) -> GemmOperand:
    """Build the kernel operand of ``layer`` (``nn.Linear`` or ``QuantLinear``), on the layer's device.

    Raises:
        UnsupportedLayerError: for formats without an exact kernel path (asymmetric or per-tensor weights, group
            sizes other than the kernel's 128-wide K step, fp8/int8 weights with a different activation kind, an
            online input rotation that is not a power-of-two block dividing the width, special-token rows that are
            not symmetric per-token int8 or on a layer whose activations are not int4 / int8), naming the layer
            and the fix.
    """
    bias = None if getattr(layer, "bias", None) is None else layer.bias.detach().to(torch.bfloat16)
    if isinstance(layer, nn.Linear):
        w = layer.weight.detach().to(torch.bfloat16).contiguous()
        return GemmOperand(w, None, None, bias, "bf16", default_tiles(torch.bfloat16))
    if not isinstance(layer, QuantLinear):
        raise UnsupportedLayerError(f"{where}: {type(layer).__name__} is neither nn.Linear nor QuantLinear")
    op = _prepare_quant_linear(layer, where)
    op.input_hadamard = _input_hadamard(layer, where)
    op.special_tokens = _special_tokens(layer, where, op.act)
    return op


def _special_tokens(layer: QuantLinear, where: str, act: ActKind) -> int:
    """The layer's special-token rows per frame, if the kernels can quantize them exactly as ``QuantLinear`` does.

    Read with ``getattr``: checkpoints (and QuantLinear versions) without the attributes have none.
    """
    count = getattr(layer, "special_tokens", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise UnsupportedLayerError(f"{where}: special_tokens must be an int >= 0, got {count!r}")
    if not count:
        return 0
    fmt = getattr(layer, "special_act_fmt", None)
    exact = (
        isinstance(fmt, QuantFormat)
        and not fmt.is_float
        and fmt.bits == 8
        and fmt.symmetric
        and fmt.granularity is Granularity.TOKEN
    )
    if not exact:
        name = getattr(fmt, "name", fmt)
        raise UnsupportedLayerError(
            f"{where}: special-token rows in format {name}; the engine's kernels quantize them as symmetric per-token "
            "int8 (qmax 127 in the int8 codes) only (re-quantize with special_token_abits=8, or None for no special "
            "rows)"
        )
    if act not in ("int4", "int8"):
        raise UnsupportedLayerError(
            f"{where}: special-token rows on a layer with {act} activations; the kernels put them on the int8 grid "
            "of int4 / int8 activation codes only (re-quantize with int4 or int8 activations, or without special "
            "rows)"
        )
    return count


def _input_hadamard(layer: QuantLinear, where: str) -> int:
    """The layer's online input rotation block, if the kernels' rotation stage can run it exactly."""
    b = int(getattr(layer, "input_hadamard", 0))
    if b and (b < 2 or b & (b - 1) or layer.in_features % b):
        raise UnsupportedLayerError(
            f"{where}: input_hadamard={b} is not a power-of-two block dividing the input width {layer.in_features}; "
            "the engine's rotation stage runs Sylvester Hadamard blocks of 2^k channels only (as quarot and "
            "quantvggt produce them)"
        )
    return b


def _prepare_quant_linear(layer: QuantLinear, where: str) -> GemmOperand:
    bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
    fmt = layer.weight_fmt
    act = act_kind(layer.act_fmt, where)
    a_dtype = torch.bfloat16 if act == "bf16" else (torch.float8_e4m3fn if act == "fp8_e4m3" else torch.int8)
    tiles = default_tiles(a_dtype)
    if not fmt.symmetric or fmt.granularity is Granularity.TENSOR:
        raise UnsupportedLayerError(
            f"{where}: weight format {fmt.name} is {'asymmetric' if not fmt.symmetric else 'per-tensor'}; the GEMM "
            "kernel applies symmetric per-channel or per-group-of-128 scales (re-quantize with e.g. int4-sym-channel)"
        )
    if fmt.granularity is Granularity.GROUP and fmt.group_size != tiles.block_k:
        raise UnsupportedLayerError(
            f"{where}: weight group size {fmt.group_size} differs from the kernel's K step {tiles.block_k}; "
            f"re-quantize with group_size={tiles.block_k} or per-channel scales"
        )
    scale = layer.weight_scale.detach().float().reshape(layer.out_features, -1).contiguous()
    if is_packed_format(fmt):
        if fmt.bits != 4:
            raise UnsupportedLayerError(f"{where}: {fmt.bits}-bit packed weights have no kernel path (use 4 or 8)")
        packed = pack_int4_blocked(layer._codes().to(torch.int8), tiles.block_k)
        return GemmOperand(packed, scale, layer.in_features, bias, act, tiles)
    if act == "bf16":  # 8-bit weight-only: no 8-bit kernel gain without quantized activations
        return GemmOperand(_weight_only_to_bf16(layer), None, None, bias, act, tiles)
    codes = layer.weight_q.detach()
    want = torch.float8_e4m3fn if act == "fp8_e4m3" else torch.int8
    if codes.dtype != want:
        raise UnsupportedLayerError(
            f"{where}: {codes.dtype} weights with {act} activations cannot share a tensor-core dot; quantize both "
            "to int8 or both to fp8 (or the weights to int4)"
        )
    return GemmOperand(codes.contiguous(), scale, None, bias, act, tiles)
