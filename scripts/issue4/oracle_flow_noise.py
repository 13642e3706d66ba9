"""How good must the correspondences be? The oracle-flow model (exp.py --oracle_flow, e21) fed with degraded flows.

Usage: python scripts/issue4/oracle_flow_noise.py runs/issue4/e21_oracle   (needs NAME.pt and NAME_oracle_lin.pt)
Held-out frames 0-1 of 128 8-frame scenes (seeds 200000-200127, all categories), median relative-rotation error.
"""
import sys

import numpy as np
import torch
from scipy.spatial.transform import Rotation

sys.path.insert(0, "scripts/issue4")
from exp_util import gt_batch, grid_flow, load_matcher, load_oracle, match_index, pair_rotvecs, patch_flow  # noqa: E402
from qvggt.data.synthetic import CATEGORIES  # noqa: E402
from qvggt.train.data import SceneCache, build_cache  # noqa: E402

torch.set_num_threads(1)
PS, G = 14, 9
CUR: dict = {}
model = load_oracle(sys.argv[1], CUR)
seeds = list(range(200000, 200128))
ho = SceneCache(build_cache("runs/issue4/cache", seeds, [CATEGORIES[s % 8] for s in seeds], 8, 126, progress=False))


def ncc_flow(b):
    """Each frame-1 patch's best raw-pixel NCC match among frame 0's patches -> patch-grid offset (widths)."""
    img = b["images"]  # [B, 2, 3, H, W]
    B = img.shape[0]
    p = img.unfold(3, PS, PS).unfold(4, PS, PS)  # [B, 2, 3, G, G, PS, PS]
    p = p.permute(0, 1, 3, 4, 2, 5, 6).reshape(B, 2, G * G, -1)
    p = p - p.mean(-1, keepdim=True)
    p = p / p.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    best = torch.einsum("bnc,bmc->bnm", p[:, 1], p[:, 0]).argmax(-1)  # [B, N]
    return (*grid_flow(best), best)


def flows(b, mode, rng):
    du, dv, ok = patch_flow(b)
    if mode == "gt":
        return du, dv, ok
    own_u = (torch.arange(G * G) % G).float() * PS + PS // 2
    own_v = (torch.arange(G * G) // G).float() * PS + PS // 2
    if mode == "gt_grid":  # the match's patch centre instead of its exact position (what patch matching can give)
        u = (own_u + du * 126).clamp(0, 125)
        v = (own_v + dv * 126).clamp(0, 125)
        return (torch.floor(u / PS) * PS + PS // 2 - own_u) / 126, (torch.floor(v / PS) * PS + PS // 2 - own_v) / 126, ok
    if mode.startswith("gt_out"):  # a fraction of patches get a random frame-0 patch instead of their match
        frac = float(mode[6:])
        bad = torch.from_numpy(rng.random(du.shape) < frac)
        rnd = torch.from_numpy(rng.integers(0, G * G, du.shape))
        ru = ((rnd % G).float() * PS + PS // 2 - own_u) / 126
        rv = ((rnd // G).float() * PS + PS // 2 - own_v) / 126
        return torch.where(bad, ru, du), torch.where(bad, rv, dv), ok
    if mode.startswith("learned"):  # the argmax of a trained matcher's supervised head (exp.py --att_w), last layer
        du, dv = grid_flow(matcher_argmax(b))
        return du, dv, ok if mode == "learned" else torch.ones_like(ok)
    if mode == "ncc":
        nu, nv, _ = ncc_flow(b)
        return nu, nv, b["valid_mask"][:, 1][:, PS // 2 :: PS][:, :, PS // 2 :: PS].reshape(du.shape)
    raise ValueError(mode)



# The matcher: a model trained with --att_w (argv[2], e.g. runs/issue4/e17_att3.pt), head 0 of its last global layer.
matcher_argmax = load_matcher(sys.argv[2]) if len(sys.argv) > 2 else None


def matcher_accuracy(n=128):
    hit, tot = 0, 0
    for k in range(0, n, 8):
        b = gt_batch(ho, list(range(k, k + 8)), [0, 1])
        tgt, ok = match_index(b)
        hit += int(((matcher_argmax(b) == tgt) & ok).sum())
        tot += int(ok.sum())
    return hit / tot


def ncc_accuracy(n=128):
    hit, tot = 0, 0
    for k in range(0, n, 8):
        b = gt_batch(ho, list(range(k, k + 8)), [0, 1])
        tgt, ok = match_index(b)
        _, _, best = ncc_flow(b)
        hit += int(((best == tgt) & ok).sum())
        tot += int(ok.sum())
    return hit / tot


print(f"raw-pixel NCC patch matching, top-1 on held-out pairs: {ncc_accuracy():.2f}")
modes = ["gt", "gt_grid", "gt_out0.3", "gt_out0.6", "ncc"]
if matcher_argmax is not None:
    print(f"learned matcher {sys.argv[2]}: top-1 (frame-0 patches only) on held-out pairs: {matcher_accuracy():.2f}")
    modes = ["learned", "learned_noviz"]
for mode in modes:
    rng = np.random.default_rng(0)

    def batch_fn(idx, mode=mode, rng=rng):
        b = gt_batch(ho, idx, [0, 1])
        CUR["f"] = flows(b, mode, rng)
        return b

    g, pr = pair_rotvecs(model, batch_fn, 128)
    err = [np.degrees(np.linalg.norm((Rotation.from_rotvec(x, degrees=True).inv() * Rotation.from_rotvec(y, degrees=True)).as_rotvec())) for x, y in zip(pr, g)]
    print(f"{mode:10s} held-out rot median {np.median(err):5.1f} deg (identity {np.median(np.linalg.norm(g, axis=1)):.1f}) | "
          f"yaw corr {np.corrcoef(g[:, 1], pr[:, 1])[0, 1]:.2f}", flush=True)
