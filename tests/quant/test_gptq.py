"""GPTQ: the fast Cholesky / lazy-batch form equals a direct, slow Optimal Brain Surgeon loop; it beats RTN on a
layer's output error; its codes survive QuantLinear storage and a checkpoint round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from qvggt.model import load_vggt, save_checkpoint
from qvggt.quant.api import quantize_
from qvggt.quant.command import make_config, run_quantize
from qvggt.quant.config import weight_activation_formats
from qvggt.quant.export import load_quantized, read_manifest
from qvggt.quant.formats import Granularity, QuantFormat, parse_format
from qvggt.quant.gptq import GPTQConfig, gptq_quantize
from qvggt.quant.linear import QuantLinear
from qvggt.quant.quantizer import compute_scales, fake_quantize


def _correlated_inputs(t: int, k: int, seed: int, sample_seed: int | None = None) -> torch.Tensor:
    """``t`` inputs with strongly correlated channels and unequal energies (what makes GPTQ's updates matter):
    ``seed`` fixes the distribution, ``sample_seed`` (default: ``seed``) the draw from it."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    energy = torch.logspace(0, 1, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    return (torch.randn(t, k, generator=g, dtype=torch.float64) @ mix) * energy


def _direct_gptq(
    w: torch.Tensor, h: torch.Tensor, fmt: QuantFormat, damp: float, order: list[int], static: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: for each column in ``order``, invert the damped Hessian restricted to the columns not yet
    quantized, quantize the column and move its error onto them by the OBS update. Group scales (non-static) are
    taken from the current weight when a group's first column comes up (order is then the identity)."""
    w = w.double().clone()
    h = h.double().clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    col_fmt = QuantFormat(kind=fmt.kind, bits=fmt.bits, symmetric=fmt.symmetric, granularity=Granularity.CHANNEL)
    g = fmt.group_size
    if static:
        scale, zp = compute_scales(w, fmt)
        scale = scale.float().double()
    else:
        scale = torch.ones(w.shape[0], w.shape[1] // g, 1, dtype=torch.float64)
        zp = None
    q = torch.zeros_like(w)
    remaining = list(order)
    for col in order:
        if not static and col % g == 0:
            s, _ = compute_scales(w[:, col : col + g], col_fmt)
            scale[:, col // g] = s.float().double()
        s = scale[:, col // g] if g else scale.expand(w.shape[0], 1)
        z = None if zp is None else (zp[:, col // g] if g else zp.expand(w.shape[0], 1))
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        j = remaining.index(col)
        q[:, col] = fake_quantize(w[:, col : col + 1], col_fmt, scale=s, zero_point=z)[:, 0]
        e = (w[:, col] - q[:, col]) / hinv[j, j]
        w[:, remaining] -= e[:, None] * hinv[j][None, :]
        remaining.remove(col)
    return q, scale


@pytest.mark.parametrize(
    ("fmt_name", "act_order", "static"),
    [
        ("int4-sym-channel", False, False),
        ("int4-asym-channel", True, False),
        ("int3-sym-group8", False, False),  # group scales from the error-updated columns
        ("int4-sym-group8", True, True),  # act_order implies static groups
    ],
)
def test_fast_gptq_equals_the_direct_obs_loop(fmt_name: str, act_order: bool, static: bool) -> None:
    k, n = 24, 6
    x = _correlated_inputs(200, k, seed=0)
    h = x.T @ x / x.shape[0]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fmt = parse_format(fmt_name)
    # block_size 5: blocks straddle groups and the lazy update after each block is exercised
    q, scale, _ = gptq_quantize(w, h, fmt, damp=0.01, block_size=5, act_order=act_order, static_groups=static)
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(k))
    want, want_scale = _direct_gptq(w, h, fmt, 0.01, order, static or act_order or fmt.group_size is None)
    assert torch.allclose(q, want, atol=1e-10, rtol=0), (q - want).abs().max()
    assert torch.equal(scale.double(), want_scale)
    assert (q != w).any()


def test_gptq_beats_rtn_on_the_layer_output() -> None:
    k, n = 64, 48
    calib, held_out = _correlated_inputs(2048, k, seed=2), _correlated_inputs(2048, k, seed=2, sample_seed=3)
    linear = nn.Linear(k, n, bias=False).double().requires_grad_(False)
    torch.nn.init.normal_(linear.weight, std=0.1, generator=torch.Generator().manual_seed(4))
    h = calib.T @ calib / calib.shape[0]
    for name in ("int4-sym-channel", "int4-sym-group16", "int3-asym-channel"):
        fmt = parse_format(name)
        rtn = QuantLinear.from_float(linear, fmt).dequantized_weight(torch.float64)
        q, scale, zp = gptq_quantize(linear.weight, h, fmt)
        stored = QuantLinear.from_float(linear, fmt, weight=q, scale=scale, zero_point=zp)
        # GPTQ's codes are what is stored (dequantization computes in float32: equal to float32 rounding)
        assert torch.allclose(stored.dequantized_weight(torch.float64), q, rtol=1e-6, atol=0)
        for x in (calib, held_out):
            ref = x @ linear.weight.T
            e_rtn, e_gptq = (x @ rtn.T - ref).norm(), (x @ q.T - ref).norm()
            assert e_gptq < 0.85 * e_rtn, (name, float(e_gptq), float(e_rtn))


def test_dead_inputs_and_bad_hessians() -> None:
    w = torch.randn(4, 8, dtype=torch.float64)
    x = torch.randn(50, 8, dtype=torch.float64)
    x[:, 3] = 0  # an input channel that never fired
    q, _, _ = gptq_quantize(w, x.T @ x, parse_format("int4-sym-channel"))
    assert torch.isfinite(q).all() and (q[:, 3] == 0).all()
    with pytest.raises(ValueError, match="NaN/inf"):
        gptq_quantize(w, torch.full((8, 8), float("nan")), parse_format("int4-sym-channel"))
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(w, torch.eye(7), parse_format("int4-sym-channel"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("damp", 0.0), ("damp", float("nan")), ("block_size", 0), ("act_order", 1), ("rotation_block", 3)],
)
def test_bad_configs_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        GPTQConfig(**{field: value})


def test_gptq_on_a_model_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "base.safetensors")
    result = run_quantize("gptq", 4, 8, tmp_path / "q", base, calib_scenes=2, calib_frames=2)
    manifest = read_manifest(result.path)
    assert manifest["method"] == "GPTQConfig" and len(manifest["calibration"]["sample_ids"]) == 2
    images = torch.rand(1, 2, 3, 56, 84, generator=torch.Generator().manual_seed(5))
    loaded = load_quantized(result.path)
    fp = load_vggt(base).eval()
    with torch.no_grad():
        got, want = loaded(images)["depth"], fp(images)["depth"]
    assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 0.2


def test_rotated_gptq_records_its_online_rotations() -> None:
    torch.manual_seed(0)
    model = load_vggt(preset="tiny").eval()
    calib = [torch.rand(1, 2, 3, 56, 84, generator=torch.Generator().manual_seed(6))]
    w, a = weight_activation_formats(4, 8)
    q = quantize_(copy.deepcopy(model), GPTQConfig(weight=w, activation=a, rotate=True), calibration_data=calib)
    rotated = {n: m.input_hadamard for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert rotated and all(b > 0 for b in rotated.values())  # tiny: widths 64 / 256, powers of two
    assert make_config("gptq", 4, 8, None, "default", False) == GPTQConfig(weight=w, activation=a)


@pytest.mark.parametrize(("method", "options"), [("gptq", {}), ("quantvggt", {"gptq": True})])
def test_full_coverage_quantizes_layers_that_never_ran_with_rtn_and_names_them(method: str, options: dict) -> None:
    """Calibration carries no query points, so the tracker never runs: its Linears get RTN (as SmoothQuant and
    quantvggt give every layer they have no statistics for), with a warning naming them."""
    torch.manual_seed(0)
    model = load_vggt(preset="tiny").eval()
    calib = [torch.rand(1, 2, 3, 56, 84, generator=torch.Generator().manual_seed(6))]
    config = make_config(method, 4, 8, None, "full", False, options)
    with pytest.warns(UserWarning, match=r"19 planned Linear\(s\) never ran .* RTN instead: track_head\.tracker"):
        q = quantize_(copy.deepcopy(model), config, calibration_data=calib)
    name = "track_head.tracker.corr_mlp.fc1"
    got, fp = q.get_submodule(name), model.get_submodule(name)
    assert isinstance(got, QuantLinear)
    rtn = QuantLinear.from_float(fp, got.weight_fmt, got.act_fmt)
    assert torch.equal(got.dequantized_weight(), rtn.dequantized_weight())
    assert not any(type(m) is nn.Linear for m in q.modules())  # every Linear of the model is quantized


def test_full_coverage_gptq_from_the_quantize_command(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "base.safetensors")
    with pytest.warns(UserWarning, match="never ran on the calibration data"):
        result = run_quantize("gptq", 4, 8, tmp_path / "q", base, coverage="full", calib_scenes=1, calib_frames=2)
    assert read_manifest(result.path)["quant_config"]["coverage"] == "full"
