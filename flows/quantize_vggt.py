"""``quantize-vggt``: base weights -> quantized, evaluated, (GPU-)benchmarked, tracked models.

Wires the tasks of ``tasks/steps.py``; every setting comes from ``params.yaml`` section ``pipeline`` (validated on
load: a bad file fails at once, before any work). Runs in Prefect's ephemeral mode by default, against a server
when ``PREFECT_API_URL`` is set. Each step is cached by content (base weights' sha256, its settings, the qvggt
source it runs), so a second run with nothing changed is all cache hits, and a run killed midway resumes from the
finished steps (artifacts are written atomically).

    python flows/quantize_vggt.py [--base-weights PATH] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tasks` is a top-level folder of the repo
# A fresh PREFECT_HOME migrates its database when the temporary server first starts; on a busy 2-core machine that
# took longer than Prefect's 20 s default (measured: `make demo` on a fresh clone failed with "Timed out while
# attempting to connect to ephemeral Prefect API server"). Set before prefect reads its settings.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow
from prefect.runtime import flow_run

from qvggt.config import ProjectConfig, job_name, load_config
from qvggt.io import sha256_file
from qvggt.pipeline.preflight import check_tracking_uri, resolve_device
from qvggt.pipeline.results import SharedCache
from qvggt.pipeline.tracking import artifact_root_for, resolve_tracking_uri, run_exists
from tasks.calibration import build_pool, cluster_frames, collect_stats, filter_noisy
from tasks.compare import compare_configs
from tasks.steps import benchmark, evaluate, fetch_base_weights, quantize, register, track, verify_base_weights

# QVGGT_RESULT_STORAGE=s3://bucket/prefix: task results and step artifacts in a bucket, a cache machines share
# (qvggt.pipeline.results). Read at import, so a deployment's worker picks it up from its environment.
SHARED = SharedCache.from_env()


def _git_revision() -> str:
    """The code's commit: ``QVGGT_GIT_REVISION`` (the worker image bakes it in: it holds no .git), else git's."""
    if os.environ.get("QVGGT_GIT_REVISION"):
        return os.environ["QVGGT_GIT_REVISION"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _dvc_revision() -> str:
    """The DVC side of the data's version: sha256 (first 12) of ``dvc.lock``, which pins every DVC-owned artifact
    (the embedded model, the DVC stages' outputs) by content; "none" outside a DVC project."""
    lock = Path("dvc.lock")
    return sha256_file(lock)[:12] if lock.is_file() else "none"


def _verified(path: str, step: Any, *args: Any) -> str:
    """A cached step's artifact path, recomputed (cache refreshed) if the artifact has since been deleted: a cache
    record must never hand on a file that is not there. With a shared cache, a file that another machine made is
    pulled (sha256-verified) first."""
    if Path(path).is_file():
        return path
    if SHARED is not None and SHARED.restore(Path(path).parent) and Path(path).is_file():
        return path
    return step.with_options(refresh_cache=True)(*args)


def _share(*folders: str | Path) -> None:
    """Push step outputs to the shared cache (unchanged files are skipped), so its result records stay usable."""
    if SHARED is not None:
        for folder in folders:
            SHARED.share(folder)


def _base_model_name(base_weights: str) -> str:
    """``models/small/model.safetensors`` -> ``small``; ``tiny.safetensors`` -> ``tiny``."""
    path = Path(base_weights)
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def _calibration_set(base: str, project: ProjectConfig, out: Path) -> str:
    """NFDS as four cached steps (params.yaml ``calibrate``, on the flow's base weights); the manifest's path."""
    c, data, where = project.calibrate, project.data.model_dump(mode="json"), str(out)
    pool_args = (base, where, c.pool_scenes, c.frames, data)
    pool = _verified(build_pool(*pool_args), build_pool, *pool_args)
    stats_args = (base, pool, where, data)
    features = _verified(collect_stats(*stats_args), collect_stats, *stats_args)
    filter_args = (features, where, c.iqr_factor)
    outliers = _verified(filter_noisy(*filter_args), filter_noisy, *filter_args)
    cluster_args = (pool, features, outliers, where, c.mode, c.seed, c.n_clusters, c.n_per_cluster, c.n_init)
    manifest = _verified(cluster_frames(*cluster_args), cluster_frames, *cluster_args)
    _share(where)
    return manifest


@flow(name="quantize-vggt", result_storage=SHARED.block_ref if SHARED is not None else None)
def quantize_vggt(base_weights: str | None = None, params: str = "params.yaml", base_model: str | None = None) -> dict:
    """Quantize ``base_weights`` (default: ``pipeline.base_weights``) with every job of ``params.yaml``; returns
    {job name: {"checkpoint", "mlflow_run_id", "wbits", "abits"}} plus the metrics path, the benchmark outcome, the
    registry's decision and the tracking URI used. ``base_model`` names the registered model ``qvggt-<base_model>``
    (default: the checkpoint's folder name, ``small`` for ``models/small/model.safetensors``; the watcher passes
    the name it reads the champion of)."""
    project = load_config(params)
    cfg = project.pipeline
    tracking_uri = resolve_tracking_uri(cfg.mlflow_tracking_uri)  # a deployment's MLFLOW_TRACKING_URI wins
    check_tracking_uri(tracking_uri)  # an unreachable server fails now, not after the quantization
    device = resolve_device(cfg.device)  # as does "cuda" on a worker without a GPU
    source = base_weights or cfg.base_weights
    model_name = base_model or _base_model_name(source)
    # s3:// weights are pulled (sha256-verified) into the local weights cache; every step reads that copy, and the
    # cache keys hash its bytes, so machines that pulled the same object share cache hits.
    base = fetch_base_weights(source) if source.startswith("s3://") else source
    out = Path(cfg.out_dir)
    base_sha = verify_base_weights(base)
    manifest = _calibration_set(base, project, out / "calib")
    jobs = [job.model_dump() for job in cfg.jobs]
    data = project.data.model_dump(mode="json")  # the splits every step draws from, part of their cache keys
    job_args = [(job, base, str(out / "models"), manifest, data, device) for job in jobs]
    if device == "cpu":  # concurrently: each job's model copy in host memory
        futures = [quantize.submit(*args) for args in job_args]
        results = [f.result() for f in futures]
    else:  # one at a time: one model copy on the GPU
        results = [quantize(*args) for args in job_args]
    checkpoints = [_verified(r, quantize, *args) for r, args in zip(results, job_args, strict=True)]
    eval_args = (base, checkpoints, str(out / "eval"), cfg.eval_scenes, cfg.eval_frames, data, device)
    metrics_path = _verified(evaluate(*eval_args), evaluate, *eval_args)
    _verified(compare_configs(metrics_path), compare_configs, metrics_path)  # into the report MLflow logs
    _share(*(Path(c).parent for c in checkpoints), Path(metrics_path).parent)
    bench = benchmark(checkpoints, str(out / "bench"), jobs)
    run_id = flow_run.get_id() or "local"
    revision, dvc_rev = _git_revision(), _dvc_revision()
    artifacts = artifact_root_for(tracking_uri, out)
    runs = {}
    for job, ckpt in zip(jobs, checkpoints, strict=True):
        track_args = (job, ckpt, metrics_path, bench, base_sha, tracking_uri, run_id, revision, dvc_rev,
                      None if artifacts is None else str(artifacts))  # fmt: skip
        rid = track(*track_args)
        if not run_exists(tracking_uri, rid):  # a cache record of a run the store no longer has: log it again
            rid = track.with_options(refresh_cache=True)(*track_args)
        runs[job_name(job)] = {"checkpoint": ckpt, "mlflow_run_id": rid, "wbits": job["wbits"], "abits": job["abits"]}
    registry = register(runs, metrics_path, bench, model_name, base_sha, tracking_uri)
    return {
        "runs": runs, "metrics": metrics_path, "benchmark": bench, "registry": registry, "git_revision": revision,
        "tracking_uri": tracking_uri,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-weights", default=None)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    load_config(args.params)  # a bad params.yaml fails here, before Prefect starts a server (the flow checks again)
    if SHARED is not None:
        SHARED.save_block()  # Prefect resolves result storage by name, on the server this run uses
    result = quantize_vggt(args.base_weights, args.params)
    import json

    metrics = json.loads(Path(result["metrics"]).read_text())["aggregate"]
    print("\n| model | pose AUC@30 fidelity | depth AbsRel | rel L2 depth vs FP | MLflow run |")
    print("|---|---|---|---|---|")
    for model, m in metrics.items():
        name = model.split("/")[0]
        rid = result["runs"].get(name, {}).get("mlflow_run_id", "-")
        print(f"| {model} | {m.get('fid_pose_auc@30', float('nan')):.1f} | {m.get('depth_abs_rel', float('nan')):.4f} "
              f"| {m.get('fid_rel_l2_depth', float('nan')):.2e} | {rid} |")  # fmt: skip
    uri = result["tracking_uri"]
    print(f"\nMLflow UI: {uri if uri.startswith('http') else f'mlflow ui --backend-store-uri {uri}'}")
    print(f"report:    {Path(result['metrics']).parent / 'report' / 'report.md'}")
    reg = result["registry"]
    print(f"registry:  versions {reg['versions']}; champion {reg['champion']} ({reg['reason']})")
    if result["benchmark"].get("skipped"):
        print(f"benchmark: {result['benchmark']['reason']}")


if __name__ == "__main__":
    main()
