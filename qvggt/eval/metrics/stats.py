"""Statistics over per-scene metric values: paired bootstrap intervals and retention percentages.

Shape legend: n scenes (or categories), the unit the bootstrap resamples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qvggt.eval.metrics._common import to_numpy

_MAX_DRAW = 4_000_000  # resampled values held at once; larger problems are drawn in chunks


def paired_bootstrap(a: Any, b: Any, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict[str, float]:
    """Percentile-bootstrap confidence interval of the mean paired difference ``b - a``.

    a, b: [n] per-scene values of two methods on the same scenes (finite, n >= 1). Scenes are resampled with
    replacement ``n_boot`` times by ``np.random.default_rng(seed)`` (deterministic for a seed).
    Returns ``mean_diff`` = mean(b - a) and ``low``/``high`` = the (1 - ci)/2 and (1 + ci)/2 quantiles of
    the resampled means. Raises ValueError on shape mismatch, empty or non-finite input, or ci outside (0, 1).
    """
    x, y = to_numpy(a).ravel(), to_numpy(b).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired_bootstrap needs equally long inputs, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("paired_bootstrap needs at least one pair")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired_bootstrap got non-finite values")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    d = y - x
    n = d.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_DRAW // n)
    means = np.concatenate(
        [d[rng.integers(0, n, size=(min(chunk, n_boot - s), n))].mean(1) for s in range(0, n_boot, chunk)]
    )
    low, high = np.quantile(means, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return {"mean_diff": float(d.mean()), "low": float(low), "high": float(high)}


def retention(quant: Any, fp: Any) -> float | np.ndarray:
    """Percentage of the FP value a quantized model keeps: 100 * quant / fp (for higher-is-better metrics).

    Scalars give a float, arrays an elementwise array. Where fp == 0 the value is NaN (undefined), never inf.
    """
    q, f = to_numpy(quant), to_numpy(fp)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(f == 0, np.nan, 100.0 * q / np.where(f == 0, 1.0, f))
    return float(r) if r.ndim == 0 else r
