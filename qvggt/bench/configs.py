"""The configurations ``qvggt bench`` compares, and how each one's model is built.

``published``: the model as VGGT's README runs it: fp32 weights under bf16 autocast (fp32 residual stream), all 24
aggregator layers kept, fp32 heads. ``bf16-fused``: our engine with float weights (bf16 GEMMs with fused
epilogues, bf16 residual, 4 kept layers, bf16 heads): fusion gains alone. The rest add RTN quantization of the 192
aggregator-block Linears (default coverage) on top of the engine: quantization gains. Engine configs replay a
CUDA graph per input shape; ``w8a8-fp8-eager`` is ``w8a8-fp8`` without graphs: the launch-overhead gain alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from qvggt.engine import Engine, EngineOptions, build_engine
from qvggt.model.vggt import VGGT
from qvggt.quant.formats import parse_format

__all__ = ["BENCH_CONFIGS", "BenchConfig", "build_config_model", "parse_configs"]


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked configuration (see the module docstring)."""

    name: str
    engine: bool
    weight: str | None = None  # QuantFormat name of the weights, None: float
    activation: str | None = None  # QuantFormat name of the dynamic activations, None: weight-only / float
    attention: str = "sdpa"
    description: str = ""
    cuda_graphs: bool = True  # engine configs: replay a CUDA graph per input shape (EngineOptions.cuda_graphs)


BENCH_CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in (
        BenchConfig("published", False, description="fp32 weights, bf16 autocast, 24 layers kept, fp32 heads"),
        BenchConfig("bf16-fused", True, description="engine, bf16 weights and residual, fused epilogues"),
        BenchConfig("w8a8-fp8", True, "fp8_e4m3-channel", "fp8_e4m3-token", description="fp8 weights/activations"),
        # Right after w8a8-fp8: the same model without CUDA graphs, the launch-overhead gain alone.
        BenchConfig(
            "w8a8-fp8-eager",
            True,
            "fp8_e4m3-channel",
            "fp8_e4m3-token",
            description="w8a8-fp8 without CUDA graphs (eager launches)",
            cuda_graphs=False,
        ),
        BenchConfig("w8a8-int8", True, "int8-sym-channel", "int8-sym-token", description="int8 weights/activations"),
        BenchConfig("w4a8-fp8", True, "int4-sym-channel", "fp8_e4m3-token", description="int4 weights on fp8 units"),
        BenchConfig("w4a8-int8", True, "int4-sym-channel", "int8-sym-token", description="int4 weights on int8 units"),
        BenchConfig("w4a4", True, "int4-sym-channel", "int4-sym-token", description="4-bit grids on int8 units"),
        BenchConfig(
            "w8a8-fp8-attn8",
            True,
            "fp8_e4m3-channel",
            "fp8_e4m3-token",
            "fp8",
            description="w8a8-fp8 plus the fp8 flash-attention kernel",
        ),
    )
}


def parse_configs(text: str) -> list[BenchConfig]:
    """Comma-separated config names (or "all") -> configs; raises ValueError listing the known names."""
    names = list(BENCH_CONFIGS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCH_CONFIGS]
    if unknown or not names:
        raise ValueError(f"unknown bench config(s) {unknown or text!r}; choose from {', '.join(BENCH_CONFIGS)}")
    return [BENCH_CONFIGS[n] for n in names]


def build_config_model(master: VGGT, config: BenchConfig, device: torch.device) -> VGGT | Engine:
    """A fresh model of ``config`` on ``device`` from the float ``master`` (left unchanged).

    The copy moves to the device before quantization so RTN runs there (fast on a GPU).
    """
    model = copy.deepcopy(master).to(device).eval()
    if not config.engine:
        return model
    if config.weight is not None:
        from qvggt.quant.api import quantize_
        from qvggt.quant.config import RTNConfig

        act = None if config.activation is None else parse_format(config.activation)
        quantize_(model, RTNConfig(weight=parse_format(config.weight), activation=act))
    return build_engine(model, EngineOptions(attention=config.attention, cuda_graphs=config.cuda_graphs)).to(device)
