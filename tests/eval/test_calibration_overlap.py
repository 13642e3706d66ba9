"""``qvggt eval`` refuses to score a quantized model on the samples it was calibrated on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qvggt.config import DataConfig
from qvggt.eval.command import calibration_sample_ids, run_eval
from qvggt.model import load_vggt, save_checkpoint
from qvggt.quant.command import run_quantize


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("overlap")
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), root / "base.safetensors")
    result = run_quantize("smoothquant", 8, 8, root / "q", base, calib_scenes=2, calib_frames=2, data=DataConfig())
    return base, result.path


def test_checkpoint_records_its_calibration_samples(quantized: tuple[Path, Path]) -> None:
    base, qpath = quantized
    ids = calibration_sample_ids(str(qpath))
    assert len(ids) == 2 and all(i.startswith("synthetic/") for i in ids)
    assert calibration_sample_ids(str(base)) == set()
    assert calibration_sample_ids("preset:tiny") == set()


def test_eval_on_calibration_samples_is_refused(quantized: tuple[Path, Path], tmp_path: Path) -> None:
    base, qpath = quantized
    with pytest.raises(ValueError, match="calibration") as err:
        run_eval(str(base), [str(qpath)], "synthetic:calib", tmp_path, frames=2, scenes=2, progress=False)
    assert min(calibration_sample_ids(str(qpath))) in str(err.value)
    assert not (tmp_path / "metrics.json").exists()  # refused before any work or output


def test_eval_on_the_disjoint_split_runs(quantized: tuple[Path, Path], tmp_path: Path) -> None:
    base, qpath = quantized
    result = run_eval(str(base), [str(qpath)], "synthetic:eval", tmp_path, frames=2, scenes=1, progress=False)
    assert len(result.models) == 2 and (tmp_path / "metrics.json").exists()
