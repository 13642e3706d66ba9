"""Scratch pose-learning experiments (issue 4). One process, 1 thread."""
import argparse, json, math, os, sys, time
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from ev import pose_eval, fmt
from exp_util import grid_flow, load_matcher, pair_rotvecs, patch_flow
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
p.add_argument("--frames", default="0,1", help="frame indices of the rendered trajectory, 'win:S' a random adjacent window, or 'pair': frame 0 and a random other")
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
p.add_argument("--match_w", type=float, default=0.0, help="weight of the cross-view token-matching InfoNCE (0: off)")
p.add_argument("--match_tau", type=float, default=0.1)
p.add_argument("--token_std", type=float, default=None, help="re-initialise the camera/register tokens with this std")
p.add_argument("--pos_init", default=None, choices=[None, "sincos"], help="re-initialise the encoder's absolute position embedding")
p.add_argument("--att_w", type=float, default=0.0, help="weight of the attention supervision: global layers' head --att_head attends from each frame-1 patch to the frame-0 patch seeing the same point")
p.add_argument("--att_layers", default="2,3,4,5,6,7")
p.add_argument("--att_head", type=int, default=0)
p.add_argument("--flow_w", type=float, default=0.0, help="weight of a dense flow regression: a linear map of each frame-1 patch token (last layer) to its match's offset in frame 0")
p.add_argument("--pos_values", type=float, default=0.0, help="in the --att_layers, head --att_head's values carry the key's patch (y, x) and its output the query's own (scale; 0: off)")
p.add_argument("--oracle_flow", type=float, default=0.0, help="oracle test: add a learned linear embedding of the ground-truth flow (du, dv, ok) of each frame-1 patch to its patch token (scale; 0: off)")
p.add_argument("--oracle_matcher", default=None, help="with --oracle_flow: the flow comes from this frozen matcher's argmax (a model trained with --att_w), not the ground truth")
p.add_argument("--probe", action="store_true", help="after training, the per-axis yaw probe on 128 training and 128 held-out pairs")
p.add_argument("--save_every", type=int, default=0, help="write a snapshot runs/issue4/NAME_sSTEP.pt every N steps")
a = p.parse_args()

data = DataConfig()
cats = list(data.train_categories()) if a.cats == "train" else a.cats.split(",")
seeds = list(range(a.scenes))
cs = [cats[s % len(cats)] for s in seeds]
cache = SceneCache(build_cache("runs/issue4/cache", seeds, cs, a.render_frames, 126, progress=False))
ho_seeds = list(range(200000, 200032))
ho_cats = [CATEGORIES[s % 8] if a.cats == "train" else cats[i % len(cats)] for i, s in enumerate(ho_seeds)]
ho = SceneCache(build_cache("runs/issue4/cache", ho_seeds, ho_cats, a.render_frames, 126, progress=False))


ORACLE = {}


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
    ORACLE["b"] = out  # the oracle hook reads the flow of the batch about to go through the model
    out.update(images=b["images"][:, frames], depth=(b["depth"][:, frames] * s[:, None, None, None]).float(),
               world_points=torch.where(m[..., None], pts * s[:, None, None, None, None], 0).float(), valid_mask=m,
               extrinsics=ext.float(), intrinsics=b["intrinsics"][:, frames])
    return out


def pick_frames(rng):
    if a.frames == "pair":  # frame 0 and one random later frame of the trajectory (wide baselines)
        return [0, int(rng.integers(1, a.render_frames))]
    if a.frames.startswith("win:"):
        S = int(a.frames[4:]); st = int(rng.integers(0, a.render_frames - S + 1)); return list(range(st, st + S))
    return [int(x) for x in a.frames.split(",")]


class Sub:  # a cache view with fixed frames for evaluation
    def __init__(self, c, frames): self.c, self.f = c, frames
    def batch(self, idx): return renorm(self.c.batch(idx), self.f)


torch.manual_seed(0)
cfg = get_preset("small").replace(**{"enable_track": False, "default_image_hw": (126, 126), "img_size": 126,
                                             "enable_depth": bool(a.dense), "enable_point": bool(a.dense)})
if a.init_values is not None:
    cfg = cfg.replace(**{"init_values": a.init_values})
model = build_model(cfg)
if a.init:
    from qvggt.model import load_vggt
    sd = torch.load(a.init, weights_only=True) if a.init.endswith(".pt") else load_vggt(a.init).float().state_dict()
    print("init from", a.init, model.load_state_dict(sd, strict=False))
if a.token_std is not None:  # the reference frame's tokens must differ from the others' for it to be told apart
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (model.aggregator.camera_token, model.aggregator.register_token):
            t.copy_(torch.randn(t.shape, generator=g) * a.token_std)
if a.pos_init == "sincos":  # MAE-style 2-D sin-cos: absolute position in the tokens' content, norm ~ the patches'
    pe = model.aggregator.patch_embed.pos_embed
    n, dim = pe.shape[1] - 1, pe.shape[2]
    gsz = int(round(n ** 0.5)); q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    ys, xs = torch.meshgrid(torch.arange(gsz, dtype=torch.float64), torch.arange(gsz, dtype=torch.float64), indexing="ij")
    enc = lambda v: torch.cat([torch.sin(v.reshape(-1, 1) * omega), torch.cos(v.reshape(-1, 1) * omega)], 1)
    with torch.no_grad():
        pe[0, 1:] = torch.cat([enc(ys), enc(xs)], 1).float()
        pe[0, 0] = 0
model.aggregator.gradient_checkpointing = False
feats = {}
oracle_lin = torch.nn.Linear(3, cfg.embed_dim)


def oracle_hook(m, i, o):
    b = ORACLE["b"]
    du, dv, ok = patch_flow(b)
    if matcher is not None:  # the visibility stays the ground truth's (sky patches)
        du, dv = grid_flow(matcher(b))
    B, S = b["images"].shape[:2]
    f1 = torch.stack([du * ok, dv * ok, ok.float()], -1)  # [B, N, 3]
    f = torch.stack([torch.zeros_like(f1), f1], 1) if S == 2 else None
    return o + a.oracle_flow * oracle_lin(f).reshape(B * S, -1, o.shape[-1])


matcher = load_matcher(a.oracle_matcher) if a.oracle_matcher else None
if a.oracle_flow:
    model.aggregator.patch_embed.register_forward_hook(oracle_hook)
    if a.init and os.path.exists(a.init.replace(".pt", "_oracle_lin.pt")):  # continuing an oracle run
        oracle_lin.load_state_dict(torch.load(a.init.replace(".pt", "_oracle_lin.pt"), weights_only=True))
model.aggregator.register_forward_hook(lambda m, i, o: feats.__setitem__("last", o[-1]))
proj = torch.nn.Linear(2 * cfg.embed_dim, 64)


def match_targets(b):
    """For each frame-1 patch: the index of the frame-0 patch seeing the same surface point, and whether it is
    visible there. Ground truth: the world point at the frame-1 patch centre projected into frame 0 (whose
    extrinsic is the identity after renormalisation), kept if frame 0's depth there agrees."""
    ps = 14; B, S, _, H, W = b["images"].shape; gh, gw = H // ps, W // ps
    c = torch.arange(gh) * ps + ps // 2
    pts = b["world_points"][:, 1][:, c][:, :, c].reshape(B, -1, 3)  # [B,N,3] frame-0 coordinates
    ok1 = b["valid_mask"][:, 1][:, c][:, :, c].reshape(B, -1)
    K = b["intrinsics"][:, 0]
    z = pts[..., 2].clamp(min=1e-6)
    u = K[:, None, 0, 0] * pts[..., 0] / z + K[:, None, 0, 2]
    v = K[:, None, 1, 1] * pts[..., 1] / z + K[:, None, 1, 2]
    ui, vi = u.round().long(), v.round().long()
    inb = (pts[..., 2] > 1e-4) & (ui >= 0) & (ui < W) & (vi >= 0) & (vi < H)
    uc, vc = ui.clamp(0, W - 1), vi.clamp(0, H - 1)
    d0 = b["depth"][:, 0][torch.arange(B)[:, None], vc, uc]
    ok0 = b["valid_mask"][:, 0][torch.arange(B)[:, None], vc, uc]
    vis = ok1 & inb & ok0 & ((d0 - pts[..., 2]).abs() < 0.03 * pts[..., 2])
    return vis, (vc // ps) * gw + uc // ps


def match_loss(tokens, b):
    """InfoNCE between frame-1 patch tokens [B, S, P, 2C] and their frame-0 matches."""
    x = torch.nn.functional.normalize(proj(tokens[:, :, model.aggregator.patch_start_idx:]), dim=-1)  # [B,S,N,64]
    vis, tgt = match_targets(b)
    logits = torch.einsum("bnc,bmc->bnm", x[:, 1], x[:, 0]) / a.match_tau
    if vis.sum() == 0:
        return logits.sum() * 0, 0.0
    ce = torch.nn.functional.cross_entropy(logits[vis], tgt[vis])
    acc = float((logits[vis].argmax(-1) == tgt[vis]).float().mean())
    return ce, acc


def flow_loss(tokens, b):
    """L1 between a linear read-out of frame-1 patch tokens and the offset (image widths) to their frame-0 match."""
    du, dv, ok = patch_flow(b)
    tgt = torch.stack([du, dv], -1)
    pred = flow_proj(tokens[:, 1, model.aggregator.patch_start_idx:])
    if ok.sum() == 0:
        return pred.sum() * 0, 0.0
    err = (pred - tgt).abs()[ok]
    return err.mean(), float(err.mean())


flow_proj = torch.nn.Linear(2 * cfg.embed_dim, 2)
att_logits = []


def supervised_forward(attn):
    """Attention.forward that also keeps head --att_head's logits of frame-1 patch queries over all keys."""
    import torch.nn.functional as F

    def fwd(x, pos=None):
        B, N, C = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = attn.rope(q, pos), attn.rope(k, pos)
        P = N // 2; ps0 = model.aggregator.patch_start_idx
        att_logits.append(q[:, a.att_head, P + ps0:] @ k[:, a.att_head].transpose(-1, -2) / attn.head_dim ** 0.5)
        if a.pos_values:  # a soft-argmax of the match's position, and the query's own, in 4 channels of one head
            g = model.aggregator.patch_embed.pos_embed.shape[1] - 1
            yx = pos.yx.to(v.dtype) / round(g ** 0.5) * a.pos_values  # [B, N, 2]; special tokens at 0
            h0 = a.att_head
            vh = torch.cat([yx, v[:, h0, :, 2:]], -1)
            v = torch.cat([v[:, :h0], vh[:, None], v[:, h0 + 1:]], 1)
        out = F.scaled_dot_product_attention(q, k, v)
        if a.pos_values:
            oh = torch.cat([out[:, h0, :, :2], yx, out[:, h0, :, 4:]], -1)
            out = torch.cat([out[:, :h0], oh[:, None], out[:, h0 + 1:]], 1)
        return attn.proj(out.transpose(1, 2).reshape(B, N, C))
    return fwd


def att_loss(b):
    vis, tgt = match_targets(b)
    ps0 = model.aggregator.patch_start_idx
    if vis.sum() == 0:
        return sum(x.sum() for x in att_logits) * 0, 0.0
    ces, accs = [], []
    for lg in att_logits:  # [B, N1, S*P]
        ces.append(torch.nn.functional.cross_entropy(lg[vis], (tgt + ps0)[vis]))
        accs.append(float((lg[vis].argmax(-1) == (tgt + ps0)[vis]).float().mean()))
    return torch.stack(ces).mean(), accs[-1]


if a.att_w:
    for i in (int(x) for x in a.att_layers.split(",")):
        ga = model.aggregator.global_blocks[i].attn
        ga.forward = supervised_forward(ga)


head = [p_ for n, p_ in model.named_parameters() if n.startswith("camera_head") or "camera_token" in n]
hid = {id(x) for x in head}
rest = [p_ for p_ in model.parameters() if id(p_) not in hid]
groups = [{"params": rest, "lr": a.lr}, {"params": head, "lr": a.lr * a.head_lr_mult}]
if a.oracle_flow:
    groups.append({"params": list(oracle_lin.parameters()), "lr": a.lr})
if a.flow_w:
    groups.append({"params": list(flow_proj.parameters()), "lr": a.lr})
if a.match_w:
    groups.append({"params": list(proj.parameters()), "lr": a.lr})
opt = torch.optim.AdamW(groups, weight_decay=0.05)
base = [g["lr"] for g in opt.param_groups]
w = LossWeights(camera=a.cam_w)
rng = np.random.default_rng(a.data_seed)
ev_frames = [0, 1] if a.frames == "pair" else pick_frames(np.random.default_rng(0)) if not a.frames.startswith("win:") else list(range(int(a.frames[4:])))
tr_eval, ho_eval = Sub(cache, ev_frames), Sub(ho, ev_frames)
n_tr = min(32, a.scenes)
t0 = time.time(); log = []; mlog = [(0.0, 0.0)]
step = 0
for step in range(1, a.steps + 1):
    f = a.warmup and min(1.0, step / a.warmup)
    f = f * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1, step / a.steps))))
    for g, b0 in zip(opt.param_groups, base): g["lr"] = b0 * f
    idx = list(rng.integers(0, a.scenes, a.bs))
    b = renorm(cache.batch(idx), pick_frames(rng))
    model.train()
    att_logits.clear()
    preds = model(b["images"])
    L = vggt_loss(preds, b, w)
    obj = L["objective"]
    if a.match_w:
        ml, macc = match_loss(feats["last"], b)
        obj = obj + a.match_w * ml
        mlog.append((float(ml), macc))
    if a.flow_w:
        fl, fe = flow_loss(feats["last"], b)
        obj = obj + a.flow_w * fl
        mlog.append((float(fl), fe))
    if a.att_w:
        al, aacc = att_loss(b)
        obj = obj + a.att_w * al
        mlog.append((float(al), aacc))
    opt.zero_grad(); obj.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    log.append(float(L["loss_camera"]))
    if step % 25 == 0:
        ml = np.mean(mlog[-25:], 0)
        print(f"step {step} t={time.time()-t0:.0f}s cam={np.mean(log[-25:]):.4f} obj={float(obj):.3f} match={ml[0]:.3f} acc={ml[1]:.2f}", flush=True)
    if a.save_every and step % a.save_every == 0:
        torch.save(model.state_dict(), f"runs/issue4/{a.name}_s{step}.pt")
    if a.eval_every and step % a.eval_every == 0:
        print("  train", fmt(pose_eval(model, tr_eval, list(range(n_tr)))), flush=True)
    if time.time() - t0 > a.max_min * 60:
        print("time limit at step", step); break
el = time.time() - t0
rt = pose_eval(model, tr_eval, list(range(n_tr))); rh = pose_eval(model, ho_eval, list(range(32)))
print(f"DONE {a.name} steps={step} wall={el:.0f}s eval_frames={ev_frames}")
print("  train  ", fmt(rt)); print("  heldout", fmt(rh))
json.dump({"args": vars(a), "steps": step, "wall_s": el, "train": rt, "heldout": rh}, open(f"runs/issue4/{a.name}.json", "w"), indent=1)
if a.steps: torch.save(model.state_dict(), f"runs/issue4/{a.name}.pt")
if a.steps and a.oracle_flow: torch.save(oracle_lin.state_dict(), f"runs/issue4/{a.name}_oracle_lin.pt")
if a.steps and a.match_w: torch.save(proj.state_dict(), f"runs/issue4/{a.name}_match_proj.pt")  # the InfoNCE matcher's head
if a.match_w:  # the InfoNCE matcher's top-1 on 128 held-out pairs (frames 0-1)
    ho128m = SceneCache(build_cache("runs/issue4/cache", list(range(200000, 200128)), [CATEGORIES[s % 8] for s in range(200000, 200128)], 8, 126, progress=False))
    model.eval(); hits = []
    with torch.no_grad():
        for k in range(0, 128, 8):
            bb = renorm(ho128m.batch(list(range(k, k + 8))), [0, 1])
            model(bb["images"])
            hits.append(match_loss(feats["last"], bb)[1])
    print(f"MATCH held-out top-1 (InfoNCE head, mean over batches): {np.mean(hits):.2f}", flush=True)
if a.probe:  # yaw_probe_split.py on this process's model (keeps any forward patches: --att_w, --pos_values)
    from scipy.spatial.transform import Rotation
    model.eval()
    ho128 = SceneCache(build_cache("runs/issue4/cache", list(range(200000, 200128)), [CATEGORIES[s % 8] for s in range(200000, 200128)], 8, 126, progress=False))
    for name, c in (("train", cache), ("held-out", ho128)):
        def probe_batch(idx, c=c):
            att_logits.clear()  # the patched forward records logits; keep memory flat
            return renorm(c.batch(idx), [0, 1])

        g, pr = pair_rotvecs(model, probe_batch, 128)
        err = [np.degrees(np.linalg.norm((Rotation.from_rotvec(x, degrees=True).inv() * Rotation.from_rotvec(y, degrees=True)).as_rotvec())) for x, y in zip(pr, g)]
        print(f"PROBE {name}: rot median {np.median(err):.1f} (identity {np.median(np.linalg.norm(g, axis=1)):.1f}) | "
              + " | ".join(f"axis {i}: corr {np.corrcoef(g[:, i], pr[:, i])[0, 1]:.2f}" for i in range(2))
              + f" | yaw sign agreement {np.mean(np.sign(g[:, 1]) == np.sign(pr[:, 1])):.2f} | pred yaw std {pr[:, 1].std():.1f}", flush=True)
