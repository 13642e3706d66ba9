"""CUDA graphs of the engine's forward, one per input shape, with an eager fallback that says why.

At 1-8 frames VGGT's forward is hundreds of small kernel launches (per block: two quantization kernels, four GEMMs,
the RoPE pass, attention; then the heads), so the CPU's launch overhead, not the GPU, sets the latency. A CUDA graph
records the launches once and replays them with one call. Graphs fix every tensor address and shape, so:

* one graph per input signature (shape, dtype, device of each input): the first call with a new signature warms
  up (Triton compiles, cuDNN picks its kernels) on a side stream, then captures; later calls copy the inputs into
  the graph's static input buffers and replay;
* replays overwrite the graph's static outputs, so callers get clones (a later call must not change an earlier
  result);
* at most ``max_shapes`` graphs are kept (least recently used evicted), all sharing one memory pool: a graph's
  intermediates are dead between replays, so captures reuse each other's memory and only static inputs and outputs
  stay resident;
* launch counters (the kernels' ``KERNEL_CALLS`` / ``FALLBACK_CALLS``) are Python-side and a replay runs no
  Python, so the cache adds the captured forward's launches to them on every replay: they keep counting launches;
* plain Python values the forward hands to kernels are recorded as they were at capture. The one that varies is
  ``FusedBlock.token_period`` (tokens per frame, for special-token rows), which the aggregator's pre-hook derives
  from the image size: a function of the input shape, so the shape key keeps it valid;
* where capture is impossible (CPU tensors, graphs disabled, capture already under way, or the capture itself
  raising, e.g. an op that synchronises with the host) the call runs eagerly, and the reason is logged once per
  signature (``qvggt.engine`` logger) and kept in ``GraphCache.fallbacks``.

The graph backend is a parameter so the cache logic (keys, LRU, static buffers, cloned outputs, fallbacks) runs
on CPU in tests with ``StaticBufferBackend``, which recomputes eagerly on "replay" and writes into the static
outputs as a graph would; ``CudaGraphBackend`` does the real capture and runs only on a GPU.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["CudaGraphBackend", "GraphCache", "GraphStats", "StaticBufferBackend", "describe_key", "graph_key"]

log = logging.getLogger("qvggt.engine")

GraphKey = tuple[Any, ...]


def graph_key(args: tuple[Tensor | None, ...]) -> GraphKey:
    """The signature a graph is valid for: (shape, dtype, device) of each tensor argument, None kept as None."""
    return tuple(None if a is None else (tuple(a.shape), a.dtype, str(a.device)) for a in args)


def describe_key(key: GraphKey) -> str:
    """A signature as short text for reports and JSON, e.g. ``[1, 32, 3, 392, 518] bfloat16 cuda:0; None``."""
    parts = []
    for item in key:
        if item is None:
            parts.append("None")
        else:
            shape, dtype, device = item
            parts.append(f"{list(shape)} {str(dtype).removeprefix('torch.')} {device}")
    return "; ".join(parts)


class Replay(Protocol):
    """A captured call: ``replay()`` recomputes the outputs from the current contents of the static inputs."""

    def replay(self) -> None: ...


class GraphBackend(Protocol):
    """``impossible(args)``: why these inputs cannot be graphed, or None. ``capture(fn, static)``: record ``fn`` on
    the static inputs, returning (replayable, static outputs, valid after a replay). May raise: then eager.
    ``replay_runs_python``: whether a replay calls ``fn`` again (then launch counters advance by themselves)."""

    replay_runs_python: bool

    def impossible(self, args: tuple[Tensor | None, ...]) -> str | None: ...

    def capture(self, fn: Callable[..., Any], static: tuple[Tensor | None, ...]) -> tuple[Replay, Any]: ...


class CudaGraphBackend:
    """Real CUDA graphs (``torch.cuda.CUDAGraph``), captured after ``warmup`` eager runs on a side stream."""

    replay_runs_python = False  # a replay relaunches the recorded kernels without calling their launchers

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self._pools: dict[torch.device, Any] = {}

    def impossible(self, args: tuple[Tensor | None, ...]) -> str | None:
        devices = {a.device for a in args if a is not None}
        if any(d.type != "cuda" for d in devices):
            return f"inputs on {sorted(str(d) for d in devices)}: CUDA graphs need CUDA tensors"
        if len(devices) != 1:
            return f"inputs on several devices {sorted(str(d) for d in devices)}"
        if torch.cuda.is_current_stream_capturing():
            return "a CUDA graph capture is already under way on this stream (nested capture)"
        return None

    def pool(self, device: torch.device) -> Any:
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        return self._pools[device]

    def capture(self, fn: Callable[..., Any], static: tuple[Tensor | None, ...]) -> tuple[Replay, Any]:
        device = next(a.device for a in static if a is not None)
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compiles, cuDNN / cuBLAS set up their workspaces
                for _ in range(self.warmup):
                    fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool(device)):  # records the launches, runs nothing
                out = fn(*static)
        return graph, out


class _EagerReplay:
    def __init__(self, fn: Callable[..., Any], static: tuple[Tensor | None, ...], out: Any) -> None:
        self.fn, self.static, self.out = fn, static, out

    def replay(self) -> None:
        fresh, _ = tree_flatten(self.fn(*self.static))
        for dst, src in zip(tree_flatten(self.out)[0], fresh, strict=True):
            if isinstance(dst, Tensor):
                dst.copy_(src)


class StaticBufferBackend:
    """A graph stand-in for any device (tests on CPU): "replay" recomputes eagerly from the static inputs and
    writes into the static outputs, so the cache sees exactly a graph's buffer semantics."""

    replay_runs_python = True  # launchers run (and count themselves) on every replay

    def impossible(self, args: tuple[Tensor | None, ...]) -> str | None:
        return None

    def capture(self, fn: Callable[..., Any], static: tuple[Tensor | None, ...]) -> tuple[Replay, Any]:
        out = fn(*static)
        return _EagerReplay(fn, static, out), out


@dataclass
class _Entry:
    static: tuple[Tensor | None, ...]
    runner: Replay
    out: Any
    launches: list[tuple[int, str, int]]  # (counter dict index, key, launches per forward) recorded at capture


Counters = Callable[[], list[dict[str, int]]]


def _snapshot(counters: Counters | None) -> list[dict[str, int]]:
    return [] if counters is None else [dict(c) for c in counters()]


@dataclass
class GraphStats:
    """What the cache did: captures, replays, eager calls, evictions."""

    captures: int = 0
    replays: int = 0
    eager: int = 0
    evictions: int = 0
    fallbacks: dict[GraphKey, str] = field(default_factory=dict)  # signature -> why it runs eagerly

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts, with each eagerly run signature described as text (``describe_key``) -> its reason."""
        return {
            "captures": self.captures,
            "replays": self.replays,
            "eager": self.eager,
            "evictions": self.evictions,
            "fallbacks": {describe_key(k): reason for k, reason in self.fallbacks.items()},
        }


def _clone(out: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, out)


class GraphCache:
    """Call ``fn(*args)`` through a per-signature graph (module docstring).

    Args:
        fn: a function of tensors (or None) returning a pytree (dict / list / tuple) of tensors and plain values. It
            must depend on its inputs only through their values and signature (no data-dependent Python control
            flow), as any CUDA-graphed function.
        enabled: False runs every call eagerly (reason logged once).
        max_shapes: graphs kept at most (least recently used evicted first).
        backend: ``CudaGraphBackend()`` (default) or ``StaticBufferBackend()``.
        counters: returns the live launch-counter dicts to advance on each replay by the launches the captured
            forward made (None: no counters).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        enabled: bool = True,
        max_shapes: int = 4,
        backend: GraphBackend | None = None,
        counters: Counters | None = None,
    ) -> None:
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.fn, self.enabled, self.max_shapes = fn, enabled, max_shapes
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.counters = counters
        self._entries: OrderedDict[GraphKey, _Entry] = OrderedDict()
        self._failed: set[GraphKey] = set()  # signatures whose capture raised: eager from then on
        self.stats = GraphStats()

    @property
    def fallbacks(self) -> dict[GraphKey, str]:
        return self.stats.fallbacks

    def keys(self) -> list[GraphKey]:
        """Signatures with a live graph, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        """Drop every graph and recorded fallback (e.g. after the model moved: graphs hold old addresses)."""
        self._entries.clear()
        self._failed.clear()
        self.stats.fallbacks.clear()

    def _eager(self, key: GraphKey, reason: str, level: int = logging.INFO) -> Any:
        if key not in self.stats.fallbacks:
            self.stats.fallbacks[key] = reason
            log.log(level, "CUDA graph not used for inputs %s, running eagerly: %s", key, reason)
        self.stats.eager += 1
        return None

    def __call__(self, *args: Tensor | None) -> Any:
        key = graph_key(args)
        reason = "disabled (EngineOptions.cuda_graphs=False)" if not self.enabled else self.backend.impossible(args)
        if reason is None and key in self._failed:
            reason = self.stats.fallbacks[key]
        if reason is not None:
            self._eager(key, reason)
            return self.fn(*args)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(key, args)
            if entry is None:
                return self.fn(*args)
        self._entries.move_to_end(key)
        for dst, src in zip(entry.static, args, strict=True):
            if dst is not None:
                dst.copy_(src)
        entry.runner.replay()  # also right after capture: capturing runs nothing
        self.stats.replays += 1
        if entry.launches and not self.backend.replay_runs_python:
            live = self.counters()  # type: ignore[misc]
            for i, name, n in entry.launches:
                live[i][name] = live[i].get(name, 0) + n
        return _clone(entry.out)

    def _capture(self, key: GraphKey, args: tuple[Tensor | None, ...]) -> _Entry | None:
        static = tuple(None if a is None else a.clone() for a in args)
        counted: list[list[dict[str, int]]] = []

        def fn(*a: Tensor | None) -> Any:  # the last call the backend makes is the captured one
            before = _snapshot(self.counters)
            out = self.fn(*a)
            counted[:] = [before, _snapshot(self.counters)]
            return out

        try:
            runner, out = self.backend.capture(fn, static)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this signature eagerly
            self._failed.add(key)
            self.stats.fallbacks.pop(key, None)  # the failure is the reason from now on
            self._eager(key, f"capture failed: {type(exc).__name__}: {exc}", logging.WARNING)
            if any(a is not None and a.is_cuda for a in args):
                torch.cuda.synchronize()  # let the aborted capture's stream drain before the eager run
            return None
        while len(self._entries) >= self.max_shapes:
            self._entries.popitem(last=False)
            self.stats.evictions += 1
        launches = []
        if counted:
            before, after = counted
            launches = [(i, k, n - before[i].get(k, 0)) for i, d in enumerate(after) for k, n in d.items()]
            launches = [x for x in launches if x[2] > 0]
            if self.counters is not None and not self.backend.replay_runs_python:
                # A CUDA capture records its launches without running them: only the replays count them.
                live = self.counters()
                for i, k, n in launches:
                    live[i][k] -= n
        entry = _Entry(static, runner, out, launches)
        self._entries[key] = entry
        self.stats.captures += 1
        return entry
