"""Core modules import with torch and numpy only (the GPU machine has no pydantic, prefect, mlflow, dvc ...), and never
touch CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

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
