"""The base-weights watcher against a Prefect server and an MLflow server on loopback: a changed file starts one
``quantize-vggt`` deployment run visible in the API, an unchanged one starts none; prefect.yaml is consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from team_testing import BUCKET, Server

from qvggt.io import sha256_file
from qvggt.pipeline.registry import CandidateMetrics, register_candidate, update_champion
from qvggt.pipeline.storage import Fingerprint, S3Settings, S3Store, fingerprint

REPO = Path(__file__).resolve().parents[2]
WATCHER = REPO / "flows" / "watch_base_weights.py"
BASE_MODEL = "watch-test"


def test_fingerprint_local_and_s3(s3_endpoint: str, tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights v1")
    assert fingerprint(f) == Fingerprint("sha256", sha256_file(f))
    store = S3Store(S3Settings(bucket=BUCKET, prefix="fp", endpoint_url=s3_endpoint))
    store.push(f, "w.bin")
    # Pushed by S3Store: its recorded sha256, no download.
    assert fingerprint(store.uri("w.bin"), client=store.client) == Fingerprint("sha256", sha256_file(f))
    # A plain object (uploaded by another tool): its ETag, which changes when the object is replaced.
    store.client.put_object(Bucket=BUCKET, Key="fp/plain.bin", Body=b"v1")
    e1 = fingerprint(f"s3://{BUCKET}/fp/plain.bin", client=store.client)
    store.client.put_object(Bucket=BUCKET, Key="fp/plain.bin", Body=b"v2")
    e2 = fingerprint(f"s3://{BUCKET}/fp/plain.bin", client=store.client)
    assert e1.kind == e2.kind == "etag" and e1.value != e2.value and e1.tag == "base_etag"
    with pytest.raises(FileNotFoundError, match="do not exist"):
        fingerprint(f"s3://{BUCKET}/fp/missing.bin", client=store.client)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        fingerprint(tmp_path / "missing.bin")


def test_prefect_yaml_deployments() -> None:
    """Both flows are deployed with valid cron schedules; the watcher targets the quantize deployment."""
    from prefect.client.schemas.schedules import CronSchedule

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["entrypoint"]: d for d in spec["deployments"]}
    quantize = deployments["flows/quantize_vggt.py:quantize_vggt"]
    watcher = deployments["flows/watch_base_weights.py:watch_base_weights"]
    for d in (quantize, watcher):
        assert d["work_pool"]["name"] and d["schedules"]
        for s in d["schedules"]:
            CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC"))  # raises on a bad cron
    sys.path.insert(0, str(REPO / "flows"))
    try:
        import watch_base_weights as w
    finally:
        sys.path.remove(str(REPO / "flows"))
    assert w.watch_base_weights.name == "watch-base-weights"
    assert watcher["parameters"]["deployment"] == w.DEFAULT_DEPLOYMENT == f"quantize-vggt/{quantize['name']}"
    assert set(watcher["parameters"]) <= set(w.watch_base_weights.parameters.properties)
    if (REPO / "flows" / "quantize_vggt.py").exists():
        from prefect.flows import load_flow_from_entrypoint

        quantize_flow = load_flow_from_entrypoint(str(REPO / quantize["entrypoint"]))
        assert quantize_flow.name == "quantize-vggt"
        # The weekly run quantizes the deployment's weights, not the image's default checkpoint.
        assert quantize["parameters"] == {"base_weights": "{{ $QVGGT_BASE_WEIGHTS }}",
                                          "base_model": "{{ $QVGGT_BASE_MODEL }}"}  # fmt: skip
        assert set(quantize["parameters"]) <= set(quantize_flow.parameters.properties)


@pytest.fixture(scope="module")
def quantize_deployment(prefect_server: Server) -> str:
    """A ``quantize-vggt/requantize`` deployment on the test server (registered through the REST API, no
    worker: its runs stay Scheduled, which is all the watcher needs to be seen doing)."""
    with httpx.Client(base_url=prefect_server.url, timeout=30) as api:
        flow_id = api.post("/flows/", json={"name": "quantize-vggt"}).raise_for_status().json()["id"]
        dep = api.post(
            "/deployments/",
            json={"name": "requantize", "flow_id": flow_id, "entrypoint": "flows/quantize_vggt.py:quantize_vggt"},
        ).raise_for_status()
        return dep.json()["id"]


def _runs_of(prefect_server: Server, deployment_id: str) -> list[dict]:
    with httpx.Client(base_url=prefect_server.url, timeout=30) as api:
        body = {"deployments": {"id": {"any_": [deployment_id]}}}
        return api.post("/flow_runs/filter", json=body).raise_for_status().json()


def _watch(prefect_server: Server, mlflow_server: Server, team_root: Path, weights: Path, label: str) -> dict:
    """Run the watcher once in a fresh process (its own PREFECT_HOME), output logged under team_root."""
    home = team_root / "prefect_client_home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server.url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
    }
    cmd = [sys.executable, str(WATCHER), "once", "--base-weights", str(weights), "--base-model", BASE_MODEL]
    proc = subprocess.run(cmd, check=False, env=env, cwd=team_root, capture_output=True, text=True, timeout=300)
    (team_root / f"watch_{label}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_watcher_starts_run_only_when_weights_change(
    prefect_server: Server, mlflow_server: Server, quantize_deployment: str, team_root: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    print(f"prefect server healthy after {prefect_server.startup_s:.1f} s")
    client = MlflowClient(tracking_uri=mlflow_server.url)
    weights = team_root / "weights" / "model.safetensors"
    weights.parent.mkdir(exist_ok=True)
    weights.write_bytes(b"base weights, release 1" * 100)
    sha1 = sha256_file(weights)
    # A champion quantized from these weights.
    exp_id = client.create_experiment("qvggt-watch-test")
    run = client.create_run(exp_id, run_name="w8a8")
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"q")
    client.log_artifact(run.info.run_id, str(ckpt), artifact_path="quantized")
    register_candidate(
        run.info.run_id, BASE_MODEL, sha1, CandidateMetrics(99.5, 98.8, 1000, base_pose_auc30=90.0), client=client
    )
    assert update_champion(BASE_MODEL, sha1, client=client).changed

    same = _watch(prefect_server, mlflow_server, team_root, weights, "unchanged")
    assert (same["changed"], same["flow_run_id"]) == (False, None), same
    assert _runs_of(prefect_server, quantize_deployment) == []

    weights.write_bytes(b"base weights, release 2" * 100)
    new = _watch(prefect_server, mlflow_server, team_root, weights, "changed")
    assert new["changed"] and new["flow_run_id"], new
    runs = _runs_of(prefect_server, quantize_deployment)
    assert [r["id"] for r in runs] == [new["flow_run_id"]]
    # base_model too: the run registers under the name this watcher reads the champion of.
    assert runs[0]["parameters"] == {"base_weights": str(weights), "base_model": BASE_MODEL}
    assert runs[0]["state_type"] == "SCHEDULED"
    assert "base-weights-changed" in runs[0]["tags"]
    # Keyed on the new weights and the champion's: a later rollback to release 1 (champion: release 2) is new.
    assert runs[0]["idempotency_key"] == f"base-weights:sha256:{sha256_file(weights)}:from:{sha1}:attempt-1"

    # The next tick with the same new weights (the quantize run has not finished yet): no second run.
    again = _watch(prefect_server, mlflow_server, team_root, weights, "changed_again")
    assert again["flow_run_id"] == new["flow_run_id"]
    assert len(_runs_of(prefect_server, quantize_deployment)) == 1

    # The run fails: the next tick starts one more attempt, and the tick after that sees it scheduled.
    with httpx.Client(base_url=prefect_server.url, timeout=30) as api:
        body = {"state": {"type": "FAILED", "name": "Failed"}, "force": True}
        api.post(f"/flow_runs/{new['flow_run_id']}/set_state", json=body).raise_for_status()
    retry = _watch(prefect_server, mlflow_server, team_root, weights, "after_failure")
    assert retry["flow_run_id"] != new["flow_run_id"] and (retry["attempt"], retry["gave_up"]) == (2, False), retry
    again = _watch(prefect_server, mlflow_server, team_root, weights, "after_failure_again")
    assert again["flow_run_id"] == retry["flow_run_id"]
    assert len(_runs_of(prefect_server, quantize_deployment)) == 2


def test_watcher_deployment_run_by_worker(
    prefect_server: Server, mlflow_server: Server, quantize_deployment: str, team_root: Path
) -> None:
    """The watcher as its schedule runs it: a ``watch-base-weights/hourly`` deployment with prefect.yaml's cron,
    a flow run of it picked up by a process worker (``--run-once``), which starts a quantize run for new weights.

    (The tick itself is created through the API: a cron tick would mean waiting for the scheduler service.)
    """
    from prefect.workers.process import ProcessWorker

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    hourly = next(d for d in spec["deployments"] if d["entrypoint"].startswith("flows/watch_base_weights.py"))
    weights = team_root / "weights" / "release3.safetensors"
    weights.write_bytes(b"base weights, release 3" * 100)
    before = {r["id"] for r in _runs_of(prefect_server, quantize_deployment)}
    pool = "team-test-cpu"
    with httpx.Client(base_url=prefect_server.url, timeout=30) as api:
        api.post(
            "/work_pools/",
            json={"name": pool, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()},
        ).raise_for_status()
        flow_id = api.post("/flows/", json={"name": "watch-base-weights"}).raise_for_status().json()["id"]
        dep_id = (
            api.post(
                "/deployments/",
                json={
                    "name": hourly["name"],
                    "flow_id": flow_id,
                    "work_pool_name": pool,
                    "entrypoint": hourly["entrypoint"],
                    "path": str(REPO),
                    # prefect.yaml's pull step points at the image's /opt/qvggt; here the checkout is the code.
                    "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}],
                    "parameters": {**hourly["parameters"], "base_weights": str(weights), "base_model": BASE_MODEL},
                    # prefect.yaml's cron, inactive: this server runs no scheduler, and the tick is made below.
                    "schedules": [
                        {"schedule": {"cron": s["cron"], "timezone": s.get("timezone", "UTC")}, "active": False}
                        for s in hourly["schedules"]
                    ],
                },
            )
            .raise_for_status()
            .json()["id"]
        )
        schedules = api.get(f"/deployments/{dep_id}").raise_for_status().json()["schedules"]
        assert [s["schedule"]["cron"] for s in schedules] == [s["cron"] for s in hourly["schedules"]]
        tick = api.post(f"/deployments/{dep_id}/create_flow_run", json={}).raise_for_status().json()["id"]

    home = team_root / "prefect_worker_home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server.url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
    }
    cmd = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
           "--run-once"]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, cwd=team_root, capture_output=True, text=True, timeout=300)
    (team_root / "worker_run_once.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with httpx.Client(base_url=prefect_server.url, timeout=30) as api:
        state = api.get(f"/flow_runs/{tick}").raise_for_status().json()["state_type"]
    assert state == "COMPLETED", (proc.stdout + proc.stderr)[-3000:]
    new = [r for r in _runs_of(prefect_server, quantize_deployment) if r["id"] not in before]
    assert len(new) == 1 and new[0]["parameters"] == {"base_weights": str(weights), "base_model": BASE_MODEL}
