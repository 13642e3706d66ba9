"""Accuracy retention of each bench configuration on a trained model (the small model by default).

The speed section runs ``vggt-1b`` with name-seeded weights, whose outputs mean nothing; whether a configuration
keeps the model's accuracy is measured here, on a trained checkpoint and held-out synthetic scenes, with the same
engine code path (kernels on a GPU, their twins on CPU). Retention and paired bootstrap intervals come from
``qvggt.eval``: the fp32 model is the reference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qvggt.bench.configs import BenchConfig, build_config_model
from qvggt.config import DataConfig
from qvggt.eval.datasets import make_dataset
from qvggt.eval.runner import ModelPredictor, Predictor, evaluate
from qvggt.model import load_vggt

__all__ = ["RETENTION_METRICS", "bench_retention"]

# Task metrics against ground truth, and fidelity to the fp32 model (``fid_*``): the latter stay meaningful where
# the small model's own pose accuracy is poor (its pose AUC is near 0, issue #4).
RETENTION_METRICS = (
    "pose_auc@30",
    "fid_pose_auc@30",
    "fid_rel_l2_pose_enc",
    "depth_abs_rel",
    "depth_delta1",
    "fid_rel_l2_depth",
    "pm_chamfer",
)


def bench_retention(
    checkpoint: str | Path,
    configs: list[BenchConfig],
    out_dir: Path,
    device: torch.device,
    scenes: int = 8,
    frames: int = 4,
    data: DataConfig | None = None,
) -> dict:
    """Evaluate fp32 and every config on the same held-out scenes; returns metrics, retention and intervals."""
    master = load_vggt(checkpoint).eval()
    predictors: list[Predictor] = [ModelPredictor("fp32", master.to(device))]
    for config in configs:
        model = build_config_model(master.cpu(), config, device)
        # bf16: the published recipe's autocast; an Engine accepts it as a no-op (its precision is built in).
        predictors.append(ModelPredictor(config.name, model, torch.bfloat16))  # type: ignore[arg-type]
    master.to(device)
    h, w = master.cfg.default_image_hw
    ds = make_dataset("synthetic:eval", n=scenes, data=data or DataConfig(), num_frames=frames, height=h, width=w)
    result = evaluate(ds, predictors, out_dir, max_scenes=scenes, progress=False)
    return {
        "checkpoint": str(checkpoint),
        "scenes": scenes,
        "frames": frames,
        "metrics": {n: {k: result.aggregate[n].get(k) for k in RETENTION_METRICS} for n in result.models},
        "vs_fp32": {
            n: {k: v for k, v in result.comparison.get(n, {}).items() if k in RETENTION_METRICS}
            for n in result.models[1:]
        },
    }
