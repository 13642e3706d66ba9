"""Which rotation components a 2-frame model predicts: per-axis regression of the predicted rotation vector of
frame 1 (camera 0's axes, degrees) on the truth over 64 held-out pairs (frames 0-1 of 8-frame trajectories).
Axis 0 (camera x: elevation change) is visible in one image (the ground's tilt); axis 1 (camera y: yaw around the
scene) needs the two views compared."""
import sys, numpy as np, torch
from scipy.spatial.transform import Rotation
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from exp_util import *  # noqa
from qvggt.train.data import SceneCache, build_cache
from qvggt.geometry.pose_encoding import pose_encoding_to_extri_intri
hs = list(range(200000, 200064))
ho = SceneCache(build_cache("runs/issue4/cache", hs, [CATEGORIES[s % 8] for s in hs], 8, 126, progress=False))
for path in sys.argv[1:]:
    m = load_scratch(path, False)
    g, p = [], []
    with torch.no_grad():
        for k in range(0, 64, 8):
            b = gt_batch(ho, list(range(k, k + 8)), [0, 1])
            E = pose_encoding_to_extri_intri(m(b["images"])["pose_enc"], (126, 126))[0].numpy()
            for j in range(8):
                g.append(Rotation.from_matrix(b["extrinsics"][j, 1, :, :3].numpy()).as_rotvec(degrees=True))
                p.append(Rotation.from_matrix(E[j, 1, :, :3]).as_rotvec(degrees=True))
    g, p = np.array(g), np.array(p)
    print(path.split("/")[-1], " | ".join(
        f"axis {a}: corr {np.corrcoef(g[:, a], p[:, a])[0, 1]:.2f} slope {np.polyfit(g[:, a], p[:, a], 1)[0]:.2f}"
        for a in range(3)), flush=True)
