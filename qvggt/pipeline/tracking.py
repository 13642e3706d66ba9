"""MLflow logging of one quantized configuration: params, metrics, tags and artifacts.

MLflow refuses ``@`` in metric names, so evaluation metrics are logged with ``@`` -> ``_at_`` (``pose_auc@30`` is
``pose_auc_at_30``); ``metric_name`` is the one mapping, so a reader can go back.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "artifact_root_for",
    "calibration_tags",
    "config_metrics",
    "eval_model_key",
    "log_quantized_run",
    "metric_name",
    "resolve_tracking_uri",
    "run_exists",
]


def resolve_tracking_uri(configured: str) -> str:
    """The tracking store a run logs to: ``MLFLOW_TRACKING_URI`` when the environment sets it (a team deployment's
    server: docker-compose and the Helm chart set it), else ``configured`` (params.yaml
    ``pipeline.mlflow_tracking_uri``). One resolution for the flow, its preflight check and the registry, as the
    watcher (which reads only the environment) must look where the flow registered."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


def artifact_root_for(tracking_uri: str, out_dir: str | Path) -> Path | None:
    """Where a new experiment keeps its artifacts: ``out_dir/mlartifacts`` beside a local ``sqlite:`` store; None for
    a tracking server, which keeps them in its own artifact store (proxied S3 in infra/): a client-side
    ``file://`` location there would leave every artifact on the machine that logged it."""
    return Path(out_dir) / "mlartifacts" if tracking_uri.startswith("sqlite:") else None


def metric_name(name: str) -> str:
    """An evaluation metric's name as MLflow accepts it (``pose_auc@30`` -> ``pose_auc_at_30``)."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name.replace("@", "_at_"))


def eval_model_key(metrics_doc: Mapping[str, Any], config_name: str) -> str:
    """The key of config ``config_name`` in an evaluation's ``metrics.json`` (models are keyed
    ``<config name>/<file stem>``, e.g. ``rtn-w4a4/model``); ValueError naming the models there if absent."""
    keys = [k for k in metrics_doc["aggregate"] if k.startswith(config_name + "/")]
    if len(keys) != 1:
        raise ValueError(
            f"{len(keys)} models of config {config_name!r} in the evaluation: {sorted(metrics_doc['aggregate'])}"
        )
    return keys[0]


def config_metrics(metrics_doc: Mapping[str, Any], config_name: str, manifest: Mapping[str, Any]) -> dict[str, float]:
    """One quantized config's MLflow metrics: its evaluation aggregates, ``retention_<metric>`` against the base, and
    ``weight_bytes`` / ``compression`` of its packed checkpoint (``manifest``: ``qvggt.quant.export.read_manifest``)."""
    key = eval_model_key(metrics_doc, config_name)
    metrics = {k: float(v) for k, v in metrics_doc["aggregate"][key].items() if isinstance(v, (int, float))}
    for k, entry in metrics_doc.get("comparison", {}).get(key, {}).items():
        if "retention" in entry:
            metrics[f"retention_{k}"] = float(entry["retention"])
    summary = manifest["summary"]
    metrics.update(weight_bytes=float(summary["weight_bytes_after"]), compression=float(summary["compression"]))
    return metrics


def calibration_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Which calibration set a checkpoint saw: the ``qvggt calibrate`` manifest's sha256 and its sample count
    ("none" / "0" for data-free methods such as rtn)."""
    calibration = manifest.get("calibration") or {}
    return {
        "calib_manifest_sha256": calibration.get("manifest_sha256") or "none",
        "calib_samples": str(len(calibration.get("sample_ids") or [])),
    }


def log_quantized_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    artifacts: Mapping[str, str | Path],
    artifact_root: str | Path | None = None,
) -> str:
    """Log one run; returns its run id. Non-finite metrics are skipped (MLflow stores them badly), not zeroed.

    ``artifacts`` maps an artifact folder name to a file or directory to upload. ``artifact_root``: where a new
    experiment keeps its artifacts (default: MLflow's, ``./mlruns`` of the working directory for a SQLite store).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if artifact_root is not None and mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=Path(artifact_root).resolve().as_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})
        mlflow.set_tags(dict(tags))
        for folder, path in artifacts.items():
            path = Path(path)
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=folder)
            elif path.is_file():
                mlflow.log_artifact(str(path), artifact_path=folder)
        return run.info.run_id


def run_exists(tracking_uri: str, run_id: str) -> bool:
    """Whether the store at ``tracking_uri`` holds run ``run_id``: a cached "logged as run X" outlives a store that
    was reset (``make clean`` deletes ``runs/``, not Prefect's cache). Other errors (an outage) raise."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True
