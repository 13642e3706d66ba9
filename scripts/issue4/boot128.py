"""Paired bootstrap (2,000 resamples) of median rotation error, model - identity, on 128 held-out pairs."""
import sys, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from exp_util import *  # noqa
from qvggt.train.data import SceneCache, build_cache
hs = list(range(200000, 200128))
ho = SceneCache(build_cache("runs/issue4/cache", hs, [CATEGORIES[s % 8] for s in hs], 8, 126, progress=False))
for spec in sys.argv[1:]:
    path, dense, iv = spec.split(":")
    m = load_scratch(path, dense == "1", None if iv == "-" else float(iv))
    rm, ri = [], []
    with torch.no_grad():
        for k in range(0, 128, 8):
            b = gt_batch(ho, list(range(k, k + 8)), [0, 1])
            E = pose_encoding_to_extri_intri(m(b["images"])["pose_enc"], (126, 126))[0].numpy()
            for j in range(8):
                gt = b["extrinsics"][j].numpy()
                rm.append(pose_errors(E[j], gt)[0][0]); ri.append(pose_errors(np.broadcast_to(np.eye(3, 4), gt.shape), gt)[0][0])
    rm, ri = np.array(rm), np.array(ri)
    rng = np.random.default_rng(0)
    d = [np.median(rm[i]) - np.median(ri[i]) for i in (rng.integers(0, 128, 128) for _ in range(2000))]
    print(path.split("/")[-1], f"median {np.median(rm):.1f} vs identity {np.median(ri):.1f}; diff 95% CI [{np.percentile(d, 2.5):+.1f}, {np.percentile(d, 97.5):+.1f}]; pairs better than identity {np.mean(rm < ri) * 100:.0f}%")
