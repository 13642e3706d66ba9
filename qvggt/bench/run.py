"""``qvggt bench``: the whole benchmark (ceilings, kernels, models) into ``bench.json`` and ``bench.md``.

Speed is measured on ``vggt-1b`` with name-seeded weights (numbers do not depend on trained values). Without a GPU
the command says so and times the CPU reference path of a small preset instead: those numbers say nothing about
GPU speed.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from qvggt.bench.configs import BenchConfig
from qvggt.bench.model_bench import ModelResult, bench_models
from qvggt.bench.report import render_markdown
from qvggt.io import atomic_path
from qvggt.model import build_model, get_preset
from qvggt.model.init import fill_name_seeded_

__all__ = ["run_bench"]


def _device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gb=props.total_memory / 1e9)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def run_bench(
    out_dir: Path,
    configs: list[BenchConfig],
    frames: list[int],
    height: int = 392,
    width: int = 518,
    preset: str | None = None,
    kernels: bool = True,
    gemm_tokens: tuple[int, ...] = (16_656, 33_312),
    fidelity_frames: int = 8,
    retention_checkpoint: Path | None = None,
    retention_scenes: int = 8,
    seed: int = 0,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict:
    """Run the benchmark; write ``bench.json``, ``bench.md`` and ``bench_models.jsonl`` under ``out_dir``.

    Args:
        configs / frames / height / width: what to measure (height and width multiples of 14).
        preset: model preset; default ``vggt-1b`` on CUDA, ``tiny`` on CPU.
        kernels: also run the per-kernel section (CUDA only).
        gemm_tokens: token counts of the GEMM section (16,656 / 33,312 = 16 / 32 frames of 1,041 tokens).
        fidelity_frames: frames of the fidelity comparison against fp32.
        retention_checkpoint: a trained checkpoint (e.g. the small model) on which each config's accuracy
            retention is measured (``qvggt.bench.retention``); None skips that section.
        retention_scenes: held-out synthetic scenes of the retention section.

    Returns:
        The JSON document written to ``bench.json``.
    """
    if height % 14 or width % 14 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 14, got {height}x{width}")
    if not frames or any(f <= 0 for f in frames):
        raise ValueError(f"frames must be positive counts, got {frames}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset = preset or ("vggt-1b" if cuda else "tiny")
    out_dir.mkdir(parents=True, exist_ok=True)
    doc: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "preset": preset,
        "height": height,
        "width": width,
        "env": _device_info(device),
        "gpu": cuda,
    }
    if not cuda:
        log("NO GPU: timing the CPU reference path (kernel twins) of a small preset; these are not GPU numbers.")
        doc["notice"] = "no CUDA device: CPU reference path timed with wall-clock time; no kernel section"
    torch.manual_seed(seed)

    if cuda and kernels:
        from qvggt.bench.kernel_bench import bench_gemms, bench_layernorm, measure_ceilings

        t0 = time.perf_counter()
        doc["ceilings"] = measure_ceilings()
        log(f"ceilings: {doc['ceilings']}")
        doc["gemm"] = [row for m in gemm_tokens for row in bench_gemms(m, seed)]
        doc["layernorm"] = bench_layernorm(gemm_tokens[-1], seed=seed)
        try:
            from qvggt.kernels.attention import bench_attention

            doc["attention"] = bench_attention([1041 * 8, 1041 * 32])
        except Exception as exc:  # noqa: BLE001  (the attention kernel is optional; record why it is absent)
            doc["attention_error"] = repr(exc)[:300]
        log(f"kernel section: {time.perf_counter() - t0:.0f} s")
        _write(out_dir, doc)

    if retention_checkpoint is not None:
        from qvggt.bench.retention import bench_retention

        t0 = time.perf_counter()
        doc["retention"] = bench_retention(
            retention_checkpoint, configs, out_dir / "retention", device, scenes=retention_scenes
        )
        log(f"retention section ({retention_checkpoint}): {time.perf_counter() - t0:.0f} s")
        _write(out_dir, doc)

    t0 = time.perf_counter()
    master = fill_name_seeded_(build_model(get_preset(preset), device="meta"))  # meta: one copy of the weights
    log(f"{preset}: name-seeded weights in {time.perf_counter() - t0:.0f} s")
    jsonl = out_dir / "bench_models.jsonl"
    jsonl.unlink(missing_ok=True)
    results: list[ModelResult] = []
    for res in bench_models(
        master, configs, frames, height, width, device, fidelity_frames=min(fidelity_frames, max(frames)),
        seed=seed, log=log, jsonl=jsonl,
    ):  # fmt: skip
        results.append(res)
        doc["models"] = [asdict(r) for r in results]
        _write(out_dir, doc)
    return doc


def _write(out_dir: Path, doc: dict) -> None:
    with atomic_path(out_dir / "bench.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    with atomic_path(out_dir / "bench.md") as tmp:
        tmp.write_text(render_markdown(doc))
