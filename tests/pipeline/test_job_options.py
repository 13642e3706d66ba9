"""A params.yaml job's method options reach the quantizer: the checkpoint's manifest carries them."""

from __future__ import annotations

from pathlib import Path

from qvggt.config import QuantJob
from qvggt.model import load_vggt, save_checkpoint
from qvggt.quant.export import read_manifest


def test_quantize_task_passes_job_options(tmp_path: Path) -> None:
    from tasks.steps import quantize

    base = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "base.safetensors")
    runs = {}
    for reconstruct in (False, True):
        job = QuantJob(
            method="quantvggt",
            wbits=4,
            abits=8,
            options={"reconstruct": reconstruct, "recon_epochs": 1},
            label=f"qv-recon-{str(reconstruct).lower()}",
        ).model_dump()
        path = Path(quantize.fn(job, str(base), str(tmp_path / "models"), calib_scenes=1))
        assert path.parent.name == job["label"]
        runs[reconstruct] = read_manifest(path)["quant_config"]
    assert runs[False]["reconstruct"] is False and runs[True]["reconstruct"] is True
    assert runs[True]["recon_epochs"] == 1
