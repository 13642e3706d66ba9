"""Tests of the track-head tracker (qvggt/model/heads/tracker.py).

Equivalence with the published BaseTrackerPredictor was checked at development time (bit-identical fp32
outputs on CPU); these tests pin the checkpoint layout, the input contract and behaviour that follows from the
published math.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from qvggt.model.heads.tracker import (
    CorrelationPyramid,
    PackedMultiheadAttention,
    Tracker,
    bilinear_sample,
    frequency_embedding_2d,
    sincos_grid_embedding,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DICT_LISTINGS = (
    REPO_ROOT / "tests" / "data_files" / "vggt_1b_state_dict.txt",
    Path("/work/shared/reference/vggt_1b_state_dict.txt"),
)
PREFIX = "track_head.tracker."

# A small preset: every code path of the full model, a fraction of the cost.
SMALL: dict[str, int] = {
    "latent_dim": 32,
    "hidden_size": 64,
    "depth": 2,
    "corr_levels": 3,
    "corr_radius": 2,
    "num_virtual_tracks": 4,
    "num_heads": 4,
}


def _published_tracker_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(key without prefix, shape) of every track_head.tracker tensor of the released checkpoint, in file order."""
    for path in STATE_DICT_LISTINGS:
        if path.is_file():
            rows = []
            for line in path.read_text().splitlines():
                if line.startswith(PREFIX):
                    name, shape = line.split("\t")
                    dims = shape.strip().strip("[]")
                    rows.append((name[len(PREFIX) :], tuple(int(d) for d in dims.split(",")) if dims else ()))
            return rows
    raise FileNotFoundError("vggt_1b_state_dict.txt listing not found (it ships in tests/data_files)")


def _inputs(B: int, S: int, N: int, C: int, HH: int, WW: int, stride: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fmaps = torch.randn(B, S, C, HH, WW, generator=g)
    size = torch.tensor([stride * WW - 1.0, stride * HH - 1.0])
    query_points = torch.rand(B, N, 2, generator=g) * size
    return query_points, fmaps


@pytest.fixture(scope="module")
def full_tracker() -> Tracker:
    torch.manual_seed(0)
    return Tracker().eval()


@pytest.fixture(scope="module")
def small_tracker() -> Tracker:
    torch.manual_seed(0)
    return Tracker(**SMALL).eval()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layout
# ---------------------------------------------------------------------------------------------------------------


def test_state_dict_matches_published_checkpoint(full_tracker: Tracker) -> None:
    expected = dict(_published_tracker_shapes())
    got = {k: tuple(v.shape) for k, v in full_tracker.state_dict().items()}
    assert len(expected) == 336
    assert sorted(got) == sorted(expected)
    assert got == expected  # same shapes
    assert "updateformer.virual_tracks" in got  # the published misspelling is the key


def test_published_weights_load_strictly_onto_meta_model() -> None:
    # The checkpoint path: build on meta (no init cost), then assign the loaded tensors.
    fresh = {k: torch.full(s, float(i) / 1000) for i, (k, s) in enumerate(_published_tracker_shapes())}
    with torch.device("meta"):
        tracker = Tracker()
    tracker.load_state_dict(fresh, strict=True, assign=True)
    assert not any(p.is_meta for p in tracker.parameters())
    assert torch.equal(tracker.updateformer.virual_tracks, fresh["updateformer.virual_tracks"])
    assert torch.equal(tracker.vis_predictor[0].weight, fresh["vis_predictor.0.weight"])


def test_meta_built_small_model_runs_after_assign_load(small_tracker: Tracker) -> None:
    with torch.device("meta"):
        tracker = Tracker(**SMALL)
    tracker.load_state_dict(small_tracker.state_dict(), strict=True, assign=True)
    query_points, fmaps = _inputs(1, 2, 3, 32, 8, 8)
    with torch.no_grad():
        expected = small_tracker(query_points, fmaps, iters=1)
        got = tracker.eval()(query_points, fmaps, iters=1)
    assert torch.equal(got[0][0], expected[0][0]) and torch.equal(got[1], expected[1])


def test_small_preset_shrinks_every_knob(small_tracker: Tracker) -> None:
    sd = small_tracker.state_dict()
    assert sd["corr_mlp.fc1.weight"].shape == (64, 3 * 5**2)
    assert sd["query_ref_token"].shape == (1, 2, 3 * 32 + 4)
    assert sd["updateformer.virual_tracks"].shape == (1, 4, 1, 64)
    assert sd["updateformer.flow_head.weight"].shape == (32 + 2, 64)
    assert len(small_tracker.updateformer.time_blocks) == 2
    assert len(small_tracker.updateformer.space_point2virtual_blocks) == 2


def test_without_conf_or_space_attention_drops_their_weights() -> None:
    keys = Tracker(**{**SMALL, "predict_conf": False, "use_space_attn": False}).state_dict().keys()
    assert not any(k.startswith("conf_predictor") for k in keys)
    assert not any("virual_tracks" in k or "space_" in k for k in keys)


# ---------------------------------------------------------------------------------------------------------------
# Forward contract
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("B", "S", "N", "HH", "WW", "iters"),
    [(1, 1, 1, 64, 64, 1), (2, 2, 3, 64, 67, 2)],
)
def test_full_model_output_shapes(full_tracker: Tracker, B: int, S: int, N: int, HH: int, WW: int, iters: int) -> None:
    query_points, fmaps = _inputs(B, S, N, 128, HH, WW)
    with torch.no_grad():
        coord_preds, vis, conf = full_tracker(query_points, fmaps, iters=iters)
    assert isinstance(coord_preds, list) and len(coord_preds) == iters
    for coords in coord_preds:
        assert coords.shape == (B, S, N, 2) and coords.dtype == torch.float32
        assert torch.isfinite(coords).all()
    assert vis.shape == conf.shape == (B, S, N)
    assert vis.dtype == conf.dtype == torch.float32
    assert ((vis > 0) & (vis < 1)).all() and ((conf > 0) & (conf < 1)).all()


@pytest.mark.parametrize(("B", "S", "N", "HH", "WW"), [(1, 1, 1, 4, 4), (2, 4, 7, 9, 13), (1, 2, 3, 17, 5)])
def test_small_model_odd_sizes(small_tracker: Tracker, B: int, S: int, N: int, HH: int, WW: int) -> None:
    query_points, fmaps = _inputs(B, S, N, 32, HH, WW)
    with torch.no_grad():
        coord_preds, vis, conf = small_tracker(query_points, fmaps, iters=3)
    assert [c.shape for c in coord_preds] == [(B, S, N, 2)] * 3
    assert vis.shape == conf.shape == (B, S, N)


def test_frame_zero_is_pinned_to_the_queries(small_tracker: Tracker) -> None:
    query_points, fmaps = _inputs(2, 3, 6, 32, 11, 14)
    with torch.no_grad():
        coord_preds, _, _ = small_tracker(query_points, fmaps, iters=3)
    for coords in coord_preds:
        assert torch.equal(coords[:, 0], query_points)  # /2 then *2 is exact in binary floating point


def test_zero_updates_leave_tracks_at_the_queries() -> None:
    tracker = Tracker(**SMALL).eval()
    with torch.no_grad():
        tracker.updateformer.flow_head.weight.zero_()
        tracker.updateformer.flow_head.bias.zero_()
    query_points, fmaps = _inputs(1, 4, 5, 32, 10, 12)
    with torch.no_grad():
        coord_preds, _, _ = tracker(query_points, fmaps, iters=2)
    for coords in coord_preds:
        assert torch.equal(coords, query_points.unsqueeze(1).expand(1, 4, 5, 2))


def test_apply_sigmoid_false_returns_logits(small_tracker: Tracker) -> None:
    query_points, fmaps = _inputs(1, 2, 3, 32, 8, 9)
    with torch.no_grad():
        coords_p, vis_p, conf_p = small_tracker(query_points, fmaps, iters=2)
        coords_l, vis_l, conf_l = small_tracker(query_points, fmaps, iters=2, apply_sigmoid=False)
    assert all(torch.equal(a, b) for a, b in zip(coords_p, coords_l))
    torch.testing.assert_close(torch.sigmoid(vis_l), vis_p)
    torch.testing.assert_close(torch.sigmoid(conf_l), conf_p)


def test_predict_conf_false_returns_none() -> None:
    tracker = Tracker(**{**SMALL, "predict_conf": False}).eval()
    query_points, fmaps = _inputs(1, 2, 3, 32, 8, 8)
    with torch.no_grad():
        _, vis, conf = tracker(query_points, fmaps, iters=1)
    assert conf is None and vis.shape == (1, 2, 3)


def test_without_space_attention_tracks_are_independent() -> None:
    tracker = Tracker(**{**SMALL, "use_space_attn": False}).eval()
    query_points, fmaps = _inputs(1, 3, 4, 32, 9, 9)
    with torch.no_grad():
        all_coords, all_vis, _ = tracker(query_points, fmaps, iters=2)
        one_coords, one_vis, _ = tracker(query_points[:, 2:3], fmaps, iters=2)
    torch.testing.assert_close(one_coords[-1], all_coords[-1][:, :, 2:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_vis, all_vis[:, :, 2:3], rtol=1e-5, atol=1e-5)


def test_deterministic(small_tracker: Tracker) -> None:
    query_points, fmaps = _inputs(2, 3, 4, 32, 12, 10)
    with torch.no_grad():
        first = small_tracker(query_points, fmaps, iters=2)
        second = small_tracker(query_points, fmaps, iters=2)
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0]))
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


def test_gradients_flow_to_every_parameter_and_the_feature_maps() -> None:
    torch.manual_seed(0)
    tracker = Tracker(**SMALL).train()
    query_points, fmaps = _inputs(1, 3, 4, 32, 9, 11)
    query_points.requires_grad_(True)
    fmaps.requires_grad_(True)
    coord_preds, vis, conf = tracker(query_points, fmaps, iters=2)
    loss = sum(c.square().mean() for c in coord_preds) + vis.mean() + conf.mean()
    loss.backward()
    assert fmaps.grad is not None and torch.isfinite(fmaps.grad).all() and fmaps.grad.abs().sum() > 0
    # Queries receive gradient only through the pinned frame 0 (sampling locations are detached, as published).
    assert query_points.grad is not None and torch.isfinite(query_points.grad).all()
    for name, param in tracker.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_iters_zero_returns_no_coordinates(small_tracker: Tracker) -> None:
    query_points, fmaps = _inputs(1, 2, 3, 32, 8, 8)
    with torch.no_grad():
        coord_preds, vis, _ = small_tracker(query_points, fmaps, iters=0)
    assert coord_preds == [] and vis.shape == (1, 2, 3)


@pytest.mark.parametrize(
    ("query_shape", "fmap_shape", "match"),
    [
        ((1, 3, 3), (1, 2, 32, 8, 8), "query_points"),
        ((3, 2), (1, 2, 32, 8, 8), "query_points"),
        ((1, 3, 2), (2, 32, 8, 8), "fmaps"),
        ((2, 3, 2), (1, 2, 32, 8, 8), "batch"),
        ((1, 3, 2), (1, 2, 16, 8, 8), "channels"),
        ((1, 3, 2), (1, 2, 32, 3, 8), "too small"),
    ],
)
def test_invalid_shapes_raise(small_tracker: Tracker, query_shape, fmap_shape, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small_tracker(torch.zeros(query_shape), torch.zeros(fmap_shape))


def test_invalid_configuration_raises() -> None:
    with pytest.raises(ValueError, match="latent_dim"):
        Tracker(**{**SMALL, "latent_dim": 30})
    with pytest.raises(ValueError, match="num_heads"):
        Tracker(**{**SMALL, "num_heads": 5})
    with pytest.raises(ValueError, match="iters"):
        Tracker(**SMALL)(torch.zeros(1, 1, 2), torch.zeros(1, 1, 32, 4, 4), iters=-1)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def test_bilinear_sample_pixel_convention() -> None:
    field = torch.arange(12.0).reshape(1, 1, 3, 4)  # value = 4 * y + x
    coords = torch.tensor([[[[0.0, 0.0], [3.0, 2.0], [1.5, 0.5], [10.0, 1.0]]]])  # (x, y)
    border = bilinear_sample(field, coords).flatten().tolist()
    assert border == pytest.approx([0.0, 11.0, 3.5, 7.0])  # out of range clamps to the border column
    zeros = bilinear_sample(field, coords, padding_mode="zeros").flatten().tolist()
    assert zeros[-1] == 0.0


def test_sincos_grid_embedding_layout() -> None:
    emb = sincos_grid_embedding(16, 3, 5)
    assert emb.shape == (1, 16, 3, 5) and emb.dtype == torch.float32
    origin = emb[0, :, 0, 0]
    torch.testing.assert_close(origin, torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    # First half encodes x (columns), second half y (rows); the lowest frequency is 1.
    torch.testing.assert_close(emb[0, 0], torch.sin(torch.arange(5.0)).expand(3, 5))
    torch.testing.assert_close(emb[0, 8], torch.sin(torch.arange(3.0))[:, None].expand(3, 5))


def test_frequency_embedding_interleaves_sin_cos() -> None:
    xy = torch.tensor([[[0.25, -1.0]]])
    emb = frequency_embedding_2d(xy, 4)  # frequencies 0 and 2 * 1000 / 4 = 500
    expected = [0.0, 1.0, math.sin(125.0), math.cos(125.0), 0.0, 1.0, math.sin(-500.0), math.cos(-500.0)]
    torch.testing.assert_close(emb.flatten(), torch.tensor(expected))


def test_correlation_pyramid_values_and_window_order() -> None:
    g = torch.Generator().manual_seed(0)
    B, S, N, C, H, W = 1, 2, 3, 8, 8, 10
    fmaps = torch.randn(B, S, C, H, W, generator=g)
    feats = torch.randn(B, S, N, C, generator=g)
    coords = torch.tensor([[2.0, 3.0], [5.0, 4.0], [7.0, 6.0]]).expand(B, S, N, 2)
    out = CorrelationPyramid(fmaps, num_levels=2, radius=1).sample(feats, coords)
    assert out.shape == (B, S, N, 2 * 9)
    window = out[..., :9].reshape(B, S, N, 3, 3)
    for n, (x, y) in enumerate(coords[0, 0].long().tolist()):
        for a in range(3):  # window row a: x offset a - 1 (the published, transposed layout)
            for b in range(3):  # window column b: y offset b - 1
                direct = (feats[0, :, n] * fmaps[0, :, :, y + b - 1, x + a - 1]).sum(-1) / math.sqrt(C)
                torch.testing.assert_close(window[0, :, n, a, b], direct)
    # Level 1 samples the 2x average-pooled map at coords / 2: point (2, 3) -> (1, 1.5).
    pooled = torch.nn.functional.avg_pool2d(fmaps[0], 2)  # [S, C, 4, 5]
    centre = (feats[0, :, 0, :, None] * 0.5 * (pooled[:, :, 1, 1] + pooled[:, :, 2, 1])[..., None]).sum(1)
    torch.testing.assert_close(out[0, :, 0, 9 + 4], centre.squeeze(-1) / math.sqrt(C))


@pytest.mark.parametrize("cross", [False, True])
def test_packed_attention_matches_torch_multihead_attention(cross: bool) -> None:
    torch.manual_seed(0)
    ours = PackedMultiheadAttention(32, 4)
    torch_mha = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    torch_mha.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 32)
    ctx = torch.randn(3, 7, 32) if cross else x
    expected, _ = torch_mha(x, ctx, ctx, need_weights=False)
    torch.testing.assert_close(ours(x, ctx), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bilinear_sample_is_grid_sample_on_normalised_pixels(dtype: torch.dtype) -> None:
    """Pixel (x, y) -> [-1, 1] with align_corners=True, built from Python scalars (no per-call host-to-device copy,
    which CUDA-graph capture forbids): bit-identical to normalising with a scale tensor."""
    from qvggt.model.heads.tracker import bilinear_sample

    gen = torch.Generator().manual_seed(0)
    field = torch.randn(3, 5, 17, 23, generator=gen, dtype=dtype)
    coords = torch.rand(3, 7, 4, 2, generator=gen, dtype=dtype) * torch.tensor([22.0, 16.0], dtype=dtype)
    grid = coords * torch.tensor([2 / 22, 2 / 16], dtype=dtype) - 1
    ref = torch.nn.functional.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
    assert torch.equal(bilinear_sample(field, coords), ref)
