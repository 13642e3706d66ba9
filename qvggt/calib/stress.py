"""An outlier-stress variant of a trained model: massive activations on the camera and register tokens.

Large trained transformers (VGGT-1B among them, per QuantVGGT) carry a few residual-stream channels with very large
magnitudes on a few tokens; here, the data-independent camera and register tokens. The trained small model shows
only mild tails (docs/BENCHMARKS.md), so quantization methods cannot be told apart on it. This module plants such
channels and fine-tunes the rest of the model briefly so that it keeps its accuracy *with* them in place:

1. ``plant_massive_activations_``: set ``channels`` of the camera and register token parameters to
   +-``magnitude`` (seeded signs). Through each block's LayerNorm they dominate the special tokens' normalised
   inputs (a per-token outlier that per-token scales handle worst); in the residual stream they persist, since
   each block only adds to it.
2. ``finetune_``: AdamW on VGGT's losses over synthetic training scenes with the token parameters frozen, so the
   outliers stay while the blocks learn to live with them.

Channel scaling alone would test nothing (smoothing and rotation absorb it by construction); token-wise outliers
do not fold away.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from qvggt.model.vggt import VGGT
from qvggt.train.schedule import warmup_cosine

__all__ = ["distill_loss", "finetune_", "plant_massive_activations_"]


@torch.no_grad()
def plant_massive_activations_(
    model: VGGT, channels: Sequence[int] | None = None, magnitude: float = 40.0, seed: int = 0
) -> None:
    """Set ``channels`` (default: two, 7 and dim/2 + 7) of every camera / register token to +-``magnitude``
    (signs drawn with ``seed``)."""
    agg = model.aggregator
    dim = agg.camera_token.shape[-1]
    channels = (7, dim // 2 + 7) if channels is None else tuple(channels)
    if not channels or any(not 0 <= c < dim for c in channels):
        raise ValueError(f"channels must be a non-empty subset of [0, {dim}), got {list(channels)}")
    if magnitude <= 0:
        raise ValueError(f"magnitude must be positive, got {magnitude}")
    gen = torch.Generator().manual_seed(seed)
    for tokens in (agg.camera_token, agg.register_token):
        signs = torch.randint(0, 2, (*tokens.shape[:-1], len(channels)), generator=gen).float() * 2 - 1
        tokens[..., list(channels)] = (signs * magnitude).to(tokens.dtype)


def distill_loss(student: dict, teacher: dict, mask: torch.Tensor, camera_weight: float = 5.0) -> torch.Tensor:
    """L1 distance of the student's outputs to the teacher's: final pose encoding (weighted as VGGT weights its
    camera loss), and depth and world points on the valid pixels ``mask`` [B, S, H, W]."""
    loss = camera_weight * (student["pose_enc"] - teacher["pose_enc"]).abs().mean()
    m = mask[..., None].to(student["depth"].dtype)
    n = m.sum().clamp_min(1.0)
    for key in ("depth", "world_points"):
        if key in student:
            err = (student[key] - teacher[key]).abs().sum(-1, keepdim=True) * m
            loss = loss + err.sum() / n
    return loss


def finetune_(
    model: VGGT,
    cache_dir: str | Path,
    steps: int = 300,
    lr: float = 1e-4,
    batch_size: int = 2,
    seed: int = 0,
    warmup_steps: int = 20,
    min_lr_ratio: float = 0.05,
    teacher: VGGT | None = None,
    distill_weight: float = 1.0,
    camera_head_lr_scale: float = 1.0,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` in place on a training-scene cache (``qvggt.train.data.build_cache``) with the special
    token parameters frozen; returns the objective per step.

    The objective is VGGT's loss against ground truth plus, with a ``teacher`` (the model before planting),
    ``distill_weight`` times ``distill_loss`` to the teacher's outputs: the goal is the base model's accuracy, and
    its outputs are a denser, less noisy target than the ground truth of two scenes. The learning rate warms up,
    then decays on a cosine, so the last steps settle instead of hopping at the peak rate. The camera head learns
    at ``camera_head_lr_scale`` times ``lr``: it reads the camera token itself, whose planted channels dominate its
    LayerNorm, so it has the most to relearn (the dense heads read patch tokens only).
    """
    from qvggt.train.data import SceneCache
    from qvggt.train.losses import vggt_loss
    from qvggt.train.trainer import batch_indices

    cache = SceneCache(cache_dir)
    frozen = {"aggregator.camera_token", "aggregator.register_token"}
    named = [(n, p) for n, p in model.named_parameters() if n not in frozen]
    params = [p for _, p in named]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    groups = [
        {"params": [p for n, p in named if not n.startswith("camera_head.")], "lr": lr},
        {"params": [p for n, p in named if n.startswith("camera_head.")], "lr": lr * camera_head_lr_scale},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup_steps, min_lr_ratio))
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    # The camera head's refinement passes each add a delta to the raw encoding; their sum is what its ReLU turns
    # into the field of view, which passes no gradient where planting pushed it below zero.
    deltas: list[torch.Tensor] = []
    hook = model.camera_head.pose_branch.register_forward_hook(lambda _m, _i, out: deltas.append(out))
    model.train()
    losses = []
    try:
        for step in tqdm(range(steps), desc="stress fine-tune", disable=not progress, unit="step"):
            batch = cache.batch(batch_indices(step, batch_size, len(cache), seed))
            deltas.clear()
            preds = model(batch["images"])
            loss = vggt_loss(preds, batch)["objective"]
            if teacher is not None and distill_weight > 0:
                with torch.no_grad():
                    target = teacher(batch["images"])
                loss = loss + distill_weight * distill_loss(preds, target, batch["valid_mask"])
                raw_fov = torch.stack(deltas).sum(0)[..., 7:]
                loss = loss + distill_weight * (raw_fov - target["pose_enc"][..., 7:]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    finally:
        hook.remove()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses
