"""MLflow logging of one quantized configuration: params, metrics, tags and artifacts.

MLflow refuses ``@`` in metric names, so evaluation metrics are logged with ``@`` -> ``_at_`` (``pose_auc@30`` is
``pose_auc_at_30``); ``metric_name`` is the one mapping, so a reader can go back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["log_quantized_run", "metric_name"]


def metric_name(name: str) -> str:
    """An evaluation metric's name as MLflow accepts it (``pose_auc@30`` -> ``pose_auc_at_30``)."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name.replace("@", "_at_"))


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
