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

__all__ = ["finetune_", "plant_massive_activations_"]


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


def finetune_(
    model: VGGT,
    cache_dir: str | Path,
    steps: int = 150,
    lr: float = 1e-4,
    batch_size: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` in place on a training-scene cache (``qvggt.train.data.build_cache``) with the special
    token parameters frozen; returns the loss per step."""
    from qvggt.train.data import SceneCache
    from qvggt.train.losses import vggt_loss
    from qvggt.train.trainer import batch_indices

    cache = SceneCache(cache_dir)
    frozen = {"aggregator.camera_token", "aggregator.register_token"}
    params = [p for n, p in model.named_parameters() if n not in frozen]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="stress fine-tune", disable=not progress, unit="step"):
        batch = cache.batch(batch_indices(step, batch_size, len(cache), seed))
        loss = vggt_loss(model(batch["images"]), batch)["objective"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses
