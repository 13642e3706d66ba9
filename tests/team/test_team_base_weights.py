"""s3:// base weights: the quantize flow's fetch step pulls them into the local weights cache, sha256-verified,
against moto on loopback (and through the 503-injecting proxy). The flow end to end with s3:// weights runs in
test_team_results.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest
import torch
from team_testing import BUCKET, FaultProxy

from qvggt.io import sha256_file
from qvggt.model import load_vggt, save_checkpoint
from qvggt.pipeline.storage import ChecksumMismatch, S3Settings, S3Store, TransferError, fetch

KEY = "base/tiny/model.safetensors"


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    return save_checkpoint(load_vggt(preset="tiny"), tmp_path_factory.mktemp("base") / "model.safetensors")


def _push(endpoint: str, path: Path, key: str) -> str:
    result = S3Store(S3Settings(bucket=BUCKET, prefix="", endpoint_url=endpoint)).push(path, key)
    return result.sha256


def test_fetch_task_pulls_verified_copy_once(
    s3_endpoint: str, base_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tasks` is a top-level folder of the repo
    from tasks.steps import fetch_base_weights

    digest = _push(s3_endpoint, base_checkpoint, KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("QVGGT_WEIGHTS_CACHE", str(tmp_path / "cache"))
    local = Path(fetch_base_weights.fn(f"s3://{BUCKET}/{KEY}"))
    assert local == tmp_path / "cache" / BUCKET / KEY
    assert sha256_file(local) == digest
    load_vggt(local)  # a usable checkpoint, not just bytes
    stat = local.stat()
    again = Path(fetch_base_weights.fn(f"s3://{BUCKET}/{KEY}"))  # verified local copy: nothing downloaded
    assert again == local and (local.stat().st_ino, local.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert [p.name for p in local.parent.iterdir()] == ["model.safetensors"]  # no temp files left


def test_fetch_refuses_what_it_cannot_verify(
    s3_endpoint: str, base_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_endpoint)
    cache = tmp_path / "cache"
    good_sha = _push(s3_endpoint, base_checkpoint, KEY)
    good = fetch(f"s3://{BUCKET}/{KEY}", cache)
    # Replaced behind S3Store's back: new weights are announced (a new sha256 record) but the bytes are corrupt.
    # The download is rejected, the previous local copy stays in place, and no temp file is left.
    tampered = bytearray(base_checkpoint.read_bytes())
    tampered[-1] ^= 0xFF
    announced = hashlib.sha256(b"the new weights that should have been uploaded").hexdigest()
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=bytes(tampered), Metadata={"sha256": announced})
    with pytest.raises(ChecksumMismatch, match="downloaded sha256"):
        fetch(f"s3://{BUCKET}/{KEY}", cache)
    assert sha256_file(good) == good_sha and [p.name for p in good.parent.iterdir()] == [good.name]
    # Into an empty cache: nothing is left at all.
    with pytest.raises(ChecksumMismatch):
        fetch(f"s3://{BUCKET}/{KEY}", tmp_path / "empty")
    assert not (tmp_path / "empty" / BUCKET / KEY).exists()
    # Uploaded without a sha256 record (e.g. `aws s3 cp`): refused, naming the fix.
    s3.put_object(Bucket=BUCKET, Key="base/plain/model.safetensors", Body=base_checkpoint.read_bytes())
    with pytest.raises(ChecksumMismatch, match="no sha256 metadata"):
        fetch(f"s3://{BUCKET}/base/plain/model.safetensors", cache)
    assert not (cache / BUCKET / "base" / "plain" / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fetch(f"s3://{BUCKET}/base/missing/model.safetensors", cache)
    with pytest.raises(ValueError, match=r"\.\."):
        fetch(f"s3://{BUCKET}/base/../../etc/model.safetensors", cache)
    _push(s3_endpoint, base_checkpoint, KEY)  # restore the object for the other tests


def test_fetch_retries_transient_503(
    fault_proxy: FaultProxy, base_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = _push(fault_proxy.url, base_checkpoint, "base/retry/model.safetensors")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.url)
    plan = fault_proxy.fail_next(3, lambda method, path: method == "GET" and "base/retry" in path)
    local = fetch(f"s3://{BUCKET}/base/retry/model.safetensors", tmp_path)
    assert plan.served == 3 and hashlib.sha256(local.read_bytes()).hexdigest() == digest
    # Beyond the configured attempts it fails as a TransferError naming the knob, leaving nothing behind.
    monkeypatch.setenv("QVGGT_S3_MAX_ATTEMPTS", "2")
    fault_proxy.fail_next(10, lambda method, path: method == "GET" and "base/retry" in path)
    with pytest.raises(TransferError, match="QVGGT_S3_MAX_ATTEMPTS"):
        fetch(f"s3://{BUCKET}/base/retry/model.safetensors", tmp_path / "other")
    fault_proxy.fail_next(0)
    assert not (tmp_path / "other" / BUCKET / "base" / "retry" / "model.safetensors").exists()


def test_flow_task_retries_transfer_errors_not_checksum_mismatches() -> None:
    """The fetch step's retry condition: a failed transfer is tried again later; a corrupt object is not."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tasks.common import is_transient

    assert is_transient(TransferError("download failed after 8 attempts"))
    assert not is_transient(ChecksumMismatch("downloaded sha256 differs"))
