"""How wide are the benchmark's baselines for patch matching? Per frame pair (0, k) of held-out scenes rendered with
R frames: the identity rotation error, the fraction of frame-k patch centres whose surface point projects inside
frame 0 (an upper bound on what any matcher can find), a matcher's top-1 on those patches (argv[2], an exp.py
--att_w model), and the oracle camera path (argv[1], e21) fed ground-truth flow.

Usage: python scripts/issue4/wide_probe.py runs/issue4/e21_oracle runs/issue4/e17_att3.pt
"""
import sys

import numpy as np
import torch
from scipy.spatial.transform import Rotation

sys.path.insert(0, "scripts/issue4")
from exp_util import gt_batch, load_matcher, load_oracle, match_index, pair_rotvecs, patch_flow  # noqa: E402
from qvggt.data.synthetic import CATEGORIES  # noqa: E402
from qvggt.train.data import SceneCache, build_cache  # noqa: E402

torch.set_num_threads(1)
PS, G = 14, 9
CUR: dict = {}
model = load_oracle(sys.argv[1], CUR)
matcher = load_matcher(sys.argv[2])
own_u = (torch.arange(G * G) % G).float() * PS + PS // 2
own_v = (torch.arange(G * G) // G).float() * PS + PS // 2
seeds = list(range(200000, 200064))
for render, pairs in ((8, [1, 2, 3]), (4, [1, 2, 3])):
    ho = SceneCache(build_cache("runs/issue4/cache", seeds, [CATEGORIES[s % 8] for s in seeds], render, 126, progress=False))
    for k in pairs:
        inside, hit, tot = [], 0, 0
        for j in range(0, len(seeds), 8):
            b = gt_batch(ho, list(range(j, j + 8)), [0, k])
            du, dv, ok = patch_flow(b)
            u, v = own_u + du * 126, own_v + dv * 126
            ins = ok & (u >= 0) & (u < 126) & (v >= 0) & (v < 126)
            inside.append(ins.float().mean().item())
            tgt, _ = match_index(b)
            hit += int(((matcher(b) == tgt) & ins).sum())
            tot += int(ins.sum())

        def batch_fn(idx, k=k):
            b = gt_batch(ho, idx, [0, k])
            CUR["f"] = patch_flow(b)
            return b

        g, pr = pair_rotvecs(model, batch_fn, len(seeds))
        err = [np.degrees(np.linalg.norm((Rotation.from_rotvec(x, degrees=True).inv() * Rotation.from_rotvec(y, degrees=True)).as_rotvec())) for x, y in zip(pr, g)]
        print(f"render {render} pair (0,{k}): identity {np.median(np.linalg.norm(g, axis=1)):5.1f} deg | in-view patches "
              f"{np.mean(inside):.2f} | matcher top-1 {hit / max(tot, 1):.2f} | oracle GT flow {np.median(err):5.1f} deg "
              f"yaw corr {np.corrcoef(g[:, 1], pr[:, 1])[0, 1]:.2f}", flush=True)
