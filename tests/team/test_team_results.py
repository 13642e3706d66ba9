"""A task cache two machines share: quantize-vggt with its Prefect results and step artifacts in the moto bucket.

"Machine A" runs the flow in its own working folder and PREFECT_HOME; "machine B" runs it in fresh ones. Like a
team's workers they share the Prefect server (the session's test server, which holds the saved S3Bucket block),
the bucket (QVGGT_RESULT_STORAGE) and the MLflow server; nothing on disk. Prefect looks cache keys up in result
storage, not in the API, so B's hits can only come from the bucket. Both run one snapshot of the code (as two
checkouts of one commit would): the cache keys hash qvggt's source, which may change under a test in a busy tree. B's content-keyed steps must all be cache hits served from the bucket: its task runs finish
Cached, nothing new is written to the results prefix, nothing is logged to MLflow twice, and its checkpoint is A's,
pulled and verified. The base weights are an s3:// object that each machine's fetch step pulls into its own
weights cache (verified against the sha256 recorded at push): the keys hash those bytes, so they agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from team_testing import BUCKET, TEST_ACCESS_KEY, TEST_SECRET_KEY, Server

from qvggt.model import load_vggt, save_checkpoint
from qvggt.pipeline.results import SharedCache
from qvggt.pipeline.storage import S3Settings, S3Store, StorageConfigError

REPO = Path(__file__).resolve().parents[2]
PREFIX = "team-cache"
# Steps keyed on content (everything but verify-base-weights and benchmark): the four calibration steps, one
# quantize job, evaluate, compare-configs, track and register.
CACHED_STEPS = ("build-pool", "collect-stats", "filter-noisy", "cluster-frames", "quantize", "evaluate",
                "compare-configs", "track", "register")  # fmt: skip


def test_shared_cache_settings() -> None:
    assert SharedCache.from_env({}) is None
    cache = SharedCache.from_env({"QVGGT_RESULT_STORAGE": "s3://b/team/cache/", "AWS_ENDPOINT_URL_S3": "http://h:1"})
    assert cache is not None and (cache.bucket, cache.prefix) == ("b", "team/cache")
    assert cache.settings.prefix == "team/cache/artifacts" and cache.settings.endpoint_url == "http://h:1"
    block = cache.result_storage()
    assert (block.bucket_name, block.bucket_folder) == ("b", "team/cache/results")
    assert block.credentials.aws_access_key_id is None  # boto3's chain reads the environment; the block holds none
    other = SharedCache.from_env({"QVGGT_RESULT_STORAGE": "s3://b/team/other"})
    assert cache.block_ref.startswith("s3-bucket/qvggt-results-") and other.block_ref != cache.block_ref
    for bad in ("s3://b", "s3://b/", "/local/path", "b/prefix"):
        with pytest.raises(StorageConfigError, match="QVGGT_RESULT_STORAGE"):
            SharedCache.from_env({"QVGGT_RESULT_STORAGE": bad})


def _machine(root: Path, name: str, base: str, tracking_uri: str) -> Path:
    """A working folder with its own params.yaml (relative out_dir, as on a worker)."""
    work = root / name
    work.mkdir()
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["calibrate"] = {**doc["calibrate"], "pool_scenes": 4, "n_clusters": 2, "n_per_cluster": 1, "n_init": 1}
    doc["pipeline"] = {
        "base_weights": base, "jobs": [{"method": "rtn", "wbits": 8, "abits": 8}],
        "eval_scenes": 1, "eval_frames": 2, "out_dir": "runs/pipeline",
        "mlflow_tracking_uri": tracking_uri,
    }  # fmt: skip
    (work / "params.yaml").write_text(yaml.safe_dump(doc))
    return work


def _snapshot(dest: Path) -> Path:
    """The code both machines run: qvggt, flows and tasks copied once (the flow puts its parent first on sys.path)."""
    for part in ("qvggt", "flows", "tasks"):
        shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _run(work: Path, code: Path, s3_endpoint: str, api_url: str) -> str:
    env = {
        **os.environ, "PREFECT_HOME": str(work / "prefect_home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "QVGGT_RESULT_STORAGE": f"s3://{BUCKET}/{PREFIX}", "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "PREFECT_API_URL": api_url, "PYTHONPATH": str(code), "QVGGT_WEIGHTS_CACHE": str(work / "weights"),
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(code / "flows" / "quantize_vggt.py"), "--params", "params.yaml"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    (work / "flow.log").write_text(log)  # under team_root: the leak test greps it
    assert proc.returncode == 0, log[-4000:]
    return log


def _objects(s3, prefix: str) -> dict[str, object]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["LastModified"] for page in pages for o in page.get("Contents", [])}


def _keyed(objects: dict[str, object]) -> dict[str, object]:
    """The records stored under content cache keys (sha256 hex); Prefect names the others by a random uuid."""
    return {k: v for k, v in objects.items() if len(k.rsplit("/", 1)[-1]) == 64}


def test_second_machine_gets_cache_hits_from_the_bucket(
    team_root: Path, s3_endpoint: str, prefect_server: Server, mlflow_server: Server
) -> None:
    import mlflow

    root = team_root / "shared-cache"
    root.mkdir()
    torch.manual_seed(0)
    local_base = save_checkpoint(load_vggt(preset="tiny"), root / "tiny.safetensors")
    key = "base/shared-tiny/model.safetensors"
    sha = S3Store(S3Settings(bucket=BUCKET, prefix="", endpoint_url=s3_endpoint)).push(local_base, key).sha256
    local_base.unlink()  # the bucket holds the only copy
    base = f"s3://{BUCKET}/{key}"
    code = _snapshot(root / "code")
    a = _machine(root, "machine-a", base, mlflow_server.url)
    b = _machine(root, "machine-b", base, mlflow_server.url)
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_endpoint)

    log_a = _run(a, code, s3_endpoint, prefect_server.url)
    assert "Cached(type=COMPLETED)" not in log_a  # an empty bucket: everything computed
    results = _keyed(_objects(s3, f"{PREFIX}/results/"))
    assert len(results) == len(CACHED_STEPS), sorted(results)
    artifacts = _objects(s3, f"{PREFIX}/artifacts/runs/pipeline/")
    # Each step's folder is named by its cache key: runs/pipeline/<step folder>/<key>/<file>.
    paths = {a.removeprefix(f"{PREFIX}/artifacts/") for a in artifacts}
    (ckpt,) = [a for a in paths if re.fullmatch(r"runs/pipeline/models/[0-9a-f]{16}/rtn-w8a8/model\.safetensors", a)]
    for pattern in (
        r"runs/pipeline/eval/[0-9a-f]{16}/metrics\.json",
        r"runs/pipeline/calib/[0-9a-f]{16}/manifest\.json",
    ):
        assert len([a for a in paths if re.fullmatch(pattern, a)]) == 1, (pattern, sorted(paths))

    shutil.rmtree(a / "runs")  # nothing of A's on disk that B could see
    log_b = _run(b, code, s3_endpoint, prefect_server.url)
    for step in ("fetch-base-weights", *CACHED_STEPS):
        assert f"Task run '{step}-" in log_b
    assert hashlib.sha256((b / "weights" / BUCKET / key).read_bytes()).hexdigest() == sha  # pulled, verified
    assert log_b.count("Cached(type=COMPLETED)") == len(CACHED_STEPS), log_b[-4000:]
    assert _keyed(_objects(s3, f"{PREFIX}/results/")) == results  # no record rewritten: B computed nothing keyed
    shared = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/artifacts/{ckpt}")["Body"].read()
    assert hashlib.sha256((b / ckpt).read_bytes()).digest() == hashlib.sha256(shared).digest()  # A's, pulled
    client = mlflow.MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(f"qvggt-{sha[:12]}")  # named by the pulled weights' sha256
    (run,) = client.search_runs([exp.experiment_id])  # B's track step was a hit: nothing logged twice
    assert run.data.tags["base_sha256"] == sha
    # Artifacts go through the server to its store (s3://<bucket>/mlflow), not to the logging machine's disk.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert any(k.endswith("/checkpoint/model.safetensors") for k in _objects(s3, "mlflow/"))
    (version,) = client.search_model_versions("name = 'qvggt-shared-tiny'")  # named after the object's folder
    assert version.tags["base_sha256"] == sha  # what the watcher compares with the object's recorded sha256


def test_deployment_pull_step_saves_the_block(prefect_server: Server, s3_endpoint: str, team_root: Path) -> None:
    """prefect.yaml's pull step (`python -m qvggt.pipeline.results save-block`) saves the S3Bucket block that the
    flow's result_storage names, on the server in PREFECT_API_URL, with bucket, folder and endpoint but no key;
    without QVGGT_RESULT_STORAGE it does nothing."""
    import httpx

    steps = yaml.safe_load((REPO / "prefect.yaml").read_text())["pull"]
    scripts = [s["prefect.deployments.steps.run_shell_script"]["script"] for s in steps if len(s) == 1 and
               "prefect.deployments.steps.run_shell_script" in s]  # fmt: skip
    assert scripts == ["python -m qvggt.pipeline.results save-block"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server.url, "PREFECT_HOME": str(team_root / "pull-step-home"),
           "AWS_ENDPOINT_URL_S3": s3_endpoint, "QVGGT_RESULT_STORAGE": f"s3://{BUCKET}/pull-step"}  # fmt: skip
    cmd = [sys.executable, "-m", "qvggt.pipeline.results", "save-block"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    cache = SharedCache.from_env(env)
    assert cache is not None and cache.block_ref in done.stdout
    with httpx.Client(base_url=prefect_server.url, timeout=30) as api:
        found = (
            api.post(
                "/block_documents/filter",
                json={"block_documents": {"name": {"any_": [cache.block_name]}}, "include_secrets": True},
            )
            .raise_for_status()
            .json()
        )
    (doc,) = found
    assert (doc["data"]["bucket_name"], doc["data"]["bucket_folder"]) == (BUCKET, "pull-step/results")
    assert TEST_ACCESS_KEY not in json.dumps(found) and TEST_SECRET_KEY not in json.dumps(found)
    unset = {k: v for k, v in env.items() if k != "QVGGT_RESULT_STORAGE"}
    done = subprocess.run(cmd, env=unset, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "not set" in done.stdout
