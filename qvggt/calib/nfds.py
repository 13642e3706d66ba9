"""Noise-Filtered Diverse Sampling (NFDS): pick calibration samples that are typical (no outliers) and diverse.

Pipeline (per pool sample = one multi-view sequence of S frames):

1. :func:`deep_layer_features` runs the aggregator once (through ``VGGT.aggregate`` when given a VGGT, so a model
   with correspondence tokens sees the same patch tokens as in ``model(images)``) and returns two per-sample
   feature vectors:

   - ``deep`` float64 ``[4 k]``: for each of the k selected layers (ascending), the mean and the population
     std (ddof=0) over ALL tokens and channels of the input of ``frame_blocks[i].norm1`` (``[S, P, C]``) and
     of ``global_blocks[i].norm1`` (``[1, S*P, C]``), ordered ``frame_mean, frame_std, global_mean,
     global_std``; names in ``deep_names``. Default layers: the last ``min(4, depth)`` blocks (20..23 for the
     depth-24 VGGT, as published).
   - ``frame`` float64 ``[F]``, F = ``len(QUANTILES)``, the frame-aware feature (the paper's: the mean per-token
     cosine similarity of frames 1..S-1 to frame 0 on the last aggregator output): on the last kept output
     (layer ``max(layers)``, ``[S, P, 2C]``), ``c_s = mean_p cos(x_s[p], x_0[p])`` over the patch tokens
     ``p >= patch_start_idx`` (camera / register tokens are data-independent), s = 1..S-1. The set ``{c_s}``
     is summarised order-free by its values at ``QUANTILES`` (linear interpolation), a continuous function of
     the cosines (no histogram: a bin edge would split near-equal samples). With S = 1 the set is ``{1.0}``.
     The published feature (cosines in frame order, so its dimensions depend on how frames 1..S-1 were
     drawn) is NOT used: any permutation of frames 1..S-1 gives the same feature up to float rounding.

2. :func:`iqr_outliers` flags samples outside ``[Q1 - f IQR, Q3 + f IQR]`` on any ``deep`` statistic.

3. :func:`select_calibration` clusters the pool that SURVIVES the filter (the published code computes the filter
   but clusters every sample) and draws per cluster. Its features may be given as BLOCKS (a tuple, e.g.
   ``(frame, deep)`` as ``qvggt calibrate`` does): each block's columns are z-scored over the clustered pool
   and the block is scaled to a mean squared norm of 1, so every block weighs the same in k-means whatever
   its width. Clusters smaller than ``n_per_cluster`` leave their places to the other clusters (round robin,
   seeded draw), so the set has ``n_clusters * n_per_cluster`` samples whenever that many survive.

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
    "QUANTILES",
    "Mode",
    "PoolFeatures",
    "Selection",
    "deep_layer_features",
    "default_feature_layers",
    "frame_cosines",
    "frame_feature",
    "iqr_outliers",
    "pool_features",
    "select_calibration",
    "select_calibration_detailed",
]

Mode = Literal["random", "filter", "cluster", "nfds"]
MODES: tuple[str, ...] = ("random", "filter", "cluster", "nfds")
QUANTILES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
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


def frame_cosines(last: Tensor, patch_start_idx: int) -> np.ndarray:
    """last: [S, P, 2C] one aggregator output -> float64 [S-1]: ``c_s``, the mean over patch tokens p of
    ``cos(x_s[p], x_0[p])`` (per token, as the paper defines it, not the cosine of per-frame means, which
    crowds near 1 because the token mean washes out the content)."""
    patches = last[:, patch_start_idx:].double()  # [S, P_patch, 2C]
    cos = torch.nn.functional.cosine_similarity(patches[1:], patches[:1].expand_as(patches[1:]), dim=-1, eps=1e-12)
    return cos.mean(dim=1).cpu().numpy()  # [S-1]


def frame_feature(last: Tensor, patch_start_idx: int) -> np.ndarray:
    """last: [S, P, 2C] one aggregator output -> float64 [F]: ``{c_s}`` (:func:`frame_cosines`) at ``QUANTILES``."""
    vals = frame_cosines(last, patch_start_idx) if last.shape[0] > 1 else np.ones(1)
    # Quantiles of the set: independent of the order of frames 1..S-1 and continuous in every cosine.
    return np.quantile(np.sort(vals), QUANTILES).astype(np.float64)


@torch.no_grad()
def deep_layer_features(
    model: nn.Module, sample_images: Tensor | np.ndarray, layers: Sequence[int] | None = None
) -> dict[str, Any]:
    """One aggregator pass over one sample -> its NFDS features.

    Args:
        model: a VGGT (run through ``VGGT.aggregate``, correspondence tokens included) or a bare ``Aggregator``;
            its mode is left as is (use ``eval()``).
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
        if agg is not model and hasattr(model, "aggregate"):
            # VGGT.aggregate adds the correspondence-token offsets to the patch tokens, as model(images) does.
            outputs = model.aggregate(images[None], (max(layers),), {})
        else:
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
    frame = frame_feature(last[0], int(agg.patch_start_idx))
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

    @property
    def blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """``(frame, deep)``: the feature blocks NFDS clusters on, each weighing the same (see the module doc)."""
        return self.frame, self.deep


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


Features = np.ndarray | tuple[np.ndarray, ...]


def _as_blocks(features: Features) -> list[np.ndarray]:
    """One [N, F] array, or a tuple of [N, F_b] blocks -> list of float64 2-D blocks with equal N."""
    blocks = list(features) if isinstance(features, tuple) else [features]
    out = [np.asarray(b, dtype=np.float64) for b in blocks]
    if not out or any(b.ndim != 2 for b in out):
        raise ValueError(f"features must be [N, F] or a tuple of [N, F_b] blocks, got shapes {[b.shape for b in out]}")
    if len({b.shape[0] for b in out}) != 1:
        raise ValueError(f"feature blocks must have the same number of rows, got {[b.shape[0] for b in out]}")
    return out


def _standardise_block(x: np.ndarray) -> np.ndarray:
    """[n, F] -> columns z-scored, then the block scaled to a mean squared row norm of 1 (constant columns -> 0).

    The block scale makes every block weigh the same in k-means whatever its width, so a 16-column deep block
    cannot drown a 5-column frame block."""
    std = x.std(axis=0)
    live = std > 0
    z = np.where(live, (x - x.mean(axis=0)) / np.where(live, std, 1.0), 0.0)
    return z / np.sqrt(max(int(live.sum()), 1))


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


@dataclass(frozen=True)
class Selection:
    """What :func:`select_calibration_detailed` chose.

    ``chosen``: sorted pool indices; ``clusters``: ``{pool index: cluster id}`` of the clustered samples (None in
    the ``random`` / ``filter`` modes); ``requested``: ``n_clusters * n_per_cluster``; ``topped_up``: places that
    clusters smaller than ``n_per_cluster`` left and other clusters filled. ``len(chosen) < requested`` only when
    fewer samples are in the (clean) pool than were requested.
    """

    chosen: list[int]
    clusters: dict[int, int] | None
    requested: int
    topped_up: int

    @property
    def short_by(self) -> int:
        """How many samples the set lacks: ``requested - len(chosen)`` (0 unless the pool is too small)."""
        return self.requested - len(self.chosen)


def _quotas(sizes: list[int], n_per_cluster: int, target: int) -> tuple[list[int], int]:
    """Per-cluster draw sizes summing to ``target`` (<= sum(sizes)), and how many places were topped up.

    Each cluster gets ``min(n_per_cluster, size)``; the places short clusters leave go one at a time, round robin
    in cluster order, to clusters with members left, so the set keeps its size and stays spread over clusters.
    """
    quota = [min(n_per_cluster, s) for s in sizes]
    missing = target - sum(quota)
    topped = max(missing, 0)
    while missing > 0:
        for c, size in enumerate(sizes):
            if missing > 0 and quota[c] < size:
                quota[c] += 1
                missing -= 1
    return quota, topped


def select_calibration_detailed(
    features: Features,
    outlier_mask: np.ndarray | None,
    n_clusters: int,
    n_per_cluster: int,
    seed: int,
    n_init: int = 10,
    mode: Mode = "nfds",
) -> Selection:
    """:func:`select_calibration` returning a :class:`Selection`: also the cluster of every clustered sample,
    the size asked for and the top-ups."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n_clusters < 1 or n_per_cluster < 1 or n_init < 1:
        raise ValueError(f"n_clusters, n_per_cluster, n_init must be >= 1, got {n_clusters}, {n_per_cluster}, {n_init}")
    blocks = _as_blocks(features)
    n = blocks[0].shape[0]
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
    requested = n_clusters * n_per_cluster
    # Same budget in every mode; the whole (clean) pool if it is smaller.
    target = min(requested, int(pool.size))

    if mode in ("random", "filter"):
        chosen = sorted(int(i) for i in rng.choice(pool, size=target, replace=False))
        return Selection(chosen, None, requested, 0)

    if pool.size < n_clusters:
        raise ValueError(
            f"calibration pool of {pool.size} samples is smaller than n_clusters={n_clusters}: "
            f"lower n_clusters or enlarge the pool{where}"
        )
    # Standardised over the clustered pool only: filtered outliers must not stretch the scale either.
    x = np.concatenate([_standardise_block(b[pool]) for b in blocks], axis=1)
    labels = _kmeans_labels(x, n_clusters, seed, n_init)
    members = [pool[labels == c] for c in range(int(labels.max()) + 1)]  # ascending pool indices
    quota, topped = _quotas([m.size for m in members], n_per_cluster, target)
    chosen: list[int] = []
    for m, q in zip(members, quota, strict=True):
        chosen += [int(i) for i in rng.choice(m, size=q, replace=False)]
    clusters = {int(i): int(lab) for i, lab in zip(pool, labels, strict=True)}
    return Selection(sorted(chosen), clusters, requested, topped)


def select_calibration(
    features: Features,
    outlier_mask: np.ndarray | None,
    n_clusters: int,
    n_per_cluster: int,
    seed: int,
    n_init: int = 10,
    mode: Mode = "nfds",
) -> list[int]:
    """Pick calibration samples (sorted pool indices) from per-sample features.

    Args:
        features: float [N, F] (e.g. ``PoolFeatures.frame``), or a tuple of [N, F_b] blocks (e.g.
            ``PoolFeatures.blocks``) standardised block by block (see the module docstring); one array is one
            block.
        outlier_mask: bool [N] from :func:`iqr_outliers` (None = nothing flagged); used by ``filter``/``nfds``.
        n_clusters, n_per_cluster: k-means k and the draw per cluster (published: 5 and 4).
        seed: seeds both k-means (``random_state``) and the draw (``np.random.default_rng(seed)``).
        n_init: k-means restarts (published: 50); always passed explicitly.
        mode: ``random`` seeded draw of ``n_clusters * n_per_cluster`` from the whole pool (no filter);
            ``filter`` the same draw from the non-outliers; ``cluster`` k-means on the whole pool then a draw of
            ``n_per_cluster`` per cluster; ``nfds`` the filter, then k-means on the survivors only. In the
            clustered modes a cluster smaller than ``n_per_cluster`` gives its missing places to the other
            clusters (round robin in cluster order), so every mode returns ``min(n_clusters * n_per_cluster,
            pool size)`` samples.

    Deterministic for given inputs: k-means is sklearn's Lloyd with ``random_state=seed`` run under a
    one-thread OpenMP limit; clusters are renumbered canonically, drawn in that order from sorted members.

    Raises:
        ValueError: in the clustered modes when the (clean) pool has fewer samples than ``n_clusters``.
    """
    return select_calibration_detailed(features, outlier_mask, n_clusters, n_per_cluster, seed, n_init, mode).chosen
