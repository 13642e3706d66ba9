"""``qvggt bench``: the whole benchmark (ceilings, kernels, models) into ``bench.json`` and ``bench.md``.

Speed is measured on ``vggt-1b`` with name-seeded weights (numbers do not depend on trained values). Without a GPU
the command says so and times the CPU reference path of a small preset instead: those numbers say nothing about
GPU speed.

Order (``order="priority"``, the default), so that a run cut short by its time limit keeps what matters most:

1. the headline model measurements: ``HEADLINE_CONFIGS`` (published, bf16-fused, w8a8-fp8, w4a8-fp8) at
   ``HEADLINE_FRAMES`` (32: the issue's end-to-end target), then the peak memory of ``MEMORY_CONFIGS`` (published
   and w4a8-fp8, the smallest 8-bit-activation config) at ``MEMORY_FRAMES`` (100), for whichever of those configs
   and frame counts were asked for;
2. the per-kernel section (CUDA only);
3. every other (config, frames) measurement, config by config in the order asked (``BENCH_CONFIGS`` order for
   "all": w8a8-fp8-eager right after w8a8-fp8);
4. accuracy retention on a trained checkpoint (if one is given): guarded, so any failure, including a missing
   optional dependency (``qvggt.config`` needs pydantic), is recorded in ``bench.json`` / ``bench.md`` with its reason.

``order="config"`` is the former order: kernels, then each config at all its frame counts. ``bench.json`` and
``bench.md`` are rewritten after every measurement, so a killed run keeps what it measured.

``qvggt bench --retention-only`` adds the retention section to an existing ``bench.json`` (``add_retention``), and
``--retention-skipped REASON`` records why it was not run: scripts/gpu_check.sh runs retention as its own step.

``python -m qvggt.bench.run`` (``main``) takes the same options without the typer CLI: scripts/gpu_check.sh uses it,
because the GPU image's typer is of unknown version and recent typer releases import pydantic, which that image
lacks. tests/bench/test_bench.py keeps the two option sets equal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from qvggt.bench.configs import BenchConfig
from qvggt.bench.model_bench import (
    FidelityReference,
    ModelResult,
    Plan,
    bench_models,
    config_major_plan,
    fidelity_reference,
)
from qvggt.bench.report import render_markdown
from qvggt.io import atomic_path
from qvggt.model import build_model, get_preset
from qvggt.model.init import fill_name_seeded_

__all__ = [
    "HEADLINE_CONFIGS",
    "HEADLINE_FRAMES",
    "MEMORY_CONFIGS",
    "MEMORY_FRAMES",
    "add_retention",
    "bench_command",
    "build_parser",
    "main",
    "measurement_phases",
    "run_bench",
]

HEADLINE_FRAMES = 32
HEADLINE_CONFIGS = ("published", "bf16-fused", "w8a8-fp8", "w4a8-fp8")
MEMORY_FRAMES = 100
MEMORY_CONFIGS = ("published", "w4a8-fp8")


def _device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gb=props.total_memory / 1e9)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def measurement_phases(configs: list[BenchConfig], frames: list[int], order: str = "priority") -> tuple[Plan, Plan]:
    """(headline plan, rest plan): what runs before and after the kernel section (module docstring).

    ``order="config"``: no headline phase; the rest is config-major. Every (config, frames) pair asked for appears
    exactly once across the two plans.
    """
    if order not in ("priority", "config"):
        raise ValueError(f"order must be 'priority' or 'config', got {order!r}")
    if order == "config":
        return [], config_major_plan(configs, frames)
    # Every 32-frame headline measurement before any 100-frame one (a slow fp32 100-frame pass must not eat the
    # time the headline needs), at the cost of building published and w4a8-fp8 twice.
    first: Plan = []
    taken: set[tuple[str, int]] = set()
    for n, names in ((HEADLINE_FRAMES, HEADLINE_CONFIGS), (MEMORY_FRAMES, MEMORY_CONFIGS)):
        if n not in frames:
            continue
        for c in configs:
            if c.name in names and (c.name, n) not in taken:
                first.append((c, [n]))
                taken.add((c.name, n))
    rest: Plan = []
    for c in configs:
        left = [f for f in frames if (c.name, f) not in taken]
        if left:
            rest.append((c, left))
            taken.update((c.name, f) for f in left)
    return first, rest


def run_bench(
    out_dir: Path,
    configs: list[BenchConfig],
    frames: list[int],
    height: int = 392,
    width: int = 518,
    preset: str | None = None,
    kernels: bool = True,
    gemm_tokens: tuple[int, ...] = (16_656, 33_312),
    fidelity_frames: int = 8,
    retention_checkpoint: Path | None = None,
    retention_scenes: int = 8,
    seed: int = 0,
    command: str = "",
    log: Callable[[str], None] = print,
    order: str = "priority",
) -> dict:
    """Run the benchmark; write ``bench.json``, ``bench.md`` and ``bench_models.jsonl`` under ``out_dir``.

    Args:
        configs / frames / height / width: what to measure (height and width multiples of 14).
        preset: model preset; default ``vggt-1b`` on CUDA, ``tiny`` on CPU.
        kernels: also run the per-kernel section (CUDA only).
        gemm_tokens: token counts of the GEMM section (16,656 / 33,312 = 16 / 32 frames of 1,041 tokens).
        fidelity_frames: frames of the fidelity comparison against fp32.
        retention_checkpoint: a trained checkpoint (e.g. the small model) on which each config's accuracy
            retention is measured (``qvggt.bench.retention``), last; None skips that section. A failure there is
            recorded (``retention_error``), never raised.
        retention_scenes: held-out synthetic scenes of the retention section.
        order: "priority" (headline measurements first, module docstring) or "config" (config-major).

    Returns:
        The JSON document written to ``bench.json``.
    """
    if height % 14 or width % 14 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 14, got {height}x{width}")
    if not frames or any(f <= 0 for f in frames):
        raise ValueError(f"frames must be positive counts, got {frames}")
    first, rest = measurement_phases(configs, frames, order)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset = preset or ("vggt-1b" if cuda else "tiny")
    out_dir.mkdir(parents=True, exist_ok=True)
    doc: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "preset": preset,
        "height": height,
        "width": width,
        "env": _device_info(device),
        "gpu": cuda,
        "order": order,
    }
    if not cuda:
        log("NO GPU: timing the CPU reference path (kernel twins) of a small preset; these are not GPU numbers.")
        doc["notice"] = "no CUDA device: CPU reference path timed with wall-clock time; no kernel section"
    torch.manual_seed(seed)
    _write(out_dir, doc)  # the environment, even if nothing else gets measured

    t0 = time.perf_counter()
    master = fill_name_seeded_(build_model(get_preset(preset), device="meta"))  # meta: one copy of the weights
    log(f"{preset}: name-seeded weights in {time.perf_counter() - t0:.0f} s")
    jsonl = out_dir / "bench_models.jsonl"
    jsonl.unlink(missing_ok=True)
    results: list[ModelResult] = []
    fid_frames = min(fidelity_frames, max(frames))
    try:
        reference = fidelity_reference(master, fid_frames, height, width, device, seed, log)
    except Exception as exc:  # noqa: BLE001  (no fidelity numbers, but the speed numbers must still be measured)
        doc["fidelity_error"] = f"{type(exc).__name__}: {exc}"[:500]
        log(f"fp32 fidelity reference failed: {doc['fidelity_error']}")
        reference = FidelityReference(torch.zeros(1, fid_frames, 3, height, width, device=device), {})
    fidelity_cache: dict[str, dict[str, float] | None] = {}
    for phase, plan in (("headline", first), ("kernels", None), ("remaining", rest)):
        if plan is None:  # between the headline and the remaining model measurements
            if cuda and kernels:
                _kernel_section(doc, gemm_tokens, seed, log)
                _write(out_dir, doc)
            continue
        t0 = time.perf_counter()
        for res in bench_models(
            master, configs, frames, height, width, device, fidelity_frames=fid_frames, seed=seed, log=log,
            jsonl=jsonl, plan=plan, reference=reference, fidelity_cache=fidelity_cache,
        ):  # fmt: skip
            results.append(res)
            doc["models"] = [asdict(r) for r in results]
            _write(out_dir, doc)
        if plan:
            log(f"{phase} model measurements: {time.perf_counter() - t0:.0f} s")
    del master, reference  # the float master's CPU copy is not needed by the retention section
    if retention_checkpoint is not None:
        _retention_section(doc, out_dir, retention_checkpoint, configs, device, retention_scenes, log)
    _write(out_dir, doc)
    return doc


def _kernel_section(doc: dict, gemm_tokens: tuple[int, ...], seed: int, log: Callable[[str], None]) -> None:
    from qvggt.bench.kernel_bench import bench_gemms, bench_layernorm, measure_ceilings

    t0 = time.perf_counter()
    try:
        doc["ceilings"] = measure_ceilings()
        log(f"ceilings: {doc['ceilings']}")
        doc["gemm"] = [row for m in gemm_tokens for row in bench_gemms(m, seed)]
        doc["layernorm"] = bench_layernorm(gemm_tokens[-1], seed=seed)
    except Exception as exc:  # noqa: BLE001  (the model numbers after this section must still be measured)
        doc["kernel_error"] = f"{type(exc).__name__}: {exc}"[:500]
        log(f"kernel section failed: {doc['kernel_error']}")
    try:
        from qvggt.kernels.attention import bench_attention

        doc["attention"] = bench_attention([1041 * 8, 1041 * 32])
    except Exception as exc:  # noqa: BLE001  (the attention kernel is optional; record why it is absent)
        doc["attention_error"] = repr(exc)[:300]
    log(f"kernel section: {time.perf_counter() - t0:.0f} s")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _retention_section(
    doc: dict,
    out_dir: Path,
    checkpoint: Path,
    configs: list[BenchConfig],
    device: torch.device,
    scenes: int,
    log: Callable[[str], None],
) -> None:
    """``doc["retention"]``, or ``doc["retention_error"]`` with the reason when anything fails (ImportError of an
    optional dependency included). A marker is written first, so a run killed inside this section says so."""
    doc.pop("retention", None)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    doc["retention_error"] = f"started {started} and never finished (the run was killed or timed out)"
    _write(out_dir, doc)
    t0 = time.perf_counter()
    try:
        from qvggt.bench.retention import bench_retention

        doc["retention"] = bench_retention(checkpoint, configs, out_dir / "retention", device, scenes=scenes)
        doc.pop("retention_error")
        log(f"retention section ({checkpoint}): {time.perf_counter() - t0:.0f} s")
    except Exception as exc:  # noqa: BLE001  (retention is the last, optional section: record why it is absent)
        doc["retention_error"] = f"{type(exc).__name__}: {exc}"[:500]
        log(f"retention section failed after {time.perf_counter() - t0:.0f} s: {doc['retention_error']}")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_retention(
    out_dir: Path,
    checkpoint: Path | None,
    configs: list[BenchConfig],
    scenes: int = 8,
    skipped: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Add the retention section to ``out_dir/bench.json`` (a new document if there is none) and rewrite both files.

    ``skipped``: record that reason instead of running it (e.g. no time left). Never raises for a failure inside the
    section: it is recorded as ``retention_error``.
    """
    path = out_dir / "bench.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text()) if path.is_file() else {"env": {}, "gpu": torch.cuda.is_available()}
    if skipped is not None or checkpoint is None:
        doc.pop("retention", None)
        doc["retention_error"] = f"skipped: {skipped or 'no checkpoint given'}"
        log(f"retention section {doc['retention_error']}")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _retention_section(doc, out_dir, checkpoint, configs, device, scenes, log)
    _write(out_dir, doc)
    return doc


def _write(out_dir: Path, doc: dict) -> None:
    with atomic_path(out_dir / "bench.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    with atomic_path(out_dir / "bench.md") as tmp:
        tmp.write_text(render_markdown(doc))


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m qvggt.bench.run``: those of ``qvggt bench``."""
    p = argparse.ArgumentParser(prog="python -m qvggt.bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for bench.json, bench.md, ...")
    p.add_argument("--frames", default="1,8,32,100", help="comma-separated frame counts")
    p.add_argument("--configs", default="all", help="comma-separated configs, or 'all'")
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--preset", default=None, help="model preset (default vggt-1b on a GPU, tiny on CPU)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="per-kernel section")
    p.add_argument("--retention-checkpoint", default="models/small/model.safetensors", help="'' to skip")
    p.add_argument("--retention-scenes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=("priority", "config"), default="priority", help="measurement order")
    p.add_argument("--retention-only", action="store_true", help="only add retention to an existing bench.json")
    p.add_argument("--retention-skipped", default=None, metavar="REASON", help="record retention as skipped")
    return p


def bench_command(
    out: Path,
    configs: str,
    frames: str,
    height: int,
    width: int,
    preset: str | None,
    kernels: bool,
    retention_checkpoint: str | Path | None,
    retention_scenes: int,
    seed: int,
    order: str,
    retention_only: bool,
    retention_skipped: str | None,
    command: str,
    log: Callable[[str], None] = print,
) -> str:
    """What ``qvggt bench`` and ``python -m qvggt.bench.run`` do with their (same) options; returns the closing line.
    ``retention_checkpoint`` "" (or ".") skips that section. Raises ValueError on bad input."""
    from qvggt.bench.configs import parse_configs

    parsed = parse_configs(configs)
    ckpt = (
        None if retention_checkpoint is None or str(retention_checkpoint) in ("", ".") else Path(retention_checkpoint)
    )
    if retention_only or retention_skipped is not None:
        add_retention(out, ckpt, parsed, retention_scenes, skipped=retention_skipped, log=log)
        return f"updated {out / 'bench.json'} and {out / 'bench.md'}"
    if ckpt is not None and not ckpt.is_file():
        raise ValueError(f"retention checkpoint not found: {ckpt} (pass '' to skip that section)")
    doc = run_bench(
        out, parsed, [int(f) for f in frames.split(",") if f.strip()], height, width, preset, kernels,
        retention_checkpoint=ckpt, retention_scenes=retention_scenes, seed=seed, command=command, log=log, order=order,
    )  # fmt: skip
    return f"wrote {out / 'bench.json'} and {out / 'bench.md'} ({'GPU' if doc['gpu'] else 'CPU reference'})"


def main(argv: list[str] | None = None) -> int:
    """``python -m qvggt.bench.run``: ``qvggt bench`` without typer (module docstring). Returns the exit code."""
    a = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "qvggt.bench.run", *(sys.argv[1:] if argv is None else argv)])
    try:
        print(bench_command(
            a.out, a.configs, a.frames, a.height, a.width, a.preset, a.kernels, a.retention_checkpoint,
            a.retention_scenes, a.seed, a.order, a.retention_only, a.retention_skipped, command,
        ))  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
