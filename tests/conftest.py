"""Shared fixtures. Tests run on CPU, in two pytest-xdist workers under `make test` (each test is self-contained)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter (NumPy on CPU). It must be on before anything imports
# triton (``@triton.jit`` decides at import time), so it is set here, before any test module is collected. With a
# GPU the kernels compile for it instead and tests/kernels/test_kernels_cuda.py checks them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qvggt_testing import DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect ``cuda`` tests on machines without a GPU: reported as deselected, never as passed or skipped."""
    if torch.cuda.is_available():
        return
    keep = [item for item in items if item.get_closest_marker("cuda") is None]
    dropped = [item for item in items if item.get_closest_marker("cuda") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
