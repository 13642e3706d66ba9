"""Which layers a quantization method touches, and with which formats.

``select_linears(model, coverage)`` picks the modules; ``plan_layers`` adds a ``filter_fn``, resolves per-layer
weight-format overrides and validates every layer against its formats *before* anything is modified, so a bad
config never leaves a half-quantized model. Methods (RTN now; SmoothQuant, GPTQ, DSFQ later) share both.

Coverage:
    default  ``aggregator.{frame,global}_blocks.<i>.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2}``: the 4 Linears of each
             of the 2 x depth aggregator blocks (192 for vggt-1b), exactly what the published QuantVGGT quantizes.
    full     every ``nn.Linear``, ``nn.Conv2d`` and ``nn.ConvTranspose2d`` (the only conv types in VGGT): the DINOv2
             encoder (patch conv included), aggregator, camera head, DPT heads and tracker.

Not covered by either: the tracker's ``PackedMultiheadAttention.in_proj_weight`` / ``in_proj_bias`` are bare
parameters used through ``F.linear``, not modules, so they stay in full precision (its ``out_proj`` is an
``nn.Linear`` and is covered by ``full``); so do norms, embeddings/tokens and the attention matmuls.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from qvggt.quant.config import Coverage
from qvggt.quant.formats import Granularity, QuantFormat, coerce_enum

__all__ = ["QUANTIZABLE_TYPES", "FilterFn", "LayerPlan", "plan_layers", "select_layers", "select_linears"]

# filter_fn(module, name) -> keep?  (torchao's argument order)
FilterFn = Callable[[nn.Module, str], bool]

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)

_DEFAULT_RE = re.compile(r"^aggregator\.(?:frame|global)_blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))$")


def select_linears(model: nn.Module, coverage: Coverage | str = Coverage.DEFAULT) -> dict[str, nn.Module]:
    """Full-precision modules of ``model`` that ``coverage`` quantizes, by qualified name, in module order.

    Already-quantized modules (``QuantLinear`` / ``QuantConv2d``) are not float ``nn.Linear`` / conv and are never
    selected, so quantizing twice finds nothing new. Works on meta-device models (nothing is read).

    Args:
        model: a VGGT (names follow the released checkpoint) or any module tree.
        coverage: ``"default"`` or ``"full"`` (see the module docstring).

    Returns:
        ``{name: module}``: nn.Linear only for default; nn.Linear, nn.Conv2d and nn.ConvTranspose2d for full.
    """
    coverage = coerce_enum(Coverage, coverage, "coverage")
    if coverage is Coverage.DEFAULT:
        return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and _DEFAULT_RE.match(n)}
    # Exact types: a subclass may change forward (and QuantLinear is deliberately not a Linear subclass).
    return {n: m for n, m in model.named_modules() if type(m) in QUANTIZABLE_TYPES}


def select_layers(
    model: nn.Module, coverage: Coverage | str, filter_fn: FilterFn | None = None
) -> dict[str, nn.Module]:
    """``select_linears`` restricted by ``filter_fn``: the layers ``plan_layers`` plans (before overrides drop any)."""
    selected = select_linears(model, coverage)
    if filter_fn is not None:
        selected = {n: m for n, m in selected.items() if filter_fn(m, n)}
    return selected


@dataclass(frozen=True)
class LayerPlan:
    """How one selected layer is quantized.

    Attributes:
        module: the float module (nn.Linear / nn.Conv2d / nn.ConvTranspose2d) to replace.
        weight: its weight format. Convs always get per-output-channel scales (a group or tensor granularity of
            the config is turned into channel for them: a conv kernel has no natural group axis).
        activation: dynamic input format, None for weight-only (always None for convs).
    """

    module: nn.Module
    weight: QuantFormat
    activation: QuantFormat | None

    @property
    def is_conv(self) -> bool:
        return not isinstance(self.module, nn.Linear)


def _override_for(name: str, overrides: Mapping[str, QuantFormat | None]) -> tuple[bool, QuantFormat | None]:
    """(found, format) for ``name``: an exact key first, then the first matching pattern in dict order."""
    if name in overrides:
        return True, overrides[name]
    for key, fmt in overrides.items():
        if fnmatch.fnmatchcase(name, key):
            return True, fmt
    return False, None


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def plan_layers(
    model: nn.Module,
    coverage: Coverage | str,
    weight: QuantFormat,
    activation: QuantFormat | None,
    layer_overrides: Mapping[str, QuantFormat | None] | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, LayerPlan]:
    """Select, filter and validate the layers to quantize, each with its resolved formats.

    Args:
        model: the model (any device, meta included).
        coverage: see ``select_linears``.
        weight: default weight format.
        activation: dynamic activation format of Linears (None: weight-only).
        layer_overrides: name or fnmatch pattern -> weight format, or None to keep the layer in full precision.
        filter_fn: ``filter_fn(module, name) -> bool``; layers it rejects are neither quantized nor plannable.

    Returns:
        ``{name: LayerPlan}`` in module order, without the layers overridden to None.

    Raises:
        ValueError: an override key that matches no selected layer (naming it), a group size that divides no
            selected Linear's in_features (naming the layers and widths), or nothing selected at all. Where the
            group size divides some layers but not others, the others fall back to per-channel weight scales
            (per-token activation scales) with a warning naming them.
    """
    overrides = dict(layer_overrides or {})
    selected = select_layers(model, coverage, filter_fn)
    unmatched = [k for k in overrides if k not in selected and not any(fnmatch.fnmatchcase(n, k) for n in selected)]
    if unmatched:
        example = next(iter(selected), "<none>")
        raise ValueError(
            f"layer_overrides key(s) {unmatched} match no layer selected for quantization (coverage "
            f"{coerce_enum(Coverage, coverage, 'coverage').value!r}{' and filter_fn' if filter_fn else ''}: "
            f"{len(selected)} layers, e.g. {example!r}); use module names or fnmatch patterns of those layers"
        )
    if not selected:
        raise ValueError(
            "no layer to quantize: the coverage selects no float Linear/conv"
            + (" that filter_fn accepts" if filter_fn else "")
            + " (is the model already quantized?)"
        )
    plans: dict[str, LayerPlan] = {}
    bad: list[str] = []
    for name, module in selected.items():
        found, fmt = _override_for(name, overrides)
        if found and fmt is None:
            continue  # kept in full precision on purpose
        fmt = fmt if found else weight
        assert fmt is not None
        if not isinstance(module, nn.Linear):
            if fmt.granularity is not Granularity.CHANNEL:
                fmt = dataclasses.replace(fmt, granularity=Granularity.CHANNEL, group_size=None)
            plans[name] = LayerPlan(module, fmt, None)
            continue
        k = _in_features(module)
        act = activation
        if fmt.granularity is Granularity.GROUP and k % fmt.group_size:  # type: ignore[operator]
            bad.append(f"{name} (weight {fmt.name}: in_features {k} is not divisible by {fmt.group_size})")
            fmt = dataclasses.replace(fmt, granularity=Granularity.CHANNEL, group_size=None)
        if act is not None and act.granularity is Granularity.GROUP and k % act.group_size:  # type: ignore[operator]
            bad.append(f"{name} (activation {act.name}: in_features {k} is not divisible by {act.group_size})")
            act = dataclasses.replace(act, granularity=Granularity.TOKEN, group_size=None)
        plans[name] = LayerPlan(module, fmt, act)
    if bad:
        shown = "; ".join(bad[:8]) + (f"; ... ({len(bad) - 8} more)" if len(bad) > 8 else "")
        linears = sum(isinstance(p.module, nn.Linear) for p in plans.values())
        fell_back = len({b.split(" ", 1)[0] for b in bad})
        if fell_back == linears:  # the group size fits no layer at all: a wrong setting, not an odd layer
            raise ValueError(f"group size does not divide the layer width for {len(bad)} layer(s): {shown}")
        # A few odd widths (vggt-1b's 9-wide camera-head input, 567-wide heads under "full" coverage): those
        # layers use per-channel (weights) / per-token (activations) scales instead; the quantization summary's
        # format counts show them.
        warnings.warn(
            f"group size does not divide {fell_back} layer(s); they fall back to per-channel/per-token scales: {shown}",
            stacklevel=2,
        )
    return plans


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted path) of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
