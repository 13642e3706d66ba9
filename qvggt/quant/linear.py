"""Quantized drop-in modules: ``QuantLinear`` and ``QuantConv2d`` holding real low-bit weights.

Both store the weight *quantized* (codes + scales), not as fake-quantized floats, so a state_dict is the deployable
artifact: int8 codes, two int4 (or 2/3-bit) codes per byte, or fp8 e4m3 values, plus float32 scales and uint8 zero
points. ``forward`` is the torch reference path: dequantize the weight to the input's dtype and call ``F.linear`` /
``F.conv2d``; low-bit kernels (qvggt.kernels) replace it later and are tested against it.

Weight storage, over a 2-D view ``W2 [N, K]`` of the weight (N output channels, K inputs per output):

    int, bits <= 4   weight_packed      uint8 [N, ceil(K/2)]   two codes per byte (``pack_int4``: low nibble = even k)
    int, bits 5..8   weight_q           int8 (sym) / uint8 (asym) [N, K]
    fp8 e4m3         weight_q           float8_e4m3fn [N, K]
    all              weight_scale       float32 S
    asymmetric int   weight_zero_point  uint8 S (integer zero points in [0, 2^b - 1])
    with bias        bias               float parameter [N] in the original dtype (never quantized)

    S: channel [N, 1]; group [N, K/G, 1]; tensor [1, 1]   (G = group size; see qvggt.quant.quantizer)

Format metadata (formats, K, the original dtype) lives in module attributes, shown by ``extra_repr``; an export
writes it next to the tensors. A module built with the same constructor arguments loads a state_dict exactly.

Legend: B... leading (batch/token) dims, K in_features, N out_features; convs: C_in, C_out, kh x kw kernel, g groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvggt.quant.formats import Granularity, QuantFormat
from qvggt.quant.hadamard import block_hadamard_transform
from qvggt.quant.packing import pack_int4, unpack_int4
from qvggt.quant.quantizer import ClipRatio, compute_scales, dequantize, fake_quantize, quantize
from qvggt.quant.special_tokens import fake_quantize_rows

__all__ = ["QuantConv2d", "QuantLinear", "is_packed_format"]


def is_packed_format(fmt: QuantFormat) -> bool:
    """Whether weights of ``fmt`` are stored two codes per byte (int formats of at most 4 bits)."""
    return not fmt.is_float and fmt.bits <= 4


def _scale_shape(n: int, k: int, fmt: QuantFormat) -> tuple[int, ...]:
    gran = fmt.granularity
    if gran is Granularity.CHANNEL:
        return (n, 1)
    if gran is Granularity.GROUP:
        assert fmt.group_size is not None
        return (n, k // fmt.group_size, 1)
    if gran is Granularity.TENSOR:
        return (1, 1)
    raise ValueError(f"weight format {fmt.name}: granularity must be channel, group or tensor, not {gran.value!r}")


class _QuantWeight(nn.Module):
    """Shared storage of a quantized weight seen as ``W2 [N, K]`` (layout in the module docstring)."""

    weight_fmt: QuantFormat
    orig_dtype: torch.dtype

    def _init_storage(
        self, n: int, k: int, fmt: QuantFormat, dtype: torch.dtype, device: torch.device | str | None, name: str
    ) -> None:
        if not isinstance(fmt, QuantFormat):
            raise TypeError(f"weight_fmt must be a QuantFormat, got {type(fmt).__name__}")
        if fmt.granularity is Granularity.GROUP and k % fmt.group_size:  # type: ignore[operator]
            raise ValueError(
                f"{name}: group size {fmt.group_size} of weight format {fmt.name} does not divide the width {k}"
            )
        self.weight_fmt, self.orig_dtype, self._n, self._k = fmt, dtype, n, k
        # Zero-filled placeholders of the exact shapes and dtypes, so an empty module can load_state_dict.
        if is_packed_format(fmt):
            self.register_buffer("weight_packed", torch.zeros(n, (k + 1) // 2, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("weight_q", torch.zeros(n, k, dtype=fmt.storage_dtype, device=device))
        shape = _scale_shape(n, k, fmt)
        self.register_buffer("weight_scale", torch.ones(shape, dtype=torch.float32, device=device))
        if not fmt.symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(shape, dtype=torch.uint8, device=device))

    @torch.no_grad()
    def _store(
        self,
        w2: Tensor,
        clip_ratio: ClipRatio | None,
        scale: Tensor | None = None,
        zero_point: Tensor | None = None,
    ) -> None:
        """Quantize ``w2 [N, K]`` (any float dtype; scales computed in float32) into the buffers.

        ``scale`` (shape S) and ``zero_point`` (asymmetric int only) replace the min/max scales when given: GPTQ
        chooses its scales before it updates the weight, and ``w2`` then already lies on their grid.
        """
        fmt = self.weight_fmt
        w2 = w2.detach()
        if scale is None:
            if zero_point is not None:
                raise ValueError("a zero point was given without its scale")
            scale, zp = compute_scales(w2, fmt, 1.0 if clip_ratio is None else clip_ratio)
        else:
            if clip_ratio is not None:
                raise ValueError("clip_ratio applies to computed scales; bake it into a given scale")
            want = _scale_shape(self._n, self._k, fmt)
            if tuple(scale.shape) != want or (zero_point is None) != fmt.symmetric:
                raise ValueError(
                    f"given weight scales {tuple(scale.shape)} (zero point: {zero_point is not None}) do not fit "
                    f"{fmt.name} on [{self._n}, {self._k}]: expected {want}"
                    + ("" if fmt.symmetric else " and a zero point of the same shape")
                )
            scale, zp = scale.detach(), None if zero_point is None else zero_point.detach()
        scale = scale.to(torch.float32)
        zp = None if zp is None else zp.to(torch.float32)
        codes = quantize(w2.to(torch.float32), fmt, scale, zp)
        if is_packed_format(fmt):
            self.weight_packed = pack_int4(codes, check=False)  # codes are in range by construction
        else:
            self.weight_q = codes
        self.weight_scale = scale
        if zp is not None:
            self.weight_zero_point = zp.to(torch.uint8)  # integer-valued in [0, 2^b - 1]: exact

    def _codes(self) -> Tensor:
        """Integer (or fp8) codes ``[N, K]`` in ``weight_fmt.storage_dtype``."""
        if is_packed_format(self.weight_fmt):
            return unpack_int4(self.weight_packed, self._k, signed=self.weight_fmt.symmetric)
        return self.weight_q

    def _weight2d(self, dtype: torch.dtype) -> Tensor:
        zp = getattr(self, "weight_zero_point", None)
        zp = None if zp is None else zp.to(self.weight_scale.dtype)
        return dequantize(self._codes(), self.weight_fmt, self.weight_scale, zp, dtype=dtype)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: codes (packed or not) + scales + zero points (bias excluded)."""
        names = ("weight_packed", "weight_q", "weight_scale", "weight_zero_point")
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False) if n in names)

    @property
    def float_weight_nbytes(self) -> int:
        """Bytes the weight took before quantization (N * K in the original dtype)."""
        return self._n * self._k * torch.empty((), dtype=self.orig_dtype).element_size()

    @property
    def weight_numel(self) -> int:
        return self._n * self._k

    def _storage_repr(self) -> str:
        return "packed int4 nibbles" if is_packed_format(self.weight_fmt) else str(self.weight_fmt.storage_dtype)


class QuantLinear(_QuantWeight):
    """A Linear with a quantized weight and optional dynamic per-token (or per-group/tensor) input quantization.

    ``forward(x)`` = ``F.linear(fake_quantize(x, act_fmt), dequantized_weight(x.dtype), bias)``, in x's dtype.

    Args (constructor; use ``from_float`` to quantize an existing layer):
        in_features, out_features: K, N.
        weight_fmt: weight format (granularity channel, group or tensor).
        act_fmt: dynamic input format or None (weight-only).
        bias: whether there is a bias.
        dtype: the original float dtype (bias dtype; byte accounting).
        device: where to allocate the buffers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_fmt: QuantFormat,
        act_fmt: QuantFormat | None = None,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if act_fmt is not None and not isinstance(act_fmt, QuantFormat):
            raise TypeError(f"act_fmt must be a QuantFormat or None, got {type(act_fmt).__name__}")
        if act_fmt is not None and act_fmt.granularity is Granularity.CHANNEL:
            raise ValueError(f"act_fmt {act_fmt.name}: dynamic activation scales must be per token, group or tensor")
        self.in_features, self.out_features, self.act_fmt = in_features, out_features, act_fmt
        # Online rotation of the input (0: none): x -> block_hadamard_transform(x, input_hadamard) before the
        # activation is quantized; the stored weight is already rotated (W Hb), so the product is unchanged.
        # Set by methods that rotate inputs no preceding op can absorb (quantvggt on fc2); saved in the manifest.
        self.input_hadamard = 0
        # Special-token rows (qvggt.quant.special_tokens): rows r of the flattened input with
        # r % token_period < special_tokens are quantized with special_act_fmt (quantvggt: the camera/register
        # tokens on an 8-bit grid). token_period (tokens per frame) is set at run time by the aggregator's hook.
        self.special_tokens = 0
        self.special_act_fmt: QuantFormat | None = None
        self.token_period = 0
        self._init_storage(out_features, in_features, weight_fmt, dtype, device, f"Linear({in_features}, ...)")
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_fmt: QuantFormat,
        act_fmt: QuantFormat | None = None,
        clip_ratio: ClipRatio | None = None,
        *,
        weight: Tensor | None = None,
        scale: Tensor | None = None,
        zero_point: Tensor | None = None,
    ) -> QuantLinear:
        """Quantize ``linear`` round-to-nearest (RTN).

        Args:
            linear: the float layer, weight [N, K]; left unmodified.
            weight_fmt: weight format.
            act_fmt: dynamic input format, or None for weight-only.
            clip_ratio: None (min/max scales), a float in (0, 1], or a tensor of the scale shape S (e.g. from
                ``mse_clip_search(linear.weight, weight_fmt)``).
            weight: [N, K] quantized instead of ``linear.weight`` (e.g. GPTQ's error-compensated weight).
            scale, zero_point: static weight scales of shape S (and zero points for asymmetric int) instead of
                min/max ones; with ``weight`` on their grid the stored codes reproduce it exactly.

        Returns:
            A QuantLinear on the layer's device.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        q = cls(
            linear.in_features,
            linear.out_features,
            weight_fmt,
            act_fmt,
            bias=linear.bias is not None,
            dtype=w.dtype,
            device=w.device,
        )
        if weight is not None and tuple(weight.shape) != tuple(w.shape):
            raise ValueError(f"weight {tuple(weight.shape)} does not match the layer's {tuple(w.shape)}")
        q._store(w if weight is None else weight, clip_ratio, scale, zero_point)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the reference forward multiplies with: ``[N, K]`` in ``dtype``."""
        return self._weight2d(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B..., K] float -> [B..., N] in x's dtype."""
        if self.input_hadamard:
            x = block_hadamard_transform(x, self.input_hadamard)
        if self.act_fmt is not None and x.numel():  # an empty batch has no range to quantize
            x = self.quantize_input(x, fake_quantize)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def set_special_rows(self, count: int, fmt: QuantFormat | None) -> None:
        """Quantize the first ``count`` tokens of every frame with ``fmt`` (0 / None: off); validated here."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"special_tokens must be an int >= 0, got {count!r}")
        if count and (fmt is None or self.act_fmt is None):
            raise ValueError("special-token rows need an activation format for the layer and for the rows")
        if count and fmt is not None and fmt.granularity is not Granularity.TOKEN:
            raise ValueError(f"special-token rows are quantized per token, got {fmt.name}")
        self.special_tokens, self.special_act_fmt = count, (fmt if count else None)

    def quantize_input(self, x: Tensor, quantize: Callable[[Tensor, QuantFormat], Tensor]) -> Tensor:
        """``quantize`` (``fake_quantize`` or its STE twin) applied to the input with the layer's activation
        format, special rows with theirs."""
        assert self.act_fmt is not None
        if not self.special_tokens:
            return quantize(x, self.act_fmt)
        if self.token_period <= 0:
            raise ValueError(
                "this QuantLinear quantizes special-token rows apart but does not know the tokens per frame: run it "
                "inside the model (the aggregator's hook sets token_period; "
                "qvggt.quant.special_tokens.install_token_period_hook) or set layer.token_period"
            )
        assert self.special_act_fmt is not None
        return fake_quantize_rows(
            x, self.act_fmt, self.special_act_fmt, self.token_period, self.special_tokens, quantize
        )

    def extra_repr(self) -> str:
        act = self.act_fmt.name if self.act_fmt is not None else "none (weight-only)"
        rot = f", input_hadamard={self.input_hadamard}" if self.input_hadamard else ""
        if self.special_tokens and self.special_act_fmt is not None:
            rot += f", special_rows={self.special_tokens}x{self.special_act_fmt.name}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight_fmt.name} ({self._storage_repr()}), act={act}{rot}"
        )


class QuantConv2d(_QuantWeight):
    """Weight-only quantized ``nn.Conv2d`` or ``nn.ConvTranspose2d`` (``transposed=True``); inputs stay float.

    Scales are per output channel: the weight is viewed as ``W2 [C_out, C_in/g * kh * kw]`` (Conv2d weight
    ``[C_out, C_in/g, kh, kw]``) or, for a transposed conv (weight ``[C_in, C_out/g, kh, kw]``), as
    ``[C_out/g, C_in * kh * kw]`` (with g > 1, output channel j of every group shares a scale). Activations are not
    quantized: VGGT's convs are the patch embedding and the DPT/tracker heads, which QuantVGGT keeps at full
    precision; per-pixel activation quantization would need an im2col kernel and buys nothing in the reference path.
    ``forward`` = ``F.conv2d`` / ``F.conv_transpose2d`` with the dequantized weight in x's dtype.

    Use ``from_float(conv, weight_fmt)``; the constructor mirrors the conv's hyper-parameters for state_dict loading.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        weight_fmt: QuantFormat,
        *,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        transposed: bool = False,
        output_padding: tuple[int, int] = (0, 0),
        padding_mode: str = "zeros",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if weight_fmt.granularity is not Granularity.CHANNEL:
            raise ValueError(f"QuantConv2d quantizes per output channel; got weight format {weight_fmt.name}")
        kh, kw = kernel_size
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.transposed, self.output_padding, self.padding_mode = transposed, output_padding, padding_mode
        if transposed:
            self.weight_shape = (in_channels, out_channels // groups, kh, kw)
            n, k = out_channels // groups, in_channels * kh * kw
        else:
            self.weight_shape = (out_channels, in_channels // groups, kh, kw)
            n, k = out_channels, in_channels // groups * kh * kw
        self.act_fmt = None
        self._init_storage(n, k, weight_fmt, dtype, device, f"Conv({in_channels}, {out_channels})")
        self.bias = (
            nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d | nn.ConvTranspose2d, weight_fmt: QuantFormat, clip_ratio: ClipRatio | None = None
    ) -> QuantConv2d:
        """Quantize ``conv`` (left unmodified) per output channel; ``clip_ratio`` as in ``QuantLinear.from_float``
        with the scale shape ``[N, 1]`` of the 2-D view."""
        if type(conv) not in (nn.Conv2d, nn.ConvTranspose2d):
            raise TypeError(f"from_float expects an nn.Conv2d or nn.ConvTranspose2d, got {type(conv).__name__}")
        transposed = isinstance(conv, nn.ConvTranspose2d)
        w = conv.weight
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            weight_fmt,
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            transposed=transposed,
            output_padding=conv.output_padding if transposed else (0, 0),  # type: ignore[arg-type]
            padding_mode=conv.padding_mode,
            dtype=w.dtype,
            device=w.device,
        )
        w2 = w.detach().transpose(0, 1) if transposed else w.detach()
        q._store(w2.reshape(q._n, q._k), clip_ratio)
        if conv.bias is not None:
            q.bias.data.copy_(conv.bias.detach())
        return q

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The conv weight in its usual layout (``[C_out, C_in/g, kh, kw]``, or ``[C_in, C_out/g, kh, kw]``
        transposed) and ``dtype``."""
        w2 = self._weight2d(dtype)
        if self.transposed:
            c_in, c_out_g, kh, kw = self.weight_shape
            return w2.reshape(c_out_g, c_in, kh, kw).transpose(0, 1)
        return w2.reshape(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C_in, H, W] -> [B, C_out, H', W'] in x's dtype."""
        w = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.transposed:
            return F.conv_transpose2d(
                x, w, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
            )
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad explicitly, then convolve without padding
            ph, pw = self.padding  # type: ignore[misc]
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            return F.conv2d(x, w, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        kind = "ConvTranspose2d" if self.transposed else "Conv2d"
        return (
            f"{kind}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}), "
            f"weight={self.weight_fmt.name} ({self._storage_repr()}), act=none (weight-only)"
        )
