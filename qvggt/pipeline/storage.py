"""Artifacts in S3 (AWS or any S3-compatible store): verified push and pull through boto3.

- **Checksums.** :meth:`S3Store.push` stores the file's sha256 in the object's user metadata (``x-amz-meta-
  sha256``); :meth:`S3Store.pull` downloads to a temp file beside the target, recomputes the sha256 and only then
  renames it into place (:func:`qvggt.io.atomic_path`): a corrupt, truncated or swapped object raises
  :class:`ChecksumMismatch` and leaves no file a later step would trust. The metadata also makes a pull of an
  unchanged file a no-op (the local sha256 already matches).
- **Multipart.** Files at or above ``multipart_threshold`` bytes go up in ``multipart_chunksize`` parts
  (boto3's transfer manager); the sha256 covers the whole file, unlike a multipart ETag.
- **Configuration from the environment only.** Bucket, prefix, endpoint and sizes come from ``QVGGT_S3_*`` and
  the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / ``AWS_DEFAULT_REGION``; credentials are never
  passed in code: boto3's default chain reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or a profile, an
  instance role, ...). See :mod:`qvggt.pipeline.credentials`.
- **Retries.** botocore's ``standard`` retry mode retries throttling (``SlowDown``, 429), 500/502/503/504 and
  connection errors with exponential backoff and jitter, per request, so one failed part of a multipart upload
  is retried alone. ``max_attempts`` counts the first try.

This module is for tasks, flows and tests; core ``qvggt`` modules never import it (boto3 is a pipeline extra).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from qvggt.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

SHA256_META = "sha256"  # user-metadata key; S3 stores it as x-amz-meta-sha256
MiB = 1 << 20


class ChecksumMismatch(IOError):
    """A downloaded object's sha256 differs from the one recorded at upload (or the record is missing)."""


class TransferError(ConnectionError):
    """An upload or download failed after all retries. A ConnectionError (so an OSError), which the flow tasks'
    retry condition (``tasks/common.py:is_transient``) treats as transient: the task is retried later as a whole."""


class StorageConfigError(ValueError):
    """The S3 settings are missing or invalid."""


def _int_env(env: dict[str, str] | os._Environ, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StorageConfigError(f"{name}={raw!r} is not an integer") from None
    if value <= 0:
        raise StorageConfigError(f"{name} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class S3Settings:
    """Where artifacts live and how they are moved. No credentials: those stay in the environment.

    bucket: bucket name (``QVGGT_S3_BUCKET``, required).
    prefix: key prefix under which this project's objects live (``QVGGT_S3_PREFIX``, default ``qvggt``).
    endpoint_url: S3-compatible endpoint, None for AWS (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``).
    region: ``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (default ``us-east-1``, which S3-compatible stores accept).
    multipart_threshold / multipart_chunksize: bytes (``QVGGT_S3_MULTIPART_THRESHOLD`` / ``..._CHUNKSIZE``);
        S3 requires parts of at least 5 MiB except the last.
    max_attempts: tries per request, the first included (``QVGGT_S3_MAX_ATTEMPTS``).
    max_concurrency: parallel part transfers (``QVGGT_S3_MAX_CONCURRENCY``; 1 = no threads).
    connect_timeout / read_timeout: seconds per request.
    """

    bucket: str
    prefix: str = "qvggt"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_attempts: int = 8
    max_concurrency: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.bucket:
            raise StorageConfigError("S3 bucket is empty: set QVGGT_S3_BUCKET")
        if self.multipart_chunksize < 5 * MiB:
            raise StorageConfigError(
                f"multipart_chunksize must be >= 5 MiB (S3's minimum part size), got {self.multipart_chunksize}"
            )
        if min(self.multipart_threshold, self.max_attempts, self.max_concurrency) < 1:
            raise StorageConfigError("multipart_threshold, max_attempts and max_concurrency must be positive")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> S3Settings:
        """Settings from environment variables (see the class docstring); keyword overrides win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "bucket": env.get("QVGGT_S3_BUCKET", ""),
            "prefix": env.get("QVGGT_S3_PREFIX", "qvggt"),
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            "region": env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
            "multipart_threshold": _int_env(env, "QVGGT_S3_MULTIPART_THRESHOLD", 64 * MiB),
            "multipart_chunksize": _int_env(env, "QVGGT_S3_MULTIPART_CHUNKSIZE", 16 * MiB),
            "max_attempts": _int_env(env, "QVGGT_S3_MAX_ATTEMPTS", 8),
            "max_concurrency": _int_env(env, "QVGGT_S3_MAX_CONCURRENCY", 4),
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class PushResult:
    """What :meth:`S3Store.push` stored: the ``s3://`` URI, the sha256 and size, and whether an upload happened."""

    uri: str
    sha256: str
    size: int
    etag: str
    uploaded: bool


@dataclass
class S3Store:
    """Verified artifact transfers to one bucket/prefix. Build with ``S3Store.from_env()`` or from settings."""

    settings: S3Settings
    client: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.client is None:
            self.client = make_client(self.settings)

    @classmethod
    def from_env(cls, **overrides: Any) -> S3Store:
        return cls(S3Settings.from_env(**overrides))

    @property
    def transfer_config(self) -> TransferConfig:
        s = self.settings
        return TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency,
            use_threads=s.max_concurrency > 1,
        )

    # -- keys and URIs -------------------------------------------------------------------------------------

    def key(self, name: str) -> str:
        """Object key of ``name`` (relative, ``/``-separated) under the configured prefix."""
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"artifact name must be a relative path without '..', got {name!r}")
        return str(PurePosixPath(self.settings.prefix) / rel) if self.settings.prefix else str(rel)

    def uri(self, name: str) -> str:
        return f"s3://{self.settings.bucket}/{self.key(name)}"

    # -- metadata ------------------------------------------------------------------------------------------

    def head(self, name: str) -> dict[str, Any] | None:
        """The object's HEAD response, or None when it does not exist."""
        try:
            return self.client.head_object(Bucket=self.settings.bucket, Key=self.key(name))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def remote_sha256(self, name: str) -> str | None:
        """The sha256 recorded in the object's metadata (None if the object or the record is missing)."""
        head = self.head(name)
        return None if head is None else head.get("Metadata", {}).get(SHA256_META)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (for tests and first-time set-up of a self-hosted store)."""
        try:
            self.client.head_bucket(Bucket=self.settings.bucket)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            region = self.client.meta.region_name
            # AWS refuses a create without LocationConstraint outside us-east-1 (and one naming us-east-1).
            config = {} if region in (None, "", "us-east-1") else {
                "CreateBucketConfiguration": {"LocationConstraint": region}
            }  # fmt: skip
            self.client.create_bucket(Bucket=self.settings.bucket, **config)

    # -- transfers -----------------------------------------------------------------------------------------

    def push(self, path: str | Path, name: str, *, skip_unchanged: bool = True) -> PushResult:
        """Upload ``path`` as ``name`` with its sha256 in the metadata; return where it went.

        With ``skip_unchanged`` an object that already records the same sha256 is not uploaded again. After the
        upload the object's metadata is read back and compared (a store that drops user metadata would
        otherwise make every later pull fail).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cannot push {path}: not a file")
        digest = sha256_file(path)
        size = path.stat().st_size
        key = self.key(name)
        if skip_unchanged:
            head = self.head(name)
            if head is not None and head.get("Metadata", {}).get(SHA256_META) == digest:
                log.info("s3 push skipped (unchanged): %s", self.uri(name))
                return PushResult(self.uri(name), digest, size, head.get("ETag", "").strip('"'), False)
        try:
            self.client.upload_file(
                str(path),
                self.settings.bucket,
                key,
                ExtraArgs={"Metadata": {SHA256_META: digest}},
                Config=self.transfer_config,
            )
        except (S3UploadFailedError, ClientError, BotoCoreError) as err:
            raise TransferError(self._failure("upload of", path, name, err)) from err
        head = self.head(name)
        if head is None or head.get("Metadata", {}).get(SHA256_META) != digest:
            raise ChecksumMismatch(
                f"{self.uri(name)}: the store did not keep the sha256 metadata just written; "
                "check that the S3-compatible store supports user metadata (x-amz-meta-*)"
            )
        if head.get("ContentLength") != size:
            raise ChecksumMismatch(f"{self.uri(name)}: stored {head.get('ContentLength')} bytes, sent {size}")
        log.info("s3 push: %s (%d bytes, sha256 %s)", self.uri(name), size, digest[:12])
        return PushResult(self.uri(name), digest, size, head.get("ETag", "").strip('"'), True)

    def pull(self, name: str, path: str | Path) -> Path:
        """Download ``name`` to ``path`` atomically and verify its sha256; return ``path``.

        If ``path`` already holds a file with the recorded sha256 nothing is downloaded. Raises
        FileNotFoundError for a missing object and :class:`ChecksumMismatch` for an object without a sha256
        record or whose bytes do not match it (``path`` is then left as it was).
        """
        path = Path(path)
        head = self.head(name)
        if head is None:
            raise FileNotFoundError(f"{self.uri(name)} does not exist")
        expected = head.get("Metadata", {}).get(SHA256_META)
        if not expected:
            raise ChecksumMismatch(
                f"{self.uri(name)} has no sha256 metadata, so it cannot be verified; re-upload it with "
                "S3Store.push (or `qvggt` tasks), which records one"
            )
        if path.is_file() and sha256_file(path) == expected:
            log.info("s3 pull skipped (local copy verified): %s", path)
            return path
        with atomic_path(path) as tmp:
            # VersionId pins the download to the version whose metadata we just read, where the bucket is
            # versioned; otherwise a concurrent overwrite is caught by the checksum below.
            extra = {"VersionId": head["VersionId"]} if head.get("VersionId") not in (None, "null") else None
            try:
                self.client.download_file(
                    self.settings.bucket, self.key(name), str(tmp), ExtraArgs=extra, Config=self.transfer_config
                )
            except (ClientError, BotoCoreError) as err:
                raise TransferError(self._failure("download to", path, name, err)) from err
            actual = sha256_file(tmp)
            if actual != expected:
                raise ChecksumMismatch(
                    f"{self.uri(name)}: downloaded sha256 {actual[:12]}... != recorded {expected[:12]}...; "
                    "the object was corrupted or overwritten, push it again"
                )
        log.info("s3 pull: %s -> %s (sha256 verified)", self.uri(name), path)
        return path

    def _failure(self, what: str, path: Path, name: str, err: Exception) -> str:
        # botocore's messages name the operation and status, never the credentials.
        return (
            f"{what} {path} ({self.uri(name)}) failed after up to {self.settings.max_attempts} attempts: {err}. "
            f"Check that the endpoint ({self.settings.endpoint_url or 'AWS'}) is reachable and the AWS_* "
            "credentials are valid; raise QVGGT_S3_MAX_ATTEMPTS for a flaky link"
        )

    def push_dir(self, folder: str | Path, name: str) -> list[PushResult]:
        """Push every file under ``folder`` (recursively, sorted) to ``name/<relative path>``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"cannot push {folder}: not a folder")
        return [
            self.push(p, f"{name}/{p.relative_to(folder).as_posix()}") for p in sorted(folder.rglob("*")) if p.is_file()
        ]

    def pull_dir(self, name: str, folder: str | Path) -> list[Path]:
        """Pull every object under ``name/`` into ``folder`` (each verified); return the local paths."""
        folder = Path(folder)
        prefix = self.key(name).rstrip("/") + "/"
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                out.append(self.pull(f"{name}/{rel}", folder / rel))
        return out


def make_client(settings: S3Settings) -> Any:
    """A boto3 S3 client for ``settings`` with standard-mode retries; credentials from boto3's default chain."""
    config = Config(
        region_name=settings.region,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # Path-style addressing for custom endpoints: self-hosted stores (SeaweedFS, Garage, moto) rarely have
        # wildcard DNS for virtual-hosted bucket names. On AWS itself boto3 picks the style.
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
    )
    # A fresh Session per client: the default session caches credentials, which would keep a rotated key alive.
    return boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, config=config)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; ValueError naming the expected form otherwise."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"expected s3://<bucket>/<key>, got {uri!r}")
    return bucket, key


WEIGHTS_CACHE_ENV = "QVGGT_WEIGHTS_CACHE"


def weights_cache_dir(env: dict[str, str] | os._Environ | None = None) -> Path:
    """Where ``s3://`` base weights are kept locally: ``QVGGT_WEIGHTS_CACHE``, default ``~/.cache/qvggt/weights``."""
    env = os.environ if env is None else env
    return Path(env.get(WEIGHTS_CACHE_ENV) or Path.home() / ".cache" / "qvggt" / "weights").expanduser()


def fetch(uri: str, cache_dir: str | Path, client: Any | None = None) -> Path:
    """A verified local copy of ``s3://bucket/key`` at ``<cache_dir>/<bucket>/<key>``; its path.

    :meth:`S3Store.pull` semantics: the object must record its sha256 (pushed with :class:`S3Store`); the bytes
    are downloaded beside the target, checked against it and only then renamed into place, so a corrupt download
    never replaces a good copy. A copy that already matches is not downloaded again. Endpoint, retries and
    credentials as for every ``S3Store`` (the environment).
    """
    bucket, key = parse_s3_uri(uri)
    settings = S3Settings.from_env(env={**os.environ, "QVGGT_S3_BUCKET": bucket}, prefix="")
    store = S3Store(settings, client)
    local = Path(cache_dir) / bucket / store.key(key)  # key() refuses '..' and absolute keys
    return store.pull(key, local)


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a weights file: ``kind`` is ``sha256`` (content hash) or ``etag`` (S3 object without one).

    ``tag`` is the MLflow tag that records it on a model version: ``base_sha256`` or ``base_etag``.
    """

    kind: str
    value: str

    @property
    def tag(self) -> str:
        return f"base_{self.kind}"


def fingerprint(source: str | Path, client: Any | None = None) -> Fingerprint:
    """The fingerprint of base weights at ``source``: a local file or an ``s3://bucket/key`` object.

    A local file is hashed (sha256). For an S3 object no bytes are read: the sha256 that :meth:`S3Store.push`
    recorded in its metadata is used when present, else its ETag (which changes whenever the object is replaced;
    a multipart ETag is not an MD5, so it is only compared for equality, never recomputed). Raises
    FileNotFoundError when the file or object does not exist.
    """
    text = str(source)
    if not text.startswith("s3://"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"base weights {path} do not exist (or are not a file)")
        return Fingerprint("sha256", sha256_file(path))
    bucket, key = parse_s3_uri(text)
    if client is None:
        client = make_client(S3Settings.from_env(env={**os.environ, "QVGGT_S3_BUCKET": bucket}))
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"base weights {text} do not exist") from None
        raise
    digest = head.get("Metadata", {}).get(SHA256_META)
    if digest:
        return Fingerprint("sha256", digest)
    return Fingerprint("etag", head["ETag"].strip('"'))
