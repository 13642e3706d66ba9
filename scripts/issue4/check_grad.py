"""Gradient flow of the camera loss and collapse check of the committed model (scratch)."""
import numpy as np, torch
torch.set_num_threads(1)
from qvggt.train.data import SceneCache
from qvggt.train.losses import vggt_loss, LossWeights, camera_loss
from qvggt.train.trainer import init_model
from qvggt.config import TrainConfig
from qvggt.model import load_vggt
from qvggt.geometry.pose_encoding import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri
from qvggt.eval.metrics.pose import pose_errors

c = SceneCache("runs/cache/synthetic-a624560138487735")
b = c.batch([0, 1])
for name, model in [("init", init_model(TrainConfig(preset="small", image_size=126))), ("trained", load_vggt("models/small/model.safetensors").float())]:
    model.train(); model.aggregator.gradient_checkpointing = False
    preds = model(b["images"])
    gt = extri_intri_to_pose_encoding(b["extrinsics"], b["intrinsics"], (126, 126))
    l = camera_loss(preds["pose_enc_list"], gt, torch.ones(2, dtype=torch.bool), LossWeights())["loss_camera"]
    model.zero_grad(); l.backward()
    g = {n: (p.grad.norm().item() if p.grad is not None else None) for n, p in model.named_parameters()}
    print(name, "cam loss", l.item())
    for k in ["aggregator.camera_token", "aggregator.register_token", "camera_head.empty_pose_tokens", "camera_head.pose_branch.fc2.weight",
              "camera_head.trunk.0.attn.qkv.weight", "camera_head.embed_pose.weight", "aggregator.global_blocks.7.mlp.fc2.weight", "aggregator.frame_blocks.0.attn.qkv.weight",
              "aggregator.patch_embed.blocks.0.attn.qkv.weight" ]:
        print(f"   {k:50s} {g.get(k)}")
    print("   none-grad params:", [n for n, v in g.items() if v is None][:10])
