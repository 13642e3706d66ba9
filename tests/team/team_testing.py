"""Helpers of the team tests (credentials, loopback utilities, the fault-injecting S3 proxy): a module with its
own name, so that test modules import it wherever pytest collects them from (``from conftest import`` finds
whichever conftest.py was imported first)."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

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


@dataclass
class Server:
    url: str
    log: Path
    startup_s: float


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
