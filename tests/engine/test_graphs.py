"""Per-shape CUDA graphs of the engine: the cache logic on CPU, real capture and replay on a GPU (``cuda`` marker).

On CPU the cache runs with ``StaticBufferBackend`` (a graph's buffer semantics: static inputs copied in, static
outputs overwritten on every replay, recomputed eagerly) or with the real ``CudaGraphBackend``, which refuses CPU
tensors and so exercises the logged eager fallback. ``test_graph_replay_equals_eager_on_gpu`` captures real graphs
(run by scripts/gpu_check.sh; deselected without a GPU by tests/conftest.py).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from qvggt.engine import EngineOptions, build_engine
from qvggt.engine.graphs import GraphCache, StaticBufferBackend, graph_key
from qvggt.model import build_model, get_preset
from qvggt.model.init import fill_name_seeded_


def _fn(x: torch.Tensor, y: torch.Tensor | None) -> dict:
    """A small real computation with a nested output (tensors and a plain value), like the model's dict."""
    h = torch.tanh(x @ x.T)
    if y is not None:
        h = h + y.sum()
    return {"h": h, "parts": [h.sum(0), x.mean()], "rows": x.shape[0]}


def _same(a: dict, b: dict) -> bool:
    return (
        torch.equal(a["h"], b["h"])
        and all(torch.equal(p, q) for p, q in zip(a["parts"], b["parts"], strict=True))
        and a["rows"] == b["rows"]
    )


def test_same_shape_replays_and_results_stay_put() -> None:
    cache = GraphCache(_fn, backend=StaticBufferBackend())
    x1, x2 = torch.randn(5, 3), torch.randn(5, 3)
    r1 = cache(x1, None)
    assert cache.stats.captures == 1 and cache.stats.replays == 1 and cache.stats.eager == 0
    r2 = cache(x2, None)
    assert cache.stats.captures == 1 and cache.stats.replays == 2
    assert _same(r1, _fn(x1, None)) and _same(r2, _fn(x2, None))  # r1 was not overwritten by the second replay
    x1.add_(1.0)  # the caller's input is copied into a static buffer, never aliased
    assert _same(cache(x2, None), _fn(x2, None))


def test_each_shape_gets_its_graph_and_the_least_recent_is_evicted() -> None:
    cache = GraphCache(_fn, max_shapes=2, backend=StaticBufferBackend())
    a, b, c = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 5)
    y = torch.randn(2)
    for x in (a, b, a):
        assert _same(cache(x, None), _fn(x, None))
    assert cache.keys() == [graph_key((b, None)), graph_key((a, None))]
    assert _same(cache(c, y), _fn(c, y))  # a new signature (and an optional input present): b, least recent, goes
    assert cache.keys() == [graph_key((a, None)), graph_key((c, y))]
    assert cache.stats.captures == 3 and cache.stats.evictions == 1
    assert _same(cache(b, None), _fn(b, None))  # b again: captured anew
    assert cache.stats.captures == 4 and cache.stats.evictions == 2
    assert graph_key((a, None)) != graph_key((a.double(), None)) != graph_key((a, y))


def test_cpu_inputs_run_eagerly_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    cache = GraphCache(_fn)  # the real CUDA backend
    x = torch.randn(3, 3)
    with caplog.at_level(logging.INFO, logger="qvggt.engine"):
        for _ in range(3):
            assert _same(cache(x, None), _fn(x, None))
    assert cache.stats.eager == 3 and cache.stats.captures == 0 and cache.keys() == []
    assert "CUDA graphs need CUDA tensors" in cache.fallbacks[graph_key((x, None))]
    assert sum("running eagerly" in r.message for r in caplog.records) == 1  # logged once per signature


class _RefusingBackend(StaticBufferBackend):
    """Capture fails the way a host synchronisation inside the forward makes it fail on a GPU."""

    def capture(self, fn, static):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def test_failed_capture_falls_back_to_eager_for_that_shape(caplog: pytest.LogCaptureFixture) -> None:
    cache = GraphCache(_fn, backend=_RefusingBackend())
    x = torch.randn(3, 3)
    with caplog.at_level(logging.WARNING, logger="qvggt.engine"):
        assert _same(cache(x, None), _fn(x, None))
        assert _same(cache(x, None), _fn(x, None))
    assert "capture failed: RuntimeError" in cache.fallbacks[graph_key((x, None))]
    assert cache.stats.eager == 2 and cache.keys() == []
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_disabled_runs_eagerly() -> None:
    cache = GraphCache(_fn, enabled=False, backend=StaticBufferBackend())
    x = torch.randn(3, 3)
    assert _same(cache(x, None), _fn(x, None))
    assert cache.stats.captures == 0 and "disabled" in cache.fallbacks[graph_key((x, None))]
    with pytest.raises(ValueError, match="max_shapes"):
        GraphCache(_fn, max_shapes=0)
    with pytest.raises(ValueError, match="graph_max_shapes"):
        EngineOptions(graph_max_shapes=0)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return fill_name_seeded_(build_model(get_preset("tiny"))).eval()


def test_engine_through_the_cache_matches_eager_engine(tiny_model) -> None:
    """The whole engine forward (bf16 fused path: quick on CPU) through the cache's static buffers."""
    eager = build_engine(copy.deepcopy(tiny_model), EngineOptions(cuda_graphs=False))
    graphed = build_engine(copy.deepcopy(tiny_model))
    assert graphed.options.cuda_graphs
    graphed.graphs.backend = StaticBufferBackend()  # CPU stand-in for CudaGraphBackend
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.rand(1, 2, 3, 28, 42, generator=gen) for _ in range(2)] + [torch.rand(1, 28, 28, generator=gen)]
    with pytest.raises(ValueError, match="images must be"):
        graphed(inputs[2])  # bad input: raised before any capture, nothing recorded
    inputs[2] = torch.rand(1, 3, 28, 28, generator=gen)  # [S, 3, H, W]: one frame
    outs = [graphed(x) for x in inputs]
    stats = graphed.graph_stats()
    assert stats.captures == 2 and stats.replays == 3 and not stats.fallbacks
    for x, out in zip(inputs, outs, strict=True):
        want = eager(x)
        assert set(out) == set(want)
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(out[k], v), k
    assert "disabled" in next(iter(eager.graph_stats().fallbacks.values()))
    # On CPU with the real backend: eager, with the reason.
    cpu = build_engine(copy.deepcopy(tiny_model))
    cpu(inputs[0])
    assert "CUDA tensors" in next(iter(cpu.graph_stats().fallbacks.values()))


@pytest.mark.cuda
def test_graph_replay_equals_eager_on_gpu(tiny_model) -> None:
    """Real CUDA graphs: capture on the first call per shape, replay after; outputs equal the eager engine's."""
    from qvggt.engine import kernel_call_counts, reset_kernel_call_counts
    from qvggt.quant.api import quantize_
    from qvggt.quant.quarot import QuaRotConfig

    q = copy.deepcopy(tiny_model)
    quantize_(q, QuaRotConfig(weight=_fmt("fp8_e4m3-channel"), activation=_fmt("fp8_e4m3-token")))
    eager = build_engine(copy.deepcopy(q), EngineOptions(cuda_graphs=False)).cuda()
    graphed = build_engine(q).cuda()
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, 3, 56, 84, generator=gen).cuda() for _ in range(3)]
    images.append(torch.rand(1, 2, 3, 42, 56, generator=gen).cuda())
    reset_kernel_call_counts()
    eager(images[0])
    per_forward = kernel_call_counts()["kernel"]
    assert per_forward["layernorm_hadamard_quant"] > 0  # quarot: qkv/fc1 rotations in the LayerNorm kernel
    first = graphed(images[0])
    reset_kernel_call_counts()
    outs = [first] + [graphed(x) for x in images[1:3]]
    replay_counts = kernel_call_counts()
    outs.append(graphed(images[3]))
    stats = graphed.graph_stats()
    assert not stats.fallbacks, stats.fallbacks
    assert stats.captures == 2 and stats.replays == 4
    # Replays run no launcher code; the cache advances the counters by the captured forward's launches.
    assert replay_counts["kernel"] == {k: 2 * n for k, n in per_forward.items()}
    assert sum(replay_counts["fallback"].values()) == 0
    for x, out in zip(images, outs, strict=True):
        want = eager(x)
        for k in ("depth", "world_points", "pose_enc"):
            torch.testing.assert_close(out[k], want[k], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(first["depth"], eager(images[0])["depth"], rtol=1e-3, atol=1e-3)  # not overwritten


@pytest.mark.cuda
def test_graph_replay_with_special_rows_on_gpu(tiny_model) -> None:
    """W4A4 with 8-bit special-token rows (quantvggt's camera/register tokens): the tokens per frame P reach the
    kernels as plain arguments, so a graph records the P of its capture; keyed by input shape, which fixes P, each
    shape's replays must equal the eager engine's output."""
    from qvggt.quant.api import quantize_
    from qvggt.quant.config import RTNConfig, weight_activation_formats
    from qvggt.quant.linear import QuantLinear
    from qvggt.quant.special_tokens import install_token_period_hook

    q = copy.deepcopy(tiny_model)
    w, a = weight_activation_formats(4, 4)
    quantize_(q, RTNConfig(weight=w, activation=a))
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear) and (".frame_blocks." in name or ".global_blocks." in name):
            m.set_special_rows(5, _fmt("int8-sym-token"))
    eager_model = copy.deepcopy(q)
    for model in (q, eager_model):
        install_token_period_hook(model)
    eager = build_engine(eager_model, EngineOptions(cuda_graphs=False)).cuda()
    graphed = build_engine(q).cuda()
    assert any(b.fc1.special_tokens == 5 for b in graphed.fused_blocks())
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 2, 3, h, w, generator=gen).cuda() for h, w in ((56, 84), (42, 56), (56, 84))]
    for x in images:  # P = 5 + 24, then 5 + 12, then the first shape's graph again
        out, want = graphed(x), eager(x)
        for k in ("depth", "pose_enc"):
            torch.testing.assert_close(out[k], want[k], rtol=1e-3, atol=1e-3)
    stats = graphed.graph_stats()
    assert not stats.fallbacks and stats.captures == 2 and stats.replays == 3


def _fmt(name: str):
    from qvggt.quant.formats import parse_format

    return parse_format(name)
