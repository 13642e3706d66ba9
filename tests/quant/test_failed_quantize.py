"""A failed ``quantize_`` leaves the model as it was: rotated / folded weights and swapped modules are put back, for
failures during calibration (after prepare rotated weights) and during convert (after folds and some swaps)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from qvggt_testing import tiny_with_mlp_outlier

from qvggt.quant.api import quantize_
from qvggt.quant.command import make_config
from qvggt.quant.linear import QuantLinear

CALIB = [torch.rand(1, 2, 3, 56, 84, generator=torch.Generator().manual_seed(1))]
BAD_CALIB = [torch.rand(1, 2, 3, 50, 84)]  # 50 is not a multiple of the 14-pixel patch: the forward raises
IMAGES = torch.rand(1, 2, 3, 56, 84, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_with_mlp_outlier().eval()


def _fingerprint(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    with torch.no_grad():
        out = {k: v.clone() for k, v in model(IMAGES).items() if isinstance(v, torch.Tensor)}
    return out, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: Any) -> None:
    out, state = _fingerprint(model)
    ref_out, ref_state = before
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state), [
        k for k in state if not torch.equal(state[k], ref_state[k])
    ][:5]
    assert all(torch.equal(out[k], ref_out[k]) for k in ref_out)
    assert not any(isinstance(m, QuantLinear) or m._forward_pre_hooks for m in model.modules())


def _fail_on_call(n: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, raising on its n-th call: a failure in convert after some layers were already swapped."""
    calls = itertools.count(1)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == n:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize(
    ("method", "options"),
    [("quantvggt", {"reconstruct": False}), ("quantvggt", {"norm_input_rotation": True}), ("gptq", {"rotate": True})],
)
def test_a_calibration_failure_after_prepare_rotated_weights_leaves_the_model_as_it_was(
    model, method: str, options: dict[str, Any]
) -> None:
    m = copy.deepcopy(model)
    before = _fingerprint(m)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        quantize_(m, make_config(method, 4, 4, None, "default", False, options), calibration_data=BAD_CALIB)
    _assert_unchanged(m, before)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("quantvggt", {"recon_epochs": 1, "recon_time_budget_s": None}),  # after reconstruction and its folds
        ("smoothquant", {}),  # after the folds
        ("quarot", {}),  # data-free: rotated in prepare
    ],
)
def test_a_convert_failure_after_folds_and_swaps_leaves_the_model_as_it_was(
    model, monkeypatch: pytest.MonkeyPatch, method: str, options: dict[str, Any]
) -> None:
    m = copy.deepcopy(model)
    before = _fingerprint(m)
    real = QuantLinear.from_float.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(QuantLinear, "from_float", classmethod(_fail_on_call(5, real)))
    config = make_config(method, 4, 4, None, "default", False, options)
    data = None if method == "quarot" else CALIB
    with pytest.raises(RuntimeError, match="injected failure"):
        quantize_(m, config, calibration_data=data)
    _assert_unchanged(m, before)
    monkeypatch.undo()  # and the restored model still quantizes
    quantize_(m, config, calibration_data=data)
    assert isinstance(m.aggregator.frame_blocks[0].mlp.fc2, QuantLinear)
