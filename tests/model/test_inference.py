"""infer_scene: one scene through the model as numpy, cameras decoded (the step predict and eval share)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvggt.geometry.pose_encoding import pose_encoding_to_extri_intri
from qvggt.model import build_model, get_preset
from qvggt.model.inference import infer_scene


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("tiny")).eval()


def test_outputs_drop_the_batch_dim_and_decode_the_cameras(tiny) -> None:
    images = torch.rand(3, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    out = infer_scene(tiny, images)
    with torch.no_grad():
        ref = tiny(images[None])
    assert out["depth"].shape == (3, 56, 70, 1) and out["world_points"].shape == (3, 56, 70, 3)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in out.values())
    np.testing.assert_allclose(out["pose_enc"], ref["pose_enc"][0].numpy(), rtol=1e-5, atol=1e-6)
    extrinsic, intrinsic = pose_encoding_to_extri_intri(ref["pose_enc"], (56, 70))
    np.testing.assert_allclose(out["extrinsic"], extrinsic[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["intrinsic"], intrinsic[0].numpy(), rtol=1e-5, atol=1e-5)
    assert out["intrinsic"].shape == (3, 3, 3) and np.allclose(out["intrinsic"][:, 2], [0, 0, 1])


def test_a_batch_of_scenes_is_refused(tiny) -> None:
    with pytest.raises(ValueError, match=r"one scene's images as \[S, 3, H, W\]"):
        infer_scene(tiny, torch.rand(1, 2, 3, 56, 70))
