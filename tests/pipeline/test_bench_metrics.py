"""The benchmark's numbers reach each quantized config's MLflow metrics (from a real, CPU-reference bench.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvggt.bench.configs import parse_configs
from qvggt.bench.run import run_bench
from qvggt.pipeline.bench_metrics import bench_configs_for, bench_metrics, job_speedup


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    names = bench_configs_for([{"wbits": 4, "abits": 4}, {"wbits": 8, "abits": 8}, {"wbits": 4, "abits": 4}])
    assert names == ["published", "bf16-fused", "w4a4", "w8a8-int8"]
    run_bench(out, parse_configs(",".join(n for n in names if n != "bf16-fused")), [1, 2], 56, 56, "tiny",
              kernels=False, retention_checkpoint=None, log=lambda _m: None)  # fmt: skip
    return out / "bench.json"


def test_metrics_of_a_config_with_speedup_over_the_reference(bench_json: Path) -> None:
    m = bench_metrics(bench_json, 4, 4)
    assert set(m) >= {"bench_latency_ms_1f", "bench_latency_ms_2f", "bench_speedup_1f", "bench_frames_per_s_2f"}
    assert all(v > 0 for v in m.values())
    rows = {(r["config"], r["frames"]): r for r in json.loads(bench_json.read_text())["models"]}
    assert m["bench_speedup_1f"] == pytest.approx(rows[("published", 1)]["median_ms"] / rows[("w4a4", 1)]["median_ms"])
    assert m["bench_latency_ms_2f"] == rows[("w4a4", 2)]["median_ms"]
    assert "bench_peak_gb_1f" not in m  # the CPU reference path measures no GPU memory: left out, not zeroed


def test_a_format_without_a_kernel_has_no_bench_metrics(bench_json: Path) -> None:
    assert bench_metrics(bench_json, 3, 3) == {} and bench_metrics(bench_json, 8, None) == {}
    assert job_speedup(bench_json, 3, 3) is None


def test_each_job_gets_its_own_formats_speedup_at_the_largest_frame_count(bench_json: Path) -> None:
    """What the registry's champion rule compares: per job, not one number for the whole benchmark."""
    for bits in ((4, 4), (8, 8)):
        assert job_speedup(bench_json, *bits) == bench_metrics(bench_json, *bits)["bench_speedup_2f"]
    assert job_speedup(bench_json, 4, 4) != job_speedup(bench_json, 8, 8)
