"""MLflow model registry: one registered model per base model, and the ``champion`` alias by a fixed rule.

Registered model ``qvggt-<base model>`` (e.g. ``qvggt-vggt-1b``, ``qvggt-small``). Each quantized config that a
flow run evaluates becomes a model version (:func:`register_candidate`) whose tags record what the rule needs:

==============================  ===========================================================================
tag                             meaning
==============================  ===========================================================================
``base_sha256``                 sha256 of the base weights it was quantized from (``base_etag`` for S3
                                sources without a recorded sha256; see ``flows/watch_base_weights.py``)
``pose_auc30_retention``        100 x AUC@30(quantized) / AUC@30(base), on the same scenes
``pose_auc30_retention_low``    lower end of the paired bootstrap 95% interval, as retention:
                                100 x (AUC@30(base) + low(quantized - base)) / AUC@30(base)
``base_pose_auc30``             the base model's own pose AUC@30 (%) on those scenes
``fid_pose_auc30``              fidelity: pose AUC@30 (%) of the quantized model's poses scored against the
                                base model's poses on the same inputs (100 = the same poses)
``speedup``                     GPU end-to-end speedup over the base model, ``none`` without a GPU benchmark
``weight_bytes``                bytes of the packed quantized weights
``eligible``                    ``true`` when the version passes the quality gate below
``gate``                        ``pass``, or why the version failed the gate
==============================  ===========================================================================

The champion rule (:data:`RULE_VERSION`; :func:`select_champion` is the one implementation):

1. **Same base.** Only versions quantized from the current base weights (``base_sha256``) compete.
2. **Quality gate.** A version is eligible when its pose AUC@30 retention is at least
   :data:`MIN_RETENTION` (98 %) *and* the lower end of its 95 % interval is at least 98 % too, i.e. the interval
   excludes a loss larger than 2 % (a point estimate of 98.5 % on three noisy scenes does not pass). A base model
   with AUC@30 = 0 makes retention undefined: nothing is eligible. **Weak base models** (rule v2): when the base
   model's own AUC@30 is below :data:`MIN_BASE_AUC30` (50 %), retention says little (a model that gets 1 % of
   its poses right keeps "100 %" of that whatever the quantizer does to it), so the version must also reproduce
   the base model: fidelity AUC@30 (its poses scored against the base model's) at least :data:`MIN_FIDELITY`
   (95 %). A version without these numbers (registered under rule v1) is not eligible.
3. **Score.** Among eligible versions: the highest ``speedup`` when both compared versions have one; otherwise
   (no GPU benchmark on either side) the smallest ``weight_bytes``.
4. **Ties and incumbents.** A version must be strictly better to win; on a tie the lower version number (the
   one registered first) wins. So the incumbent keeps the alias against an equal or worse newcomer, and the result
   does not depend on the order in which concurrent flow runs register their versions.
5. **A new base.** When the champion was quantized from other base weights, the best eligible version of the
   current base takes the alias even if its score is lower (the old champion is stale). With no eligible version
   of the current base the alias does not move.

Every decision is returned as a :class:`Decision` with a one-line reason and written to the registered model's
``champion_reason`` tag. Nothing here reads or writes credentials; tags pass :func:`assert_no_secrets`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qvggt.pipeline.credentials import assert_no_secrets

CHAMPION = "champion"
MIN_RETENTION = 98.0
# Below this base accuracy (pose AUC@30, %) retention is near-meaningless and fidelity to the base is required too.
# The embedded small model scores 0.42 % on the pipeline's 8 synthetic evaluation scenes (runs/pipeline/eval).
MIN_BASE_AUC30 = 50.0
# Fidelity AUC@30 (%) a version of a weak base must reach. On those scenes: quantvggt W8A8 98.2, quantvggt W4A4
# 76.5, RTN W4A4 69.4, while their "retention" was 100, 100 and 83 %: rule v1 would have crowned W4A4.
MIN_FIDELITY = 95.0
RULE_VERSION = "2"
RULE_SUMMARY = (
    f"champion rule v{RULE_VERSION}: among versions of the current base weights whose pose AUC@30 retention and "
    f"the lower end of its 95% interval are both >= {MIN_RETENTION:g}% (and, when the base model's own AUC@30 is "
    f"below {MIN_BASE_AUC30:g}%, whose fidelity AUC@30 to the base is >= {MIN_FIDELITY:g}%), the highest GPU "
    "speedup (smallest weight bytes when either lacks a GPU benchmark); strictly better only, ties to the earlier "
    "version"
)
POSE_METRIC = "pose_auc@30"  # the evaluation's metric name (qvggt.eval.runner)
FIDELITY_METRIC = "fid_pose_auc@30"  # the quantized model's poses scored against the base model's


@dataclass(frozen=True)
class CandidateMetrics:
    """What the champion rule reads for one quantized config.

    pose_auc30_retention: 100 x quantized / base pose AUC@30 (%).
    pose_auc30_retention_low: the lower end of its paired bootstrap 95% interval, in retention % (see module doc).
    weight_bytes: bytes of the packed quantized weights.
    speedup: GPU end-to-end speedup over the base model; None when there was no GPU to benchmark on.
    base_pose_auc30: the base model's own pose AUC@30 (%); NaN when unknown (then fidelity is required).
    fid_pose_auc30: fidelity pose AUC@30 (%) against the base model's poses; NaN when unknown.
    """

    pose_auc30_retention: float
    pose_auc30_retention_low: float
    weight_bytes: int
    speedup: float | None = None
    base_pose_auc30: float = math.nan
    fid_pose_auc30: float = math.nan

    def __post_init__(self) -> None:
        if self.weight_bytes <= 0:
            raise ValueError(f"weight_bytes must be positive, got {self.weight_bytes}")
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup > 0):
            raise ValueError(f"speedup must be a positive number or None, got {self.speedup}")

    @property
    def weak_base(self) -> bool:
        """The base model's AUC@30 is below MIN_BASE_AUC30 (or unknown): the gate also asks for fidelity."""
        return not (math.isfinite(self.base_pose_auc30) and self.base_pose_auc30 >= MIN_BASE_AUC30)

    def gate_failures(self) -> list[str]:
        """Why the version fails the quality gate (module docstring, step 2); empty when it passes. NaN fails."""
        r, low, fid = self.pose_auc30_retention, self.pose_auc30_retention_low, self.fid_pose_auc30
        failures = []
        if not (math.isfinite(r) and r >= MIN_RETENTION):
            failures.append(f"AUC@30 retention {r:.2f}% < {MIN_RETENTION:g}%")
        if not (math.isfinite(low) and low >= MIN_RETENTION):
            failures.append(f"its 95% interval reaches {low:.2f}% < {MIN_RETENTION:g}%")
        if self.weak_base and not (math.isfinite(fid) and fid >= MIN_FIDELITY):
            failures.append(
                f"base AUC@30 {self.base_pose_auc30:.2f}% is below the {MIN_BASE_AUC30:g}% floor and fidelity "
                f"AUC@30 {fid:.2f}% < {MIN_FIDELITY:g}%"
            )
        return failures

    @property
    def eligible(self) -> bool:
        """The quality gate: retention and its interval's lower end >= MIN_RETENTION, and for a weak base model
        fidelity >= MIN_FIDELITY."""
        return not self.gate_failures()

    @classmethod
    def from_eval(
        cls, metrics: Mapping[str, Any], model: str, *, weight_bytes: int, speedup: float | None = None
    ) -> CandidateMetrics:
        """From a ``qvggt eval`` ``metrics.json`` (``models``, ``aggregate``, ``comparison``) for ``model``.

        The reference is the first model of the evaluation (the base). Missing pose numbers give NaN retention
        (or fidelity), which the gate rejects, rather than an error: a config without poses cannot be champion.
        """
        names = list(metrics["models"])
        if model not in metrics.get("comparison", {}):
            raise KeyError(f"{model!r} is not a compared model of this evaluation; models: {names}")
        ref = float(metrics["aggregate"][names[0]].get(POSE_METRIC, math.nan))
        cmp = metrics["comparison"][model].get(POSE_METRIC, {})
        retention = float(cmp.get("retention", math.nan))
        low = float(cmp.get("low", math.nan))
        retention_low = 100.0 * (ref + low) / ref if math.isfinite(ref) and ref != 0 else math.nan
        fidelity = float(metrics["aggregate"].get(model, {}).get(FIDELITY_METRIC, math.nan))
        return cls(retention, retention_low, int(weight_bytes), speedup, ref, fidelity)

    def to_tags(self) -> dict[str, str]:
        return {
            "pose_auc30_retention": repr(float(self.pose_auc30_retention)),
            "pose_auc30_retention_low": repr(float(self.pose_auc30_retention_low)),
            "weight_bytes": str(int(self.weight_bytes)),
            "speedup": "none" if self.speedup is None else repr(float(self.speedup)),
            "base_pose_auc30": repr(float(self.base_pose_auc30)),
            "fid_pose_auc30": repr(float(self.fid_pose_auc30)),
            "eligible": str(self.eligible).lower(),
            "gate": "; ".join(self.gate_failures()) or "pass",
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> CandidateMetrics | None:
        """Parse :meth:`to_tags` output; None when the tags are missing or malformed (never champion)."""
        try:
            speedup = tags.get("speedup", "none")
            return cls(
                float(tags["pose_auc30_retention"]),
                float(tags["pose_auc30_retention_low"]),
                int(tags["weight_bytes"]),
                None if speedup in ("none", "") else float(speedup),
                float(tags.get("base_pose_auc30", "nan")),  # absent under rule v1: unknown, so fidelity required
                float(tags.get("fid_pose_auc30", "nan")),
            )
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class Candidate:
    """A registered model version as the rule sees it."""

    version: int
    base_sha256: str
    metrics: CandidateMetrics | None


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`update_champion`: the champion version (None if none), whether it moved, and why."""

    version: int | None
    changed: bool
    reason: str


def better(a: CandidateMetrics, b: CandidateMetrics) -> bool:
    """True when eligible ``a`` strictly beats eligible ``b`` by the score of rule step 3."""
    if a.speedup is not None and b.speedup is not None:
        return a.speedup > b.speedup
    return a.weight_bytes < b.weight_bytes


def select_champion(candidates: Iterable[Candidate], base_sha256: str, incumbent: int | None) -> Decision:
    """Apply the champion rule (module docstring) to ``candidates``; pure, for the registry and for tests."""
    pool = sorted(
        (c for c in candidates if c.base_sha256 == base_sha256 and c.metrics is not None and c.metrics.eligible),
        key=lambda c: c.version,
    )
    if not pool:
        return Decision(incumbent, False, f"no eligible version of base {base_sha256[:12]}; alias unchanged")
    best = pool[0]
    for c in pool[1:]:  # ascending versions, strictly better only: ties stay with the earlier version
        assert c.metrics is not None and best.metrics is not None
        if better(c.metrics, best.metrics):
            best = c
    m = best.metrics
    assert m is not None
    score = f"speedup {m.speedup:.3g}x" if m.speedup is not None else f"{m.weight_bytes} weight bytes"
    if best.version == incumbent:
        return Decision(incumbent, False, f"version {incumbent} stays champion ({score}); no eligible version beats it")
    quality = f"AUC@30 retention {m.pose_auc30_retention:.2f}% [low {m.pose_auc30_retention_low:.2f}%]"
    if m.weak_base:
        quality += f", fidelity {m.fid_pose_auc30:.2f}% (base AUC@30 {m.base_pose_auc30:.2f}%)"
    return Decision(
        best.version,
        True,
        f"version {best.version} becomes champion ({score}, {quality})"
        + (f" over version {incumbent}" if incumbent is not None else ""),
    )


def registered_model_name(base_model: str) -> str:
    """``qvggt-<base model>`` with characters MLflow does not like in names replaced by ``-``."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", base_model).strip("-")
    if not clean:
        raise ValueError(f"base model name {base_model!r} has no usable characters")
    return f"qvggt-{clean}"


def _client(client: Any | None) -> Any:
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


# What MLflow answers for a registered model or alias that does not exist (SQLite store and REST server alike; an
# unknown alias is INVALID_PARAMETER_VALUE). Anything else (an outage, 401/403, a bad store) is a real error.
_ABSENT = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def _is_absent(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in _ABSENT


def register_candidate(
    run_id: str,
    base_model: str,
    base_sha256: str,
    metrics: CandidateMetrics,
    *,
    artifact_path: str = "quantized",
    config_name: str = "",
    base_etag: str | None = None,
    client: Any | None = None,
) -> int:
    """Register the quantized checkpoint logged under ``runs:/<run_id>/<artifact_path>`` as a new version.

    Creates the registered model on first use (its description states the rule). Returns the version number.
    The alias is not touched: call :func:`update_champion` after registering every config of a flow run.
    ``base_etag``: the S3 ETag of the base weights when they were pulled from an object without a sha256 record
    (what ``flows/watch_base_weights.py`` compares for such objects).
    """
    client = _client(client)
    name = registered_model_name(base_model)
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_absent(exc):
            raise
        try:
            client.create_registered_model(
                name, description=f"Quantized {base_model} checkpoints. {RULE_SUMMARY}.", tags={"rule": RULE_VERSION}
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # created concurrently by another flow run
    tags = {"base_sha256": base_sha256, "base_model": base_model, "config": config_name, **metrics.to_tags()}
    if base_etag:
        tags["base_etag"] = base_etag
    assert_no_secrets(tags, what="model version tags")
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return int(mv.version)


def current_champion(base_model: str, client: Any | None = None) -> Any | None:
    """The champion ModelVersion of ``base_model`` (its tags hold ``base_sha256``), or None if there is none.

    Only "no such model / alias" means none: an unreachable or refusing server raises, so that the watcher does not
    take an outage for "no champion yet" and start a GPU run."""
    client = _client(client)
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(registered_model_name(base_model), CHAMPION)
    except MlflowException as exc:
        if _is_absent(exc):
            return None
        raise


def update_champion(base_model: str, base_sha256: str, client: Any | None = None) -> Decision:
    """Re-apply the rule over all versions of ``base_model`` and move the ``champion`` alias if it says so."""
    client = _client(client)
    name = registered_model_name(base_model)
    versions = client.search_model_versions(f"name = '{name}'")
    candidates = [
        Candidate(int(v.version), v.tags.get("base_sha256", ""), CandidateMetrics.from_tags(v.tags)) for v in versions
    ]
    incumbent_mv = current_champion(base_model, client)
    incumbent = int(incumbent_mv.version) if incumbent_mv is not None else None
    # Rule step 5: a champion quantized from other base weights does not defend the alias.
    stale = incumbent_mv is not None and incumbent_mv.tags.get("base_sha256") != base_sha256
    decision = select_champion(candidates, base_sha256, None if stale else incumbent)
    if stale:
        if decision.version is None:
            decision = Decision(incumbent, False, f"{decision.reason} (champion {incumbent} is of other base weights)")
        else:
            decision = Decision(decision.version, True, f"{decision.reason}; version {incumbent} was of other weights")
    if decision.changed and decision.version is not None:
        client.set_registered_model_alias(name, CHAMPION, str(decision.version))
    client.set_registered_model_tag(name, "champion_reason", decision.reason)
    return decision
