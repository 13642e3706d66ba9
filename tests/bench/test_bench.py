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
from qvggt.bench.run import build_parser, measurement_phases, run_bench
from qvggt.bench.run import main as bench_main
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
    # CUDA-graph bookkeeping: none for the published model; the engine on CPU ran eagerly, and says why.
    assert models[("published", 1)]["graphs"] is None
    g = models[("w4a8-int8", 2)]["graphs"]
    assert g["eager"] >= 1 and g["replays"] == 0 and "CUDA tensors" in next(iter(g["fallbacks"].values()))
    md = (out / "bench.md").read_text()
    assert "CPU reference path" in md and "| w4a8-int8 | 2 |" in md
    assert "| CUDA graphs |" in md and "eager (" in md and "CUDA graphs not used" in md
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
    names = list(BENCH_CONFIGS)
    assert names.index("w8a8-fp8-eager") == names.index("w8a8-fp8") + 1  # the graph-less twin right after


def _steps(plan) -> list[tuple[str, list[int]]]:
    return [(c.name, f) for c, f in plan]


def test_priority_order_measures_the_headline_first() -> None:
    """The issue's headline (published, bf16-fused, w8a8-fp8, w4a8-fp8 at 32 frames; peak memory of published and
    w4a8-fp8 at 100) before the kernels and the rest; every (config, frames) pair exactly once."""
    configs, frames = parse_configs("all"), [1, 8, 32, 100]
    first, rest = measurement_phases(configs, frames)
    assert _steps(first) == [  # every 32-frame headline before the first (slow) 100-frame memory run
        ("published", [32]), ("bf16-fused", [32]), ("w8a8-fp8", [32]), ("w4a8-fp8", [32]),
        ("published", [100]), ("w4a8-fp8", [100]),
    ]  # fmt: skip
    assert _steps(rest)[:4] == [("published", [1, 8]), ("bf16-fused", [1, 8, 100]), ("w8a8-fp8", [1, 8, 100]),
                                ("w8a8-fp8-eager", [1, 8, 32, 100])]  # fmt: skip
    pairs = [(c.name, f) for plan in (first, rest) for c, fs in plan for f in fs]
    assert sorted(pairs) == sorted((c.name, f) for c in configs for f in frames)
    # Nothing of the headline asked for: config-major, as "config" order always is.
    few = parse_configs("w4a4,published")
    assert measurement_phases(few, [1, 2]) == ([], [(few[0], [1, 2]), (few[1], [1, 2])])
    assert measurement_phases(configs, frames, "config") == ([], [(c, frames) for c in configs])
    with pytest.raises(ValueError, match="order"):
        measurement_phases(configs, frames, "fastest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path is what a GPU-less machine runs")
def test_a_failing_retention_section_is_recorded_and_the_models_kept(tmp_path: Path, monkeypatch) -> None:
    """Retention runs last and any failure there (here: its module cannot be imported, as without pydantic) is
    recorded with its reason in bench.json and bench.md; the model numbers stay."""
    import sys as _sys

    monkeypatch.setitem(_sys.modules, "qvggt.bench.retention", None)  # import -> ImportError
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(b"not used")
    doc = run_bench(tmp_path / "b", parse_configs("published"), [1, 32], 28, 28, "tiny", kernels=False,
                    retention_checkpoint=ckpt, log=lambda _m: None)  # fmt: skip
    assert [(m["config"], m["frames"]) for m in doc["models"]] == [("published", 32), ("published", 1)]
    assert all(m["error"] is None for m in doc["models"])
    assert "retention" not in doc and doc["retention_error"].startswith("ModuleNotFoundError")
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "Accuracy retention section not measured: ModuleNotFoundError" in md
    # Rows in the table: config by config, frames ascending, whatever the measuring order was.
    assert md.index("| published | 1 |") < md.index("| published | 32 |")
    # gpu_check.sh's last step when time is short: record a skipped retention section in the same document.
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "b"), "--retention-skipped", "12 s left"])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert doc["retention_error"] == "skipped: 12 s left" and len(doc["models"]) == 2
    assert "skipped: 12 s left" in (tmp_path / "b" / "bench.md").read_text()


def test_module_entry_point_has_the_cli_options_and_rejects_bad_input(tmp_path: Path, capsys) -> None:
    """scripts/gpu_check.sh runs ``python -m qvggt.bench.run`` (no typer on the GPU image): same options as
    ``qvggt bench``, same errors."""
    import typer.main

    cli = typer.main.get_command(app).commands["bench"]  # type: ignore[attr-defined]
    typer_opts = {o for param in cli.params for o in param.opts + param.secondary_opts if o.startswith("--")}
    argparse_opts = {o for a in build_parser()._actions for o in a.option_strings if o not in ("-h", "--help")}
    assert typer_opts == argparse_opts, typer_opts ^ argparse_opts
    assert bench_main(["--out", str(tmp_path), "--configs", "w3a3"]) == 1
    assert "unknown bench config" in capsys.readouterr().err
    assert bench_main(["--out", str(tmp_path), "--retention-checkpoint", str(tmp_path / "missing")]) == 1
    assert "retention checkpoint not found" in capsys.readouterr().err


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
    # No published row at that frame count: the speedup cell is "-", not "-x".
    doc["models"][1]["frames"] = 8
    md = render_markdown(doc)
    assert "| w8a8-fp8 | 8 | 300.0 | 106.7 | - | 5.00 | - | 1.30 |" in md and "-x" not in md


def test_markdown_shows_graph_replays_and_fallback_reasons() -> None:
    row = {"frames": 8, "median_ms": 10.0, "frames_per_s": 800.0, "peak_gb": 2.0, "weight_gb": 1.0, "fidelity": {},
           "error": None}  # fmt: skip
    doc = {
        "preset": "vggt-1b", "height": 392, "width": 518, "env": {"gpu": "H200"},
        "models": [
            {**row, "config": "w8a8-fp8", "graphs": {"captures": 1, "replays": 12, "eager": 0, "evictions": 0,
                                                      "fallbacks": {}}},
            {**row, "config": "w4a4", "graphs": {"captures": 0, "replays": 0, "eager": 11, "evictions": 0,
                                                  "fallbacks": {"[1, 8, 3, 392, 518] bfloat16 cuda:0; None":
                                                                "capture failed: RuntimeError: sync"}}},
        ],
    }  # fmt: skip
    md = render_markdown(doc)
    assert "| graph (1 captured, 12 replays) |" in md and "| eager (11 calls) |" in md
    assert "- w4a4, inputs [1, 8, 3, 392, 518] bfloat16 cuda:0; None: capture failed: RuntimeError: sync" in md


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
