"""Window [0,1] of 128 held-out 8-frame scenes (128 pairs): model vs identity vs best constant."""
import sys, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from exp_util import *  # noqa
from qvggt.train.data import SceneCache, build_cache
tr, _ = caches(8)
hs = list(range(200000, 200128))
ho = SceneCache(build_cache("runs/issue4/cache", hs, [CATEGORIES[s % 8] for s in hs], 8, 126, progress=False))
const = mean_pose(tr, [0, 1])
for spec in sys.argv[1:]:
    path, dense, iv = spec.split(":")
    m = load_scratch(path, dense == "1", None if iv == "-" else float(iv))
    r = errs(m, ho, list(range(128)), [0, 1], const)
    print(path.split("/")[-1], " | ".join(f"{k}: rot {v[0]:.1f} trans {v[1]:.1f} auc30 {v[2]:.1f}" for k, v in r.items()), flush=True)
