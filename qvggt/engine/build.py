"""Turn a (quantized or float) VGGT into the engine: fused kernel blocks, bf16 residual stream, 4 kept layers.

``build_engine(model)`` replaces every transformer ``Block`` of the aggregator (the DINOv2 encoder's and the frame
and global blocks; a correspondence matcher's too) by a ``FusedBlock``, casts the rest of the aggregator (and
matcher) to bf16 and the heads to ``head_dtype``,
and returns an ``Engine`` whose ``forward(images)`` runs the model the fast way. On CUDA, kernels are required
(``qvggt.kernels.require_kernels``): a torch fallback raises instead of silently running slower, and the forward
is captured as a CUDA graph per input shape and replayed (``qvggt.engine.graphs``; ``EngineOptions.cuda_graphs``).
On CPU the same modules run the kernels' torch twins, eagerly, so a checkpoint can be checked anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qvggt.engine.block import FusedBlock
from qvggt.engine.graphs import GraphCache, GraphStats
from qvggt.kernels import require_kernels
from qvggt.model.layers import Block
from qvggt.model.vggt import VGGT

__all__ = ["Engine", "EngineOptions", "build_engine", "kernel_call_counts", "reset_kernel_call_counts"]


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs.

    Attributes:
        attention: "sdpa" (PyTorch bf16 flash/cuDNN attention) or "fp8" (the Triton fp8 flash-attention kernel).
        head_dtype: dtype of the camera/DPT/track heads: bfloat16 (fast) or float32 (as published).
        frames_chunk_size: frames per DPT-head chunk (bounds activation memory at many frames).
        cuda_graphs: on CUDA, capture the forward once per input shape (frames, H, W, query points) and replay it
            afterwards; False runs every call eagerly. Inputs that cannot be graphed run eagerly either way, with
            the reason logged (logger ``qvggt.engine``) and in ``Engine.graph_stats().fallbacks``.
        graph_max_shapes: input shapes whose graphs are kept at once (least recently used dropped first).
    """

    attention: str = "sdpa"
    head_dtype: torch.dtype = torch.bfloat16
    frames_chunk_size: int = 8
    cuda_graphs: bool = True
    graph_max_shapes: int = 4

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "fp8"):
            raise ValueError(f"EngineOptions.attention must be 'sdpa' or 'fp8', got {self.attention!r}")
        if self.head_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"EngineOptions.head_dtype must be torch.bfloat16 or torch.float32, got {self.head_dtype}")
        if self.frames_chunk_size <= 0:
            raise ValueError(f"EngineOptions.frames_chunk_size must be positive, got {self.frames_chunk_size}")
        if self.graph_max_shapes < 1:
            raise ValueError(f"EngineOptions.graph_max_shapes must be >= 1, got {self.graph_max_shapes}")


def _replace_blocks(root: nn.Module, prefix: str, attention: str) -> int:
    count = 0
    for name, child in list(root.named_children()):
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, Block):
            setattr(root, name, FusedBlock(child, full, attention))
            count += 1
        else:
            count += _replace_blocks(child, full, attention)
    return count


class Engine(nn.Module):
    """A VGGT whose aggregator runs on fused kernels. ``forward(images)`` returns the VGGT prediction dict."""

    def __init__(self, model: VGGT, options: EngineOptions) -> None:
        super().__init__()
        self.model, self.options = model, options
        self.graphs = GraphCache(
            self._run, enabled=options.cuda_graphs, max_shapes=options.graph_max_shapes, counters=_live_counters
        )

    def graph_stats(self) -> GraphStats:
        """Captures, replays, eager calls and the reason for each eagerly run input shape."""
        return self.graphs.stats

    @property
    def cfg(self):
        return self.model.cfg

    def fused_blocks(self) -> list[FusedBlock]:
        return [m for m in self.model.modules() if isinstance(m, FusedBlock)]

    def weight_nbytes(self) -> int:
        """Device bytes of all weights: fused GEMM operands plus every remaining parameter and buffer."""
        rest = sum(t.numel() * t.element_size() for t in self.model.parameters())
        rest += sum(t.numel() * t.element_size() for t in self.model.buffers())
        return rest + sum(b.operand_nbytes() for b in self.fused_blocks())

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        cuda = fn(torch.empty(0)).device.type == "cuda"
        if cuda:
            _check_fp8_attention_on_cuda(self.fused_blocks())
        out = super()._apply(fn, recurse)
        self.graphs.clear()  # captured graphs read the old tensors' addresses
        require_kernels(cuda)
        return out

    def _run(self, images: Tensor, query_points: Tensor | None) -> dict:
        return self.model(
            images, query_points, dtype=torch.bfloat16, keep_all_layers=False,
            frames_chunk_size=self.options.frames_chunk_size,
        )  # fmt: skip

    @torch.inference_mode()
    def forward(self, images: Tensor, query_points: Tensor | None = None, *, dtype: torch.dtype | None = None) -> dict:
        """images [S, 3, H, W] or [B, S, 3, H, W] in [0, 1] -> the VGGT prediction dict.

        ``dtype`` exists so an Engine can stand in for a VGGT (``model(images, dtype=...)``); the engine's precision
        is fixed when it is built (bf16 activations, its layers' formats), so only None or bfloat16 are accepted.
        """
        if dtype not in (None, torch.bfloat16):
            raise ValueError(f"the engine runs in bfloat16 (set when it was built); got dtype={dtype}")
        # Validated before any capture, so a bad input raises here rather than being recorded as a capture failure.
        images = self.model.check_images(images.to(torch.bfloat16))
        return self.graphs(images, query_points)


def _check_fp8_attention_on_cuda(blocks: list[FusedBlock]) -> None:
    """Refuse, before anything moves, an fp8-attention engine on CUDA whose head dim the compiled kernel cannot take
    (an 8-bit dot needs K >= 32 on a GPU: the ``tiny`` preset's head dim 16 would fail to compile at the first
    forward). On CPU the twin runs any head dim, so the same engine stays usable there."""
    small = sorted({b.head_dim for b in blocks if b.attention == "fp8" and b.head_dim < 32})
    if small:
        from qvggt.kernels.attention import check_cuda_shape

        check_cuda_shape(small[0])  # raises, naming the head dim and the fallback (attention="sdpa")


def build_engine(model: VGGT, options: EngineOptions | None = None) -> Engine:
    """Convert ``model`` (modified in place: pass a copy to keep the original) into an ``Engine``.

    Works on float models (the bf16 fused path) and on models quantized by ``qvggt.quant.quantize_`` (int8 / fp8
    / int4 weights with per-token int8, fp8 or int4 activations, int4 ones optionally with quantvggt's 8-bit
    special-token rows); formats with no exact kernel path raise
    ``qvggt.engine.operands.UnsupportedLayerError`` naming the layer and the fix.
    """
    if not isinstance(model, VGGT):
        raise TypeError(f"build_engine expects a qvggt VGGT, got {type(model).__name__}")
    options = options or EngineOptions()
    model.eval()
    n = _replace_blocks(model.aggregator, "aggregator", options.attention)
    if n == 0:
        raise ValueError("the model's aggregator has no transformer blocks to fuse (already an engine?)")
    model.aggregator.to(torch.bfloat16)
    if model.correspondence is not None:  # a small model's matcher: its blocks fused too, its linears in bf16
        _replace_blocks(model.correspondence, "correspondence", options.attention)
        model.correspondence.to(torch.bfloat16)
    for head in (model.camera_head, model.depth_head, model.point_head, model.track_head):
        if head is not None:
            head.to(options.head_dtype)
    engine = Engine(model, options)
    device = next(model.parameters()).device
    if device.type == "cuda":
        _check_fp8_attention_on_cuda(engine.fused_blocks())
    require_kernels(device.type == "cuda")
    return engine


_KERNEL_MODULES = ("gemm", "layernorm_quant", "qk_rope", "attention")


def _kernel_modules() -> list:
    import importlib

    mods = []
    for name in _KERNEL_MODULES:
        try:
            mods.append(importlib.import_module(f"qvggt.kernels.{name}"))
        except ImportError:  # the attention kernel module is optional
            if name != "attention":
                raise
    return mods


def _live_counters() -> list[dict[str, int]]:
    """Every launcher counter dict, in a fixed order (a graph replay advances them by its captured launches)."""
    return [c for mod in _kernel_modules() for c in (mod.KERNEL_CALLS, mod.FALLBACK_CALLS)]


def kernel_call_counts() -> dict[str, dict[str, int]]:
    """``{"kernel": {...}, "fallback": {...}}``: launches per launcher since the last reset (proof of the path).

    CUDA-graph replays count too: each advances the counters by the launches its captured forward made.
    """
    kernel: dict[str, int] = {}
    fallback: dict[str, int] = {}
    for mod in _kernel_modules():
        kernel.update(mod.KERNEL_CALLS)
        fallback.update(mod.FALLBACK_CALLS)
    return {"kernel": kernel, "fallback": fallback}


def reset_kernel_call_counts() -> None:
    """Zero every launcher counter."""
    for mod in _kernel_modules():
        for counter in (mod.KERNEL_CALLS, mod.FALLBACK_CALLS):
            for key in counter:
                counter[key] = 0
