"""CUDA out-of-memory is retried with smaller frame counts (the benchmark step's policy); other errors are not."""

from __future__ import annotations

import pytest
import torch

from qvggt.pipeline.oom import retry_smaller_on_oom


class _Device:
    """A stand-in for a GPU with room for ``capacity`` frames: raises the real CUDA OOM error type beyond it."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.calls = capacity, []

    def __call__(self, sizes: list[int]) -> dict[int, int]:
        self.calls.append(list(sizes))
        if max(sizes) > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {max(sizes)} frames")
        return {s: s * s for s in sizes}


def test_oom_halves_the_largest_size_until_it_fits() -> None:
    device, notices = _Device(capacity=10), []
    result, sizes = retry_smaller_on_oom(device, [32, 8], log=notices.append)
    assert sizes == [8] and result == {8: 64}
    assert device.calls == [[8, 32], [8, 16], [8]]
    assert len(notices) == 2 and "out of memory at 32 frames" in notices[0]


def test_oom_even_at_one_frame_is_raised() -> None:
    with pytest.raises(torch.cuda.OutOfMemoryError):
        retry_smaller_on_oom(_Device(capacity=0), [4], log=lambda _m: None)


def test_other_errors_are_not_retried() -> None:
    calls = []

    def broken(sizes: list[int]) -> None:
        calls.append(sizes)
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        retry_smaller_on_oom(broken, [8])
    assert calls == [[8]]
    with pytest.raises(ValueError, match="positive"):
        retry_smaller_on_oom(broken, [0])
