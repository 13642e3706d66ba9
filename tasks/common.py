"""What every pipeline task shares: which failures are worth a retry."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

# I/O and network trouble can pass; bad input (ValueError, FileNotFoundError, ...) fails at once, with its message.
TRANSIENT = (ConnectionError, TimeoutError, BlockingIOError, InterruptedError)


# OSErrors that a retry a second later cannot fix: the disk is full, the folder is read-only, the file too large.
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM})


def is_transient(error: BaseException) -> bool:
    """Transient: connection/timeouts, and OSErrors that are not about a missing file, a permission, a full disk or
    a read-only filesystem."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS:
        return False
    return isinstance(error, TRANSIENT) or type(error) is OSError


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient errors."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_transient(error)


def maybe_inject_fault(step: str) -> None:
    """Chaos hook for tests and drills: with ``QVGGT_INJECT_TRANSIENT=<step>`` and ``QVGGT_INJECT_TRANSIENT_FILE``
    naming a file that does not exist yet, the step creates the file and raises a transient OSError once; the retry
    then finds the file and runs normally. Unset (the default), it does nothing."""
    marker = os.environ.get("QVGGT_INJECT_TRANSIENT_FILE")
    if os.environ.get("QVGGT_INJECT_TRANSIENT") != step or not marker or Path(marker).exists():
        return
    Path(marker).write_text(step)
    raise OSError(f"injected transient fault in step {step!r} (QVGGT_INJECT_TRANSIENT)")
