"""The engine on CPU: fused blocks (kernel twins) against the model they replace, formats, errors, counters.

GPU behaviour (kernels actually launched, no fallback) is checked by tests/kernels/test_kernels_cuda.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from qvggt_testing import quantized_block

from qvggt.engine import (
    EngineOptions,
    UnsupportedLayerError,
    build_engine,
    kernel_call_counts,
    reset_kernel_call_counts,
)
from qvggt.engine.block import FusedBlock
from qvggt.kernels import gemm
from qvggt.model import build_model, get_preset
from qvggt.model.init import fill_name_seeded_
from qvggt.model.layers import Block
from qvggt.model.rope import RotaryEmbedding2D, grid_positions
from qvggt.quant.api import quantize_
from qvggt.quant.config import RTNConfig, weight_activation_formats
from qvggt.quant.formats import parse_format


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def block_and_input() -> tuple[Block, torch.Tensor, object]:
    torch.manual_seed(0)
    # LayerScale 1: the residual branch dominates the output, so the comparison sees the branch's error.
    block = Block(256, 4, init_values=1.0, qk_norm=True, rope=RotaryEmbedding2D(100.0)).eval()
    pos = grid_positions(2, 4, 8, 5, torch.device("cpu"))
    x = torch.randn(2, 37, 256).bfloat16().float()
    return block, x, pos


@pytest.mark.parametrize(
    "wbits,abits,fp8,bound",
    [(None, None, False, 5e-3), (8, 8, False, 8e-3), (8, 8, True, 1.5e-2), (4, 8, False, 8e-3), (4, 4, False, 0.08)],
)
def test_fused_block_matches_the_checkpoint_it_runs(block_and_input, wbits, abits, fp8, bound) -> None:
    """FusedBlock (bf16 residual, fused epilogues, fc2 input per 1x128 tile) vs the fp32 fake-quant reference."""
    block, x, pos = block_and_input
    if wbits is not None:
        block = quantized_block(block, *weight_activation_formats(wbits, abits, fp8=fp8))
    with torch.no_grad():
        want = block(x, pos)
        got = FusedBlock(copy.deepcopy(block), "b")(x, pos)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert _rel(got, want) < bound


def test_quantization_error_exceeds_engine_error(block_and_input) -> None:
    """The engine adds less error than W4A8 quantization itself: it runs the checkpoint, not an approximation."""
    block, x, pos = block_and_input
    q = quantized_block(block, *weight_activation_formats(4, 8))
    with torch.no_grad():
        float_out, q_out = block(x, pos), q(x, pos)
        engine_out = FusedBlock(copy.deepcopy(q), "b")(x, pos)
    assert _rel(engine_out, q_out) < 0.5 * _rel(q_out, float_out)


def test_operands_keep_low_bit_storage(block_and_input) -> None:
    block, _, _ = block_and_input
    fb8 = FusedBlock(quantized_block(block, *weight_activation_formats(8, 8, fp8=True)), "b")
    fb4 = FusedBlock(quantized_block(block, *weight_activation_formats(4, 8)), "b")
    ff = FusedBlock(copy.deepcopy(block), "b")
    assert fb8.fc1.weight.dtype == torch.float8_e4m3fn and fb8.fc1.act == "fp8_e4m3"
    assert fb4.fc1.weight.dtype == torch.uint8 and fb4.fc1.int4_k == 256
    # int4 halves int8 storage; bf16 doubles fp8 (scales and biases aside).
    assert fb4.operand_nbytes() < 0.6 * fb8.operand_nbytes() < 0.6 * ff.operand_nbytes()


@pytest.mark.parametrize(
    "weight,act,match",
    [
        ("int8-asym-channel", "int8-sym-token", "asymmetric"),
        ("int4-sym-group64", "int8-sym-token", "group size 64"),
        ("int8-sym-tensor", "int8-sym-token", "per-tensor"),
        ("int8-sym-channel", "fp8_e4m3-token", "cannot share"),
        ("int8-sym-channel", "int8-asym-token", "not symmetric per-token"),
    ],
)
def test_formats_without_a_kernel_path_are_refused(block_and_input, weight, act, match) -> None:
    block, _, _ = block_and_input
    q = quantized_block(block, parse_format(weight), parse_format(act))
    with pytest.raises(UnsupportedLayerError, match=match):
        FusedBlock(q, "aggregator.frame_blocks.0")


def test_build_engine_runs_a_quantized_model_on_cpu_twins() -> None:
    model = fill_name_seeded_(build_model(get_preset("tiny"))).eval()
    images = torch.rand(1, 2, 3, 56, 84)
    with torch.no_grad():
        ref = model(images)
    q = copy.deepcopy(model)
    quantize_(q, RTNConfig(weight=parse_format("int8-sym-channel"), activation=parse_format("int8-sym-token")))
    engine = build_engine(q, EngineOptions(head_dtype=torch.float32))
    n_blocks = len(engine.fused_blocks())
    assert n_blocks == 2 * get_preset("tiny").depth + get_preset("tiny").encoder_depth
    reset_kernel_call_counts()
    out = engine(images)
    counts = kernel_call_counts()
    # Every GEMM is accounted for; on CPU outside the interpreter the twins ran, and the counters say so.
    assert counts["fallback"]["scaled_gemm"] + counts["kernel"]["scaled_gemm"] == 4 * n_blocks
    if not gemm.kernel_is_interpreted():
        assert counts["kernel"]["scaled_gemm"] == 0
    assert out["depth"].shape == ref["depth"].shape
    assert _rel(out["depth"], ref["depth"]) < 0.02
    assert engine.weight_nbytes() < sum(p.numel() * p.element_size() for p in model.parameters())
    with pytest.raises(ValueError, match="no transformer blocks"):
        build_engine(engine.model)


def test_build_engine_fuses_a_correspondence_matcher_too() -> None:
    cfg = get_preset("tiny").replace(correspondence_tokens=True, matcher_depth=2)
    model = fill_name_seeded_(build_model(cfg)).eval()
    images = torch.rand(1, 3, 3, 42, 42)
    with torch.no_grad():
        ref = model(images)
    engine = build_engine(copy.deepcopy(model), EngineOptions(head_dtype=torch.float32))
    names = [b.name for b in engine.fused_blocks()]
    assert sum(n.startswith("correspondence.") for n in names) == 2 * 2 + cfg.encoder_depth
    out = engine(images)
    assert out["match_descriptors"].dtype == torch.bfloat16
    assert _rel(out["match_descriptors"].float(), ref["match_descriptors"]) < 0.05
    assert _rel(out["depth"], ref["depth"]) < 0.05


def test_engine_options_are_validated() -> None:
    with pytest.raises(ValueError, match="attention"):
        EngineOptions(attention="flash")
    with pytest.raises(ValueError, match="head_dtype"):
        EngineOptions(head_dtype=torch.float16)
    with pytest.raises(ValueError, match="frames_chunk_size"):
        EngineOptions(frames_chunk_size=0)
    with pytest.raises(TypeError, match="VGGT"):
        build_engine(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_load_quantized_checkpoint_into_the_engine(tmp_path) -> None:
    """``qvggt.load_quantized(path)`` gives an Engine that runs the checkpoint as the reference loader does."""
    import qvggt
    from qvggt.model import load_vggt, save_checkpoint
    from qvggt.quant.command import run_quantize
    from qvggt.quant.export import load_quantized as load_reference

    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "base.safetensors")
    qpath = run_quantize("rtn", 4, 8, tmp_path / "q", base).path
    engine = qvggt.load_quantized(qpath)
    frame0 = next(b for b in engine.fused_blocks() if b.name == "aggregator.frame_blocks.0")
    assert frame0.fc1.int4_k is not None and frame0.fc1.act == "int8"  # int4 operands from the packed file
    images = torch.rand(1, 2, 3, 56, 84)
    with torch.no_grad():
        want = load_reference(qpath)(images)
    got = engine(images)
    assert _rel(got["depth"], want["depth"]) < 0.02
    assert type(qvggt.load_quantized(base)).__name__ == "Engine"  # a float checkpoint: the bf16 fused path
    with pytest.raises(FileNotFoundError, match="qvggt quantize"):
        qvggt.load_quantized(tmp_path / "missing.safetensors")


def test_fp8_attention_path_stays_close_to_sdpa(block_and_input) -> None:
    block, x, pos = block_and_input
    with torch.no_grad():
        sdpa = FusedBlock(copy.deepcopy(block), "b", attention="sdpa")(x, pos)
        fp8 = FusedBlock(copy.deepcopy(block), "b", attention="fp8")(x, pos)
    assert 0 < _rel(fp8, sdpa) < 2e-2
