"""``qvggt.load_quantized``: only a file without a qvggt manifest takes the float path; a manifest that cannot be
read raises its own error instead of a confusing architecture mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qvggt
from qvggt.model import build_model, get_preset, save_checkpoint
from qvggt.quant.api import quantize_
from qvggt.quant.config import RTNConfig
from qvggt.quant.export import MANIFEST_KEY, read_manifest, save_quantized


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("load")
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    base = save_checkpoint(model, root / "base.safetensors")
    config = RTNConfig(weight="int4-sym-channel", activation="int8-sym-token")
    return base, save_quantized(quantize_(model, config), config, root / "q.safetensors")


def _with_manifest(src: Path, dst: Path, text: str) -> Path:
    save_file(load_file(str(src)), str(dst), metadata={MANIFEST_KEY: text})
    return dst


def test_an_unreadable_manifest_raises_its_own_error(checkpoints, tmp_path: Path) -> None:
    _, qpath = checkpoints
    newer = read_manifest(qpath) | {"version": 2}
    with pytest.raises(ValueError, match=r"unsupported format qvggt-quantized v2 .*newer version"):
        qvggt.load_quantized(_with_manifest(qpath, tmp_path / "v2.safetensors", json.dumps(newer)))
    with pytest.raises(ValueError, match="manifest is not valid JSON"):
        qvggt.load_quantized(_with_manifest(qpath, tmp_path / "bad.safetensors", "{not json"))


def test_files_without_a_manifest_still_take_the_float_path(checkpoints, tmp_path: Path) -> None:
    base, qpath = checkpoints
    assert type(qvggt.load_quantized(base)).__name__ == "Engine"  # a float checkpoint: the bf16 fused path
    assert type(qvggt.load_quantized(qpath)).__name__ == "Engine"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="junk.safetensors") as info:  # load_vggt's own message
        qvggt.load_quantized(junk)
    assert "does not fit" not in str(info.value)
