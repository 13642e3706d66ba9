"""The outlier-stress variant: planted token-wise outliers show up in the special tokens' statistics and survive a
fine-tune that updates everything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qvggt.calib.heavy_tails import heavy_tail_rows
from qvggt.calib.stats import collect_stats
from qvggt.calib.stress import finetune_, plant_massive_activations_
from qvggt.config import DataConfig
from qvggt.model import load_vggt
from qvggt.train.data import build_cache
from qvggt.train.trainer import training_scenes


def _qkv_ratio(model: torch.nn.Module, group: str) -> float:
    gen = torch.Generator().manual_seed(0)
    report = collect_stats(model, [torch.rand(1, 2, 3, 56, 84, generator=gen)])
    return next(r for r in heavy_tail_rows("m", report) if (r["linear"], r["group"]) == ("qkv", group))[
        "median_outlier_ratio"
    ]


def test_planted_channels_make_special_tokens_heavy_tailed() -> None:
    torch.manual_seed(0)
    base = load_vggt(preset="tiny").eval()
    stressed = load_vggt(preset="tiny").eval()
    stressed.load_state_dict(base.state_dict())
    plant_massive_activations_(stressed, channels=(3, 40), magnitude=40.0)
    tokens = torch.cat(
        [stressed.aggregator.camera_token.flatten(0, -2), stressed.aggregator.register_token.flatten(0, -2)]
    )
    assert torch.equal(tokens[:, [3, 40]].abs(), torch.full_like(tokens[:, [3, 40]], 40.0))
    assert _qkv_ratio(stressed, "special") > 3 * _qkv_ratio(base, "special")
    with pytest.raises(ValueError, match="channels"):
        plant_massive_activations_(stressed, channels=(999,))


def test_finetune_keeps_the_outliers_and_trains_the_rest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load_vggt(preset="tiny")
    plant_massive_activations_(model)
    seeds, cats = training_scenes(DataConfig(), 4)
    cache = build_cache(tmp_path, seeds, cats, 2, 56, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = finetune_(model, cache, steps=3, batch_size=1, progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.named_parameters())
    assert torch.equal(after["aggregator.camera_token"], before["aggregator.camera_token"])
    assert torch.equal(after["aggregator.register_token"], before["aggregator.register_token"])
    assert not torch.equal(
        after["aggregator.frame_blocks.0.attn.qkv.weight"], before["aggregator.frame_blocks.0.attn.qkv.weight"]
    )
    assert all(p.requires_grad for p in model.parameters())  # left trainable as it was
