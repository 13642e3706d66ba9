"""Streaming activation statistics: moment merge vs numpy/scipy, the special/patch split through a real tiny
VGGT forward, bounded memory, and the save/load round trip."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from qvggt.calib.stats import (
    ActivationStats,
    LogBins,
    Moments,
    StatsReport,
    TokenLayout,
    collect_stats,
    default_layer_names,
)
from qvggt.model import build_model, get_preset

QKV0 = "aggregator.frame_blocks.0.attn.qkv"
GQKV0 = "aggregator.global_blocks.0.attn.qkv"


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("tiny")).eval()


def _images(B: int = 1, S: int = 2, H: int = 28, W: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, S, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _heavy_tailed(n: int, seed: int = 0) -> np.ndarray:
    """[n, 5] channels: Student-t(3), lognormal, t(5) with a 1e4 offset (cancellation trap), sparse spikes, normal."""
    rng = np.random.default_rng(seed)
    spikes = rng.normal(size=n) * (rng.random(n) < 0.01) * 1e3 + rng.normal(size=n) * 1e-2
    cols = [
        rng.standard_t(3, n),
        rng.lognormal(0.0, 1.5, n),
        1e4 + rng.standard_t(5, n),
        spikes,
        rng.normal(size=n) * 3 - 7,
    ]
    return np.stack(cols, 1)


def _assert_rel(a: np.ndarray, b: np.ndarray, rtol: float) -> None:
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


def test_moment_merge_matches_numpy_and_scipy_on_uneven_chunks() -> None:
    data = _heavy_tailed(6000)
    bounds = [0, 1, 3, 4, 1000, 1001, 2500, 5999, 6000]  # chunks of 1, 2, 1, 996, 1, 1499, 3499, 1 rows
    acc = Moments.zeros(data.shape[1])
    for lo, hi in itertools.pairwise(bounds):
        acc.merge_(Moments.from_rows(torch.from_numpy(data[lo:hi])))
    assert acc.n == len(data)
    _assert_rel(acc.mean.numpy(), data.mean(0), 1e-12)
    _assert_rel(acc.std().numpy(), data.std(0), 1e-9)
    _assert_rel(acc.skewness().numpy(), scipy.stats.skew(data, axis=0, bias=True), 1e-8)
    _assert_rel(acc.kurtosis().numpy(), scipy.stats.kurtosis(data, axis=0, fisher=True, bias=True), 1e-8)
    # Merging two accumulators (as "all" = special + patch is built) is the same as streaming everything.
    a, b = Moments.from_rows(torch.from_numpy(data[:17])), Moments.from_rows(torch.from_numpy(data[17:]))
    _assert_rel(a.merged(b).kurtosis().numpy(), acc.kurtosis().numpy(), 1e-9)


def test_constant_channel_has_nan_shape_statistics() -> None:
    x = torch.cat([torch.full((50, 1), 3.7, dtype=torch.float32), torch.randn(50, 1)], 1)
    m = Moments.from_rows(x[:20]).merged(Moments.from_rows(x[20:]))
    assert torch.isnan(m.kurtosis()[0]) and torch.isfinite(m.kurtosis()[1])
    assert m.std()[0] < 1e-6


def test_synthetic_layout_split_and_histograms_match_numpy() -> None:
    """Tokens on dim -2 in runs of P; positions < patch_start_idx are special. Tiny chunks force many merges."""
    P, ps, C = 7, 2, 6
    rng = np.random.default_rng(1)
    x = rng.standard_t(4, size=(3, 4 * P, C)).astype(np.float32)  # like a global block: [B, S*P, C]
    x[:, ::P, 3] = 5e3  # a huge value on channel 3 of every frame's first special token
    model = nn.Sequential(nn.Linear(C, C))
    layout = TokenLayout(patch_start_idx=ps, tokens_per_frame=P)
    with ActivationStats(LogBins(1e-4, 1e5, 4), layout=layout, chunk_elements=3 * C).attach(model, ["0"]) as stats:
        model(torch.from_numpy(x[:2]))
        model(torch.from_numpy(x[2:]))
    rep = stats.report()
    layer = rep["0"]
    is_special = (np.arange(4 * P) % P) < ps
    special = x[:, is_special].reshape(-1, C).astype(np.float64)
    patch = x[:, ~is_special].reshape(-1, C).astype(np.float64)
    edges = rep.bins.edges()
    for group, ref in (("special", special), ("patch", patch), ("all", np.concatenate([special, patch]))):
        s = layer.groups[group]
        assert s.count == len(ref)
        _assert_rel(s.absmax, np.abs(ref).max(0), 1e-12)
        _assert_rel(s.mean, ref.mean(0), 1e-9)
        _assert_rel(s.std, ref.std(0), 1e-9)
        _assert_rel(s.kurtosis, scipy.stats.kurtosis(ref, axis=0), 1e-8)
        mag = np.abs(ref).ravel()
        expected = np.concatenate([[(mag < edges[0]).sum()], np.histogram(mag, edges)[0], [(mag >= edges[-1]).sum()]])
        np.testing.assert_array_equal(s.hist, expected)
        norms = np.linalg.norm(ref, axis=1)
        assert s.norm_max == pytest.approx(norms.max(), rel=1e-12)
        assert s.norm_mean == pytest.approx(norms.mean(), rel=1e-12)
        assert s.norm_hist.sum() == len(ref)
    assert layer.groups["special"].absmax[3] == 5e3 and layer.groups["patch"].absmax[3] < 5e3
    assert rep.summary()["0"]["special"]["outlier_ratio"] > 100


def test_real_tiny_vggt_split_counts_and_values(tiny) -> None:
    B, S, H, W = 2, 2, 28, 42
    agg = tiny.aggregator
    ps = agg.patch_start_idx
    P = ps + (H // 14) * (W // 14)
    captured: dict[str, torch.Tensor] = {}
    spy = [
        agg.frame_blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: captured.__setitem__(QKV0, a[0])),
        agg.global_blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: captured.__setitem__(GQKV0, a[0])),
    ]
    saved = agg.camera_token.detach().clone()
    try:
        with torch.no_grad():
            agg.camera_token[..., 3] = 1e3  # both slots: frame 0 and the others
        layers = [*default_layer_names(tiny), "aggregator.frame_blocks.0.norm1"]
        with torch.no_grad(), ActivationStats().attach(tiny, layers) as stats:
            tiny(_images(B, S, H, W))  # the full VGGT forward, heads included
        rep = stats.report()
    finally:
        with torch.no_grad():
            agg.camera_token.copy_(saved)
        for h in spy:
            h.remove()

    assert rep.meta["tokens_per_frame"] == [P] and rep.meta["num_batches"] == 1 and rep.meta["num_frames"] == B * S
    assert len(rep.layers) == 4 * 2 * get_preset("tiny").depth + 1
    for name in (QKV0, GQKV0):
        g = rep[name].groups
        assert g["special"].count == B * S * ps
        assert g["patch"].count == B * S * (P - ps)
        assert g["all"].count == B * S * P
        # Independent check against the captured input: frame block [B*S, P, C], global block [B, S*P, C].
        x = captured[name].double().reshape(B * S, P, -1)
        np.testing.assert_allclose(g["special"].absmax, x[:, :ps].abs().amax((0, 1)).numpy(), rtol=1e-12)
        np.testing.assert_allclose(g["patch"].mean, x[:, ps:].mean((0, 1)).numpy(), rtol=1e-9, atol=1e-12)
    # The planted camera-token value reaches block 0's residual input unchanged, in the special group only.
    norm1 = rep["aggregator.frame_blocks.0.norm1"].groups
    assert norm1["special"].absmax[3] == pytest.approx(1e3)
    assert norm1["patch"].absmax[3] < 100


def test_other_layers_are_all_only_and_conv_channels_come_first(tiny) -> None:
    layers = [QKV0, "aggregator.patch_embed.patch_embed.proj", "camera_head.trunk.0.attn.qkv"]
    B, S, H, W = 1, 2, 28, 28
    rep = collect_stats(tiny, [_images(B, S, H, W)], layers)
    assert set(rep[QKV0].groups) == {"special", "patch", "all"}
    conv = rep["aggregator.patch_embed.patch_embed.proj"]
    assert set(conv.groups) == {"all"} and conv.in_features == 3
    assert conv.groups["all"].count == B * S * H * W  # normalised pixels, one row per pixel
    assert set(rep["camera_head.trunk.0.attn.qkv"].groups) == {"all"}
    assert not tiny.training


def test_memory_is_independent_of_the_number_of_batches(tiny) -> None:
    stats = ActivationStats()
    sizes, counts = [], []
    with torch.no_grad(), stats.attach(tiny):
        for i in range(10):
            tiny.aggregator(_images(seed=i), keep_layers=())
            if i + 1 in (2, 10):
                sizes.append(stats.state_nbytes())
                counts.append(stats.report()[QKV0].groups["all"].count)
    assert sizes[0] == sizes[1] > 0
    assert counts[1] == 5 * counts[0]
    assert stats.report().meta["num_batches"] == 10


def test_save_load_round_trip_is_exact_and_deterministic(tiny, tmp_path) -> None:
    batches = [_images(seed=1), _images(seed=2)]
    rep = collect_stats(tiny, batches)
    rep.save(tmp_path / "a")
    collect_stats(tiny, batches).save(tmp_path / "b")
    for f in ("stats.json", "stats.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    text = (tmp_path / "a" / "stats.json").read_text()
    assert str(tmp_path) not in text
    doc = json.loads(text)
    assert doc["meta"]["model"] == "tiny" and doc["meta"]["num_batches"] == 2
    assert doc["layers"][0]["groups"]["special"]["summary"]["max_kurtosis"] is not None

    back = StatsReport.load(tmp_path / "a")
    assert list(back.layers) == list(rep.layers) and back.meta == rep.meta and back.bins == rep.bins
    for name, layer in rep.layers.items():
        assert back[name].in_features == layer.in_features and set(back[name].groups) == set(layer.groups)
        for g, s in layer.groups.items():
            t = back[name].groups[g]
            for f in ("absmax", "mean", "std", "skewness", "kurtosis", "hist", "norm_hist"):
                np.testing.assert_array_equal(getattr(t, f), getattr(s, f))
            for f in ("count", "nonfinite", "norm_max", "norm_mean", "norm_std"):
                assert getattr(t, f) == getattr(s, f)
    assert back.summary() == rep.summary()


def test_bad_inputs_raise(tiny) -> None:
    with pytest.raises(ValueError, match="no module named"):
        ActivationStats().attach(tiny, ["aggregator.nope"])
    with pytest.raises(ValueError, match="needs a VGGT aggregator"):
        ActivationStats().attach(nn.Sequential(nn.Linear(2, 2)))
    model = nn.Sequential(nn.Linear(4, 4))
    with ActivationStats(layout=TokenLayout(1, 3)).attach(model, ["0"]), pytest.raises(ValueError, match="frames"):
        model(torch.randn(2, 4, 4))


def test_stats_module_does_not_import_matplotlib() -> None:
    code = "import sys, qvggt.calib, qvggt.calib.stats; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"
