"""The engine on special-token rows (quantvggt's camera/register tokens on the int8 grid in W4A4 layers), on CPU.

A ``QuantLinear`` with ``special_tokens = c`` quantizes input rows r with ``r % token_period < c`` with its
``special_act_fmt`` (per-token int8) and the others with its int4 activation format. ``FusedBlock`` must do the same
in its quantization steps (LayerNorm -> quant for qkv / fc1, token quant for proj, fc1's epilogue for fc2), for frame
blocks ([B*S, P, C]) and global blocks ([B, S*P, C]) alike, with ``token_period`` set by the aggregator's hook.
Kernels run under the Triton interpreter here; GPU runs: tests/kernels/test_kernels_cuda.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from qvggt_testing import quantized_block

from qvggt.engine import EngineOptions, UnsupportedLayerError, kernel_call_counts, reset_kernel_call_counts
from qvggt.engine.block import FusedBlock
from qvggt.engine.operands import prepare_linear
from qvggt.model.layers import Block
from qvggt.model.rope import RotaryEmbedding2D, TokenPositions, grid_positions
from qvggt.quant.config import weight_activation_formats
from qvggt.quant.formats import parse_format
from qvggt.quant.linear import QuantLinear

LAYERS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))
COUNT = 5  # 1 camera + 4 register tokens per frame
GRID = (3, 4)  # patches per frame: P = 5 + 12 = 17 tokens
P = COUNT + GRID[0] * GRID[1]
INT8_TOKEN = parse_format("int8-sym-token")
OUTLIERS = (7, 91)  # the special tokens' massive channels in the test input


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _special_branch_err(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> float:
    """Relative error of the residual branches (output - input) on the special-token rows, outside the massive
    channels: the full output is dominated by those channels, whose bf16 rounding in the engine's residual stream
    (an ulp of 0.5 at 100) would hide the branches' error."""
    special = torch.arange(x.shape[1]) % P < COUNT
    channels = torch.ones(x.shape[-1], dtype=torch.bool)
    channels[list(OUTLIERS)] = False
    return _rel((got.float() - x)[:, special][..., channels], (want.float() - x)[:, special][..., channels])


def _set_rows(module: torch.nn.Module, count: int, fmt=INT8_TOKEN, period: int | None = None) -> None:
    """Set special-token rows by hand on every QuantLinear (the attributes quantvggt's converter sets)."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            m.special_tokens, m.special_act_fmt = count, (fmt if count else None)
        if period is not None and hasattr(m, "token_period"):
            m.token_period = period  # what the aggregator's pre-hook does before each forward


@pytest.fixture(scope="module")
def block_and_input() -> tuple[Block, torch.Tensor, TokenPositions]:
    torch.manual_seed(0)
    block = Block(128, 2, init_values=1.0, qk_norm=True, rope=RotaryEmbedding2D(100.0)).eval()
    pos = grid_positions(2, *GRID, COUNT, torch.device("cpu"))  # 2 frames x 17 tokens
    x = torch.randn(2, P, 128).bfloat16().float()
    x[:, :COUNT, OUTLIERS[0]] *= 60  # the camera/register tokens' massive channels: int4 rows lose the others
    x[:, :COUNT, OUTLIERS[1]] *= 30
    return block, x, pos


@pytest.mark.parametrize("layout", ["frame", "global"])
def test_fused_block_quantizes_special_rows_as_the_reference(block_and_input, layout: str) -> None:
    """W4A4 with 8-bit special rows: FusedBlock vs the QuantLinear block it runs, on both token layouts.

    Without special rows in the engine (the same operands, rows on the int4 grid) the special rows' mismatch is
    several times larger: the test sees the special rows, not a lucky match.
    """
    block, x, pos = block_and_input
    if layout == "global":  # [B, S*P, C]: the frames of a sequence in one row block, same period P
        x, pos = x.reshape(1, 2 * P, 128), pos.reshape(1, 2 * P)
    q = quantized_block(block, *weight_activation_formats(4, 4))
    _set_rows(q, COUNT, period=P)
    fused = FusedBlock(copy.deepcopy(q), "b")
    assert [getattr(fused, n).special_tokens for _, n in LAYERS] == [COUNT] * 4
    fused.token_period = P
    with torch.no_grad():
        want = q(x, pos)
        reset_kernel_call_counts()
        got = fused(x, pos)
        counts = kernel_call_counts()
        for _, n in LAYERS:
            getattr(fused, n).special_tokens = 0
        without = fused(x, pos)
    ran = {k: counts["kernel"].get(k, 0) + counts["fallback"].get(k, 0) for k in counts["kernel"]}
    assert ran["layernorm_quant"] == 2 and ran["token_quant"] == 1 and ran["scaled_gemm"] == 4
    assert _rel(got, want) < 0.03  # measured 1.3% (test_engine.py's W4A4 bound: 8%)
    # The special rows' branches, measured: 3.1% with special rows in the engine, 27% without (int4 rows); with the
    # torch twins instead of the interpreted kernels (bf16 casts rounded, not truncated) 1.6%.
    err, err_without = _special_branch_err(got, want, x), _special_branch_err(without, want, x)
    assert err < 0.06 and err < 0.3 * err_without, (err, err_without)


def test_fc2_rows_outside_fc1_epilogue(block_and_input) -> None:
    """An fc2 rotation of another block than fc1's tile runs in token_quant: its special rows too."""
    from qvggt.quant.hadamard import block_hadamard_transform

    block, x, pos = block_and_input
    q = quantized_block(block, *weight_activation_formats(8, 4))
    with torch.no_grad():  # store fc2's weight rotated, as quarot / quantvggt do for an online input rotation
        fc2 = q.mlp.fc2
        w = block_hadamard_transform(fc2.dequantized_weight(torch.float64), 64).float()
        fc2._store(w, None)
        fc2.input_hadamard = 64
    _set_rows(q, COUNT, period=P)
    fused = FusedBlock(copy.deepcopy(q), "b")
    fused.token_period = P
    with torch.no_grad():
        want = q(x, pos)
        reset_kernel_call_counts()
        got = fused(x, pos)
        ran = kernel_call_counts()
        fused.fc2.special_tokens = 0
        without = fused(x, pos)
    assert ran["kernel"]["token_hadamard_quant"] + ran["fallback"]["token_hadamard_quant"] == 1
    # Special rows' branches, measured: 3.3% with fc2's special rows, 17% with them on the int4 grid.
    err, err_without = _special_branch_err(got, want, x), _special_branch_err(without, want, x)
    assert err < 0.06 and err < 0.4 * err_without, (err, err_without)


def test_missing_token_period_is_an_error(block_and_input) -> None:
    block, x, pos = block_and_input
    q = quantized_block(block, *weight_activation_formats(4, 4))
    _set_rows(q, COUNT)
    fused = FusedBlock(q, "aggregator.frame_blocks.0")
    with pytest.raises(ValueError, match=r"aggregator.frame_blocks.0: .*token_period=0 .*install_token_period_hook"):
        fused(x, pos)


@pytest.mark.parametrize(
    ("wbits", "abits", "fp8", "rows_fmt", "match"),
    [
        (4, 4, False, "int4-sym-token", "special-token rows in format int4"),
        (4, 4, False, "int8-asym-token", "special-token rows in format int8-asym"),
        (4, 4, False, "fp8_e4m3-token", "special-token rows in format fp8"),
        (4, 4, False, None, "special-token rows in format None"),
        (8, 8, True, "int8-sym-token", "special-token rows on a layer with fp8_e4m3 activations"),
        (4, None, False, "int8-sym-token", "special-token rows on a layer with bf16 activations"),
    ],
)
def test_special_rows_without_a_kernel_path_are_refused(block_and_input, wbits, abits, fp8, rows_fmt, match) -> None:
    block, _, _ = block_and_input
    q = quantized_block(block, *weight_activation_formats(wbits, abits, fp8=fp8))
    fc1 = q.mlp.fc1
    fc1.special_tokens, fc1.special_act_fmt = COUNT, None if rows_fmt is None else parse_format(rows_fmt)
    with pytest.raises(UnsupportedLayerError, match=rf"frame_blocks.0.mlp.fc1: {match}"):
        FusedBlock(q, "aggregator.frame_blocks.0")


def test_int8_layers_accept_special_rows_and_operands_keep_them_when_moved(block_and_input) -> None:
    """int8 activations are on the int8 grid already (nothing changes); the field travels with .to()."""
    block, x, pos = block_and_input
    q = quantized_block(block, *weight_activation_formats(4, 8))
    _set_rows(q, COUNT, period=P)
    fused = FusedBlock(copy.deepcopy(q), "b")
    fused.token_period = P
    with torch.no_grad():
        got = fused(x, pos)
        fused.fc1.special_tokens = 0
        assert torch.equal(fused(x, pos), got)
    op = prepare_linear(q.mlp.fc2, "fc2")
    assert op.special_tokens == COUNT and op.to("meta").special_tokens == COUNT
    assert op.to("meta").weight.is_meta and op.to("meta").tiles == op.tiles
    moved = fused.to("meta")
    assert moved.fc2.special_tokens == COUNT and moved.fc2.weight.is_meta and moved.token_period == P
    assert "special_rows=qkv:5,proj:5,fc2:5" in repr(moved)


# ---------------------------------------------------------------------------------------------------------------------
# A quantvggt W4A4 checkpoint with special rows, end to end
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def special_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from qvggt.model import load_vggt, save_checkpoint
    from qvggt.quant.command import run_quantize

    tmp = tmp_path_factory.mktemp("special")
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), tmp / "base.safetensors")
    # Reconstruction changes scales, not the format: off keeps this engine test fast. special_token_abits=8 is the
    # default; named here so the test says what it checks.
    options = {"reconstruct": False, "special_token_abits": 8}
    qpath = run_quantize("quantvggt", 4, 4, tmp / "q", base, calib_scenes=1, calib_frames=2, options=options).path
    return base, qpath


def test_engine_matches_a_quantvggt_w4a4_checkpoint_with_special_rows(special_checkpoint) -> None:
    """``qvggt.load_quantized`` vs the reference loader on a W4A4 quantvggt checkpoint with 8-bit special rows."""
    import qvggt
    from qvggt.model import load_vggt
    from qvggt.quant.export import load_quantized as load_reference

    base, qpath = special_checkpoint
    engine = qvggt.load_quantized(qpath, EngineOptions(head_dtype=torch.float32))
    blocks = [b for b in engine.fused_blocks() if ".frame_blocks." in b.name or ".global_blocks." in b.name]
    assert len(blocks) == 8
    for b in blocks:
        assert {n: getattr(b, n).special_tokens for _, n in LAYERS} == dict.fromkeys((n for _, n in LAYERS), COUNT)
    images = torch.rand(1, 2, 3, 42, 56, generator=torch.Generator().manual_seed(1))  # 2 frames: global blocks
    with torch.no_grad():
        want = load_reference(qpath)(images)
        fp = load_vggt(base).eval()(images)
    got = engine(images)
    period = engine.model.aggregator.patch_start_idx + (42 // 14) * (56 // 14)
    assert all(b.token_period == period for b in blocks)  # set by the aggregator's hook, as on QuantLinear
    assert _rel(got["depth"], want["depth"]) < 0.02  # the bound of tests/engine/test_engine.py
    # The pose is the sharper probe (this random-weight model's depth barely varies). Measured: engine vs reference
    # 6.5% under the interpreter (5.3% on the torch twins); with the engine's special rows dropped 25%; W4A4
    # quantization itself 34% against fp32.
    err = _rel(got["pose_enc"], want["pose_enc"])
    assert err < 0.1 and err < 0.3 * _rel(want["pose_enc"], fp["pose_enc"])
    for b in blocks:
        for _, n in LAYERS:
            getattr(b, n).special_tokens = 0
    assert _rel(engine(images)["pose_enc"], want["pose_enc"]) > 2.5 * err


def test_graph_cache_keeps_each_input_shape_period(special_checkpoint) -> None:
    """Graphs are keyed by input shape and P follows from the image size: each shape's forward runs with its P.

    ``StaticBufferBackend`` (the CPU stand-in) re-runs the captured forward on replay, so this checks the cache path
    and the hook across shapes; a CUDA graph bakes in the P of its capture, valid for its shape only (the key):
    tests/engine/test_graphs.py::test_graph_replay_with_special_rows_on_gpu.
    """
    import qvggt
    from qvggt.engine.graphs import StaticBufferBackend

    _, qpath = special_checkpoint
    graphed = qvggt.load_quantized(qpath)
    graphed.graphs.backend = StaticBufferBackend()
    gen = torch.Generator().manual_seed(2)
    for h, w in ((28, 28), (28, 42)):
        graphed(torch.rand(1, 1, 3, h, w, generator=gen))
        period = 5 + (h // 14) * (w // 14)  # 9, then 11
        assert {b.token_period for b in graphed.fused_blocks() if b.fc1.special_tokens} == {period}
    stats = graphed.graph_stats()
    assert stats.captures == 2 and not stats.fallbacks
