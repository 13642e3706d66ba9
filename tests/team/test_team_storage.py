"""S3 artifact push/pull against moto's server on loopback: checksum round trips, multipart, verification
failures, and transient 503s injected on the wire by a proxy and absorbed by botocore's retries."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from team_testing import BUCKET, FaultProxy

from qvggt.io import sha256_file
from qvggt.pipeline.storage import ChecksumMismatch, S3Settings, S3Store, StorageConfigError, TransferError

MiB = 1 << 20


def _store(endpoint: str, **kw: object) -> S3Store:
    # Everything from the environment except the endpoint, which the fixture chooses.
    return S3Store(S3Settings.from_env(env={"QVGGT_S3_BUCKET": BUCKET, **os.environ}, endpoint_url=endpoint, **kw))


def _random_file(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(hashlib.shake_256(str(seed).encode()).digest(size))
    return path


def test_settings_from_env_and_errors() -> None:
    env = {
        "QVGGT_S3_BUCKET": "b",
        "QVGGT_S3_PREFIX": "team/x",
        "AWS_ENDPOINT_URL_S3": "http://store:8333",
        "QVGGT_S3_MULTIPART_THRESHOLD": str(8 * MiB),
        "QVGGT_S3_MULTIPART_CHUNKSIZE": str(5 * MiB),
    }
    s = S3Settings.from_env(env=env)
    assert (s.bucket, s.prefix, s.endpoint_url, s.multipart_threshold, s.multipart_chunksize) == (
        "b", "team/x", "http://store:8333", 8 * MiB, 5 * MiB,
    )  # fmt: skip
    with pytest.raises(StorageConfigError, match="QVGGT_S3_BUCKET"):
        S3Settings.from_env(env={})
    with pytest.raises(StorageConfigError, match="5 MiB"):
        S3Settings.from_env(env={**env, "QVGGT_S3_MULTIPART_CHUNKSIZE": "1024"})
    with pytest.raises(StorageConfigError, match="not an integer"):
        S3Settings.from_env(env={**env, "QVGGT_S3_MAX_ATTEMPTS": "many"})


def test_key_rejects_escapes(s3_endpoint: str) -> None:
    store = _store(s3_endpoint)
    assert store.key("a/b.txt") == "qvggt/a/b.txt"
    for bad in ("/etc/passwd", "../x", ""):
        with pytest.raises(ValueError, match="relative path"):
            store.key(bad)


def test_push_pull_round_trip(s3_endpoint: str, tmp_path: Path) -> None:
    store = _store(s3_endpoint, prefix="roundtrip")
    src = _random_file(tmp_path / "small.bin", 12345)
    pushed = store.push(src, "ckpt/small.bin")
    assert pushed.uploaded and pushed.uri == f"s3://{BUCKET}/roundtrip/ckpt/small.bin"
    assert pushed.sha256 == sha256_file(src) == store.remote_sha256("ckpt/small.bin")
    # The same bytes again: nothing is uploaded.
    assert not store.push(src, "ckpt/small.bin").uploaded
    dst = store.pull("ckpt/small.bin", tmp_path / "out" / "small.bin")
    assert dst.read_bytes() == src.read_bytes()
    # No temp files are left beside the target.
    assert sorted(p.name for p in dst.parent.iterdir()) == ["small.bin"]


def test_multipart_round_trip(s3_endpoint: str, tmp_path: Path) -> None:
    store = _store(s3_endpoint, prefix="multipart", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    src = _random_file(tmp_path / "big.bin", 11 * MiB + 17, seed=1)
    pushed = store.push(src, "big.bin")
    # A multipart ETag is "<md5 of part md5s>-<part count>": 11 MiB in 5 MiB parts -> 3 parts.
    assert pushed.etag.endswith("-3"), pushed.etag
    assert store.remote_sha256("big.bin") == sha256_file(src)
    dst = store.pull("big.bin", tmp_path / "big.out")
    assert sha256_file(dst) == pushed.sha256


def test_dir_round_trip(s3_endpoint: str, tmp_path: Path) -> None:
    store = _store(s3_endpoint, prefix="dirs")
    src = tmp_path / "report"
    _random_file(src / "metrics.json", 100)
    _random_file(src / "plots" / "a.png", 2000, seed=2)
    assert len(store.push_dir(src, "eval/run1")) == 2
    pulled = store.pull_dir("eval/run1", tmp_path / "copy")
    assert sorted(p.relative_to(tmp_path / "copy").as_posix() for p in pulled) == ["metrics.json", "plots/a.png"]
    assert (tmp_path / "copy" / "plots" / "a.png").read_bytes() == (src / "plots" / "a.png").read_bytes()


def test_corrupt_object_is_rejected_and_target_untouched(s3_endpoint: str, tmp_path: Path) -> None:
    store = _store(s3_endpoint, prefix="corrupt")
    src = _random_file(tmp_path / "w.bin", 4096)
    pushed = store.push(src, "w.bin")
    # Overwrite the bytes behind the store's back, keeping the old sha256 record (a silent corruption).
    store.client.put_object(
        Bucket=BUCKET, Key=store.key("w.bin"), Body=b"not the weights", Metadata={"sha256": pushed.sha256}
    )
    target = tmp_path / "local.bin"
    target.write_bytes(b"previous good copy")
    with pytest.raises(ChecksumMismatch, match="push it again"):
        store.pull("w.bin", target)
    assert target.read_bytes() == b"previous good copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.bin", "w.bin"]


def test_object_without_checksum_is_refused(s3_endpoint: str, tmp_path: Path) -> None:
    store = _store(s3_endpoint, prefix="nosum")
    store.client.put_object(Bucket=BUCKET, Key=store.key("x.bin"), Body=b"abc")
    with pytest.raises(ChecksumMismatch, match="no sha256 metadata"):
        store.pull("x.bin", tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.pull("missing.bin", tmp_path / "m.bin")


def test_transient_503_is_retried(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """Three 503 SlowDown answers on PUTs: botocore backs off and the upload succeeds, then a GET does too."""
    store = _store(fault_proxy.url, prefix="flaky", max_attempts=6)
    src = _random_file(tmp_path / "f.bin", 50_000, seed=3)
    plan = fault_proxy.fail_next(3, match=lambda method, path: method == "PUT")
    start = time.monotonic()
    pushed = store.push(src, "f.bin")
    assert plan.served == 3 and plan.remaining == 0
    assert pushed.uploaded and store.remote_sha256("f.bin") == sha256_file(src)
    # Downloads too: two 503s on GET.
    plan = fault_proxy.fail_next(2, match=lambda method, path: method == "GET")
    store.pull("f.bin", tmp_path / "g.bin")
    assert plan.served == 2
    assert (tmp_path / "g.bin").read_bytes() == src.read_bytes()
    assert time.monotonic() - start < 60


def test_multipart_part_retried_alone(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A 503 on one part of a multipart upload retries that part; the object is whole and verified."""
    store = _store(
        fault_proxy.url, prefix="flaky-mp", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_attempts=4
    )
    src = _random_file(tmp_path / "mp.bin", 10 * MiB + 1, seed=4)
    plan = fault_proxy.fail_next(2, match=lambda method, path: method == "PUT" and "partNumber=2" in path)
    pushed = store.push(src, "mp.bin")
    assert plan.served == 2
    assert pushed.etag.endswith("-3")
    assert sha256_file(store.pull("mp.bin", tmp_path / "mp.out")) == pushed.sha256


def test_persistent_fault_fails_with_clear_error(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """More 503s than attempts: the error surfaces (no silent success) and nothing is left locally."""
    store = _store(fault_proxy.url, prefix="down", max_attempts=2)
    src = _random_file(tmp_path / "d.bin", 1000)
    fault_proxy.fail_next(100, match=lambda method, path: method == "PUT")
    try:
        with pytest.raises(TransferError, match="SlowDown.*QVGGT_S3_MAX_ATTEMPTS") as err:
            store.push(src, "d.bin")
        assert isinstance(err.value, OSError)
    finally:
        fault_proxy.fail_next(0)


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_ensure_bucket_in_any_region(s3_endpoint: str, region: str) -> None:
    """Outside us-east-1 S3 refuses a create without a LocationConstraint (moto enforces it as AWS does)."""
    store = S3Store(S3Settings(bucket=f"made-in-{region}", prefix="p", endpoint_url=s3_endpoint, region=region))
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    assert store.client.head_bucket(Bucket=f"made-in-{region}")["ResponseMetadata"]["HTTPStatusCode"] == 200
