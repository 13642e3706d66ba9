"""What every pipeline task shares: which failures are worth a retry."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# I/O and network trouble can pass; bad input (ValueError, FileNotFoundError, ...) fails at once, with its message.
TRANSIENT = (ConnectionError, TimeoutError, BlockingIOError, InterruptedError)


# OSErrors that a retry a second later cannot fix: the disk is full, the folder is read-only, the file too large.
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM})


def _network_errors() -> tuple[type[BaseException], ...]:
    """botocore's connection faults (not subclasses of the built-in ConnectionError); none without botocore."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return ()
    return (BotoConnectionError, HTTPClientError)


def is_transient(error: BaseException) -> bool:
    """Transient: connection/timeouts (S3's included), and OSErrors that are not about a missing file, a
    permission, a full disk or a read-only filesystem. The one retry policy of every flow's tasks."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS:
        return False
    return isinstance(error, TRANSIENT + _network_errors()) or type(error) is OSError


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


def keyed_dir(out_dir: str | Path, key_fn: Callable[[Any, dict[str, Any]], str], params: dict[str, Any]) -> Path:
    """The folder a step writes into: ``out_dir/<the first 16 hex digits of its cache key>``.

    ``params`` are the task's parameters as Prefect hands them to ``key_fn`` (the task's ``locals()`` on entry).
    Keyed by content, a cached result's path can only ever hold what that key produced: running settings A, then
    B, then A again returns A's files, where one fixed folder would hold B's by then; and a step whose inputs
    changed never resumes from (or refuses) another run's partial output in the same folder.
    """
    return Path(out_dir) / key_fn(None, params)[:16]


def data_config(data: dict[str, Any] | None) -> Any:
    """params.yaml ``data`` as tasks receive it (a JSON-able dict, so it hashes into cache keys) -> the typed
    section; None: the defaults."""
    from qvggt.config import DataConfig

    return DataConfig() if data is None else DataConfig.model_validate(data)
