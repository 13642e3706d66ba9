"""One command for the QuantVGGT paper's Co3Dv2 table: FP and each method at W8A8 / W4A4, 10 and 20 frames.

``reproduce_table`` quantizes the checkpoint once per (method, bits), calibrating on sequences of the Co3D *train*
split (disjoint from the test split by construction), then evaluates the FP model and every quantized model on the
same test batches per frame count (one resumable evaluation and report per frame count, all models in it), and
writes ``table.md`` / ``table.json``: AUC@30/15/5/3 per cell in the paper's layout, retention of AUC@30 with its
paired bootstrap interval, and the paper's published numbers beside ours.

Quantized checkpoints are reused when their manifest says they came from the same base weights with the same
config (a rerun after a crash redoes nothing that finished).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qvggt.eval.command import run_eval
from qvggt.eval.runner import EvalResult
from qvggt.io import atomic_path, sha256_file

__all__ = ["PAPER_BITS", "PAPER_TABLE", "TableCell", "reproduce_table"]

PAPER_BITS: dict[str, tuple[int, int]] = {"w8a8": (8, 8), "w4a4": (4, 4)}
AUC_KEYS = ("pose_auc@30", "pose_auc@15", "pose_auc@5", "pose_auc@3")
# The paper's README table (Co3Dv2, 10 frames, AUC@30/15/5/3), ../shared/reference/QUANTVGGT_FACTS.md.
PAPER_TABLE: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "fp": {"fp": (89.5, 83.2, 66.1, 54.9)},
    "rtn": {"w8a8": (88.1, 80.7, 60.3, 46.7), "w4a4": (77.7, 63.9, 31.4, 16.6)},
    "gptq": {"w8a8": (89.1, 82.6, 64.0, 52.1), "w4a4": (80.5, 68.6, 38.7, 23.2)},
    "smoothquant": {"w8a8": (89.1, 82.5, 64.8, 53.2), "w4a4": (75.4, 60.1, 25.8, 12.3)},
    "quarot": {"w8a8": (89.4, 83.0, 65.9, 54.6), "w4a4": (81.8, 70.3, 40.1, 23.5)},
    "quantvggt": {"w8a8": (89.4, 83.1, 66.1, 54.8), "w4a4": (86.9, 78.7, 57.3, 43.6)},
}


@dataclass(frozen=True)
class TableCell:
    """One (method, bits, frames) result: AUC@30/15/5/3 in percent, AUC@30 retention vs FP in percent, and the
    paired bootstrap 95% interval of the per-sequence AUC@30 difference (quantized - FP)."""

    method: str
    bits: str
    frames: int
    auc: tuple[float, float, float, float]
    retention: float | None
    retention_ci: tuple[float, float] | None


def _calibration_batches(
    co3d_root: Path, n: int, frames: int, width: int, options: dict
) -> tuple[list[torch.Tensor], list[str]]:
    from qvggt.eval.datasets import Co3DDataset

    ds = Co3DDataset(co3d_root, split="train", num_frames=frames, target_size=width, **options)
    ids = ds.sample_ids()[:n]
    if not ids:
        raise ValueError(f"no Co3D train-split sequence to calibrate on under {co3d_root}")
    return [torch.from_numpy(ds.load(i).images)[None] for i in ids], ids


def _quantized_checkpoint(
    checkpoint: Path,
    base_sha: str,
    method: str,
    bits: str,
    out: Path,
    calibration: Callable[[], tuple[list[torch.Tensor], list[str]]],
) -> Path:
    """Quantize (or reuse) ``out/models/<method>-<bits>/model.safetensors``."""
    from qvggt.model import load_vggt
    from qvggt.quant.api import needs_calibration, quantize_
    from qvggt.quant.command import make_config
    from qvggt.quant.export import read_manifest, save_quantized

    wbits, abits = PAPER_BITS[bits]
    config = make_config(method, wbits, abits, None, "default", False)
    path = out / "models" / f"{method}-{bits}" / "model.safetensors"
    if path.is_file():
        manifest = read_manifest(path)
        if manifest.get("base_sha256") == base_sha and manifest.get("quant_config") == json.loads(
            json.dumps(config.to_dict())
        ):
            return path
    model = load_vggt(checkpoint)
    batches, ids = calibration() if needs_calibration(config) else ([], [])
    torch.manual_seed(0)  # methods that draw random rotations are reproducible
    quantize_(model, config, calibration_data=batches or None)
    return save_quantized(model, config, path, base_sha256=base_sha, calibration_ids=ids)


def reproduce_table(
    checkpoint: str | Path,
    co3d_root: str | Path,
    out: str | Path,
    methods: Sequence[str] = ("rtn", "gptq", "smoothquant", "quarot", "quantvggt"),
    bits: Sequence[str] = ("w8a8", "w4a4"),
    frames: Sequence[int] = (10, 20),
    calib_sequences: int = 20,
    calib_frames: int = 10,
    max_sequences: int = 10_000,
    dataset_options: dict | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[TableCell]:
    """Reproduce the paper's Co3Dv2 table; writes ``out/table.md``, ``out/table.json`` and per-frame reports.

    Args:
        checkpoint: the float VGGT checkpoint (VGGT-1B for the paper's numbers).
        co3d_root: Co3Dv2 root in its published layout.
        methods: registered quantization methods (``qvggt quantize --help`` lists them).
        bits: keys of ``PAPER_BITS``.
        frames: frames per test sequence, one evaluation each.
        calib_sequences / calib_frames: calibration set from the train split.
        max_sequences: cap on test sequences per evaluation.
        dataset_options: extra Co3D options (``categories``, ``min_sequence_length`` ...), test and train alike.
        device / dtype: where and in which precision models run ("bfloat16" as the paper on a GPU).

    Raises:
        ValueError: unknown bits or method (naming the known ones), empty calibration split, bad frames.
        FileNotFoundError: missing checkpoint or Co3D files.
    """
    checkpoint, co3d_root, out = Path(checkpoint), Path(co3d_root), Path(out)
    unknown = [b for b in bits if b not in PAPER_BITS]
    if unknown or not bits:
        raise ValueError(f"unknown bit setting(s) {unknown or list(bits)}; choose from {', '.join(PAPER_BITS)}")
    if not methods or not frames or any(int(f) < 2 for f in frames):
        raise ValueError(f"need at least one method and frame counts >= 2, got {list(methods)} and {list(frames)}")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (the float VGGT weights, .safetensors or .pt)")
    from qvggt.model.checkpoint import read_config
    from qvggt.quant.command import make_config

    for method in methods:  # fail before any work on an unknown method
        make_config(method, 8, 8, None, "default", False)
    options = dict(dataset_options or {})
    cfg = read_config(checkpoint)
    width = cfg.default_image_hw[1] if cfg is not None else 518
    base_sha = sha256_file(checkpoint)
    cache: dict[str, tuple[list[torch.Tensor], list[str]]] = {}

    def calibration() -> tuple[list[torch.Tensor], list[str]]:
        if "c" not in cache:
            cache["c"] = _calibration_batches(co3d_root, calib_sequences, calib_frames, width, options)
        return cache["c"]

    models: dict[tuple[str, str], Path] = {}
    for method in methods:
        for b in bits:
            log(f"quantize {method} {b}")
            models[(method, b)] = _quantized_checkpoint(checkpoint, base_sha, method, b, out, calibration)

    cells: list[TableCell] = []
    for n in frames:
        log(f"evaluate {len(models) + 1} models at {n} frames")
        result = run_eval(
            str(checkpoint), [str(p) for p in models.values()], f"co3d:{co3d_root}", out / f"eval_{n}f", frames=n,
            scenes=max_sequences, dtype=dtype, device=device, progress=progress, dataset_options=options,
        )  # fmt: skip
        cells += _cells(result, models, n)
    _write_table(out, cells, frames)
    return cells


def _auc(aggregate: dict[str, float]) -> tuple[float, float, float, float]:
    return tuple(float(aggregate.get(k, math.nan)) for k in AUC_KEYS)  # type: ignore[return-value]


def _cells(result: EvalResult, models: dict[tuple[str, str], Path], frames: int) -> list[TableCell]:
    fp_name, *q_names = result.models  # run_eval keeps the order: reference first, then compare specs
    cells = [TableCell("fp", "fp", frames, _auc(result.aggregate[fp_name]), None, None)]
    for (method, bits), name in zip(models, q_names, strict=True):
        cmp = result.comparison.get(name, {}).get("pose_auc@30", {})
        ci = (cmp["low"], cmp["high"]) if "low" in cmp else None
        cells.append(TableCell(method, bits, frames, _auc(result.aggregate[name]), cmp.get("retention"), ci))
    return cells


def _fmt(auc: Sequence[float]) -> str:
    return " / ".join("-" if math.isnan(a) else f"{a:.1f}" for a in auc)


def _write_table(out: Path, cells: list[TableCell], frames: Sequence[int]) -> None:
    lines = ["# Co3Dv2 pose AUC@30 / @15 / @5 / @3 (ours | paper, 10 frames)", ""]
    for n in frames:
        rows = [c for c in cells if c.frames == n]
        bits = sorted({c.bits for c in rows if c.bits != "fp"}, key=list(PAPER_BITS).index)
        lines += [f"## {n} frames", "", "| method | " + " | ".join(b.upper() for b in bits) + " |",
                  "|---|" + "---|" * len(bits)]  # fmt: skip
        for method in dict.fromkeys(c.method for c in rows):
            cols = []
            for b in ["fp"] if method == "fp" else bits:
                cell = next((c for c in rows if c.method == method and c.bits == b), None)
                if cell is None:
                    cols.append("-")
                    continue
                text = _fmt(cell.auc)
                if cell.retention is not None and math.isnan(cell.retention):
                    text += " (AUC@30 retention undefined: FP AUC@30 is 0)"
                elif cell.retention is not None:
                    ci = f", 95% CI of the paired difference {cell.retention_ci[0]:+.1f}..{cell.retention_ci[1]:+.1f}" if (
                        cell.retention_ci
                    ) else ""  # fmt: skip
                    text += f" (AUC@30 retention {cell.retention:.1f}%{ci})"
                paper = PAPER_TABLE.get(method, {}).get(b)
                if paper and n == 10:
                    text += f" \\| paper {_fmt(paper)}"
                cols.append(text)
            lines.append(f"| {'full precision' if method == 'fp' else method} | " + " | ".join(cols) + " |")
        lines.append("")
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / "table.json") as tmp:
        tmp.write_text(json.dumps([c.__dict__ for c in cells], indent=1))
