"""A 2-frame-trained scratch model on the 4-frame benchmark protocol (32 held-out scenes, 4-frame trajectories)."""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from ev import heldout_cache, pose_eval, fmt
from exp_util import load_scratch
ho = heldout_cache(32)
for spec in sys.argv[1:]:
    path, dense, iv = spec.split(":")
    m = load_scratch(path, dense == "1", None if iv == "-" else float(iv))
    print(path.split("/")[-1], fmt(pose_eval(m, ho, list(range(32)))))
