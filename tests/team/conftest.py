"""Loopback services for the team tests, started once per session: an S3 endpoint (moto's server mode), a
fault-injecting HTTP proxy in front of it, an MLflow tracking server (SQLite, artifacts proxied into the bucket)
and a Prefect server (its own PREFECT_HOME and SQLite database).

Everything runs on 127.0.0.1 with test credentials that the tests later grep for in every output. The servers'
logs and databases live under one session folder (``team_root``) so that grep can see them all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from team_testing import (
    BUCKET,
    TEST_ACCESS_KEY,
    TEST_SECRET_KEY,
    VENV_BIN,
    FaultProxy,
    Server,
    free_port,
    stop,
    wait_http,
)

# These tests need the pipeline extra (boto3, mlflow, prefect) and the test servers' packages. Without them the
# folder is not collected (and the header says so) rather than failing `make test` on a core-only install.
_NEEDED = ("boto3", "moto", "mlflow", "prefect", "jsonschema", "check_jsonschema", "httpx", "flask")
MISSING = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
if MISSING:
    collect_ignore_glob = ["test_*.py"]
    warnings.warn(f"tests/team not collected: missing {', '.join(MISSING)}", stacklevel=1)


def pytest_report_header(config: pytest.Config) -> str | None:
    if MISSING:
        return f"tests/team not collected: missing {', '.join(MISSING)} (pip install -e '.[pipeline]' and moto[server])"
    return None


@pytest.fixture(scope="session")
def team_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every log, database and file the team tests write (the leak test greps all of it)."""
    return tmp_path_factory.mktemp("team")


@pytest.fixture(scope="session")
def team_env(team_root: Path) -> Iterator[dict[str, str]]:
    """Test credentials and isolated AWS config in os.environ for the session; restored afterwards."""
    mp = pytest.MonkeyPatch()
    values = {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        # No ~/.aws files: the credentials must come from the environment alone.
        "AWS_CONFIG_FILE": str(team_root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(team_root / "no-aws-credentials"),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    for k, v in values.items():
        mp.setenv(k, v)
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(k, raising=False)
    yield values
    mp.undo()


@pytest.fixture(scope="session")
def s3_endpoint(team_env: dict[str, str]) -> Iterator[str]:
    """moto's S3 server on loopback (in memory, this process); yields its URL with the test bucket created."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    import boto3

    boto3.session.Session().client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture(scope="session")
def fault_proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the moto endpoint, serving in a daemon thread."""
    proxy = FaultProxy(s3_endpoint)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


# -- MLflow and Prefect servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_server(team_root: Path, s3_endpoint: str, team_env: dict[str, str]) -> Iterator[Server]:
    """``mlflow server`` on SQLite with proxied artifacts in ``s3://<bucket>/mlflow`` (the moto endpoint)."""
    if shutil.which("mlflow", path=str(VENV_BIN)) is None:
        pytest.skip("mlflow is not installed (pip install -e '.[pipeline]')")
    port = free_port()
    folder = team_root / "mlflow"
    folder.mkdir()
    log = folder / "server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    cmd = [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{BUCKET}/mlflow",
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder)
    try:
        url = f"http://127.0.0.1:{port}"
        waited = wait_http(f"{url}/health", timeout=180, proc=proc, log=log)
        yield Server(url, log, waited)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def prefect_server(team_root: Path, team_env: dict[str, str]) -> Iterator[Server]:
    """``prefect server start`` with its own PREFECT_HOME and SQLite database, UI and telemetry off."""
    port = free_port()
    home = team_root / "prefect_home"
    home.mkdir()
    log = home / "server.log"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_URL": "",
    }
    cmd = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-services"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=home)
    try:
        url = f"http://127.0.0.1:{port}/api"
        waited = wait_http(f"{url}/health", timeout=180, proc=proc, log=log)
        yield Server(url, log, waited)
    finally:
        stop(proc)
