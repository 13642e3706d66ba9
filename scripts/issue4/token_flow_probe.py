"""Do a trained model's patch tokens carry where their frame-0 match is, non-linearly? An MLP (scikit-learn) from
each frame-1 patch token (last aggregator layer, frozen) to its ground-truth flow (image widths), fitted on
training pairs, scored on held-out pairs, against a constant prediction and a linear map."""
import sys, numpy as np, torch
from sklearn.linear_model import Ridge
from sklearn.neural_network import MLPRegressor
torch.set_num_threads(1)
sys.path.insert(0, "scripts/issue4")
from exp_util import *  # noqa
from qvggt.train.data import SceneCache, build_cache


def samples(m, cache, n):
    feats = {}
    h = m.aggregator.register_forward_hook(lambda mod, i, o: feats.__setitem__("last", o[-1]))
    X, Y = [], []
    with torch.no_grad():
        for k in range(0, n, 8):
            b = gt_batch(cache, list(range(k, k + 8)), [0, 1])
            m(b["images"])
            du, dv, ok = patch_flow(b)
            tok = feats["last"][:, 1, m.aggregator.patch_start_idx:]
            X.append(tok[ok].numpy()); Y.append(torch.stack([du, dv], -1)[ok].numpy())
    h.remove()
    return np.concatenate(X), np.concatenate(Y)


cats = list(DataConfig().train_categories())
tr = SceneCache(build_cache("runs/issue4/cache", list(range(2000)), [cats[s % len(cats)] for s in range(2000)], 8, 126, progress=False))
hs = list(range(200000, 200128))
ho = SceneCache(build_cache("runs/issue4/cache", hs, [CATEGORIES[s % 8] for s in hs], 8, 126, progress=False))
for path in sys.argv[1:]:
    m = load_scratch(path, False)
    Xt, Yt = samples(m, tr, 400)
    Xh, Yh = samples(m, ho, 128)
    const = np.abs(Yh - np.median(Yt, 0)).mean()
    lin = np.abs(Ridge(alpha=1.0).fit(Xt, Yt).predict(Xh) - Yh).mean()
    mlp = MLPRegressor(hidden_layer_sizes=(256, 256), max_iter=60, early_stopping=True, random_state=0).fit(Xt, Yt)
    print(f"{path.split('/')[-1]}: held-out flow L1 (image widths) constant {const:.3f} | linear {lin:.3f} | "
          f"MLP {np.abs(mlp.predict(Xh) - Yh).mean():.3f}  ({len(Xt)} training patches)", flush=True)
