"""``quarot``: Hadamard-rotated inputs, then RTN (the QuaRot baseline, data-free).

QuaRot (Ashkboos et al., 2024) multiplies every quantized Linear's input by an orthogonal Hadamard matrix H and its
weight by the same H: y = x W^T = (x H)(W H)^T. A few huge channels of x become many moderate ones (each output
channel of x H mixes all inputs of its block with weights +-1/sqrt(b)), so per-token activation scales and
per-channel weight scales both waste fewer levels on outliers.

The original folds most rotations offline by rotating the whole residual stream, after turning every LayerNorm
into an RMSNorm. VGGT's residual stream is shared across frame and global blocks, the heads read four of its
layers, and its LayerNorms centre their input (a rotation does not commute with the centring), so that rewrite is
not done here. Instead every planned Linear gets an *online* block Hadamard on its input (the exact identity
above), recorded where the engine and the checkpoint can see it:

    QuantLinear.input_hadamard = b      x -> block_hadamard_transform(x, b) before the activation is quantized;
                                        the stored weight is already W Hb (b = a power of two dividing K).

b is the largest power of two dividing the layer's width, capped by ``QuaRotConfig.rotation_block`` (0: no cap),
so for VGGT-1B it is the full width (1024 for qkv / proj / fc1, 4096 for fc2) and for a 9-wide layer 1 (no
rotation). The engine runs each rotation as a stage of the kernel that quantizes the layer's input (qkv / fc1:
the fused LayerNorm -> Hadamard -> quantization kernel; proj / fc2: token quantization, or fc1's epilogue when b
is the tile width 128). The torch reference path runs every case.

The plain (not randomised) Hadamard is used, as QuaRot does for its online rotations; random signs would need an
online sign flip wherever no preceding op can absorb them (after GELU).

``gptq`` with ``rotate=True`` applies the same rotations before collecting its Hessians (QuaRot + GPTQ, the
paper's strongest variant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from qvggt.quant.api import QuantizeHandler, register_quantize_handler
from qvggt.quant.config import QuantConfig, RTNConfig
from qvggt.quant.coverage import FilterFn, LayerPlan, plan_layers, replace_module, select_layers
from qvggt.quant.hadamard import block_hadamard_transform
from qvggt.quant.linear import QuantLinear
from qvggt.quant.rtn import quantize_module

__all__ = [
    "QuaRotConfig",
    "QuaRotHandler",
    "mark_online_rotations",
    "rotate_input_online_",
    "rotate_planned_inputs_",
    "rotated_in_place",
    "rotation_block_for",
]


def _check_rotation_cap(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value and value & (value - 1)):
        raise ValueError(f"{where} must be 0 (full width) or a power of two, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True, eq=False)
class QuaRotConfig(RTNConfig):
    """QuaRot: online block Hadamard on every planned Linear's input, then RTN (fields of ``RTNConfig`` plus):

    Attributes:
        rotation_block: cap on the Hadamard block size (a power of two), or 0 for the largest power of two
            dividing each layer's width (full width for VGGT's 1024 / 4096). 128 gives the engine's tile width.
    """

    HANDLER_MODULE: ClassVar[str | None] = "qvggt.quant.quarot"

    rotation_block: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rotation_cap(self.rotation_block, f"{type(self).__name__}.rotation_block")


def rotation_block_for(width: int, cap: int = 0) -> int:
    """The Hadamard block for a Linear of ``width`` inputs: the largest power of two dividing it, at most ``cap``
    (0: no cap); 0 when that is 1 (an odd width has nothing to rotate by a power-of-two Hadamard)."""
    b = width & -width  # lowest set bit = largest power of two dividing width
    if cap:
        b = min(b, cap)
    return b if b >= 2 else 0


@torch.no_grad()
def rotate_input_online_(linear: nn.Linear, block: int) -> RemovableHandle:
    """W <- W Hb (in float64, cast back) and a forward pre-hook x -> x Hb, so the float layer computes the same
    function while the statistics hooks registered *after* it see rotated inputs. Returns the hook's handle (remove
    it before swapping the layer for a ``QuantLinear`` whose ``input_hadamard`` does the same)."""
    w = linear.weight
    w.copy_(block_hadamard_transform(w.double(), block).to(w.dtype))

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (block_hadamard_transform(args[0], block), *args[1:])

    return linear.register_forward_pre_hook(hook)


def rotate_planned_inputs_(plans: dict[str, LayerPlan], cap: int = 0) -> tuple[list[RemovableHandle], dict[str, int]]:
    """Rotate the input of every planned ``nn.Linear`` online (``rotate_input_online_``); convs are left alone.

    Returns:
        (hook handles, {layer name: block size}) for the rotated layers. On an error every hook already added is
        removed; the rotated weights are put back by ``quantize_`` (the handlers list the rotated Linears in
        ``modifies_in_place``, see ``rotated_in_place``).
    """
    hooks: list[RemovableHandle] = []
    blocks: dict[str, int] = {}
    try:
        for name, plan in plans.items():
            if not isinstance(plan.module, nn.Linear):
                continue
            b = rotation_block_for(plan.module.in_features, cap)
            if b:
                hooks.append(rotate_input_online_(plan.module, b))
                blocks[name] = b
    except Exception:
        for h in hooks:
            h.remove()
        raise
    return hooks, blocks


def rotated_in_place(model: nn.Module, config: RTNConfig, filter_fn: FilterFn | None = None) -> list[nn.Module]:
    """The Linears ``rotate_planned_inputs_`` may rotate in place for ``config`` (its selected ``nn.Linear``s)."""
    return [m for m in select_layers(model, config.coverage, filter_fn).values() if isinstance(m, nn.Linear)]


def mark_online_rotations(model: nn.Module, blocks: dict[str, int]) -> None:
    """Record each rotated layer's block on its ``QuantLinear.input_hadamard`` (after the swap)."""
    modules = dict(model.named_modules())
    for name, b in blocks.items():
        q = modules.get(name)
        if not isinstance(q, QuantLinear):
            raise RuntimeError(f"{name} was rotated but is not a QuantLinear: its stored weight would be W H")  # noqa: TRY004
        q.input_hadamard = b


@dataclass
class _QuaRotState:
    plans: dict[str, LayerPlan]
    hooks: list[RemovableHandle]
    blocks: dict[str, int]


@register_quantize_handler(QuaRotConfig)
class QuaRotHandler(QuantizeHandler):
    """Data-free. prepare: plan + rotate (weights offline, inputs by hooks); convert: RTN of the rotated weights,
    rotations recorded on the QuantLinears; release: remove the hooks."""

    needs_calibration = False

    def prepare(self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> _QuaRotState:
        assert isinstance(config, QuaRotConfig)
        plans = plan_layers(model, config.coverage, config.weight, config.activation, config.layer_overrides, filter_fn)
        hooks, blocks = rotate_planned_inputs_(plans, config.rotation_block)
        return _QuaRotState(plans, hooks, blocks)

    def convert(
        self, model: nn.Module, config: QuantConfig, state: Any, filter_fn: FilterFn | None = None
    ) -> nn.Module:
        assert isinstance(config, QuaRotConfig) and isinstance(state, _QuaRotState)
        self.release(model, state)
        for name, plan in state.plans.items():
            replace_module(model, name, quantize_module(plan, config.clip_search))
        mark_online_rotations(model, state.blocks)
        return model

    def release(self, model: nn.Module, state: Any) -> None:
        if isinstance(state, _QuaRotState):
            for h in state.hooks:
                h.remove()
            state.hooks.clear()

    def modifies_in_place(
        self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None
    ) -> list[nn.Module]:
        assert isinstance(config, QuaRotConfig)
        return rotated_in_place(model, config, filter_fn)
