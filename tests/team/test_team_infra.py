"""infra/: the compose file validates (Debian's docker-compose when installed, plus structural checks), the Helm
values satisfy their schema and request GPUs, every image is pinned to a release, and no configuration file holds a
secret."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from qvggt.pipeline.credentials import is_secret_name

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose not installed (apt install docker-compose)"
)
def test_compose_validates_with_docker_compose(tmp_path: Path) -> None:
    """`docker-compose config -q` (Debian's 1.29, no engine needed) accepts the file with the example .env and
    rejects it, naming the variable, when a secret is missing."""
    ok = subprocess.run(
        ["docker-compose", "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    partial = tmp_path / "partial.env"
    partial.write_text("\n".join(f"{k}={v}" for k, v in _env_example().items() if k != "POSTGRES_PASSWORD"))
    bad = subprocess.run(
        ["docker-compose", "--env-file", str(partial), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert bad.returncode != 0 and "POSTGRES_PASSWORD" in bad.stderr


def test_compose_structure() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"seaweedfs", "postgres", "mlflow", "prefect-server", "worker-gpu", "worker-cpu"} <= set(services)
    assert not any("minio" in str(s.get("image", "")).lower() for s in services.values())  # archived upstream
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    mlflow_env = services["mlflow"]["environment"]
    assert "MLFLOW_SERVER_ALLOWED_HOSTS" in mlflow_env  # --allowed-hosts, by its environment variable
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    # Every variable the compose file reads is documented in .env.example.
    # ($${VAR} is the container's own variable, escaped from compose.)
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    assert used <= set(_env_example()), used - set(_env_example())


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [item for k, v in node.items() for item in _walk(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [item for i, v in enumerate(node) for item in _walk(v, f"{path}[{i}]")]
    return [(path, node)]


def test_no_secrets_in_infra_files() -> None:
    """Secrets in compose are `${VAR:?...}` references only; .env.example holds placeholders; the Helm values none."""
    compose = yaml.safe_load(COMPOSE.read_text())
    for path, value in _walk(compose):
        name = path.rsplit(".", 1)[-1]
        if is_secret_name(name) and isinstance(value, str):
            assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), f"{path} must be a required ${{VAR:?...}}"
        if isinstance(value, str) and "postgresql" in value and "@" in value:
            userinfo = value.split("://", 1)[1].rsplit("@", 1)[0]
            assert userinfo.endswith(":${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in infra/.env}"), path
    for key, value in _env_example().items():
        if is_secret_name(key):
            assert value == "change-me", f".env.example: {key} must be a placeholder"
    values = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    for path, value in _walk(values):
        assert not (is_secret_name(path.rsplit(".", 1)[-1]) and value), f"helm values: {path} holds a secret"
    template = json.loads(values["worker"]["config"]["baseJobTemplate"]["configuration"])
    for path, value in _walk(template):
        assert not (is_secret_name(path.rsplit(".", 1)[-1]) and isinstance(value, str) and value), path
    # And git ignores the files where the real ones go.
    ignored = subprocess.run(
        ["git", "check-ignore", "infra/.env", ".qvggt.env"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert ignored.stdout.split() == ["infra/.env", ".qvggt.env"]


def test_helm_values_schema_and_gpu_template() -> None:
    values = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    schema = json.loads((INFRA / "helm" / "values.schema.json").read_text())
    jsonschema.validate(values, schema)
    # The schema has teeth: dropping a required key or switching the pool type fails.
    broken = json.loads(json.dumps(values))
    del broken["worker"]["config"]["workPool"]
    with pytest.raises(jsonschema.ValidationError, match="workPool"):
        jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(values))
    broken["worker"]["config"]["type"] = "process"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)

    template = json.loads(values["worker"]["config"]["baseJobTemplate"]["configuration"])
    assert {"job_configuration", "variables"} <= set(template)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert container["envFrom"] == [{"secretRef": {"name": "{{ s3_secret_name }}"}}]
    # Every {{ placeholder }} in the job configuration is a declared variable (or one Prefect fills in itself).
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= declared, used - declared
    assert template["variables"]["properties"]["gpus"]["default"] == 1
    # The work pool matches the one the deployments in prefect.yaml use for the quantize flow.
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    pools = {d["entrypoint"].split(":")[-1]: d["work_pool"]["name"] for d in deployments}
    assert pools["quantize_vggt"] == values["worker"]["config"]["workPool"]


# -- images pinned -------------------------------------------------------------------------------------------------

# Repositories whose major.minor tags float over patch releases (python:3.11-slim moves with every 3.11.x): they
# need major.minor.patch. Everything else needs at least major.minor (postgres 17.6, seaweedfs 4.41 are releases).
_PATCH_PINNED = {"python"}


def unpinned(ref: str, built_here: frozenset[str] = frozenset()) -> str | None:
    """Why image ``ref`` is not pinned to a release (None when it is): no tag, ``latest``, or a floating tag. A
    digest always pins; an image that this compose file builds itself (``build:``) may have any explicit tag."""
    if "@sha256:" in ref:
        return None
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return "no tag (means latest)"
    repo, tag = ref.rsplit(":", 1)
    if tag == "latest" or tag.startswith("latest-"):
        return "latest"
    if ref in built_here:
        return None
    parts = 3 if repo.rsplit("/", 1)[-1] in _PATCH_PINNED else 2
    if not re.match(rf"v?\d+(\.\d+){{{parts - 1},}}(?!\d)", tag):
        return f"tag {tag!r} is not a release version (need {'major.minor.patch' if parts == 3 else 'major.minor'})"
    return None


def _image_refs() -> tuple[list[tuple[str, str]], frozenset[str]]:
    """(where, image) for every image infra/ names, each ``${VAR:-default}`` as both its default and its
    .env.example value; and the images the compose file builds."""
    env = _env_example()
    refs: list[tuple[str, str]] = []

    def expand(where: str, value: str) -> list[tuple[str, str]]:
        m = re.fullmatch(r"\$\{([A-Z0-9_]+):-([^}]*)\}", value)
        if not m:
            assert "${" not in value, f"{where}: unsupported image reference {value!r}"
            return [(where, value)]
        var, default = m.groups()
        assert var in env, f"{where}: {var} is not in .env.example"
        return [(f"{where} (default)", default), (f"{where} (.env.example {var})", env[var])]

    built: set[str] = set()
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        if "image" in service:
            found = expand(f"compose {name}", service["image"])
            refs += found
            if "build" in service:
                built |= {ref for _, ref in found}
        else:
            assert "build" in service, f"compose {name}: neither image nor build"
    for dockerfile in sorted(INFRA.rglob("Dockerfile")):
        for line in dockerfile.read_text().splitlines():
            if line.strip().upper().startswith("FROM "):
                refs.append((str(dockerfile.relative_to(REPO)), line.split()[1]))
    values = yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())
    image = values["worker"]["image"]
    refs.append(("helm worker.image", f"{image['repository']}:{image['prefectTag']}"))
    template = json.loads(values["worker"]["config"]["baseJobTemplate"]["configuration"])
    refs.append(("helm job template image", template["variables"]["properties"]["image"]["default"]))
    return refs, frozenset(built)


def test_unpinned_detects_floating_tags() -> None:
    bad = ["chrislusf/seaweedfs:latest", "postgres", "postgres:17", "python:3.11-slim", "registry.example.com:5000/x",
           "ghcr.io/org/img:main", "qvggt-worker:local"]  # fmt: skip
    assert [ref for ref in bad if unpinned(ref) is None] == []
    good = ["chrislusf/seaweedfs:4.41", "postgres:17.6", "python:3.11.13-slim", "prefecthq/prefect:3.9.1-python3.11",
            "registry.example.com:5000/x:1.2", "postgres@sha256:" + "0" * 64]  # fmt: skip
    assert {ref: unpinned(ref) for ref in good} == dict.fromkeys(good)
    assert unpinned("qvggt-worker:local", frozenset({"qvggt-worker:local"})) is None  # built by compose itself


def test_every_image_is_pinned() -> None:
    refs, built = _image_refs()
    problems = {f"{where}: {ref}": why for where, ref in refs if (why := unpinned(ref, built))}
    assert problems == {}, problems
    names = {ref.split(":")[0].rsplit("/", 1)[-1] for _, ref in refs}
    assert {"seaweedfs", "postgres", "prefect", "python", "qvggt-worker"} <= names, names  # it saw them all
