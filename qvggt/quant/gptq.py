"""``gptq``: Hessian-aware weight quantization (Frantar et al., 2022) from calibration activations.

For a Linear with calibration inputs X [T, K] the layer-wise objective is ||X W^T - X Q^T||^2, whose Hessian in
each weight row is H = X^T X / T (the same for every row). GPTQ quantizes the columns of W one at a time and, after
quantizing column q, moves the rounding error onto the columns not quantized yet along the inverse Hessian (Optimal
Brain Surgeon's update, F = the remaining columns, Hinv_F = (H_FF)^-1):

    delta_F = -(w_q - quant(w_q)) / [Hinv_F]_qq * [Hinv_F]_{F,q}

The implementation is the standard fast form: the rows of the upper Cholesky factor U of H^-1 hold every
[Hinv_F]_{F,q} / sqrt([Hinv_F]_qq) at once (so no inverse is recomputed), and updates are applied lazily: inside
a block of ``block_size`` columns immediately, to the columns after the block once per block (a GEMM). Details:

- damping: H + damp * mean(diag H) * I (1% by default), for a positive definite H;
- dead inputs (diag H = 0: the channel was always zero in calibration) get H_jj = 1 and a zero weight column;
- ``act_order``: columns in decreasing diag(H) (the largest-energy inputs first, while most columns can still
  absorb their error); the result is permuted back, the stored layout never changes;
- scales: per channel / per tensor from the original weight (min/max, or the min-MSE clipping with
  ``clip_search``); per group either from the original weight (``static_groups``, implied by ``act_order`` so that a
  group's scale never depends on the visiting order) or, as in the paper, from the group's error-updated columns
  when its first column is reached (the block size is then rounded up to a multiple of the group size, so those
  columns are up to date: the reference implementation reads them before the block's pending update);
- the returned weight lies exactly on the grid of the returned float32 scales, so ``QuantLinear`` stores the codes
  GPTQ chose (``QuantLinear.from_float(..., weight=, scale=, zero_point=)``).

Calibration: ``prepare`` puts a forward pre-hook on every planned Linear accumulating X^T X and the token count
(never the activations). Hessians are collected for all layers in one pass over the calibration data, on the
full-precision model (not layer by layer on the partly quantized one, as the paper's sequential variant does):
one forward per batch instead of one per block. Memory is K^2 floats per layer (vggt-1b, default coverage: 48 x
(3 x 1024^2 + 4096^2) x 4 B = 3.8 GB). Convolutions (``coverage="full"``) are quantized with RTN, and so are
Linears that never ran on the calibration data (with a warning naming them): under ``coverage="full"`` the track
head's 19 Linears, because calibration batches carry no query points, so the tracker never runs. That is what
SmoothQuant and quantvggt do with every layer they have no statistics for (weights that need no calibration are
RTN's), so a full-coverage run works with every calibrated method.

With ``rotate=True`` every planned Linear's input is first rotated by an online block Hadamard exactly as
``quarot`` does (``qvggt.quant.quarot``), and the Hessians are those of the rotated inputs: QuaRot + GPTQ.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qvggt.quant.api import QuantizeHandler, register_quantize_handler
from qvggt.quant.config import QuantConfig, RTNConfig
from qvggt.quant.coverage import FilterFn, LayerPlan, plan_layers, replace_module
from qvggt.quant.formats import Granularity, QuantFormat
from qvggt.quant.linear import QuantLinear
from qvggt.quant.quantizer import compute_scales, fake_quantize, mse_clip_search
from qvggt.quant.quarot import _check_rotation_cap, mark_online_rotations, rotate_planned_inputs_, rotated_in_place
from qvggt.quant.recorder import InputRecorder
from qvggt.quant.rtn import quantize_module

__all__ = ["GPTQConfig", "GPTQHandler", "HessianRecorder", "gptq_quantize", "uncalibrated_linears"]


@dataclass(frozen=True, kw_only=True, eq=False)
class GPTQConfig(RTNConfig):
    """GPTQ weights (module docstring) with the config's dynamic activation format. Fields of ``RTNConfig`` plus:

    Attributes:
        damp: relative damping of the Hessian's diagonal (> 0; 0.01 as the paper).
        block_size: columns per lazy-update block (128 as the paper).
        act_order: quantize columns in decreasing Hessian diagonal (implies static group scales).
        static_groups: per-group scales from the original weight instead of the error-updated one.
        rotate: QuaRot's online input Hadamard on every planned Linear first (``rotation_block`` caps its size).
        rotation_block: as ``QuaRotConfig.rotation_block`` (used only with ``rotate``).
        clip_search: min-MSE clipping of the (static) scales of the original weight.
    """

    HANDLER_MODULE: ClassVar[str | None] = "qvggt.quant.gptq"

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    rotate: bool = False
    rotation_block: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            raise ValueError(f"{name}.damp must be a positive float (0.01 is the paper's), got {d!r}")
        object.__setattr__(self, "damp", float(d))
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{name}.block_size must be a positive int, got {b!r}")
        for flag in ("act_order", "static_groups", "rotate"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{name}.{flag} must be a bool, got {getattr(self, flag)!r}")  # noqa: TRY004
        _check_rotation_cap(self.rotation_block, f"{name}.rotation_block")


# ---------------------------------------------------------------------------------------------------------------
# the algorithm


def _column_format(fmt: QuantFormat) -> QuantFormat:
    """The same number format with one scale per row: what a single column [N, 1] is quantized with."""
    return dataclasses.replace(fmt, granularity=Granularity.CHANNEL, group_size=None)


def _column_scales(
    scale: Tensor, zp: Tensor | None, fmt: QuantFormat, col: int, n: int
) -> tuple[Tensor, Tensor | None]:
    """The [N, 1] scale (and zero point) that applies to original column ``col`` of a scale tensor of shape S."""
    if fmt.granularity is Granularity.GROUP:
        g = col // fmt.group_size  # type: ignore[operator]
        return scale[:, g], None if zp is None else zp[:, g]
    return scale.expand(n, 1), None if zp is None else zp.expand(n, 1)


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    fmt: QuantFormat,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    clip_ratio: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """GPTQ of one weight matrix (see the module docstring for every choice).

    Args:
        weight: W [N, K] (any float dtype; not modified).
        hessian: H [K, K] = X^T X / T of the layer's calibration inputs (symmetric positive semi-definite).
        fmt: weight format (granularity channel, group or tensor).
        damp, block_size, act_order, static_groups, clip_search: as ``GPTQConfig``.
        clip_ratio: clipping of the static scales (shape S, e.g. learned by ``qvggt.quant.reconstruct``) instead of
            ``clip_search``'s; only for static scales (ValueError with group scales updated on the way).

    Returns:
        (q [N, K] float64 on the grid of the scales, scale S float32, zero point S float32 or None)

    Raises:
        ValueError: shapes that do not match, a group size that does not divide K, or a Hessian that stays
            non-positive-definite after damping (NaN/inf in the calibration statistics).
    """
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match the weight's {k} input columns")
    gran = fmt.granularity
    if gran not in (Granularity.CHANNEL, Granularity.GROUP, Granularity.TENSOR):
        raise ValueError(f"GPTQ quantizes weights per channel, group or tensor, not {gran.value!r} ({fmt.name})")
    group = fmt.group_size if gran is Granularity.GROUP else None
    if group is not None and k % group:
        raise ValueError(f"group size {group} of {fmt.name} does not divide the layer width {k}")
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    if not bool(torch.isfinite(h).all()):
        raise ValueError("the Hessian has NaN/inf entries: non-finite activations in the calibration run?")

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static = group is None or static_groups or act_order
    if clip_ratio is not None and not static:
        raise ValueError("clip_ratio needs static scales: per channel or tensor, or static_groups / act_order")
    col_fmt = _column_format(fmt)
    if static:
        ratio: Tensor | float = mse_clip_search(w, fmt) if clip_search else 1.0
        if clip_ratio is not None:
            ratio = clip_ratio.detach().to(device=w.device, dtype=torch.float64)
        scale, zp = compute_scales(w, fmt, ratio)
        # Round the scales to float32 first: they are stored in float32, and q must be on the *stored* grid.
        scale = scale.to(torch.float32).to(torch.float64)
        zp = None if zp is None else zp.to(torch.float64)
    else:
        assert group is not None
        scale = torch.ones(n, k // group, 1, dtype=torch.float64, device=w.device)
        zp = None if fmt.symmetric else torch.zeros_like(scale)

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(f"the damped Hessian is not positive definite ({exc}); raise damp") from exc

    bs = block_size if static else math.ceil(block_size / group) * group  # type: ignore[operator]
    q = torch.zeros_like(w)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i if perm is None else int(perm[i1 + i])
            if not static and col % group == 0:  # type: ignore[operator]
                # Without act_order columns come in order, so the group is w1[:, i : i + group], all up to date.
                s, z = compute_scales(w1[:, i : i + group], col_fmt)  # type: ignore[operator]
                scale[:, col // group] = s.to(torch.float32).to(torch.float64)  # type: ignore[operator]
                if zp is not None:
                    assert z is not None
                    zp[:, col // group] = z  # type: ignore[operator]
            s, z = _column_scales(scale, zp, fmt, col, n)
            wc = w1[:, i : i + 1]
            qc = fake_quantize(wc, col_fmt, scale=s, zero_point=z)
            e = (wc - qc) / u1[i, i]
            w1[:, i:] -= e * u1[i : i + 1, i:]
            err1[:, i : i + 1] = e
            q[:, i1 + i] = qc[:, 0]
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q, scale.to(torch.float32), None if zp is None else zp.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# calibration statistics


class HessianRecorder(InputRecorder):
    """Running H = sum X^T X and token counts of Linears' inputs, via forward pre-hooks (float32, float64 for a
    float64 model); never stores activations. ``hessian(name)`` is the mean X^T X / T.

    Register it *after* any hook that transforms the input (an online rotation): pre-hooks run in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}

    def _record(self, name: str, x2d: Tensor) -> None:
        x2 = x2d.to(torch.promote_types(x2d.dtype, torch.float32))
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=x2.dtype, device=x2.device)
        acc.addmm_(x2.T, x2)
        self.tokens[name] = self.tokens.get(name, 0) + x2.shape[0]

    def hessian(self, name: str) -> Tensor:
        """X^T X / T for layer ``name``; ValueError if it never ran."""
        if name not in self.sums:
            raise ValueError(f"no calibration statistics for {name}: did the layer run on the calibration data?")
        return self.sums[name] / self.tokens[name]


def uncalibrated_linears(recorder: HessianRecorder, plans: Mapping[str, LayerPlan]) -> set[str]:
    """Planned Linears without Hessians (they never ran on the calibration data): quantized with RTN instead, with
    a warning naming them (module docstring)."""
    missing = [n for n, p in plans.items() if isinstance(p.module, nn.Linear) and n not in recorder.sums]
    if missing:
        shown = ", ".join(missing[:6]) + (f", ... ({len(missing) - 6} more)" if len(missing) > 6 else "")
        warnings.warn(
            f"GPTQ: {len(missing)} planned Linear(s) never ran on the calibration data, so they have no Hessian and "
            f"are quantized with RTN instead: {shown} (the track head runs only with query points)",
            stacklevel=4,
        )
    return set(missing)


# ---------------------------------------------------------------------------------------------------------------
# handler


@dataclass
class _GPTQState:
    plans: dict[str, LayerPlan]
    recorder: HessianRecorder
    rotation_hooks: list[RemovableHandle]
    rotations: dict[str, int]


@register_quantize_handler(GPTQConfig)
class GPTQHandler(QuantizeHandler):
    """prepare: plan, optional rotations, Hessian hooks; convert: GPTQ per Linear (RTN for convs)."""

    needs_calibration = True

    def prepare(self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> _GPTQState:
        assert isinstance(config, GPTQConfig)
        plans = plan_layers(model, config.coverage, config.weight, config.activation, config.layer_overrides, filter_fn)
        hooks, rotations = rotate_planned_inputs_(plans, config.rotation_block) if config.rotate else ([], {})
        # After the rotation hooks: the Hessians are those of the inputs the quantized layers will see.
        recorder = HessianRecorder().attach({n: p.module for n, p in plans.items() if isinstance(p.module, nn.Linear)})
        return _GPTQState(plans, recorder, hooks, rotations)

    def convert(
        self, model: nn.Module, config: QuantConfig, state: Any, filter_fn: FilterFn | None = None
    ) -> nn.Module:
        assert isinstance(config, GPTQConfig) and isinstance(state, _GPTQState)
        self.release(model, state)
        missing = uncalibrated_linears(state.recorder, state.plans)
        for name, plan in state.plans.items():
            if not isinstance(plan.module, nn.Linear) or name in missing:
                replace_module(model, name, quantize_module(plan, config.clip_search))
                continue
            h = state.recorder.hessian(name)
            q, scale, zp = gptq_quantize(
                plan.module.weight, h, plan.weight, damp=config.damp, block_size=config.block_size,
                act_order=config.act_order, static_groups=config.static_groups, clip_search=config.clip_search,
            )  # fmt: skip
            del state.recorder.sums[name]  # free K^2 floats as soon as the layer is done
            new = QuantLinear.from_float(
                plan.module, plan.weight, plan.activation, weight=q, scale=scale, zero_point=zp
            )
            replace_module(model, name, new)
        mark_online_rotations(model, state.rotations)
        return model

    def modifies_in_place(
        self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None
    ) -> list[nn.Module]:
        assert isinstance(config, GPTQConfig)
        return rotated_in_place(model, config, filter_fn) if config.rotate else []

    def release(self, model: nn.Module, state: Any) -> None:
        if isinstance(state, _GPTQState):
            state.recorder.remove()
            for h in state.rotation_hooks:
                h.remove()
            state.rotation_hooks.clear()
