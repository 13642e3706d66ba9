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
from conftest import BUCKET, Server

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

        assert load_flow_from_entrypoint(str(REPO / quantize["entrypoint"])).name == "quantize-vggt"


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
    register_candidate(run.info.run_id, BASE_MODEL, sha1, CandidateMetrics(99.5, 98.8, 1000), client=client)
    assert update_champion(BASE_MODEL, sha1, client=client).changed

    same = _watch(prefect_server, mlflow_server, team_root, weights, "unchanged")
    assert (same["changed"], same["flow_run_id"]) == (False, None), same
    assert _runs_of(prefect_server, quantize_deployment) == []

    weights.write_bytes(b"base weights, release 2" * 100)
    new = _watch(prefect_server, mlflow_server, team_root, weights, "changed")
    assert new["changed"] and new["flow_run_id"], new
    runs = _runs_of(prefect_server, quantize_deployment)
    assert [r["id"] for r in runs] == [new["flow_run_id"]]
    assert runs[0]["parameters"] == {"base_weights": str(weights)}
    assert runs[0]["state_type"] == "SCHEDULED"
    assert "base-weights-changed" in runs[0]["tags"]

    # The next tick with the same new weights (the quantize run has not finished yet): no second run.
    again = _watch(prefect_server, mlflow_server, team_root, weights, "changed_again")
    assert again["flow_run_id"] == new["flow_run_id"]
    assert len(_runs_of(prefect_server, quantize_deployment)) == 1
