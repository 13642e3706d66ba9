"""No test credential appears anywhere: server logs and databases, watcher logs, bucket objects, MLflow params
and tags, Prefect run parameters, captured output. Also the credential helpers themselves.

Named to sort last in tests/team, so that when the whole folder runs the grep sees every other test's outputs.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import boto3
import httpx
import pytest
from team_testing import BUCKET, TEST_ACCESS_KEY, TEST_SECRET_KEY, TEST_SECRETS, Server

from qvggt.pipeline.credentials import (
    MASK,
    RedactingFilter,
    SecretLeakError,
    assert_no_secrets,
    install_log_redaction,
    load_local_env,
    redact,
    safe_url,
)
from qvggt.pipeline.storage import S3Settings, S3Store


def _leaks(data: bytes) -> list[str]:
    """Which test secrets (or a 12-character piece of one, e.g. a truncated log line) occur in ``data``."""
    found = []
    for secret in TEST_SECRETS:
        pieces = {secret} | {secret[i : i + 12] for i in range(0, len(secret) - 11, 4)}
        if any(p.encode() in data for p in pieces):
            found.append(secret[:4] + "...")
    return found


def test_redaction_helpers(team_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    text = f"key={TEST_ACCESS_KEY} secret={TEST_SECRET_KEY} db=postgresql://u:hunter2pw@db:5432/x"
    clean = redact(text)
    assert TEST_ACCESS_KEY not in clean and TEST_SECRET_KEY not in clean and "hunter2pw" not in clean
    assert clean.count(MASK) == 3
    assert safe_url("postgresql+asyncpg://qvggt:pw123456@postgres:5432/prefect") == (
        "postgresql+asyncpg://qvggt:***@postgres:5432/prefect"
    )
    assert safe_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(SecretLeakError, match="'endpoint'") as err:
        assert_no_secrets({"wbits": 4, "endpoint": f"http://x?k={TEST_SECRET_KEY}"}, what="params")
    assert TEST_SECRET_KEY not in str(err.value)  # the error names the key, never the value
    with pytest.raises(SecretLeakError):
        assert_no_secrets({"uri": "postgresql://u:pw@h/db"})
    assert_no_secrets({"wbits": 4, "bucket": BUCKET, "AWS_SECRET_ACCESS_KEY": "name only is fine"})
    # Short values of secret-named variables (flags) are not masked everywhere.
    monkeypatch.setenv("QVGGT_TOKEN_ENABLED", "1")
    assert redact("layer 1 of 12") == "layer 1 of 12"


def test_log_filter_masks_botocore_debug(s3_endpoint: str, tmp_path: Path) -> None:
    """botocore's DEBUG log prints the Authorization header (with the access key id): the filter masks it."""
    log_file = tmp_path / "debug.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("botocore")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    install_log_redaction(logger)
    assert any(isinstance(f, RedactingFilter) for f in handler.filters)
    try:
        store = S3Store(S3Settings(bucket=BUCKET, prefix="debuglog", endpoint_url=s3_endpoint))
        f = tmp_path / "x.bin"
        f.write_bytes(b"x" * 100)
        store.push(f, "x.bin")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
    text = log_file.read_text()
    assert "Authorization" in text  # the header was logged...
    assert _leaks(text.encode()) == []  # ...with the key masked


def test_load_local_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text(".qvggt.env\n")
    env_file = repo / ".qvggt.env"
    env_file.write_text('# local\nexport QVGGT_TEST_A="quoted value"\nQVGGT_TEST_B=plain\n\nHOME=/elsewhere\n')
    monkeypatch.delenv("QVGGT_TEST_A", raising=False)
    monkeypatch.delenv("QVGGT_TEST_B", raising=False)
    home = os.environ["HOME"]
    assert load_local_env(env_file) == ["QVGGT_TEST_A", "QVGGT_TEST_B"]  # HOME is set already: not overridden
    assert os.environ["QVGGT_TEST_A"] == "quoted value"
    assert os.environ["HOME"] == home
    assert load_local_env(repo / "missing.env") == []
    tracked = repo / "committed.env"
    tracked.write_text("QVGGT_TEST_C=1\n")
    subprocess.run(["git", "add", "-f", "committed.env"], cwd=repo, check=True)
    with pytest.raises(ValueError, match="tracked by git"):
        load_local_env(tracked)
    bad = repo / "bad.env"
    bad.write_text(f"this line has a secret {TEST_SECRET_KEY}\n")
    with pytest.raises(ValueError, match=r"bad.env:1: expected KEY=VALUE") as err:
        load_local_env(bad)
    assert TEST_SECRET_KEY not in str(err.value)


def test_no_credential_anywhere(
    team_root: Path,
    s3_endpoint: str,
    mlflow_server: Server,
    prefect_server: Server,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    # Some activity of our own, so that the check means something even when this file runs alone.
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.get_experiment_by_name("qvggt-leak-check")
    exp_id = exp.experiment_id if exp else client.create_experiment("qvggt-leak-check")
    run = client.create_run(exp_id, run_name="leak-check")
    params = {"endpoint": s3_endpoint, "bucket": BUCKET, "credentials": "from environment (AWS_*)"}
    assert_no_secrets(params, what="params")
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    art = team_root / "leak-check.txt"
    art.write_text("report body\n")
    client.log_artifact(run.info.run_id, str(art))
    client.set_terminated(run.info.run_id)

    leaks: dict[str, list[str]] = {}
    # 1. Every file under the session folder: server logs, SQLite databases (and their WAL), watcher logs, copies.
    files = [p for p in team_root.rglob("*") if p.is_file()]
    assert any(p.name == "server.log" for p in files) and any(p.suffix == ".db" for p in files)
    for p in files:
        if found := _leaks(p.read_bytes()):
            leaks[str(p.relative_to(team_root))] = found
    # 2. Every object in the bucket (DVC-, MLflow- and S3Store-written alike), keys and bodies.
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_endpoint)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=BUCKET, Key=obj["Key"])
            blob = obj["Key"].encode() + body["Body"].read() + repr(body.get("Metadata", {})).encode()
            if found := _leaks(blob):
                leaks[f"s3://{BUCKET}/{obj['Key']}"] = found
    # 3. MLflow params, tags and metrics keys of every run; registered models and version tags.
    for e in client.search_experiments():
        for r in client.search_runs([e.experiment_id]):
            if found := _leaks(repr((r.data.params, r.data.tags, list(r.data.metrics))).encode()):
                leaks[f"mlflow run {r.info.run_id}"] = found
    for m in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{m.name}'")
        if found := _leaks(repr((m.tags, m.description, [(v.tags, v.source) for v in versions])).encode()):
            leaks[f"mlflow model {m.name}"] = found
    # 4. Prefect: parameters and names of every flow run and deployment on the server.
    with httpx.Client(base_url=prefect_server.url, timeout=30) as api:
        runs = api.post("/flow_runs/filter", json={}).raise_for_status().text
        deployments = api.post("/deployments/filter", json={}).raise_for_status().text
        logs = api.post("/logs/filter", json={}).raise_for_status().text
    for label, text in (("prefect flow runs", runs), ("prefect deployments", deployments), ("prefect logs", logs)):
        if found := _leaks(text.encode()):
            leaks[label] = found
    # 5. What this test printed.
    out, err = capfd.readouterr()
    if found := _leaks((out + err).encode()):
        leaks["captured output"] = found
    assert leaks == {}, f"test credentials leaked into: {leaks}"
    print(f"leak check: {len(files)} files, bucket, MLflow and Prefect records clean")
