"""Issue 4 bug checks on real data (scratch)."""
import numpy as np, torch
torch.set_num_threads(1)
from qvggt.data.synthetic import make_scene
from qvggt.geometry.pose_encoding import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri
from qvggt.eval.metrics.pose import pose_errors
from qvggt.train.data import SceneCache

for seed in [0, 1, 2, 3, 4, 5, 6, 7, 200000, 200001]:
    sc = make_scene(seed, 4, 126, 126).normalized()
    E = torch.from_numpy(sc.extrinsics).double(); K = torch.from_numpy(sc.intrinsics).double()
    enc = extri_intri_to_pose_encoding(E, K, (126, 126)).double()
    E2, K2 = pose_encoding_to_extri_intri(enc, (126, 126))
    # unproject depth with GT cams -> world points (frame 0 coords)
    S, H, W = sc.depth.shape
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    err_pts = 0.0
    for i in range(S):
        k = sc.intrinsics[i].astype(np.float64)
        cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1) * sc.depth[i][..., None]
        R, t = sc.extrinsics[i, :, :3].astype(np.float64), sc.extrinsics[i, :, 3].astype(np.float64)
        world = (cam - t) @ R  # R^T (x - t)
        m = sc.valid_mask[i]
        err_pts = max(err_pts, float(np.abs(world[m] - sc.world_points[i][m]).max()))
    pts0 = sc.world_points[sc.valid_mask]
    re, te = pose_errors(E2.numpy(), sc.extrinsics)
    print(f"{seed} {sc.category:12s} {sc.trajectory:10s} enc roundtrip E {float((E2-E).abs().max()):.1e} K {float((K2-K).abs().max()):.1e}"
          f" unproj {err_pts:.1e} mean|p| {np.linalg.norm(pts0,axis=-1).mean():.4f} rot_err(dec) {re.max():.2e} trans {te.max():.2e}"
          f" |T| {enc[:, :3].norm(dim=-1).numpy().round(2)} q_w {enc[:, 6].numpy().round(2)} fov {np.degrees(enc[0,7].item()):.1f}")

# Cache agrees with fresh normalized scene
c = SceneCache("runs/cache/synthetic-a624560138487735")
print("cache meta", {k: c.meta[k] for k in ("num_frames", "size")}, "n", len(c), c.meta["seeds"][:3], c.meta["categories"][:3])
b = c.batch([0, 1])
sc = make_scene(c.meta["seeds"][1], 4, 126, 126, category=c.meta["categories"][1]).normalized()
print("cache vs fresh extr", float((b["extrinsics"][1] - torch.from_numpy(sc.extrinsics)).abs().max()),
      "points", float((b["world_points"][1] - torch.from_numpy(sc.world_points)).abs().max()))
