"""Run several predictors (full precision, quantized, trivial baselines) on the same samples and score them.

Per-scene results are appended to ``scenes.jsonl`` as each scene finishes, so a crash loses no finished
scene and a rerun continues where it stopped. A rerun resumes only the same evaluation: same dataset, settings
(frames, image size, ...), samples, predictor names, weights and precision (``run.json`` holds the signature).
The first predictor is the reference: the others get fidelity metrics against it, retention (100 * theirs /
reference's) and a paired bootstrap interval of the per-scene differences. Aggregates are means over categories
of per-category means (the Co3Dv2 protocol).

Shape legend: S frames, H/W image size.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from qvggt.eval.datasets import EvalDataset, EvalSample, scene_key
from qvggt.eval.metrics import (
    depth_metrics,
    fidelity_metrics,
    paired_bootstrap,
    pointmap_metrics,
    pose_errors,
    pose_metrics,
    retention,
)
from qvggt.geometry.unproject import depth_to_world_points
from qvggt.io import atomic_open
from qvggt.model import VGGT
from qvggt.model.inference import infer_scene

SCENES_FILE = "scenes.jsonl"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
# Metrics where larger is better (retention is reported for these only).
HIGHER_IS_BETTER = ("pose_auc@30", "pose_auc@15", "pose_auc@5", "pose_auc@3", "rra@5", "rta@5", "depth_delta1")
MAIN_METRICS = (
    "pose_auc@30",
    "pose_auc@5",
    "rot_err_median",
    "trans_err_median",
    "depth_abs_rel",
    "depth_delta1",
    "pm_chamfer",
    "dpm_chamfer",
)
AUC_EDGES = np.arange(31)  # 1-degree bins of the per-pair max(rot, trans) error over 0..30 degrees


class Predictor(Protocol):
    """Anything that maps a sample to predictions: ``extrinsic`` [S, 3, 4], ``intrinsic`` [S, 3, 3], ``depth``
    [S, H, W], ``world_points`` [S, H, W, 3] (each optional), and their ``*_conf``.

    Optional attributes that enter the resume signature: ``fingerprint`` (str, identifies the weights) and
    ``dtype`` (the precision it runs in)."""

    name: str

    def __call__(self, sample: EvalSample) -> dict[str, np.ndarray]: ...


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the module tree (``repr``: architecture and quantization formats) and every state-dict entry's
    name, dtype, shape and raw bytes: changes whenever the weights do, even at the same checkpoint path."""
    h = hashlib.sha256(repr(model).encode())
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            h.update(f"{name}:{value!r}".encode())
            continue
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{list(value.shape)}".encode())
        # Raw bytes through a uint8 view: numpy has no bfloat16 / float8, and a cast could hide a difference.
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ModelPredictor:
    """A VGGT model (full precision or quantized) run on the sample's images."""

    name: str
    model: VGGT
    dtype: torch.dtype = torch.float32
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of the model (computed once; the model must not change afterwards)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def __call__(self, sample: EvalSample) -> dict[str, np.ndarray]:
        preds = infer_scene(self.model, torch.from_numpy(sample.images), self.dtype)
        preds["depth"] = preds["depth"][..., 0]
        return preds


@dataclass
class TrivialBaseline:
    """Identity poses for every frame, and a constant-depth plane (scale-aligned by the metrics) seen by it.

    Points are the plane unprojected with the mean ground-truth focal length from the identity camera: what a
    model that has learned nothing about the scene but the average depth would predict.
    """

    name: str = "baseline:identity+plane"

    def __call__(self, sample: EvalSample) -> dict[str, np.ndarray]:
        S, _, H, W = sample.images.shape
        depth = np.ones((S, H, W), np.float32)
        f = float(sample.intrinsics[:, [0, 1], [0, 1]].mean()) if sample.intrinsics is not None else float(max(H, W))
        v, u = np.mgrid[0:H, 0:W].astype(np.float32)
        plane = np.stack([(u - W / 2) / f, (v - H / 2) / f, np.ones_like(u)], axis=-1)
        conf = np.ones((S, H, W), np.float32)
        intrinsic = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], np.float32)
        return {
            "extrinsic": np.broadcast_to(np.eye(3, 4, dtype=np.float32), (S, 3, 4)).copy(),
            "intrinsic": np.broadcast_to(intrinsic, (S, 3, 3)).copy(),
            "depth": depth,
            "depth_conf": conf,
            "world_points": np.broadcast_to(plane, (S, H, W, 3)).copy(),
            "world_points_conf": conf,
        }


def score_sample(sample: EvalSample, preds: dict[str, np.ndarray], max_points: int = 20_000) -> dict:
    """Metrics of one prediction against the sample's ground truth, plus the per-pair pose-error histogram."""
    metrics: dict[str, float] = {}
    extra: dict = {}
    if sample.extrinsics is not None and "extrinsic" in preds and sample.num_frames >= 2:
        metrics.update(pose_metrics(preds["extrinsic"], sample.extrinsics))
        rot, trans = pose_errors(preds["extrinsic"], sample.extrinsics)
        err = np.maximum(rot, trans)
        extra["pose_err_hist"] = np.histogram(np.where(np.isfinite(err), err, 1e9), bins=AUC_EDGES)[0].tolist()
        extra["pose_pairs"] = int(err.size)
    if sample.depth is not None and "depth" in preds:
        metrics.update(depth_metrics(preds["depth"], sample.depth, sample.valid_mask, align="frame"))
    if sample.world_points is not None and "world_points" in preds:
        metrics.update(
            pointmap_metrics(preds["world_points"], sample.world_points, sample.valid_mask, max_points=max_points)
        )
    if sample.world_points is not None and {"depth", "extrinsic", "intrinsic"} <= preds.keys():
        # VGGT's other cloud: the depth branch unprojected with the predicted cameras ("dpm_*"; the paper finds it
        # more accurate than the point head, and it is what `qvggt predict` draws by default).
        points = depth_to_world_points(preds["depth"], preds["extrinsic"], preds["intrinsic"])
        scored = pointmap_metrics(points, sample.world_points, sample.valid_mask, max_points=max_points)
        metrics.update({f"d{k}": v for k, v in scored.items()})
    return {"metrics": metrics, **extra}


@dataclass
class EvalResult:
    models: list[str]
    aggregate: dict[str, dict[str, float]]
    comparison: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


def _run_spec(dataset: EvalDataset, predictors: Sequence[Predictor], sample_ids: Sequence[str]) -> dict:
    """Everything that decides the per-scene results (what ``run.json`` records and the signature hashes)."""
    models = [
        {"name": p.name, "fingerprint": getattr(p, "fingerprint", None), "dtype": str(getattr(p, "dtype", None))}
        for p in predictors
    ]
    return {"dataset": dataset.name, "settings": dataset.settings(), "models": models, "samples": list(sample_ids)}


def _signature(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def select_samples(dataset: EvalDataset, max_scenes: int | None = None) -> list[str]:
    """The first ``max_scenes`` samples taken round-robin over categories (the first sample of every category,
    then the second, ...), returned in dataset order; all samples when ``max_scenes`` is None.

    A plain prefix would score only the first categories of a category-ordered dataset (Co3D: "apple"), while
    the aggregate is a mean over categories. Categories come in order of first appearance, so with fewer scenes
    than categories the first ``max_scenes`` categories get one each.
    """
    ids = dataset.sample_ids()
    if max_scenes is None or max_scenes >= len(ids):
        return ids
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, sid in enumerate(ids):
        by_cat[dataset.category_of(sid)].append(i)
    chosen: list[int] = []
    rank = 0
    while len(chosen) < max_scenes:
        chosen += [idx[rank] for idx in by_cat.values() if rank < len(idx)][: max_scenes - len(chosen)]
        rank += 1
    return [ids[i] for i in sorted(chosen)]


def _read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: that scene reruns
            break
    return records


def evaluate(
    dataset: EvalDataset,
    predictors: Sequence[Predictor],
    out_dir: str | Path,
    max_scenes: int | None = None,
    exclude_ids: Iterable[str] = (),
    keep_predictions_for: int = 1,
    progress: bool = True,
) -> EvalResult:
    """Evaluate every predictor on the dataset's samples (``max_scenes`` of them, spread over categories by
    :func:`select_samples`), resumably, into ``out_dir``.

    exclude_ids: sample ids whose scenes must not be evaluated (e.g. a calibration manifest's); a sample showing
    one of their scenes (:func:`~qvggt.eval.datasets.scene_key`: the same sequence, whatever frames were drawn)
    is an error.
    keep_predictions_for: the first N scenes also get their predictions saved (``predictions/<i>.npz``) for
    the report's images.
    """
    if not predictors:
        raise ValueError("evaluate needs at least one predictor")
    names = [p.name for p in predictors]
    if len(set(names)) != len(names):
        raise ValueError(f"predictor names must be unique, got {names}")
    ids = select_samples(dataset, max_scenes)
    if not ids:
        raise ValueError(f"dataset {dataset.name!r} has no samples")
    calibration_scenes = {scene_key(i) for i in exclude_ids}
    overlap = [i for i in ids if scene_key(i) in calibration_scenes]
    if overlap:
        raise ValueError(
            f"{len(overlap)} evaluation samples show scenes used for calibration (e.g. {overlap[:3]}): "
            "evaluate on held-out samples"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = _run_spec(dataset, predictors, ids)
    signature = _signature(spec)
    run_path = out_dir / RUN_FILE
    if run_path.exists():
        old = json.loads(run_path.read_text())
        if old.get("signature") != signature:
            differ = [k for k in ("dataset", "settings", "models", "samples") if k in old and old[k] != spec[k]]
            what = f" ({', '.join(differ)} differ)" if differ else ""
            raise ValueError(
                f"{out_dir} holds a different evaluation (other data, settings or models{what}): use another --out"
            )
    with atomic_open(run_path, "w") as f:
        json.dump({"signature": signature, **spec}, f, indent=1)

    scenes_path = out_dir / SCENES_FILE
    records = _read_records(scenes_path)
    done = {r["sample_id"] for r in records}
    # Rewrite the log without any torn trailing line before appending to it.
    with atomic_open(scenes_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)

    todo = [(i, sid) for i, sid in enumerate(ids) if sid not in done]
    for index, sid in tqdm(todo, desc=f"eval {dataset.name}", disable=not progress, unit="scene"):
        sample = dataset.load(sid)
        preds = {p.name: p(sample) for p in predictors}
        ref = preds[names[0]]
        per_model = {}
        for name in names:
            scored = score_sample(sample, preds[name])
            if name != names[0]:
                scored["metrics"].update(fidelity_metrics(preds[name], ref))
            per_model[name] = scored
        record = {"index": index, "sample_id": sid, "category": sample.category, "models": per_model}
        if index < keep_predictions_for:
            _save_predictions(out_dir / "predictions" / f"{index}.npz", sample, preds)
        with open(scenes_path, "a") as f:  # one line per finished scene: a crash loses at most this one
            f.write(json.dumps(record, allow_nan=True) + "\n")
        records.append(record)

    records.sort(key=lambda r: r["index"])
    result = summarise(records, names)
    with atomic_open(out_dir / METRICS_FILE, "w") as f:
        json.dump({"models": names, "aggregate": result.aggregate, "comparison": result.comparison}, f, indent=2)
    return result


def _save_predictions(path: Path, sample: EvalSample, preds: dict[str, dict[str, np.ndarray]]) -> None:
    arrays = {"images": sample.images}
    for name in ("depth", "valid_mask", "world_points"):
        if getattr(sample, name) is not None:
            arrays[f"gt/{name}"] = getattr(sample, name)
    for model, p in preds.items():
        for key in ("depth", "world_points", "world_points_conf"):
            if key in p:
                arrays[f"{model}/{key}"] = p[key]
    with atomic_open(path) as f:
        np.savez_compressed(f, **arrays)


def _category_mean(values: list[tuple[str, float]]) -> float:
    by_cat: dict[str, list[float]] = defaultdict(list)
    for cat, v in values:
        by_cat[cat].append(v)
    means = [float(np.mean(v)) for v in by_cat.values()]
    return float(np.mean(means)) if means else math.nan


def summarise(records: list[dict], names: Sequence[str]) -> EvalResult:
    """Category-averaged metrics per model; retention and bootstrap intervals of each model vs the first."""
    aggregate: dict[str, dict[str, float]] = {}
    for name in names:
        keys = sorted({k for r in records for k in r["models"][name]["metrics"]})
        aggregate[name] = {
            k: _category_mean(
                [(r["category"], r["models"][name]["metrics"][k]) for r in records if k in r["models"][name]["metrics"]]
            )
            for k in keys
        }
        # Cumulative accuracy curve (index i: % of pairs with error below i+1 degrees), averaged like the metrics,
        # so its mean over thresholds is the reported AUC@30.
        curves = [
            (r["category"], 100 * np.cumsum(r["models"][name]["pose_err_hist"]) / r["models"][name]["pose_pairs"])
            for r in records
            if "pose_err_hist" in r["models"][name]
        ]
        if curves:
            by_cat: dict[str, list[np.ndarray]] = defaultdict(list)
            for cat, curve in curves:
                by_cat[cat].append(curve)
            aggregate[name]["pose_curve"] = np.mean([np.mean(c, axis=0) for c in by_cat.values()], axis=0).tolist()
    comparison: dict[str, dict[str, dict[str, float]]] = {}
    ref = names[0]
    for name in names[1:]:
        comparison[name] = {}
        for k in MAIN_METRICS:
            pairs = [
                (r["models"][ref]["metrics"][k], r["models"][name]["metrics"][k])
                for r in records
                if k in r["models"][ref]["metrics"] and k in r["models"][name]["metrics"]
            ]
            finite = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
            if not finite:
                continue
            a, b = np.array(finite).T
            entry = dict(paired_bootstrap(a, b)) if len(finite) > 1 else {"mean_diff": float(b[0] - a[0])}
            if len(finite) < len(pairs):  # a non-finite score (e.g. no valid point) is left out: say how often
                entry["dropped_pairs"] = len(pairs) - len(finite)
            if k in HIGHER_IS_BETTER:
                entry["retention"] = float(retention(aggregate[name].get(k, math.nan), aggregate[ref].get(k, math.nan)))
            comparison[name][k] = entry
    return EvalResult(list(names), aggregate, comparison, records)


def format_table(result: EvalResult, metrics: Sequence[str] = MAIN_METRICS) -> str:
    """Markdown table: one row per metric, a column per model, and retention / paired 95% interval columns."""
    names = result.models
    head = ["metric", *names] + [f"{n} vs {names[0]}" for n in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in metrics:
        if not any(k in result.aggregate[n] for n in names):
            continue
        row = [k] + [f"{result.aggregate[n].get(k, math.nan):.4g}" for n in names]
        for n in names[1:]:
            c = result.comparison.get(n, {}).get(k)
            if c is None:
                row.append("")
                continue
            cell = f"{c['mean_diff']:+.3g}"
            if "low" in c:
                cell += f" [{c['low']:+.3g}, {c['high']:+.3g}]"
            if "retention" in c:
                cell += f" ({c['retention']:.1f}%)"
            if c.get("dropped_pairs"):
                cell += f" [{c['dropped_pairs']} non-finite pairs dropped]"
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
