"""Scheduled watcher: re-quantize when the base weights change.

On each run (hourly in ``prefect.yaml``) it

1. fingerprints the base weights: the sha256 of a local file, or for an ``s3://`` object the sha256 that
   ``S3Store.push`` recorded in its metadata, else its ETag (no bytes are downloaded);
2. reads the same fingerprint from the MLflow ``champion`` of the base model (model-version tag ``base_sha256``
   or ``base_etag``, written by ``qvggt.pipeline.registry.register_candidate``);
3. when they differ (or there is no champion yet) starts the ``quantize-vggt`` deployment through the Prefect
   API (``run_deployment``) with the weights as a parameter, and returns at once (``timeout=0``).

The run it starts gets ``base_model`` too (so it registers under the name this watcher reads) and carries the
idempotency key ``base-weights:<kind>:<value>:from:<champion's value or none>:attempt-<n>``:

- the same weights against the same champion never start two runs: while one is scheduled or running, and after
  one completed (even with no eligible champion: the rule said no), the next ticks start nothing;
- a run that FAILED, CRASHED or was CANCELLED is started again on the next tick, up to ``max_attempts`` in all;
  then the watcher logs an error and stops trying (fix the cause, then start one by hand:
  ``prefect deployment run quantize-vggt/requantize``);
- a rollback (weights A, then B, then A again) is seen: the champion is B's by then, so the key is new.

Connection settings come from the environment only: ``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``, ``AWS_*`` and
``AWS_ENDPOINT_URL_S3``. None is a flow parameter, so none is stored in Prefect's run records.

Run once:   python flows/watch_base_weights.py once --base-weights models/small/model.safetensors --base-model small
Serve:      python flows/watch_base_weights.py serve --cron "0 * * * *" --base-weights s3://bucket/base/model.pt
(with a worker and ``prefect deploy`` the schedule in ``prefect.yaml`` is used instead of ``serve``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tasks` is a top-level folder of the repo

from prefect import flow, get_run_logger, task
from prefect.deployments import run_deployment

from qvggt.pipeline.credentials import assert_no_secrets
from tasks.common import retry_transient

QUANTIZE_FLOW = "quantize-vggt"  # the flow name in flows/quantize_vggt.py
DEFAULT_DEPLOYMENT = f"{QUANTIZE_FLOW}/requantize"  # as named in prefect.yaml
WATCH_FLOW = "watch-base-weights"


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=retry_transient, persist_result=False)
def base_fingerprint(base_weights: str) -> dict[str, str]:
    """``{"kind", "value", "tag"}`` of the base weights (see qvggt.pipeline.storage.fingerprint)."""
    from qvggt.pipeline.storage import fingerprint

    fp = fingerprint(base_weights)
    return {"kind": fp.kind, "value": fp.value, "tag": fp.tag}


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=retry_transient, persist_result=False)
def champion_tags(base_model: str) -> dict[str, str] | None:
    """The champion model version's tags for ``base_model``, or None when there is no champion yet.

    The tracking server comes from MLFLOW_TRACKING_URI (it may hold credentials, so it is not a parameter).
    """
    from qvggt.pipeline.registry import current_champion

    mv = current_champion(base_model)
    return None if mv is None else {"version": str(mv.version), **dict(mv.tags)}


@flow(name=WATCH_FLOW, persist_result=False, log_prints=False)
def watch_base_weights(
    base_weights: str,
    base_model: str = "small",
    deployment: str = DEFAULT_DEPLOYMENT,
    weights_parameter: str = "base_weights",
    extra_parameters: dict[str, Any] | None = None,
    trigger_without_champion: bool = True,
    max_attempts: int = 3,
) -> dict[str, Any]:
    """Compare the base weights with the champion's and start ``deployment`` when they differ.

    base_weights: local path or ``s3://bucket/key`` of the base checkpoint.
    base_model: the registered model is ``qvggt-<base_model>``.
    deployment: ``<flow name>/<deployment name>`` to start; must be a ``quantize-vggt`` deployment.
    weights_parameter: the name of the started flow's parameter that receives ``base_weights``.
    extra_parameters: more parameters for the started run (no secrets: they are stored by Prefect).
    trigger_without_champion: start a run when the base model has no champion yet (first run).
    max_attempts: runs started in all for the same weights and champion when earlier ones failed (module docstring).

    Returns a summary: ``changed``, the fingerprints compared, and the started ``flow_run_id`` (or None).
    """
    logger = get_run_logger()
    if deployment.split("/", 1)[0] != QUANTIZE_FLOW or "/" not in deployment:
        raise ValueError(f"deployment must be '{QUANTIZE_FLOW}/<name>', got {deployment!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    current = base_fingerprint(base_weights)
    champion = champion_tags(base_model)
    recorded = None if champion is None else champion.get(current["tag"])
    summary: dict[str, Any] = {
        "base_weights": base_weights,
        "fingerprint": f"{current['kind']}:{current['value']}",
        "champion_version": None if champion is None else champion["version"],
        "champion_fingerprint": None if recorded is None else f"{current['kind']}:{recorded}",
        "flow_run_id": None,
    }
    if champion is None:
        changed = trigger_without_champion
        reason = "no champion yet" + ("" if changed else " and trigger_without_champion is off")
    elif recorded is None:
        changed, reason = True, f"champion v{champion['version']} has no {current['tag']} tag"
    else:
        changed = recorded != current["value"]
        reason = "fingerprint differs from the champion's" if changed else "unchanged"
    summary.update(changed=changed, reason=reason)
    if not changed:
        logger.info("base weights %s unchanged (%s); nothing to do", base_weights, summary["fingerprint"][:19])
        return summary
    parameters = {**(extra_parameters or {}), weights_parameter: base_weights, "base_model": base_model}
    assert_no_secrets(parameters, what="deployment parameters")
    key = f"base-weights:{current['kind']}:{current['value']}:from:{recorded or 'none'}"
    for attempt in range(1, max_attempts + 1):
        # An existing run with this key is returned as it is (Prefect's idempotency), a new key starts one.
        run = run_deployment(
            name=deployment,
            parameters=parameters,
            timeout=0,  # start it and return: the quantize flow runs on a GPU worker and takes a while
            as_subflow=False,  # its own lineage; the watcher's tiny run should not own a long pipeline run
            idempotency_key=f"{key}:attempt-{attempt}",
            tags=["base-weights-changed", f"base-{current['kind']}-{current['value'][:12]}"],
        )
        failed = run.state is not None and (run.state.is_failed() or run.state.is_crashed() or run.state.is_cancelled())
        if not failed:
            break
    summary.update(flow_run_id=str(run.id), attempt=attempt, gave_up=failed)
    if failed:
        logger.error(
            "base weights changed (%s) but all %d runs for them failed (last: %s, %s): fix the cause, then start one "
            "by hand (prefect deployment run %s)", reason, max_attempts, run.id, run.state.type.value, deployment,
        )  # fmt: skip
    else:
        logger.info("base weights changed (%s): %s run %s (attempt %d)", reason, deployment, run.id, attempt)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["once", "serve"], help="run a single check, or serve on a cron schedule")
    parser.add_argument("--base-weights", required=True, help="local path or s3://bucket/key")
    parser.add_argument("--base-model", default=os.environ.get("QVGGT_BASE_MODEL", "small"))
    parser.add_argument("--deployment", default=DEFAULT_DEPLOYMENT)
    parser.add_argument("--cron", default="0 * * * *", help="serve mode: the schedule (default hourly)")
    args = parser.parse_args(argv)
    params = {"base_weights": args.base_weights, "base_model": args.base_model, "deployment": args.deployment}
    if args.mode == "once":
        print(json.dumps(watch_base_weights(**params), sort_keys=True))
    else:
        watch_base_weights.serve(name="hourly", cron=args.cron, parameters=params)


if __name__ == "__main__":
    main()
