"""SmoothQuant: migrate activation outliers into the weights with folded per-channel scales, then RTN.

For a Linear y = X W^T with input channels j (X [T, K], W [N, K]), SmoothQuant picks s [K] and computes
y = (X / s)(W diag(s))^T: the same function, with activation channel ranges divided by s and weight columns
multiplied by s, so a large-range activation channel shares its range with the weights. With per-channel input
absmax a_j = max_t |X_tj| (calibration) and weight column absmax w_j = max_n |W_nj|:

    s_j = a_j^alpha / w_j^(1 - alpha)      clamped to SCALE_RANGE; s_j = 1 where a_j or w_j is 0 (no information)

alpha = 0.5 balances both sides (max |X_j / s_j| = max |W_j s_j| = sqrt(a_j w_j)); larger alpha moves more of the
range into the weights. X / s is never computed online: it is folded into the op before the Linear
(``qvggt.quant.fold``):

    qkv   (attn.qkv input)   into norm1's affine                 (``smooth_into_layernorm_``)
    fc1   (mlp.fc1 input)    into norm2's affine                 (``smooth_into_layernorm_``)
    proj  (attn.proj input)  into the V rows of attn.qkv         (``smooth_into_qkv_v_``; exact: RoPE and qk-norm
                                                                  touch only Q and K)
    fc2   not smoothed: its input is GELU(fc1 x) and GELU does not commute with a per-channel scale, so no
          preceding op can absorb 1/s; it would take an online per-channel multiply (a kernel's job), not a fold.

Calibration (``quantize_(model, SmoothQuantConfig(...), calibration_data=...)``):

- ``prepare`` plans the layers (coverage, ``filter_fn``, ``layer_overrides``; validated before anything changes)
  and puts a forward pre-hook on each planned Linear that is smoothed. The hook keeps only a running per-channel
  absmax [K] (``ChannelAbsMax``): no activation is stored. Every token counts, special (camera/register) tokens
  included, because the quantized Linear sees them too.
- ``convert`` computes s from those statistics and the *current* weights, folds s, then quantizes every planned
  Linear with RTN (``qvggt.quant.rtn.quantize_module``) in the config's formats. proj scales are folded first:
  they divide qkv's V rows, and qkv's own s must see the weight that will actually be quantized.
- ``release`` removes the hooks (also after an error).

Statistics are taken on exactly the activations and weights the quantized Linear will multiply: any transform
meant to precede smoothing (a rotation, a LayerNorm fold) must be applied to the model *before* ``quantize_``, so
the hooks see transformed activations and ``convert`` reads transformed weights. The published QuantVGGT code
initialises s from max|xR| (rotated activations) over max|W| (the *unrotated* weight), a mismatch; here both
sides always come from the same, current model.

Legend: T tokens (all leading dims flattened), K in_features, N out_features, C embed dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qvggt.model.layers import Block
from qvggt.quant.api import QuantizeHandler, register_quantize_handler
from qvggt.quant.config import (
    ACTIVATION_GRANULARITIES,
    INT8_PER_CHANNEL,
    INT8_PER_TOKEN,
    WEIGHT_GRANULARITIES,
    Coverage,
    QuantConfig,
    RTNConfig,
    _check_granularity,
    coerce_format,
)
from qvggt.quant.coverage import FilterFn, LayerPlan, plan_layers, replace_module, select_layers
from qvggt.quant.fold import smooth_into_layernorm_, smooth_into_qkv_v_
from qvggt.quant.formats import QuantFormat, coerce_enum
from qvggt.quant.recorder import InputRecorder
from qvggt.quant.rtn import quantize_module
from qvggt.quant.snapshot import enclosing_modules

__all__ = [
    "SCALE_RANGE",
    "ChannelAbsMax",
    "SmoothLayer",
    "SmoothQuantConfig",
    "SmoothQuantHandler",
    "SmoothTarget",
    "apply_smoothing_",
    "find_smooth_targets",
    "smoothing_scales",
]

# Bounds of a smoothing scale: keeps 1/s and W*s finite in fp16/bf16 whatever the statistics.
SCALE_RANGE: tuple[float, float] = (1e-5, 1e5)


class SmoothLayer(str, Enum):
    """Linears of a ``Block`` whose input SmoothQuant can smooth (mlp.fc2 cannot: see the module docstring)."""

    QKV = "qkv"
    PROJ = "proj"
    FC1 = "fc1"


# Module name suffix of each kind inside a Block.
_SUFFIX: dict[SmoothLayer, str] = {
    SmoothLayer.QKV: "attn.qkv",
    SmoothLayer.PROJ: "attn.proj",
    SmoothLayer.FC1: "mlp.fc1",
}


def _smooth_layers(value: Any) -> tuple[SmoothLayer, ...]:
    where = "SmoothQuantConfig.smooth_layers"
    if isinstance(value, (str, SmoothLayer)):
        value = (value,)
    if not isinstance(value, (tuple, list, set, frozenset)):
        raise ValueError(  # noqa: TRY004 - config validation raises ValueError throughout
            f"{where} must be a list of {[k.value for k in SmoothLayer]}, got {type(value).__name__}"
        )
    kinds: set[SmoothLayer] = set()
    for v in value:
        if v == "fc2":
            raise ValueError(
                f"{where}: 'fc2' cannot be smoothed by folding: its input is GELU(fc1 x) and GELU does not commute "
                "with a per-channel scale, so no preceding op can absorb it"
            )
        kind = coerce_enum(SmoothLayer, v, where)
        if kind in kinds:
            raise ValueError(f"{where} lists {kind.value!r} twice")
        kinds.add(kind)
    if not kinds:
        raise ValueError(f"{where} is empty: with nothing smoothed, use RTNConfig")
    return tuple(k for k in SmoothLayer if k in kinds)  # canonical order: equal configs compare equal


@dataclass(frozen=True, kw_only=True, eq=False)
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant (calibrated per-channel smoothing folded into the preceding op) followed by RTN.

    Attributes:
        weight: weight format (granularity channel, group or tensor). Default int8 per-channel symmetric.
        activation: dynamic input format (token, group or tensor), or None for weight-only. Default int8 per-token.
        alpha: migration strength in [0, 1]: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha). Default 0.5.
        coverage: which layers are quantized ("default": the aggregator blocks' qkv/proj/fc1/fc2; "full").
        layer_overrides: per-layer weight formats, as in ``RTNConfig`` (None keeps a layer in full precision;
            such a layer is not smoothed either).
        smooth_layers: which Linears of each block are smoothed, among "qkv", "proj", "fc1" (default all three;
            "fc2" is refused: not foldable). Stored in canonical order. Planned Linears of other kinds (fc2, head
            Linears under "full") are quantized without smoothing.
        clip_search: min-MSE weight clipping per scale group (``mse_clip_search``), as in ``RTNConfig``.

    Raises:
        ValueError: on any invalid field, naming it.
    """

    HANDLER_MODULE: ClassVar[str | None] = "qvggt.quant.smooth"

    weight: QuantFormat = INT8_PER_CHANNEL
    activation: QuantFormat | None = INT8_PER_TOKEN
    alpha: float = 0.5
    coverage: Coverage = Coverage.DEFAULT
    layer_overrides: dict[str, QuantFormat | None] = field(default_factory=dict)
    smooth_layers: tuple[SmoothLayer, ...] = (SmoothLayer.QKV, SmoothLayer.PROJ, SmoothLayer.FC1)
    clip_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        weight = coerce_format(self.weight, f"{name}.weight")
        _check_granularity(weight, WEIGHT_GRANULARITIES, f"{name}.weight")
        object.__setattr__(self, "weight", weight)
        if self.activation is not None:
            act = coerce_format(self.activation, f"{name}.activation")
            _check_granularity(act, ACTIVATION_GRANULARITIES, f"{name}.activation")
            object.__setattr__(self, "activation", act)
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"{name}.alpha must be a float in [0, 1], got {alpha!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{name}.alpha={alpha} is outside [0, 1]")
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "coverage", coerce_enum(Coverage, self.coverage, f"{name}.coverage"))
        object.__setattr__(self, "smooth_layers", _smooth_layers(self.smooth_layers))
        if not isinstance(self.clip_search, bool):
            raise ValueError(f"{name}.clip_search must be a bool, got {self.clip_search!r}")  # noqa: TRY004
        if not isinstance(self.layer_overrides, dict):
            raise ValueError(  # noqa: TRY004
                f"{name}.layer_overrides must be a dict of layer name/pattern -> format, "
                f"got {type(self.layer_overrides).__name__}"
            )
        overrides: dict[str, QuantFormat | None] = {}
        for key, value in self.layer_overrides.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"{name}.layer_overrides keys must be non-empty strings, got {key!r}")
            try:  # same rules as RTN's overrides; re-raised with this config's name
                overrides[key] = RTNConfig._override_format(key, value, weight)
            except ValueError as exc:
                raise ValueError(str(exc).replace("RTNConfig.", f"{name}.")) from None
        object.__setattr__(self, "layer_overrides", overrides)


# ---------------------------------------------------------------------------------------------------------------
# statistics


class ChannelAbsMax(InputRecorder):
    """Running per-input-channel absmax of Linears' inputs, via forward pre-hooks; never stores activations.

    ``absmax[name]`` is [K] (float32, or float64 for a float64 model) = max over every token of every batch seen of
    |x[..., j]|, for inputs x [..., K]. Use as a context manager or call ``remove()``.

    Example::

        with ChannelAbsMax().attach({"aggregator.frame_blocks.0.attn.qkv": qkv}) as rec:
            model(images)
        rec.absmax["aggregator.frame_blocks.0.attn.qkv"]   # [K]
    """

    def __init__(self) -> None:
        super().__init__()
        self.absmax: dict[str, Tensor] = {}

    def _record(self, name: str, x2d: Tensor) -> None:
        m = x2d.abs().amax(dim=0).to(torch.promote_types(x2d.dtype, torch.float32))
        old = self.absmax.get(name)
        self.absmax[name] = m if old is None else torch.maximum(old, m.to(old.dtype))


def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """s [K] float64 = act_absmax^alpha / weight_absmax^(1 - alpha), clamped to ``SCALE_RANGE``.

    Channels with a zero (never active) activation or weight absmax get s = 1: there is nothing to balance, and a
    huge 1/s on a channel that was merely silent during calibration would blow up at inference.

    Args:
        act_absmax: [K] per-input-channel max |X_j| over calibration tokens.
        weight_absmax: [K] per-input-column max |W_j| over output channels.
        alpha: in [0, 1].

    Raises:
        ValueError: non-finite or negative statistics, mismatched shapes.
    """
    a = act_absmax.detach().to(torch.float64)
    w = weight_absmax.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != w.shape or a.dim() != 1:
        raise ValueError(f"act_absmax {tuple(a.shape)} and weight_absmax {tuple(w.shape)} must both be [K]")
    for what, t in (("activation", a), ("weight", w)):
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{what} absmax statistics must be finite and >= 0 (inf/NaN in the calibration run?)")
    valid = (a > 0) & (w > 0)
    s = a.clamp_min(1e-30).pow(alpha) / w.clamp_min(1e-30).pow(1.0 - alpha)
    s = s.clamp(*SCALE_RANGE)
    return torch.where(valid, s, torch.ones_like(s))


# ---------------------------------------------------------------------------------------------------------------
# targets and folding


@dataclass(frozen=True)
class SmoothTarget:
    """A Linear whose input is smoothed, and the Block holding the op its scale folds into.

    Attributes:
        kind: qkv (folds into ``block.norm1``), proj (into ``block.attn.qkv``'s V rows), fc1 (into ``block.norm2``).
        name: the Linear's qualified module name.
        linear: the float Linear (its input is what ``ChannelAbsMax`` records).
        block: the Block containing it.
    """

    kind: SmoothLayer
    name: str
    linear: nn.Linear
    block: Block

    def weight_absmax(self) -> Tensor:
        """[K] max over output rows of |W[:, j]| of the current weight (float64)."""
        return self.linear.weight.detach().to(torch.float64).abs().amax(dim=0)

    def fold_(self, s: Tensor) -> None:
        """Fold scales ``s`` [K]: the Linear's input becomes X / s and its weight W diag(s)."""
        if self.kind is SmoothLayer.QKV:
            smooth_into_layernorm_(self.block.norm1, [self.linear], s)
        elif self.kind is SmoothLayer.FC1:
            smooth_into_layernorm_(self.block.norm2, [self.linear], s)
        else:
            smooth_into_qkv_v_(self.block.attn, s)


def find_smooth_targets(
    model: nn.Module, names: Iterable[str], layers: Iterable[SmoothLayer | str] = tuple(SmoothLayer)
) -> dict[str, SmoothTarget]:
    """The smoothable Linears among ``names``: ``<block>.attn.qkv`` / ``.attn.proj`` / ``.mlp.fc1`` of a ``Block``.

    Names of other Linears (fc2, head or encoder Linears outside a Block) are skipped: they get no smoothing.

    Args:
        model: the model the names refer to.
        names: qualified Linear names (e.g. the keys of ``plan_layers``).
        layers: which kinds to smooth.

    Returns:
        ``{name: SmoothTarget}`` in the order of ``names``.

    Raises:
        ValueError: a target whose fold partner cannot take the scale (a LayerNorm without affine weight, or an
            already-quantized qkv in front of a proj).
    """
    kinds = {coerce_enum(SmoothLayer, k, "layers") for k in layers}
    targets: dict[str, SmoothTarget] = {}
    bad: list[str] = []
    for name in names:
        for kind in kinds:
            sfx = _SUFFIX[kind]
            if name != sfx and not name.endswith("." + sfx):
                continue
            block = model.get_submodule(name[: -len(sfx)].rstrip("."))
            if not isinstance(block, Block):
                continue
            linear = model.get_submodule(name)
            if type(linear) is not nn.Linear:
                bad.append(f"{name} (already quantized)")
            elif kind is SmoothLayer.PROJ and type(block.attn.qkv) is not nn.Linear:
                bad.append(f"{name} (its V producer attn.qkv is already quantized)")
            elif kind is not SmoothLayer.PROJ:
                norm = block.norm1 if kind is SmoothLayer.QKV else block.norm2
                if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
                    bad.append(f"{name} (its LayerNorm has no affine weight to absorb 1/s)")
            targets[name] = SmoothTarget(kind, name, linear, block)  # type: ignore[arg-type]
    if bad:
        raise ValueError(f"cannot fold smoothing scales for: {'; '.join(bad)}")
    return targets


def apply_smoothing_(
    targets: Mapping[str, SmoothTarget], act_absmax: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """Compute and fold the smoothing scales of ``targets`` (a function-preserving identity on the model).

    proj targets go first: their fold divides qkv's V rows, and a qkv target's weight absmax must be that of the
    weight it will be quantized with. Every other statistic is unaffected by the order.

    Args:
        targets: from ``find_smooth_targets``.
        act_absmax: name -> [K] input absmax recorded on the *current* model (``ChannelAbsMax``).
        alpha: migration strength in [0, 1].

    Returns:
        name -> the folded scales s [K] (float64).

    Raises:
        ValueError: a target without statistics (its layer never ran on the calibration data).
    """
    missing = [n for n in targets if n not in act_absmax]
    if missing:
        shown = ", ".join(missing[:4]) + (f", ... ({len(missing) - 4} more)" if len(missing) > 4 else "")
        raise ValueError(f"no calibration statistics for {len(missing)} layer(s) ({shown}): did they run?")
    order = sorted(targets.values(), key=lambda t: t.kind is not SmoothLayer.PROJ)  # stable: proj first
    scales: dict[str, Tensor] = {}
    for t in order:
        s = smoothing_scales(act_absmax[t.name], t.weight_absmax(), alpha)
        t.fold_(s)
        scales[t.name] = s
    return scales


# ---------------------------------------------------------------------------------------------------------------
# handler


@dataclass
class _SmoothState:
    plans: dict[str, LayerPlan]
    targets: dict[str, SmoothTarget]
    recorder: ChannelAbsMax


@register_quantize_handler(SmoothQuantConfig)
class SmoothQuantHandler(QuantizeHandler):
    """prepare: plan + absmax hooks; convert: fold scales, then RTN; release: remove hooks."""

    needs_calibration = True

    def prepare(self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> _SmoothState:
        assert isinstance(config, SmoothQuantConfig)
        plans = plan_layers(model, config.coverage, config.weight, config.activation, config.layer_overrides, filter_fn)
        targets = find_smooth_targets(model, plans, config.smooth_layers)
        if not targets:
            raise ValueError(
                f"SmoothQuantConfig: none of the {len(plans)} planned layers is a smoothable "
                f"{[k.value for k in config.smooth_layers]} Linear of a transformer Block; use RTNConfig"
            )
        recorder = ChannelAbsMax().attach({n: t.linear for n, t in targets.items()})  # hooks last: nothing leaks
        return _SmoothState(plans, targets, recorder)

    def convert(
        self, model: nn.Module, config: QuantConfig, state: Any, filter_fn: FilterFn | None = None
    ) -> nn.Module:
        assert isinstance(config, SmoothQuantConfig) and isinstance(state, _SmoothState)
        state.recorder.remove()  # the statistics are final; folding must not feed them
        apply_smoothing_(state.targets, state.recorder.absmax, config.alpha)
        for name, plan in state.plans.items():  # plan.module is the (now smoothed) float Linear
            replace_module(model, name, quantize_module(plan, config.clip_search))
        return model

    def release(self, model: nn.Module, state: Any) -> None:
        if isinstance(state, _SmoothState):
            state.recorder.remove()

    def modifies_in_place(
        self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None
    ) -> list[nn.Module]:
        """The Blocks holding a selected Linear: smoothing folds into their LayerNorms, V rows and weights."""
        assert isinstance(config, SmoothQuantConfig)
        return enclosing_modules(model, select_layers(model, config.coverage, filter_fn), Block)
