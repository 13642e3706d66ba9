"""The outlier-stress variant: planted token-wise outliers show up in the special tokens' statistics and survive a
fine-tune that updates everything else."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from qvggt.calib.heavy_tails import heavy_tail_rows
from qvggt.calib.stats import collect_stats
from qvggt.calib.stress import distill_loss, finetune_, plant_massive_activations_
from qvggt.config import DataConfig
from qvggt.model import load_vggt
from qvggt.train.data import SceneCache, build_cache
from qvggt.train.schedule import warmup_cosine
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


def test_camera_head_learns_at_its_own_rate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load_vggt(preset="tiny")
    seeds, cats = training_scenes(DataConfig(), 2)
    cache = build_cache(tmp_path, seeds, cats, 2, 56, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune_(model, cache, steps=1, batch_size=1, warmup_steps=1, camera_head_lr_scale=0.0, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(n.startswith("camera_head.") for n in changed)
    assert "aggregator.frame_blocks.0.attn.qkv.weight" in changed


def test_lr_warms_up_then_decays_on_a_cosine_to_the_floor() -> None:
    f = [warmup_cosine(s, steps=100, warmup_steps=10, min_lr_ratio=0.05) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))  # never rises after the warm-up
    assert f[55] == pytest.approx(0.05 + 0.95 * 0.5)  # half-way through the decay
    assert f[100] == pytest.approx(0.05) and f[119] == pytest.approx(0.05)


def test_distill_loss_is_the_masked_l1_to_the_teacher() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {"pose_enc": (1, 2, 9), "depth": (1, 2, 4, 4, 1), "world_points": (1, 2, 4, 4, 3)}
    teacher = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True  # 16 valid pixels
    assert float(distill_loss(teacher, teacher, mask)) == 0.0
    student = {k: v.clone().requires_grad_(True) for k, v in teacher.items()}
    with torch.no_grad():
        student["pose_enc"] += 0.1  # 5 * 0.1
        student["depth"][:, :, :2] += 0.5  # masked in: 0.5 per valid pixel
        student["world_points"][:, :, 2:] += 7.0  # masked out: ignored
    loss = distill_loss(student, teacher, mask, camera_weight=5.0)
    assert float(loss.detach()) == pytest.approx(0.5 + 0.5, rel=1e-5)
    loss.backward()
    assert float(student["world_points"].grad[:, :, 2:].abs().sum()) == 0.0


def test_distillation_pulls_the_stressed_model_toward_the_teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = load_vggt(preset="tiny").eval()
    seeds, cats = training_scenes(DataConfig(), 4)
    cache = build_cache(tmp_path, seeds, cats, 2, 56, progress=False)
    batch = SceneCache(cache).batch([0, 1, 2, 3])
    with torch.no_grad():
        target = teacher(batch["images"])

    def gap(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(distill_loss(model(batch["images"]), target, batch["valid_mask"]))

    def stressed(distill_weight: float | None) -> torch.nn.Module:
        model = load_vggt(preset="tiny")
        model.load_state_dict(teacher.state_dict())
        plant_massive_activations_(model)
        if distill_weight is not None:
            finetune_(
                model,
                cache,
                steps=6,
                lr=1e-3,
                warmup_steps=1,
                teacher=teacher,
                distill_weight=distill_weight,
                progress=False,
            )
        return model

    planted = gap(stressed(None))
    # Ground truth alone barely closes the gap the outliers opened; the teacher's outputs close much more of it.
    assert planted - gap(stressed(20.0)) > 2 * (planted - gap(stressed(0.0))) > 0
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher is only read


def test_distillation_reaches_a_field_of_view_below_the_relu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = load_vggt(preset="tiny").eval()
    seeds, cats = training_scenes(DataConfig(), 2)
    cache = build_cache(tmp_path, seeds, cats, 2, 56, progress=False)

    def fov_bias_after_one_step(distill_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        model = load_vggt(preset="tiny")
        model.load_state_dict(teacher.state_dict())
        bias = model.camera_head.pose_branch.fc2.bias
        with torch.no_grad():
            bias[7:] -= 1.0  # every pass: the raw field of view ends far below zero, where the ReLU passes nothing
            assert float(model(SceneCache(cache).batch([0])["images"])["pose_enc"][..., 7:].abs().max()) == 0.0
            before = bias[7:].clone()
        finetune_(
            model,
            cache,
            steps=1,
            batch_size=1,
            warmup_steps=1,
            teacher=teacher,
            distill_weight=distill_weight,
            progress=False,
        )
        return before, bias[7:].detach()

    before, after = fov_bias_after_one_step(0.0)
    assert torch.equal(before, after)  # ground truth alone cannot move it
    before, after = fov_bias_after_one_step(1.0)
    assert bool((after > before).all())  # the raw-FoV distillation pulls it up toward the teacher's
