"""Bad input, end to end through the `qvggt` CLI (docs/PIPELINE.md, "Bad input"): every case exits non-zero with a
message naming the problem and its fix, and leaves no artifact behind (a later run must not trust anything).

In-process (typer's runner) for the argument/config cases; real subprocesses for what needs a process boundary: a
file-size limit standing in for a full disk, a folder the OS refuses to write, a run killed and resumed.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from qvggt.cli import app
from qvggt.model import load_vggt, save_checkpoint


@dataclass(frozen=True)
class Case:
    """One row of the table: CLI arguments ({name} = a file of the fixture, {out} = the output folder) and a
    substring of the message the user must see."""

    id: str
    argv: tuple[str, ...]
    message: str


CASES = [
    Case("missing checkpoint", ("quantize", "--model", "{missing}", "--out", "{out}"), "checkpoint not found"),
    Case("corrupt checkpoint", ("quantize", "--model", "{garbage}", "--out", "{out}"), "could not read checkpoint"),
    Case("truncated checkpoint", ("quantize", "--model", "{truncated}", "--out", "{out}"), "is the file complete?"),
    Case(
        "another architecture's checkpoint",
        ("quantize", "--model", "{foreign}", "--out", "{out}"),
        "unexpected (1): encoder.weight",
    ),
    Case(
        "empty image folder",
        ("predict", "{empty}", "--checkpoint", "{tiny}", "--out", "{out}"),
        "no images found in",
    ),
    Case(
        "corrupt image",
        ("predict", "{corrupt_images}", "--checkpoint", "{tiny}", "--out", "{out}"),
        "The file is corrupt or not a supported image",
    ),
    Case(
        "size not a multiple of 14",
        ("predict", "synthetic:200001", "--checkpoint", "{tiny}", "--size", "100", "--frames", "2", "--out", "{out}"),
        "not a multiple of the patch size 14; nearest valid: 98 or 112",
    ),
    Case(
        "unknown method",
        ("quantize", "--method", "gptq9", "--model", "{tiny}", "--out", "{out}"),
        "unknown method 'gptq9'; available:",
    ),
    Case("unknown preset", ("eval", "--model", "preset:huge", "--out", "{out}"), "unknown preset 'huge'"),
    Case(
        "1-bit weights",
        ("quantize", "--wbits", "1", "--model", "{tiny}", "--out", "{out}"),
        "bits=1 is out of range for int: expected 2..8",
    ),
    Case(
        "12-bit activations",
        ("quantize", "--wbits", "4", "--abits", "12", "--model", "{tiny}", "--out", "{out}"),
        "bits=12 is out of range for int: expected 2..8",
    ),
    Case(
        "fp8 with 4-bit weights",
        ("quantize", "--wbits", "4", "--fp8", "--model", "{tiny}", "--out", "{out}"),
        "fp8 e4m3 is an 8-bit format",
    ),
    Case(
        "calibration pool smaller than the cluster count",
        ("calibrate", "--model", "{tiny}", "--pool-scenes", "2", "--n-clusters", "4", "--out", "{out}"),
        "smaller than n_clusters=4: raise calibrate.pool_scenes",
    ),
    Case(
        "evaluation seeds overlap calibration seeds",
        ("eval", "--params", "{overlap_yaml}", "--model", "{tiny}", "--out", "{out}"),
        "data.calib_seeds and data.eval_seeds overlap",
    ),
    Case(
        "evaluation on a quantized model's calibration samples",
        (
            "eval",
            "--model",
            "{tiny}",
            "--compare",
            "{calibrated}",
            "--dataset",
            "synthetic:calib",
            "--scenes",
            "2",
            "--frames",
            "2",
            "--out",
            "{out}",
        ),
        "evaluation samples show scenes used for calibration",
    ),
    Case(
        "malformed params.yaml",
        ("quantize", "--params", "{malformed_yaml}", "--model", "{tiny}", "--out", "{out}"),
        "is not valid YAML",
    ),
    Case(
        "misspelt params.yaml section",
        ("calibrate", "--params", "{misspelt_yaml}", "--out", "{out}"),
        "calibrat: Extra inputs are not permitted",
    ),
    Case(
        "out-of-range params.yaml value",
        ("calibrate", "--params", "{range_yaml}", "--out", "{out}"),
        "calibrate.n_clusters: Input should be greater than or equal to 1",
    ),
    Case(
        "missing params file",
        ("quantize", "--params", "{missing_yaml}", "--model", "{tiny}", "--out", "{out}"),
        "config file not found",
    ),
    Case(
        "no GPU for --device cuda",
        ("predict", "synthetic:200001", "--checkpoint", "{tiny}", "--device", "cuda", "--out", "{out}"),
        "no CUDA GPU is visible to torch: use --device cpu",
    ),
    Case(
        "unknown dataset",
        ("eval", "--model", "{tiny}", "--dataset", "foo:bar", "--out", "{out}"),
        "valid forms are",
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bad (and a few good) inputs the cases point at."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    tiny = save_checkpoint(load_vggt(preset="tiny"), tmp / "tiny.safetensors")
    blob = tiny.read_bytes()
    f = {"tiny": tiny, "missing": tmp / "missing.safetensors", "missing_yaml": tmp / "missing.yaml"}
    f["garbage"] = tmp / "garbage.safetensors"
    f["garbage"].write_bytes(bytes(range(256)) * 20)
    f["truncated"] = tmp / "truncated.safetensors"
    f["truncated"].write_bytes(blob[: len(blob) // 2])
    f["foreign"] = tmp / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(f["foreign"]))
    f["empty"] = tmp / "empty"
    f["empty"].mkdir()
    f["corrupt_images"] = tmp / "corrupt_images"
    f["corrupt_images"].mkdir()
    (f["corrupt_images"] / "a.png").write_bytes(b"not a png at all")
    texts = {
        "overlap_yaml": "data:\n  eval_seeds: {start: 100000, stop: 100010}\n",
        "malformed_yaml": "data: [unclosed\n",
        "misspelt_yaml": "calibrat:\n  seed: 1\n",
        "range_yaml": "calibrate:\n  n_clusters: 0\n",
    }
    for name, text in texts.items():
        f[name] = tmp / f"{name}.yaml"
        f[name].write_text(text)
    # A checkpoint calibrated on the first calibration scenes (its manifest records their ids).
    r = CliRunner().invoke(app, ["quantize", "--method", "smoothquant", "--model", str(tiny), "--calib-scenes", "2",
                                 "--out", str(tmp / "calibrated")])  # fmt: skip
    assert r.exit_code == 0, r.output
    f["calibrated"] = tmp / "calibrated" / "model.safetensors"
    return f


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_a_clear_message(case: Case, files: dict[str, Path], tmp_path: Path) -> None:
    if "cuda" in case.argv and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is not bad input here")
    out = tmp_path / "out"
    argv = [a.format(out=out, **files) for a in case.argv]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert case.message in result.output, result.output
    assert result.output.count("Traceback") == 0
    assert _files_under(out) == []  # nothing written that a later run could trust


def test_table_has_enough_distinct_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 15


# -- cases that need a process boundary ----------------------------------------------------------------------------

QVGGT = [sys.executable, "-m", "qvggt.cli"]  # the console entry point (qvggt.cli:main), from this interpreter


def _cli(argv: list[str], cwd: Path, limit_file_bytes: int | None = None, **kw: object) -> subprocess.CompletedProcess:
    def preexec() -> None:
        # A full disk, without needing one: writes past the limit fail with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*QVGGT, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
        preexec_fn=preexec if limit_file_bytes is not None else None, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("verb", ["quantize", "calibrate"])
def test_full_disk(verb: str, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ["--pool-scenes", "3", "--n-clusters", "2"] if verb == "calibrate" else []
    # The limit must fail the verb's first artifact: calibrate's pool.json is a few hundred bytes (a finished step
    # of a resumable command may legitimately stay), the quantized checkpoint far larger.
    limit = 64 if verb == "calibrate" else 1000
    r = _cli([verb, "--model", str(files["tiny"]), "--out", str(out), *extra], tmp_path, limit_file_bytes=limit)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "free disk space" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _files_under(out) == []  # the temp file was removed, the target never appeared


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder the OS refuses to write into: a 0555 folder, or (root ignores permissions) sysfs, which no one
    can create files in."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no read-only folder to write into")
    return Path("/sys/qvggt-read-only-test/out")


def test_read_only_output_folder(files: dict[str, Path], tmp_path: Path) -> None:
    out = _read_only_folder(tmp_path)
    r = _cli(["quantize", "--model", str(files["tiny"]), "--out", str(out)], tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "choose a writable --out folder" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def test_interrupted_evaluation_resumes(files: dict[str, Path], tmp_path: Path) -> None:
    """Kill `qvggt eval` after its first finished scene; the same command then finishes the rest, keeping the
    scenes already scored (no half-written metrics.json is ever left behind)."""
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(files["tiny"]), "--scenes", "8", "--frames", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*QVGGT, *argv], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    scenes = out / "scenes.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if scenes.exists() and scenes.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = scenes.read_text().splitlines()
    assert 1 <= len(finished) < 8, "the run was not interrupted midway"
    assert not (out / "metrics.json").exists()
    r = _cli(argv, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = scenes.read_text().splitlines()
    assert len(lines) == 8 and lines[: len(finished) - 1] == finished[:-1]  # earlier scenes kept, not redone
    assert (out / "metrics.json").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_at_once() -> None:
    from qvggt.pipeline.preflight import TrackingUnavailableError, check_tracking_uri

    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match="is unreachable .* start it"):
        check_tracking_uri(uri, timeout=2)
    assert time.monotonic() - start < 10
    with pytest.raises(TrackingUnavailableError, match="use sqlite:///path.db"):
        check_tracking_uri("./mlruns")


def test_pipeline_device_resolves_on_the_worker() -> None:
    from qvggt.pipeline.preflight import resolve_device

    gpu = torch.cuda.is_available()
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == ("cuda" if gpu else "cpu")
    if gpu:
        assert resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(ValueError, match="no CUDA GPU: set it to 'auto' or 'cpu'"):
            resolve_device("cuda")


def test_flow_with_unreachable_tracking_server_fails_before_any_work(files: dict[str, Path], tmp_path: Path) -> None:
    """The whole flow (ephemeral Prefect server in its own PREFECT_HOME): refused in seconds, nothing quantized."""
    pytest.importorskip("prefect", reason="the pipeline extra is not installed (pip install -e '.[pipeline]')")
    import yaml

    repo = Path(__file__).resolve().parents[2]
    uri = f"http://127.0.0.1:{_free_port()}"
    params = tmp_path / "params.yaml"
    pipeline = {"base_weights": str(files["tiny"]), "jobs": [{"method": "rtn", "wbits": 8, "abits": 8}],
                "out_dir": str(tmp_path / "out"), "mlflow_tracking_uri": uri}  # fmt: skip
    params.write_text(yaml.safe_dump({"pipeline": pipeline}))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(repo / "flows" / "quantize_vggt.py"), "--params", str(params)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode != 0
    assert f"MLflow tracking server {uri} is unreachable" in r.stdout + r.stderr, r.stderr[-3000:]
    assert time.monotonic() - start < 120
    assert not (tmp_path / "out").exists()
