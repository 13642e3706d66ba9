"""Human-readable report of an evaluation run: a few PNG figures and a markdown summary.

:func:`write_report` reads what :func:`qvggt.eval.runner.evaluate` left in its output folder (the
``EvalResult`` it returned and ``predictions/0.npz``) and writes into ``<out_dir>/report/``:

* ``auc_curves.png``: cumulative pose accuracy per model (``aggregate[model]["pose_curve"]``).
* ``depth_errors.png``: per-pixel AbsRel maps of scene 0 after per-frame median scale alignment.
* ``pointclouds.png``: each model's confident point cloud of scene 0 beside the ground truth.
* ``histograms.png``: per-scene distributions of a few main metrics, one step histogram per model.
* ``report.md``: the metric table, dataset counts and links to the figures that exist.

A figure whose inputs are missing (no pose curve, no ground-truth depth, no predictions file, ...) is skipped;
a figure that fails for another reason is skipped with a warning, so the markdown report is always written.
Figures use ``matplotlib.figure.Figure`` with an explicit Agg canvas: the global backend is never touched.

Shape legend: S frames, H/W image size, N points.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qvggt.eval.runner import format_table
from qvggt.io import atomic_open

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from qvggt.eval.runner import EvalResult

__all__ = [
    "HIST_METRICS",
    "REPORT_DIR",
    "depth_error_maps",
    "plot_depth_errors",
    "plot_histograms",
    "plot_pointclouds",
    "plot_pose_curves",
    "write_report",
]

REPORT_DIR = "report"
PREDICTIONS_FILE = Path("predictions") / "0.npz"
#: Per-scene metrics shown in ``histograms.png`` (those present), with their axis labels.
HIST_METRICS: dict[str, str] = {
    "depth_abs_rel": "depth AbsRel (per scene)",
    "rot_err_median": "median rotation error (deg)",
    "pm_chamfer": "point-map Chamfer distance",
    "dpm_chamfer": "depth + camera Chamfer distance",
}
LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
ERR_VMAX = 0.5  # colour-scale top of the AbsRel maps
MAX_FRAMES = 6
CONF_PERCENTILE = 30.0


def _new_figure(width: float, height: float, dpi: int) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def _style(i: int) -> dict[str, Any]:
    """Line colour/style of the i-th model: the reference (i = 0) solid and thicker."""
    return {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i % len(LINE_STYLES)], "linewidth": 2.2 if i == 0 else 1.5}


# --- pose accuracy curves ------------------------------------------------------------------------------------


def plot_pose_curves(path: Path, result: EvalResult, dpi: int = 100) -> Path | None:
    """Cumulative pose accuracy of every model that has ``aggregate[model]["pose_curve"]``; None if none has.

    The runner's curve has one value per 1-degree histogram bin of e = max(rot, trans) per frame pair,
    pooled over all pairs of all scenes: value i is the percentage of pairs with e < i + 1 degrees (the last
    bin is closed, so the last value counts e <= its threshold). It is plotted at thresholds 1, 2, ... degrees.
    The legend gives each model's ``pose_auc@30`` (mean over categories of per-scene AUCs, so it need not be
    exactly the mean of the pooled curve).
    """
    curves = []
    for i, model in enumerate(result.models):
        curve = np.asarray(result.aggregate.get(model, {}).get("pose_curve", []), dtype=np.float64).ravel()
        if curve.size:
            curves.append((i, model, curve))
    if not curves:
        return None

    fig = _new_figure(6.4, 4.4, dpi)
    ax = fig.add_subplot()
    max_t = 0
    for i, model, curve in curves:
        thresholds = np.arange(1, curve.size + 1)
        max_t = max(max_t, curve.size)
        auc = result.aggregate[model].get("pose_auc@30", math.nan)
        label = f"{model} (AUC@30 = {auc:.1f})" if math.isfinite(auc) else f"{model} (AUC@30 = n/a)"
        ax.plot(thresholds, curve, marker="o", markersize=2.5, label=label, **_style(i))
    ax.set_xlim(0, max_t + 0.5)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("error threshold t (degrees)")
    ax.set_ylabel("% of frame pairs with max(rot, trans) error < t")
    ax.set_title("Cumulative relative pose accuracy (all pairs pooled)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path, dpi)


# --- depth error maps ----------------------------------------------------------------------------------------


def _frames_to_show(num_frames: int, max_frames: int) -> np.ndarray:
    """At most ``max_frames`` frame indices, evenly spread, always including frame 0 (the reference)."""
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.linspace(0, num_frames - 1, max_frames).round().astype(int))


def depth_error_maps(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel |s * pred - gt| / gt [S, H, W] with s = median(gt) / median(pred) per frame.

    As :func:`qvggt.eval.metrics.depth.depth_metrics` with ``align="frame"``: valid pixels have a finite GT
    depth > 0 inside ``valid``; the scale uses the valid pixels with a finite prediction. Pixels that are not
    valid, have a non-finite prediction, or lie in a frame whose scale is undefined (median prediction <= 0)
    are NaN.
    """
    p, g = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"pred and gt must both be [S, H, W], got {p.shape} and {g.shape}")
    with np.errstate(invalid="ignore"):
        sel = np.isfinite(g) & (g > 0)
    if valid is not None:
        sel &= np.asarray(valid, bool).reshape(g.shape)
    err = np.full(g.shape, np.nan)
    for f in range(len(p)):
        use = sel[f] & np.isfinite(p[f])
        if not use.any():
            continue
        mp = float(np.median(p[f][use]))
        if not mp > 0:
            continue
        s = float(np.median(g[f][use])) / mp
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            e = np.abs(s * p[f] - g[f]) / g[f]
        err[f] = np.where(use & np.isfinite(e), e, np.nan)
    return err


def plot_depth_errors(
    path: Path,
    arrays: dict[str, np.ndarray],
    models: Sequence[str],
    max_frames: int = MAX_FRAMES,
    vmax: float = ERR_VMAX,
    dpi: int = 100,
) -> Path | None:
    """Input frames (row 1) and one AbsRel map row per model with ``<model>/depth``; None without GT depth.

    arrays: the contents of ``predictions/<i>.npz`` (``images``, ``gt/depth``, optional ``gt/valid_mask``,
    ``<model>/depth``). One colour scale [0, vmax] for all maps; invalid pixels grey.
    """
    import matplotlib

    if "gt/depth" not in arrays or "images" not in arrays:
        return None
    gt = np.asarray(arrays["gt/depth"], np.float32)
    if gt.ndim == 4 and gt.shape[-1] == 1:
        gt = gt[..., 0]
    images = np.asarray(arrays["images"], np.float32)
    valid = arrays.get("gt/valid_mask")
    rows = []
    for model in models:
        pred = arrays.get(f"{model}/depth")
        if pred is None:
            continue
        pred = np.asarray(pred, np.float32)
        if pred.ndim == 4 and pred.shape[-1] == 1:
            pred = pred[..., 0]
        if pred.shape != gt.shape:
            warnings.warn(f"{model}/depth has shape {pred.shape}, GT depth {gt.shape}: left out", stacklevel=2)
            continue
        rows.append((model, depth_error_maps(pred, gt, valid)))
    if not rows:
        return None

    s, h, w = gt.shape
    shown = _frames_to_show(s, max_frames)
    n = len(shown)
    col_w = 1.9
    row_h = col_w * h / w
    fig = _new_figure(max(col_w * n + 1.6, 5.0), (1 + len(rows)) * (row_h + 0.3) + 0.6, dpi)
    grid = fig.add_gridspec(1 + len(rows), n + 1, width_ratios=[1.0] * n + [0.07])
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.6")

    def panel(r: int, c: int, label: str | None) -> Any:
        ax = fig.add_subplot(grid[r, c])
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if label is not None and c == 0:
            ax.set_ylabel(label, fontsize=8)
        return ax

    im = None
    for c, f in enumerate(shown):
        ax = panel(0, c, "input")
        if f < len(images):
            ax.imshow(np.clip(np.moveaxis(images[f], 0, -1), 0.0, 1.0))
        ax.set_title(f"frame {f}", fontsize=8)
        for r, (model, err) in enumerate(rows, start=1):
            ax = panel(r, c, model)
            im = ax.imshow(np.ma.masked_invalid(err[f]), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
            finite = err[f][np.isfinite(err[f])]
            ax.set_title(f"AbsRel {finite.mean():.3f}" if finite.size else "no valid pixels", fontsize=7)
    fig.add_subplot(grid[0, n]).axis("off")
    cbar = fig.colorbar(im, cax=fig.add_subplot(grid[1:, n]), extend="max")
    cbar.set_label("|s·pred − gt| / gt", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    fig.suptitle("Depth error, scene 0 (per-frame median scale; grey = no valid GT)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


# --- point clouds --------------------------------------------------------------------------------------------


def plot_pointclouds(
    path: Path,
    arrays: dict[str, np.ndarray],
    models: Sequence[str],
    percentile: float = CONF_PERCENTILE,
    view: str | tuple[float, float] = "camera",
    dpi: int = 100,
) -> Path | None:
    """Each model's confident cloud (``confident_points`` at ``percentile``) and the GT cloud (valid pixels),
    coloured by the input images, all from the same viewpoint; None if there is nothing to draw.

    Each panel is framed on its own cloud (predictions are only defined up to scale).
    """
    from qvggt.viz.pointcloud import confident_points, render_points

    images = arrays.get("images")
    if images is None:
        return None
    images = np.asarray(images, np.float32)
    clouds: list[tuple[str, np.ndarray, np.ndarray]] = []
    for model in models:
        wp = arrays.get(f"{model}/world_points")
        if wp is None:
            continue
        conf = arrays.get(f"{model}/world_points_conf")
        if conf is None:
            conf = np.ones(np.shape(wp)[:-1], np.float32)
        try:
            pts, cols = confident_points(wp, conf, images, percentile=percentile, max_points=60_000)
        except ValueError as e:
            warnings.warn(f"point cloud of {model} left out: {e}", stacklevel=2)
            continue
        clouds.append((model, pts, cols))
    gt = arrays.get("gt/world_points")
    if gt is not None:
        mask = arrays.get("gt/valid_mask")
        try:
            pts, cols = confident_points(
                gt, np.ones(np.shape(gt)[:-1], np.float32), images, percentile=0.0, mask=mask, max_points=60_000
            )
            clouds.append(("ground truth", pts, cols))
        except ValueError as e:
            warnings.warn(f"ground-truth point cloud left out: {e}", stacklevel=2)
    if not clouds:
        return None

    ncols = min(len(clouds), 4)
    nrows = math.ceil(len(clouds) / ncols)
    fig = _new_figure(3.2 * ncols, 3.4 * nrows + 0.4, dpi)
    for k, (name, pts, cols) in enumerate(clouds):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        size = float(np.clip(3e4 / max(len(pts), 1), 1.0, 12.0))  # small clouds get bigger dots
        render_points(pts, cols, ax, view=view, point_size=size, title=f"{name}\n({len(pts)} pts)")
    what = f"top {100 - percentile:g}% confidence" if percentile else "all points"
    fig.suptitle(f"Point clouds, scene 0 ({what}; GT: valid pixels)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return _save(fig, path, dpi)


# --- per-scene histograms ------------------------------------------------------------------------------------


def plot_histograms(
    path: Path, records: Sequence[dict], models: Sequence[str], metrics: dict[str, str] = HIST_METRICS, dpi: int = 100
) -> Path | None:
    """One subplot per metric of ``metrics`` that some record has, with a step histogram of the per-scene
    values of each model (NaN/inf dropped, their count shown in the legend); None if no metric has a value."""
    from matplotlib.ticker import MaxNLocator

    panels = []
    for key, label in metrics.items():
        per_model = []
        for i, model in enumerate(models):
            vals = [r.get("models", {}).get(model, {}).get("metrics", {}).get(key) for r in records]
            vals = np.array([v for v in vals if v is not None], np.float64)
            finite = vals[np.isfinite(vals)]
            if vals.size:
                per_model.append((i, model, finite, int(vals.size - finite.size)))
        if any(f.size for _, _, f, _ in per_model):
            panels.append((key, label, per_model))
    if not panels:
        return None

    fig = _new_figure(4.2 * len(panels), 3.6, dpi)
    for k, (key, label, per_model) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        pooled = np.concatenate([f for _, _, f, _ in per_model])
        edges = np.histogram_bin_edges(pooled, bins=int(np.clip(np.sqrt(pooled.size) * 2, 5, 30)))
        for i, model, finite, dropped in per_model:
            name = model if not dropped else f"{model} ({dropped} non-finite)"
            if finite.size:
                ax.hist(finite, bins=edges, histtype="step", label=name, **_style(i))
            else:
                ax.plot([], [], label=name, **_style(i))
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("scenes", fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, dpi)


# --- report --------------------------------------------------------------------------------------------------


def _load_predictions(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _try(name: str, make: Callable[[], Path | None]) -> Path | None:
    """Run one figure maker; a failure becomes a warning so the rest of the report is still written."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - a broken figure must not lose the report after a long evaluation
        warnings.warn(f"report figure {name} failed: {type(e).__name__}: {e}", stacklevel=3)
        return None


FIGURES = (
    ("auc_curves.png", "Pose accuracy curves"),
    ("depth_errors.png", "Depth error maps (scene 0)"),
    ("pointclouds.png", "Point clouds (scene 0)"),
    ("histograms.png", "Per-scene metric distributions"),
)


def write_report(out_dir: str | Path, result: EvalResult, dpi: int = 100) -> list[Path]:
    """Write the figures and ``report.md`` of an evaluation into ``out_dir / "report"``.

    out_dir: the folder ``evaluate`` wrote (its ``predictions/0.npz`` feeds the depth and point-cloud figures).
    result: what ``evaluate`` returned (or ``summarise`` of the records in ``scenes.jsonl``).
    Returns the paths written, figures first and ``report.md`` last. Figures without their inputs are skipped;
    stale figures of an earlier report that are not rewritten are removed so the markdown never links them.
    """
    out_dir = Path(out_dir)
    report_dir = out_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    models = list(result.models)

    arrays = _try("predictions", lambda: _load_predictions(out_dir / PREDICTIONS_FILE))
    makers: dict[str, Callable[[Path], Path | None]] = {
        "auc_curves.png": lambda p: plot_pose_curves(p, result, dpi=dpi),
        "depth_errors.png": lambda p: plot_depth_errors(p, arrays, models, dpi=dpi) if arrays else None,
        "pointclouds.png": lambda p: plot_pointclouds(p, arrays, models, dpi=dpi) if arrays else None,
        "histograms.png": lambda p: plot_histograms(p, result.records, models, dpi=dpi),
    }
    written: list[Path] = []
    for name, _ in FIGURES:
        path = report_dir / name
        made = _try(name, lambda m=makers[name], p=path: m(p))
        if made is not None:
            written.append(made)
        else:
            path.unlink(missing_ok=True)

    md = report_dir / "report.md"
    with atomic_open(md, "w") as f:
        f.write(_markdown(result, {p.name for p in written}))
    written.append(md)
    return written


def _markdown(result: EvalResult, figures: set[str]) -> str:
    records = result.records
    cats = Counter(str(r.get("category", "?")) for r in records)
    lines = [
        "# Evaluation report",
        "",
        f"Models: {', '.join(f'`{m}`' for m in result.models)} (reference: `{result.models[0]}`)."
        if result.models
        else "Models: none.",
        "",
        f"Scenes: {len(records)} in {len(cats)} categories"
        + (f" ({', '.join(f'{c}: {n}' for c, n in sorted(cats.items()))})." if cats else "."),
        "",
        "## Metrics",
        "",
        (
            "Means over categories of per-category means. Comparison columns: mean per-scene difference to the "
            "reference, paired bootstrap 95% interval, and retention (100 x model / reference) for "
            "higher-is-better metrics."
        ),
        "",
        format_table(result),
        "",
    ]
    shown = [(name, title) for name, title in FIGURES if name in figures]
    if shown:
        lines += ["## Figures", ""]
        for name, title in shown:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)
