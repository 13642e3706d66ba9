"""params.yaml loads into typed, validated sections; bad files fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvggt.config import ConfigError, ProjectConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_yaml_is_valid() -> None:
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, ProjectConfig)
    assert not cfg.data.calib_seeds.overlaps(cfg.data.eval_seeds)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_are_valid(path: Path) -> None:
    """The alternative recipes in configs/ load as a whole project config (a typo would surface only hours in)."""
    assert load_config(path).train.preset in ("tiny", "small")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "mapping of sections"),
        ("data:\n  num_frames: zero\n", "data.num_frames"),
        ("data:\n  height: 130\n", "multiple of 14"),
        ("data:\n  calib_seeds: {start: 0, stop: 10}\n  eval_seeds: {start: 5, stop: 20}\n", "overlap"),
        ("data:\n  val_seeds: {start: 200000, stop: 200100}\n", "data.eval_seeds and data.val_seeds overlap"),
        ("predict:\n  preset: huge\n", "predict.preset"),
        ("predict:\n  dtype: float8\n", "predict.dtype"),
        ("unknown_section: {}\n", "unknown_section"),
        ("predict:\n  conf_percentile: 120\n", "predict.conf_percentile"),
        ("pipeline:\n  jobs: [{method: rtn, wbits: 4, abits: 4, options: {reconstruct: false}}]\n", "no option"),
        ("pipeline:\n  jobs: [{method: quantvggt, wbits: 4, abits: 4, options: {recon_epochs: 0}}]\n", "recon_epochs"),
        ("pipeline:\n  jobs: [{method: quantvggt, wbits: 4, abits: 4, label: 'Bad Name'}]\n", "label"),
        (
            "pipeline:\n  jobs: [{method: rtn, wbits: 4, abits: 4}, {method: rtn, wbits: 4, abits: 4, options: {}}]\n",
            "distinct",
        ),
        ("data:\n  eval_seeds: {start: 200000, stop: 200004}\n", "pipeline.eval_scenes=8 is more than the 4 scenes"),
        ("calibrate:\n  pool_scenes: 30\ndata:\n  calib_seeds: {start: 100000, stop: 100020}\n", "pool_scenes=30"),
        ("pipeline:\n  device: gpu\n", "pipeline.device"),
        ("pipeline:\n  calib_scenes: 8\n", "calib_scenes"),
    ],
)
def test_bad_params_fail_with_key_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_job_options_and_label_name_the_job() -> None:
    from qvggt.config import QuantJob, job_name

    job = QuantJob(method="quantvggt", wbits=4, abits=4, options={"reconstruct": False}, label="qv-w4a4-norecon")
    assert job.name == "qv-w4a4-norecon" == job_name(job.model_dump())
    assert QuantJob(method="rtn", wbits=4, abits=None).name == "rtn-w4a16"


def test_find_job_by_name_by_dvc_key_and_refusing_ambiguity() -> None:
    from qvggt.config import PipelineConfig, QuantJob

    jobs = [
        QuantJob(method="quantvggt", wbits=4, abits=4),
        QuantJob(method="quantvggt", wbits=4, abits=4, options={"gptq": True}, label="qv-gptq"),
        QuantJob(method="rtn", wbits=4, abits=None, label="rtn-wonly"),
    ]
    pipe = PipelineConfig(jobs=jobs)
    assert pipe.find_job("qv-gptq").options == {"gptq": True}
    assert pipe.find_job("quantvggt-w4a4").label is None  # the exact name wins over the labelled twin
    # DVC renders a labelled weight-only job as method-wWaNone: unique, so it resolves to that job.
    assert pipe.find_job("rtn-w4aNone").label == "rtn-wonly" == pipe.find_job("rtn-w4a16").label
    with pytest.raises(ValueError, match=r"no pipeline job 'rtn-w8a8'.*quantvggt-w4a4"):
        pipe.find_job("rtn-w8a8")
    twins = PipelineConfig(jobs=[jobs[1], QuantJob(method="quantvggt", wbits=4, abits=4, label="qv-plain")])
    with pytest.raises(ValueError, match="only their labels tell them apart"):
        twins.find_job("quantvggt-w4a4")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    # The recipes keep the data splits of params.yaml, so their validation scenes stay the held-out ones.
    assert cfg.data == load_config(REPO / "params.yaml").data
