"""A task cache that machines share: Prefect result storage in S3, plus the artifacts the cached results name.

Prefect decides a cache hit from the result record alone (stored under the task's cache key), so records in a
bucket give every machine the same hits. But the cached results of ``quantize-vggt`` are *paths* (the pool, the
features, the checkpoints, metrics.json): a hit on another machine is only useful if those files come with it. So,
with ``QVGGT_RESULT_STORAGE=s3://<bucket>/<prefix>``:

- result records go to ``s3://<bucket>/<prefix>/results/<cache key>`` through a prefect-aws ``S3Bucket`` block.
  Prefect only takes result storage that is saved on its server, so the flow references the block by name
  (:attr:`SharedCache.block_ref`, one name per bucket/prefix/endpoint) and saves it before a run
  (:meth:`SharedCache.save_block`: ``flows/quantize_vggt.py`` does so when started by hand, the deployments' pull
  step with ``python -m qvggt.pipeline.results save-block``);
- the folder of each cached step's output is pushed to ``s3://<bucket>/<prefix>/artifacts/<folder>`` with
  :class:`~qvggt.pipeline.storage.S3Store` (sha256 recorded, unchanged files not sent again), where ``<folder>``
  is its path relative to the working directory (the repository root on a worker, so every machine agrees);
- a cache hit whose file is missing locally is pulled from there (sha256 verified) before the flow would
  recompute it.

Endpoint and credentials are the ones :class:`S3Store` uses (``AWS_ENDPOINT_URL_S3``, boto3's default chain):
the saved ``S3Bucket`` block holds the bucket, folder and endpoint, never a key.

Limits: output folders must lie under the working directory (``pipeline.out_dir`` relative, as by default; an
absolute one is not shared, and its cache keys differ between machines anyway). Each step writes into a folder
named by its cache key (``tasks.common.keyed_dir``), so parameter sets sharing an ``out_dir`` never overwrite each
other's artifacts, here or in the bucket.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvggt.pipeline.storage import S3Settings, S3Store, StorageConfigError, parse_s3_uri

log = logging.getLogger(__name__)

ENV = "QVGGT_RESULT_STORAGE"


@dataclass(frozen=True)
class SharedCache:
    """Where a team's task cache lives: result records under ``<prefix>/results``, artifacts under
    ``<prefix>/artifacts`` of ``bucket``; endpoint, region and retries as in :class:`S3Settings`."""

    bucket: str
    prefix: str
    settings: S3Settings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SharedCache | None:
        """From ``QVGGT_RESULT_STORAGE`` (``s3://bucket/prefix``); None when it is unset or empty (local cache)."""
        env = os.environ if env is None else env
        uri = (env.get(ENV) or "").strip()
        if not uri:
            return None
        try:
            bucket, prefix = parse_s3_uri(uri)
        except ValueError:
            raise StorageConfigError(f"{ENV}={uri!r}: expected s3://<bucket>/<prefix>") from None
        prefix = prefix.strip("/")
        if not prefix:
            raise StorageConfigError(f"{ENV}={uri!r}: give a key prefix, e.g. s3://{bucket}/prefect-cache")
        settings = S3Settings.from_env(env={**env, "QVGGT_S3_BUCKET": bucket}, prefix=f"{prefix}/artifacts")
        return cls(bucket, prefix, settings)

    @property
    def block_name(self) -> str:
        """The saved block's name: one per bucket, prefix and endpoint, so two configurations never clobber."""
        ident = f"{self.bucket}/{self.prefix}@{self.settings.endpoint_url or 'aws'}"
        return f"qvggt-results-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"

    @property
    def block_ref(self) -> str:
        """What a flow's ``result_storage`` takes: ``s3-bucket/<block name>``, resolved when a run starts."""
        return f"s3-bucket/{self.block_name}"

    def save_block(self) -> str:
        """Save (or refresh) the result-storage block on the Prefect server of this process; its reference."""
        self.result_storage().save(self.block_name, overwrite=True)
        return self.block_ref

    def result_storage(self) -> Any:
        """A prefect-aws ``S3Bucket`` for ``s3://<bucket>/<prefix>/results``, credentials from boto3's chain."""
        from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

        s = self.settings
        config = {
            "retries": {"max_attempts": s.max_attempts, "mode": "standard"},
            # Path-style for custom endpoints, as S3Store does (self-hosted stores rarely resolve bucket subdomains).
            "s3": {"addressing_style": "path" if s.endpoint_url else "auto"},
        }
        params = AwsClientParameters(endpoint_url=s.endpoint_url, config=config)
        credentials = AwsCredentials(region_name=s.region, aws_client_parameters=params)  # no keys: the env's
        return S3Bucket(bucket_name=self.bucket, bucket_folder=f"{self.prefix}/results", credentials=credentials)

    def artifacts(self) -> S3Store:
        return S3Store(self.settings)

    def artifact_name(self, folder: str | Path) -> str | None:
        """``folder`` relative to the working directory, as an object name; None if it lies outside it."""
        try:
            rel = Path(folder).resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            return None
        return rel.as_posix() if rel.parts else None

    def share(self, folder: str | Path) -> int:
        """Push every file of ``folder`` (unchanged ones are skipped); the number uploaded. 0 if not shareable."""
        name = self.artifact_name(folder)
        if name is None or not Path(folder).is_dir():
            log.warning("not shared (outside the working directory or missing): %s", folder)
            return 0
        return sum(r.uploaded for r in self.artifacts().push_dir(folder, name))

    def restore(self, folder: str | Path) -> int:
        """Pull ``folder``'s shared files (each sha256-verified); the number of files now in place there."""
        name = self.artifact_name(folder)
        if name is None:
            return 0
        pulled = self.artifacts().pull_dir(name, folder)
        if pulled:
            log.info("restored %d shared artifact(s) into %s", len(pulled), folder)
        return len(pulled)


def main(argv: list[str] | None = None) -> int:
    """``python -m qvggt.pipeline.results save-block``: save the block for ``QVGGT_RESULT_STORAGE`` (a no-op when
    it is unset), e.g. as a deployment's pull step before the flow is loaded."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["save-block"]:
        print("usage: python -m qvggt.pipeline.results save-block", file=sys.stderr)
        return 2
    cache = SharedCache.from_env()
    if cache is None:
        print(f"{ENV} is not set: results stay in local storage")
        return 0
    print(f"saved result storage {cache.save_block()} -> s3://{cache.bucket}/{cache.prefix}/results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
