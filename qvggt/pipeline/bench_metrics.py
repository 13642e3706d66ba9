"""The GPU benchmark's numbers as MLflow metrics of a quantized config: latency, frames/s, peak memory and speedup
over the published recipe, per frame count, from ``bench.json`` (``qvggt bench``).

The benchmark times engine configs on the model preset (name-seeded VGGT-1B weights on a GPU), not the pipeline's
checkpoints: speed depends on the formats, not on the weights' values. A job maps to the config with its formats.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["BENCH_CONFIG_OF", "bench_config_for", "bench_configs_for", "bench_metrics", "job_speedup"]

# (weight bits, activation bits) -> the bench config that runs those integer formats.
BENCH_CONFIG_OF: dict[tuple[int, int | None], str] = {(8, 8): "w8a8-int8", (4, 8): "w4a8-int8", (4, 4): "w4a4"}
REFERENCE = "published"  # the speedup's denominator: the released recipe (bf16 autocast, fp32 heads)


def bench_config_for(wbits: int, abits: int | None) -> str | None:
    """The bench config timing a W{wbits}A{abits} job, or None when the engine has no kernel for it."""
    return BENCH_CONFIG_OF.get((wbits, abits))


def bench_configs_for(jobs: list[dict]) -> list[str]:
    """What to benchmark for these jobs: the reference, the bf16 engine, and each job's config (once, in order)."""
    names = [REFERENCE, "bf16-fused"]
    for job in jobs:
        name = bench_config_for(job["wbits"], job["abits"])
        if name and name not in names:
            names.append(name)
    return names


def bench_metrics(bench_json: str | Path, wbits: int, abits: int | None) -> dict[str, float]:
    """``bench_latency_ms_<F>f``, ``bench_frames_per_s_<F>f``, ``bench_peak_gb_<F>f`` and ``bench_speedup_<F>f``
    (reference latency / this config's) for every frame count F the config ran without error; {} if none."""
    name = bench_config_for(wbits, abits)
    rows = [r for r in json.loads(Path(bench_json).read_text()).get("models", []) if r.get("error") is None]
    reference = {r["frames"]: r["median_ms"] for r in rows if r["config"] == REFERENCE and r.get("median_ms")}
    metrics: dict[str, float] = {}
    for r in rows:
        if name is None or r["config"] != name:
            continue
        f = r["frames"]
        for key, value in (("latency_ms", r.get("median_ms")), ("frames_per_s", r.get("frames_per_s")),
                           ("peak_gb", r.get("peak_gb"))):  # fmt: skip
            if value is not None:
                metrics[f"bench_{key}_{f}f"] = float(value)
        if r.get("median_ms") and f in reference:
            metrics[f"bench_speedup_{f}f"] = reference[f] / r["median_ms"]
    return metrics


def job_speedup(bench_json: str | Path, wbits: int, abits: int | None) -> float | None:
    """The registry's speedup of a W{wbits}A{abits} job: its config's speedup over the reference at the largest frame
    count both measured (the pipeline benchmarks 8 and 32 frames, fewer after an out-of-memory retry); None when its
    config has no kernel or did not run."""
    prefix = "bench_speedup_"
    speedups = {int(k[len(prefix) : -1]): v for k, v in bench_metrics(bench_json, wbits, abits).items()
                if k.startswith(prefix)}  # fmt: skip
    return speedups[max(speedups)] if speedups else None
