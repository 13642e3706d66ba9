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


def test_step_outputs_live_in_folders_named_by_their_cache_key(tmp_path: Path) -> None:
    """Settings A, then B, then A again with one out_dir: A's path still holds A's checkpoint (a fixed folder would
    hold B's by then, and a cache hit on A would hand it on); equal settings reuse one folder."""
    from tasks.steps import quantize

    base = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "base.safetensors")
    out = str(tmp_path / "models")
    a = QuantJob(method="rtn", wbits=8, abits=8, label="job").model_dump()
    b = QuantJob(method="rtn", wbits=4, abits=8, label="job").model_dump()  # same name, other settings
    path_a = Path(quantize.fn(a, str(base), out))
    bytes_a = path_a.read_bytes()
    path_b = Path(quantize.fn(b, str(base), out))
    assert path_a.parent.name == path_b.parent.name == "job" and path_a != path_b
    assert path_a.read_bytes() == bytes_a  # B wrote elsewhere
    assert read_manifest(path_a)["quant_config"]["weight"].startswith("int8")
    assert read_manifest(path_b)["quant_config"]["weight"].startswith("int4")
    assert Path(quantize.fn(a, str(base), out)) == path_a  # A again: its own folder
    assert len(list(Path(out).iterdir())) == 2
