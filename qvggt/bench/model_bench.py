"""End-to-end model benchmark: latency, frames/s, peak memory, weight bytes and fidelity per configuration.

On CUDA: median of CUDA-event timings after warm-up, peak memory by ``torch.cuda.max_memory_allocated`` (weights
included), one fresh model per configuration so peaks do not mix. Fidelity: relative L2 error of depth, world points
and pose encoding against the fp32 model on the same inputs (at ``fidelity_frames``). Without CUDA the same code
times the CPU reference path (twins) with wall-clock time and says so.
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
from qvggt.engine import Engine, kernel_call_counts, reset_kernel_call_counts
from qvggt.model.vggt import VGGT

__all__ = ["ModelResult", "bench_models", "forward_fn"]


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
    error: str | None = None


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
) -> Iterator[ModelResult]:
    """Benchmark each config at each frame count; yields results as they come (and appends them to ``jsonl``).

    ``master`` is a float32 model on the CPU; each config gets its own device copy, freed before the next.
    """
    log(f"fp32 reference at {fidelity_frames} frames for fidelity")
    ref_model = build_config_model(master, BenchConfig("fp32", False), device)
    fid_images = _images(fidelity_frames, height, width, device, seed)
    with torch.inference_mode():
        ref = {k: v.float().cpu() for k, v in ref_model(fid_images).items() if isinstance(v, Tensor)}
    del ref_model
    _free(device)

    for config in configs:
        log(f"building {config.name}")
        try:
            model = build_config_model(master, config, device)
        except Exception as exc:  # noqa: BLE001  (one config failing must not lose the others' numbers)
            for n in frames:
                yield _emit(ModelResult(config.name, n, height, width, str(device), error=repr(exc)), jsonl, log)
            continue
        fn = forward_fn(model)
        weight_gb = _weight_bytes(model) / 1e9
        fidelity = None
        try:
            with torch.inference_mode():
                pred = fn(fid_images)
            fidelity = _fidelity(pred, ref)
        except Exception as exc:  # noqa: BLE001
            log(f"{config.name}: fidelity run failed: {exc!r}")
        for n in frames:
            res = ModelResult(config.name, n, height, width, str(device), weight_gb=weight_gb, fidelity=fidelity)
            _measure(res, fn, _images(n, height, width, device, seed + n), device)
            _free(device)
            yield _emit(res, jsonl, log)
        del model, fn
        _free(device)


def _measure(res: ModelResult, fn: Callable[[Tensor], dict], images: Tensor, device: torch.device) -> None:
    """Fill ``res`` with timings, peak memory and kernel counts of ``fn(images)``; failures go to ``res.error``."""
    warmup, iters = _iters_for(res.frames, device)
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


def _emit(res: ModelResult, jsonl: Path | None, log: Callable[[str], None]) -> ModelResult:
    if res.error:
        log(f"{res.config:>16} {res.frames:>4} frames: FAILED {res.error[:200]}")
    else:
        log(f"{res.config:>16} {res.frames:>4} frames: {res.median_ms:9.1f} ms  {res.frames_per_s:7.1f} fr/s  "
            f"peak {res.peak_gb or 0:6.2f} GB  weights {res.weight_gb:5.2f} GB")  # fmt: skip
    if jsonl is not None:
        with open(jsonl, "a") as f:  # append-only log: partial results survive a killed run
            f.write(json.dumps(asdict(res)) + "\n")
    return res


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
