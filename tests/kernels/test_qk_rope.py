"""Fused qk-norm + 2-D RoPE + head split vs its twin (interpreter) and the twin vs the model's Attention."""

from __future__ import annotations

import pytest
import torch

from qvggt.kernels import has_triton
from qvggt.kernels.reference import qk_norm_rope_ref, rope_inv_freq
from qvggt.model.layers import Attention
from qvggt.model.rope import RotaryEmbedding2D, grid_positions

if has_triton():
    import qvggt.kernels.qk_rope as qr

pytestmark = pytest.mark.skipif(
    not (has_triton() and qr.kernel_is_interpreted()),
    reason="needs the Triton interpreter, which tests/conftest.py turns on where there is no GPU",
)


def _attention_and_inputs(batch: int, grid: tuple[int, int], heads: int, d: int) -> tuple:
    torch.manual_seed(batch * 100 + grid[0] * 10 + heads)
    att = Attention(heads * d, heads, qk_norm=True, rope=RotaryEmbedding2D(100.0))
    with torch.no_grad():  # non-trivial affine parameters so a swapped weight/bias index would show
        for norm in (att.q_norm, att.k_norm):
            norm.weight.normal_()
            norm.bias.normal_()
    pos = grid_positions(batch, grid[0], grid[1], 5, torch.device("cpu"))
    n = 5 + grid[0] * grid[1]
    qkv = torch.randn(batch * n, 3 * heads * d) * 2
    norms = tuple((m.weight.detach(), m.bias.detach(), m.eps) for m in (att.q_norm, att.k_norm))
    return att, pos, qkv, norms


def _model_qkv(att: Attention, qkv: torch.Tensor, batch: int, pos) -> tuple:
    heads, d = att.num_heads, att.head_dim
    q, k, v = qkv.view(batch, -1, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    with torch.no_grad():
        return att.rope(att.q_norm(q), pos), att.rope(att.k_norm(k), pos), v


def test_twin_equals_the_model_attention_prologue_in_fp32() -> None:
    att, pos, qkv, norms = _attention_and_inputs(2, (3, 5), 4, 64)
    q, k, v = qk_norm_rope_ref(qkv, 2, 4, *norms, pos.yx, rope_inv_freq(64, 100.0))
    q0, k0, v0 = _model_qkv(att, qkv, 2, pos)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("batch,grid,heads,d,block_t", [(2, (3, 5), 4, 64, 32), (1, (1, 1), 1, 16, 16),
                                                         (3, (2, 7), 2, 32, 8)])  # fmt: skip
def test_kernel_matches_twin(batch: int, grid: tuple[int, int], heads: int, d: int, block_t: int) -> None:
    _, pos, qkv, norms = _attention_and_inputs(batch, grid, heads, d)
    inv = rope_inv_freq(d, 100.0)
    calls = qr.KERNEL_CALLS["qk_norm_rope"]
    q, k, v = qr.qk_norm_rope(qkv, batch, heads, *norms, pos.yx, inv, block_t=block_t)
    assert qr.KERNEL_CALLS["qk_norm_rope"] == calls + 1
    q0, k0, v0 = qk_norm_rope_ref(qkv, batch, heads, *norms, pos.yx, inv)
    assert q.shape == (batch, heads, 5 + grid[0] * grid[1], d) and q.is_contiguous()
    torch.testing.assert_close(q, q0, rtol=0, atol=2e-5)
    torch.testing.assert_close(k, k0, rtol=0, atol=2e-5)
    assert torch.equal(v, v0)


def test_kernel_without_norm_or_rope_is_a_head_split() -> None:
    qkv = torch.randn(2 * 9, 3 * 2 * 16)
    q, k, v = qr.qk_norm_rope(qkv, 2, 2)
    q0, k0, v0 = qkv.view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


def test_bad_arguments_are_named() -> None:
    qkv = torch.randn(10, 3 * 2 * 16)
    with pytest.raises(ValueError, match="batch 3"):
        qr.qk_norm_rope(qkv, 3, 2)
    with pytest.raises(ValueError, match="both q_norm and k_norm"):
        qr.qk_norm_rope(qkv, 2, 2, q_norm=(torch.ones(16), torch.zeros(16), 1e-5))
    with pytest.raises(ValueError, match="yx must be"):
        qr.qk_norm_rope(qkv, 2, 2, yx=torch.zeros(2, 4, 2, dtype=torch.long), inv_freq=torch.ones(4))
    with pytest.raises(ValueError, match="power of two"):
        qr.qk_norm_rope(torch.randn(4, 3 * 24), 1, 1)
