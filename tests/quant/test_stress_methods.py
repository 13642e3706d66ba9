"""On the trained small model with massive camera/register-token channels planted (the outlier-stress recipe of
qvggt.calib.stress, without its fine-tune), quantvggt keeps the pose encoding closer to the float model than RTN at
W8A8, and rotating the LayerNorm-output inputs too (the paper's full rotation) lowers it further."""

from __future__ import annotations

import copy

import pytest
import torch
from qvggt_testing import planted_small_model

from qvggt.quant.api import quantize_
from qvggt.quant.command import make_config


@pytest.fixture(scope="module")
def stressed() -> tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    return planted_small_model()


def _pose_error(model: torch.nn.Module, ref: torch.nn.Module, scenes: list[torch.Tensor]) -> float:
    with torch.no_grad():
        pairs = [(model(x)["pose_enc"].double(), ref(x)["pose_enc"].double()) for x in scenes]
    return float(sum((a - b).square().sum() for a, b in pairs) ** 0.5 / sum(b.square().sum() for _, b in pairs) ** 0.5)


def test_quantvggt_beats_rtn_on_the_stress_model(stressed) -> None:
    model, calib, scenes = stressed
    err = {}
    # No reconstruction time limit: under a binding budget the steps (so the errors) depend on the machine's load,
    # and a loaded CI machine cut them (lnrot measured 2.63e-4 there, 2.14e-4 unlimited).
    unlimited = {"recon_time_budget_s": None}
    for name, method, options in (
        ("rtn", "rtn", {}),
        ("quantvggt", "quantvggt", unlimited),
        ("quantvggt+lnrot", "quantvggt", {**unlimited, "norm_input_rotation": True}),
        ("quantvggt+lnrot-norecon", "quantvggt", {"norm_input_rotation": True, "reconstruct": False}),
    ):
        config = make_config(method, 8, 8, None, "default", False, options)
        q = quantize_(copy.deepcopy(model), config, calibration_data=None if method == "rtn" else calib)
        err[name] = _pose_error(q, model, scenes)
    # measured on the embedded correspondence-token model (2026-11-29): rtn 4.33e-4, quantvggt 2.56e-4 (0.59x; 2.70e-4
    # without block-wise reconstruction), with the LayerNorm-output rotation 2.14e-4 (0.83x quantvggt's) and 1.75e-4
    # without reconstruction (0.68x: fitted on 2 calibration batches, reconstruction costs the rotated variant)
    assert err["quantvggt"] < 0.7 * err["rtn"], err
    assert err["quantvggt+lnrot"] < 0.9 * err["quantvggt"], err
    assert err["quantvggt+lnrot-norecon"] < 0.8 * err["quantvggt"], err
