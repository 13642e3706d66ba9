"""yaw_probe.py on training pairs (seeds 0-127 of the 2,000-scene cache) and held-out pairs (seeds 200000-200127):
is the yaw learned and not transferred (memorised), or not learned at all? Also the yaw's sign agreement."""
import sys, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from exp_util import *  # noqa
from qvggt.train.data import SceneCache, build_cache
cats = list(DataConfig().train_categories())
tr_seeds = list(range(2000))
tr = SceneCache(build_cache("runs/issue4/cache", tr_seeds, [cats[s % len(cats)] for s in tr_seeds], 8, 126, progress=False))
hs = list(range(200000, 200128))
ho = SceneCache(build_cache("runs/issue4/cache", hs, [CATEGORIES[s % 8] for s in hs], 8, 126, progress=False))
for path in sys.argv[1:]:
    m = load_scratch(path, False)
    for name, cache in (("train", tr), ("held-out", ho)):
        g, p = pair_rotvecs(m, lambda idx: gt_batch(cache, idx, [0, 1]), 128)
        sign = np.mean(np.sign(g[:, 1]) == np.sign(p[:, 1]))
        print(path.split("/")[-1], name, " | ".join(
            f"axis {a}: corr {np.corrcoef(g[:, a], p[:, a])[0, 1]:.2f} slope {np.polyfit(g[:, a], p[:, a], 1)[0]:.2f}"
            for a in range(2)), f"| yaw sign agreement {sign:.2f} | pred yaw std {p[:, 1].std():.1f} gt {g[:, 1].std():.1f}", flush=True)
