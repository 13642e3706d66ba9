"""Noise-Filtered Diverse Sampling (NFDS): pick calibration samples that are typical (no outliers) and diverse.

Pipeline (per pool sample = one multi-view sequence of S frames):

1. :func:`deep_layer_features` runs the aggregator once and returns two per-sample feature vectors:

   - ``deep`` float64 ``[4 k]``: for each of the k selected layers (ascending), the mean and the population
     std (ddof=0) over ALL tokens and channels of the input of ``frame_blocks[i].norm1`` (``[S, P, C]``) and
     of ``global_blocks[i].norm1`` (``[1, S*P, C]``), ordered ``frame_mean, frame_std, global_mean,
     global_std``; names in ``deep_names``. Default layers: the last ``min(4, depth)`` blocks (20..23 for the
     depth-24 VGGT, as published).
   - ``frame`` float64 ``[F]``, F = ``len(QUANTILES) + NUM_COS_BINS + 4``, the frame-aware feature: on the
     last kept aggregator output (layer ``max(layers)``, ``[S, P, 2C]``), ``e_s`` = mean over the patch tokens
     (positions ``>= patch_start_idx``) of frame s, ``c_s = cos(e_s, e_0)`` for s = 1..S-1. The set
     ``{c_s}`` is summarised order-free: its values at ``QUANTILES`` (linear interpolation of the SORTED
     values), a histogram of fractions on ``NUM_COS_BINS`` equal bins over [-1, 1], its mean and std, and
     two global statistics of the output's patch tokens (mean and std over all frames, tokens, channels).
     With S = 1 the set is taken as ``{1.0}``. The published feature (cosines in frame order, so its
     dimensions depend on how frames 1..S-1 were drawn) is NOT used: any permutation of frames 1..S-1 gives
     the same feature up to float rounding (the aggregator is equivariant in those frames).

2. :func:`iqr_outliers` flags samples outside ``[Q1 - f IQR, Q3 + f IQR]`` on any ``deep`` statistic.

3. :func:`select_calibration` clusters the standardised ``frame`` features of the pool that SURVIVES the
   filter (the published code computes the filter but clusters every sample) and draws per cluster.

Legend: N pool samples, D deep statistics (4 k), F frame-feature size, S frames, P tokens per frame,
C embed dim, k number of selected layers.

Calibration pools must come from a calibration split (e.g. ``SyntheticEvalDataset.from_config(n,
split="calib")``), never from the evaluation split the published code drew them from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "MODES",
    "NUM_COS_BINS",
    "QUANTILES",
    "Mode",
    "PoolFeatures",
    "deep_layer_features",
    "default_feature_layers",
    "iqr_outliers",
    "pool_features",
    "select_calibration",
    "select_calibration_with_clusters",
]

Mode = Literal["random", "filter", "cluster", "nfds"]
MODES: tuple[str, ...] = ("random", "filter", "cluster", "nfds")
QUANTILES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
NUM_COS_BINS = 8
# Categories with fewer samples than this fall back to the global quartiles: 3 points give no usable IQR.
MIN_CATEGORY_SIZE = 4


def default_feature_layers(depth: int, k: int = 4) -> list[int]:
    """The last ``min(k, depth)`` block indices: ``[20, 21, 22, 23]`` for depth 24."""
    return list(range(max(0, depth - k), depth))


def _aggregator(model: nn.Module) -> nn.Module:
    agg = getattr(model, "aggregator", model)
    if not hasattr(agg, "frame_blocks") or not hasattr(agg, "global_blocks"):
        raise TypeError(f"{type(model).__name__} has no aggregator with frame_blocks / global_blocks")
    return agg


def _frame_feature(last: Tensor, patch_start_idx: int) -> np.ndarray:
    """last: [S, P, 2C] one aggregator output -> float64 [F] (see the module docstring)."""
    patches = last[:, patch_start_idx:].double()  # [S, P_patch, 2C]
    emb = patches.mean(dim=1)  # [S, 2C]
    if emb.shape[0] > 1:
        cos = torch.nn.functional.cosine_similarity(emb[1:], emb[:1].expand_as(emb[1:]), dim=-1, eps=1e-12)
        vals = np.sort(cos.cpu().numpy())  # sorted: no dependence on the order of frames 1..S-1
    else:
        vals = np.ones(1)
    quant = np.quantile(vals, QUANTILES)
    hist, _ = np.histogram(np.clip(vals, -1.0, 1.0), bins=NUM_COS_BINS, range=(-1.0, 1.0))
    glob = [float(vals.mean()), float(vals.std()), float(patches.mean()), float(patches.std(unbiased=False))]
    return np.concatenate([quant, hist / vals.size, glob]).astype(np.float64)


@torch.no_grad()
def deep_layer_features(
    model: nn.Module, sample_images: Tensor | np.ndarray, layers: Sequence[int] | None = None
) -> dict[str, Any]:
    """One aggregator pass over one sample -> its NFDS features.

    Args:
        model: a VGGT (or its ``Aggregator``); its mode is left as is (use ``eval()``).
        sample_images: float [S, 3, H, W] in [0, 1].
        layers: block indices whose norm1 inputs are recorded; None = :func:`default_feature_layers`.

    Returns:
        ``{"deep": float64 [4 k], "deep_names": [4 k] str, "frame": float64 [F], "layers": list[int]}``;
        see the module docstring for the exact definitions.
    """
    agg = _aggregator(model)
    depth = len(agg.frame_blocks)
    layers = default_feature_layers(depth) if layers is None else sorted({int(i) for i in layers})
    if not layers or not all(0 <= i < depth for i in layers):
        raise ValueError(f"layers must be a non-empty subset of [0, {depth}), got {layers}")
    images = torch.as_tensor(sample_images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"sample_images must be [S, 3, H, W], got {tuple(images.shape)}")
    param = next(agg.parameters())
    images = images.to(device=param.device, dtype=torch.float32)

    recorded: dict[str, tuple[float, float]] = {}

    def hook(name: str, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].double()
        recorded[name] = (float(x.mean()), float(x.std(unbiased=False)))

    handles = []
    for i in layers:
        for kind in ("frame", "global"):
            block = getattr(agg, f"{kind}_blocks")[i]
            handles.append(block.norm1.register_forward_pre_hook(lambda m, a, n=f"{kind}.{i}": hook(n, m, a)))
    try:
        outputs = agg(images[None], keep_layers=(max(layers),))
    finally:
        for h in handles:
            h.remove()
    names, deep = [], []
    for i in layers:
        for kind in ("frame", "global"):
            mean, std = recorded[f"{kind}.{i}"]
            names += [f"{kind}.{i}.mean", f"{kind}.{i}.std"]
            deep += [mean, std]
    last = outputs[max(layers)]
    assert last is not None
    frame = _frame_feature(last[0], int(agg.patch_start_idx))
    return {"deep": np.asarray(deep, dtype=np.float64), "deep_names": names, "frame": frame, "layers": layers}


@dataclass(frozen=True)
class PoolFeatures:
    """Features of a whole pool: ``deep`` float64 [N, D], ``frame`` float64 [N, F], ids/categories [N]."""

    sample_ids: list[str]
    categories: list[str]
    deep: np.ndarray
    frame: np.ndarray
    deep_names: list[str]
    layers: list[int]


def pool_features(model: nn.Module, samples: Sequence[Any], layers: Sequence[int] | None = None) -> PoolFeatures:
    """:func:`deep_layer_features` for every sample (objects with ``sample_id``, ``category``, ``images``)."""
    if not samples:
        raise ValueError("the calibration pool is empty")
    feats = [deep_layer_features(model, s.images, layers) for s in samples]
    return PoolFeatures(
        sample_ids=[s.sample_id for s in samples],
        categories=[s.category for s in samples],
        deep=np.stack([f["deep"] for f in feats]),
        frame=np.stack([f["frame"] for f in feats]),
        deep_names=feats[0]["deep_names"],
        layers=feats[0]["layers"],
    )


def _iqr_flags(values: np.ndarray, ref: np.ndarray, factor: float) -> np.ndarray:
    """values [n, D], ref [m, D] (quartiles come from ref) -> bool [n]."""
    q1, q3 = np.percentile(ref, [25.0, 75.0], axis=0)  # linear interpolation, numpy's default
    iqr = q3 - q1
    outside = (values < q1 - factor * iqr) | (values > q3 + factor * iqr)
    return outside.any(axis=1)


def iqr_outliers(values: np.ndarray, categories: Sequence[str] | None = None, factor: float = 1.5) -> np.ndarray:
    """Tukey's rule on every column: flag a sample outside ``[Q1 - f IQR, Q3 + f IQR]`` on ANY statistic.

    Args:
        values: float [N, D] per-sample statistics (``PoolFeatures.deep``).
        categories: [N] labels or None. Given, each category's quartiles come from its own samples; a category
            with fewer than ``MIN_CATEGORY_SIZE`` (4) samples is judged against the quartiles of the whole pool.
        factor: f (1.5, as published).

    Returns:
        bool [N], True = outlier. Non-finite rows are always outliers and are left out of every quartile.
        Quartiles use ``np.percentile`` with linear interpolation. A column with IQR 0 flags every value that
        differs from its quartile value (the plain rule; there is no tolerance).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be [N, D], got shape {values.shape}")
    n = values.shape[0]
    finite = np.isfinite(values).all(axis=1)
    out = ~finite
    if not finite.any():
        return out
    if categories is not None and len(categories) != n:
        raise ValueError(f"{len(categories)} categories for {n} samples")
    cats = np.asarray(["" for _ in range(n)] if categories is None else [str(c) for c in categories])
    global_ref = values[finite]
    for cat in sorted(set(cats.tolist())):
        idx = np.flatnonzero((cats == cat) & finite)
        if idx.size == 0:
            continue
        ref = values[idx] if (categories is not None and idx.size >= MIN_CATEGORY_SIZE) else global_ref
        out[idx] = _iqr_flags(values[idx], ref, factor)
    return out


def _standardise(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _kmeans_labels(x: np.ndarray, n_clusters: int, seed: int, n_init: int) -> np.ndarray:
    """Seeded Lloyd k-means on one OpenMP thread; labels renumbered by each cluster's first member."""
    from sklearn.cluster import KMeans  # lazy: core imports stay lean
    from threadpoolctl import threadpool_limits

    # One thread: Lloyd's per-thread partial sums would otherwise be added in a thread-count-dependent order.
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed, algorithm="lloyd", max_iter=300)
        raw = km.fit_predict(x)
    # Canonical ids: the cluster holding the lowest pool index is 0, and so on.
    order = {}
    for lab in raw.tolist():
        order.setdefault(lab, len(order))
    return np.asarray([order[lab] for lab in raw.tolist()], dtype=np.int64)


def select_calibration_with_clusters(
    features: np.ndarray,
    outlier_mask: np.ndarray | None,
    n_clusters: int,
    n_per_cluster: int,
    seed: int,
    n_init: int = 10,
    mode: Mode = "nfds",
) -> tuple[list[int], dict[int, int] | None]:
    """:func:`select_calibration` that also returns ``{pool index: cluster id}`` of the CLUSTERED samples
    (None in the ``random`` / ``filter`` modes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n_clusters < 1 or n_per_cluster < 1 or n_init < 1:
        raise ValueError(f"n_clusters, n_per_cluster, n_init must be >= 1, got {n_clusters}, {n_per_cluster}, {n_init}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {x.shape}")
    n = x.shape[0]
    mask = np.zeros(n, dtype=bool) if outlier_mask is None else np.asarray(outlier_mask, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"outlier_mask must be bool [{n}], got shape {mask.shape}")
    filtered = mode in ("filter", "nfds")
    pool = np.flatnonzero(~mask) if filtered else np.arange(n)
    removed = int(n - pool.size)
    where = f" ({removed} outliers removed from {n})" if filtered else ""
    if pool.size == 0:
        raise ValueError(f"calibration pool is empty{where}")
    rng = np.random.default_rng(seed)

    if mode in ("random", "filter"):
        # Same budget as the clustered modes; the whole pool if it is smaller.
        take = min(n_clusters * n_per_cluster, pool.size)
        return sorted(int(i) for i in rng.choice(pool, size=take, replace=False)), None

    if pool.size < n_clusters:
        raise ValueError(
            f"calibration pool of {pool.size} samples is smaller than n_clusters={n_clusters}: "
            f"lower n_clusters or enlarge the pool{where}"
        )
    # Standardised over the clustered pool only: filtered outliers must not stretch the scale either.
    labels = _kmeans_labels(_standardise(x[pool]), n_clusters, seed, n_init)
    chosen: list[int] = []
    for c in range(int(labels.max()) + 1):
        members = pool[labels == c]  # ascending pool indices
        chosen += [int(i) for i in rng.choice(members, size=min(n_per_cluster, members.size), replace=False)]
    return sorted(chosen), {int(i): int(lab) for i, lab in zip(pool, labels, strict=True)}


def select_calibration(
    features: np.ndarray,
    outlier_mask: np.ndarray | None,
    n_clusters: int,
    n_per_cluster: int,
    seed: int,
    n_init: int = 10,
    mode: Mode = "nfds",
) -> list[int]:
    """Pick calibration samples (sorted pool indices) from per-sample frame features.

    Args:
        features: float [N, F] frame-aware features (``PoolFeatures.frame``).
        outlier_mask: bool [N] from :func:`iqr_outliers` (None = nothing flagged); used by ``filter``/``nfds``.
        n_clusters, n_per_cluster: k-means k and the draw per cluster (published: 5 and 4).
        seed: seeds both k-means (``random_state``) and the draw (``np.random.default_rng(seed)``).
        n_init: k-means restarts (published: 50); always passed explicitly.
        mode: ``random`` seeded draw of ``n_clusters * n_per_cluster`` from the whole pool (no filter);
            ``filter`` the same draw from the non-outliers; ``cluster`` k-means on the whole pool then a draw of
            up to ``n_per_cluster`` per cluster; ``nfds`` the filter, then k-means on the survivors only.

    Deterministic for given inputs: k-means is sklearn's Lloyd with ``random_state=seed`` run under a
    one-thread OpenMP limit; clusters are renumbered canonically, drawn in that order from sorted members.

    Raises:
        ValueError: in the clustered modes when the (clean) pool has fewer samples than ``n_clusters``.
    """
    return select_calibration_with_clusters(features, outlier_mask, n_clusters, n_per_cluster, seed, n_init, mode)[0]
