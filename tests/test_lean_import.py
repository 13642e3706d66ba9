"""Core modules import with torch and numpy only (the GPU machine has no pydantic, prefect, mlflow, dvc ...), and never
touch CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CODE = """
import json, sys
import qvggt, qvggt.model, qvggt.geometry.pose_encoding, qvggt.model.memory, qvggt.model.init
import qvggt.engine, qvggt.kernels.gemm, qvggt.bench.run, qvggt.bench.model_bench, qvggt.cli
import qvggt.quant.api, qvggt.quant.export, qvggt.quant.dsfq
import torch
heavy = [m for m in ("prefect", "mlflow", "dvc", "boto3", "sklearn", "matplotlib", "pydantic") if m in sys.modules]
print(json.dumps({"heavy": heavy, "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_core_import_is_lean() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"heavy": [], "cuda_initialized": False}


FRESH_IMPORTS = """
import importlib, pkgutil, sys
import qvggt
names = [m.name for m in pkgutil.walk_packages(qvggt.__path__, "qvggt.") if ".pipeline" not in m.name]
failed = []
for name in names:
    for key in [k for k in sys.modules if k == "qvggt" or k.startswith("qvggt.")]:
        del sys.modules[key]  # torch and numpy stay loaded: only our import order is under test
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print(len(names))
print("\\n".join(failed))
"""


def test_every_core_module_imports_first() -> None:
    """Each core module imported first (qvggt forgotten before each): no import cycle depends on import order."""
    out = subprocess.run([sys.executable, "-c", FRESH_IMPORTS], check=True, capture_output=True, text=True).stdout
    count, *failed = out.strip().split("\n")
    assert int(count) > 50
    assert not [f for f in failed if f], failed


BLOCKER = """
import sys

class _Absent:  # the packages the GPU machine does not have
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"pydantic", "pydantic_core", "prefect", "mlflow", "dvc", "boto3", "moto", "plyfile"}:
            raise ModuleNotFoundError(f"{name} is absent on the GPU machine", name=name)

sys.meta_path.insert(0, _Absent())
"""


def test_cuda_test_modules_collect_without_orchestration_packages(tmp_path: Path) -> None:
    """scripts/gpu_check.sh runs ``pytest -m cuda`` on a machine without pydantic, prefect, mlflow ...: every module
    holding a cuda test must import there (other modules may fail to collect; the script tolerates that)."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    root = Path(__file__).resolve().parent
    with_cuda = sorted(str(p.relative_to(root.parent)) for p in root.rglob("test_*.py") if "mark.cuda" in p.read_text())
    assert with_cuda, "no module holds a cuda test"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    absent = subprocess.run([sys.executable, "-c", "import pydantic"], check=False, capture_output=True, env=env)
    assert absent.returncode != 0 and b"absent on the GPU machine" in absent.stderr  # the blocker is in force
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *with_cuda]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=root.parent)
    assert run.returncode in (0, 5), run.stdout[-3000:] + run.stderr[-2000:]  # 5: all deselected (no GPU here)
    assert "error" not in run.stdout.lower().splitlines()[-1], run.stdout[-3000:]
