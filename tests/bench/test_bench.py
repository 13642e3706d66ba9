"""``qvggt bench`` without a GPU: it says so, times the CPU reference path, and writes JSON + markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qvggt.bench.configs import BENCH_CONFIGS, parse_configs
from qvggt.bench.report import render_markdown
from qvggt.cli import app
from qvggt.model import load_vggt, save_checkpoint


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path is what a GPU-less machine runs")
def test_bench_on_cpu_writes_results_and_says_no_gpu(tmp_path: Path) -> None:
    """The whole command on CPU as a user runs it; the retention section uses a tiny checkpoint (the default is the
    small model). In its own process without TRITON_INTERPRET: a GPU-less user's engine runs the torch twins (the
    interpreter, which the kernel tests use, would take minutes here)."""
    out = tmp_path / "bench"
    torch.manual_seed(0)
    ckpt = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "tiny.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "qvggt.cli", "bench", "--out", str(out), "--frames", "1,2",
         "--configs", "published,w4a8-int8", "--height", "56", "--width", "84", "--retention-scenes", "1",
         "--retention-checkpoint", str(ckpt)],
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NO GPU" in r.stdout + r.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert doc["gpu"] is False and doc["preset"] == "tiny" and "notice" in doc
    models = {(m["config"], m["frames"]): m for m in doc["models"]}
    assert set(models) == {(c, f) for c in ("published", "w4a8-int8") for f in (1, 2)}
    for m in models.values():
        assert m["error"] is None and m["median_ms"] > 0 and m["weight_gb"] > 0
    # The published path is the fp32 model under bf16 autocast: close to fp32, never identical to the int4 model.
    fid = {c: models[(c, 1)]["fidelity"]["rel_l2_depth"] for c in ("published", "w4a8-int8")}
    assert fid["published"] < fid["w4a8-int8"] < 0.1
    # Engine configs ran on the twins (no CUDA), and the counters prove it.
    assert models[("w4a8-int8", 1)]["kernels"]["fallback"]["scaled_gemm"] > 0
    assert (out / "bench_models.jsonl").read_text().count("\n") == 4
    md = (out / "bench.md").read_text()
    assert "CPU reference path" in md and "| w4a8-int8 | 2 |" in md
    # Accuracy retention of the same configs on the trained small model, fp32 as the reference.
    ret = doc["retention"]
    assert ret["checkpoint"] == str(ckpt) and ret["scenes"] == 1
    assert list(ret["metrics"]) == ["fp32", "published", "w4a8-int8"]
    assert ret["metrics"]["fp32"]["fid_rel_l2_depth"] is None  # the reference has no fidelity to itself
    assert 0 < ret["metrics"]["published"]["fid_rel_l2_depth"] < ret["metrics"]["w4a8-int8"]["fid_rel_l2_depth"] < 0.05
    assert "Accuracy retention on" in md


@pytest.mark.parametrize(
    "args,message",
    [
        (["--frames", "0"], "positive"),
        (["--configs", "w3a3"], "unknown bench config"),
        (["--height", "50"], "multiples of 14"),
        (["--retention-checkpoint", "missing.safetensors"], "retention checkpoint not found"),
    ],
)
def test_bench_bad_input_fails_with_the_fix(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), *args])
    assert r.exit_code != 0
    assert message in r.output


def test_parse_configs_all_and_order() -> None:
    assert [c.name for c in parse_configs("all")] == list(BENCH_CONFIGS)
    assert [c.name for c in parse_configs("w4a4, published")] == ["w4a4", "published"]


def test_markdown_reports_speedup_and_memory_against_published() -> None:
    doc = {
        "preset": "vggt-1b", "height": 392, "width": 518, "env": {"gpu": "H200"},
        "models": [
            {"config": "published", "frames": 32, "median_ms": 750.0, "frames_per_s": 42.7, "peak_gb": 20.0,
             "weight_gb": 5.0, "fidelity": {}, "error": None},
            {"config": "w8a8-fp8", "frames": 32, "median_ms": 300.0, "frames_per_s": 106.7, "peak_gb": 5.0,
             "weight_gb": 1.3, "fidelity": {"rel_l2_depth": 0.01}, "error": None},
        ],
    }  # fmt: skip
    md = render_markdown(doc)
    assert "| w8a8-fp8 | 32 | 300.0 | 106.7 | 2.50x | 5.00 | 0.25 | 1.30 | 1.00e-02 |" in md


def test_markdown_keeps_a_failed_kernel_variant_as_a_row() -> None:
    doc = {
        "preset": "vggt-1b", "height": 392, "width": 518, "env": {"gpu": "H200"}, "models": [],
        "ceilings": {"bf16_tflops": 700.0, "copy_gbps": 4000.0},
        "layernorm": [
            {"kernel": "layernorm_quant int8", "M": 33312, "K": 1024, "ms": 0.05, "gbps": 2000.0},
            {"kernel": "layernorm_quant int4 + special rows", "M": 33312, "K": 1024, "error": "RuntimeError('x')"},
        ],
    }  # fmt: skip
    md = render_markdown(doc)
    assert "| layernorm_quant int8 | 33312x1024 | 0.050 | 2000 | 50 |" in md
    assert "| layernorm_quant int4 + special rows | 33312x1024 | failed: RuntimeError('x') | - | - |" in md
