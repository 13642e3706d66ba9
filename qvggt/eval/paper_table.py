"""One command for the QuantVGGT paper's Co3Dv2 table: FP and each method at W8A8 / W4A4, 10 and 20 frames.

``reproduce_table`` quantizes the checkpoint once per (method, bits), calibrating on sequences of the Co3D *train*
split (disjoint from the test split by construction), then evaluates the FP model and every quantized model on the
same test batches per frame count (one resumable evaluation and report per frame count, all models in it), and
writes ``table.md`` / ``table.json``: AUC@30/15/5/3 per cell in the paper's layout, retention of AUC@30 with its
paired bootstrap interval, and the paper's published numbers beside ours.

Categories: VGGT's 41 (:data:`~qvggt.eval.datasets.CO3D_VGGT_CATEGORIES`) by default, for test and calibration
alike; ``table.json`` records the list used (and any of the 41 missing under the root).

Calibration sets (``calib_sequences`` sequences of ``calib_frames`` frames, train split):

- ``quantvggt``: the paper's Noise-Filtered Diverse Sampling (:mod:`qvggt.calib.nfds`) on a pool of
  ``calib_pool`` train sequences drawn round-robin over categories: deep-layer statistics of the FP model, the
  per-category IQR filter, k-means (``min(5, calib_sequences)`` clusters, as published) on the frame-aware and
  deep-layer features of the survivors (as ``qvggt calibrate``) and a seeded draw per cluster.
- every other method: a seeded round-robin draw over categories (one sequence of each category in a shuffled
  category order, then a second, ...), so no category dominates.

Quantized checkpoints are reused when their manifest says they came from the same base weights with the same
config, and their ``calibration_recipe.json`` names the same calibration recipe (a rerun after a crash redoes
nothing that finished).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qvggt.eval.command import run_eval
from qvggt.eval.runner import EvalResult
from qvggt.io import atomic_path, sha256_file

if TYPE_CHECKING:
    from qvggt.eval.datasets import Co3DDataset

__all__ = ["PAPER_BITS", "PAPER_TABLE", "TableCell", "calibration_ids", "reproduce_table", "round_robin_ids"]

PAPER_BITS: dict[str, tuple[int, int]] = {"w8a8": (8, 8), "w4a4": (4, 4)}
AUC_KEYS = ("pose_auc@30", "pose_auc@15", "pose_auc@5", "pose_auc@3")
RECIPE_FILE = "calibration_recipe.json"
NFDS_METHODS = ("quantvggt",)  # methods calibrated on an NFDS selection (the paper's QuantVGGT = DSFQ + NFDS)
NFDS_CLUSTERS = 5  # published: KMeans(5) x 4 sequences per cluster = 20 sequences
NFDS_N_INIT = 50  # published k-means restarts
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


def round_robin_ids(ds: Co3DDataset, n: int, seed: int = 0) -> list[str]:
    """``n`` sample ids spread over categories: each category's sequences in a seeded shuffled order, categories in
    a seeded shuffled order, then one sequence per category per round; returned in dataset order."""
    rng = np.random.default_rng(seed)
    by_cat: dict[str, list[str]] = {}
    for sid in ds.sample_ids():
        by_cat.setdefault(ds.category_of(sid), []).append(sid)
    queues = [[ids[i] for i in rng.permutation(len(ids))] for ids in by_cat.values()]
    queues = [queues[i] for i in rng.permutation(len(queues))]  # with n < categories, not always the first ones
    chosen: set[str] = set()
    for rank in range(max((len(q) for q in queues), default=0)):
        for q in queues:
            if rank < len(q) and len(chosen) < n:
                chosen.add(q[rank])
    return [sid for sid in ds.sample_ids() if sid in chosen]


def calibration_ids(
    ds: Co3DDataset, n: int, selection: str, seed: int = 0, pool: int | None = None, model: Any = None
) -> list[str]:
    """The calibration sequences of ``ds`` (a train split): ``selection`` ``"round-robin"`` (:func:`round_robin_ids`)
    or ``"nfds"`` (NFDS over a round-robin pool of ``pool`` sequences, default ``5 n``, with the FP ``model``'s
    features; see the module docstring). Deterministic for a seed."""
    if selection == "round-robin":
        return round_robin_ids(ds, n, seed)
    if selection != "nfds":
        raise ValueError(f"unknown calibration selection {selection!r}; use 'round-robin' or 'nfds'")
    from qvggt.calib.nfds import deep_layer_features, iqr_outliers, select_calibration

    if model is None:
        raise ValueError("NFDS selection needs the full-precision model for its features")
    pool_ids = round_robin_ids(ds, pool or 5 * n, seed)
    # One sample at a time: the pool's images need not all be in memory.
    feats = [deep_layer_features(model, ds.load(sid).images) for sid in pool_ids]
    deep, frame = np.stack([f["deep"] for f in feats]), np.stack([f["frame"] for f in feats])
    outliers = iqr_outliers(deep, [ds.category_of(sid) for sid in pool_ids])
    clusters = max(1, min(NFDS_CLUSTERS, n, int((~outliers).sum())))
    # (frame, deep) blocks, each weighing the same in k-means: what `qvggt calibrate` clusters on.
    chosen = select_calibration((frame, deep), outliers, clusters, -(-n // clusters), seed, NFDS_N_INIT, "nfds")
    if len(chosen) > n:  # ceil(n / clusters) per cluster can overshoot: keep a seeded subset
        chosen = sorted(np.random.default_rng(seed).choice(chosen, n, replace=False).tolist())
    return [pool_ids[i] for i in chosen]


def _calibration_batches(
    co3d_root: Path, n: int, frames: int, width: int, options: dict, selection: str, pool: int | None, model: Any
) -> tuple[list[torch.Tensor], list[str]]:
    from qvggt.eval.datasets import Co3DDataset

    ds = Co3DDataset(co3d_root, split="train", num_frames=frames, target_size=width, **options)
    ids = calibration_ids(ds, n, selection, pool=pool, model=model)
    if not ids:
        raise ValueError(f"no Co3D train-split sequence to calibrate on under {co3d_root}")
    return [torch.from_numpy(ds.load(i).images)[None] for i in ids], ids


def _quantized_checkpoint(
    checkpoint: Path,
    base_sha: str,
    method: str,
    bits: str,
    out: Path,
    recipe: dict,
    calibration: Callable[[str], tuple[list[torch.Tensor], list[str]]],
) -> Path:
    """Quantize (or reuse) ``out/models/<method>-<bits>/model.safetensors``; ``recipe`` describes the calibration
    set (``selection`` is filled in here) and ``calibration(selection)`` builds it."""
    from qvggt.model import load_vggt
    from qvggt.quant.api import needs_calibration, quantize_
    from qvggt.quant.command import make_config
    from qvggt.quant.export import read_manifest, save_quantized

    wbits, abits = PAPER_BITS[bits]
    config = make_config(method, wbits, abits, None, "default", False)
    path = out / "models" / f"{method}-{bits}" / "model.safetensors"
    selection = "nfds" if method in NFDS_METHODS else "round-robin"
    recipe = {**recipe, "selection": selection} if needs_calibration(config) else {"selection": None}
    recipe = json.loads(json.dumps(recipe))  # as read back (tuples become lists)
    recipe_path = path.with_name(RECIPE_FILE)
    if path.is_file() and recipe_path.is_file() and json.loads(recipe_path.read_text()) == recipe:
        manifest = read_manifest(path)
        if manifest.get("base_sha256") == base_sha and manifest.get("quant_config") == json.loads(
            json.dumps(config.to_dict())
        ):
            return path
    model = load_vggt(checkpoint)
    batches, ids = calibration(selection) if needs_calibration(config) else ([], [])
    torch.manual_seed(0)  # methods that draw random rotations are reproducible
    quantize_(model, config, calibration_data=batches or None)
    save_quantized(model, config, path, base_sha256=base_sha, calibration_ids=ids)
    with atomic_path(recipe_path) as tmp:  # written last: a checkpoint without it is redone
        tmp.write_text(json.dumps(recipe, indent=1))
    return path


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
    calib_pool: int | None = None,
    seed: int = 0,
) -> list[TableCell]:
    """Reproduce the paper's Co3Dv2 table; writes ``out/table.md``, ``out/table.json`` and per-frame reports.

    Args:
        checkpoint: the float VGGT checkpoint (VGGT-1B for the paper's numbers).
        co3d_root: Co3Dv2 root in its published layout.
        methods: registered quantization methods (``qvggt quantize --help`` lists them).
        bits: keys of ``PAPER_BITS``.
        frames: frames per test sequence, one evaluation each.
        calib_sequences / calib_frames: calibration set from the train split.
        max_sequences: cap on test sequences per evaluation (spread round-robin over categories).
        dataset_options: extra Co3D options (``categories``: default VGGT's 41; ``min_sequence_length`` ...),
            test and train alike.
        device / dtype: where and in which precision models run ("bfloat16" as the paper on a GPU).
        calib_pool: NFDS candidate pool size (train sequences; default ``5 * calib_sequences``).
        seed: seed of the calibration draws.

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
    from qvggt.eval.datasets import resolve_co3d_categories

    options = dict(dataset_options or {})
    # Resolved once (cheap: folder names only) so that test and calibration splits, the resume signatures and
    # table.json all name the same explicit list.
    categories, missing = resolve_co3d_categories(co3d_root, options.get("categories"))
    options["categories"] = categories
    if missing:
        log(f"warning: {len(missing)} of VGGT's 41 Co3D categories are missing under {co3d_root}: {missing}")
    cfg = read_config(checkpoint)
    width = cfg.default_image_hw[1] if cfg is not None else 518
    base_sha = sha256_file(checkpoint)
    recipe = {
        "sequences": calib_sequences, "frames": calib_frames, "pool": calib_pool or 5 * calib_sequences,
        "seed": seed, "width": width, "dataset_options": options,
    }  # fmt: skip
    cache: dict[str, tuple[list[torch.Tensor], list[str]]] = {}

    def calibration(selection: str) -> tuple[list[torch.Tensor], list[str]]:
        if selection not in cache:
            model = None
            if selection == "nfds":
                from qvggt.model import load_vggt

                model = load_vggt(checkpoint).to(device).eval()
            cache[selection] = _calibration_batches(
                co3d_root, calib_sequences, calib_frames, width, options, selection, recipe["pool"], model
            )
            log(f"calibration ({selection}): {len(cache[selection][1])} train sequences")
        return cache[selection]

    models: dict[tuple[str, str], Path] = {}
    for method in methods:
        for b in bits:
            log(f"quantize {method} {b}")
            models[(method, b)] = _quantized_checkpoint(checkpoint, base_sha, method, b, out, recipe, calibration)

    cells: list[TableCell] = []
    for n in frames:
        log(f"evaluate {len(models) + 1} models at {n} frames")
        result = run_eval(
            str(checkpoint), [str(p) for p in models.values()], f"co3d:{co3d_root}", out / f"eval_{n}f", frames=n,
            scenes=max_sequences, dtype=dtype, device=device, progress=progress, dataset_options=options,
        )  # fmt: skip
        cells += _cells(result, models, n)
    _write_table(out, cells, frames, categories, missing)
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


def _write_table(
    out: Path, cells: list[TableCell], frames: Sequence[int], categories: Sequence[str], missing: Sequence[str]
) -> None:
    lines = ["# Co3Dv2 pose AUC@30 / @15 / @5 / @3 (ours | paper, 10 frames)", ""]
    lines += [f"Categories ({len(categories)}): {', '.join(categories)}"]
    if missing:
        lines += [f"Missing of VGGT's 41 (not scored): {', '.join(missing)}"]
    lines.append("")
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
        doc = {"categories": list(categories), "missing_vggt_categories": list(missing)}
        tmp.write_text(json.dumps({**doc, "cells": [c.__dict__ for c in cells]}, indent=1))
