"""Which rotation components a 2-frame model predicts: per-axis regression of the predicted rotation vector of
frame 1 (camera 0's axes, degrees) on the truth over 64 held-out pairs (frames 0-1 of 8-frame trajectories).
Axis 0 (camera x: elevation change) is visible in one image (the ground's tilt); axis 1 (camera y: yaw around the
scene) needs the two views compared."""
import sys, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from exp_util import *  # noqa
from qvggt.train.data import SceneCache, build_cache
hs = list(range(200000, 200064))
ho = SceneCache(build_cache("runs/issue4/cache", hs, [CATEGORIES[s % 8] for s in hs], 8, 126, progress=False))
for path in sys.argv[1:]:
    m = load_scratch(path, False)
    g, p = pair_rotvecs(m, lambda idx: gt_batch(ho, idx, [0, 1]), 64)
    print(path.split("/")[-1], " | ".join(
        f"axis {a}: corr {np.corrcoef(g[:, a], p[:, a])[0, 1]:.2f} slope {np.polyfit(g[:, a], p[:, a], 1)[0]:.2f}"
        for a in range(3)), flush=True)
