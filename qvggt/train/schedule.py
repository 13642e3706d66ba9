"""The learning-rate schedule of ``qvggt train`` and of the stress model's fine-tune: linear warm-up, cosine decay,
and an optional warm restart."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(
    step: int,
    steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
    restart_step: int | None = None,
    restart_lr_ratio: float = 1.0,
) -> float:
    """Factor of the base learning rate at ``step``: linear warm-up to 1 over ``warmup_steps``, then a cosine to
    ``min_lr_ratio`` at ``steps``. With ``restart_step`` the cosine ends there instead, and a second one runs from
    ``restart_lr_ratio`` down to ``min_lr_ratio`` at ``steps`` (a warm restart). Past ``steps`` it stays at the
    floor."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if restart_step is None or step < restart_step:
        end, start, peak = restart_step or steps, warmup_steps, 1.0
    else:
        end, start, peak = steps, restart_step, restart_lr_ratio
    progress = min(1.0, (step - start) / max(1, end - start))
    return min_lr_ratio + (peak - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
