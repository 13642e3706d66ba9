"""The calibration steps as Prefect tasks: build the candidate pool, collect deep-layer statistics, filter noisy
samples, cluster frames (NFDS). Each wraps one function of :mod:`qvggt.calib.command` and hands on the path of the
artifact it wrote; the cache key of each is the content of its input files, its settings, the qvggt version and
the source of the qvggt subpackages it runs (``qvggt.pipeline.cache.step_key``)."""

from __future__ import annotations

from typing import Any

from prefect import task

from qvggt.pipeline.cache import step_key
from tasks.common import data_config, keyed_dir, maybe_inject_fault
from tasks.steps import RETRY

# What each step runs, for its cache key: an edit there invalidates the step, an edit elsewhere does not.
POOL_SOURCE = ("calib", "data", "eval", "model")  # renders through eval.datasets; image size from the model config
STATS_SOURCE = ("calib", "data", "eval", "model")
FILTER_SOURCE = ("calib",)
CLUSTER_SOURCE = ("calib",)


def _pool_key(context: Any, p: dict[str, Any]) -> str:
    settings = {"pool_scenes": p["pool_scenes"], "frames": p["frames"], "calib_seeds": p["data"]["calib_seeds"],
                "out": p["out_dir"]}  # fmt: skip
    return step_key("build-pool", [p["base_weights"]], settings, POOL_SOURCE)


@task(name="build-pool", cache_key_fn=_pool_key, **RETRY)
def build_pool(base_weights: str, out_dir: str, pool_scenes: int, frames: int, data: dict[str, Any]) -> str:
    """The candidate pool at the base model's image size; returns ``pool.json``'s path."""
    where = keyed_dir(out_dir, _pool_key, dict(locals()))
    from qvggt.calib.command import write_pool
    from qvggt.model import load_vggt

    maybe_inject_fault("build-pool")
    hw = load_vggt(base_weights).cfg.default_image_hw
    return str(write_pool(where, pool_scenes, frames, hw, data_config(data)))


def _stats_key(context: Any, p: dict[str, Any]) -> str:
    return step_key("collect-stats", [p["base_weights"], p["pool"]], {"out": p["out_dir"]}, STATS_SOURCE)


@task(name="collect-stats", cache_key_fn=_stats_key, **RETRY)
def collect_stats(base_weights: str, pool: str, out_dir: str, data: dict[str, Any]) -> str:
    """Deep-layer statistics and frame-aware features of every candidate; returns ``features.npz``'s path."""
    where = keyed_dir(out_dir, _stats_key, dict(locals()))
    from qvggt.calib.command import write_features

    return str(write_features(base_weights, pool, where, data_config(data)))


def _filter_key(context: Any, p: dict[str, Any]) -> str:
    settings = {"iqr_factor": p["iqr_factor"], "out": p["out_dir"]}
    return step_key("filter-noisy", [p["features"]], settings, FILTER_SOURCE)


@task(name="filter-noisy", cache_key_fn=_filter_key, **RETRY)
def filter_noisy(features: str, out_dir: str, iqr_factor: float) -> str:
    """The IQR filter's decision on the deep-layer statistics; returns ``outliers.json``'s path."""
    where = keyed_dir(out_dir, _filter_key, dict(locals()))
    from qvggt.calib.command import write_outliers

    return str(write_outliers(features, where, iqr_factor))


def _cluster_key(context: Any, p: dict[str, Any]) -> str:
    settings = {k: p[k] for k in ("mode", "seed", "n_clusters", "n_per_cluster", "n_init", "out_dir")}
    return step_key("cluster-frames", [p["pool"], p["features"], p["outliers"]], settings, CLUSTER_SOURCE)


@task(name="cluster-frames", cache_key_fn=_cluster_key, **RETRY)
def cluster_frames(
    pool: str, features: str, outliers: str, out_dir: str, mode: str, seed: int, n_clusters: int,
    n_per_cluster: int, n_init: int,
) -> str:  # fmt: skip
    """k-means on the survivors' frame-aware and deep-layer feature blocks, a per-cluster draw topped up to size;
    returns ``manifest.json``'s path (its sha256 identifies the calibration set in the quantize step's cache key
    and in MLflow)."""
    where = keyed_dir(out_dir, _cluster_key, dict(locals()))
    from qvggt.calib.command import write_selection

    result = write_selection(pool, features, outliers, where, mode, seed, n_clusters, n_per_cluster, n_init)
    return str(result.manifest_path)
