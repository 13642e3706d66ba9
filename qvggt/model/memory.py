"""Peak-memory estimate of a VGGT forward pass, counted on the meta device (no memory, no compute).

Every tensor an operator creates is counted from its creation until the last Python reference to its storage
dies; the peak of that live total plus the weights is the estimate. Attention is counted as a fused
(flash-style) kernel: its output plus a float32 log-sum-exp per query, never the S*P x S*P score matrix.
It is an estimate: allocator rounding, fragmentation, cuBLAS/cuDNN workspaces and CUDA context are not counted.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from qvggt.model.checkpoint import build_model
from qvggt.model.config import VGGTConfig


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of live tensor storages created inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= self._sizes.pop(key)
            del self._refs[key]

    def track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self._refs:
            self._refs[key] = 0
            self._sizes[key] = t.untyped_storage().nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class _FlashAttention(TorchFunctionMode):
    """Replaces SDPA by its fused-kernel footprint: output like v, plus a float32 log-sum-exp [B, h, N]."""

    def __init__(self, counter: _LiveBytes) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            lse_bytes = q.shape[:-1].numel() * 4
            # The log-sum-exp lives only during the kernel: account for it at the peak, then drop it.
            self.counter.peak = max(self.counter.peak, self.counter.live + lse_bytes)
            return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=v.dtype, device=v.device)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class MemoryEstimate:
    frames: int
    height: int
    width: int
    dtype: str
    keep_all_layers: bool
    weight_bytes: int
    activation_peak_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_peak_bytes


def estimate_peak_memory(
    cfg: VGGTConfig,
    frames: int,
    height: int,
    width: int,
    dtype: torch.dtype = torch.float32,
    keep_all_layers: bool = False,
    frames_chunk_size: int = 8,
) -> MemoryEstimate:
    """Estimate the peak memory of one inference forward (camera, depth and point heads; no tracks).

    dtype: the dtype weights and activations are held in (float32, or bfloat16 for a pure-bf16 model).
    """
    model = build_model(cfg.replace(enable_track=False), "meta").to(dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    images = torch.empty(1, frames, 3, height, width, device="meta", dtype=dtype)
    counter = _LiveBytes()
    with torch.no_grad(), _FlashAttention(counter), counter:
        out = model(images, keep_all_layers=keep_all_layers, frames_chunk_size=frames_chunk_size)
        del out
    return MemoryEstimate(
        frames, height, width, str(dtype).removeprefix("torch."), keep_all_layers, weight_bytes, counter.peak
    )
