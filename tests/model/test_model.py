"""Behaviour of the VGGT forward on small presets: shapes, invariances, inference options, input errors."""

from __future__ import annotations

import pytest
import torch
from qvggt_testing import rel_l2

from qvggt.model import VGGTConfig, build_model, get_preset


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("tiny")).eval()


def _images(S: int = 3, H: int = 56, W: int = 70, B: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, S, 3, H, W, generator=torch.Generator().manual_seed(seed))


def test_output_shapes(tiny) -> None:
    images = _images(S=3, H=56, W=70)
    q = torch.tensor([[[10.0, 20.0], [30.5, 40.0]]])
    with torch.no_grad():
        out = tiny(images, q)
    assert out["pose_enc"].shape == (1, 3, 9)
    assert len(out["pose_enc_list"]) == tiny.cfg.camera_iterations
    assert out["depth"].shape == (1, 3, 56, 70, 1)
    assert out["depth_conf"].shape == (1, 3, 56, 70)
    assert out["world_points"].shape == (1, 3, 56, 70, 3)
    assert out["world_points_conf"].shape == (1, 3, 56, 70)
    assert out["track"].shape == (1, 3, 2, 2)
    assert out["vis"].shape == out["conf"].shape == (1, 3, 2)
    # Activations: depth = exp(.) > 0, confidences = 1 + exp(.) > 1, field of view through ReLU >= 0.
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all() and (out["world_points_conf"] > 1).all()
    assert (out["pose_enc"][..., 7:] >= 0).all()
    assert ((out["vis"] >= 0) & (out["vis"] <= 1)).all()


def test_unbatched_input_is_batch_of_one(tiny) -> None:
    images = _images(S=2)
    with torch.no_grad():
        a = tiny(images)["depth"]
        b = tiny(images[0])["depth"]
    assert torch.equal(a, b)


def test_batch_items_are_independent(tiny) -> None:
    x1, x2 = _images(S=2, seed=1), _images(S=2, seed=2)
    with torch.no_grad():
        both = tiny(torch.cat([x1, x2]))
        one = tiny(x2)
    assert rel_l2(both["world_points"][1:], one["world_points"]) < 1e-5
    assert rel_l2(both["pose_enc"][1:], one["pose_enc"]) < 1e-5


def test_equivariant_to_order_of_non_reference_frames(tiny) -> None:
    """Frame 0 is the reference; frames 1.. share one token slot, so permuting them permutes the outputs."""
    images = _images(S=4, seed=3)
    perm = [0, 3, 1, 2]
    with torch.no_grad():
        a = tiny(images)
        b = tiny(images[:, perm])
    for key in ("pose_enc", "depth", "world_points", "world_points_conf"):
        assert rel_l2(b[key], a[key][:, perm]) < 1e-5, key


def test_keeping_only_read_layers_and_chunking_change_nothing(tiny) -> None:
    images = _images(S=3, seed=4)
    with torch.no_grad():
        ref = tiny(images, keep_all_layers=True, frames_chunk_size=100)
        lean = tiny(images, keep_all_layers=False, frames_chunk_size=1)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert torch.allclose(ref[key], lean[key], rtol=1e-5, atol=1e-6), key


def test_aggregator_keeps_only_requested_layers(tiny) -> None:
    layers = tiny.aggregator(_images(S=2), keep_layers=(1, 3))
    assert [i for i, t in enumerate(layers) if t is not None] == [1, 3]
    assert layers[3].shape[-1] == 2 * tiny.cfg.embed_dim


def test_bfloat16_autocast_path_is_close_to_fp32(tiny) -> None:
    images = _images(S=2, seed=5)
    with torch.no_grad():
        ref = tiny(images)
        bf = tiny(images, dtype=torch.bfloat16)
    # Heads run in fp32: outputs come back fp32 and close to the fp32 run.
    assert bf["depth"].dtype == torch.float32
    assert rel_l2(bf["depth"], ref["depth"]) < 5e-2
    assert rel_l2(bf["pose_enc"], ref["pose_enc"]) < 5e-2


def test_gradients_reach_every_used_parameter() -> None:
    model = build_model(get_preset("tiny").replace(enable_track=False))
    model.train()
    out = model(_images(S=2, H=28, W=42))
    loss = out["depth"].mean() + out["world_points"].mean() + out["pose_enc"].mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # The DINOv2 mask token is unused at inference; the camera head's first pose token embedding is used.
    assert no_grad == [], no_grad


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 2, 3, 57, 70), "multiple of the patch size"),
        ((1, 2, 4, 56, 70), r"\[B, S, 3, H, W\]"),
        ((3, 56, 70), "images must be"),
    ],
)
def test_bad_image_shapes_raise(tiny, shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(torch.rand(shape))


def test_bad_query_points_raise(tiny) -> None:
    with pytest.raises(ValueError, match="query_points"):
        tiny(_images(S=2), torch.rand(1, 3, 3))


def test_config_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VGGTConfig(embed_dim=100, num_heads=16)
    with pytest.raises(ValueError, match="out of range"):
        VGGTConfig(depth=4, intermediate_layer_idx=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(TypeError, match="not_a_field"):
        VGGTConfig(not_a_field=1)  # type: ignore[call-arg]
    for kwargs, match in (
        ({"depth": 0}, r"VGGTConfig.depth must be > 0"),
        ({"depth": True}, r"VGGTConfig.depth must be an int"),
        ({"num_register_tokens": -1}, r"VGGTConfig.num_register_tokens must be >= 0"),
        ({"mlp_ratio": float("nan")}, r"VGGTConfig.mlp_ratio must be a finite number"),
        ({"patch_embed": "vit"}, r"VGGTConfig.patch_embed must be one of \['dinov2', 'conv'\]"),
        ({"default_image_hw": (392,)}, r"VGGTConfig.default_image_hw must be a sequence of 2 ints"),
        ({"qk_norm": 1}, r"VGGTConfig.qk_norm must be a bool"),
    ):
        with pytest.raises(ValueError, match=match):
            VGGTConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown VGGT config field\(s\) \['not_a_field'\]"):
        VGGTConfig.from_dict({"not_a_field": 1})
    with pytest.raises(ValueError, match="unknown VGGT config field"):
        get_preset("tiny").replace(dept=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):  # a copy is validated too
        get_preset("tiny").replace(num_heads=3)
    with pytest.raises(ValueError, match="not valid JSON"):
        VGGTConfig.from_json("{depth: 4")


def test_config_json_round_trip_widens_ints_and_lists() -> None:
    cfg = get_preset("small")
    assert VGGTConfig.from_json(cfg.to_json()) == cfg == VGGTConfig.from_json(cfg.to_json(indent=2))
    assert cfg.to_dict()["default_image_hw"] == [126, 126]  # JSON types
    odd = VGGTConfig.from_dict({**cfg.to_dict(), "mlp_ratio": 4})  # an int where a float is due: widened
    assert odd == cfg and isinstance(odd.mlp_ratio, float) and isinstance(odd.default_image_hw, tuple)
    assert cfg.replace(depth=4, intermediate_layer_idx=(0, 1, 2, 3)).depth == 4 and cfg.depth == 8  # frozen original
