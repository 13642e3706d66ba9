import time, torch
torch.set_num_threads(1)
from qvggt.config import TrainConfig
from qvggt.train.trainer import camera_forward, init_model
from qvggt.train.data import SceneCache
from qvggt.train.losses import vggt_loss
c = SceneCache("runs/cache/synthetic-a624560138487735")
m = init_model(TrainConfig()).train(); m.aggregator.gradient_checkpointing = False
b = c.batch([0, 1])
for name, fwd in (("full", lambda x: m(x)), ("camera_only", lambda x: camera_forward(m, x))):
    ts = []
    for i in range(6):
        t = time.perf_counter(); L = vggt_loss(fwd(b["images"]), b); m.zero_grad(); L["objective"].backward(); ts.append(time.perf_counter() - t)
    print(name, "s/step (median of last 5):", sorted(ts[1:])[2])
