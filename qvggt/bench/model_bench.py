"""End-to-end model benchmark: latency, frames/s, peak memory, weight bytes and fidelity per configuration.

On CUDA: median of CUDA-event timings after warm-up, peak memory by ``torch.cuda.max_memory_allocated`` (weights
included), one fresh model per configuration so peaks do not mix. Fidelity: relative L2 error of depth, world points
and pose encoding against the fp32 model on the same inputs (at ``fidelity_frames``). Without CUDA the same code
times the CPU reference path (twins) with wall-clock time and says so.

What runs, in which order, is a plan: a list of (config, frame counts) steps, one model build per step
(``config_major_plan``: each config once, all its frame counts; ``qvggt.bench.run`` puts the headline measurements
first). A config met again in a later step is rebuilt; its fidelity is measured once (``fidelity_cache``).
Engine configs also record what their CUDA-graph cache did during each measurement (``ModelResult.graphs``:
captures, replays, eager calls and the reason of every eagerly run input shape), so a silent fallback to eager
launches shows in the results instead of only in a log line.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from qvggt.bench.configs import BenchConfig, build_config_model
from qvggt.bench.report import graph_mode
from qvggt.engine import Engine, kernel_call_counts, reset_kernel_call_counts
from qvggt.model.vggt import VGGT

__all__ = [
    "FidelityReference",
    "ModelResult",
    "Plan",
    "bench_models",
    "config_major_plan",
    "fidelity_reference",
    "forward_fn",
]

Plan = list[tuple[BenchConfig, list[int]]]  # (config, frame counts) steps, in order


@dataclass
class ModelResult:
    """One (config, frames) measurement; ``error`` is set instead of numbers when the run failed (e.g. OOM)."""

    config: str
    frames: int
    height: int
    width: int
    device: str
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    frames_per_s: float | None = None
    peak_gb: float | None = None
    weight_gb: float | None = None
    fidelity: dict[str, float] | None = None
    kernels: dict[str, dict[str, int]] | None = None
    # Engine configs: the CUDA-graph cache during this measurement (captures / replays / eager calls / evictions)
    # and "fallbacks": every input shape of this model that ran eagerly so far -> why (None for published).
    graphs: dict | None = None
    error: str | None = None


@dataclass
class FidelityReference:
    """The fp32 model's outputs on the fidelity images, computed once and shared by every config."""

    images: Tensor
    outputs: dict[str, Tensor]


def forward_fn(model: VGGT | Engine) -> Callable[[Tensor], dict]:
    """The inference call of a configuration's model: the published recipe for a plain VGGT, else the engine."""
    if isinstance(model, Engine):
        return model

    def published(images: Tensor) -> dict:
        with torch.inference_mode():
            return model(images, dtype=torch.bfloat16, keep_all_layers=True, frames_chunk_size=8)

    return published


def _weight_bytes(model: VGGT | Engine) -> int:
    if isinstance(model, Engine):
        return model.weight_nbytes()
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _images(frames: int, height: int, width: int, device: torch.device, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, frames, 3, height, width, generator=gen).to(device)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _fidelity(pred: dict, ref: dict) -> dict[str, float]:
    keys = [k for k in ("depth", "world_points", "pose_enc") if k in pred and k in ref]
    return {f"rel_l2_{k}": _rel(pred[k].cpu(), ref[k]) for k in keys}


def _iters_for(frames: int, device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return 0, 1
    return (2, 10) if frames <= 8 else ((1, 5) if frames <= 32 else (1, 3))


def config_major_plan(configs: list[BenchConfig], frames: list[int]) -> Plan:
    """Each config once, with every frame count (one model build per config)."""
    return [(c, list(frames)) for c in configs]


def fidelity_reference(
    master: VGGT, frames: int, height: int, width: int, device: torch.device, seed: int = 0,
    log: Callable[[str], None] = print,
) -> FidelityReference:  # fmt: skip
    """The fp32 model's outputs on ``frames`` seeded images (on the CPU), the fidelity reference of every config."""
    log(f"fp32 reference at {frames} frames for fidelity")
    ref_model = build_config_model(master, BenchConfig("fp32", False), device)
    images = _images(frames, height, width, device, seed)
    with torch.inference_mode():
        ref = {k: v.float().cpu() for k, v in ref_model(images).items() if isinstance(v, Tensor)}
    del ref_model
    _free(device)
    return FidelityReference(images, ref)


def bench_models(
    master: VGGT,
    configs: list[BenchConfig],
    frames: list[int],
    height: int,
    width: int,
    device: torch.device,
    fidelity_frames: int = 8,
    seed: int = 0,
    log: Callable[[str], None] = print,
    jsonl: Path | None = None,
    *,
    plan: Plan | None = None,
    reference: FidelityReference | None = None,
    fidelity_cache: dict[str, dict[str, float] | None] | None = None,
) -> Iterator[ModelResult]:
    """Benchmark each config at each frame count; yields results as they come (and appends them to ``jsonl``).

    ``master`` is a float32 model on the CPU; each step of the plan gets its own device copy, freed before the next.

    Args:
        plan: (config, frame counts) steps in order; default ``config_major_plan(configs, frames)``.
        reference: the fp32 outputs for fidelity (``fidelity_reference``); computed here at ``fidelity_frames``
            when None.
        fidelity_cache: config name -> fidelity, filled here; a config already in it skips its fidelity run
            (pass the same dict to several calls whose plans rebuild a config).
    """
    plan = config_major_plan(configs, frames) if plan is None else plan
    if not plan:
        return
    if reference is None:
        reference = fidelity_reference(master, fidelity_frames, height, width, device, seed, log)
    cache: dict[str, dict[str, float] | None] = {} if fidelity_cache is None else fidelity_cache

    for config, step_frames in plan:
        if not step_frames:
            continue
        log(f"building {config.name} (frames {', '.join(map(str, step_frames))})")
        try:
            model = build_config_model(master, config, device)
        except Exception as exc:  # noqa: BLE001  (one config failing must not lose the others' numbers)
            for n in step_frames:
                yield _emit(ModelResult(config.name, n, height, width, str(device), error=repr(exc)), jsonl, log)
            _free(device)
            continue
        fn = forward_fn(model)
        weight_gb = _weight_bytes(model) / 1e9
        if config.name not in cache:
            cache[config.name] = None
            try:
                with torch.inference_mode():
                    pred = fn(reference.images)
                cache[config.name] = _fidelity(pred, reference.outputs)
                del pred
            except Exception as exc:  # noqa: BLE001
                log(f"{config.name}: fidelity run failed: {exc!r}")
        fidelity = cache[config.name]
        for n in step_frames:
            res = ModelResult(config.name, n, height, width, str(device), weight_gb=weight_gb, fidelity=fidelity)
            _measure(res, fn, _images(n, height, width, device, seed + n), device, model)
            _free(device)
            yield _emit(res, jsonl, log)
        del model, fn
        _free(device)


def _graph_stats(model: object) -> dict | None:
    return model.graph_stats().as_dict() if isinstance(model, Engine) else None


def _graph_delta(before: dict | None, after: dict | None) -> dict | None:
    """Counts during one measurement (after - before) and every fallback reason recorded so far."""
    if before is None or after is None:
        return None
    out = {k: after[k] - before[k] for k in ("captures", "replays", "eager", "evictions")}
    out["fallbacks"] = after["fallbacks"]
    return out


def _measure(
    res: ModelResult, fn: Callable[[Tensor], dict], images: Tensor, device: torch.device, model: object = None
) -> None:
    """Fill ``res`` with timings, peak memory, kernel counts and (engines) CUDA-graph counts of ``fn(images)``;
    failures go to ``res.error``."""
    warmup, iters = _iters_for(res.frames, device)
    before = _graph_stats(model)
    try:
        reset_kernel_call_counts()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        res.times_ms = _time(lambda: fn(images), device, warmup, iters)
        res.median_ms = statistics.median(res.times_ms)
        res.frames_per_s = res.frames / (res.median_ms / 1e3)
        if device.type == "cuda":
            res.peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
        res.kernels = kernel_call_counts()
    except torch.OutOfMemoryError as exc:
        res.error = f"out of memory: {str(exc).splitlines()[0]}"
    except Exception as exc:  # noqa: BLE001  (one failing size must not lose the others' numbers)
        res.error = repr(exc)
    res.graphs = _graph_delta(before, _graph_stats(model))


def _emit(res: ModelResult, jsonl: Path | None, log: Callable[[str], None]) -> ModelResult:
    if res.error:
        log(f"{res.config:>16} {res.frames:>4} frames: FAILED {res.error[:200]}")
    else:
        log(f"{res.config:>16} {res.frames:>4} frames: {res.median_ms:9.1f} ms  {res.frames_per_s:7.1f} fr/s  "
            f"peak {res.peak_gb or 0:6.2f} GB  weights {res.weight_gb:5.2f} GB  {graph_mode(res.graphs)}")  # fmt: skip
    if jsonl is not None:
        with open(jsonl, "a") as f:  # append-only log: partial results survive a killed run
            f.write(json.dumps(asdict(res)) + "\n")
    return res


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
