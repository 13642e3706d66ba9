import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from ev import heldout_cache, pose_eval, fmt
from qvggt.train.data import SceneCache
from qvggt.model import load_vggt
m = load_vggt("models/small/model.safetensors").float()
tr = SceneCache("runs/cache/synthetic-a624560138487735")
print("train(0-31) ", fmt(pose_eval(m, tr, list(range(32)))))
ho = heldout_cache(32)
print("heldout(32)", fmt(pose_eval(m, ho, list(range(32)))))
