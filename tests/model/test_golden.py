"""Same function as the published VGGT-1B: fp32 outputs on name-seeded weights match its golden outputs.

tests/data_files/vggt1b_golden.npz holds what the published code (facebookresearch/vggt at 44b3afb, fp32, CPU,
eval) returns for the stored images [1, 2, 3, 140, 182] and query points [1, 4, 2]; the weights are regenerated
here from their names (qvggt.model.init). 140x182 exercises position-embedding interpolation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qvggt_testing import DATA, rel_l2

from qvggt.geometry.pose_encoding import pose_encoding_to_extri_intri
from qvggt.model import build_model, get_preset
from qvggt.model.init import fill_name_seeded_

pytestmark = pytest.mark.slow

GOLDEN_KEYS = [
    "pose_enc",
    "pose_enc_list.0",
    "pose_enc_list.1",
    "pose_enc_list.2",
    "pose_enc_list.3",
    "depth",
    "depth_conf",
    "world_points",
    "world_points_conf",
    "track",
    "vis",
    "conf",
    "extrinsic",
]


@pytest.fixture(scope="module")
def golden_run() -> tuple[dict, dict]:
    golden = dict(np.load(DATA / "vggt1b_golden.npz"))
    model = fill_name_seeded_(build_model(get_preset("vggt-1b"), "meta")).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(golden["images"]), torch.from_numpy(golden["query_points"]))
    out["extrinsic"] = pose_encoding_to_extri_intri(out["pose_enc"], build_intrinsics=False)[0]
    for i, p in enumerate(out.pop("pose_enc_list")):
        out[f"pose_enc_list.{i}"] = p
    del model
    return out, golden


TRACK_KEYS = ("track", "vis", "conf")


@pytest.mark.parametrize("key", [k for k in GOLDEN_KEYS if k not in TRACK_KEYS])
def test_matches_published_output(golden_run: tuple[dict, dict], key: str) -> None:
    out, golden = golden_run
    ref = torch.from_numpy(golden[key])
    assert tuple(out[key].shape) == tuple(ref.shape)
    assert rel_l2(out[key], ref) < 1e-4


# The tracker's 4 correlation/refinement iterations amplify float rounding enormously on these random weights:
# a 1e-7 relative change of its input feature maps moves the published tracker's own output by ~4e-4, and the
# published code run on this machine misses the stored golden track by the same 2.0e-3 relative L2 as ours
# (our tracker is bit-identical to the published one on identical feature maps, checked at development time).
# So tracks are compared in their own units: pixels for positions, probability for visibility/confidence.
# Measured here: 0.49 px, 0.0073 and 0.0007.
TRACK_TOLERANCE = {"track": 1.0, "vis": 0.02, "conf": 0.02}


@pytest.mark.parametrize("key", TRACK_KEYS)
def test_tracks_match_published_output_within_rounding_amplification(golden_run, key: str) -> None:
    out, golden = golden_run
    ref = torch.from_numpy(golden[key])
    assert tuple(out[key].shape) == tuple(ref.shape)
    assert float((out[key] - ref).abs().max()) < TRACK_TOLERANCE[key]
