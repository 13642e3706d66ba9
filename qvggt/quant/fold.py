"""Function-preserving weight transforms of transformer blocks: LayerNorm/LayerScale folding and smoothing scales.

Each function is a named identity: the model computes the same function before and after, up to float rounding
(exact in real arithmetic). They modify modules in place and keep every module and parameter, so a transformed
model still has the checkpoint's structure (same state_dict keys and shapes; only values change). New values are
computed in float64 and rounded once to each parameter's dtype.

Conventions (``nn.Linear``: y = x W^T + b, W [N, K]; row vectors):

    fold_layernorm_affine_   LN(x) = n(x) * g + beta  ->  LN weight 1, bias 0;  W' = W diag(g),  b' = b + W beta
    fold_layerscale_         ls(y) = y * gamma        ->  gamma 1;              W' = diag(gamma) W,  b' = gamma * b
    smooth_into_layernorm_   X' = X / s (LN weight / s, LN bias / s);           W' = W diag(s)
    smooth_into_qkv_v_       V' = V / s (rows 2C..3C of qkv / s);               W_proj' = W_proj diag(s)

Why these are exact in a VGGT ``Block`` (``x += ls1(attn.proj(attn(attn.qkv(norm1 x)))); x += ls2(mlp.fc2(gelu(
mlp.fc1(norm2 x))))``):

- ``norm1`` feeds only ``attn.qkv`` and ``norm2`` only ``mlp.fc1``, so the LN affine (or a per-channel divisor) can
  move into those Linears' input columns.
- ``ls1`` / ``ls2`` scale the outputs of ``attn.proj`` / ``mlp.fc2`` per channel: a row scaling of those Linears.
  (Per-output-channel and per-group weight scales absorb a row scaling, so folding LayerScale does not change what
  per-channel weight quantization loses; it removes one elementwise op.)
- ``attn.proj``'s input is the attention output: per head, a convex combination (softmax weights) of V rows, so
  scaling V channel c by 1/s_c scales proj input channel c by exactly 1/s_c. The qk LayerNorm and 2D RoPE act only
  on Q and K, never on V, and the softmax weights depend only on Q and K: they are unchanged.
- ``mlp.fc2``'s input is GELU(fc1 x): GELU is not positively homogeneous (GELU(x/s) != GELU(x)/s), so no preceding
  op can absorb a per-channel scale. SmoothQuant leaves fc2 unsmoothed here; a smoothing of fc2 would need the scale
  applied online to its input (a per-channel multiply, which a fused kernel can do), not a folded identity.

The ``*_all_*`` helpers walk every ``Block`` of the aggregator's ``frame_blocks`` and ``global_blocks`` (names
``aggregator.frame_blocks.<i>`` on a VGGT, ``frame_blocks.<i>`` on an Aggregator).

Legend: C channels (embed dim), K in_features, N out_features, h heads, d = C / h head dim.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from qvggt.model.layers import Attention, Block, LayerScale

__all__ = [
    "aggregator_blocks",
    "fold_all_layernorms_",
    "fold_all_layerscales_",
    "fold_layernorm_affine_",
    "fold_layerscale_",
    "smooth_into_layernorm_",
    "smooth_into_qkv_v_",
]

# The aggregator's own blocks only: a correspondence matcher (qvggt.model.correspondence) has blocks of the same
# names under ``correspondence.matcher.backbone`` and stays in float.
_AGG_BLOCK_RE = re.compile(r"^(?:aggregator\.)?(?:frame|global)_blocks\.\d+$")


def _check_linear(linear: nn.Module, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    # Exact type: a QuantLinear (already quantized) holds codes, not a float weight to transform.
    if type(linear) is not nn.Linear:
        raise TypeError(f"expected a float nn.Linear (not yet quantized), got {type(linear).__name__}")
    if in_features is not None and linear.in_features != in_features:
        raise ValueError(f"Linear in_features {linear.in_features} != {in_features}")
    if out_features is not None and linear.out_features != out_features:
        raise ValueError(f"Linear out_features {linear.out_features} != {out_features}")
    return linear


def _check_layernorm(norm: nn.Module) -> nn.LayerNorm:
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"expected an nn.LayerNorm, got {type(norm).__name__}")
    if len(norm.normalized_shape) != 1:
        raise ValueError(f"only LayerNorms over the last dim are supported, got {tuple(norm.normalized_shape)}")
    return norm


def _check_scale(s: Tensor, n: int, what: str) -> Tensor:
    """s [n], finite and positive, as float64."""
    if s.shape != (n,):
        raise ValueError(f"{what}: smoothing scales must have shape [{n}], got {tuple(s.shape)}")
    s64 = s.detach().to(torch.float64)
    if not bool(torch.isfinite(s64).all()) or bool((s64 <= 0).any()):
        raise ValueError(f"{what}: smoothing scales must be finite and > 0 (min {float(s64.min()):.3g})")
    return s64


def _assign(param: Tensor, value: Tensor) -> None:
    """Write a float64 result into ``param`` in place (its dtype and device; the Parameter object is kept)."""
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def _ensure_bias(linear: nn.Linear) -> Tensor:
    """The Linear's bias, created as zeros if it has none (a LayerNorm bias folded into it needs one)."""
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=w.dtype, device=w.device))
    return linear.bias


@torch.no_grad()
def fold_layernorm_affine_(norm: nn.LayerNorm, linears: Sequence[nn.Linear]) -> None:
    """Move ``norm``'s affine (weight g, bias beta) into the Linears it feeds; ``norm`` becomes weight 1, bias 0.

    For each Linear (W [N, C], b [N]): W' = W diag(g), b' = b + W beta (with the original W). ``linears`` must be
    *every* consumer of ``norm``'s output (in a Block: ``[attn.qkv]`` for norm1, ``[mlp.fc1]`` for norm2).

    The LayerNorm keeps its parameters (set to ones / zeros) so the checkpoint structure is unchanged. A Linear
    without a bias gets a zero-initialised one when beta is nonzero (its state_dict then gains a ``bias`` key).
    A LayerNorm without affine parameters is left as is (nothing to fold).

    Args:
        norm: LayerNorm over C channels.
        linears: float Linears with in_features C.
    """
    norm = _check_layernorm(norm)
    c = norm.normalized_shape[0]
    linears = [_check_linear(lin, in_features=c) for lin in linears]
    if not linears:
        raise ValueError("fold_layernorm_affine_ needs the Linear(s) that consume the LayerNorm's output")
    if norm.weight is None and norm.bias is None:
        return
    g = norm.weight.to(torch.float64) if norm.weight is not None else None
    beta = norm.bias.to(torch.float64) if norm.bias is not None else None
    for lin in linears:
        w = lin.weight.to(torch.float64)  # [N, C]
        if beta is not None and bool(beta.any()):
            b = _ensure_bias(lin)
            _assign(b, b.to(torch.float64) + w @ beta)
        if g is not None:
            _assign(lin.weight, w * g)
    if norm.weight is not None:
        norm.weight.fill_(1.0)
    if norm.bias is not None:
        norm.bias.zero_()


@torch.no_grad()
def fold_layerscale_(linear: nn.Linear, ls: LayerScale) -> None:
    """Fold LayerScale ``ls`` (y -> y * gamma) into the Linear before it; gamma becomes 1 (parameter kept).

    W' = diag(gamma) W, b' = gamma * b (W [C, K], gamma [C]). In a Block: ``(attn.proj, ls1)``, ``(mlp.fc2, ls2)``.
    """
    if not isinstance(ls, LayerScale):
        raise TypeError(f"expected a LayerScale, got {type(ls).__name__}")
    linear = _check_linear(linear, out_features=ls.gamma.shape[0])
    gamma = ls.gamma.to(torch.float64)
    _assign(linear.weight, linear.weight.to(torch.float64) * gamma[:, None])
    if linear.bias is not None:
        _assign(linear.bias, linear.bias.to(torch.float64) * gamma)
    ls.gamma.fill_(1.0)


@torch.no_grad()
def smooth_into_layernorm_(norm: nn.LayerNorm, linears: Sequence[nn.Linear], s: Tensor) -> None:
    """Divide ``norm``'s output by ``s`` per channel and multiply the consuming Linears' input columns by ``s``.

    X' = X / s (LN weight / s, LN bias / s), W' = W diag(s), so X' W'^T = X W^T. Works on a folded (weight 1,
    bias 0) or unfolded LayerNorm; the LN must have an affine weight to hold 1/s.

    Args:
        norm: LayerNorm over C channels with ``elementwise_affine=True``.
        linears: every float Linear consuming its output (in_features C).
        s: [C] finite positive smoothing scales (any float dtype).
    """
    norm = _check_layernorm(norm)
    c = norm.normalized_shape[0]
    if norm.weight is None:
        raise ValueError("smooth_into_layernorm_ needs a LayerNorm with an affine weight to absorb 1/s")
    linears = [_check_linear(lin, in_features=c) for lin in linears]
    if not linears:
        raise ValueError("smooth_into_layernorm_ needs the Linear(s) that consume the LayerNorm's output")
    s64 = _check_scale(s, c, "smooth_into_layernorm_")
    _assign(norm.weight, norm.weight.to(torch.float64) / s64.to(norm.weight.device))
    if norm.bias is not None:
        _assign(norm.bias, norm.bias.to(torch.float64) / s64.to(norm.bias.device))
    for lin in linears:
        _assign(lin.weight, lin.weight.to(torch.float64) * s64.to(lin.weight.device))


@torch.no_grad()
def smooth_into_qkv_v_(attn: Attention, s: Tensor) -> None:
    """Scale ``attn.proj``'s input channels by 1/s through V: V rows of qkv / s, proj columns * s.

    qkv's output [.., 3C] splits as (q, k, v), each C = h * d channels (head-major), and the attention output
    channel c = head * d + j is a softmax-weighted sum of V channel c over tokens; so dividing rows 2C..3C of the
    qkv weight and bias by s divides proj's input by s exactly, and W_proj' = W_proj diag(s) restores the output.
    qk-norm and RoPE touch only Q and K (rows 0..2C), so they are unaffected.

    Args:
        attn: an ``Attention`` whose ``qkv`` and ``proj`` are float Linears.
        s: [C] finite positive smoothing scales.
    """
    if not isinstance(attn, Attention):
        raise TypeError(f"expected an Attention, got {type(attn).__name__}")
    proj = _check_linear(attn.proj)
    c = proj.in_features
    qkv = _check_linear(attn.qkv, in_features=None, out_features=3 * c)
    s64 = _check_scale(s, c, "smooth_into_qkv_v_").to(qkv.weight.device)
    w = qkv.weight.to(torch.float64, copy=True)
    w[2 * c :] /= s64[:, None]
    _assign(qkv.weight, w)
    if qkv.bias is not None:
        b = qkv.bias.to(torch.float64, copy=True)
        b[2 * c :] /= s64
        _assign(qkv.bias, b)
    _assign(proj.weight, proj.weight.to(torch.float64) * s64.to(proj.weight.device))


def aggregator_blocks(model: nn.Module) -> Iterator[tuple[str, Block]]:
    """(name, Block) for every block of the aggregator's ``frame_blocks`` and ``global_blocks``, in module order.

    Accepts a VGGT (``aggregator.frame_blocks.<i>``) or an Aggregator (``frame_blocks.<i>``).
    """
    for name, module in model.named_modules():
        if isinstance(module, Block) and _AGG_BLOCK_RE.search(name):
            yield name, module


def fold_all_layernorms_(model: nn.Module) -> nn.Module:
    """``fold_layernorm_affine_`` on norm1 -> attn.qkv and norm2 -> mlp.fc1 of every aggregator block.

    Returns ``model`` (modified in place). Raises TypeError if a consumer is already quantized.
    """
    for _, block in aggregator_blocks(model):
        fold_layernorm_affine_(block.norm1, [block.attn.qkv])
        fold_layernorm_affine_(block.norm2, [block.mlp.fc1])
    return model


def fold_all_layerscales_(model: nn.Module) -> nn.Module:
    """``fold_layerscale_`` on (attn.proj, ls1) and (mlp.fc2, ls2) of every aggregator block with LayerScale.

    Blocks built without LayerScale (``nn.Identity``) are skipped. Returns ``model`` (modified in place).
    """
    for _, block in aggregator_blocks(model):
        if isinstance(block.ls1, LayerScale):
            fold_layerscale_(block.attn.proj, block.ls1)
        if isinstance(block.ls2, LayerScale):
            fold_layerscale_(block.mlp.fc2, block.ls2)
    return model
