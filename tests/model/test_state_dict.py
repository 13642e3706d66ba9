"""The vggt-1b architecture has exactly the released checkpoint's tensors."""

from __future__ import annotations

from qvggt_testing import reference_shapes

from qvggt.model import build_model, get_preset


def test_vggt_1b_names_and_shapes_match_release() -> None:
    expected = reference_shapes()
    assert len(expected) == 1797
    model = build_model(get_preset("vggt-1b"), "meta")
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(found)) == []
    assert sorted(set(found) - set(expected)) == []
    assert {k: v for k, v in found.items() if v != expected[k]} == {}
    assert sum(p.numel() for p in model.parameters()) == 1_256_537_516


def test_without_track_head_parameter_count() -> None:
    cfg = get_preset("vggt-1b").replace(enable_track=False)
    model = build_model(cfg, "meta")
    assert sum(p.numel() for p in model.parameters()) == 1_190_596_120
