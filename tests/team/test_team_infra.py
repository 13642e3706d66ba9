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


# -- the compose file against the Compose Specification, without docker-compose ---------------------------------
# Debian's docker-compose (above) needs root to install and is skipped where it is absent; PyPI's docker-compose
# 1.29.2 needs PyYAML < 6 and jsonschema < 4, which conflict with this project's. So the check that always runs
# does what `docker compose config` does first: interpolate the variables (Compose's syntax, from .env.example),
# then validate against the Compose Specification's JSON schema, vendored in check-jsonschema (a dev extra), plus the
# cross-references a schema cannot express.

_INTERPOLATION = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*)|(\{))"
)


class InterpolationError(ValueError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose variable interpolation over every string of a parsed compose file: ``$$``, ``$VAR``, ``${VAR}``,
    ``${VAR:-default}`` / ``${VAR-default}`` (unset or empty / unset), ``${VAR:?error}`` / ``${VAR?error}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        dollar, name, op, arg, bare, broken = m.groups()
        if dollar:
            return "$"
        if broken:
            raise InterpolationError(f"invalid interpolation in {value!r}")
        name = name or bare
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if missing else current
        if op in (":?", "?") and missing:
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        return current or ""

    return _INTERPOLATION.sub(one, value)


def _compose_spec_validator() -> Any:
    from importlib.resources import files

    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def compose_problems(doc: dict[str, Any], validator: Any) -> list[str]:
    """Schema errors of an interpolated compose file, plus references the schema cannot check: depends_on targets,
    named volumes, build contexts."""
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    services, volumes = doc.get("services", {}), set(doc.get("volumes") or {})
    for name, service in services.items():
        for target in service.get("depends_on") or {}:
            if target not in services:
                problems.append(f"{name}: depends_on unknown service {target!r}")
        for mount in service.get("volumes") or []:
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "~")) and source not in volumes:
                problems.append(f"{name}: volume {source!r} is not declared")
        build = service.get("build")
        if build is not None:
            context = COMPOSE.parent / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not (context / dockerfile).is_file():
                problems.append(f"{name}: no {dockerfile} in build context {context}")
    return problems


def test_compose_matches_compose_spec() -> None:
    """Always runs: the compose file, interpolated with .env.example, is a valid Compose Specification document;
    mistakes docker-compose would reject fail here too; a missing secret is refused naming the variable."""
    raw = yaml.safe_load(COMPOSE.read_text())
    validator = _compose_spec_validator()
    doc = interpolate(raw, _env_example())
    assert compose_problems(doc, validator) == []
    assert doc["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "change-me"
    # $${VAR} is the container's own variable: compose leaves ${VAR} for the shell in the container.
    assert doc["services"]["postgres"]["healthcheck"]["test"][1] == "pg_isready -U ${POSTGRES_USER} -d ${POSTGRES_DB}"
    # The check has teeth: each of these is an error docker-compose reports.
    for label, mutate in {
        "typo in a service key": lambda d: d["services"]["mlflow"].update(enviroment={}),
        "unknown depends_on condition": lambda d: d["services"]["worker-cpu"]["depends_on"]["prefect-server"].update(
            condition="service_ready"
        ),
        "GPU capabilities not a list": lambda d: d["services"]["worker-gpu"]["deploy"]["resources"]["reservations"][
            "devices"
        ][0].update(capabilities="gpu"),
        "undeclared named volume": lambda d: d["services"]["postgres"].update(volumes=["pgdata:/var/lib/postgresql"]),
        "depends on a missing service": lambda d: d["services"]["mlflow"]["depends_on"].update(
            redis={"condition": "service_started"}
        ),
    }.items():
        broken = json.loads(json.dumps(doc))
        mutate(broken)
        assert compose_problems(broken, validator), label
    env = {k: v for k, v in _env_example().items() if k != "POSTGRES_PASSWORD"}
    with pytest.raises(InterpolationError, match="POSTGRES_PASSWORD is missing a value: set POSTGRES_PASSWORD"):
        interpolate(raw, env)
    assert interpolate("${A:-x}/${A-y}/$$A/${B}", {"A": ""}) == "x//$A/"


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
