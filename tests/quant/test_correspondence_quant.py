"""A model with correspondence tokens quantizes like any other: the aggregator and heads by the method, the matcher
left in float (it is a front end, like the patch embedding under the default coverage)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qvggt.model import build_model, get_preset, load_vggt, save_checkpoint
from qvggt.quant.command import run_quantize
from qvggt.quant.export import load_quantized
from qvggt.quant.linear import QuantLinear


@pytest.mark.parametrize(("method", "wbits", "abits"), [("rtn", 8, 8), ("quantvggt", 4, 8)])
def test_matcher_stays_float_and_the_quantized_model_runs(tmp_path: Path, method: str, wbits: int, abits: int) -> None:
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(correspondence_tokens=True, matcher_depth=2, enable_track=False)
    base = save_checkpoint(build_model(cfg).eval(), tmp_path / "base.safetensors")
    result = run_quantize(method, wbits, abits, tmp_path / "q", base, calib_scenes=2, calib_frames=3)
    fp, q = load_vggt(base), load_quantized(result.path)
    modules = dict(q.named_modules())
    assert isinstance(modules["aggregator.global_blocks.0.mlp.fc1"], QuantLinear)
    assert not any(isinstance(m, QuantLinear) for n, m in modules.items() if n.startswith("correspondence."))
    want = {k: v for k, v in fp.state_dict().items() if k.startswith("correspondence.")}
    got = q.state_dict()
    assert all(torch.equal(got[k].float(), v) for k, v in want.items())
    images = torch.rand(1, 3, 3, 42, 42)
    with torch.no_grad():
        a, b = fp(images), q(images)
    assert torch.equal(a["match_descriptors"], b["match_descriptors"])  # same matches feed both
    rel = float((a["pose_enc"] - b["pose_enc"]).norm() / a["pose_enc"].norm())
    assert 0 < rel < 0.5
