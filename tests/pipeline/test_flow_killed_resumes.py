"""A flow run killed midway (SIGKILL, in the evaluation) resumes: the next run takes the finished steps from the
cache, the evaluation continues after its last finished scene, and every artifact it hands on is complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from qvggt.model import load_vggt, save_checkpoint

pytest.importorskip("prefect", reason="the pipeline extra is not installed (pip install -e '.[pipeline]')")

REPO = Path(__file__).resolve().parents[2]
SCENES = 6


def test_killed_flow_resumes_from_finished_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "tiny.safetensors")
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["calibrate"] = {**doc["calibrate"], "pool_scenes": 4, "n_clusters": 2, "n_per_cluster": 1, "n_init": 2}
    doc["pipeline"] = {
        "base_weights": str(base), "jobs": [{"method": "smoothquant", "wbits": 8, "abits": 8}],
        "eval_scenes": SCENES, "eval_frames": 2, "out_dir": str(tmp_path / "out"),
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, str(REPO / "flows" / "quantize_vggt.py"), "--params", str(tmp_path / "params.yaml")]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)

    def eval_file(name: str) -> Path:
        """``out/eval/<the evaluate step's key>/<name>`` (a path that does not exist until that folder does)."""
        found = list((tmp_path / "out" / "eval").glob(f"*/{name}"))
        assert len(found) <= 1, found
        return found[0] if found else tmp_path / "out" / "eval" / "none-yet" / name

    # Its own session: the kill takes the flow and the temporary Prefect server it started, as a crash would.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:
        scenes = eval_file("scenes.jsonl")
        if scenes.is_file() and scenes.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    scenes = eval_file("scenes.jsonl")
    done_before = scenes.read_text().splitlines()
    assert 1 <= len(done_before) < SCENES, "the flow was not interrupted inside the evaluation"
    checkpoint = next((tmp_path / "out" / "models").rglob("model.safetensors"))
    mtime = checkpoint.stat().st_mtime_ns
    assert not (scenes.parent / "metrics.json").exists()

    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    for step in ("build-pool", "collect-stats", "filter-noisy", "cluster-frames", "quantize"):
        assert any(f"Task run '{step}-" in line and "Cached" in line for line in log.splitlines()), (step, log[-3000:])
    assert checkpoint.stat().st_mtime_ns == mtime  # finished work is not redone
    lines = scenes.read_text().splitlines()
    assert len(lines) == SCENES and lines[: len(done_before) - 1] == done_before[:-1]  # resumed, not restarted
    assert (scenes.parent / "metrics.json").is_file()  # the same keyed folder: resumed in place
