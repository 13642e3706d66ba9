"""Re-evaluate saved scratch models against identity AND the best constant (mean training pose) baseline."""
import sys, json, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from exp_util import *  # noqa
render, frames = int(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")]
tr, ho = caches(render)
const = mean_pose(tr, frames)
for spec in sys.argv[3:]:
    path, dense, iv = spec.split(":")
    m = load_scratch(path, dense == "1", None if iv == "-" else float(iv)) if path != "none" else None
    for name, c, idx in (("train", tr, list(range(32))), ("train64-400", tr, list(range(336, 400))), ("heldout", ho, list(range(32)))):
        r = errs(m, c, idx, frames, const)
        print(path, name, " ".join(f"{k}: rot {v[0]:.1f} trans {v[1]:.1f} auc30 {v[2]:.1f}" for k, v in r.items()))
