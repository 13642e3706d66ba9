"""Continue a `qvggt train` run's final state with more full-objective steps (a cheap proxy for "a longer full
phase"): cosine from --lr down to the run's min lr over --steps, the run's own data order continued.

Usage: python scripts/issue4/continue_full.py runs/issue4/corrB.yaml runs/issue4/corrB/work runs/issue4/corrB_cont 800 1e-4
"""
import math
import sys
import time
from pathlib import Path

import torch

from qvggt.config import load_config
from qvggt.model import save_checkpoint
from qvggt.train.data import SceneCache, build_cache
from qvggt.train.trainer import batch_indices, init_model, param_groups, training_losses, training_scenes

torch.set_num_threads(1)
params_path, work, out, steps, lr = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
params = load_config(params_path)
cfg = params.train
seeds, cats = training_scenes(params.data, cfg.num_scenes)
cache = SceneCache(build_cache("runs/cache", seeds, cats, cfg.num_frames, cfg.image_size, progress=False))
state = torch.load(f"{work}/state.pt", weights_only=True)
model = init_model(cfg)
model.load_state_dict(state["model"])
model.aggregator.gradient_checkpointing = False
model.correspondence.matcher.backbone.gradient_checkpointing = False
model.train()
opt = torch.optim.AdamW(param_groups(model, cfg), lr=lr)
opt.load_state_dict(state["optimizer"])  # Adam moments carry over
start, t0 = int(state["step"]), time.time()
for k in range(steps):
    f = cfg.min_lr_ratio * cfg.lr / lr
    scale = f + (1 - f) * 0.5 * (1 + math.cos(math.pi * k / steps))
    for g in opt.param_groups:
        g["lr"] = lr * scale
    step = start + k
    batch = cache.batch(batch_indices(step, cfg.batch_size, len(cache), cfg.seed))
    losses = training_losses(model, batch, step, cfg)
    opt.zero_grad(set_to_none=True)
    losses["objective"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if (k + 1) % 100 == 0:
        print(f"step {step + 1} t={time.time() - t0:.0f}s obj={float(losses['objective'].detach()):.3f} "
              f"cam={float(losses['loss_camera'].detach()):.4f} top1={float(losses['match_top1']):.2f}", flush=True)
save_checkpoint(model.eval(), out / "model.safetensors", dtype=torch.float16)
print("saved", out / "model.safetensors", flush=True)
