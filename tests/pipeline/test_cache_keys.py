"""Content-hash cache keys change exactly with what a step depends on; MLflow metric names round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvggt.pipeline import cache
from qvggt.pipeline.cache import file_digest, source_hash, step_key
from qvggt.pipeline.tracking import artifact_root_for, metric_name, resolve_tracking_uri


def test_step_key_follows_files_settings_and_source(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"weights v1")
    b.write_bytes(b"weights v1")
    key = step_key("quantize", [a], {"wbits": 4}, ("quant",))
    assert key == step_key("quantize", [b], {"wbits": 4}, ("quant",))  # content, not path or mtime
    b.write_bytes(b"weights v2")
    assert key != step_key("quantize", [b], {"wbits": 4}, ("quant",))
    assert key != step_key("quantize", [a], {"wbits": 8}, ("quant",))
    assert key != step_key("quantize", [a], {"wbits": 4}, ("quant", "model"))  # more source it depends on
    assert key != step_key("evaluate", [a], {"wbits": 4}, ("quant",))
    assert len(source_hash(("quant",))) == 64 and source_hash(("quant",)) != source_hash(("model",))


def test_metric_names_are_mlflow_safe() -> None:
    assert metric_name("pose_auc@30") == "pose_auc_at_30"
    assert metric_name("rra@5") == "rra_at_5" and metric_name("depth_abs_rel") == "depth_abs_rel"


def test_large_files_are_hashed_once_per_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "_MEMO_MIN_BYTES", 4)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"release 1")
    calls = []
    monkeypatch.setattr(cache, "sha256_file", lambda p: calls.append(p) or f"digest-{len(calls)}")
    cache._file_digest.cache_clear()
    assert file_digest(f) == file_digest(f) == "digest-1"  # memoised
    f.write_bytes(b"release 2, longer")  # a rewrite changes size, mtime and ctime
    assert file_digest(f) == "digest-2"


def test_tracking_uri_from_the_environment_and_artifacts_beside_a_local_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///runs/m.db") == "sqlite:///runs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # a team deployment's server wins
    assert resolve_tracking_uri("sqlite:///runs/m.db") == "http://mlflow:5000"
    assert artifact_root_for("sqlite:///runs/m.db", tmp_path) == tmp_path / "mlartifacts"
    assert artifact_root_for("http://mlflow:5000", tmp_path) is None  # the server's own (proxied) store
