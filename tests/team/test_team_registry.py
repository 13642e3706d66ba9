"""MLflow tracking server on SQLite with artifacts proxied into the moto bucket, and the champion alias rule."""

from __future__ import annotations

import math
from pathlib import Path

import boto3
import pytest
from team_testing import BUCKET, Server

from qvggt.pipeline.registry import (
    CHAMPION,
    MIN_BASE_AUC30,
    Candidate,
    CandidateMetrics,
    current_champion,
    register_candidate,
    registered_model_name,
    select_champion,
    update_champion,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


def _m(
    ret: float, low: float, nbytes: int, speedup: float | None = None, base: float = 90.0, fid: float = math.nan
) -> CandidateMetrics:
    """A candidate; by default of a strong base model (AUC@30 90 %), where fidelity is not asked for."""
    return CandidateMetrics(ret, low, nbytes, speedup, base, fid)


# -- the rule, pure -----------------------------------------------------------------------------------------------


def test_quality_gate() -> None:
    assert _m(99.0, 98.0, 10).eligible
    assert not _m(97.9, 97.0, 10).eligible  # point estimate below 98 %
    assert not _m(99.5, 96.0, 10).eligible  # interval does not exclude a > 2 % loss
    assert not _m(math.nan, math.nan, 10).eligible  # base AUC@30 = 0: retention undefined
    # A weak base model (AUC@30 below the floor): full "retention" is not enough, fidelity to the base decides.
    assert not _m(100.0, 100.0, 10, base=1.5).eligible  # fidelity unknown
    weak = _m(100.0, 100.0, 10, base=1.5, fid=76.5)
    assert not weak.eligible and "fidelity AUC@30 76.50% < 95%" in weak.gate_failures()[0]
    assert _m(100.0, 100.0, 10, base=1.5, fid=98.2).eligible
    assert not _m(97.0, 95.0, 10, base=1.5, fid=99.0).eligible  # fidelity does not replace retention
    assert _m(99.0, 98.0, 10, base=MIN_BASE_AUC30).eligible  # at the floor: retention alone, as in rule v1
    assert not _m(99.0, 98.0, 10, base=math.nan).eligible  # unknown base accuracy: fidelity required
    with pytest.raises(ValueError, match="weight_bytes"):
        _m(99, 99, 0)
    with pytest.raises(ValueError, match="speedup"):
        _m(99, 99, 1, speedup=-1.0)


def test_select_champion_rule() -> None:
    c = [
        Candidate(1, SHA_A, _m(99, 98.5, 100)),
        Candidate(2, SHA_A, _m(99, 98.5, 100)),  # tie: the earlier version keeps it
        Candidate(3, SHA_A, _m(97, 95, 10)),  # smaller but fails the gate
        Candidate(4, SHA_B, _m(100, 100, 1)),  # other base weights
        Candidate(5, SHA_A, None),  # tags missing
    ]
    assert select_champion(c, SHA_A, None).version == 1
    d = select_champion(c, SHA_A, 1)
    assert (d.version, d.changed) == (1, False)
    # Speedup decides when both sides have one; bytes otherwise.
    c2 = [Candidate(1, SHA_A, _m(99, 99, 100, 1.5)), Candidate(2, SHA_A, _m(99, 99, 200, 2.0))]
    assert select_champion(c2, SHA_A, 1).version == 2
    c3 = [Candidate(1, SHA_A, _m(99, 99, 100, 1.5)), Candidate(2, SHA_A, _m(99, 99, 200))]
    assert select_champion(c3, SHA_A, 1).version == 1
    # Order of registration does not matter.
    assert select_champion(list(reversed(c)), SHA_A, None).version == 1
    assert select_champion(c, "c" * 64, 1).version == 1  # nothing eligible for that base: unchanged


def test_from_eval_metrics_json() -> None:
    metrics = {
        "models": {"base": {}, "w8a8": {}},
        "aggregate": {"base": {"pose_auc@30": 0.5}, "w8a8": {"pose_auc@30": 0.495, "fid_pose_auc@30": 98.2}},
        "comparison": {"w8a8": {"pose_auc@30": {"mean_diff": -0.005, "low": -0.008, "high": 0.0, "retention": 99.0}}},
    }
    m = CandidateMetrics.from_eval(metrics, "w8a8", weight_bytes=1234)
    assert m.pose_auc30_retention == 99.0
    assert m.pose_auc30_retention_low == pytest.approx(100 * (0.5 - 0.008) / 0.5)
    assert (m.base_pose_auc30, m.fid_pose_auc30) == (0.5, 98.2)
    assert m.weak_base and m.eligible and m.speedup is None  # 0.5 % base: eligible through its fidelity
    assert CandidateMetrics.from_tags(m.to_tags()) == m
    metrics["aggregate"]["w8a8"]["fid_pose_auc@30"] = 76.5  # retention 99 %, but it no longer tracks the base
    assert not CandidateMetrics.from_eval(metrics, "w8a8", weight_bytes=1234).eligible
    # Tags of a rule-v1 version (no base accuracy, no fidelity) parse, and cannot be champion under v2.
    v1_tags = {k: v for k, v in m.to_tags().items() if k not in ("base_pose_auc30", "fid_pose_auc30")}
    assert not CandidateMetrics.from_tags(v1_tags).eligible
    metrics["aggregate"]["base"]["pose_auc@30"] = 0.0
    assert not CandidateMetrics.from_eval(metrics, "w8a8", weight_bytes=1).eligible
    with pytest.raises(KeyError, match="not a compared model"):
        CandidateMetrics.from_eval(metrics, "base", weight_bytes=1)


# -- against a tracking server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_client(mlflow_server: Server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url)


def _logged_run(client, experiment: str, tmp_path: Path, label: str, params: dict[str, str]) -> str:
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=label, tags={"base_sha256": params.get("base_sha256", "")})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    ckpt = tmp_path / label / "model.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(label.encode() * 64)
    client.log_artifact(run.info.run_id, str(ckpt), artifact_path="quantized")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_mlflow_artifacts_land_in_bucket(
    mlflow_server: Server, mlflow_client, s3_endpoint: str, tmp_path: Path, record_property
) -> None:
    record_property("mlflow_server_startup_s", round(mlflow_server.startup_s, 1))
    print(f"mlflow server healthy after {mlflow_server.startup_s:.1f} s")
    run_id = _logged_run(mlflow_client, "qvggt-artifact-check", tmp_path, "artifact-check", {"wbits": "8"})
    # The client only spoke HTTP to the tracking server; the bytes must be in the bucket.
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])]
    hits = [k for k in keys if run_id in k and k.endswith("quantized/model.safetensors")]
    assert hits, keys
    body = s3.get_object(Bucket=BUCKET, Key=hits[0])["Body"].read()
    assert body == b"artifact-check" * 64
    # And they download back through the server.
    local = mlflow_client.download_artifacts(run_id, "quantized/model.safetensors", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == body


def test_champion_better_takes_worse_does_not(mlflow_client, tmp_path: Path) -> None:
    base = "registry-test"
    name = registered_model_name(base)
    exp = "qvggt-registry-test"

    def add(label: str, sha: str, m: CandidateMetrics) -> int:
        run_id = _logged_run(mlflow_client, exp, tmp_path, label, {"config": label, "base_sha256": sha})
        return register_candidate(run_id, base, sha, m, config_name=label, client=mlflow_client)

    def champion() -> int:
        return int(mlflow_client.get_model_version_by_alias(name, CHAMPION).version)

    v1 = add("w8a8", SHA_A, _m(99.5, 98.6, 4000))
    d = update_champion(base, SHA_A, client=mlflow_client)
    assert d.changed and champion() == v1

    worse = add("w8a8-bigger", SHA_A, _m(99.9, 99.0, 5000))  # more bytes, no GPU speedup: worse
    assert not update_champion(base, SHA_A, client=mlflow_client).changed
    failing = add("w4a4-rtn", SHA_A, _m(90.0, 85.0, 1000))  # smaller, but fails the quality gate
    narrow = add("w4a4-noisy", SHA_A, _m(98.5, 96.0, 900))  # passes the point estimate, not the interval
    d = update_champion(base, SHA_A, client=mlflow_client)
    assert not d.changed and champion() == v1, d.reason
    assert {worse, failing, narrow}.isdisjoint({champion()})

    better = add("w4a4-quantvggt", SHA_A, _m(98.9, 98.2, 2000))
    d = update_champion(base, SHA_A, client=mlflow_client)
    assert d.changed and champion() == better, d.reason
    assert "becomes champion" in mlflow_client.get_registered_model(name).tags["champion_reason"]

    # New base weights: the stale champion does not defend the alias against an eligible new version.
    new_base = add("w8a8-newbase", SHA_B, _m(99.0, 98.1, 4000))
    d = update_champion(base, SHA_B, client=mlflow_client)
    assert d.changed and champion() == new_base
    champ = current_champion(base, client=mlflow_client)
    assert champ is not None and champ.tags["base_sha256"] == SHA_B
    assert champ.source.endswith("/quantized")

    # New weights of a weak base model (AUC@30 1.5 %, like the embedded small model): a smaller version with full
    # "retention" that does not reproduce the base's poses does not take the alias; a faithful one does.
    unfaithful = add("w4a4-weak", SHA_C, _m(100.0, 100.0, 500, base=1.5, fid=76.5))
    d = update_champion(base, SHA_C, client=mlflow_client)
    assert not d.changed and champion() == new_base, d.reason
    gate = mlflow_client.get_model_version(name, str(unfaithful)).tags["gate"]
    assert "below the 50% floor and fidelity AUC@30 76.50% < 95%" in gate
    faithful = add("w8a8-weak", SHA_C, _m(100.0, 100.0, 4000, base=1.5, fid=98.2))
    d = update_champion(base, SHA_C, client=mlflow_client)
    assert d.changed and champion() == faithful and "fidelity 98.20%" in d.reason, d.reason


def test_a_refusing_server_is_an_error_not_no_champion(mlflow_client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only "no such model / alias" reads as no champion: a server that answers 403 (or is down) raises, so that
    the watcher does not take an outage for "no champion yet" and start a GPU run."""
    import http.server
    import threading

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    assert current_champion("never-registered", client=mlflow_client) is None  # absent model: none
    mlflow_client.create_registered_model(registered_model_name("no-alias-yet"))
    assert current_champion("no-alias-yet", client=mlflow_client) is None  # model without the alias: none

    class Forbidden(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error_code": "PERMISSION_DENIED", "message": "token expired"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        with pytest.raises(MlflowException, match="token expired"):
            current_champion("any", client=MlflowClient(f"http://127.0.0.1:{server.server_address[1]}"))
    finally:
        server.shutdown()
