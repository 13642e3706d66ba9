"""Correspondence tokens: the matcher's matches, their offsets, their embedding into the patch tokens, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qvggt.model import build_model, get_preset, load_vggt, save_checkpoint
from qvggt.model.checkpoint import CheckpointError
from qvggt.model.correspondence import match_offsets, match_to_first_frame

TINY_CORR = get_preset("tiny").replace(correspondence_tokens=True, matcher_depth=2, enable_track=False)


def test_matches_recover_a_permutation_of_frame_zero() -> None:
    g = torch.Generator().manual_seed(0)
    d0 = F.normalize(torch.randn(2, 9, 16, generator=g), dim=-1)
    perm = torch.randperm(9, generator=g)
    desc = torch.stack([d0, d0[:, perm]], 1)  # frame 1's patch i looks like frame 0's patch perm[i]
    index, conf = match_to_first_frame(desc, temperature=0.05)
    assert torch.equal(index[:, 0], torch.arange(9).expand(2, 9))  # frame 0: itself
    assert torch.equal(index[:, 1], perm.expand(2, 9))
    assert torch.all(conf[:, 0] == 0) and torch.all(conf[:, 1] > 0.5)
    # A flat similarity (every frame-0 patch alike) gives the lowest confidence, 1/N.
    flat = torch.stack([torch.ones(1, 9, 4) / 2, torch.ones(1, 9, 4) / 2], 1)
    assert torch.allclose(match_to_first_frame(flat, 0.1)[1][:, 1], torch.full((1, 9), 1 / 9))


def test_offsets_are_grid_steps_in_image_units() -> None:
    gh, gw = 2, 3  # patches 0 1 2 / 3 4 5
    index = torch.tensor([[5, 1, 2, 3, 4, 0]])
    du, dv = match_offsets(index, (gh, gw))
    assert torch.allclose(du, torch.tensor([[2, 0, 0, 0, 0, -2]]) / gw)
    assert torch.allclose(dv, torch.tensor([[1, 0, 0, 0, 0, -1]]) / gh)


def test_model_embeds_the_matches_into_later_frames_only() -> None:
    torch.manual_seed(0)
    model = build_model(TINY_CORR).eval()
    images = torch.rand(1, 3, 3, 42, 42)
    with torch.no_grad():
        out = model(images)
        assert out["match_descriptors"].shape == (1, 3, 9, TINY_CORR.matcher_dim)
        assert torch.allclose(out["match_descriptors"].norm(dim=-1), torch.ones(1, 3, 9))
        offsets, _ = model.correspondence(images)
        offsets = offsets.reshape(1, 3, 9, -1)
        # Frame 0 gets the embedding of zeros (the bias); later frames carry their matches.
        assert torch.allclose(offsets[0, 0], model.correspondence.embed.bias.expand(9, -1))
        assert not torch.allclose(offsets[0, 1], offsets[0, 0])
        # The matches reach the outputs: a different embedding changes the poses.
        model.correspondence.embed.weight.mul_(5.0)
        assert not torch.allclose(model(images)["pose_enc"], out["pose_enc"])


def test_matcher_is_trained_by_its_own_loss_only() -> None:
    """Gradients of the pose loss stop at the argmax: the matcher learns from InfoNCE, not from the camera path."""
    torch.manual_seed(0)
    model = build_model(TINY_CORR).train()
    model.aggregator.gradient_checkpointing = False
    model.correspondence.matcher.backbone.gradient_checkpointing = False
    model(torch.rand(1, 2, 3, 42, 42))["pose_enc"].sum().backward()
    assert all(p.grad is None for p in model.correspondence.matcher.parameters())
    assert model.correspondence.embed.weight.grad is not None
    assert model.aggregator.frame_blocks[0].attn.qkv.weight.grad is not None


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(TINY_CORR).eval()
    path = save_checkpoint(model, tmp_path / "corr.safetensors")
    loaded = load_vggt(path)
    assert loaded.cfg.correspondence_tokens and loaded.correspondence is not None
    images = torch.rand(1, 2, 3, 42, 42)
    with torch.no_grad():
        assert torch.equal(loaded(images)["pose_enc"], model(images)["pose_enc"])

    # A plain checkpoint under a correspondence config: the matcher's tensors are missing, and the error says so.
    plain = save_checkpoint(build_model(get_preset("tiny")), tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="correspondence"):
        load_vggt(plain, preset=get_preset("tiny").replace(correspondence_tokens=True))
    # VGGT-1B has no matcher: the option is refused before any weight is read.
    with pytest.raises(ValueError, match="vggt-1b has no correspondence tokens"):
        load_vggt(tmp_path / "absent.pt", preset=get_preset("vggt-1b").replace(correspondence_tokens=True))


def test_patch_offsets_of_the_wrong_shape_are_refused() -> None:
    model = build_model(get_preset("tiny")).eval()
    with pytest.raises(ValueError, match="patch_offsets must match"):
        model.aggregator(torch.rand(1, 2, 3, 42, 42), patch_offsets=torch.zeros(2, 8, 64))
