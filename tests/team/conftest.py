"""Loopback services for the team tests, started once per session: an S3 endpoint (moto's server mode), a
fault-injecting HTTP proxy in front of it, an MLflow tracking server (SQLite, artifacts proxied into the bucket)
and a Prefect server (its own PREFECT_HOME and SQLite database).

Everything runs on 127.0.0.1 with test credentials that the tests later grep for in every output. The servers'
logs and databases live under one session folder (``team_root``) so that grep can see them all.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

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


# The test credentials. Distinctive strings so that a grep finds them wherever they leak, in whole or in part.
TEST_ACCESS_KEY = "AKIAQVGGTTESTKEY7F3A"
TEST_SECRET_KEY = "qvggt-test-secret-Zk4pW9mQx2Lr7Tn5Vb8Hc3"
TEST_SECRETS = (TEST_ACCESS_KEY, TEST_SECRET_KEY)
BUCKET = "qvggt-team-test"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> float:
    """Poll ``url`` until it answers 200; return the seconds waited. Fails with the server log on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            pytest.fail(f"server for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"{url} not healthy after {timeout:.0f} s:\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server we started (by its own pid), then kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


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


# -- fault-injecting proxy ---------------------------------------------------------------------------------------

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}


@dataclass
class FaultPlan:
    """Return 503 SlowDown for the next ``remaining`` requests that ``match`` accepts (method, path)."""

    remaining: int = 0
    match: Callable[[str, str], bool] = lambda method, path: True
    served: int = 0  # 503s served so far
    forwarded: int = 0  # requests passed to the upstream


class FaultProxy(ThreadingHTTPServer):
    """A loopback HTTP proxy in front of an S3 endpoint that fails chosen requests with 503 before forwarding.

    It sits on the wire, so the client under test (boto3) runs unmodified, retries included.
    """

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.plan = FaultPlan()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fail_next(self, n: int, match: Callable[[str, str], bool] = lambda m, p: True) -> FaultPlan:
        with self.lock:
            self.plan = FaultPlan(remaining=n, match=match)
        return self.plan

    def take_fault(self, method: str, path: str) -> bool:
        with self.lock:
            if self.plan.remaining > 0 and self.plan.match(method, path):
                self.plan.remaining -= 1
                self.plan.served += 1
                return True
            self.plan.forwarded += 1
            return False


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and http.server answers `Expect: 100-continue` itself
    server: FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: request lines would clutter pytest output

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        if self.server.take_fault(self.command, self.path):
            payload = (
                b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>"
            )
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            # HEAD keeps the upstream's Content-Length (the object size); others get the body we relay.
            length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


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


@dataclass
class Server:
    url: str
    log: Path
    startup_s: float


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
