"""The quantize-vggt flow against a real Prefect server (PREFECT_API_URL set), as a team runs it: the runs are in the
server's API, and the second run's task runs are all in the Cached state (read from the API, not from logs).

The server is `prefect server start` on loopback with its own PREFECT_HOME and SQLite database, started and
stopped by this test; MLflow is a SQLite store in the test's folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from qvggt.model import load_vggt, save_checkpoint

pytest.importorskip("prefect", reason="the pipeline extra is not installed (pip install -e '.[pipeline]')")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """(API URL, the environment a client of it needs)."""
    home = tmp_path_factory.mktemp("prefect_server")
    port = _port()
    env = {
        **os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false", "DO_NOT_TRACK": "1",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'server.db'}",
    }  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed below, after the server stops)
    # With its services: task runs reach the API through the server's event-driven task-run recorder.
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _api(f"{api}/health")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (uvicorn workers included)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def _task_runs(api: str, flow_run_id: str, expect: int = 8, timeout: float = 30) -> list[dict]:
    """The flow run's task runs; they arrive as events, shortly after the flow run itself finished."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = _api(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        final = [t for t in tasks if t["state_type"] in ("COMPLETED", "FAILED")]
        if len(final) >= expect or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def _flow(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "flows" / "quantize_vggt.py"), "--params", str(tmp / "params.yaml")],
        cwd=tmp, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def test_flow_runs_against_the_server_and_reruns_from_cache(server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    api, env = server
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "tiny.safetensors")
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["calibrate"] = {**doc["calibrate"], "pool_scenes": 4, "n_clusters": 2, "n_per_cluster": 1, "n_init": 2}
    # Non-default splits: every step (calibration, quantize on the manifest, evaluation) must draw from these.
    doc["data"] = {
        **doc["data"],
        "calib_seeds": {"start": 150_000, "stop": 150_100},
        "eval_seeds": {"start": 250_000, "stop": 250_100},
    }
    doc["pipeline"] = {
        "base_weights": str(base), "jobs": [{"method": "smoothquant", "wbits": 8, "abits": 8}], "eval_scenes": 1,
        "eval_frames": 2, "out_dir": str(tmp_path / "out"),
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))

    for attempt in ("first", "second"):
        r = _flow(tmp_path, env)
        assert r.returncode == 0, f"{attempt} run:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "Starting temporary server" not in r.stdout + r.stderr  # it used the configured server

    # One folder per step key: the rerun was all cache hits, so each step wrote one.
    (manifest_path,) = (tmp_path / "out" / "calib").glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert all(sid.endswith(("/150000", "/150001", "/150002", "/150003")) for sid in manifest["pool_ids"])
    (scenes_path,) = (tmp_path / "out" / "eval").glob("*/scenes.jsonl")
    scenes = [json.loads(line) for line in scenes_path.read_text().splitlines()]
    assert [s["sample_id"].rsplit("/", 1)[1] for s in scenes] == ["250000"]

    runs = _api(f"{api}/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
    runs = [fr for fr in runs if fr["state_type"] == "COMPLETED"]
    assert len(runs) == 2, [(fr["name"], fr["state_type"]) for fr in runs]
    states = {}
    for fr in runs:
        tasks = _task_runs(api, fr["id"])
        states[fr["id"]] = sorted({t["state_name"] for t in tasks if t["name"].startswith("quantize-")})
        names = {t["name"].rsplit("-", 1)[0] for t in tasks}
        assert {"build-pool", "collect-stats", "filter-noisy", "cluster-frames", "quantize", "evaluate"} <= names
    first, second = (states[fr["id"]] for fr in runs)
    assert first == ["Completed"] and second == ["Cached"]
    second_tasks = _task_runs(api, runs[1]["id"])
    cached = {t["name"].rsplit("-", 1)[0]: t["state_name"] for t in second_tasks}
    # Every content-keyed step is a cache hit on the rerun (verify-base-weights and the benchmark probe are cheap
    # and deliberately uncached).
    for step in ("build-pool", "collect-stats", "filter-noisy", "cluster-frames", "quantize", "evaluate", "track"):
        assert cached[step] == "Cached", cached
