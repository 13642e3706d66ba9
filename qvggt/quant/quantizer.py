"""Quantize / dequantize primitives for every ``QuantFormat``: scales, fake quantization, STE, clipping, observers.

Pure torch: runs on CPU and CUDA tensors alike (all work stays on ``x.device``) and never syncs with the device
except where noted (``MinMaxObserver.calculate`` does not; value checks on inputs are avoided on purpose).

Shape legend:
    x      the tensor being quantized, [...]; for token and group granularity its last dim is K
    xg     ``scale_view(x, fmt)``: x itself, or [..., K/G, G] for group granularity (G = ``fmt.group_size``)
    S      the scale shape: ``xg`` with every reduced dim kept as size 1 (``keepdim=True``), so scales
           broadcast against ``xg``:
               tensor  [1, ..., 1]            (x.ndim ones)
               channel [N, 1, ..., 1]         (one per index of dim 0: the output channel of a weight)
               token   [..., 1]               (one per row of an activation [..., K])
               group   [..., K/G, 1]          (one per G consecutive elements of the last dim)

Conventions:
    * Scales (and zero points) are float32, or float64 when x is float64; x in bf16/fp16 is upcast for the math.
    * Scales are never 0, NaN or inf for finite x: they are floored at ``torch.finfo(scale dtype).tiny``
      (the smallest normal float, 1.2e-38 for float32). The floor only ever *enlarges* a scale, so it can never
      clip a value; it only matters for all-zero groups (or values below ~1e-36), where any positive scale
      quantizes exactly. Its reciprocal (8.5e37) is still finite in float32.
    * Int codes round half to even (``torch.round``) and saturate to [qmin, qmax]. fp8 values saturate to
      +-448 before the cast to ``torch.float8_e4m3fn`` (which rounds to nearest even; an unsaturated overflow
      would be NaN, the fn variant has no inf).
    * Asymmetric int: ``q = clamp(round(x / scale) + zero_point, 0, 2^b - 1)``, ``x_hat = (q - zero_point) *
      scale``. The range is widened to contain 0, so the zero point is an integer in [qmin, qmax] and 0 is
      represented exactly (padding, ReLU/GELU zeros).
    * Storage dtypes of ``quantize``: int8 (symmetric int), uint8 (asymmetric int), float8_e4m3fn (fp8).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qvggt.quant.formats import QuantFormat

__all__ = [
    "MinMaxObserver",
    "compute_scales",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "mse_clip_search",
    "quantize",
    "scale_view",
]

ClipRatio = float | Tensor


# ---------------------------------------------------------------------------------------------------------------
# shapes and validation


def _check_float(x: Tensor, what: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}): there is nothing to compute scales from")


def scale_view(x: Tensor, fmt: QuantFormat) -> Tensor:
    """View ``x`` so that its scales broadcast against it: ``[..., K/G, G]`` for group granularity, else ``x``.

    Args:
        x: [...] any tensor (also integer codes); at least 1-D unless ``fmt.granularity`` is tensor.
        fmt: the format whose granularity decides the view.

    Returns:
        A view (or reshaped copy, if x is not contiguous) of x; reshape back with ``.reshape(x.shape)``.

    Raises:
        ValueError: if x is 0-D for a non-tensor granularity, or ``fmt.group_size`` does not divide the last dim.
    """
    gran = fmt.granularity.value
    if gran != "tensor" and x.ndim == 0:
        raise ValueError(f"granularity {gran!r} needs at least a 1-D tensor, got a 0-D one")
    if gran != "group":
        return x
    k, g = x.shape[-1], fmt.group_size
    assert g is not None  # guaranteed by QuantFormat validation
    if k % g:
        raise ValueError(
            f"group_size={g} does not divide the last dim K={k} of a tensor of shape {tuple(x.shape)} "
            f"(format {fmt.name}); pick a group size that divides {k}"
        )
    return x.reshape(*x.shape[:-1], k // g, g)


def _reduce_dims(ndim: int, fmt: QuantFormat) -> tuple[int, ...]:
    """Dims of ``xg`` that share one scale (may be empty: a 1-D tensor with channel granularity)."""
    gran = fmt.granularity.value
    if gran == "tensor":
        return tuple(range(ndim))
    if gran == "channel":
        return tuple(range(1, ndim))
    return (ndim - 1,)  # token: within a row; group: within a group (last dim of the group view)


def _stat_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for the scale math, float64 if any input is float64 (bf16/fp16 would lose scale precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _range(xg: Tensor, fmt: QuantFormat) -> tuple[Tensor, Tensor]:
    """Per-scale-group (min, max) of ``xg``, keepdim shape S, in the stat dtype."""
    dims = _reduce_dims(xg.ndim, fmt)
    dtype = _stat_dtype(xg)
    if not dims:  # every element is its own group; note amin(dim=()) would reduce *all* dims
        return xg.to(dtype), xg.to(dtype)
    lo = xg.amin(dim=dims, keepdim=True).to(dtype)  # min/max are exact in x's dtype: cast after reducing
    hi = xg.amax(dim=dims, keepdim=True).to(dtype)
    return lo, hi


def _scales_from_range(lo: Tensor, hi: Tensor, fmt: QuantFormat, clip_ratio: ClipRatio) -> tuple[Tensor, Tensor | None]:
    """(scale, zero point) from a range; ``clip_ratio`` broadcasts freely here (the search adds a leading dim)."""
    floor = torch.finfo(lo.dtype).tiny
    if isinstance(clip_ratio, Tensor):
        clip_ratio = clip_ratio.to(lo.dtype)
    if fmt.symmetric:
        amax = torch.maximum(-lo, hi)
        return (amax * clip_ratio / fmt.qmax).clamp_min(floor), None
    levels = fmt.qmax - fmt.qmin
    lo = lo.clamp(max=0.0) * clip_ratio  # widen to contain 0: integer zero point, exact zeros
    hi = hi.clamp(min=0.0) * clip_ratio
    # hi/levels - lo/levels instead of (hi - lo)/levels: no overflow when x spans nearly all of float32.
    scale = (hi / levels - lo / levels).clamp_min(floor)
    zero_point = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax)
    return scale, zero_point


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (without enlarging it)."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:  # incompatible sizes
        return False


def _check_clip_ratio(clip_ratio: ClipRatio, stat_shape: torch.Size) -> None:
    if isinstance(clip_ratio, Tensor):
        if not clip_ratio.is_floating_point():
            raise ValueError(f"clip_ratio must be a floating-point tensor, got dtype {clip_ratio.dtype}")
        if not _broadcasts_to(clip_ratio.shape, stat_shape):
            raise ValueError(
                f"clip_ratio of shape {tuple(clip_ratio.shape)} does not broadcast to the scale shape "
                f"{tuple(stat_shape)}; give one ratio per scale (same shape) or a shape that broadcasts to it"
            )
    elif isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be a float in (0, 1] or a tensor, got {clip_ratio!r}")


def _check_scales(xg: Tensor, fmt: QuantFormat, scale: Tensor, zero_point: Tensor | None) -> None:
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        raise ValueError(f"scale must be a floating-point tensor, got {getattr(scale, 'dtype', type(scale))}")
    if not _broadcasts_to(scale.shape, xg.shape):
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not broadcast against the {fmt.granularity.value}-view "
            f"{tuple(xg.shape)} of the input (format {fmt.name})"
        )
    needs_zp = not fmt.symmetric
    if needs_zp and zero_point is None:
        raise ValueError(f"format {fmt.name} is asymmetric: a zero_point is required")
    if not needs_zp and zero_point is not None:
        raise ValueError(f"format {fmt.name} is symmetric: zero_point must be None")
    if zero_point is not None and not _broadcasts_to(zero_point.shape, xg.shape):
        raise ValueError(
            f"zero_point of shape {tuple(zero_point.shape)} does not broadcast against {tuple(xg.shape)} ({fmt.name})"
        )


def _compute_dtype(x: Tensor, scale: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)


def _codes(xg: Tensor, fmt: QuantFormat, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """Quantized values in a float dtype (int codes are integer-valued; fp8 values already rounded to e4m3)."""
    y = xg.to(_compute_dtype(xg, scale)) / scale
    if fmt.is_float:
        # Saturate first: float8_e4m3fn has no inf, an overflowing cast would give NaN.
        return y.clamp(fmt.qmin, fmt.qmax).to(torch.float8_e4m3fn).to(y.dtype)
    q = torch.round(y)  # round half to even
    if zero_point is not None:
        q = q + zero_point
    return q.clamp(fmt.qmin, fmt.qmax)


def _dequant_codes(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    if zero_point is not None:
        q = q - zero_point
    return q * scale


# ---------------------------------------------------------------------------------------------------------------
# public primitives


def compute_scales(x: Tensor, fmt: QuantFormat, clip_ratio: ClipRatio = 1.0) -> tuple[Tensor, Tensor | None]:
    """Min/max ("RTN") scales and zero points of ``x`` for ``fmt``, optionally shrunk by ``clip_ratio``.

    Symmetric (int and fp8): ``scale = clip_ratio * max|x| / qmax``. Asymmetric int: the range [min, max] is
    widened to contain 0, multiplied by ``clip_ratio``, then ``scale = (max - min) / (2^b - 1)`` and
    ``zero_point = -round(min / scale)``. Differentiable w.r.t. a tensor ``clip_ratio`` (not through the
    rounded zero point); pass ``x.detach()`` to keep gradients from flowing through the min/max.

    Args:
        x: [...] floating-point tensor (for group granularity, last dim K divisible by ``fmt.group_size``).
        fmt: target format; its granularity decides which elements share a scale.
        clip_ratio: float in (0, 1], or a tensor broadcasting to S (e.g. per channel ``[N, 1]``, values
            meant to be in (0, 1], e.g. a sigmoid; not checked, to avoid a device sync).

    Returns:
        scale: S, float32 (float64 for float64 x), finite and >= ``finfo.tiny`` for finite x.
        zero_point: S, same dtype, integer-valued in [qmin, qmax] for asymmetric int; None otherwise.

    Raises:
        ValueError: on an empty or non-float x, a group size that does not divide K, or a bad clip_ratio.
    """
    _check_float(x)
    xg = scale_view(x, fmt)
    lo, hi = _range(xg, fmt)
    _check_clip_ratio(clip_ratio, lo.shape)
    return _scales_from_range(lo, hi, fmt, clip_ratio)


def quantize(x: Tensor, fmt: QuantFormat, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    """Quantize ``x`` to ``fmt`` storage with the given scale (and zero point, asymmetric int only).

    Int: ``q = clamp(round_half_even(x / scale) [+ zero_point], qmin, qmax)``; fp8: ``q = fp8(clamp(x / scale,
    -448, 448))``. Not differentiable (see ``fake_quantize_ste``). x must be finite.

    Args:
        x: [...] floating-point tensor.
        fmt: target format.
        scale: S (anything broadcasting against ``scale_view(x, fmt)``), e.g. from ``compute_scales``.
        zero_point: S, required for asymmetric int, None otherwise.

    Returns:
        q: same shape as x, dtype ``fmt.storage_dtype``: int8 (symmetric int, codes in [-(2^(b-1)-1),
        2^(b-1)-1]), uint8 (asymmetric int, codes in [0, 2^b - 1]) or float8_e4m3fn (fp8).
    """
    _check_float(x)
    xg = scale_view(x, fmt)
    _check_scales(xg, fmt, scale, zero_point)
    return _codes(xg, fmt, scale, zero_point).to(fmt.storage_dtype).reshape(x.shape)


def dequantize(
    q: Tensor,
    fmt: QuantFormat,
    scale: Tensor,
    zero_point: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of ``quantize``: ``x_hat = (q [- zero_point]) * scale``, computed in float32 (or wider), cast to dtype.

    Args:
        q: [...] codes with dtype ``fmt.storage_dtype`` (int8 / uint8 / float8_e4m3fn).
        fmt: the format q was quantized with.
        scale: S, broadcasting against ``scale_view(q, fmt)``.
        zero_point: S for asymmetric int, else None.
        dtype: floating dtype of the result.

    Returns:
        x_hat: same shape as q, ``dtype``.
    """
    if not isinstance(q, Tensor) or q.dtype != fmt.storage_dtype:
        raise ValueError(
            f"q must be a tensor of dtype {fmt.storage_dtype} for format {fmt.name}, got {getattr(q, 'dtype', q)}"
        )
    qg = scale_view(q, fmt)
    _check_scales(qg, fmt, scale, zero_point)
    compute = torch.promote_types(scale.dtype, torch.float32)
    return _dequant_codes(qg.to(compute), scale, zero_point).reshape(q.shape).to(dtype)


def fake_quantize(
    x: Tensor,
    fmt: QuantFormat,
    clip_ratio: ClipRatio = 1.0,
    scale: Tensor | None = None,
    zero_point: Tensor | None = None,
) -> Tensor:
    """Quantize-dequantize ``x`` in one step; the result has x's dtype and shape.

    Dynamic quantization (``scale=None``): scales come from x itself via ``compute_scales(x, fmt, clip_ratio)``,
    as for per-token activations at run time. Static quantization: pass precomputed ``scale`` (and
    ``zero_point``), e.g. from a ``MinMaxObserver``; ``clip_ratio`` must then stay 1 (bake clipping into the scale).

    Identical to ``dequantize(quantize(x, ...), ..., dtype=x.dtype)`` but skips the storage cast. Meant for
    evaluation: its gradient is not meaningful, use ``fake_quantize_ste`` for training.

    Args:
        x: [...] floating-point tensor.
        fmt: target format.
        clip_ratio: see ``compute_scales`` (dynamic scales only).
        scale, zero_point: S, static scales; None for dynamic.

    Returns:
        x_hat: same shape and dtype as x.
    """
    _check_float(x)
    xg = scale_view(x, fmt)
    scale, zero_point = _resolve_scales(x, xg, fmt, clip_ratio, scale, zero_point)
    q = _codes(xg, fmt, scale, zero_point)
    return _dequant_codes(q, scale, zero_point).reshape(x.shape).to(x.dtype)


def _resolve_scales(
    x: Tensor,
    xg: Tensor,
    fmt: QuantFormat,
    clip_ratio: ClipRatio,
    scale: Tensor | None,
    zero_point: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without a scale: pass both (static) or neither (dynamic)")
        return compute_scales(x, fmt, clip_ratio)
    if isinstance(clip_ratio, Tensor) or clip_ratio != 1.0:
        raise ValueError("clip_ratio applies to dynamic scales only; with a static scale, bake the clipping into it")
    _check_scales(xg, fmt, scale, zero_point)
    return scale, zero_point


def fake_quantize_ste(
    x: Tensor,
    fmt: QuantFormat,
    clip_ratio: ClipRatio = 1.0,
    scale: Tensor | None = None,
    zero_point: Tensor | None = None,
) -> Tensor:
    """Differentiable fake quantization with a straight-through estimator (STE) for the rounding.

    Forward equals ``fake_quantize`` (bit for bit: the STE trick ``y + (round(y) - y)`` is exact). Backward:

    * w.r.t. x: identity for elements inside the representable range (rounding is treated as identity) and 0
      for elements clipped to qmin/qmax (or +-448 for fp8). Dynamic scales are computed from ``x.detach()``,
      so no gradient reaches x through its own min/max.
    * w.r.t. a tensor ``clip_ratio`` (learnable weight clipping, OmniQuant LWC: e.g. ``sigmoid(param)`` per
      channel, shape ``[N, 1]`` for channel granularity): through the scale, LSQ-style; clipped elements
      contribute ``qmax``-like terms, in-range elements ``round(x/s) - x/s``.
    * w.r.t. a given ``scale`` that requires grad (LSQ learnable step size): the same way.

    Args:
        x: [...] floating-point tensor (may require grad).
        fmt: target format.
        clip_ratio: float in (0, 1] or a tensor broadcasting to S (dynamic scales only).
        scale, zero_point: S, static scales (optional, may require grad); the zero point gets no gradient.

    Returns:
        x_hat: same shape and dtype as x, differentiable.
    """
    _check_float(x)
    xg = scale_view(x, fmt)
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without a scale: pass both (static) or neither (dynamic)")
        scale, zero_point = compute_scales(x.detach(), fmt, clip_ratio)
    else:
        scale, zero_point = _resolve_scales(x, xg, fmt, clip_ratio, scale, zero_point)
    y = xg.to(_compute_dtype(xg, scale)) / scale
    # Clamp *before* rounding so the gradient mask follows x itself: an element is clipped iff x / scale lies
    # outside the grid (clamp passes gradient only inside), and d x_hat / d scale there is the grid end.
    if fmt.is_float:
        y = y.clamp(fmt.qmin, fmt.qmax)
        q = y + (y.to(torch.float8_e4m3fn).to(y.dtype) - y).detach()
    else:
        if zero_point is None:
            y = y.clamp(fmt.qmin, fmt.qmax)
        else:  # grid in units of the scale, relative to the zero point: [qmin - zp, qmax - zp]
            zp = zero_point.detach()
            y = torch.clamp(y, fmt.qmin - zp, fmt.qmax - zp)
        # Rounding commutes with clamping to integer bounds, so the forward equals fake_quantize's
        # clamp(round(x / scale) + zp) - zp without adding zp before rounding (which would move half-even ties).
        q = y + (torch.round(y) - y).detach()
    return (q * scale).reshape(x.shape).to(x.dtype)


def mse_clip_search(
    x: Tensor,
    fmt: QuantFormat,
    grid: int = 100,
    min_ratio: float = 0.5,
    norm: float = 2.0,
    max_elements: int = 1 << 24,
) -> Tensor:
    """Per-scale-group clipping ratio that minimises the quantization error ``sum |x - fake_quantize(x)|^norm``.

    Candidates are ``grid`` evenly spaced ratios from 1 down to ``min_ratio``; ratio 1 (plain min/max) is always
    a candidate, so the result is never worse than no clipping (ties keep the larger ratio). Every group picks
    its own ratio, evaluated for all groups at once. Candidates are processed in chunks of
    ``max(1, max_elements // x.numel())`` so the working set stays around a few times ``max_elements`` floats.

    Complexity: O(grid * x.numel()) time, O(min(grid * x.numel(), max_elements) + x.numel()) memory.
    ``norm=2`` is the MSE; GPTQ uses 2.4. Feed the result to ``compute_scales(x, fmt, clip_ratio=ratio)``.

    Args:
        x: [...] floating-point tensor (e.g. a weight [N, K]); not modified, no gradient.
        fmt: target format.
        grid: number of candidate ratios (>= 1).
        min_ratio: smallest ratio tried, in (0, 1].
        norm: error exponent (> 0).
        max_elements: soft bound on candidates * numel per chunk.

    Returns:
        ratio: S (the shape of ``compute_scales``'s scale), float32 (float64 for float64 x), in [min_ratio, 1].
    """
    _check_float(x)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio!r}")
    if not norm > 0:
        raise ValueError(f"norm must be > 0, got {norm!r}")
    with torch.no_grad():
        xg = scale_view(x.detach(), fmt)
        lo, hi = _range(xg, fmt)
        xc = xg.to(lo.dtype)
        ratios = torch.linspace(1.0, min_ratio, grid, dtype=lo.dtype, device=x.device)
        dims = tuple(d + 1 for d in _reduce_dims(xg.ndim, fmt))  # +1: leading candidate dim
        best_err = torch.full_like(lo, float("inf"))
        best = torch.ones_like(lo)
        chunk = max(1, max_elements // xg.numel())
        for start in range(0, grid, chunk):
            r = ratios[start : start + chunk].view(-1, *([1] * lo.ndim))  # [C, 1, ..., 1]
            scale, zp = _scales_from_range(lo, hi, fmt, r)  # [C, *S]
            err = (_dequant_codes(_codes(xc, fmt, scale, zp), scale, zp) - xc).abs_()
            err = err.square_() if norm == 2.0 else err.pow_(norm)
            if dims:
                err = err.sum(dim=dims, keepdim=True)  # [C, *S]
            chunk_err, idx = err.min(dim=0)  # first minimum: the largest ratio on ties
            better = chunk_err < best_err
            best_err = torch.where(better, chunk_err, best_err)
            best = torch.where(better, r.flatten()[idx], best)
    return best


# ---------------------------------------------------------------------------------------------------------------
# observers: static scales from streaming statistics


class MinMaxObserver:
    """Running min/max of a stream of tensors, turned into static scales; never stores the tensors.

    Which dims are reduced (streamed over) and which are kept (one scale each) per granularity:

    * tensor: everything reduced; scale shape ``[]`` (0-D, broadcasts against any input).
    * channel: dim 0 kept, as for weights [N, ...]; every update must have the same ``x.shape[0]`` and ndim,
      other dims may vary (e.g. chunks along the last dim). Scale ``[N, 1, ..., 1]``.
    * group: inputs are activations [..., K]; all leading (token) dims are reduced, so each group of G
      consecutive channels gets one scale shared by all tokens. Scale ``[K/G, 1]``, broadcasting against
      ``scale_view(x, fmt)``; K must stay the same across updates.
    * token: rejected. A per-token scale is a function of that token's own values, and the tokens at inference
      are not the calibration tokens (their number and content change with every input and frame count), so
      there is nothing static to record: quantize tokens dynamically (``fake_quantize(x, fmt)``).

    Example::

        obs = MinMaxObserver(parse_format("int8-sym-tensor"))
        for batch in calibration: obs.update(activation(batch))
        scale, zero_point = obs.calculate()
        x_hat = fake_quantize(x, fmt, scale=scale, zero_point=zero_point)
    """

    def __init__(self, fmt: QuantFormat) -> None:
        if not isinstance(fmt, QuantFormat):
            raise TypeError(f"fmt must be a QuantFormat, got {type(fmt).__name__}")
        if fmt.granularity.value == "token":
            raise ValueError(
                f"a static per-token observer is not possible (format {fmt.name}): per-token scales depend on each "
                "token's own values and tokens differ at inference; use dynamic per-token quantization "
                "(fake_quantize without a scale), or a tensor/channel/group observer for static scales"
            )
        self.fmt = fmt
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None
        self.num_updates = 0

    def reset(self) -> None:
        """Forget all statistics."""
        self.min_val = self.max_val = None
        self.num_updates = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold ``x`` into the running min/max (per the granularity rules in the class docstring).

        Args:
            x: [...] floating-point tensor; channel: [N, ...]; group: [..., K] with K divisible by G.
        """
        _check_float(x)
        xg = scale_view(x.detach(), self.fmt)
        gran = self.fmt.granularity.value
        dtype = _stat_dtype(xg)
        if gran == "tensor":
            lo, hi = torch.aminmax(xg)
        elif gran == "channel":
            lo, hi = torch.aminmax(xg.reshape(xg.shape[0], -1), dim=1)
            lo, hi = (t.view(-1, *([1] * (xg.ndim - 1))) for t in (lo, hi))
        else:  # group: [..., K/G, G] -> [K/G, 1]
            flat = xg.reshape(-1, *xg.shape[-2:])
            lo, hi = flat.amin(dim=(0, 2)).unsqueeze(-1), flat.amax(dim=(0, 2)).unsqueeze(-1)
        lo, hi = lo.to(dtype), hi.to(dtype)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            if lo.shape != self.min_val.shape:
                raise ValueError(
                    f"{self.fmt.name} observer: this update gives statistics of shape {tuple(lo.shape)}, earlier "
                    f"ones {tuple(self.min_val.shape)} (channel keeps dim 0 and ndim; group keeps K)"
                )
            self.min_val = torch.minimum(self.min_val, lo.to(self.min_val.dtype))
            self.max_val = torch.maximum(self.max_val, hi.to(self.max_val.dtype))
        self.num_updates += 1

    def calculate(self, clip_ratio: ClipRatio = 1.0) -> tuple[Tensor, Tensor | None]:
        """Static (scale, zero_point) from the statistics so far, exactly as ``compute_scales`` would from them.

        Args:
            clip_ratio: float in (0, 1] or a tensor broadcasting to the scale shape.

        Returns:
            scale: the observer's scale shape (see class docstring), finite and > 0.
            zero_point: same shape for asymmetric int, else None.
        """
        if self.min_val is None or self.max_val is None:
            raise ValueError(f"{self.fmt.name} observer has no statistics yet: call update() first")
        _check_clip_ratio(clip_ratio, self.min_val.shape)
        return _scales_from_range(self.min_val, self.max_val, self.fmt, clip_ratio)

    def __repr__(self) -> str:
        shape = None if self.min_val is None else tuple(self.min_val.shape)
        return f"MinMaxObserver({self.fmt.name}, updates={self.num_updates}, stat_shape={shape})"
