"""``quantvggt``: QuantVGGT's Dual-Smoothed Fine-Grained Quantization (DSFQ), built from exact folds.

The paper's recipe, per aggregator block: a Hadamard rotation ("pre-global") spreads the heavy-tailed channels that
the camera and register tokens create over all channels, then a per-channel smoothing ("post-local") balances what
is left between activations and weights, then fine-grained scales (per-token activations, per-channel weights with
a min-MSE clipping search). The published code applies a dense fp32 Hadamard matrix online before every Linear
(about 3.8 GB of matrices, slower than full precision). Here every rotation is either folded into weights (free at
inference) or a block-diagonal Hadamard the engine can apply inside a GEMM epilogue:

    proj   per-head Hadamard H_d (d = head dim) folded into the V rows of qkv (W_v <- H W_v, b_v <- b_v H) and the
           columns of proj (W <- W H): attention mixes tokens within a head, so o_h H = A_h (V_h H). Exact.
    fc2    online block Hadamard of ``fc2_rotation_block`` channels on its input (GELU blocks any fold), stored
           weight W Hb: ``QuantLinear.input_hadamard`` records it; the checkpoint manifest keeps it.
    qkv,   no rotation: their input is LayerNorm's output, which a rotation does not commute with (a residual-
    fc1    stream rotation needs LayerNorm turned into RMSNorm by rewriting every block, QuaRot's route: future
           work). They get the smoothing, folded into LayerNorm's affine, as proj does into the V rows.

Then SmoothQuant's calibration (statistics of the *rotated* activations against the *rotated* weights: the
published code's numerator/denominator mismatch is avoided by construction) and RTN (min/max scales; see
``clip_search`` for why the min-MSE clipping search is off by default).

Special-token rows (``special_token_abits``, 8 by default; ``qvggt.quant.special_tokens``): in the aggregator blocks'
Linears with fewer activation bits, the rows of the camera and register tokens (5 per frame) are quantized on an
8-bit grid with their own per-token scales. They hold the massive channels and feed the camera head; a 4-bit grid
on them costs most of the pose accuracy (measured: docs/QUANTIZATION.md), and no fold can fix it, because
smoothing scales a channel for all tokens and a rotation only spreads it within the token. On the engine the rows
cost nothing (int4-grid activations are int8 codes: only their qmax differs); on average the activations carry
4 + 4 x 5/P bits (P tokens per frame: 4.23 at 126x126, 4.02 at 518x392).

Options (off by default):

    norm_input_rotation   the paper's rotation of *every* Linear input: qkv and fc1 also get an online Hadamard
                          (full width: the largest power of two dividing it) on their LayerNorm-output input,
                          recorded in ``QuantLinear.input_hadamard`` like fc2's. Their smoothing is then dropped:
                          a scale folded into LayerNorm acts *before* the rotation, so it cannot balance the rotated
                          channels (that would need an online per-channel multiply after the rotation). The engine
                          runs it as the rotation stage of its fused LayerNorm -> quantization kernel.
    gptq                  GPTQ weights (``qvggt.quant.gptq``) instead of RTN, on Hessians of the rotated, smoothed
                          inputs: the hooks record X^T X of the rotated input, and smoothing x -> x / s turns it
                          into H / (s s^T) exactly, so no second calibration pass is needed.

Block-wise reconstruction (``reconstruct``, on by default with RTN weights; ``qvggt.quant.reconstruct``): as the
published code (OmniQuant's learnable equivalent transformation and weight clipping, 15 epochs of AdamW per block
there), each aggregator block learns its smoothing factors (log-parameterised, initialised from the statistics
above) and a clipping ratio per weight scale group (sigmoid) with straight-through rounding, minimising the MSE
between the quantized block's output and the float block's, within ``recon_time_budget_s`` and
``recon_max_memory_mb``. The learned s are folded exactly where the statistics' s would be (LayerNorm affine, V
rows), the ratios are baked into the weight scales, and the RTN / GPTQ conversion and the checkpoint format are
unchanged. The online rotations stay as above (fc2's input Hadamard, and qkv/fc1's with ``norm_input_rotation``,
which then learn clipping only). Measured effect: docs/QUANTIZATION.md ("Block-wise reconstruction").
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from qvggt.model.layers import Block
from qvggt.quant.api import QuantizeHandler, register_quantize_handler
from qvggt.quant.config import QuantConfig
from qvggt.quant.coverage import FilterFn, plan_layers, replace_module, select_layers
from qvggt.quant.formats import Granularity
from qvggt.quant.gptq import HessianRecorder, gptq_quantize, uncalibrated_linears
from qvggt.quant.hadamard import block_hadamard_transform, hadamard_transform
from qvggt.quant.linear import QuantLinear
from qvggt.quant.quarot import rotation_block_for
from qvggt.quant.reconstruct import (
    BlockInputRecorder,
    ReconSettings,
    ReconstructionResult,
    chain_blocks,
    fold_order,
    reconstruct_blocks,
    warn_dropped,
)
from qvggt.quant.rtn import quantize_module
from qvggt.quant.smooth import SmoothLayer, SmoothQuantConfig, SmoothQuantHandler, apply_smoothing_
from qvggt.quant.snapshot import enclosing_modules
from qvggt.quant.special_tokens import install_token_period_hook, special_format

log = logging.getLogger(__name__)

__all__ = ["QuantVGGTConfig", "rotate_fc2_input_", "rotate_heads_"]


@dataclass(frozen=True, kw_only=True, eq=False)
class QuantVGGTConfig(SmoothQuantConfig):
    """DSFQ (module docstring). Fields of ``SmoothQuantConfig`` plus:

    Attributes:
        head_rotation: fold a per-head Hadamard into V / proj before smoothing.
        fc2_rotation_block: block size of fc2's online input Hadamard (a power of two dividing the MLP width;
            128 matches the engine's GEMM tile), or 0 for none.
        clip_search: min-MSE weight clipping, off by default: measured on the outlier-stress small model at W4A8
            it raised the pose-encoding error 17x (1.0e-3 -> 1.8e-2): after smoothing, the weight columns of the
            massive channels are the large ones, and a weight-only MSE criterion clips exactly those, ignoring that
            they multiply the largest activations (an activation-aware search would be needed).
        norm_input_rotation: online full-width Hadamard on qkv's and fc1's inputs too (module docstring).
        gptq: GPTQ weights instead of RTN (module docstring); ``gptq_damp`` its relative damping.
        reconstruct: block-wise reconstruction of smoothing and clipping (``qvggt.quant.reconstruct``); None (the
            default) = on with RTN weights, off with ``gptq``: the parameters are learned against RTN rounding,
            and handed to GPTQ they made it worse (measured, tiny planted model W4A4: pose error 0.068 -> 0.093,
            0.089 with the learned smoothing alone; stress model W4A8: 4.9e-4 -> 7.1e-4). ``True`` with ``gptq``
            still runs it (the learned clipping then sets GPTQ's static scales, per channel / tensor).
        recon_epochs: passes over the calibration batches per block (the budget may stop earlier).
        recon_lr: AdamW learning rate of the log-smoothing factors and the clipping logits.
        recon_batch: calibration batches per optimizer step.
        recon_seed: seed of the batch order.
        recon_time_budget_s: seconds for all blocks together (None: no limit; the default keeps ``qvggt quantize``
            on the small model within about a minute on 2 CPU cores). A budget that binds stops blocks after a
            machine-dependent number of steps, so the checkpoint is not reproducible (a warning says how many
            blocks it cut short; the manifest's ``quant_report`` has every block's steps run / planned and whether
            it kept its learned parameters). None is the reproducible choice: the same config, seed and
            calibration data give the same checkpoint (on the same torch build and device).
        recon_max_memory_mb: bound on the activations reconstruction caches (four copies of one block's input);
            calibration batches beyond it are left out of reconstruction (with a warning).
        recon_quant_inputs: train each block on the quantized previous blocks' outputs (OmniQuant), else on the
            float model's.
        recon_special_weight: None: the loss is the MSE over all tokens; a weight w >= 0: the patch tokens' MSE
            plus w times the camera/register tokens' (which the camera head reads: 5 of 86 tokens per frame).
        recon_holdout: fraction of the calibration batches (rounded down) each block does not train on, on which it
            must improve to keep its learned parameters (``qvggt.quant.reconstruct``); 0 tests on the training
            batches. 0.25 (2 of the default 8 scenes) measured better than 0 at W4A4 and W4A8 over 4 seeds:
            docs/QUANTIZATION.md, "Held-out acceptance".
        special_token_abits: activation bits of the camera/register tokens' rows in the aggregator blocks' Linears
            when the layer's activation format has fewer (``qvggt.quant.special_tokens``): those rows carry the
            massive channels and feed the camera head; 8 bits on them is free on the engine (int4-grid activations
            are stored as int8 codes). None: no special rows (the ablation). The rows only ever get more bits than
            the layer: equal bits are a no-op (the default 8 at A8), fewer are refused when quantizing.
        smooth: fold the channel smoothing (``smooth_layers``); False is the "without smoothing" ablation
            (rotations and fine-grained scales only; reconstruction then learns the weight clipping alone).
    """

    HANDLER_MODULE: ClassVar[str | None] = "qvggt.quant.dsfq"
    # What a stored config lacking a field was made with: the behaviour before the field existed (git history of
    # this file), not today's default, so an old checkpoint's manifest reads back as what produced it.
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {
        "norm_input_rotation": False,  # 1d27700: qkv/fc1 inputs were never rotated before
        "gptq": False,  # 1d27700: RTN weights before
        "gptq_damp": 0.01,  # 1d27700: unused without gptq
        "reconstruct": False,  # 43967fb: no reconstruction before (today's None means on with RTN weights)
        "recon_special_weight": None,  # c03bffa: the plain MSE before
        "special_token_abits": None,  # ee96fcd: no special-token rows before
        "smooth": True,  # ee96fcd: always smoothed before
        "recon_holdout": 0.0,  # e135ea3: accepted on the training batches before
    }

    head_rotation: bool = True
    fc2_rotation_block: int = 128
    clip_search: bool = False
    norm_input_rotation: bool = False
    gptq: bool = False
    gptq_damp: float = 0.01
    reconstruct: bool | None = None
    recon_epochs: int = 5
    recon_lr: float = 5e-3
    recon_batch: int = 1
    recon_seed: int = 0
    recon_time_budget_s: float | None = 40.0
    recon_max_memory_mb: float = 4096.0
    recon_quant_inputs: bool = True
    recon_special_weight: float | None = None
    recon_holdout: float = 0.25
    special_token_abits: int | None = 8
    smooth: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_recon()
        b = self.special_token_abits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8):
            raise ValueError(f"QuantVGGTConfig.special_token_abits must be an int in 2..8 or None, got {b!r}")
        for flag in ("norm_input_rotation", "gptq", "smooth"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"QuantVGGTConfig.{flag} must be a bool, got {getattr(self, flag)!r}")  # noqa: TRY004
        d = self.gptq_damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0:
            raise ValueError(f"QuantVGGTConfig.gptq_damp must be a positive float, got {d!r}")
        object.__setattr__(self, "gptq_damp", float(d))
        b = self.fc2_rotation_block
        if isinstance(b, bool) or not isinstance(b, int) or b < 0 or (b and b & (b - 1)):
            raise ValueError(f"QuantVGGTConfig.fc2_rotation_block must be 0 or a power of two, got {b!r}")
        if not isinstance(self.head_rotation, bool):
            raise ValueError(f"QuantVGGTConfig.head_rotation must be a bool, got {self.head_rotation!r}")  # noqa: TRY004

    def _check_recon(self) -> None:
        if self.reconstruct is not None and not isinstance(self.reconstruct, bool):
            raise ValueError(f"QuantVGGTConfig.reconstruct must be a bool or None, got {self.reconstruct!r}")
        for flag in ("recon_quant_inputs",):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"QuantVGGTConfig.{flag} must be a bool, got {getattr(self, flag)!r}")  # noqa: TRY004
        for name, low in (("recon_epochs", 1), ("recon_batch", 1), ("recon_seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"QuantVGGTConfig.{name} must be an int >= {low}, got {v!r}")
        for name in ("recon_lr", "recon_time_budget_s", "recon_max_memory_mb", "recon_special_weight"):
            v = getattr(self, name)
            if v is None and name in ("recon_time_budget_s", "recon_special_weight"):
                continue
            zero_ok = name == "recon_special_weight"
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
                or (v == 0 and not zero_ok)
            ):
                what = {
                    "recon_time_budget_s": "a positive number of seconds, or None for no limit",
                    "recon_special_weight": "a finite weight >= 0, or None for the plain MSE",
                }.get(name, "a positive finite float")
                raise ValueError(f"QuantVGGTConfig.{name} must be {what}, got {v!r}")
            object.__setattr__(self, name, float(v))
        h = self.recon_holdout
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 1:
            raise ValueError(f"QuantVGGTConfig.recon_holdout must be a fraction in [0, 1), got {h!r}")
        object.__setattr__(self, "recon_holdout", float(h))

    @property
    def reconstructs(self) -> bool:
        """Whether block-wise reconstruction runs (``reconstruct``, or its default: with RTN weights only)."""
        return not self.gptq if self.reconstruct is None else self.reconstruct

    def recon_settings(self) -> ReconSettings:
        """The reconstruction knobs of this config."""
        return ReconSettings(
            epochs=self.recon_epochs,
            lr=self.recon_lr,
            batch=self.recon_batch,
            seed=self.recon_seed,
            time_budget_s=self.recon_time_budget_s,
            max_memory_mb=self.recon_max_memory_mb,
            quant_inputs=self.recon_quant_inputs,
            special_weight=self.recon_special_weight,
            holdout=self.recon_holdout,
        )


def _blocks(model: nn.Module) -> dict[str, Block]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Block)}


def special_rows_plan(model: nn.Module, plans: dict[str, Any], bits: int | None) -> dict[str, Any]:
    """Planned Linears of the aggregator's frame/global blocks whose special-token rows get ``bits``-bit
    activations: name -> the rows' format. Only where the layer's activations are int per token with fewer bits
    (other heads' tokens are not laid out per frame; 8-bit or fp8 layers have nothing to gain).

    Raises:
        ValueError: ``bits`` below such a layer's activation bits: the rows would silently keep the layer's
            grid, which is never what asking for fewer bits on them meant (equal bits are a plain no-op).
    """
    if bits is None or getattr(getattr(model, "aggregator", None), "patch_start_idx", 0) <= 0:
        return {}
    out = {}
    for name, plan in plans.items():
        parts = name.split(".")
        act = plan.activation
        in_agg = "aggregator" in parts and ("frame_blocks" in parts or "global_blocks" in parts)
        if not in_agg or act is None or act.is_float:
            continue
        if act.bits > bits:
            raise ValueError(
                f"QuantVGGTConfig.special_token_abits={bits} is below the {act.bits}-bit activations of {name} "
                f"({act.name}): special-token rows only ever get more bits than their layer; use a value above "
                f"{act.bits} (at most 8), or None for no special rows"
            )
        if act.bits < bits:
            out[name] = special_format(act, bits)
    return out


def _check_fc2_rotation(model: nn.Module, plans: dict[str, Any], block: int) -> None:
    """ValueError unless ``block`` (``fc2_rotation_block``) divides the width of every planned Block's fc2."""
    if not block:
        return
    widths = {int(m.mlp.fc2.in_features) for n, m in _blocks(model).items() if f"{n}.mlp.fc2" in plans}
    bad = sorted(w for w in widths if w % block)
    if bad:
        g = math.gcd(*widths)
        top = g & -g  # the largest power of two dividing every width
        choices = "0 (no rotation)" + (f" or a power of two from 2 to {top}" if top >= 2 else "")
        raise ValueError(
            f"QuantVGGTConfig.fc2_rotation_block={block} does not divide the input width of the planned fc2 layers "
            f"(widths {bad} of {sorted(widths)}): use {choices}"
        )


@torch.no_grad()
def rotate_heads_(block: Block) -> None:
    """Fold a per-head orthonormal Hadamard into the V rows of ``attn.qkv`` and the input columns of ``attn.proj``.

    The block computes the same function (exactly, up to rounding): o_h H = softmax(q_h k_h^T) (V_h H).
    """
    attn = block.attn
    h, d = attn.num_heads, attn.head_dim
    c = h * d
    qkv, proj = attn.qkv, attn.proj
    w_v = qkv.weight[2 * c :]  # [C, C_in] rows of V
    w_v.copy_(hadamard_transform(w_v.double().reshape(h, d, -1), dim=1).reshape(w_v.shape).to(w_v.dtype))
    if qkv.bias is not None:
        b_v = qkv.bias[2 * c :]
        b_v.copy_(hadamard_transform(b_v.double().reshape(h, d)).reshape(b_v.shape).to(b_v.dtype))
    w = proj.weight  # [C_out, C]
    w.copy_(hadamard_transform(w.double().reshape(w.shape[0], h, d)).reshape(w.shape).to(w.dtype))


@torch.no_grad()
def rotate_fc2_input_(linear: nn.Linear, block: int) -> RemovableHandle:
    """Rotate ``linear``'s weight by the block Hadamard (W <- W Hb) and rotate its inputs online with a forward
    pre-hook, so the float model keeps its function during calibration. Returns the hook's handle."""
    w = linear.weight
    w.copy_(block_hadamard_transform(w.double(), block).to(w.dtype))

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (block_hadamard_transform(args[0], block), *args[1:])

    return linear.register_forward_pre_hook(hook)


@dataclass
class _DSFQState:
    smooth: Any
    hooks: list[RemovableHandle]
    online: dict[str, int]  # layer name -> block of its online input Hadamard
    hessians: HessianRecorder | None = None
    blocks: BlockInputRecorder | None = None  # reconstruction's calibration inputs
    recon: ReconstructionResult | None = None  # its report, once run
    special: dict[str, Any] = dataclasses.field(default_factory=dict)  # layer -> special rows' format


@register_quantize_handler(QuantVGGTConfig)
class QuantVGGTHandler(QuantizeHandler):
    """prepare: rotations (folded; fc2 online via a hook), then SmoothQuant's statistics hooks;
    convert: smoothing + RTN with clip search, then fc2's QuantLinears record their online rotation."""

    needs_calibration = True

    def prepare(self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> _DSFQState:
        assert isinstance(config, QuantVGGTConfig)
        plans = plan_layers(model, config.coverage, config.weight, config.activation, config.layer_overrides, filter_fn)
        hooks: list[RemovableHandle] = []
        online: dict[str, int] = {}
        smooth_config = config
        _check_fc2_rotation(model, plans, config.fc2_rotation_block)
        special = special_rows_plan(model, plans, config.special_token_abits)
        try:
            for name, block in _blocks(model).items():
                planned = {n[len(name) + 1 :] for n in plans if n.startswith(name + ".")}
                if config.head_rotation and {"attn.qkv", "attn.proj"} <= planned:
                    rotate_heads_(block)
                fc2 = block.mlp.fc2
                b = config.fc2_rotation_block
                if b and "mlp.fc2" in planned:  # divides the width: _check_fc2_rotation
                    hooks.append(rotate_fc2_input_(fc2, b))
                    online[f"{name}.mlp.fc2"] = b
                if config.norm_input_rotation:
                    for sub, linear in (("attn.qkv", block.attn.qkv), ("mlp.fc1", block.mlp.fc1)):
                        b = rotation_block_for(linear.in_features)
                        if sub in planned and b:
                            hooks.append(rotate_fc2_input_(linear, b))  # the same online identity as fc2's
                            online[f"{name}.{sub}"] = b
            if config.norm_input_rotation and config.smooth:
                # A LayerNorm fold acts before the online rotation: it cannot balance rotated channels.
                kept = tuple(k for k in config.smooth_layers if k is SmoothLayer.PROJ)
                if not kept:
                    raise ValueError(
                        "QuantVGGTConfig: norm_input_rotation leaves only proj smoothable, and smooth_layers "
                        "excludes it: add 'proj' to smooth_layers"
                    )
                smooth_config = dataclasses.replace(config, smooth_layers=kept)
            smooth = SmoothQuantHandler().prepare(model, smooth_config, filter_fn)
            hessians = None
            if config.gptq:  # registered after the rotation hooks: Hessians of the rotated inputs
                hessians = HessianRecorder().attach(
                    {n: p.module for n, p in plans.items() if isinstance(p.module, nn.Linear)}
                )
            blocks = None
            chain = chain_blocks(model, plans) if config.reconstructs else {}
            if chain:
                blocks = BlockInputRecorder(chain, config.recon_max_memory_mb * 2**20).attach()
        except Exception:
            for h in hooks:
                h.remove()
            raise
        return _DSFQState(smooth, hooks, online, hessians, blocks, special=special)

    def convert(
        self, model: nn.Module, config: QuantConfig, state: Any, filter_fn: FilterFn | None = None
    ) -> nn.Module:
        assert isinstance(config, QuantVGGTConfig) and isinstance(state, _DSFQState)
        self.release(model, state)
        smooth = state.smooth
        scales, clip = self.learn_and_fold_(model, config, state)
        missing = uncalibrated_linears(state.hessians, smooth.plans) if state.hessians is not None else set()
        for name, plan in smooth.plans.items():  # plan.module is the (now rotated and smoothed) float Linear
            if state.hessians is not None and isinstance(plan.module, nn.Linear) and name not in missing:
                h = state.hessians.hessian(name)
                del state.hessians.sums[name]
                if name in scales:  # input x / s: Hessian diag(1/s) H diag(1/s)
                    inv = 1.0 / scales[name].to(h.device, h.dtype)
                    h = h * inv[:, None] * inv[None, :]
                ratio = clip.get(name) if plan.weight.granularity is not Granularity.GROUP else None
                q, scale, zp = gptq_quantize(
                    plan.module.weight, h, plan.weight, damp=config.gptq_damp, clip_search=config.clip_search,
                    clip_ratio=ratio,
                )  # fmt: skip
                new = QuantLinear.from_float(
                    plan.module, plan.weight, plan.activation, weight=q, scale=scale, zero_point=zp
                )
            elif name in clip:  # the learned clipping, baked into the weight scales
                new = QuantLinear.from_float(plan.module, plan.weight, plan.activation, clip_ratio=clip[name])
            else:
                new = quantize_module(plan, config.clip_search)
            replace_module(model, name, new)
        modules = dict(model.named_modules())
        for name, b in state.online.items():
            q = modules[name]
            assert isinstance(q, QuantLinear), f"{name} was planned but not quantized"
            q.input_hadamard = b
        if state.special:
            count = int(model.aggregator.patch_start_idx)  # type: ignore[union-attr]
            for name, fmt in state.special.items():
                q = modules[name]
                assert isinstance(q, QuantLinear), f"{name} was planned but not quantized"
                q.set_special_rows(count, fmt)
            install_token_period_hook(model)
        if state.recon is not None:  # what save_quantized writes into the manifest's quant_report
            model.qvggt_quant_report = {"reconstruction": state.recon.to_dict()}
        return model

    def learn_and_fold_(
        self, model: nn.Module, config: QuantVGGTConfig, state: _DSFQState
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Reconstruct (if configured) and fold the smoothing scales into the float model, which still computes
        the same function (with its online rotations applied). Returns (name -> folded s, name -> learned clipping
        ratio of the weight scales)."""
        smooth = state.smooth
        absmax = smooth.recorder.absmax
        targets = smooth.targets if config.smooth else {}  # no smoothing: reconstruction learns clipping only
        scales: dict[str, torch.Tensor] = {}
        clip: dict[str, torch.Tensor] = {}
        if state.blocks is not None:
            state.blocks.check()
            warn_dropped(state.blocks, config.recon_max_memory_mb)
            special = int(getattr(getattr(model, "aggregator", None), "patch_start_idx", 0))  # camera + registers
            result = reconstruct_blocks(
                model, state.blocks, smooth.plans, targets, absmax, state.online, config.alpha,
                config.recon_settings(), special_tokens=special, special_act=state.special,
            )  # fmt: skip
            state.blocks, state.recon = None, result  # frees the cached inputs
            for target, s in fold_order(result.scales, targets):
                target.fold_(s)
            scales, clip = dict(result.scales), result.clip
            kept = sum(b.kept for b in result.blocks)
            log.info(
                "reconstruction: %d/%d blocks improved (accepted on %s), %d steps, %.1f s",
                kept, len(result.blocks),
                f"{result.heldout} held-out batches" if result.heldout else "the training batches",
                sum(b.steps for b in result.blocks), result.seconds,
            )  # fmt: skip
        rest = {n: t for n, t in targets.items() if n not in scales}
        scales.update(apply_smoothing_(rest, absmax, config.alpha))
        return scales, clip

    def modifies_in_place(
        self, model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None
    ) -> list[nn.Module]:
        """The Blocks holding a selected Linear: rotations and smoothing fold into their weights and LayerNorms."""
        assert isinstance(config, QuantVGGTConfig)
        return enclosing_modules(model, select_layers(model, config.coverage, filter_fn), Block)

    def release(self, model: nn.Module, state: Any) -> None:
        if isinstance(state, _DSFQState):
            for h in state.hooks:
                h.remove()
            state.hooks.clear()
            if state.hessians is not None:
                state.hessians.remove()
            if state.blocks is not None:
                state.blocks.remove()
            SmoothQuantHandler().release(model, state.smooth)
