"""Which failures the pipeline's tasks retry: passing I/O and network trouble, never bad input or a full disk."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tasks` is a top-level folder of the repo
from tasks.common import is_transient  # tasks.common itself needs no prefect


@pytest.mark.parametrize(
    "error",
    [ConnectionResetError(), TimeoutError(), OSError(errno.EIO, "I/O error"), OSError("flaky mount"),
     BlockingIOError()],
)  # fmt: skip
def test_retried(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [ValueError("bad bits"), FileNotFoundError("x"), PermissionError("ro"), OSError(errno.ENOSPC, "No space left"),
     OSError(errno.EROFS, "Read-only file system"), OSError(errno.EFBIG, "File too large"), RuntimeError("bug")],
)  # fmt: skip
def test_not_retried(error: BaseException) -> None:
    assert not is_transient(error)
