"""Content-hash cache keys change exactly with what a step depends on; MLflow metric names round-trip."""

from __future__ import annotations

from pathlib import Path

from qvggt.pipeline.cache import source_hash, step_key
from qvggt.pipeline.tracking import metric_name


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
