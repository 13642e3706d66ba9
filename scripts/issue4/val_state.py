"""Held-out validation (qvggt.train.validation, with the matcher's top-1) of a `qvggt train` work dir's state.pt.

Usage: python scripts/issue4/val_state.py runs/issue4/corrA.yaml runs/issue4/corrA/work
"""
import sys

import torch

from qvggt.config import load_config
from qvggt.train.data import SceneCache, build_cache
from qvggt.train.trainer import init_model
from qvggt.train.validation import validate, validation_scenes

torch.set_num_threads(1)
params = load_config(sys.argv[1])
cfg, data = params.train, params.data
state = torch.load(f"{sys.argv[2]}/state.pt", weights_only=True)
model = init_model(cfg)
model.load_state_dict(state["model"])
seeds, cats = validation_scenes(data, 32)
cache = SceneCache(build_cache("runs/cache", seeds, cats, cfg.num_frames, cfg.image_size, progress=False))
print(validate(model, cache, int(state["step"])))
