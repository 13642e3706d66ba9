"""Content-hash cache keys for pipeline steps: a step reruns exactly when something it depends on changed.

A key joins the sha256 of the input files (base weights, calibration manifest...), a canonical JSON of the step's
settings, the qvggt version, and a hash of the *source* of the qvggt subpackages the step runs (Prefect's
TASK_SOURCE policy sees only the task function's own text, not the library code it calls). Keys never include
tensors, paths' mtimes or run ids, so equal inputs on another machine give equal keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import qvggt
from qvggt.io import sha256_file

__all__ = ["file_digest", "source_hash", "step_key"]

_ROOT = Path(qvggt.__file__).parent


_MEMO_MIN_BYTES = 64 << 20


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    return sha256_file(path)


def file_digest(path: str | Path) -> str:
    """sha256 of a file. A step's key is computed by Prefect and again by the task (for its output folder), and
    base weights of several GB should be read once, not per call: files of 64 MiB or more are memoised on (path,
    size, mtime, ctime, inode). Rewriting that much takes far longer than a timestamp tick, so a rewrite always
    shows; smaller files, which could be rewritten within one tick at the same size, are hashed every time."""
    st = Path(path).stat()
    if st.st_size < _MEMO_MIN_BYTES:
        return sha256_file(path)
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@lru_cache(maxsize=64)
def source_hash(subpackages: tuple[str, ...]) -> str:
    """sha256 over the ``.py`` files of ``qvggt/<subpackage>`` (sorted by path), e.g. ``("quant", "model")``."""
    h = hashlib.sha256()
    for sub in sorted(subpackages):
        folder = _ROOT / sub
        files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
        for f in files:
            if not f.is_file():
                raise ValueError(f"no qvggt source for {sub!r} (looked for {f})")
            h.update(str(f.relative_to(_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def step_key(
    step: str, files: Iterable[str | Path] = (), settings: Mapping[str, Any] | None = None,
    subpackages: Iterable[str] = (),
) -> str:  # fmt: skip
    """The cache key of one step run: step name, input file hashes, settings, qvggt version and source hash."""
    parts = {
        "step": step,
        "files": [file_digest(f) for f in files],
        "settings": settings or {},
        "qvggt": qvggt.__version__,
        "source": source_hash(tuple(subpackages)),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
