"""The quantize-vggt flow end to end on the tiny preset: a real ephemeral Prefect server in its own PREFECT_HOME,
MLflow on SQLite, content-hash cache hits on the second run, a transient fault retried, a bad config refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qvggt.model import load_vggt, save_checkpoint

pytest.importorskip("prefect", reason="the pipeline extra is not installed (pip install -e '.[pipeline]')")
mlflow = pytest.importorskip("mlflow", reason="the pipeline extra is not installed (pip install -e '.[pipeline]')")

REPO = Path(__file__).resolve().parents[2]


def _params(tmp: Path, base: Path, **pipeline: object) -> Path:
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["calibrate"] = {**doc["calibrate"], "pool_scenes": 6, "n_clusters": 2, "n_per_cluster": 1, "n_init": 2}
    doc["pipeline"] = {
        "base_weights": str(base),
        "jobs": [{"method": "rtn", "wbits": 8, "abits": 8}, {"method": "smoothquant", "wbits": 4, "abits": 8}],
        "eval_scenes": 1, "eval_frames": 2, "out_dir": str(tmp / "out"),
        "mlflow_tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", **pipeline,
    }  # fmt: skip
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(tmp: Path, params: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ, "PREFECT_HOME": str(tmp / "prefect_home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1", **env,
    }  # fmt: skip
    full_env.pop("PREFECT_API_URL", None)  # ephemeral server in this PREFECT_HOME
    return subprocess.run(
        [sys.executable, str(REPO / "flows" / "quantize_vggt.py"), "--params", str(params)],
        cwd=tmp, env=full_env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("flow")
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), tmp / "tiny.safetensors")
    return tmp, _params(tmp, base)


def test_flow_tracks_every_config_then_reruns_from_cache(workspace: tuple[Path, Path]) -> None:
    tmp, params = workspace
    first = _run(tmp, params)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert "GPU benchmark was skipped" in out  # no GPU here: a visible skip with its reason
    checkpoints = sorted((tmp / "out" / "models").rglob("model.safetensors"))
    assert len(list((tmp / "out" / "calib").glob("*/manifest.json"))) == 1  # the NFDS set the quantize keys hash
    assert sorted(p.parent.name for p in checkpoints) == ["rtn-w8a8", "smoothquant-w4a8"]  # models/<key>/<job>/
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("qvggt-")]
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["rtn-w8a8", "smoothquant-w4a8"]
    for r in runs:
        assert "fid_pose_auc_at_30" in r.data.metrics and r.data.metrics["weight_bytes"] > 0
        assert len(r.data.tags["base_sha256"]) == 64 and r.data.tags["gpu_benchmark"] == "False"
        assert r.data.tags["prefect_flow_run_id"] not in ("", "local")
        calibrated = r.info.run_name.startswith("smoothquant")  # rtn is data-free: no calibration set
        assert len(r.data.tags["calib_manifest_sha256"]) == (64 if calibrated else len("none"))
        assert r.data.tags["dvc_revision"] == "none"  # run outside a DVC project (tmp folder)
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"checkpoint", "report"}
        assert "report/comparison.png" in {a.path for a in client.list_artifacts(r.info.run_id, "report")}

    mtimes = {p: p.stat().st_mtime_ns for p in checkpoints}
    second = _run(tmp, params)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    calibration = ("build-pool", "collect-stats", "filter-noisy", "cluster-frames")
    for step in (*calibration, "quantize", "evaluate", "compare-configs", "track", "register"):
        assert f"Task run '{step}-" in log
    # Every calibration, quantize, evaluate, compare, track and register step:
    assert log.count("Cached(type=COMPLETED)") == len(calibration) + 2 + 1 + 1 + 2 + 1
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == mtimes  # no work redone
    assert len(client.search_runs([exp.experiment_id])) == 2  # nothing logged twice

    checkpoints[0].unlink()  # an artifact deleted behind the cache's back is recomputed, never trusted
    (tmp / "mlflow.db").unlink()  # and the tracking store reset (`make clean` removes runs/, not Prefect's cache)
    third = _run(tmp, params)
    assert third.returncode == 0, third.stderr[-3000:]
    assert checkpoints[0].is_file() and checkpoints[1].stat().st_mtime_ns == mtimes[checkpoints[1]]
    # The cached "logged as run X" records named runs the new store lacks: both configs are logged and registered
    # again, rather than the flow printing run ids and versions that do not exist.
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("qvggt-")]
    assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])) == ["rtn-w8a8", "smoothquant-w4a8"]
    assert len(client.search_model_versions()) == 2


def test_transient_fault_is_retried(workspace: tuple[Path, Path], tmp_path: Path) -> None:
    tmp, _ = workspace
    params = _params(tmp_path, tmp / "tiny.safetensors", jobs=[{"method": "rtn", "wbits": 4, "abits": 4}])
    marker = tmp_path / "fault_fired"
    r = _run(tmp_path, params, QVGGT_INJECT_TRANSIENT="quantize", QVGGT_INJECT_TRANSIENT_FILE=str(marker))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert marker.exists() and "injected transient fault" in r.stdout + r.stderr
    assert "Retry" in r.stdout + r.stderr or "AwaitingRetry" in r.stdout + r.stderr


@pytest.mark.parametrize(
    "pipeline,message",
    [
        ({"jobs": []}, "pipeline.jobs"),
        ({"eval_frames": 1}, "eval_frames"),
        ({"jobz": 1}, "jobz"),
        ({"device": "gpu"}, "pipeline.device"),
        ({"calib_scenes": 8}, "calib_scenes"),  # removed: the NFDS set's size is the calibrate section's
        pytest.param(
            {"device": "cuda"},
            "this worker has no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without a GPU"),
        ),
    ],
)
def test_bad_config_fails_at_once(workspace: tuple[Path, Path], tmp_path: Path, pipeline: dict, message: str) -> None:
    tmp, _ = workspace
    r = _run(tmp_path, _params(tmp_path, tmp / "tiny.safetensors", **pipeline))
    assert r.returncode != 0 and message in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()  # refused before any work
