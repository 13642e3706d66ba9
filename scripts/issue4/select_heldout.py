"""Validation scores of trained models on held-out scenes the benchmark does not use (eval seeds 32..32+N-1; the
benchmark and `qvggt train`'s validation use the first 32), to choose between candidates without looking at it.

Usage: python scripts/issue4/select_heldout.py 64 runs/issue4/corrA/model/model.safetensors runs/issue4/corrB/model/model.safetensors
"""
import sys

import torch

from qvggt.config import DataConfig
from qvggt.model import load_vggt
from qvggt.train.data import SceneCache, build_cache
from qvggt.train.validation import validate, validation_scenes

torch.set_num_threads(1)
n = int(sys.argv[1])
seeds, cats = validation_scenes(DataConfig(), 32 + n)
cache = SceneCache(build_cache("runs/cache", seeds[32:], cats[32:], 4, 126, progress=False))
for path in sys.argv[2:]:
    r = validate(load_vggt(path), cache, 0)
    print(f"{path}: rot {r.rot_median:.1f} (identity {r.identity_rot_median:.1f}, gain {100 * r.rot_gain:+.1f} %), "
          f"yaw corr {r.yaw_corr:.2f}, AUC@30 {r.pose_auc30:.1f}, AbsRel {r.depth_abs_rel:.3f}, match top-1 {r.match_top1:.2f}")
