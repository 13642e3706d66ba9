"""The ``qvggt`` command line. Each verb is a thin wrapper over a pure function in the package."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Quantized VGGT: 3D reconstruction, made cheap.")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _check_device(device: str) -> None:
    """ValueError naming the fix when a CUDA device is asked for and none is visible (torch would assert instead)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device} was given but no CUDA GPU is visible to torch: use --device cpu, or run on a "
                "machine with a GPU (and a CUDA build of torch)"
            )


@app.command()
def predict(
    source: Annotated[str, typer.Argument(help="A folder of images, or synthetic:SEED for a rendered scene.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/predict"),
    preset: Annotated[
        str | None, typer.Option(help="Architecture: tiny, small or vggt-1b [params: predict.preset].")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="model.pt / .pth / .safetensors weights.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, or bfloat16 (aggregator autocast, fp32 heads).")] = None,
    frames: Annotated[int, typer.Option(help="Frames to render for synthetic:SEED.")] = 8,
    size: Annotated[int | None, typer.Option(help="Image width (multiple of 14); default: the preset's.")] = None,
    mode: Annotated[str, typer.Option(help="Image preprocessing: crop or pad.")] = "crop",
    conf_percentile: Annotated[float | None, typer.Option(help="Keep points above this confidence percentile.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for random weights and point subsampling.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    points: Annotated[
        str | None,
        typer.Option(help="Cloud to write/draw: depth (unprojected with the predicted cameras) or pointmap."),
    ] = None,
    params: Annotated[Path, typer.Option(help="Project parameters (section `predict` gives the defaults).")] = Path(
        "params.yaml"
    ),
) -> None:
    """Reconstruct a scene: writes predictions.npz, points.ply and prediction.png into --out.

    Options left out take their value from the `predict` section of params.yaml.
    """
    from qvggt.config import load_config
    from qvggt.predict import predict as run  # lazy: keeps `qvggt --help` fast

    try:
        _check_device(device)
        p = load_config(params).predict
        # params.yaml's model is the default only when the command names no model at all.
        if checkpoint is None and preset is None and p.checkpoint:
            checkpoint = Path(p.checkpoint)
        if checkpoint is None:
            typer.secho(
                "note: no checkpoint given: using randomly initialised weights", fg=typer.colors.YELLOW, err=True
            )
        paths = run(
            source,
            out,
            preset or (None if checkpoint else p.preset),
            checkpoint,
            dtype or p.dtype,
            frames,
            size,
            mode,
            p.conf_percentile if conf_percentile is None else conf_percentile,
            p.seed if seed is None else seed,
            device,
            points or p.points,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    for kind, path in paths.items():
        typer.echo(f"{kind:12s} {path}")


@app.command()
def train(
    # No default: a default of models/small let a smoke run overwrite the embedded model that predict and the
    # pipeline use; the DVC stage names it explicitly.
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the final model and its metrics (e.g. runs/train/model).")
    ],
    work_dir: Annotated[Path, typer.Option(help="Resumable training state.")] = Path("runs/train"),
    cache_dir: Annotated[Path, typer.Option(help="Rendered training-scene cache.")] = Path("runs/cache"),
    export_dtype: Annotated[str, typer.Option(help="float32 or float16 for the exported model.")] = "float16",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    steps: Annotated[int | None, typer.Option(help="Override train.steps (e.g. a smoke run).")] = None,
    params: Annotated[Path, typer.Option(help="Project parameters (sections `train` and `data`).")] = Path(
        "params.yaml"
    ),
) -> None:
    """Train a preset on synthetic scenes with VGGT's losses; resumes from --work-dir after an interruption."""
    import torch

    from qvggt.config import load_config
    from qvggt.train.trainer import train as run

    dtypes = {"float32": torch.float32, "float16": torch.float16}
    try:
        if export_dtype not in dtypes:
            raise ValueError(f"unknown --export-dtype {export_dtype!r}; use float32 or float16")
        cfg = load_config(params)
        # Validated again with the override (model_copy would skip the checks: warm-up and phases must fit).
        tcfg = (
            cfg.train if steps is None else type(cfg.train).model_validate({**cfg.train.model_dump(), "steps": steps})
        )
        result = run(tcfg, cfg.data, out, work_dir, cache_dir, device, dtypes[export_dtype])
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    typer.echo(f"trained {result.steps} steps, final loss {result.final_loss:.4f}: {result.model_path}")


@app.command("eval")
def eval_(
    model: Annotated[
        str,
        typer.Option(
            help="Reference model: a checkpoint, preset:NAME (random weights) or untrained:PARAMS (qvggt train's init)."
        ),
    ],
    compare: Annotated[list[str] | None, typer.Option(help="Models to compare with the reference (repeat).")] = None,
    dataset: Annotated[str, typer.Option(help="synthetic[:eval], co3d:ROOT or 7scenes:ROOT.")] = "synthetic:eval",
    out: Annotated[Path, typer.Option("--out", help="Output folder (resumable).")] = Path("runs/eval"),
    frames: Annotated[int, typer.Option(help="Frames per sample.")] = 8,
    scenes: Annotated[
        int, typer.Option(help="Number of samples (synthetic) or cap on them (spread round-robin over categories).")
    ] = 16,
    baseline: Annotated[bool, typer.Option(help="Also score the identity-pose / constant-depth baseline.")] = False,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    params: Annotated[Path, typer.Option(help="Project parameters (section `data`).")] = Path("params.yaml"),
    categories: Annotated[
        str | None,
        typer.Option(help="Co3D categories: vggt (VGGT's 41, the default), all, or comma-separated names."),
    ] = None,
) -> None:
    """Evaluate models on the same samples: metrics.json, scenes.jsonl and a report folder with plots."""
    from qvggt.config import load_config
    from qvggt.eval.command import run_eval
    from qvggt.eval.runner import format_table

    try:
        _check_device(device)
        if categories is not None and not dataset.lower().startswith("co3d:"):
            raise ValueError(f"--categories applies to co3d:ROOT datasets only, not {dataset!r}")
        options = None if categories is None else {"categories": categories}
        data = load_config(params).data
        result = run_eval(
            model, compare or [], dataset, out, frames, scenes, baseline, dtype, device, data, dataset_options=options
        )
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
        _fail(exc)
    typer.echo(format_table(result))
    typer.echo(f"\nreport: {out / 'report' / 'report.md'}")


@app.command()
def quantize(
    ctx: typer.Context,
    method: Annotated[str, typer.Option(help="rtn, gptq, smoothquant, quarot or quantvggt (DSFQ).")] = "rtn",
    wbits: Annotated[int, typer.Option(help="Weight bits (2-8; 8 with --fp8).")] = 8,
    abits: Annotated[int | None, typer.Option(help="Activation bits; leave out for weight-only.")] = 8,
    group_size: Annotated[int | None, typer.Option(help="Per-group weight scales of this size.")] = None,
    coverage: Annotated[str, typer.Option(help="default (aggregator-block linears) or full.")] = "default",
    fp8: Annotated[bool, typer.Option(help="fp8 e4m3 W8A8 instead of int8.")] = False,
    model: Annotated[Path, typer.Option(help="Checkpoint to quantize.")] = Path("models/small/model.safetensors"),
    calib_scenes: Annotated[int, typer.Option(help="Calibration scenes (methods that calibrate).")] = 8,
    calib_manifest: Annotated[
        Path | None, typer.Option(help="Calibrate on the samples of a `qvggt calibrate` manifest.json instead.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/quantized"),
    params: Annotated[Path, typer.Option(help="Project parameters (section `data`).")] = Path("params.yaml"),
    reconstruct: Annotated[
        bool | None, typer.Option("--reconstruct/--no-reconstruct", help="quantvggt: block-wise reconstruction.")
    ] = None,
    recon_epochs: Annotated[int | None, typer.Option(help="quantvggt: reconstruction epochs per block.")] = None,
    recon_time_budget: Annotated[
        float | None, typer.Option(help="quantvggt: reconstruction seconds, all blocks (0: no limit).")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(help="Any field of the method's config as KEY=VALUE (YAML value; repeat), e.g. gptq=true."),
    ] = None,
    device: Annotated[str, typer.Option(help="Where to calibrate and quantize: cpu or cuda.")] = "cpu",
    allow_other_model: Annotated[
        bool, typer.Option(help="Use a --calib-manifest selected with another model (refused by default).")
    ] = False,
    job: Annotated[
        str | None,
        typer.Option(
            help="Take method, bits and options from this job of params.yaml `pipeline.jobs` (its label or "
            "method-wWaA), as DVC's quantize stages do; the other method flags must then be left out."
        ),
    ] = None,
) -> None:
    """Quantize a model and write a packed checkpoint (model.safetensors + model.json manifest)."""
    from qvggt.config import load_config
    from qvggt.quant.command import parse_options, reconstruction_options, run_quantize

    try:
        _check_device(device)
        project = load_config(params)
        data = project.data
        options = {
            **parse_options(option or []),
            **reconstruction_options(reconstruct, recon_epochs, recon_time_budget),
        }
        if job is not None:
            method_flags = ("method", "wbits", "abits", "group_size", "fp8", "option", "reconstruct", "recon_epochs",
                            "recon_time_budget")  # fmt: skip
            given = [f"--{n.replace('_', '-')}" for n in method_flags
                     if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]  # fmt: skip
            if given:
                raise ValueError(f"--job {job} takes the method, bits and options from {params}; drop {given}")
            spec = project.pipeline.find_job(job)
            method, wbits, abits, options = spec.method, spec.wbits, spec.abits, dict(spec.options)
        result = run_quantize(
            method, wbits, abits, out, model, group_size, coverage, fp8, calib_scenes, data=data,
            calib_manifest=calib_manifest, options=options, device=device, allow_other_model=allow_other_model,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    s = result.summary
    typer.echo("| layers | weight formats | float weight MB | quantized weight MB | compression |")
    typer.echo("|---|---|---|---|---|")
    formats = ", ".join(f"{k} x{v}" for k, v in s.weight_formats.items())
    typer.echo(
        f"| {s.num_layers} | {formats} | {s.weight_bytes_before / 1e6:.2f} | {s.weight_bytes_after / 1e6:.2f} "
        f"| {s.compression:.2f}x |"
    )
    peak = (
        "" if result.peak_device_bytes is None else f", peak {device} memory {result.peak_device_bytes / 2**30:.2f} GiB"
    )
    typer.echo(f"written: {result.path} ({result.seconds:.1f} s{peak})")


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option("--out", help="Folder for manifest.json and calibrate.json.")] = Path(
        "runs/calibrate"
    ),
    model: Annotated[Path | None, typer.Option(help="Float checkpoint [params: calibrate.checkpoint].")] = None,
    mode: Annotated[str | None, typer.Option(help="random, filter, cluster or nfds [params: calibrate.mode].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of k-means and the draw [params: calibrate.seed].")] = None,
    pool_scenes: Annotated[
        int | None, typer.Option(help="Candidate pool size [params: calibrate.pool_scenes].")
    ] = None,
    n_clusters: Annotated[int | None, typer.Option(help="k-means clusters [params: calibrate.n_clusters].")] = None,
    params: Annotated[Path, typer.Option(help="Project parameters (sections `calibrate` and `data`).")] = Path(
        "params.yaml"
    ),
) -> None:
    """Select the calibration set (noise-filtered, diverse) and write its byte-reproducible manifest.

    Options left out take their value from the `calibrate` section of params.yaml.
    """
    from qvggt.calib.command import run_calibrate
    from qvggt.config import load_config

    try:
        cfg = load_config(params)
        c = cfg.calibrate
        result = run_calibrate(
            model or Path(c.checkpoint), out, mode or c.mode, c.seed if seed is None else seed,
            c.pool_scenes if pool_scenes is None else pool_scenes, c.frames,
            c.n_clusters if n_clusters is None else n_clusters, c.n_per_cluster, c.n_init,
            c.iqr_factor, cfg.data,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    except OSError as exc:  # a full disk or an unwritable --out: nothing was half-written (atomic writes)
        _fail(OSError(f"cannot write to {out}: {exc.strerror or exc}; free disk space or choose a writable --out"))
    selected = f"{result.num_selected} of {result.num_requested} selected"
    if result.num_selected < result.num_requested:
        selected += " (too few survivors in the pool: raise --pool-scenes)"
    elif result.num_topped_up:
        selected += f" ({result.num_topped_up} places of small clusters filled from larger ones)"
    typer.echo(
        f"pool {result.pool_size}, {result.num_removed} outliers removed, {selected}; "
        f"manifest sha256 {result.manifest_sha256[:16]}"
    )
    typer.echo(f"written: {result.manifest_path}")


@app.command()
def memory(
    frames: Annotated[list[int], typer.Option(help="Frame counts.")] = [8, 32, 100],  # noqa: B006
    height: int = 392,
    width: int = 518,
    preset: str = "vggt-1b",
) -> None:
    """Estimate peak inference memory on the meta device (keep-4 vs keep-all layers, fp32 and bf16)."""
    import torch

    from qvggt.model import get_preset
    from qvggt.model.memory import estimate_peak_memory

    try:
        cfg = get_preset(preset)
    except ValueError as exc:
        _fail(exc)
    typer.echo("| frames | dtype | weights GB | peak, all 24 layers kept GB | peak, 4 read layers kept GB | saving |")
    typer.echo("|---|---|---|---|---|---|")
    for s in frames:
        for dt in (torch.float32, torch.bfloat16):
            full = estimate_peak_memory(cfg, s, height, width, dt, keep_all_layers=True)
            lean = estimate_peak_memory(cfg, s, height, width, dt, keep_all_layers=False)
            typer.echo(
                f"| {s} | {full.dtype} | {full.weight_bytes / 1e9:.2f} | {full.peak_bytes / 1e9:.2f} | "
                f"{lean.peak_bytes / 1e9:.2f} | {full.peak_bytes / lean.peak_bytes:.2f}x |"
            )


@app.command("activation-stats")
def activation_stats(
    model: Annotated[
        list[str], typer.Option(help="Model specs to compare (checkpoint, preset:NAME or untrained:PARAMS; repeat).")
    ],
    out: Annotated[Path, typer.Option(help="Output folder: per-model statistics, plots, heavy_tails.md.")] = Path(
        "runs/activation_stats"
    ),
    scenes: Annotated[int, typer.Option(help="Calibration-split synthetic scenes.")] = 8,
    frames: Annotated[int, typer.Option(help="Frames per scene.")] = 4,
    plots: Annotated[bool, typer.Option(help="Write per-layer plots.")] = True,
    params: Annotated[Path, typer.Option(help="Project parameters (section `data`).")] = Path("params.yaml"),
) -> None:
    """Heavy tails of the aggregator's linear inputs (special vs patch tokens) for one or more models."""
    from qvggt.calib.heavy_tails import heavy_tail_table, measure_heavy_tails
    from qvggt.config import load_config
    from qvggt.eval.command import load_model_spec
    from qvggt.quant.command import calibration_batches

    try:
        data = load_config(params).data
        loaded = dict(load_model_spec(spec) for spec in model)
        hw = next(iter(loaded.values())).cfg.default_image_hw
        batches, _ = calibration_batches(data, scenes, frames, hw)
        rows = measure_heavy_tails(loaded, batches, out, plots=plots)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(heavy_tail_table(rows))
    typer.echo(f"statistics and plots under {out}")


@app.command("stress-model")
def stress_model(
    checkpoint: Annotated[Path, typer.Option(help="Trained float checkpoint.")] = Path(
        "models/small/model.safetensors"
    ),
    out: Annotated[Path, typer.Option(help="Where to write the stress variant (.safetensors).")] = Path(
        "runs/stress/model.safetensors"
    ),
    magnitude: Annotated[float, typer.Option(help="Planted channel magnitude on camera/register tokens.")] = 40.0,
    steps: Annotated[int, typer.Option(help="Fine-tuning steps with the outliers in place.")] = 300,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine decay).")] = 1e-4,
    distill_weight: Annotated[
        float, typer.Option(help="Weight of the L1 distance to the base model's outputs (0: ground truth only).")
    ] = 1.0,
    camera_head_lr: Annotated[float, typer.Option(help="Camera head's learning rate, in multiples of --lr.")] = 1.0,
    scenes: Annotated[int, typer.Option(help="Training scenes (the first N training seeds).")] = 2000,
    cache_dir: Annotated[
        Path, typer.Option(help="Training-scene cache root (shared with `qvggt train`: reused when present).")
    ] = Path("runs/cache"),
    seed: int = 0,
    params: Annotated[Path, typer.Option(help="Project parameters (section `data`).")] = Path("params.yaml"),
) -> None:
    """Outlier-stress variant: massive camera/register-token channels, then a short fine-tune (tokens frozen)."""
    import torch

    from qvggt.calib.stress import finetune_, plant_massive_activations_
    from qvggt.config import load_config
    from qvggt.model import load_vggt, save_checkpoint
    from qvggt.train.data import build_cache
    from qvggt.train.trainer import training_scenes

    try:
        data = load_config(params).data
        torch.manual_seed(seed)
        model = load_vggt(checkpoint)
        seeds, cats = training_scenes(data, scenes)
        h, w = model.cfg.default_image_hw
        if h != w:
            raise ValueError(f"the training cache renders square images; {checkpoint} expects {h}x{w}")
        cache = build_cache(cache_dir, seeds, cats, 4, w)
        teacher = load_vggt(checkpoint) if distill_weight > 0 else None
        plant_massive_activations_(model, magnitude=magnitude, seed=seed)
        losses = finetune_(
            model,
            cache,
            steps=steps,
            lr=lr,
            seed=seed,
            teacher=teacher,
            distill_weight=distill_weight,
            camera_head_lr_scale=camera_head_lr,
        )
        save_checkpoint(model, out, dtype=torch.float16)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(f"wrote {out}: fine-tune loss {sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}")


@app.command("reproduce-table")
def reproduce_table_(
    checkpoint: Annotated[Path, typer.Option(help="Float VGGT checkpoint (VGGT-1B for the paper's numbers).")],
    co3d: Annotated[Path, typer.Option(help="Co3Dv2 root in its published layout.")],
    out: Annotated[Path, typer.Option(help="Output folder (resumable).")] = Path("runs/paper_table"),
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "rtn,gptq,smoothquant,quarot,quantvggt",
    bits: Annotated[str, typer.Option(help="Comma-separated bit settings.")] = "w8a8,w4a4",
    frames: Annotated[str, typer.Option(help="Comma-separated frames per sequence.")] = "10,20",
    calib_sequences: Annotated[int, typer.Option(help="Calibration sequences (Co3D train split).")] = 20,
    calib_frames: Annotated[int, typer.Option(help="Frames per calibration sequence.")] = 10,
    max_sequences: Annotated[int, typer.Option(help="Cap on test sequences.")] = 10_000,
    min_sequence_length: Annotated[int, typer.Option(help="Co3D minimum sequence length (VGGT: 50).")] = 50,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, or bfloat16 as the paper on a GPU.")] = "float32",
    categories: Annotated[
        str, typer.Option(help="Co3D categories: vggt (VGGT's 41), all, or comma-separated names.")
    ] = "vggt",
    calib_pool: Annotated[
        int | None, typer.Option(help="NFDS candidate pool for quantvggt (train sequences; default 5x calib).")
    ] = None,
) -> None:
    """Reproduce the QuantVGGT paper's Co3Dv2 table (FP and each method at W8A8 / W4A4) in one command."""
    from qvggt.eval.paper_table import reproduce_table

    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]
    try:
        options = {"min_sequence_length": min_sequence_length, "categories": categories}
        reproduce_table(
            checkpoint, co3d, out, split(methods), split(bits), [int(f) for f in split(frames)], calib_sequences,
            calib_frames, max_sequences, options, device, dtype, log=typer.echo, calib_pool=calib_pool,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo((out / "table.md").read_text())


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md and bench_models.jsonl.")] = Path(
        "runs/bench"
    ),
    frames: Annotated[str, typer.Option(help="Comma-separated frame counts.")] = "1,8,32,100",
    configs: Annotated[str, typer.Option(help="Comma-separated configs, or 'all'.")] = "all",
    height: int = 392,
    width: int = 518,
    preset: Annotated[str | None, typer.Option(help="Model preset (default vggt-1b on a GPU, tiny on CPU).")] = None,
    kernels: Annotated[bool, typer.Option(help="Run the per-kernel section (GPU only).")] = True,
    retention_checkpoint: Annotated[
        Path | None, typer.Option(help="Trained checkpoint for the accuracy-retention section ('' to skip).")
    ] = Path("models/small/model.safetensors"),
    retention_scenes: int = 8,
    seed: int = 0,
    order: Annotated[
        str,
        typer.Option(help="'priority': the 32-frame headline and 100-frame memory first; 'config': config by config."),
    ] = "priority",
    retention_only: Annotated[
        bool,
        typer.Option("--retention-only", help="Only add the retention section to the bench.json already in --out."),
    ] = False,
    retention_skipped: Annotated[
        str | None, typer.Option(metavar="REASON", help="Record the retention section as skipped, with this reason.")
    ] = None,
) -> None:
    """Benchmark the published path, the bf16 fused engine and each quantized config (latency, memory, fidelity)."""
    import sys

    from qvggt.bench.run import bench_command

    try:
        typer.echo(bench_command(
            out, configs, frames, height, width, preset, kernels, retention_checkpoint, retention_scenes, seed, order,
            retention_only, retention_skipped, "qvggt bench " + " ".join(sys.argv[2:]), log=typer.echo,
        ))  # fmt: skip
    except ValueError as exc:
        _fail(exc)


def main() -> None:
    """The ``qvggt`` console entry point: :data:`app`, plus one clear message for operating-system failures that a
    verb did not handle itself (a full disk, a read-only or missing output folder). Artifacts are written atomically,
    so such a failure leaves the previous file or none, never a half-written one."""
    import errno

    from safetensors import SafetensorError

    try:
        app()
    except SafetensorError as exc:
        if "I/O error" not in str(exc):
            raise
        # safetensors' writer reports the OS error as text ("I/O error: No space left on device (os error 28)").
        typer.secho(
            f"error: writing a checkpoint failed: {exc}: free disk space or pass an --out on another disk; "
            "nothing was half-written", fg="red", err=True,
        )  # fmt: skip
        raise SystemExit(1) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            fix = "free disk space (or raise the quota / file-size limit), or pass an --out on another disk"
        elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "choose a writable --out folder (or fix its permissions)"
        else:
            fix = "check the paths given and the folder permissions"
        typer.secho(f"error: {exc.strerror or exc}{where}: {fix}; nothing was half-written", fg="red", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
