"""``FusedBlock``: a VGGT/DINOv2 transformer block run on the engine's kernels.

Per block, with a bf16 residual stream ``x`` [T, C] (T = tokens of all sequences):

    h      = LN1(x)                         fused LayerNorm -> [block Hadamard] -> per-token quantization
    qkv    = GEMM(h, W_qkv) + b             bf16 out
    q,k,v  = qk_norm_rope(qkv)              one pass: head split, per-head LayerNorm, 2-D RoPE (float32 angles)
    o      = attention(q, k, v)             SDPA (cuDNN / flash, bf16) or the fp8 flash-attention kernel
    x      = x + ls1 * (GEMM(o', W_proj) + b)     o' = [block Hadamard ->] per-token quantization of o (one
                                                  kernel); residual add and LayerScale in the GEMM epilogue
    h      = LN2(x)                         fused LayerNorm -> [block Hadamard] -> per-token quantization
    f      = GELU(GEMM(h, W_fc1) + b)       quantized per (token, 128 columns) in the epilogue for fc2, after
                                            fc2's 128-block Hadamard on the tile when it has one
    x      = x + ls2 * (GEMM(f, W_fc2) + b)

Each bracketed Hadamard is a layer's ``QuantLinear.input_hadamard`` (quarot; quantvggt's fc2 and, with
``norm_input_rotation``, qkv / fc1): the quantization kernel's rotation stage runs it on the row in registers.
An fc2 rotation of another block size than the fc1 tile runs in the quantization kernel instead of the epilogue.
Quantization steps are skipped for float (or weight-only) layers; their rotation then runs in torch.

Special-token rows (quantvggt's ``special_token_abits``; ``GemmOperand.special_tokens`` = c): the first c tokens of
every frame (VGGT's camera + register tokens) carry massive outlier channels, so in an int4-activation layer their
rows are quantized on the int8 grid instead (qmax 127, own per-token scale) by the same quantization steps above:
LN1 / LN2, proj's input quantization and fc1's epilogue (per (token, 128 columns) for fc2). They land in the same
int8 codes tensor, so the GEMMs do not change. Row r of the flattened [T, C] stream is special iff
``r % token_period < c``; ``token_period`` = P (tokens per frame) is set on the block before each model forward by
the aggregator's pre-hook (``qvggt.quant.special_tokens``, installed by the quantized-checkpoint loader), and is the
same for frame ([B*S, P, C]) and global ([B, S*P, C]) blocks. P is fixed by the image size, so a CUDA graph (keyed
by input shape) captures the right P.

The same module runs float layers (bf16 GEMMs with the same epilogues: the "bf16 fused" path, which separates the
gain of fusion from the gain of quantization) and quantized ones. fc2's input is quantized per 1 x 128 tile, not
per token: a per-token scale needs the whole 4096-wide row, which one GEMM output tile does not hold, and a
separate quantization pass costs more than the 8-bit GEMM saves (HOPPER_MEASUREMENTS.md). The finer scales are
at least as accurate as the checkpoint's per-token format.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from qvggt.engine.operands import GemmOperand, prepare_linear
from qvggt.kernels.gemm import scaled_gemm
from qvggt.kernels.layernorm_quant import layernorm_quant, token_quant
from qvggt.kernels.qk_rope import qk_norm_rope
from qvggt.kernels.reference import rope_inv_freq
from qvggt.model.layers import Block, LayerScale
from qvggt.model.rope import TokenPositions
from qvggt.quant.hadamard import block_hadamard_transform

__all__ = ["FusedBlock"]

# cuDNN's fused attention first (fastest measured on Hopper at VGGT's head dim 64), then FlashAttention-2; the
# math backend is left out on purpose: a silent O(N^2)-memory fallback would be a slower success.
_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _gamma(ls: nn.Module) -> Tensor | None:
    return ls.gamma.detach().to(torch.bfloat16) if isinstance(ls, LayerScale) else None


def _norm_params(norm: nn.LayerNorm, dtype: torch.dtype = torch.float32) -> tuple[Tensor | None, Tensor | None, float]:
    """(weight, bias, eps) in ``dtype``: bf16 for ``F.layer_norm`` on bf16 input, fp32 for the fused kernels."""
    w = None if norm.weight is None else norm.weight.detach().to(dtype)
    b = None if norm.bias is None else norm.bias.detach().to(dtype)
    return w, b, float(norm.eps)


def _norm_dtype(op: GemmOperand) -> torch.dtype:
    """A LayerNorm feeding a bf16 GEMM runs as ``F.layer_norm`` in bf16; one feeding a quantized GEMM runs fused."""
    return torch.bfloat16 if op.act == "bf16" else torch.float32


class FusedBlock(nn.Module):
    """Drop-in replacement for ``qvggt.model.layers.Block`` (same ``forward(x, pos)``), built from one.

    Args:
        block: the source block; its Linears may be ``nn.Linear`` or ``QuantLinear`` (any mix).
        name: the block's module name, for error messages.
        attention: "sdpa" (bf16 flash/cuDNN through PyTorch) or "fp8" (``qvggt.kernels.attention``).
    """

    def __init__(self, block: Block, name: str = "block", attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in ("sdpa", "fp8"):
            raise ValueError(f"attention must be 'sdpa' or 'fp8', got {attention!r}")
        attn = block.attn
        self.name, self.attention = name, attention
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.qkv = prepare_linear(attn.qkv, f"{name}.attn.qkv")
        self.proj = prepare_linear(attn.proj, f"{name}.attn.proj")
        self.fc1 = prepare_linear(block.mlp.fc1, f"{name}.mlp.fc1")
        self.fc2 = prepare_linear(block.mlp.fc2, f"{name}.mlp.fc2")
        self.norm1 = _norm_params(block.norm1, _norm_dtype(self.qkv))
        self.norm2 = _norm_params(block.norm2, _norm_dtype(self.fc1))
        self.q_norm = _norm_params(attn.q_norm) if isinstance(attn.q_norm, nn.LayerNorm) else None
        self.k_norm = _norm_params(attn.k_norm) if isinstance(attn.k_norm, nn.LayerNorm) else None
        self.rope = attn.rope
        self._inv_freq = None if attn.rope is None else rope_inv_freq(self.head_dim, attn.rope.base)
        self.gamma1, self.gamma2 = _gamma(block.ls1), _gamma(block.ls2)
        # Tokens per frame, for special-token rows: written by the aggregator's forward pre-hook (0: not known).
        self.token_period: int = 0

    # ------------------------------------------------------------------ device movement

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """Move the prepared operands with the module (``.to``/``.cuda``); dtypes never change."""
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0))
        device = probe.device

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        for attr in ("qkv", "proj", "fc1", "fc2"):
            setattr(self, attr, getattr(self, attr).to(device))
        for attr in ("norm1", "norm2", "q_norm", "k_norm"):
            norm = getattr(self, attr)
            if norm is not None:
                setattr(self, attr, (move(norm[0]), move(norm[1]), norm[2]))
        self._inv_freq = move(self._inv_freq)
        self.gamma1, self.gamma2 = move(self.gamma1), move(self.gamma2)
        return self

    def operand_nbytes(self) -> int:
        """Device bytes of the four GEMM operands (weights, scales, biases)."""
        return sum(op.nbytes() for op in (self.qkv, self.proj, self.fc1, self.fc2))

    # ------------------------------------------------------------------ forward pieces

    @staticmethod
    def _gemm(a: Tensor | tuple[Tensor, Tensor], op: GemmOperand, **epilogue) -> Tensor | tuple[Tensor, Tensor]:
        if isinstance(a, tuple):
            codes, a_scale = a
        else:
            codes, a_scale = a, None
        return scaled_gemm(
            codes, op.weight, a_scale=a_scale, w_scale=op.scale, bias=op.bias, w_int4_k=op.int4_k, tiles=op.tiles,
            out_dtype=torch.bfloat16, **epilogue,
        )  # fmt: skip

    def _special(self, op: GemmOperand) -> tuple[int, int]:
        """(period, count) of ``op``'s special-token rows for the kernels; (0, 0) without any.

        Raises:
            ValueError: the layer has special rows but the block was never told the tokens per frame.
        """
        if not op.special_tokens:
            return 0, 0
        period = self.token_period
        if isinstance(period, bool) or not isinstance(period, int) or period <= 0:
            raise ValueError(
                f"{self.name}: its layers quantize {op.special_tokens} special-token rows per frame apart, but "
                f"token_period={period!r} (tokens per frame) was not set: run the block inside the model, whose "
                "aggregator pre-hook sets it (qvggt.quant.special_tokens.install_token_period_hook, installed by "
                "qvggt.load_quantized), or set block.token_period = P by hand"
            )
        return period, op.special_tokens

    def _quant_in(self, x: Tensor, op: GemmOperand) -> Tensor | tuple[Tensor, Tensor]:
        """A bf16 activation as ``op`` consumes it: rotated online if the layer says so, then quantized (one kernel:
        the rotation is the quantization kernel's Hadamard stage), special-token rows on their grid."""
        x = x.contiguous()
        if op.act != "bf16":
            period, count = self._special(op)
            return token_quant(x, op.act, op.input_hadamard, period, count)
        # Weight-only layer: nothing to quantize, so the rotation runs in torch (float32, one bf16 rounding).
        return block_hadamard_transform(x, op.input_hadamard) if op.input_hadamard else x

    def _norm_in(self, x: Tensor, norm: tuple, op: GemmOperand) -> Tensor | tuple[Tensor, Tensor]:
        w, b, eps = norm
        if op.act != "bf16":  # LayerNorm -> (rotation) -> quantization in one kernel
            period, count = self._special(op)
            return layernorm_quant(x, w, b, eps, op.act, op.input_hadamard, period, count)
        h = F.layer_norm(x, (x.shape[-1],), w, b, eps)  # w, b are bf16 here (see __init__): one bf16 kernel
        return block_hadamard_transform(h, op.input_hadamard) if op.input_hadamard else h

    def _attend(self, qkv: Tensor, batch: int, tokens: int, pos: TokenPositions | None) -> Tensor:
        if self.rope is not None and pos is None:
            raise ValueError(f"{self.name}: this block uses RoPE: pass the token positions `pos`")
        if self.q_norm is None and self.rope is None:  # DINOv2 blocks: heads are strided views, no pass needed
            q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            yx = None if self.rope is None else pos.yx  # type: ignore[union-attr]
            inv_freq = None if self.rope is None else self._inv_freq.to(qkv.device)
            q, k, v = qk_norm_rope(qkv, batch, self.num_heads, self.q_norm, self.k_norm, yx, inv_freq)
        if self.attention == "fp8":
            from qvggt.kernels.attention import fp8_attention  # optional kernel module

            # Hadamard on q and k ("incoherent processing", as FlashAttention-3): spreads outlier channels before
            # the fp8 cast; q.k is unchanged in exact arithmetic.
            out = fp8_attention(q.contiguous(), k.contiguous(), v.contiguous(), hadamard=True)
        else:
            with sdpa_kernel(_SDPA_BACKENDS, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch * tokens, self.num_heads * self.head_dim)

    def forward(self, x: Tensor, pos: TokenPositions | None = None) -> Tensor:
        """x: [B, N, C] -> [B, N, C] bf16 (inputs of other dtypes are cast to bf16 first)."""
        batch, tokens, dim = x.shape
        ctx = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else (
            contextlib.nullcontext()
        )  # fmt: skip
        with ctx:
            xf = x.reshape(batch * tokens, dim).to(torch.bfloat16).contiguous()
            qkv = self._gemm(self._norm_in(xf, self.norm1, self.qkv), self.qkv)
            o = self._attend(qkv, batch, tokens, pos)
            xf = self._gemm(self._quant_in(o, self.proj), self.proj, gamma=self.gamma1, residual=xf)
            h = self._norm_in(xf, self.norm2, self.fc1)
            # fc1's epilogue quantizes its output for fc2 per (token, 128 columns), after rotating each tile by
            # fc2's online block Hadamard when there is one (quantvggt) and it matches the tile width.
            # fc2's special-token rows are quantized there too (every column tile of those rows on the int8 grid).
            rot = self.fc2.input_hadamard
            fused_handoff = self.fc2.act != "bf16" and rot in (0, self.fc1.tiles.block_n)
            period, count = self._special(self.fc2) if fused_handoff else (0, 0)
            f = self._gemm(
                h, self.fc1, gelu=True, out_quant=self.fc2.act if fused_handoff else None,
                out_hadamard=fused_handoff and rot > 0, out_special_period=period, out_special_count=count,
            )  # fmt: skip
            f = f if fused_handoff else self._quant_in(f, self.fc2)
            xf = self._gemm(f, self.fc2, gamma=self.gamma2, residual=xf)
        return xf.view(batch, tokens, dim)

    def extra_repr(self) -> str:
        kinds = lambda op: "bf16" if op.scale is None else ("int4" if op.int4_k else str(op.weight.dtype))
        special = [f"{n}:{getattr(self, n).special_tokens}" for n in ("qkv", "proj", "fc1", "fc2")]
        special = [x for x in special if not x.endswith(":0")]
        rows = f", special_rows={','.join(special)}" if special else ""
        return (
            f"{self.name}: qkv={kinds(self.qkv)}/{self.qkv.act}, proj={kinds(self.proj)}/{self.proj.act}, "
            f"fc1={kinds(self.fc1)}/{self.fc1.act}, fc2={kinds(self.fc2)}/{self.fc2.act}, attention={self.attention}"
            f"{rows}"
        )
