"""Engine pieces the benchmark relies on: graph statistics as JSON, and the fp8-attention head-dim limit on a GPU.

The compiled fp8 attention kernel needs head dim >= 32 (an 8-bit ``tl.dot`` needs K >= 32 on NVIDIA GPUs; see
``qvggt.kernels.attention``). The ``tiny`` preset has head dim 16: its fp8-attention engine keeps working on CPU (the
twin), and moving it to a GPU is refused up front with the head dim and the fallback named, instead of a Triton
compile error at the first forward.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from qvggt.engine import EngineOptions, build_engine
from qvggt.engine.build import _check_fp8_attention_on_cuda
from qvggt.engine.graphs import GraphCache, StaticBufferBackend, describe_key, graph_key
from qvggt.model import build_model, get_preset
from qvggt.model.init import fill_name_seeded_


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return fill_name_seeded_(build_model(get_preset("tiny"))).eval()


def test_graph_stats_as_dict_is_json_with_reasons() -> None:
    cache = GraphCache(lambda x: {"y": x * 2}, enabled=False, backend=StaticBufferBackend())
    x = torch.ones(2, 3, dtype=torch.bfloat16)
    cache(x)
    cache(x)
    stats = cache.stats.as_dict()
    json.dumps(stats)  # JSON-ready
    assert stats["captures"] == 0 and stats["replays"] == 0 and stats["eager"] == 2
    assert stats["fallbacks"] == {"[2, 3] bfloat16 cpu": "disabled (EngineOptions.cuda_graphs=False)"}
    assert describe_key(graph_key((x, None))) == "[2, 3] bfloat16 cpu; None"
    graphed = GraphCache(lambda x: {"y": x * 2}, backend=StaticBufferBackend())
    graphed(x)
    graphed(x)
    assert graphed.stats.as_dict() == {"captures": 1, "replays": 2, "eager": 0, "evictions": 0, "fallbacks": {}}


def test_tiny_fp8_attention_engine_runs_on_cpu_and_is_refused_for_a_gpu(tiny_model) -> None:
    engine = build_engine(copy.deepcopy(tiny_model), EngineOptions(attention="fp8"))
    assert {b.head_dim for b in engine.fused_blocks()} == {16}
    out = engine(torch.rand(1, 2, 3, 28, 28))
    assert torch.isfinite(out["depth"]).all()
    with pytest.raises(ValueError, match=r"head dim 16 .*attention='sdpa'"):
        _check_fp8_attention_on_cuda(engine.fused_blocks())
    sdpa = build_engine(copy.deepcopy(tiny_model))
    _check_fp8_attention_on_cuda(sdpa.fused_blocks())  # SDPA has no such limit: nothing raised


@pytest.mark.cuda
def test_tiny_fp8_attention_engine_refuses_cuda(tiny_model) -> None:
    engine = build_engine(copy.deepcopy(tiny_model), EngineOptions(attention="fp8"))
    with pytest.raises(ValueError, match="head dim 16"):
        engine.cuda()
    with pytest.raises(ValueError, match="head dim 16"):
        build_engine(copy.deepcopy(tiny_model).cuda(), EngineOptions(attention="fp8"))
