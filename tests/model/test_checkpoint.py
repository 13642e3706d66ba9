"""Checkpoint I/O: released-format files, our safetensors + config, and clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qvggt.model import CheckpointError, build_model, get_preset, load_vggt, save_checkpoint
from qvggt.model.checkpoint import read_config


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1)
    return build_model(get_preset("tiny")).eval()


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip_with_config(tiny_model, tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    assert read_config(path) == tiny_model.cfg
    assert (tmp_path / "m.json").is_file()
    loaded = load_vggt(path)
    assert loaded.cfg == tiny_model.cfg and _same_weights(loaded, tiny_model)
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind
    images = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(images)["depth"], tiny_model(images)["depth"])


def test_fp16_save_halves_the_file(tiny_model, tmp_path: Path) -> None:
    full = save_checkpoint(tiny_model, tmp_path / "f32.safetensors")
    half = save_checkpoint(tiny_model, tmp_path / "f16.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    assert next(load_vggt(half, dtype=None).parameters()).dtype == torch.float16
    loaded = load_vggt(half)  # runs in fp32 by default
    assert next(loaded.parameters()).dtype == torch.float32
    ref = {k: v.half().float() for k, v in tiny_model.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_released_style_state_dict_loads(tiny_model, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save(tiny_model.state_dict(), path)
    assert _same_weights(load_vggt(path, preset="tiny"), tiny_model)


def test_wrapped_training_checkpoint_loads(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": tiny_model.state_dict(), "step": 3}, path)
    assert _same_weights(load_vggt(path, preset="tiny"), tiny_model)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        load_vggt(path, preset="tiny")
    assert "code ran" not in capsys.readouterr().out


def test_missing_and_truncated_files(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_vggt(tmp_path / "nope.pt", preset="tiny")
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read"):
        load_vggt(path)
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        (tmp_path / "m.onnx").write_bytes(b"x")
        load_vggt(tmp_path / "m.onnx", preset="tiny")


def test_wrong_architecture_lists_the_differences(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    sd = tiny_model.state_dict()
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_vggt(path, preset="small")
    msg = str(err.value)
    assert str(path) in msg and "missing" in msg and "mis-shaped" in msg and "--preset tiny" in msg

    sd = dict(sd)
    sd["extra.weight"] = torch.zeros(1)
    del sd["camera_head.embed_pose.bias"]
    sd["aggregator.camera_token"] = torch.zeros(1, 2, 1, 8)
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_vggt(path, preset="tiny")
    msg = str(err.value)
    assert "missing (1): camera_head.embed_pose.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "aggregator.camera_token expected (1, 2, 1, 64) found (1, 2, 1, 8)" in msg


def test_non_strict_allows_missing_but_not_misshaped(tiny_model, tmp_path: Path) -> None:
    sd = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("track_head")}
    path = tmp_path / "notrack.safetensors"
    save_file(sd, str(path))
    model = load_vggt(path, preset="tiny", strict=False)
    assert torch.equal(model.aggregator.camera_token, tiny_model.aggregator.camera_token)
