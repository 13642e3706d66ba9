"""Held-out validation during training, and the gate that stops a run whose camera pose is not learning.

Validation scores the model on the first ``val_scenes`` scenes of the validation split (``data.val_seeds``, disjoint
from the evaluation split the benchmark and the pipeline score on; before session 12 it took the first evaluation
seeds), each seed in its default category ``CATEGORIES[seed % 8]``, so the held-out categories are in, rendered with
``num_frames`` frames: the protocol of ``qvggt eval --frames S`` on ``synthetic:eval``. It reports, pooled over
the scenes, the median relative rotation and translation-direction errors of all frame pairs, pose AUC@30, the
same median rotation error of identity poses (the trivial baseline the issue's bar is stated against), and the
mean per-scene depth AbsRel (per-frame median-aligned, as the evaluation does), and ``yaw_corr``: the correlation,
over every scene's frames 1..S-1, of the predicted and true yaw relative to frame 0
(:func:`~qvggt.eval.metrics.pose.reference_yaw_deg`). The median error can beat identity monocularly (the change
of elevation shows in each image alone); the yaw, the turn around the scene, needs the views matched, so a model
that ignores the other frames scores ~0 there (docs/TRAINING_NOTES.md, sections 5-7). The scenes are cached like the
training set, so a validation costs a forward pass per scene and no rendering after the first. A model with
correspondence tokens also reports ``match_top1``: how often its matcher's best frame-0 patch is the true one, over
the visible ground-truth matches (:mod:`qvggt.train.correspondence`).

The gate: ``train.gate_step`` names the step at which the held-out rotation error must be at least
``train.gate_min_gain`` (a fraction) below identity's and, when ``train.gate_min_yaw_corr`` is set, ``yaw_corr`` at
least that; every validation at or after it is judged (a run that passed once and then falls back under the bar is
stopped too), and a run that fails stops there with :class:`GateFailed` (its state stays resumable in ``work_dir``). A long retrain thereby
spends its hours only while pose is being learned.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from qvggt.config import DataConfig, TrainConfig
from qvggt.data.synthetic import CATEGORIES
from qvggt.eval.metrics.depth import depth_metrics
from qvggt.eval.metrics.pose import pose_auc, pose_errors, reference_yaw_deg
from qvggt.geometry.pose_encoding import pose_encoding_to_extri_intri
from qvggt.model import VGGT
from qvggt.model.correspondence import frame_zero_similarity
from qvggt.train.correspondence import match_targets
from qvggt.train.data import SceneCache

__all__ = ["GateFailed", "ValidationResult", "check_gate", "gate_failed", "validate", "validation_scenes"]


class GateFailed(RuntimeError):
    """The held-out pose error was not far enough below identity's at ``train.gate_step``."""


@dataclass(frozen=True)
class ValidationResult:
    """Held-out scores at one training step (angles in degrees, AUC in percent)."""

    step: int
    rot_median: float
    trans_median: float
    pose_auc30: float
    identity_rot_median: float
    depth_abs_rel: float  # NaN when the model has no depth head
    yaw_corr: float  # 0 when the predicted (or true) yaw does not vary
    match_top1: float = math.nan  # correspondence tokens: the matcher's held-out top-1 (NaN without a matcher)

    @property
    def rot_gain(self) -> float:
        """Fraction by which the rotation error is below identity's (0.15: 15 % lower; negative: worse)."""
        return 1.0 - self.rot_median / self.identity_rot_median if self.identity_rot_median > 0 else 0.0

    def row(self) -> dict[str, float]:
        """A CSV / MLflow row (``rot_gain`` included)."""
        return {**asdict(self), "rot_gain": self.rot_gain}


def validation_scenes(data: DataConfig, n: int) -> tuple[list[int], list[str]]:
    """The first ``n`` validation seeds and their default categories (all 8, the held-out ones included)."""
    seeds = list(data.val_seeds.seeds()[:n])
    if len(seeds) < n:
        raise ValueError(f"train.val_scenes={n} exceeds the {len(seeds)} seeds of data.val_seeds")
    return seeds, [CATEGORIES[s % len(CATEGORIES)] for s in seeds]


@torch.no_grad()
def validate(model: VGGT, cache: SceneCache, step: int, device: str = "cpu", batch_size: int = 8) -> ValidationResult:
    """Score ``model`` on every scene of ``cache`` (module docstring); restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    rots, transes, id_rots, abs_rels, yaws, true_yaws, hits = [], [], [], [], [], [], []
    try:
        for start in range(0, len(cache), batch_size):
            batch = cache.batch(list(range(start, min(start + batch_size, len(cache)))))
            images = batch["images"].to(device)
            preds = model(images)
            hw = tuple(images.shape[-2:])
            if "match_descriptors" in preds:
                index, visible = match_targets(batch, model.cfg.patch_size)
                logits = frame_zero_similarity(preds["match_descriptors"])
                hits.append((logits.argmax(-1).cpu() == index)[visible].numpy())
            extrinsics = pose_encoding_to_extri_intri(preds["pose_enc"].float(), hw)[0].cpu().numpy()
            for j in range(images.shape[0]):
                gt = batch["extrinsics"][j].numpy()
                rot, trans = pose_errors(extrinsics[j], gt)
                rots.append(rot)
                transes.append(trans)
                id_rots.append(pose_errors(np.broadcast_to(np.eye(3, 4), gt.shape), gt)[0])
                yaws.append(reference_yaw_deg(extrinsics[j]))
                true_yaws.append(reference_yaw_deg(gt))
                if "depth" in preds:
                    m = depth_metrics(preds["depth"][j].float().cpu(), batch["depth"][j], batch["valid_mask"][j])
                    abs_rels.append(m["depth_abs_rel"])
    finally:
        model.train(was_training)
    rot, trans = np.concatenate(rots), np.concatenate(transes)
    return ValidationResult(
        step=step,
        rot_median=float(np.median(rot)),
        trans_median=float(np.median(trans)),
        pose_auc30=pose_auc(rot, trans, 30),
        identity_rot_median=float(np.median(np.concatenate(id_rots))),
        depth_abs_rel=float(np.mean(abs_rels)) if abs_rels else math.nan,
        yaw_corr=_correlation(np.concatenate(yaws), np.concatenate(true_yaws)),
        match_top1=float(np.concatenate(hits).mean()) if hits and sum(h.size for h in hits) else math.nan,
    )


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (a constant prediction carries no yaw) or non-finite."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _shortfalls(result: ValidationResult, cfg: TrainConfig) -> list[str]:
    """What ``result`` misses of the gate's demands (empty: passed)."""
    out = []
    if result.rot_gain < cfg.gate_min_gain:
        out.append(
            f"held-out median rotation error {result.rot_median:.1f} deg is {100 * result.rot_gain:.1f} % below "
            f"identity's {result.identity_rot_median:.1f} deg; train.gate_min_gain asks for {100 * cfg.gate_min_gain:.0f} %"
        )
    if cfg.gate_min_yaw_corr is not None and result.yaw_corr < cfg.gate_min_yaw_corr:
        out.append(
            f"held-out yaw correlation {result.yaw_corr:.2f} is below train.gate_min_yaw_corr="
            f"{cfg.gate_min_yaw_corr:.2f} (the views are not being matched)"
        )
    return out


def gate_failed(result: ValidationResult, cfg: TrainConfig) -> bool:
    """Whether ``result`` falls under the gate (at or after ``gate_step``) and pose has not learned enough."""
    return cfg.gate_step is not None and result.step >= cfg.gate_step and bool(_shortfalls(result, cfg))


def check_gate(result: ValidationResult, cfg: TrainConfig) -> None:
    """Raise :class:`GateFailed` when :func:`gate_failed`."""
    if gate_failed(result, cfg):
        raise GateFailed(
            f"gate at step {result.step} (train.gate_step={cfg.gate_step}): {'; '.join(_shortfalls(result, cfg))}. "
            "The run stopped; its state is kept in the work dir (raise train.gate_step or lower the gate's "
            "thresholds, then rerun, to go on)"
        )
