"""Credentials for the team services: read only from the environment or a git-ignored local file, never logged.

Where a secret may come from, in order:

1. the process environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, database
   passwords, API keys, ...), which is what CI, compose and Kubernetes provide;
2. a local ``KEY=VALUE`` file (default ``.qvggt.env`` in the repository root) that is listed in ``.gitignore``.
   :func:`load_local_env` refuses a file that git tracks, so a secret cannot be committed by this route, and
   never overrides a variable that the environment already sets.

Nothing here ever passes a secret to boto3, MLflow or Prefect explicitly: boto3's default credential chain reads
the same variables, so the values stay out of every call signature (and so out of Prefect's parameter records and
MLflow params). :func:`redact` and :class:`RedactingFilter` scrub the known values from text and log records, and
:func:`assert_no_secrets` is the guard run on anything about to be stored (MLflow params and tags, flow-run
parameters, reports).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Environment variables whose values are secrets regardless of their name pattern.
SECRET_ENV_VARS = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "PREFECT_API_KEY",
        "PREFECT_API_AUTH_STRING",
        "POSTGRES_PASSWORD",
    }
)
# Any other variable whose name matches this is treated as a secret too (e.g. S3_SECRET_KEY, DB_PASSWORD).
_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY|AUTH_STRING|CREDENTIAL)", re.IGNORECASE)
# Values shorter than this are not redacted: "1" or "true" in a variable called *_TOKEN_ENABLED would otherwise
# blank out every digit in a log. Real keys are far longer.
_MIN_SECRET_LEN = 6
MASK = "***"
DEFAULT_LOCAL_ENV = ".qvggt.env"


class SecretLeakError(ValueError):
    """A value about to be stored (a param, tag, log or artifact) contains a secret."""


def is_secret_name(name: str) -> bool:
    """True when an environment variable of this name holds a secret."""
    return name in SECRET_ENV_VARS or bool(_SECRET_NAME.search(name))


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of all secret variables in ``env`` (default ``os.environ``), longest first, deduplicated."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if is_secret_name(k) and v and len(v) >= _MIN_SECRET_LEN}
    # Longest first so that a secret containing another is masked whole.
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every known secret value replaced by ``***`` and passwords in URLs masked."""
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}@", text)


# scheme://user:password@host -> scheme://user:***@host, wherever it occurs in a text.
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]+:)[^/\s@]+@")


def safe_url(url: str) -> str:
    """A URL fit for logs and tags: the password of ``user:password@host`` replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{MASK}@{host}"))


def assert_no_secrets(values: Mapping[str, object] | Iterable[object], what: str = "values") -> None:
    """Raise :class:`SecretLeakError` if any key or value (stringified) contains a known secret.

    The error names the offending key, never the secret. Call it on MLflow params and tags, flow-run parameters
    and anything written to a report before storing them.
    """
    secrets = secret_values()
    items = values.items() if isinstance(values, Mapping) else enumerate(values)
    for key, value in items:
        for text in (str(key), str(value)):
            if any(s in text for s in secrets) or _URL_PASSWORD.search(text):
                raise SecretLeakError(
                    f"{what}: entry {key!r} contains a credential; pass credentials through the environment "
                    "(AWS_* variables, .qvggt.env) and store only their names"
                )


class RedactingFilter(logging.Filter):
    """A logging filter that masks secret values in every record's final message.

    Install it on a handler (``handler.addFilter(RedactingFilter())``) or use :func:`install_log_redaction`.
    The secrets are re-read from the environment per record, so credentials set after start-up are covered.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger), once."""
    logger = logging.getLogger() if logger is None else logger
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _tracked_by_git(path: Path) -> bool:
    """True when git tracks ``path`` (False outside a work tree or without git)."""
    try:
        result = subprocess.run(
            ["git", "ls-files", "--error-unmatch", path.name],
            cwd=path.parent,
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:
        return False
    return result.returncode == 0


def load_local_env(path: str | Path = DEFAULT_LOCAL_ENV, *, override: bool = False) -> list[str]:
    """Read ``KEY=VALUE`` lines from a git-ignored local file into ``os.environ``; return the names set.

    Blank lines and ``#`` comments are skipped; values may be quoted. Variables already in the environment win
    unless ``override``. A missing file is not an error (returns ``[]``). A file that git tracks raises
    ValueError: its secrets would be in the repository's history.
    """
    path = Path(path)
    if not path.is_file():
        return []
    if _tracked_by_git(path.resolve()):
        raise ValueError(
            f"{path} is tracked by git; secrets must not be committed. Run `git rm --cached {path}`, add it to "
            ".gitignore and rotate the credentials it held"
        )
    names = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            # The line itself may hold a secret: name only its number.
            raise ValueError(f"{path}:{lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if override or key not in os.environ:
            os.environ[key] = value
            names.append(key)
    return names
