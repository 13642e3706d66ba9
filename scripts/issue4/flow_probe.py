"""Is the yaw in the correspondences? Ridge regression from the ground-truth patch flow field (each frame-1 patch
centre's match in frame 0, the target of exp.py --att_w) to the relative rotation vector, fitted on 2,000 training
pairs, scored on 128 held-out pairs (frames 0-1 of 8-frame trajectories, as yaw_probe.py)."""
import sys, numpy as np, torch
from scipy.spatial.transform import Rotation
from sklearn.linear_model import RidgeCV
torch.set_num_threads(2)
sys.path.insert(0, "scripts/issue4")
from exp_util import *  # noqa
from qvggt.train.data import SceneCache, build_cache


def flow_features(b):
    du, dv, ok = patch_flow(b)
    return torch.cat([torch.where(ok, du, 0), torch.where(ok, dv, 0), ok.float()], 1).numpy()


def dataset(cache, n):
    X, Y = [], []
    for k in range(0, n, 16):
        b = gt_batch(cache, list(range(k, min(n, k + 16))), [0, 1])
        X.append(flow_features(b))
        Y += [Rotation.from_matrix(e[1, :, :3].numpy()).as_rotvec(degrees=True) for e in b["extrinsics"]]
    return np.concatenate(X), np.array(Y)


cats = list(DataConfig().train_categories())
tr = SceneCache(build_cache("runs/issue4/cache", list(range(2000)), [cats[s % len(cats)] for s in range(2000)], 8, 126, progress=False))
hs = list(range(200000, 200128))
ho = SceneCache(build_cache("runs/issue4/cache", hs, [CATEGORIES[s % 8] for s in hs], 8, 126, progress=False))
Xt, Yt = dataset(tr, 2000)
Xh, Yh = dataset(ho, 128)
reg = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(Xt, Yt)
P = reg.predict(Xh)
for a in range(3):
    print(f"axis {a}: held-out corr {np.corrcoef(Yh[:, a], P[:, a])[0, 1]:.2f} slope {np.polyfit(Yh[:, a], P[:, a], 1)[0]:.2f}"
          f" sign agreement {np.mean(np.sign(Yh[:, a]) == np.sign(P[:, a])):.2f}")
err = [np.degrees(np.linalg.norm((Rotation.from_rotvec(p, degrees=True).inv() * Rotation.from_rotvec(g, degrees=True)).as_rotvec()))
       for p, g in zip(P, Yh)]
idn = np.linalg.norm(Yh, axis=1)
print(f"held-out median rotation error: linear-on-GT-flow {np.median(err):.1f} deg, identity {np.median(idn):.1f} deg")
