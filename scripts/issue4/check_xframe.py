import torch
torch.set_num_threads(1)
from qvggt.model import load_vggt
from qvggt.train.data import SceneCache
m = load_vggt("models/small/model.safetensors").float().eval()
c = SceneCache("runs/cache/synthetic-a624560138487735")
b = c.batch([0, 1])["images"]
x1 = b[0].clone()                 # scene 0 frames 0..3
x2 = b[0].clone(); x2[0] = b[1, 0]  # frame 0 swapped for another scene's
with torch.no_grad():
    o1 = m(x1[None]); o2 = m(x2[None])
    l1 = m.aggregator(x1[None]); l2 = m.aggregator(x2[None])
print("pose_enc frames 1..3 change when frame 0 changes:", (o1["pose_enc"][0, 1:] - o2["pose_enc"][0, 1:]).abs().max().item())
print("pose_enc frame1 scene0:", o1["pose_enc"][0, 1].numpy().round(3))
print("pose_enc frame1 w/ swapped f0:", o2["pose_enc"][0, 1].numpy().round(3))
print("last-layer camera token frame1 rel change:", ((l1[-1][0, 1, 0] - l2[-1][0, 1, 0]).norm() / l1[-1][0, 1, 0].norm()).item())
print("depth frame1 rel change:", ((o1["depth"][0, 1] - o2["depth"][0, 1]).norm() / o1["depth"][0, 1].norm()).item())
print("points frame1 rel change:", ((o1["world_points"][0, 1] - o2["world_points"][0, 1]).norm() / o1["world_points"][0, 1].norm()).item())
# Per-scene variation of frame-1 predictions across 16 scenes vs GT
bb = c.batch(list(range(16)))
with torch.no_grad():
    o = m(bb["images"])
print("pred quat frame1 over 16 scenes std:", o["pose_enc"][:, 1, 3:7].std(0).numpy().round(3))
