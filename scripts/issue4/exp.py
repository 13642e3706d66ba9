"""Scratch pose-learning experiments (issue 4). One process, 1 thread."""
import argparse, json, math, sys, time
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from ev import pose_eval, fmt
from qvggt.config import TrainConfig, DataConfig
from qvggt.data.synthetic import CATEGORIES
from qvggt.model import build_model, get_preset
from qvggt.train.data import SceneCache, build_cache
from qvggt.train.losses import LossWeights, vggt_loss

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--bs", type=int, default=2)
p.add_argument("--render_frames", type=int, default=8)
p.add_argument("--frames", default="0,1", help="frame indices of the rendered trajectory, or 'win:S' random adjacent window")
p.add_argument("--scenes", type=int, default=400)
p.add_argument("--cats", default="train")
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--head_lr_mult", type=float, default=1.0)
p.add_argument("--cam_w", type=float, default=5.0)
p.add_argument("--dense", type=int, default=1)
p.add_argument("--warmup", type=int, default=30)
p.add_argument("--init", default=None)
p.add_argument("--eval_every", type=int, default=0)
p.add_argument("--data_seed", type=int, default=0)
p.add_argument("--init_values", type=float, default=None)
p.add_argument("--max_min", type=float, default=11.5)
a = p.parse_args()

data = DataConfig()
cats = list(data.train_categories()) if a.cats == "train" else a.cats.split(",")
seeds = list(range(a.scenes))
cs = [cats[s % len(cats)] for s in seeds]
cache = SceneCache(build_cache("runs/issue4/cache", seeds, cs, a.render_frames, 126, progress=False))
ho_seeds = list(range(200000, 200032))
ho_cats = [CATEGORIES[s % 8] if a.cats == "train" else cats[i % len(cats)] for i, s in enumerate(ho_seeds)]
ho = SceneCache(build_cache("runs/issue4/cache", ho_seeds, ho_cats, a.render_frames, 126, progress=False))


def renorm(b, frames):
    """Subset frames of a normalised batch and re-normalise to the first chosen frame (VGGT's frame)."""
    E = b["extrinsics"][:, frames].double()  # [B,S,3,4] in old frame-0 coords
    R0, t0 = E[:, 0, :, :3], E[:, 0, :, 3]
    pts = b["world_points"][:, frames].double()
    m = b["valid_mask"][:, frames]
    pts = torch.einsum("bij,bshwj->bshwi", R0, pts) + t0[:, None, None, None]
    d = pts.norm(dim=-1)
    s = 1.0 / ((d * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1))
    Rrel = E[..., :3] @ R0.transpose(-1, -2)[:, None]
    trel = E[..., 3] - torch.einsum("bsij,bj->bsi", Rrel, t0)
    ext = torch.cat([Rrel, (trel * s[:, None, None])[..., None]], -1)
    out = dict(b)
    out.update(images=b["images"][:, frames], depth=(b["depth"][:, frames] * s[:, None, None, None]).float(),
               world_points=torch.where(m[..., None], pts * s[:, None, None, None, None], 0).float(), valid_mask=m,
               extrinsics=ext.float(), intrinsics=b["intrinsics"][:, frames])
    return out


def pick_frames(rng):
    if a.frames.startswith("win:"):
        S = int(a.frames[4:]); st = int(rng.integers(0, a.render_frames - S + 1)); return list(range(st, st + S))
    return [int(x) for x in a.frames.split(",")]


class Sub:  # a cache view with fixed frames for evaluation
    def __init__(self, c, frames): self.c, self.f = c, frames
    def batch(self, idx): return renorm(self.c.batch(idx), self.f)


torch.manual_seed(0)
cfg = get_preset("small").model_copy(update={"enable_track": False, "default_image_hw": (126, 126), "img_size": 126,
                                             "enable_depth": bool(a.dense), "enable_point": bool(a.dense)})
if a.init_values is not None:
    cfg = cfg.model_copy(update={"init_values": a.init_values})
model = build_model(cfg)
if a.init:
    from qvggt.model import load_vggt
    sd = torch.load(a.init, weights_only=True) if a.init.endswith(".pt") else load_vggt(a.init).float().state_dict()
    print("init from", a.init, model.load_state_dict(sd, strict=False))
model.aggregator.gradient_checkpointing = False
head = [p_ for n, p_ in model.named_parameters() if n.startswith("camera_head") or "camera_token" in n]
hid = {id(x) for x in head}
rest = [p_ for p_ in model.parameters() if id(p_) not in hid]
opt = torch.optim.AdamW([{"params": rest, "lr": a.lr}, {"params": head, "lr": a.lr * a.head_lr_mult}], weight_decay=0.05)
base = [g["lr"] for g in opt.param_groups]
w = LossWeights(camera=a.cam_w)
rng = np.random.default_rng(a.data_seed)
ev_frames = pick_frames(np.random.default_rng(0)) if not a.frames.startswith("win:") else list(range(int(a.frames[4:])))
tr_eval, ho_eval = Sub(cache, ev_frames), Sub(ho, ev_frames)
n_tr = min(32, a.scenes)
t0 = time.time(); log = []
step = 0
for step in range(1, a.steps + 1):
    f = a.warmup and min(1.0, step / a.warmup)
    f = f * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1, step / a.steps))))
    for g, b0 in zip(opt.param_groups, base): g["lr"] = b0 * f
    idx = list(rng.integers(0, a.scenes, a.bs))
    b = renorm(cache.batch(idx), pick_frames(rng))
    model.train()
    preds = model(b["images"])
    L = vggt_loss(preds, b, w)
    opt.zero_grad(); L["objective"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    log.append(float(L["loss_camera"]))
    if step % 25 == 0:
        print(f"step {step} t={time.time()-t0:.0f}s cam={np.mean(log[-25:]):.4f} obj={float(L['objective']):.3f}", flush=True)
    if a.eval_every and step % a.eval_every == 0:
        print("  train", fmt(pose_eval(model, tr_eval, list(range(n_tr)))), flush=True)
    if time.time() - t0 > a.max_min * 60:
        print("time limit at step", step); break
el = time.time() - t0
rt = pose_eval(model, tr_eval, list(range(n_tr))); rh = pose_eval(model, ho_eval, list(range(32)))
print(f"DONE {a.name} steps={step} wall={el:.0f}s eval_frames={ev_frames}")
print("  train  ", fmt(rt)); print("  heldout", fmt(rh))
json.dump({"args": vars(a), "steps": step, "wall_s": el, "train": rt, "heldout": rh}, open(f"runs/issue4/{a.name}.json", "w"), indent=1)
torch.save(model.state_dict(), f"runs/issue4/{a.name}.pt")
