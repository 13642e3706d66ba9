"""Packed quantized checkpoints: round trip, manifest, the quantize CLI and evaluation of its output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qvggt.cli import app
from qvggt.io import sha256_file
from qvggt.model import build_model, get_preset, save_checkpoint
from qvggt.quant.api import quantize_
from qvggt.quant.config import RTNConfig, weight_activation_formats
from qvggt.quant.export import load_quantized, read_manifest, save_quantized

runner = CliRunner()


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(build_model(get_preset("tiny")), tmp_path / "base" / "tiny.safetensors")


def test_round_trip_matches_the_fake_quantized_model(tiny_ckpt: Path, tmp_path: Path) -> None:
    from qvggt.model import load_vggt

    model = load_vggt(tiny_ckpt)
    w, a = weight_activation_formats(4, 8, group_size=32)
    config = RTNConfig(weight=w, activation=a)
    quantize_(model, config)
    path = save_quantized(model, config, tmp_path / "q" / "model.safetensors", base_sha256=sha256_file(tiny_ckpt))
    loaded = load_quantized(path)
    images = torch.rand(1, 2, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(images), loaded(images)
    for key in ("pose_enc", "depth", "world_points"):
        assert torch.equal(ref[key], out[key]), key
    manifest = read_manifest(path)
    assert manifest["method"] == "RTNConfig" and manifest["base_sha256"] == sha256_file(tiny_ckpt)
    assert json.loads((tmp_path / "q" / "model.json").read_text()) == manifest
    # int4 codes are packed: the file is smaller than the fp32 checkpoint.
    assert path.stat().st_size < tiny_ckpt.stat().st_size


def test_quantize_cli_then_eval_compares_it(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "--model", str(tiny_ckpt), "--wbits", "8", "--abits", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "int8-sym-channel" in res.output
    ev = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_ckpt), "--compare", str(out / "model.safetensors"), "--scenes", "1"]
    res = runner.invoke(app, [*args, "--frames", "2", "--out", str(ev)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((ev / "metrics.json").read_text())
    quant = metrics["aggregate"][metrics["models"][1]]
    assert 0 < quant["fid_rel_l2_depth"] < 0.05  # W8A8 stays close to its float model


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "awq"], "unknown method"),
        (["--fp8", "--wbits", "4"], "fp8"),
        (["--coverage", "most"], "coverage"),
        (["--group-size", "48", "--wbits", "4"], "not divisible by 48"),
        (["--method", "quantvggt", "--option", "special_token_abits"], "KEY=VALUE"),
        (["--method", "quantvggt", "--option", "special_token_bits=8"], "no option(s) ['special_token_bits']"),
        (["--method", "quantvggt", "--option", "special_token_abits=12"], "special_token_abits must be"),
    ],
)
def test_quantize_cli_errors(tiny_ckpt: Path, tmp_path: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, ["quantize", "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 1
    assert message in res.output, res.output
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_quantize_cli_options_reach_the_method(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = ["quantize", "--model", str(tiny_ckpt), "--method", "quantvggt", "--wbits", "4", "--abits", "4"]
    base += ["--calib-scenes", "1", "--no-reconstruct"]
    rows = {}
    for value in ("8", "null"):
        out = tmp_path / value
        res = runner.invoke(app, [*base, "--option", f"special_token_abits={value}", "--out", str(out)])
        assert res.exit_code == 0, res.output
        manifest = read_manifest(out / "model.safetensors")
        assert manifest["quant_config"]["special_token_abits"] == (8 if value == "8" else None)
        assert manifest["quant_config"]["reconstruct"] is False
        rows[value] = len(manifest["special_rows"])
    assert rows == {"8": 32, "null": 0}


def test_quantize_cli_on_cuda_reports_peak_memory_or_says_there_is_no_gpu(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "cuda"
    args = ["quantize", "--model", str(tiny_ckpt), "--method", "smoothquant", "--calib-scenes", "1"]
    res = runner.invoke(app, [*args, "--device", "cuda", "--out", str(out)])
    if torch.cuda.is_available():
        assert res.exit_code == 0 and "peak cuda memory" in res.output, res.output
    else:
        assert res.exit_code == 1 and "no CUDA GPU" in res.output, res.output
        assert not out.exists()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "cpu")])
    assert res.exit_code == 0 and "peak" not in res.output and " s)" in res.output, res.output


def test_float_checkpoint_is_not_a_quantized_one(tiny_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="not a qvggt quantized checkpoint"):
        read_manifest(tiny_ckpt)


def test_quantize_cli_job_takes_method_bits_and_options_from_params(tiny_ckpt: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "pipeline:\n  jobs:\n"
        "    - {method: rtn, wbits: 4, abits: 8, options: {clip_search: true}}\n"
        "    - {method: rtn, wbits: 8, abits: 8}\n"
    )
    base = ["quantize", "--model", str(tiny_ckpt), "--params", str(params)]
    res = runner.invoke(app, [*base, "--job", "rtn-w4a8", "--out", str(tmp_path / "job")])
    assert res.exit_code == 0, res.output
    config = read_manifest(tmp_path / "job" / "model.safetensors")["quant_config"]
    formats = (config["weight"], config["activation"])
    assert config["clip_search"] is True and formats == ("int4-sym-channel", "int8-sym-token")
    # Flags that would contradict the job are refused, not silently overridden; unknown jobs list the valid ones.
    res = runner.invoke(app, [*base, "--job", "rtn-w4a8", "--wbits", "8", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "drop ['--wbits']" in res.output and not (tmp_path / "bad").exists()
    res = runner.invoke(app, [*base, "--job", "gptq-w4a8", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "rtn-w8a8" in res.output


def test_bf16_checkpoint_keeps_its_compression_after_loading(tmp_path: Path) -> None:
    """Layers are rebuilt in float32 on load: their original dtype comes from the manifest (or, for manifests
    written before it was recorded, from the stored float tensors), so the "before" bytes are bf16's."""
    from safetensors.torch import load_file, save_file

    from qvggt.quant.api import quantization_summary
    from qvggt.quant.export import MANIFEST_KEY

    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).to(torch.bfloat16).eval()
    config = RTNConfig(weight="int4-sym-channel", activation="int8-sym-token", coverage="full")
    quantize_(model, config)
    want = quantization_summary(model)
    path = save_quantized(model, config, tmp_path / "q.safetensors")
    assert set(read_manifest(path)["orig_dtype"].values()) == {"bfloat16"}
    loaded = load_quantized(path)
    assert quantization_summary(loaded) == want and quantization_summary(loaded).compression == want.compression
    assert read_manifest(save_quantized(loaded, config, tmp_path / "again.safetensors"))["summary"]["compression"] == (
        want.compression
    )
    old = read_manifest(path)
    del old["orig_dtype"]  # as written before the field: bias dtype, or the stored float tensors' for bias-less layers
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={MANIFEST_KEY: json.dumps(old)})
    assert quantization_summary(load_quantized(tmp_path / "old.safetensors")) == want
