"""The pipeline's steps as Prefect tasks (content-hash cached, transient-only retries)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from qvggt.config import job_name
from qvggt.pipeline.cache import step_key
from tasks.common import data_config, keyed_dir, maybe_inject_fault, retry_transient

RETRY = {"retries": 2, "retry_delay_seconds": 1, "retry_condition_fn": retry_transient, "persist_result": True}
QUANTIZE_CALIB_SCENES = 8  # the quantize step's calibration split scenes when it is given no manifest


def _quantize_key(context: Any, p: dict[str, Any]) -> str:
    manifest = [p["calib_manifest"]] if p.get("calib_manifest") else []  # the calibration set, by content
    scenes = None if manifest else p.get("calib_scenes", QUANTIZE_CALIB_SCENES)  # used only without a manifest
    return step_key(
        "quantize", [p["base_weights"], *manifest],
        {"job": p["job"], "calib_scenes": scenes, "out": p["out_dir"], "data": p.get("data"),
         "device": p.get("device", "cpu")},
        ("quant", "model", "data", "calib", "eval"),  # eval: the manifest's samples are rendered through it
    )  # fmt: skip


@task(name="fetch-base-weights", **{**RETRY, "persist_result": False})  # a local path: never shared or reused
def fetch_base_weights(base_weights: str) -> str:
    """A local, sha256-verified copy of ``s3://bucket/key`` base weights in the weights cache
    (``QVGGT_WEIGHTS_CACHE``, default ``~/.cache/qvggt/weights``), downloaded only when missing or different."""
    from qvggt.pipeline.storage import fetch, weights_cache_dir

    return str(fetch(base_weights, weights_cache_dir()))


@task(name="verify-base-weights", **RETRY)
def verify_base_weights(base_weights: str) -> str:
    """sha256 of the base weights after checking they load as a VGGT (a clear error otherwise)."""
    from qvggt.io import sha256_file
    from qvggt.model import load_vggt

    load_vggt(base_weights)  # raises CheckpointError / FileNotFoundError naming the problem
    return sha256_file(base_weights)


@task(name="quantize", cache_key_fn=_quantize_key, **RETRY)
def quantize(
    job: dict, base_weights: str, out_dir: str, calib_manifest: str | None = None, data: dict | None = None,
    device: str = "cpu", calib_scenes: int = QUANTIZE_CALIB_SCENES,
) -> str:  # fmt: skip
    """Quantize ``base_weights`` as ``job`` ({method, wbits, abits}) on the calibration set of ``calib_manifest``
    (the cluster-frames step's output; ``data``: params.yaml ``data``, the splits it was drawn from), or without
    one on the first ``calib_scenes`` scenes of the calibration split; returns the
    packed checkpoint's path (``out_dir/<key>/<job name>/model.safetensors``)."""
    where = keyed_dir(out_dir, _quantize_key, dict(locals()))
    from qvggt.quant.command import run_quantize

    maybe_inject_fault("quantize")
    name = job_name(job)
    result = run_quantize(
        job["method"], job["wbits"], job["abits"], where / name, base_weights, calib_scenes=calib_scenes,
        calib_manifest=calib_manifest, data=data_config(data), options=job.get("options"), device=device,
    )  # fmt: skip
    return str(result.path)


def _evaluate_key(context: Any, p: dict[str, Any]) -> str:
    return step_key(
        "evaluate", [p["base_weights"], *p["quantized"]], {"scenes": p["scenes"], "frames": p["frames"],
                                                            "out": p["out_dir"], "data": p.get("data"),
                                                            "device": p.get("device", "cpu")},
        ("eval", "model", "data", "quant", "geometry"),
    )  # fmt: skip


@task(name="evaluate", cache_key_fn=_evaluate_key, **RETRY)
def evaluate(
    base_weights: str, quantized: list[str], out_dir: str, scenes: int, frames: int, data: dict | None = None,
    device: str = "cpu",
) -> str:  # fmt: skip
    """FP and every quantized model on the same held-out scenes (params.yaml ``data``); returns the metrics.json
    path (``out_dir/<key>/metrics.json``: a rerun with other models or settings never meets this one's scenes)."""
    where = keyed_dir(out_dir, _evaluate_key, dict(locals()))
    from qvggt.eval.command import run_eval

    run_eval(
        base_weights, quantized, "synthetic:eval", where, frames=frames, scenes=scenes, progress=False,
        data=data_config(data), device=device,
    )  # fmt: skip
    return str(where / "metrics.json")


@task(name="benchmark", **RETRY)
def benchmark(quantized: list[str], out_dir: str, jobs: list[dict] | None = None) -> dict:
    """GPU speed of the engine configs of ``jobs`` (their formats) against the published recipe; without a GPU, a
    visible skip with its reason (nothing is timed)."""
    import torch

    if not torch.cuda.is_available():
        reason = "no CUDA device on this worker: the GPU benchmark was skipped (run `qvggt bench` on a GPU)"
        print(f"NOTICE: {reason}")
        return {"skipped": True, "reason": reason}
    from qvggt.bench.configs import parse_configs
    from qvggt.bench.run import run_bench
    from qvggt.pipeline.bench_metrics import bench_configs_for
    from qvggt.pipeline.oom import retry_smaller_on_oom

    names = bench_configs_for(jobs) if jobs else ["published", "bf16-fused", "w8a8-fp8", "w4a8-fp8"]
    configs = parse_configs(",".join(names))
    # Out of memory is retried with fewer frames (the smaller chunk), not failed and not retried as is.
    doc, frames = retry_smaller_on_oom(lambda f: run_bench(Path(out_dir), configs, f), [8, 32])
    return {
        "skipped": False, "bench_json": str(Path(out_dir) / "bench.json"), "gpu": doc["env"].get("gpu"),
        "frames": frames,
    }  # fmt: skip


def _track_key(context: Any, p: dict[str, Any]) -> str:
    return step_key(
        "track", [p["checkpoint"], p["metrics_path"]], {"job": p["job"], "uri": p["tracking_uri"],
                                                        "bench": p["bench"]}, ("pipeline",),
    )  # fmt: skip


@task(name="track", cache_key_fn=_track_key, **RETRY)
def track(
    job: dict,
    checkpoint: str,
    metrics_path: str,
    bench: dict,
    base_sha256: str,
    tracking_uri: str,
    flow_run_id: str,
    git_revision: str = "unknown",
    dvc_revision: str = "unknown",
    artifact_root: str | None = None,
) -> str:
    """Log one quantized config to MLflow (experiment per base model); returns the run id. ``artifact_root``: where a
    new experiment keeps its artifacts (``qvggt.pipeline.tracking.artifact_root_for``; None: the server's store).

    The git and DVC revisions are tags, not part of the cache key: a commit that changes no code this step depends
    on does not re-log (the run keeps the revisions that produced it)."""
    from qvggt.pipeline.tracking import calibration_tags, config_metrics, log_quantized_run
    from qvggt.quant.export import read_manifest

    name = job_name(job)
    packed = read_manifest(checkpoint)
    metrics = config_metrics(json.loads(Path(metrics_path).read_text()), name, packed)
    if not bench["skipped"]:  # latency, frames/s, peak memory and speedup of this job's formats, per frame count
        from qvggt.pipeline.bench_metrics import bench_metrics

        metrics.update(bench_metrics(bench["bench_json"], job["wbits"], job["abits"]))
    tags = {
        "base_sha256": base_sha256, "prefect_flow_run_id": flow_run_id, "git_revision": git_revision,
        "gpu_benchmark": str(not bench["skipped"]), "dvc_revision": dvc_revision, **calibration_tags(packed),
    }  # fmt: skip
    if bench["skipped"]:
        tags["gpu_benchmark_skipped_reason"] = bench["reason"]
    report = Path(metrics_path).parent / "report"
    return log_quantized_run(
        tracking_uri, f"qvggt-{base_sha256[:12]}", name, job, metrics, tags,
        {"checkpoint": Path(checkpoint).parent, "report": report}, artifact_root=artifact_root,
    )  # fmt: skip


def _register_key(context: Any, p: dict[str, Any]) -> str:
    # The MLflow run ids identify what was logged; a re-logged config (new run id) registers a new version.
    return step_key(
        "register", [p["metrics_path"]], {"runs": p["runs"], "uri": p["tracking_uri"], "base": p["base_model"],
                                          "sha": p["base_sha256"], "bench": p["bench"]}, ("pipeline",),
    )  # fmt: skip


@task(name="register", cache_key_fn=_register_key, **RETRY)
def register(
    runs: dict[str, dict], metrics_path: str, bench: dict, base_model: str, base_sha256: str, tracking_uri: str
) -> dict:
    """Register every tracked config as a model version of ``qvggt-<base_model>``, then apply the champion rule once.

    ``runs``: {config name: {"checkpoint", "mlflow_run_id", "wbits", "abits"}}; each config's speedup is its
    formats' in the GPU benchmark (None when it was skipped). Returns {"versions": {name: version}, "champion":
    version or None, "reason": the rule's explanation}.
    """
    from mlflow import MlflowClient

    from qvggt.pipeline.bench_metrics import job_speedup
    from qvggt.pipeline.registry import CandidateMetrics, register_candidate, update_champion
    from qvggt.pipeline.tracking import eval_model_key
    from qvggt.quant.export import read_manifest

    client = MlflowClient(tracking_uri)
    metrics_doc = json.loads(Path(metrics_path).read_text())
    versions = {}
    for name, run in runs.items():
        model_key = eval_model_key(metrics_doc, name)
        weight_bytes = read_manifest(run["checkpoint"])["summary"]["weight_bytes_after"]
        speedup = None if bench["skipped"] else job_speedup(bench["bench_json"], run["wbits"], run["abits"])
        candidate = CandidateMetrics.from_eval(metrics_doc, model_key, weight_bytes=weight_bytes, speedup=speedup)
        versions[name] = register_candidate(
            run["mlflow_run_id"], base_model, base_sha256, candidate, artifact_path="checkpoint", config_name=name,
            client=client,
        )  # fmt: skip
    decision = update_champion(base_model, base_sha256, client=client)
    return {"versions": versions, "champion": decision.version, "reason": decision.reason}
