"""Core modules import with torch and numpy only, and never touch CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
import qvggt, qvggt.model, qvggt.geometry.pose_encoding, qvggt.model.memory, qvggt.model.init
import qvggt.engine, qvggt.kernels.gemm, qvggt.bench.run, qvggt.bench.model_bench
import torch
heavy = [m for m in ("prefect", "mlflow", "dvc", "boto3", "sklearn", "matplotlib") if m in sys.modules]
print(json.dumps({"heavy": heavy, "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_core_import_is_lean() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"heavy": [], "cuda_initialized": False}
