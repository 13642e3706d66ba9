"""The comparison chart across configs as a Prefect task (cached on the evaluation's metrics file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from qvggt.pipeline.cache import step_key
from tasks.steps import RETRY

CHART_NAME = "comparison.png"


def _chart_key(context: Any, p: dict[str, Any]) -> str:
    return step_key("compare-configs", [p["metrics_path"]], {}, ("pipeline",))


@task(name="compare-configs", cache_key_fn=_chart_key, **RETRY)
def compare_configs(metrics_path: str) -> str:
    """Headline metrics of every config side by side, written into the evaluation's ``report/`` folder (so each
    MLflow run's report artifact carries it); returns the PNG's path."""
    from qvggt.pipeline.charts import comparison_chart

    return str(comparison_chart(metrics_path, Path(metrics_path).parent / "report" / CHART_NAME))
