"""Pooled over all adjacent windows of the 8-frame trajectories (7 pairs/scene), per split, with the mean baseline."""
import sys, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from exp_util import *  # noqa
from qvggt.eval.metrics.pose import pose_auc
S = int(sys.argv[1])
tr, ho = caches(8)
windows = [list(range(k, k + S)) for k in range(0, 8 - S + 1)]
for spec in sys.argv[2:]:
    path, dense, iv = spec.split(":")
    m = load_scratch(path, dense == "1", None if iv == "-" else float(iv))
    for name, c, idx in (("train[0:32]", tr, list(range(32))), ("heldout", ho, list(range(32)))):
        acc = {}
        for w in windows:
            const = mean_pose(tr, w, 200)
            r = errs(m, c, idx, w, const)
            for k, v in r.items():
                acc.setdefault(k, []).append(v)
        print(path.split("/")[-1], name, " | ".join(f"{k}: rot {np.mean([x[0] for x in v]):.1f} trans {np.mean([x[1] for x in v]):.1f}" for k, v in acc.items()), flush=True)
