"""NFDS features and activation statistics of a model with correspondence tokens are those of its real forward:
the matcher's offsets enter the patch tokens (``VGGT.aggregate``), as in ``model(images)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from qvggt.calib.nfds import QUANTILES, deep_layer_features, frame_cosines
from qvggt.calib.stats import ActivationStats, StatsReport, collect_stats
from qvggt.model import build_model, get_preset

TINY_CORR = get_preset("tiny").replace(correspondence_tokens=True, matcher_depth=2, enable_track=False)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    m = build_model(TINY_CORR).eval()
    with torch.no_grad():
        m.correspondence.embed.weight.mul_(5.0)  # make the offsets matter at random init
    return m


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.rand(3, 3, 42, 42, generator=torch.Generator().manual_seed(1))


def _forward_record(model: nn.Module, images: Tensor) -> tuple[dict[str, tuple[float, float]], list[Tensor]]:
    """norm1 input (mean, population std) of every frame/global block and the aggregator outputs, as recorded
    by hooks during the real ``model(images)``."""
    rec: dict[str, tuple[float, float]] = {}
    outputs: list[list[Tensor]] = []
    agg = model.aggregator
    handles = [agg.register_forward_hook(lambda _m, _a, out: outputs.append(out))]
    for kind in ("frame", "global"):
        for i, block in enumerate(getattr(agg, f"{kind}_blocks")):

            def hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = f"{kind}.{i}") -> None:
                x = args[0].double()
                rec[name] = (float(x.mean()), float(x.std(unbiased=False)))

            handles.append(block.norm1.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(images, keep_all_layers=True)
    finally:
        for h in handles:
            h.remove()
    return rec, outputs[0]


def test_nfds_features_are_those_of_the_real_forward(model: nn.Module, images: Tensor) -> None:
    rec, outputs = _forward_record(model, images)
    feats = deep_layer_features(model, images)
    want = np.asarray([rec[n.rsplit(".", 1)[0]][0 if n.endswith(".mean") else 1] for n in feats["deep_names"]])
    np.testing.assert_allclose(feats["deep"], want, rtol=1e-9, atol=1e-12)
    last = outputs[max(feats["layers"])][0]
    cos = frame_cosines(last, model.aggregator.patch_start_idx)
    np.testing.assert_allclose(feats["frame"], np.quantile(cos, QUANTILES), rtol=0, atol=1e-12)
    # The aggregator alone (no offsets) gives other activations: the bug this guards against.
    bare = deep_layer_features(model.aggregator, images)
    assert np.abs(bare["deep"] - feats["deep"]).max() > 1e-3


def _layer_means(report: StatsReport) -> dict[str, np.ndarray]:
    return {name: report[name].groups["patch"].mean for name in report.layers if "_blocks." in name}


def test_collect_stats_matches_the_real_forward(model: nn.Module, images: Tensor) -> None:
    got = collect_stats(model, [images])  # aggregator layers only: runs model.aggregate, heads skipped
    with torch.no_grad(), ActivationStats().attach(model) as stats:
        model(images)
    want = stats.report()
    assert set(got.layers) == set(want.layers) and any(n.startswith("aggregator.frame_blocks.") for n in got.layers)
    for name in want.layers:
        for g in ("special", "patch"):
            a, b = got[name].groups[g], want[name].groups[g]
            assert a.count == b.count
            np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, atol=1e-9, err_msg=f"{name}/{g}")
            np.testing.assert_allclose(a.std, b.std, rtol=1e-6, atol=1e-9, err_msg=f"{name}/{g}")
            np.testing.assert_allclose(a.absmax, b.absmax, rtol=1e-6, atol=1e-9, err_msg=f"{name}/{g}")
    bare = _layer_means(collect_stats(model.aggregator, [images]))
    real = {k.removeprefix("aggregator."): v for k, v in _layer_means(got).items()}
    assert max(float(np.abs(bare[k] - real[k]).max()) for k in bare) > 1e-3
