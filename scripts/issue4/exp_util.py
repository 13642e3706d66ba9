import numpy as np, torch
from qvggt.train.data import SceneCache, build_cache, select_frames
from qvggt.data.synthetic import CATEGORIES
from qvggt.config import DataConfig
from qvggt.geometry.pose_encoding import pose_encoding_to_extri_intri, extri_intri_to_pose_encoding
from qvggt.eval.metrics.pose import pose_errors, pose_auc
from qvggt.model import build_model, get_preset


def caches(render, n_train=400):
    cats = list(DataConfig().train_categories())
    seeds = list(range(n_train))
    tr = SceneCache(build_cache("runs/issue4/cache", seeds, [cats[s % len(cats)] for s in seeds], render, 126, progress=False))
    hs = list(range(200000, 200032))
    ho = SceneCache(build_cache("runs/issue4/cache", hs, [CATEGORIES[s % 8] for s in hs], render, 126, progress=False))
    return tr, ho


def gt_batch(cache, idx, frames):
    b = cache.batch(idx)
    return select_frames(b, np.tile(np.asarray(frames), (len(idx), 1)))


def mean_pose(cache, frames, n=400):
    """Best-constant baseline: the mean training pose encoding per frame slot (quaternion renormalised)."""
    b = gt_batch(cache, list(range(n)), frames)
    enc = extri_intri_to_pose_encoding(b["extrinsics"], b["intrinsics"], (126, 126)).mean(0)
    enc[:, 3:7] = enc[:, 3:7] / enc[:, 3:7].norm(dim=-1, keepdim=True)
    return pose_encoding_to_extri_intri(enc, (126, 126))[0].numpy()


@torch.no_grad()
def errs(model, cache, idx, frames, const=None):
    out = {"model": [], "identity": [], "mean": []}
    for k in range(0, len(idx), 8):
        b = gt_batch(cache, idx[k:k + 8], frames)
        E = pose_encoding_to_extri_intri(model(b["images"])["pose_enc"], (126, 126))[0].numpy() if model is not None else None
        for j in range(b["images"].shape[0]):
            gt = b["extrinsics"][j].numpy()
            if E is not None:
                out["model"].append(pose_errors(E[j], gt))
            out["identity"].append(pose_errors(np.broadcast_to(np.eye(3, 4), gt.shape), gt))
            if const is not None:
                out["mean"].append(pose_errors(const, gt))
    res = {}
    for k, v in out.items():
        if v:
            r = np.concatenate([x[0] for x in v]); t = np.concatenate([x[1] for x in v])
            res[k] = (float(np.median(r)), float(np.median(t)), pose_auc(r, t, 30))
    return res


def load_scratch(path, dense, init_values=None):
    torch.manual_seed(0)
    cfg = get_preset("small").replace(**{"enable_track": False, "default_image_hw": (126, 126), "img_size": 126,
                                                 "enable_depth": dense, "enable_point": dense})
    if init_values is not None:
        cfg = cfg.replace(**{"init_values": init_values})
    m = build_model(cfg)
    m.load_state_dict(torch.load(path, weights_only=True))
    return m.eval()


def patch_flow(b, ps=14):
    """Ground-truth flow of frame 1's patch centres into frame 0 (renormalised batch: frame 0 is the identity).

    Returns (du, dv) [B, N] in image widths/heights, clamped to +-3, and ``ok`` [B, N]: the centre hits a surface
    in front of camera 0 (no occlusion test)."""
    B, S, _, H, W = b["images"].shape
    gh = H // ps
    c = torch.arange(gh) * ps + ps // 2
    pts = b["world_points"][:, 1][:, c][:, :, c].reshape(B, -1, 3)
    ok = b["valid_mask"][:, 1][:, c][:, :, c].reshape(B, -1) & (pts[..., 2] > 1e-4)
    K = b["intrinsics"][:, 0]
    z = pts[..., 2].clamp(min=1e-6)
    du = (K[:, None, 0, 0] * pts[..., 0] / z + K[:, None, 0, 2] - c.repeat(gh)[None].float()) / W
    dv = (K[:, None, 1, 1] * pts[..., 1] / z + K[:, None, 1, 2] - c.repeat_interleave(gh)[None].float()) / H
    return du.clamp(-3, 3), dv.clamp(-3, 3), ok


@torch.no_grad()
def pair_rotvecs(model, batch_fn, n, bs=8):
    """Rotation vectors (degrees, camera 0's axes) of frame 1 relative to frame 0: truth and prediction [n, 3] each,
    over the 2-frame batches ``batch_fn(indices)`` for indices 0..n-1 (the yaw probes' data)."""
    from scipy.spatial.transform import Rotation

    g, p = [], []
    for k in range(0, n, bs):
        b = batch_fn(list(range(k, min(n, k + bs))))
        E = pose_encoding_to_extri_intri(model(b["images"])["pose_enc"], (126, 126))[0].numpy()
        for j in range(len(E)):
            g.append(Rotation.from_matrix(b["extrinsics"][j, 1, :, :3].numpy()).as_rotvec(degrees=True))
            p.append(Rotation.from_matrix(E[j, 1, :, :3]).as_rotvec(degrees=True))
    return np.array(g), np.array(p)


def load_matcher(path):
    """A model trained with exp.py --att_w, as a matcher: ``fn(batch) -> [B, N]``, for each frame-1 patch the
    frame-0 patch its supervised head (head 0 of the last global layer) attends to most."""
    m = load_scratch(path, dense=False)
    qk = {}

    def grab(mod, args, kwargs):
        x, pos = args[0], kwargs.get("pos", args[1] if len(args) > 1 else None)
        B, N, C = x.shape
        qkv = mod.qkv(x).reshape(B, N, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k = mod.q_norm(qkv[0]), mod.k_norm(qkv[1])
        q, k = mod.rope(q, pos), mod.rope(k, pos)
        qk["qk"] = (q[:, 0], k[:, 0])

    m.aggregator.global_blocks[-1].attn.register_forward_pre_hook(grab, with_kwargs=True)

    @torch.no_grad()
    def argmax(b):
        m(b["images"])
        q, k = qk["qk"]
        P, s0 = q.shape[1] // 2, m.aggregator.patch_start_idx
        return (q[:, P + s0:] @ k[:, s0:P].transpose(-1, -2)).argmax(-1)

    return argmax


def grid_flow(best, g=9, ps=14, size=126):
    """Patch indices [B, N] of frame-0 matches -> the offsets (du, dv) [B, N] between patch centres, image widths."""
    own = torch.arange(g * g)
    return ((best % g) - (own % g)).float() * ps / size, ((best // g) - (own // g)).float() * ps / size


def match_index(b, g=9, ps=14, size=126):
    """Ground truth for :func:`load_matcher`: the frame-0 patch holding each frame-1 patch centre's point, and ok."""
    du, dv, ok = patch_flow(b, ps)
    own = torch.arange(g * g)
    u = ((own % g) * ps + ps // 2 + du * size).clamp(0, size - 1)
    v = ((own // g) * ps + ps // 2 + dv * size).clamp(0, size - 1)
    return (torch.floor(v / ps) * g + torch.floor(u / ps)).long(), ok


def load_oracle(name, flows):
    """An exp.py --oracle_flow model (NAME.pt + NAME_oracle_lin.pt) whose patch embedding adds the embedded flow
    ``flows["f"] = (du, dv, ok)`` [B, N] each of frame 1 (frame 0 gets zeros): set it before each forward."""
    model = load_scratch(f"{name}.pt", dense=False)
    lin = torch.nn.Linear(3, model.cfg.embed_dim)
    lin.load_state_dict(torch.load(f"{name}_oracle_lin.pt", weights_only=True))

    def hook(m, i, o):
        du, dv, ok = flows["f"]
        f1 = torch.stack([du * ok, dv * ok, ok.float()], -1)
        return o + lin(torch.stack([torch.zeros_like(f1), f1], 1)).reshape(du.shape[0] * 2, -1, o.shape[-1])

    model.aggregator.patch_embed.register_forward_hook(hook)
    return model
