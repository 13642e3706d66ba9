"""CUDA out-of-memory as a retryable fault with a smaller chunk: the same work again on fewer frames, instead of a
plain retry (which would run out of memory again) or a failure (the smaller sizes still answer the question)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

__all__ = ["retry_smaller_on_oom"]

T = TypeVar("T")


def retry_smaller_on_oom(
    run: Callable[[list[int]], T], sizes: Sequence[int], log: Callable[[str], None] = print
) -> tuple[T, list[int]]:
    """``run(sizes)``; on ``torch.cuda.OutOfMemoryError`` free the cached blocks, cap every size at half the largest
    and try again, down to 1. Returns (result, the sizes that fit). Any other error propagates at once; an OOM at
    size 1 too is re-raised (nothing smaller to try)."""
    current = sorted({int(s) for s in sizes})
    if not current or current[0] < 1:
        raise ValueError(f"sizes must be positive integers, got {list(sizes)}")
    while True:
        try:
            return run(current), current
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            largest = current[-1]
            if largest <= 1:
                raise
            current = sorted({min(s, largest // 2) for s in current})
            log(f"NOTICE: CUDA out of memory at {largest} frames: retrying with {current}")
