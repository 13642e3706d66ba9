"""Block-wise reconstruction for ``quantvggt``: learned smoothing factors and weight clipping (OmniQuant-style).

For each aggregator block in execution order (frame 0, global 0, frame 1, ...), the smoothing factors s of its
smoothed Linears (learnable equivalent transformation) and one clipping ratio per weight scale group of every
planned Linear (learnable weight clipping) are trained to minimise

    MSE( block_q(x_q), block_fp(x_fp) )

where block_q runs the block with fake-quantized weights and activations (``fake_quantize_ste``: straight-through
rounding), x_fp is the block's input in the float model and x_q the output of the already reconstructed,
quantized previous block (as OmniQuant does: each block learns to correct the error it inherits, and it is trained
on the inputs it will see once deployed; the target stays the float model's output, so errors are not allowed to
accumulate into the target). ``quant_inputs=False`` feeds x_fp instead.

Parameterisation (log / sigmoid keep both positive and bounded):

    s      = exp(log_s)        [K] per smoothed Linear, initialised from SmoothQuant's statistics of the rotated
                               activations (``smoothing_scales``, exactly DSFQ's initial point)
    ratio  = sigmoid(theta)    scale shape S per planned Linear (one per output channel, or per group),
                               theta initialised to 4 (ratio 0.982, as OmniQuant)

How a block computes during training (what the folded, quantized block computes after conversion; DSFQ's fold
points, ``qvggt.quant.dsfq``):

    qkv    LN1(x) / s_qkv, quantized, times Q(W_qkv diag(s_qkv)) with V rows / s_proj     (s_qkv folds into norm1)
    proj   its input is already attn(V / s_proj) = attn(V) / s_proj, times Q(W_proj diag(s_proj)) (V rows fold)
    fc1    LN2(x) / s_fc1, quantized, times Q(W_fc1 diag(s_fc1))                         (s_fc1 folds into norm2)
    fc2    online block Hadamard of its input (GELU blocks any fold), times Q(W_fc2 Hb); clipping only
    qkv/fc1 with ``norm_input_rotation``: online Hadamard on the LayerNorm output, no smoothing (clipping only)

Optimizer: AdamW without weight decay, ``lr`` for log_s and ``CLIP_LR_FACTOR`` times it for the clipping logits,
decayed linearly to 0 over the planned steps (epochs x batches; a binding time budget stops it earlier).

After training, a block keeps the learned parameters only if they lower its loss below the initial point's
(SmoothQuant scales, plain min/max weight scales). With ``holdout`` > 0 that test runs on calibration batches the
block did not train on (a fraction of them, drawn once by the seed and the same for every block): the learned
clipping is one ratio per weight scale group, enough parameters to fit 6-8 calibration scenes and lose on others
(measured: docs/QUANTIZATION.md, "Held-out acceptance"). Without it the test runs on the training batches, and
reconstruction never makes a block worse on the data it saw. The caller folds the learned s where DSFQ folds it
(``SmoothTarget.fold_``) and bakes the ratios into the weight scales (``QuantLinear.from_float(..., clip_ratio=
ratio)``): the checkpoint format is unchanged.

Memory: calibration caches only the first block's inputs (and, per block, its RoPE positions, views of one
tensor); reconstruction then holds for one block at a time its float inputs (replaced by its float outputs),
its quantized-path inputs and up to two sets of outputs (initial and learned): four activations of one block,
bounded by ``max_memory_mb`` (calibration
batches beyond the bound are left out of reconstruction, with a warning). Time: ``time_budget_s`` is shared by the
blocks on a cumulative schedule (block i must finish by start + budget * (i + 1) / n); each block always gets its
evaluation passes, and the training steps stop when the next step would overrun. Under a binding budget the
number of steps depends on the machine's speed, so only an epoch-bound run is reproducible bit for bit: with
``time_budget_s=None`` (no limit) the same config, seed and calibration data give the same checkpoint. A binding
budget is reported: a warning counts the blocks it cut short, and each ``BlockReport`` (which the checkpoint
manifest keeps, ``ReconstructionResult.to_dict``) holds the steps run and planned and whether the block kept its
learned parameters.

Every calibration batch must have the same tokens per frame (one image size): the special-token rows and the
objective's token mask are laid out per frame (``BlockInputRecorder.check`` refuses mixed sizes).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from qvggt.model.hooks import HookSet
from qvggt.model.layers import Block
from qvggt.quant.coverage import LayerPlan
from qvggt.quant.fold import aggregator_blocks
from qvggt.quant.formats import QuantFormat
from qvggt.quant.hadamard import block_hadamard_transform
from qvggt.quant.quantizer import compute_scales, fake_quantize_ste
from qvggt.quant.smooth import SmoothLayer, SmoothTarget, smoothing_scales
from qvggt.quant.special_tokens import fake_quantize_rows

__all__ = [
    "BlockInputRecorder",
    "BlockReport",
    "ReconSettings",
    "ReconstructionResult",
    "chain_blocks",
    "reconstruct_blocks",
]

# sigmoid(4) = 0.982: OmniQuant's initial clipping, close to min/max but off sigmoid's flat tail.
CLIP_LOGIT_INIT = 4.0
# The clipping logits learn this much faster than log_s: at sigmoid(4), a logit step moves the ratio 57x less.
CLIP_LR_FACTOR = 10.0
# Linears of a Block reconstruction handles, by their name inside the block.
_SUBS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class ReconSettings:
    """Knobs of the reconstruction (``QuantVGGTConfig``'s ``recon_*`` fields).

    Attributes:
        epochs: passes over the cached calibration batches per block.
        lr: AdamW learning rate of log_s and of the clipping logits (no weight decay).
        batch: calibration batches per optimizer step (gradients accumulated over them).
        seed: seeds the batch order (the only randomness).
        time_budget_s: seconds for all blocks together, or None for no limit.
        max_memory_mb: bound on the cached activations (four copies of one block's inputs).
        quant_inputs: train each block on the quantized previous blocks' outputs (else on the float inputs).
        special_weight: None for the plain MSE over all tokens, else the weight of the camera/register tokens'
            mean squared error next to the patch tokens' (``_Objective``).
        holdout: fraction of the calibration batches (rounded down) kept out of training to decide whether a block
            keeps its learned parameters; 0, or fewer than one batch, tests on the training batches.
        progress: tqdm bar (one step per block, its loss in the postfix): True, False, or None for "when stderr
            is a terminal".
    """

    epochs: int = 2
    lr: float = 5e-3
    batch: int = 1
    seed: int = 0
    time_budget_s: float | None = None
    max_memory_mb: float = 4096.0
    quant_inputs: bool = True
    special_weight: float | None = None
    holdout: float = 0.0
    progress: bool | None = None

    def split(self, n: int) -> tuple[list[int], list[int]]:
        """(training, acceptance) batch indices of ``n`` calibration batches: ``floor(holdout * n)`` batches drawn
        by ``seed`` are held out (acceptance = training when none is)."""
        k = math.floor(self.holdout * n)
        if not 0 <= k < n:
            raise ValueError(f"recon holdout={self.holdout!r} leaves no training batch of {n}; use a value in [0, 1)")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 1)).tolist()
        held = sorted(perm[:k])
        train = sorted(perm[k:])
        return train, held or train


@dataclass(frozen=True)
class BlockReport:
    """One block's reconstruction: losses (mean squared error against the float block's output on the acceptance
    batches: the held-out ones, or all when none is held out) at the initial point and with the learned parameters,
    whether these were kept, optimizer steps run and planned (epochs x steps per epoch; fewer run when the time
    budget cut the block short, 0 planned for a block with nothing to learn) and seconds."""

    name: str
    loss_init: float
    loss_learned: float
    kept: bool
    steps: int
    planned_steps: int
    seconds: float

    @property
    def cut_short(self) -> bool:
        """Whether the time budget stopped this block's training before its planned steps."""
        return self.steps < self.planned_steps


@dataclass
class ReconstructionResult:
    """What the caller folds and bakes in.

    Attributes:
        scales: smoothed Linear name -> s [K] float64 (learned, or SmoothQuant's where a block kept its initial
            point); fold with ``SmoothTarget.fold_``.
        clip: planned Linear name -> clipping ratio of its weight scales (shape S), only where learned.
        blocks: per-block reports, in order.
        seconds: wall time of the whole reconstruction.
        heldout: calibration batches held out of training for the acceptance test (0: it ran on the training ones).
        time_budget_s: the budget it ran under (None: no limit).
    """

    scales: dict[str, Tensor] = field(default_factory=dict)
    clip: dict[str, Tensor] = field(default_factory=dict)
    blocks: list[BlockReport] = field(default_factory=list)
    seconds: float = 0.0
    heldout: int = 0
    time_budget_s: float | None = None

    @property
    def cut_short(self) -> list[BlockReport]:
        """The blocks whose training the time budget stopped early."""
        return [b for b in self.blocks if b.cut_short]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record the checkpoint manifest keeps: per block its steps run / planned, whether it kept its
        learned parameters, and its losses. No timings: they would make two identical runs' manifests differ."""
        return {
            "time_budget_s": self.time_budget_s,
            "heldout_batches": self.heldout,
            "blocks_kept": sum(b.kept for b in self.blocks),
            "blocks_cut_short": len(self.cut_short),
            "blocks": [
                {
                    "name": b.name,
                    "steps": b.steps,
                    "planned_steps": b.planned_steps,
                    "kept": b.kept,
                    "loss_init": b.loss_init,
                    "loss_learned": b.loss_learned,
                }
                for b in self.blocks
            ],
        }


# ---------------------------------------------------------------------------------------------------------------
# calibration: the first block's inputs, every block's positions


def chain_blocks(model: nn.Module, planned: Mapping[str, Any]) -> dict[str, Block]:
    """The aggregator's frame/global Blocks in module order if any of them holds a planned Linear, else none. All of
    them, so that the chain stays unbroken where a block has nothing planned (it then just runs in float); the
    recorder checks the execution order and that each one's input is the previous one's output."""
    out = dict(aggregator_blocks(model))
    return out if any(f"{n}.{sub}" in planned for n in out for sub in _SUBS) else {}


class BlockInputRecorder(HookSet):
    """Forward pre-hooks on a chain of Blocks during calibration: keeps the first block's input of every batch
    (up to ``max_bytes`` for four copies) and each block's extra arguments (RoPE positions: references, no copy);
    checks that each block's input is the previous block's output, viewed (the aggregator only reshapes tokens).

    After calibration: ``order`` (block names in execution order), ``inputs`` (first block's inputs per kept
    batch), ``extras[name][b]`` ((args, kwargs) beyond x) and ``shapes[name][b]`` (x's shape).
    """

    def __init__(self, blocks: Mapping[str, Block], max_bytes: float) -> None:
        super().__init__()
        self.blocks = dict(blocks)
        self.max_bytes = max_bytes
        self.order: list[str] = []
        self.inputs: list[Tensor] = []
        self.extras: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {n: [] for n in self.blocks}
        self.shapes: dict[str, list[torch.Size]] = {n: [] for n in self.blocks}
        self.dropped = 0
        self.broken: str | None = None
        self._bytes = 0
        self._keep = False
        self._last: Tensor | None = None

    def attach(self) -> BlockInputRecorder:
        for name, block in self.blocks.items():
            self._add_hook(block.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._add_hook(block.register_forward_hook(self._post))
        return self

    def _pre(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0]
            if name == next(iter(self.blocks)):  # a new batch starts at the first block of the chain
                nbytes = 4 * x.numel() * x.element_size()
                self._keep = not self.inputs or self._bytes + nbytes <= self.max_bytes
                if self._keep:
                    self._bytes += nbytes
                    self.inputs.append(x.detach())
                else:
                    self.dropped += 1
                self._last = None
            elif self._last is None or x.data_ptr() != self._last.data_ptr() or x.numel() != self._last.numel():
                self.broken = self.broken or name
            if not self._keep:
                return
            if len(self.inputs) == 1 and name not in self.order:
                self.order.append(name)
            self.extras[name].append((tuple(args[1:]), dict(kwargs)))
            self.shapes[name].append(x.shape)

        return hook

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._last = output if isinstance(output, Tensor) else None

    def remove(self) -> None:
        super().remove()
        self._last = None

    def check(self) -> None:
        """Raise ValueError unless every block ran once per kept batch, in a chain, on one image size."""
        if not self.inputs:
            raise ValueError("reconstruction: the aggregator blocks never ran on the calibration data")
        if self.broken is not None:
            raise ValueError(
                f"reconstruction: the input of {self.broken} is not the previous block's output; block-wise "
                "reconstruction needs the aggregator's chain of blocks (set reconstruct=False)"
            )
        n = len(self.inputs)
        bad = [k for k in self.blocks if len(self.extras[k]) != n]
        if bad or len(self.order) != len(self.blocks):
            raise ValueError(f"reconstruction: blocks {bad or self.order} did not run once per calibration batch")
        # The first block sees one frame's tokens per sequence: special-token rows are laid out by that period.
        per_frame = sorted({s[-2] for s in self.shapes[self.order[0]]})
        if len(per_frame) > 1:
            raise ValueError(
                f"reconstruction: the calibration batches have different tokens per frame ({per_frame}: mixed image "
                "sizes); give every calibration batch the same image size, or set reconstruct=False"
            )


# ---------------------------------------------------------------------------------------------------------------
# the learnable stand-in of a planned Linear


class _LearnedLinear(nn.Module):
    """Replaces a planned float Linear inside its block while the block is trained (module docstring)."""

    linear: nn.Linear
    v_divisor: _LearnedLinear | None

    def __init__(
        self,
        linear: nn.Linear,
        plan: LayerPlan,
        online: int,
        s_init: Tensor | None,
        special: tuple[QuantFormat, int, int] | None = None,
    ) -> None:
        super().__init__()
        # Plain attributes, not submodules: the optimizer must see only log_s and clip_logit.
        object.__setattr__(self, "linear", linear)
        self.plan, self.online = plan, online
        self.special = special  # (rows' format, tokens per frame, special tokens per frame): quantized apart
        w = linear.weight.detach()
        self.log_s = None if s_init is None else nn.Parameter(s_init.to(w.device, torch.float32).log())
        shape = compute_scales(w, plan.weight)[0].shape
        self.clip_logit = nn.Parameter(torch.full(shape, CLIP_LOGIT_INIT, dtype=torch.float32, device=w.device))
        object.__setattr__(self, "v_divisor", None)  # qkv: the proj whose smoothing divides the V rows
        self.divided_upstream = False  # proj: its v_divisor partner divides its input
        self.quant = False
        self.use_clip = True

    def smoothing(self) -> Tensor | None:
        return None if self.log_s is None else self.log_s.exp()

    def clip_ratio(self) -> Tensor | float:
        return torch.sigmoid(self.clip_logit) if self.use_clip else 1.0

    def forward(self, x: Tensor) -> Tensor:
        if self.online:
            x = block_hadamard_transform(x, self.online)
        w, b = self.linear.weight, self.linear.bias
        if not self.quant:
            return F.linear(x, w, b)
        s = self.smoothing()
        if s is not None:  # proj's input arrives already divided, through the V rows of its qkv
            x = x if self.divided_upstream else x / s.to(x.dtype)
            w = w * s.to(w.dtype)
        sv = None if self.v_divisor is None else self.v_divisor.smoothing()
        if sv is not None:
            c = sv.numel()
            w = torch.cat([w[: 2 * c], w[2 * c :] / sv.to(w.dtype)[:, None]])
            if b is not None:
                b = torch.cat([b[: 2 * c], b[2 * c :] / sv.to(b.dtype)])
        if self.plan.activation is not None and x.numel():
            if self.special is None:
                x = fake_quantize_ste(x, self.plan.activation)
            else:
                fmt, period, count = self.special
                x = fake_quantize_rows(x, self.plan.activation, fmt, period, count, fake_quantize_ste)
        return F.linear(x, fake_quantize_ste(w, self.plan.weight, clip_ratio=self.clip_ratio()), b)


# ---------------------------------------------------------------------------------------------------------------
# one block


class _AdamW:
    """AdamW (decoupled weight decay, here 0: decaying log_s towards s = 1 or the clipping towards 0.5 means
    nothing) with a learning rate per parameter. ``torch.optim.AdamW`` computes the same update, but its first
    construction imports torch._dynamo: 5-10 s, more than a small model's whole reconstruction."""

    def __init__(self, params: list[tuple[Tensor, float]], betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.params = params
        self.betas, self.eps, self.t = betas, 1e-8, 0
        self.m = [torch.zeros_like(p) for p, _ in params]
        self.v = [torch.zeros_like(p) for p, _ in params]

    def zero_grad(self) -> None:
        for p, _ in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr_scale: float = 1.0) -> None:
        """One update with every learning rate multiplied by ``lr_scale`` (the schedule)."""
        self.t += 1
        b1, b2 = self.betas
        for (p, lr), m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-lr * lr_scale / (1 - b1**self.t))


def _run(block: Block, xs: list[Tensor], extras: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Tensor]:
    with torch.no_grad():
        return [block(x, *a, **kw) for x, (a, kw) in zip(xs, extras, strict=True)]


@dataclass(frozen=True)
class _Objective:
    """Mean squared error of a block's output; with ``special`` > 0 (camera/register tokens at the start of every
    ``per_frame`` tokens), the patch tokens' mean plus ``weight`` times the special tokens' mean, so that the few
    tokens the camera head reads are not drowned by the patch tokens (5 of 86 per frame on the small model). The
    token mask follows each output's length, so batches with different frame counts are scored right."""

    per_frame: int = 0
    special: int = 0
    weight: float = 1.0

    def __call__(self, out: Tensor, target: Tensor) -> Tensor:
        if not self.special:
            return F.mse_loss(out, target)
        d = (out - target).square().mean(dim=-1)  # [..., N]
        mask = torch.arange(d.shape[-1], device=d.device) % self.per_frame < self.special
        return d[..., ~mask].mean() + self.weight * d[..., mask].mean()

    @staticmethod
    def for_tokens(per_frame: int, special: int, weight: float | None) -> _Objective:
        if weight is None or not special:
            return _Objective()
        return _Objective(per_frame, special, weight)


def _loss(
    block: Block, xs: list[Tensor], targets: list[Tensor], extras: list[Any], objective: _Objective, on: list[int]
) -> tuple[float, list[Tensor]]:
    """Mean loss over the batches ``on``, and the block's outputs for every batch (the next block's inputs)."""
    outs = _run(block, xs, extras)
    return sum(float(objective(outs[i], targets[i])) for i in on) / len(on), outs


def _init_scales(
    name: str, targets: Mapping[str, SmoothTarget], absmax: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """SmoothQuant's scales (float64) for the block's smoothed Linears, in ``apply_smoothing_``'s order: proj
    first, and qkv's weight statistics taken after proj's scales divided its V rows (the weight it quantizes)."""
    out: dict[str, Tensor] = {}
    proj = f"{name}.attn.proj"
    if proj in targets:
        out[proj] = smoothing_scales(absmax[proj], targets[proj].weight_absmax(), alpha)
    for sub in ("attn.qkv", "mlp.fc1"):
        full = f"{name}.{sub}"
        if full not in targets:
            continue
        w = targets[full].linear.weight.detach().to(torch.float64)
        if sub == "attn.qkv" and proj in out:
            c = out[proj].numel()
            w = torch.cat([w[: 2 * c], w[2 * c :] / out[proj].to(w.device)[:, None]])
        out[full] = smoothing_scales(absmax[full], w.abs().amax(dim=0), alpha)
    return out


@dataclass
class _BlockRun:
    loss_init: float
    loss_learned: float
    kept: bool
    steps: int
    planned: int
    fp_out: list[Tensor]
    q_out: list[Tensor]


def _train_block(
    block: Block,
    wrappers: Mapping[str, _LearnedLinear],
    fp_in: list[Tensor],
    q_in: list[Tensor],
    extras: list[Any],
    split: tuple[list[int], list[int]],
    settings: ReconSettings,
    deadline: float,
    gen: torch.Generator,
    objective: _Objective,
) -> _BlockRun:
    """Train one block whose planned Linears are ``wrappers`` (installed) on the batches ``split[0]``, accepting on
    ``split[1]`` (``ReconSettings.split``); empties ``fp_in``."""
    for w in wrappers.values():
        w.quant = False
    fp_out = _run(block, fp_in, extras)
    fp_in.clear()  # the float outputs are the next block's float inputs
    for w in wrappers.values():
        w.quant, w.use_clip = True, False
    train, accept = split
    t = time.perf_counter()
    loss_init, q_out = _loss(block, q_in, fp_out, extras, objective, accept)
    t_pass = time.perf_counter() - t
    saved = [(w, w.log_s.detach().clone()) for w in wrappers.values() if w.log_s is not None]
    for w in wrappers.values():
        w.use_clip = True
    opt = _AdamW(
        [(w.log_s, settings.lr) for w in wrappers.values() if w.log_s is not None]
        + [(w.clip_logit, settings.lr * CLIP_LR_FACTOR) for w in wrappers.values()]
    )
    stop = deadline - 2.0 * t_pass  # the evaluation pass after training must fit too
    steps, step_time, n = 0, 0.0, len(train)
    epochs = settings.epochs if opt.params else 0  # a block with nothing planned only runs its passes
    planned = epochs * math.ceil(n / settings.batch)
    with torch.enable_grad():
        for _ in range(epochs):
            order = [train[k] for k in torch.randperm(n, generator=gen).tolist()]
            for i in range(0, n, settings.batch):
                if time.perf_counter() + step_time > stop:
                    break
                t = time.perf_counter()
                opt.zero_grad()
                chunk = order[i : i + settings.batch]
                for j in chunk:
                    a, kw = extras[j]
                    (objective(block(q_in[j], *a, **kw), fp_out[j]) / len(chunk)).backward()
                # Linear decay to 0 over the planned steps: measured, a constant lr drifts away from the best point
                # (15 epochs improved 3 of 16 stress-model blocks, 5 epochs 11). By steps, not time, so that a
                # run the budget does not cut is reproducible; a cut one stops before the decay ends.
                opt.step(1.0 - steps / planned)
                steps += 1
                step_time = max(step_time, time.perf_counter() - t)
            else:
                continue
            break  # out of time
    loss_learned, kept = loss_init, False
    if steps:
        loss_learned, learned_out = _loss(block, q_in, fp_out, extras, objective, accept)
        kept = loss_learned < loss_init
        if kept:
            q_out = learned_out
        del learned_out
    if not kept:  # back to the initial point: SmoothQuant's scales, min/max weight scales
        with torch.no_grad():
            for w, log_s in saved:
                w.log_s.copy_(log_s)  # type: ignore[union-attr]
        for w in wrappers.values():
            w.use_clip = False
    return _BlockRun(loss_init, loss_learned, kept, steps, planned, fp_out, q_out if settings.quant_inputs else fp_out)


def reconstruct_blocks(
    model: nn.Module,
    recorder: BlockInputRecorder,
    plans: Mapping[str, LayerPlan],
    targets: Mapping[str, SmoothTarget],
    absmax: Mapping[str, Tensor],
    online: Mapping[str, int],
    alpha: float,
    settings: ReconSettings,
    special_tokens: int = 0,
    special_act: Mapping[str, QuantFormat] | None = None,
) -> ReconstructionResult:
    """Learn smoothing and clipping block by block (module docstring); the model is left as it was (nothing is
    folded or quantized here).

    Args:
        model: the float model after DSFQ's rotations (hooks removed: online rotations are applied here).
        recorder: calibration inputs of the chain (``BlockInputRecorder``, already ``check``-ed).
        plans: planned layers (name -> plan); Linears of the chain's blocks are reconstructed.
        targets: smoothed Linears (name -> target) and ``absmax`` their input statistics.
        online: layer name -> block size of its online input Hadamard.
        alpha: SmoothQuant's migration strength (initial scales).
        settings: epochs, lr, budget ...
        special_tokens: camera + register tokens at the start of each frame's tokens (``special_weight``).
        special_act: layer name -> the format its special-token rows are quantized with (quantvggt's
            ``special_token_abits``), as the converted QuantLinear will.

    Returns:
        ``ReconstructionResult`` (scales of the chain's smoothed Linears, learned clipping ratios, reports).
    """
    _warm_up(plans)
    start = time.perf_counter()
    result = ReconstructionResult(time_budget_s=settings.time_budget_s)
    names = recorder.order
    gen = torch.Generator().manual_seed(settings.seed)
    fp_in, recorder.inputs = recorder.inputs, []  # from here on, only the current block's activations are held
    q_in = list(fp_in)
    train, accept = settings.split(len(fp_in))  # the same split for every block
    result.heldout = 0 if accept is train else len(accept)
    if settings.holdout > 0 and not result.heldout:
        warnings.warn(
            f"reconstruction: recon_holdout={settings.holdout:g} of {len(fp_in)} calibration batches holds none out, "
            "so each block is accepted on the batches it trained on; calibrate on >= "
            f"{math.ceil(1 / settings.holdout)} scenes (or raise recon_max_memory_mb if it left batches out)",
            stacklevel=3,
        )
    per_frame = recorder.shapes[names[0]][0][-2]  # the first block sees one frame's tokens per sequence
    params = {p for blk in recorder.blocks.values() for p in blk.parameters()}
    flags = {p: p.requires_grad for p in params}
    was_training = model.training
    model.eval()
    bar = tqdm(
        names, desc="reconstruct", unit="block", disable=None if settings.progress is None else not settings.progress
    )
    try:
        for p in params:
            p.requires_grad_(False)
        for i, name in enumerate(bar):
            block = recorder.blocks[name]
            extras = recorder.extras[name]
            shapes = recorder.shapes[name]
            fp_in = [x.reshape(s) for x, s in zip(fp_in, shapes, strict=True)]
            q_in = [x.reshape(s) for x, s in zip(q_in, shapes, strict=True)]
            budget = settings.time_budget_s
            deadline = math.inf if budget is None else start + budget * (i + 1) / len(names)
            t0 = time.perf_counter()
            wrappers: dict[str, _LearnedLinear] = {}
            originals: dict[str, nn.Module] = {}
            init = _init_scales(name, targets, absmax, alpha)
            for sub in _SUBS:
                full = f"{name}.{sub}"
                plan = plans.get(full)
                if plan is None or not isinstance(plan.module, nn.Linear):
                    continue
                fmt = (special_act or {}).get(full)
                rows = None if fmt is None else (fmt, per_frame, special_tokens)
                wrappers[full] = _LearnedLinear(plan.module, plan, online.get(full, 0), init.get(full), rows)
                originals[full] = block.get_submodule(sub)
            qkv, proj = wrappers.get(f"{name}.attn.qkv"), wrappers.get(f"{name}.attn.proj")
            if qkv is not None and proj is not None:  # else a float qkv: dividing proj's input is the same
                object.__setattr__(qkv, "v_divisor", proj)
                proj.divided_upstream = True
            _swap(block, name, wrappers)
            try:
                objective = _Objective.for_tokens(per_frame, special_tokens, settings.special_weight)
                run = _train_block(
                    block, wrappers, fp_in, q_in, extras, (train, accept), settings, deadline, gen, objective
                )
            finally:
                _swap(block, name, originals)
            fp_in, q_in = run.fp_out, run.q_out
            for full, w in wrappers.items():
                s = w.smoothing()
                if s is not None:
                    result.scales[full] = s.detach().to(torch.float64) if run.kept else init[full]
                if run.kept:
                    result.clip[full] = torch.sigmoid(w.clip_logit.detach())
            result.blocks.append(
                BlockReport(
                    name, run.loss_init, run.loss_learned, run.kept, run.steps, run.planned, time.perf_counter() - t0
                )
            )
            best = min(run.loss_init, run.loss_learned)
            bar.set_postfix_str(f"{name.split('.', 1)[-1]} mse {run.loss_init:.3g} -> {best:.3g}")
    finally:
        bar.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    warn_cut_short(result)
    return result


def warn_cut_short(result: ReconstructionResult) -> None:
    """Say how many blocks the time budget cut short: their steps (so the checkpoint) depend on the machine's
    speed, and a block that ran no step silently keeps its initial point."""
    short = result.cut_short
    if not short:
        return
    idle = sum(b.steps == 0 for b in short)
    warnings.warn(
        f"reconstruction: recon_time_budget_s={result.time_budget_s:g} cut {len(short)} of {len(result.blocks)} "
        f"blocks short ({sum(b.steps for b in short)} of {sum(b.planned_steps for b in short)} planned steps run"
        + (f"; {idle} ran none and kept their initial point" if idle else "")
        + "): the result depends on this machine's speed and is not reproducible; set recon_time_budget_s=None "
        "(no limit) for a reproducible run, or raise the budget. The checkpoint manifest's quant_report lists the "
        "steps of every block",
        stacklevel=4,
    )


def _warm_up(plans: Mapping[str, LayerPlan]) -> None:
    """Run the fake quantization once with a tensor clipping ratio before the clock starts: the first one imports
    sympy through ``torch.broadcast_shapes`` (about 4 s, once per process), which would eat a block's budget."""
    fmt = next((p.weight for p in plans.values()), None)
    if fmt is not None:
        k = fmt.group_size or 1
        fake_quantize_ste(torch.ones(2, k), fmt, clip_ratio=compute_scales(torch.ones(2, k), fmt)[0])


def _swap(block: Block, name: str, modules: Mapping[str, nn.Module]) -> None:
    for full, m in modules.items():
        parent, _, child = full[len(name) + 1 :].rpartition(".")
        setattr(block.get_submodule(parent), child, m)


def fold_order(scales: Mapping[str, Tensor], targets: Mapping[str, SmoothTarget]) -> list[tuple[SmoothTarget, Tensor]]:
    """(target, s) pairs in the order they must be folded: proj first (its fold divides qkv's V rows, on which
    qkv's scales were learned)."""
    pairs = [(targets[n], s) for n, s in scales.items()]
    return sorted(pairs, key=lambda p: p[0].kind is not SmoothLayer.PROJ)


def warn_dropped(recorder: BlockInputRecorder, max_memory_mb: float) -> None:
    """Say how many calibration batches the memory bound left out of reconstruction."""
    if recorder.dropped:
        warnings.warn(
            f"reconstruction uses {len(recorder.inputs)} of {len(recorder.inputs) + recorder.dropped} calibration "
            f"batches: recon_max_memory_mb={max_memory_mb:g} bounds the cached activations",
            stacklevel=3,
        )
