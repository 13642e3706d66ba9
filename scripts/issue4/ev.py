"""Scratch pose evaluation: median pairwise rot/trans error of a model vs identity on cached scenes."""
import sys, numpy as np, torch
from qvggt.train.data import SceneCache, build_cache
from qvggt.geometry.pose_encoding import pose_encoding_to_extri_intri, extri_intri_to_pose_encoding
from qvggt.eval.metrics.pose import pose_errors, pose_auc
from qvggt.data.synthetic import CATEGORIES


def heldout_cache(n=32, frames=4, size=126, cats=None):
    seeds = list(range(200000, 200000 + n))
    cs = [CATEGORIES[s % 8] for s in seeds] if cats is None else [cats[i % len(cats)] for i in range(n)]
    return SceneCache(build_cache("runs/issue4/cache", seeds, cs, frames, size, progress=False))


@torch.no_grad()
def pose_eval(model, cache, idx, bs=4):
    model.eval()
    rs, ts, ri, ti, per = [], [], [], [], []
    encs, gts = [], []
    for k in range(0, len(idx), bs):
        b = cache.batch(list(idx[k:k + bs]))
        out = model(b["images"])
        E, _ = pose_encoding_to_extri_intri(out["pose_enc"], (b["images"].shape[-2:]))
        encs.append(out["pose_enc"]); gts.append(extri_intri_to_pose_encoding(b["extrinsics"], b["intrinsics"], b["images"].shape[-2:]))
        for j in range(E.shape[0]):
            r, t = pose_errors(E[j].numpy(), b["extrinsics"][j].numpy())
            S = E.shape[1]
            r0, t0 = pose_errors(np.broadcast_to(np.eye(3, 4), (S, 3, 4)), b["extrinsics"][j].numpy())
            rs.append(r); ts.append(t); ri.append(r0); ti.append(t0)
    r, t, r0, t0 = map(np.concatenate, (rs, ts, ri, ti))
    enc, gt = torch.cat(encs), torch.cat(gts)
    return {
        "rot_med": float(np.median(r)), "trans_med": float(np.median(t)), "auc30": pose_auc(r, t, 30),
        "id_rot_med": float(np.median(r0)), "id_trans_med": float(np.median(t0)),
        "enc_l1": float((enc - gt)[..., :7].abs().mean()),
        "mean_enc_l1": float((gt - gt.mean((0,), keepdim=True))[..., :7].abs().mean()),  # per-frame-slot mean predictor
        "pred_std_q": float(enc[:, 1:, 3:7].std(0).mean()), "gt_std_q": float(gt[:, 1:, 3:7].std(0).mean()),
    }


def fmt(d):
    return " ".join(f"{k}={v:.3f}" for k, v in d.items())
