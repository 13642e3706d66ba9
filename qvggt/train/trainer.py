"""``qvggt train``: train a VGGT preset on cached synthetic scenes, resumable to the same result.

Determinism: the model is initialised from ``seed``; the data order is a fixed permutation per epoch derived
from ``(seed, epoch)``; nothing else draws random numbers. A run killed after a checkpoint and resumed therefore
reproduces the uninterrupted run exactly (same machine and thread count).

In ``work_dir``: ``state.pt`` (model, optimizer, scheduler, step; written atomically every ``checkpoint_every``
steps), ``metrics.csv`` (every ``log_every`` steps) and, with ``val_every``, ``validation.csv`` (held-out pose and
depth every ``val_every`` steps, :mod:`qvggt.train.validation`; its gate may stop the run). At the end, ``out_dir``
receives ``model.safetensors`` (in ``export_dtype``) with its config JSON, and copies of the CSVs. MLflow logging
when ``mlflow_tracking_uri`` is set.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qvggt.config import DataConfig, TrainConfig
from qvggt.io import atomic_open, atomic_path
from qvggt.model import VGGT, build_model, get_preset, save_checkpoint
from qvggt.train.correspondence import matching_loss
from qvggt.train.data import SceneCache, build_cache, frame_windows, select_frames
from qvggt.train.losses import LossWeights, vggt_loss
from qvggt.train.schedule import warmup_cosine
from qvggt.train.validation import ValidationResult, check_gate, gate_failed, validate, validation_scenes

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.csv"
VALIDATION_FILE = "validation.csv"
MODEL_FILE = "model.safetensors"
LOGGED = ("objective", "loss_camera", "loss_conf_depth", "loss_reg_depth", "loss_conf_point", "loss_reg_point")
MATCH_LOGGED = ("loss_match", "match_top1")  # logged too when the model has correspondence tokens


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The schedule of ``cfg`` (``warmup_cosine``): warm-up, cosine to ``min_lr_ratio`` at ``steps``, and the warm
    restart at ``restart_step`` when set."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.restart_step, cfg.restart_lr_ratio)


def batch_indices(step: int, batch_size: int, num_scenes: int, seed: int) -> list[int]:
    """Scene indices of ``step``: positions step*B .. step*B+B-1 of the concatenated per-epoch permutations."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, num_scenes)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(num_scenes)[offset]))
    return out


def training_scenes(data: DataConfig, n: int) -> tuple[list[int], list[str]]:
    """The first ``n`` training seeds, cycling through the training (non-held-out) categories."""
    cats = data.train_categories()
    seeds = list(data.train_seeds.seeds()[:n])
    if len(seeds) < n:
        raise ValueError(f"train.num_scenes={n} exceeds the {len(seeds)} seeds of data.train_seeds")
    return seeds, [cats[s % len(cats)] for s in seeds]


def frame_stride(step: int, cfg: TrainConfig) -> int:
    """Frame stride at ``step``: ``frame_stride``, growing linearly to ``frame_stride_end`` at the last step."""
    if cfg.frame_stride_end is None:
        return cfg.frame_stride
    progress = step / max(1, cfg.steps - 1)
    return round(cfg.frame_stride + progress * (cfg.frame_stride_end - cfg.frame_stride))


def step_frames(step: int, cfg: TrainConfig) -> np.ndarray | None:
    """Frame indices [B, S] of ``step``'s samples within the rendered trajectories (None: all frames); drawn
    from ``(seed, step)`` alone so that a resumed run picks the same frames."""
    if cfg.render_frames is None:
        return None
    rng = np.random.default_rng([cfg.seed, step, 1])
    return frame_windows(rng, cfg.batch_size, cfg.num_frames, cfg.render_frames, frame_stride(step, cfg))


def param_groups(model: VGGT, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices except tokens and position embeddings; the camera head and camera
    token at ``camera_lr_mult`` x lr (split off only when it is not 1, so default runs keep two groups)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        decay = p.ndim >= 2 and "token" not in name and "pos_embed" not in name
        camera = cfg.camera_lr_mult != 1 and (name.startswith("camera_head.") or name == "aggregator.camera_token")
        groups.setdefault((camera, decay), []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr": cfg.lr * (cfg.camera_lr_mult if cam else 1),
        }
        for (cam, decay), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
    ]


def camera_forward(model: VGGT, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Aggregator and camera head only (``pose_enc_list``, and ``match_descriptors`` with correspondence tokens):
    the camera-only warm-up skips the dense heads, which cost most of a CPU step, and the camera head reads only
    the last aggregator layer."""
    preds: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    layers = model.aggregate(images, (model.cfg.depth - 1,), preds)
    with torch.autocast(images.device.type, enabled=False):  # heads in fp32, as VGGT.forward runs them
        preds["pose_enc_list"] = model.camera_head(layers[-1].float(), model.cfg.camera_iterations)
    return preds


def training_losses(
    model: VGGT,
    batch: dict[str, torch.Tensor],
    step: int,
    cfg: TrainConfig,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict:
    """The losses of one training step (``objective`` is what is minimised), by phase: the matcher alone (InfoNCE)
    for the first ``matcher_steps``, the camera loss alone until ``camera_only_steps``, then everything; with
    correspondence tokens, ``matcher_weight`` x InfoNCE is added after the first phase. The forward runs under
    ``autocast``, the losses outside it."""
    images = batch["images"]
    with autocast or contextlib.nullcontext():
        if step < cfg.matcher_steps:
            preds = {"match_descriptors": model.correspondence.matcher(images)}
        elif step < cfg.camera_only_steps:
            preds = camera_forward(model, images)
        else:
            preds = model(images)
    losses: dict = {}
    if step >= cfg.matcher_steps:
        weights = LossWeights(camera=cfg.camera_weight, depth=cfg.depth_weight, point=cfg.point_weight)
        losses = vggt_loss(preds, batch, weights)
    if model.correspondence is not None:
        loss, top1 = matching_loss(
            preds["match_descriptors"], batch, model.cfg.patch_size, model.cfg.matcher_temperature
        )
        weight = 1.0 if step < cfg.matcher_steps else cfg.matcher_weight
        losses["objective"] = losses.get("objective", 0.0) + weight * loss
        losses["loss_match"], losses["match_top1"] = loss, torch.tensor(top1)
    return losses


@dataclass
class TrainResult:
    model_path: Path
    steps: int
    final_loss: float


def init_model(cfg: TrainConfig) -> VGGT:
    """The model ``qvggt train`` starts from for ``cfg``: the preset at the run's image size (track head off, the
    correspondence matcher when asked), seeded by ``cfg.seed``; the same weights on every call."""
    torch.manual_seed(cfg.seed)
    preset = get_preset(cfg.preset)
    model_cfg = preset.replace(
        enable_track=False,
        default_image_hw=(cfg.image_size, cfg.image_size),
        img_size=cfg.image_size,
        correspondence_tokens=cfg.correspondence_tokens,
    )
    model = build_model(model_cfg)
    if cfg.token_init_std is not None:
        with torch.no_grad():  # drawn after the model's own init, from the same seeded generator
            for token in (model.aggregator.camera_token, model.aggregator.register_token):
                token.normal_(0.0, cfg.token_init_std)
    return model


def _append_metrics(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path``; a file whose header lacks some of their columns (written by an
    older version, then resumed) is rewritten under the union of the columns, old rows left blank in the new ones."""
    fields = list(rows[0])
    header = None
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    if header is not None and not set(fields) <= set(header):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
        with atomic_open(path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=header + [k for k in fields if k not in header], restval="")
            writer.writeheader()
            writer.writerows(old + rows)
        return
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or fields, restval="")
        if header is None:
            writer.writeheader()
        writer.writerows(rows)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from, so the CSV matches an uninterrupted run."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with atomic_open(path, "w") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _resume_mismatch(state: dict, cfg: TrainConfig, data_signature: dict) -> list[str]:
    """What differs between a saved run and this one, as ``key: saved -> now`` lines ([] = it may resume).

    Keys only the saved signature has are fields that have since left it (they do not change the weights). States
    written before the data splits were recorded carry no ``data``: those resume on the caller's word."""
    import json

    saved, now = json.loads(state["config"]), json.loads(cfg.training_signature())
    diffs = [
        f"train.{k}: {saved.get(k, '<absent>')!r} -> {now[k]!r}" for k in sorted(now) if saved.get(k, ...) != now[k]
    ]
    old_data = state.get("data")
    if old_data is not None:
        diffs += [f"data.{k}: {old_data.get(k)!r} -> {v!r}" for k, v in data_signature.items() if old_data.get(k) != v]
    return diffs


def _data_signature(data: DataConfig) -> dict:
    """The data settings that decide which scenes a run trains on (what a resumed run must share)."""
    return {"train_seeds": data.train_seeds.model_dump(), "heldout_categories": list(data.heldout_categories)}


def train(
    cfg: TrainConfig,
    data: DataConfig,
    out_dir: str | Path,
    work_dir: str | Path,
    cache_root: str | Path,
    device: str = "cpu",
    export_dtype: torch.dtype = torch.float32,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume from ``work_dir``), then export the model to ``out_dir``. ``stop_after`` ends the run
    after that many steps in total, as an interruption would (used to test resumption)."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seeds, cats = training_scenes(data, cfg.num_scenes)
    rendered = cfg.render_frames or cfg.num_frames
    cache = SceneCache(build_cache(cache_root, seeds, cats, rendered, cfg.image_size, progress))
    val_cache = None
    if cfg.val_every:
        val_seeds, val_cats = validation_scenes(data, cfg.val_scenes)
        val_cache = SceneCache(build_cache(cache_root, val_seeds, val_cats, cfg.num_frames, cfg.image_size, progress))

    model = init_model(cfg).to(device).train()
    # Recomputing blocks saves memory on a GPU but costs a third of the step time on a CPU.
    model.aggregator.gradient_checkpointing = device != "cpu"
    if model.correspondence is not None:
        model.correspondence.matcher.backbone.gradient_checkpointing = device != "cpu"
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))

    step = 0
    state_path = work_dir / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        diffs = _resume_mismatch(state, cfg, _data_signature(data))
        if diffs:
            raise ValueError(
                f"{state_path} was written with other settings ({'; '.join(diffs)}): restore them, or delete "
                f"{work_dir} to start over"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
    metrics_path, val_path = work_dir / METRICS_FILE, work_dir / VALIDATION_FILE
    _truncate_metrics(metrics_path, step)
    _truncate_metrics(val_path, step)

    def save_state() -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "config": cfg.training_signature(),
            "data": _data_signature(data),
        }
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)

    if val_cache is not None and cfg.gate_step is not None and cfg.gate_step <= step < cfg.steps:
        # A resumed run past its gate is judged again before it spends more steps (a failed gate stays failed).
        check_gate(validate(model, val_cache, step, device), cfg)

    tracker = _mlflow_run(cfg) if cfg.mlflow_tracking_uri else None
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else torch.autocast(device, enabled=False)
    )
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    rows: list[dict] = []
    loss_value = float("nan")
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.preset}", disable=not progress, unit="step")
    t0, frames_done = time.perf_counter(), 0
    while step < end:
        batch = cache.batch(batch_indices(step, cfg.batch_size, len(cache), cfg.seed))
        frames = step_frames(step, cfg)
        if frames is not None:
            batch = select_frames(batch, frames)
        batch = {k: v.to(device) for k, v in batch.items()}
        losses = training_losses(model, batch, step, cfg, autocast)
        opt.zero_grad(set_to_none=True)
        losses["objective"].backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        sched.step()
        step += 1
        loss_value = float(losses["objective"].detach())
        frames_done += batch["images"].shape[0] * batch["images"].shape[1]
        fps = frames_done / (time.perf_counter() - t0)
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}", frames_per_s=f"{fps:.1f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm, "frames_per_s": fps}
            # Every column on every row (NaN for a loss not computed, e.g. dense losses in the camera-only warm-up).
            logged = LOGGED + (MATCH_LOGGED if model.correspondence is not None else ())
            row.update({k: float(losses[k].detach()) if k in losses else math.nan for k in logged})
            rows.append(row)
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
        failed = None
        # Validation before the checkpoint: a run killed in between redoes this step's validation on resume.
        if val_cache is not None and (step % cfg.val_every == 0 or step == cfg.steps):
            result = validate(model, val_cache, step, device)
            _log_validation(result, val_path, tracker, bar)
            if gate_failed(result, cfg):
                failed = result
        if step % cfg.checkpoint_every == 0 or step == end or failed is not None:
            if rows:
                _append_metrics(metrics_path, rows)
                rows = []
            save_state()  # on a failed gate: resumable from exactly here
        if failed is not None:
            bar.close()
            if tracker is not None:
                tracker.end_run(status="KILLED")
            check_gate(failed, cfg)
    bar.close()
    model_path = out_dir / MODEL_FILE
    if step >= cfg.steps:
        save_checkpoint(model.eval(), model_path, dtype=export_dtype)
        for path in (metrics_path, val_path):
            if path.exists():
                with atomic_open(out_dir / path.name, "wb") as f:
                    f.write(path.read_bytes())
    if tracker is not None:
        tracker.end_run()
    return TrainResult(model_path, step, loss_value)


def _log_validation(result: ValidationResult, path: Path, tracker, bar: tqdm) -> None:
    """One validation: a row of ``validation.csv``, MLflow metrics ``val_*``, a line under the progress bar."""
    row = result.row()
    _append_metrics(path, [row])
    if tracker is not None:
        tracker.log_metrics({f"val_{k}": v for k, v in row.items() if k != "step"}, step=result.step)
    bar.write(
        f"step {result.step}: held-out rotation {result.rot_median:.1f} deg (identity {result.identity_rot_median:.1f},"
        f" {100 * result.rot_gain:+.1f} %), yaw corr {result.yaw_corr:.2f}, AUC@30 {result.pose_auc30:.1f},"
        f" depth AbsRel {result.depth_abs_rel:.3f}"
        + (f", match top-1 {result.match_top1:.2f}" if math.isfinite(result.match_top1) else "")
    )


def _mlflow_run(cfg: TrainConfig):
    try:
        import mlflow
    except ImportError as exc:  # orchestration extras are optional for the core package
        raise RuntimeError("train.mlflow_tracking_uri is set but mlflow is not installed: pip install mlflow") from exc
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    mlflow.set_experiment(f"train-{cfg.preset}")
    mlflow.start_run()
    mlflow.log_params(cfg.model_dump())
    return mlflow
