"""Special-token rows: the camera and register tokens' activations quantized apart from the patch tokens'.

VGGT prepends ``patch_start_idx`` special tokens (1 camera + 4 register) to each frame's P tokens. They carry the
massive outlier channels that make VGGT hard to quantize (QuantVGGT's motivation), and the camera head reads the
camera token alone, so a 4-bit grid on those rows costs most of the pose accuracy. quantvggt therefore quantizes
their activation rows on a finer grid (``QuantVGGTConfig.special_token_abits``, 8 bits by default) with their own
per-token scales, while patch rows keep the layer's format.

Row rule: flatten an activation to [M, K] (all leading dims, in memory order); row r is special iff
``r % period < count`` with period = P (tokens per frame) and count = ``patch_start_idx``. It holds for frame
blocks ([B*S, P, C]) and global blocks ([B, S*P, C]) alike, because every sequence length is a multiple of P.

P depends on the image size, so it is set at run time: ``install_token_period_hook`` puts a forward pre-hook on the
aggregator that writes ``token_period = P`` on every module under it that has that attribute (``QuantLinear``; the
engine's fused blocks). On the engine an int4-grid activation is already stored as int8 codes, so an 8-bit special
row changes only its qmax: same tensor, same GEMM, no cost.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qvggt.quant.formats import Granularity, QuantFormat

__all__ = [
    "TOKEN_PERIOD_HOOK",
    "fake_quantize_rows",
    "install_token_period_hook",
    "special_format",
    "special_row_mask",
    "tokens_per_frame",
]

TOKEN_PERIOD_HOOK = "_qvggt_token_period_hook"


def special_format(act_fmt: QuantFormat, bits: int) -> QuantFormat:
    """The special rows' format: ``act_fmt`` (per token) with ``bits`` bits, symmetric."""
    if act_fmt.granularity is not Granularity.TOKEN:
        raise ValueError(
            f"special-token rows need per-token activation scales; the activation format is {act_fmt.name} "
            "(use a per-token activation format, or special_token_abits=None)"
        )
    return QuantFormat("int", bits, True, Granularity.TOKEN)


def special_row_mask(rows: int, period: int, count: int, device: torch.device | str | None = None) -> Tensor:
    """Bool [rows]: True for the special rows (``r % period < count``)."""
    if period <= 0 or not 0 <= count <= period:
        raise ValueError(f"special rows need 0 <= count <= period and period > 0, got count={count}, period={period}")
    return torch.arange(rows, device=device) % period < count


def fake_quantize_rows(
    x: Tensor, fmt: QuantFormat, special_fmt: QuantFormat, period: int, count: int, quantize: Any
) -> Tensor:
    """``quantize(rows, fmt)`` on the patch rows of ``x`` and ``quantize(rows, special_fmt)`` on the special rows.

    ``quantize`` is ``fake_quantize`` or ``fake_quantize_ste`` (per-token formats: rows are independent, so the
    split changes nothing but the grid of the special rows). Returns x's shape and dtype.
    """
    x2 = x.reshape(-1, x.shape[-1])
    mask = special_row_mask(x2.shape[0], period, count, x.device)
    out = torch.empty_like(x2)
    out[~mask] = quantize(x2[~mask], fmt)
    out[mask] = quantize(x2[mask], special_fmt)
    return out.reshape(x.shape)


def tokens_per_frame(aggregator: nn.Module, images: Tensor) -> int:
    """P for ``images`` [B, S, 3, H, W]: special tokens + patches."""
    p = aggregator.cfg.patch_size
    h, w = images.shape[-2:]
    return int(aggregator.patch_start_idx) + (h // p) * (w // p)


def install_token_period_hook(model: nn.Module) -> None:
    """Make ``model.aggregator`` set ``token_period`` on its modules before each forward (idempotent)."""
    agg = getattr(model, "aggregator", None)
    if agg is None:
        raise ValueError(f"{type(model).__name__} has no aggregator: special-token rows need VGGT's token layout")
    if getattr(agg, TOKEN_PERIOD_HOOK, None) is not None:
        return

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        images = args[0] if args else kwargs["images"]
        period = tokens_per_frame(module, images)
        for m in module.modules():
            if hasattr(m, "token_period"):
                m.token_period = period

    setattr(agg, TOKEN_PERIOD_HOOK, agg.register_forward_pre_hook(hook, with_kwargs=True))
