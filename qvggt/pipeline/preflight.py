"""Checks a flow runs before any work, so a setting that cannot work fails at once instead of after an hour of
quantization: whether the MLflow tracking store can be reached, and whether the device asked for is there.

MLflow's client retries an unreachable HTTP server for minutes (exponential back-off) and only when the first
run is logged; here one short probe decides, and the error names the fix.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["TrackingUnavailableError", "check_tracking_uri", "resolve_device"]


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached or written (not retried: it is a setting to fix)."""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailableError` unless ``uri`` is usable: a ``sqlite:///`` store whose folder can be
    created, or an ``http(s)://`` MLflow server answering ``/health`` within ``timeout`` seconds."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative/path.db or sqlite:////absolute/path.db
        db = Path(uri[len("sqlite:///") :])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailableError(
                f"cannot create the MLflow store's folder {db.parent}: {exc.strerror or exc}; "
                "set pipeline.mlflow_tracking_uri to a writable sqlite:///path.db"
            ) from exc
        return
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # scheme checked above: http(s) only
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({problem}): start it (mlflow server --backend-store-uri "
            "sqlite:///mlflow.db --host 127.0.0.1), or set pipeline.mlflow_tracking_uri to a "
            "reachable server or a local sqlite:///path.db (MLFLOW_TRACKING_URI, when set, takes precedence)"
        )
    if parsed.scheme in ("", "file"):
        raise TrackingUnavailableError(
            f"tracking URI {uri!r} is a plain file store, which MLflow 3 no longer enables by default: "
            "use sqlite:///path.db (or an http:// server)"
        )
    # databricks://, postgresql://... : MLflow's own client will say what is wrong; nothing cheap to probe here.


def resolve_device(setting: str) -> str:
    """params.yaml ``pipeline.device`` on this worker: "auto" is its GPU when it has one; "cuda" without one is a
    ValueError naming the fix (before any work, not at the first model on the GPU)."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("pipeline.device is 'cuda' but this worker has no CUDA GPU: set it to 'auto' or 'cpu'")
    return "cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu"
