"""DVC: the committed small model matches dvc.lock, so `dvc repro` on a fresh clone does not retrain it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")


def _dvc(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([DVC, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="DVC needs the git checkout (CI runs in one)")
def test_repro_does_not_retrain_the_committed_model() -> None:
    assert DVC, "dvc is installed by `make setup` (dev extra)"
    # Only train_small: the quantize/evaluate stages are run by `dvc repro` (tests/pipeline/test_dvc_stages_repro.py).
    status = _dvc("status", "train_small", "--json")
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip().splitlines()[-1] == "{}"  # outputs match dvc.lock
    dry = _dvc("repro", "--dry", "train_small")
    assert dry.returncode == 0, dry.stderr
    assert "Running stage" not in dry.stdout
    assert "didn't change, skipping" in dry.stdout
