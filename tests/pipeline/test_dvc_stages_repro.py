"""DVC: on a fresh `git clone`, `dvc repro` runs the quantize/evaluate stages through the `qvggt` CLI, a second
`dvc repro` has nothing to do, and `dvc push` fills the default local-directory remote.

The clone gets this checkout's dvc.yaml (so the test checks the stages being edited, not only the last commit) and a
params.yaml whose `pipeline` section is one tiny job on the committed small model, to keep the stages to seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = shutil.which("dvc", path=str(BIN)) or shutil.which("dvc")

pytestmark = pytest.mark.skipif(
    DVC is None or not (REPO / ".git").exists(), reason="needs dvc (pip install -e '.[pipeline]') and a git checkout"
)


def _sh(args: list[str], cwd: Path, timeout: int = 150) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        # The clone's own qvggt source, not this checkout's (the editable install points here): the stages' deps
        # hash the clone's qvggt/, so that is the code they must run.
        "PYTHONPATH": str(cwd),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_fresh_clone_repro_twice_then_push(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    r = _sh(["git", "clone", "-q", str(REPO), str(clone)], tmp_path)
    assert r.returncode == 0, r.stderr
    # Overlay the working tree's DVC files (uncommitted edits are what this test is for).
    for name in ("dvc.yaml", ".dvcignore", ".dvc/config"):
        shutil.copy(REPO / name, clone / name)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["calibrate"] = {**params["calibrate"], "pool_scenes": 6, "n_clusters": 2, "n_per_cluster": 1, "n_init": 2}
    params["pipeline"] = {
        **params.get("pipeline", {}),
        "base_weights": "models/small/model.safetensors",
        # An option: the stage must pass it on (`qvggt quantize --job`), not only method and bits.
        "jobs": [{"method": "rtn", "wbits": 8, "abits": 8, "options": {"clip_search": True}}],
        "eval_scenes": 1,
        "eval_frames": 2,
    }
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    first = _sh([DVC, "repro"], clone)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Running stage 'quantize@0'" in first.stdout and "Running stage 'evaluate@0'" in first.stdout
    assert "Running stage 'calibrate'" in first.stdout
    assert "Running stage 'train_small'" not in first.stdout  # frozen: the committed model is not retrained
    quantized = clone / "runs/dvc/quantized/rtn-w8a8/model.safetensors"
    from qvggt.quant.export import read_manifest

    assert read_manifest(quantized)["quant_config"]["clip_search"] is True
    assert (clone / "runs/dvc/calibrate/manifest.json").is_file()
    metrics = _sh([DVC, "metrics", "show", "--json"], clone)
    assert metrics.returncode == 0 and "rtn-w8a8" in metrics.stdout, metrics.stderr
    plots = _sh([DVC, "plots", "show", "--json"], clone)
    assert plots.returncode == 0 and "auc_curves.png" in plots.stdout, plots.stdout[-2000:] + plots.stderr[-2000:]
    assert '"errors"' not in plots.stdout, plots.stdout[-2000:]

    second = _sh([DVC, "repro"], clone)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Running stage" not in second.stdout, second.stdout
    status = _sh([DVC, "status"], clone)
    assert "up to date" in status.stdout, status.stdout

    push = _sh([DVC, "push"], clone)
    assert push.returncode == 0, push.stderr[-3000:]
    remote = clone / "dvc-remote"  # .dvc/config: url = ../dvc-remote (relative to .dvc/)
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))
