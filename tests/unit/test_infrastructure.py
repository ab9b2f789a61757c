"""Deployment files agree with each other and with the code.

``infrastructure/docker-compose.yaml``, ``infrastructure/prometheus/prometheus.yml``, ``Dockerfile``,
``.env.example`` and ``.github/workflows/ci.yml`` are parsed and checked against the ``Settings``
model: pydantic ignores unknown ``ANALYSIS_*`` variables (the service only warns), so a misspelt
one in these files would otherwise be dropped silently.

The compose file is rendered the way ``docker compose`` does it after README's
``cp .env.example infrastructure/.env``: ``${...}`` interpolated from that ``.env`` (see
:func:`interpolate`, a faithful implementation of compose's rules, because the docker client with
the compose plugin is not guaranteed on a test machine), and the worker's ``env_file`` merged under
its ``environment``.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from compose_spec.models import ComposeSpecification
from dotenv import dotenv_values
from pydantic import BaseModel, ValidationError

from analysis_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "infrastructure" / "docker-compose.yaml"
PROMETHEUS_FILE = ROOT / "infrastructure" / "prometheus" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
CI_WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
SERVICE_PYPROJECT = ROOT / "services" / "analysis_service" / "pyproject.toml"

PREFIX = "ANALYSIS_"
#: The worker's backends and their pinned images.
BACKEND_IMAGES = {
    "rabbitmq": "rabbitmq:4.0-management",
    "redis": "redis:7.4",
    "postgres": "postgres:17",
    "neo4j": "neo4j:5.26",
}
#: ``ANALYSIS_*`` names anywhere in a file's text (comments included).
ENV_NAME_RE = re.compile(r"\bANALYSIS_[A-Za-z0-9_]+")
#: ``${NAME}`` / ``${NAME:-default}`` in a Dockerfile (``ARG`` references).
INTERPOLATION_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
#: The compose project's ``.env`` after README's ``cp .env.example infrastructure/.env``.
EXAMPLE_ENV: dict[str, str] = {k: v or "" for k, v in dotenv_values(ENV_EXAMPLE, interpolate=True).items()}


# --------------------------------------------------------------------------------------- helpers


def settings_env_names(model: type[BaseModel] = Settings, prefix: str = PREFIX) -> set[str]:
    """Every environment variable name ``model`` reads (nested models joined with ``__``)."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= settings_env_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


SETTINGS_NAMES = settings_env_names()
#: Names the service reads besides the fields (the variable naming its ``.env`` file).
CONTROL_NAMES = {Settings.env_file_variable()}


class InterpolationError(ValueError):
    """A ``${VAR:?message}`` whose variable is unset (compose refuses the file)."""


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Resolve compose interpolation in ``value`` with the variables ``env`` (default: EXAMPLE_ENV).

    Compose's rules: ``$$`` is a literal ``$``; ``$VAR`` and ``${VAR}`` are the value (empty when
    unset); ``${VAR:-default}`` / ``${VAR-default}`` the default when unset or empty / unset;
    ``${VAR:?error}`` / ``${VAR?error}`` an error when unset or empty / unset; ``${VAR:+alt}`` /
    ``${VAR+alt}`` the alternative when set and non-empty / set. Defaults, errors and alternatives
    may themselves contain interpolations.
    """
    env = EXAMPLE_ENV if env is None else env
    out: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char != "$":
            out.append(char)
            i += 1
            continue
        if value.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if not value.startswith("${", i):
            match = _NAME_RE.match(value, i + 1)
            if match is None:
                out.append("$")
                i += 1
                continue
            out.append(env.get(match.group(), ""))
            i = match.end()
            continue
        depth, j = 1, i + 2
        while depth:  # the matching brace, skipping nested ${...}
            if j >= len(value):
                raise InterpolationError(f"unterminated ${{ in {value!r}")
            if value.startswith("${", j):
                depth, j = depth + 1, j + 2
                continue
            depth -= value[j] == "}"
            j += 1
        body = value[i + 2 : j - 1]
        match = _NAME_RE.match(body)
        if match is None:
            raise InterpolationError(f"invalid interpolation format for {value!r}")
        name, rest = match.group(), body[match.end() :]
        is_set, current = name in env, env.get(name, "")
        operator = next((op for op in (":-", ":?", ":+", "-", "?", "+") if rest.startswith(op)), None)
        if rest and operator is None:
            raise InterpolationError(f"invalid interpolation format for {value!r}")
        argument = interpolate(rest[len(operator or "") :], env) if operator else ""
        present = bool(current) if operator and operator.startswith(":") else is_set
        if operator in (":-", "-"):
            out.append(current if present else argument)
        elif operator in (":?", "?"):
            if not present:
                raise InterpolationError(f"required variable {name} is missing a value: {argument}")
            out.append(current)
        elif operator in (":+", "+"):
            out.append(argument if present else "")
        else:
            out.append(current)
        i = j
    return "".join(out)


def render(node: Any, env: Mapping[str, str] | None = None) -> Any:
    """The compose document ``node`` with every string value interpolated (keys are left alone)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [render(item, env) for item in node]
    if isinstance(node, dict):
        return {key: render(item, env) for key, item in node.items()}
    return node


def environment_of(service: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A compose service's ``environment`` (mapping or ``KEY=VALUE`` list form), interpolated."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {str(k): interpolate("" if v is None else str(v), env) for k, v in environment.items()}


def container_environment(
    service: Mapping[str, Any], project_dir: Path, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """What the container's environment holds: its ``env_file`` entries, then ``environment`` over them."""
    result: dict[str, str] = {}
    for entry in service.get("env_file") or []:
        path, required = (
            (entry, True) if isinstance(entry, str) else (entry["path"], entry.get("required", True))
        )
        file = project_dir / path
        if not file.exists():
            assert not required, f"required env_file {file} is missing"
            continue
        result.update({k: v or "" for k, v in dotenv_values(file, interpolate=True).items()})
    return result | environment_of(service, env)


def settings_from(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``Settings`` built from exactly ``env`` (the test process's own ANALYSIS_* are hidden)."""
    for name in list(os.environ):
        if name.upper().startswith(PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def seconds(duration: str | int | float) -> float:
    """A compose duration (``90s``, ``1m30s``, ``500ms``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a continued instruction"
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (s.split(None, 1) for s in logical)
    ]


def dockerfile_env() -> dict[str, str]:
    """Every ``ENV`` of the Dockerfile (``KEY=VALUE`` form), last one wins."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            for token in shlex.split(args):
                assert "=" in token, f"use ENV KEY=VALUE, not {args!r}"
                key, value = token.split("=", 1)
                env[key] = value
    return env


def env_example_entries() -> Iterator[tuple[str, str, bool]]:
    """``(name, value, active)`` of each ``ANALYSIS_*=`` line; inactive ones are commented out."""
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"(#\s*)?(ANALYSIS_[A-Za-z0-9_]+)=(.*)", line.strip())
        if match:
            yield match.group(2), match.group(3), match.group(1) is None


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def worker(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return services["worker"]


# ---------------------------------------------------------------------------------- settings walk


def test_settings_walk_finds_nested_fields() -> None:
    # Guards the helper every other check relies on.
    assert {"ANALYSIS_LOG_LEVEL", "ANALYSIS_POSTGRES__DSN", "ANALYSIS_WORKER__CONCURRENCY"} <= SETTINGS_NAMES
    assert "ANALYSIS_POSTGRES" not in SETTINGS_NAMES
    assert len(SETTINGS_NAMES) > 40


# ---------------------------------------------------------------------------------------- compose


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    # As written (with ${...}) and as rendered from the example .env: both must be valid.
    ComposeSpecification.model_validate(compose)
    ComposeSpecification.model_validate(render(compose))
    broken = {**compose, "services": {**compose["services"], "worker": {**compose["services"]["worker"]}}}
    broken["services"]["worker"]["env_file"] = [{"pth": ".env"}]
    with pytest.raises(ValidationError):
        ComposeSpecification.model_validate(broken)


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    missing = []
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        test = check.get("test")
        if check.get("disable") or not test or test in (["NONE"], "NONE"):
            missing.append(name)
    assert not missing, f"services without a healthcheck: {missing}"


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {*BACKEND_IMAGES, "prometheus", "grafana", "worker", "api"}


@pytest.mark.parametrize(("name", "image"), sorted(BACKEND_IMAGES.items()))
def test_backend_image_versions(services: dict[str, dict[str, Any]], name: str, image: str) -> None:
    assert services[name]["image"] == image


def test_prometheus_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    image = services["prometheus"]["image"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", image), image


def test_grafana_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    image = services["grafana"]["image"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", image), image


def test_worker_depends_on_healthy_backends(worker: dict[str, Any]) -> None:
    depends = worker["depends_on"]
    assert isinstance(depends, dict), "use the long depends_on form to wait for health"
    for name in BACKEND_IMAGES:
        assert depends.get(name, {}).get("condition") == "service_healthy", name


def test_worker_build_and_replicas(worker: dict[str, Any]) -> None:
    assert worker["deploy"]["replicas"] == 2
    assert (COMPOSE_FILE.parent / worker["build"]["context"]).resolve() == ROOT
    assert worker["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    # Replicas cannot share a host port; Prometheus reaches them over the compose network.
    assert "ports" not in worker


def test_worker_media_is_mounted_read_only(worker: dict[str, Any]) -> None:
    targets = [interpolate(v).split(":")[1:] for v in worker["volumes"] if isinstance(v, str)]
    assert ["/media", "ro"] in targets
    assert environment_of(worker)["ANALYSIS_WORKER__MEDIA_ROOT"] == "/media"


def test_worker_healthcheck_uses_health_endpoint(worker: dict[str, Any]) -> None:
    port = environment_of(worker).get("ANALYSIS_HTTP__PORT", "8080")
    test = " ".join(worker["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/health" in test


def test_worker_stop_grace_exceeds_shutdown_grace(
    worker: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(environment_of(worker), monkeypatch)
    assert seconds(worker["stop_grace_period"]) > settings.worker.shutdown_grace_s


def test_worker_replicas_share_one_host_cpu_token_folder(
    compose: dict[str, Any], worker: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each container has its own /tmp: the replicas share the host's cores only through a named
    # volume mounted where the setting points.
    settings = settings_from(environment_of(worker), monkeypatch)
    assert settings.worker.share_host_cpus
    folder = str(settings.worker.host_cpus_base())
    mounts = {
        target: source
        for source, target in (interpolate(v).split(":")[:2] for v in worker["volumes"] if isinstance(v, str))
    }
    assert folder in mounts, f"{folder} is not mounted into the worker"
    assert mounts[folder] in set(compose.get("volumes") or {}), "the token folder must be a named volume"


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = interpolate(volume).split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if source and not source.startswith((".", "/", "~")):
                used.add(source)
    assert used, "the backends should keep their data in named volumes"
    assert used <= declared, f"undeclared volumes: {used - declared}"
    for name in ("postgres", "rabbitmq", "redis", "neo4j", "prometheus"):
        assert any(str(v).split(":", 1)[0] in declared for v in services[name].get("volumes", [])), name


def test_compose_environment_names_are_settings(services: dict[str, dict[str, Any]]) -> None:
    used = {
        name for service in services.values() for name in environment_of(service) if name.startswith(PREFIX)
    }
    assert used, "the worker is configured through ANALYSIS_* variables"
    assert used <= SETTINGS_NAMES, f"not fields of Settings: {sorted(used - SETTINGS_NAMES)}"
    mentioned = set(ENV_NAME_RE.findall(COMPOSE_FILE.read_text()))
    assert mentioned <= SETTINGS_NAMES, f"not fields of Settings: {sorted(mentioned - SETTINGS_NAMES)}"


def test_worker_environment_builds_settings_for_the_compose_network(
    services: dict[str, dict[str, Any]], worker: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(environment_of(worker), monkeypatch)
    rabbit, pg = urlsplit(settings.rabbitmq.url), urlsplit(settings.postgres.dsn)
    assert (rabbit.scheme, rabbit.hostname, rabbit.port) == ("amqp", "rabbitmq", 5672)
    assert urlsplit(settings.redis.url).hostname == "redis"
    assert (pg.hostname, pg.port) == ("postgres", 5432)
    assert urlsplit(settings.neo4j.uri).hostname == "neo4j"
    assert settings.http.host == "0.0.0.0"

    # Credentials agree with the servers' own configuration.
    rabbit_env = environment_of(services["rabbitmq"])
    assert (rabbit.username, rabbit.password) == (
        rabbit_env["RABBITMQ_DEFAULT_USER"],
        rabbit_env["RABBITMQ_DEFAULT_PASS"],
    )
    pg_env = environment_of(services["postgres"])
    assert (pg.username, pg.password, pg.path.lstrip("/")) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        pg_env["POSTGRES_DB"],
    )
    assert (
        environment_of(services["neo4j"])["NEO4J_AUTH"] == f"{settings.neo4j.user}/{settings.neo4j.password}"
    )


# ------------------------------------------------------------------- compose configuration (.env)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A}", "a"),
        ("$A-x", "a-x"),
        ("$$A", "$A"),
        ("$${A}", "${A}"),
        ("${UNSET}", ""),
        ("${UNSET:-d}", "d"),
        ("${EMPTY:-d}", "d"),
        ("${EMPTY-d}", ""),
        ("${UNSET-d}", "d"),
        ("${A:-d}", "a"),
        ("${A:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET:-${A}/x}", "a/x"),
        ("${EMPTY?msg}", ""),
        ("x:${A:?msg}:y", "x:a:y"),
        ("no $ sign here $", "no $ sign here $"),
    ],
)
def test_interpolate_follows_compose(text: str, expected: str) -> None:
    assert interpolate(text, {"A": "a", "EMPTY": ""}) == expected


@pytest.mark.parametrize("text", ["${UNSET:?set it}", "${EMPTY:?set it}", "${UNSET?set it}"])
def test_interpolate_refuses_missing_required_variables(text: str) -> None:
    with pytest.raises(InterpolationError, match="set it"):
        interpolate(text, {"EMPTY": ""})


#: What a user changes after ``cp .env.example infrastructure/.env`` (README).
SAMPLE_CHANGES = {
    "MEDIA_DIR": "/srv/music",
    "RABBITMQ_USER": "rabbit-user",
    "RABBITMQ_PASSWORD": "rabbit-Secret-1",
    "REDIS_PASSWORD": "redis-Secret-2",
    "POSTGRES_USER": "pg-user",
    "POSTGRES_PASSWORD": "pg-Secret-3",
    "POSTGRES_DB": "music",
    "NEO4J_PASSWORD": "neo4j-Secret-4",
    "GRAFANA_ADMIN_PASSWORD": "grafana-Secret-5",
    "BIND_ADDRESS": "0.0.0.0",
    "POSTGRES_PORT": "15432",
    "GRAFANA_PORT": "3300",
    "PROMETHEUS_PORT": "19090",
    "ANALYSIS_WORKER__MAX_TASKS_PER_CHILD": "50",
    "ANALYSIS_LOG_LEVEL": "debug",
}


@pytest.fixture
def sample_project(tmp_path: Path) -> Path:
    """A copy of infrastructure/ whose .env is .env.example with SAMPLE_CHANGES applied."""
    project = tmp_path / "infrastructure"
    project.mkdir()
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={SAMPLE_CHANGES[name]}" if "=" in line and name in SAMPLE_CHANGES else line)
    (project / ".env").write_text("\n".join(lines) + "\n")
    (project / "docker-compose.yaml").write_text(COMPOSE_FILE.read_text())
    return project


def project_env(project: Path) -> dict[str, str]:
    """The variables compose interpolates with: the project's .env (shell variables left out)."""
    return {k: v or "" for k, v in dotenv_values(project / ".env", interpolate=True).items()}


def strings_of(node: Any) -> Iterator[str]:
    """Every string value of a loaded YAML document (keys excluded)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings_of(item)
    elif isinstance(node, dict):
        for item in node.values():
            yield from strings_of(item)


def test_example_env_sets_every_compose_variable_without_a_default(compose: dict[str, Any]) -> None:
    # README's `cp .env.example infrastructure/.env` sets every variable compose needs.
    needed = {
        match.group(1)
        for text in strings_of(compose)
        for match in re.finditer(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?", text)
        if match.group(2) not in (":-", "-")
    }
    assert needed, "the compose file takes its passwords from .env"
    assert needed <= set(EXAMPLE_ENV), f"not in .env.example: {sorted(needed - set(EXAMPLE_ENV))}"
    assert set(SAMPLE_CHANGES) <= set(EXAMPLE_ENV)
    render(compose)  # and the example renders


def test_sample_env_values_arrive_in_the_services(
    sample_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = project_env(sample_project)
    services = render(yaml.safe_load((sample_project / "docker-compose.yaml").read_text()), env)["services"]

    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"] == "rabbit-user"
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"] == "rabbit-Secret-1"
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--requirepass") + 1] == "redis-Secret-2"
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == "redis-Secret-2"
    assert services["postgres"]["environment"] == {
        "POSTGRES_USER": "pg-user",
        "POSTGRES_PASSWORD": "pg-Secret-3",
        "POSTGRES_DB": "music",
    }
    assert services["neo4j"]["environment"]["NEO4J_AUTH"] == "neo4j/neo4j-Secret-4"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "grafana-Secret-5"
    assert "/srv/music:/media:ro" in services["worker"]["volumes"]
    assert "0.0.0.0:15432:5432" in services["postgres"]["ports"]
    assert "0.0.0.0:3300:3000" in services["grafana"]["ports"]
    assert "0.0.0.0:19090:9090" in services["prometheus"]["ports"]
    assert "0.0.0.0:5672:5672" in services["rabbitmq"]["ports"]  # unchanged: the example's value

    # The worker: env_file (every ANALYSIS_* line of .env) under its environment.
    worker_env = container_environment(
        yaml.safe_load((sample_project / "docker-compose.yaml").read_text())["services"]["worker"],
        sample_project,
        env,
    )
    settings = settings_from({k: v for k, v in worker_env.items() if k.startswith(PREFIX)}, monkeypatch)
    rabbit, pg, redis = (
        urlsplit(settings.rabbitmq.url),
        urlsplit(settings.postgres.dsn),
        urlsplit(settings.redis.url),
    )
    assert (rabbit.username, rabbit.password, rabbit.hostname) == (
        "rabbit-user",
        "rabbit-Secret-1",
        "rabbitmq",
    )
    assert (redis.password, redis.hostname) == ("redis-Secret-2", "redis")
    assert (pg.username, pg.password, pg.hostname, pg.path) == (
        "pg-user",
        "pg-Secret-3",
        "postgres",
        "/music",
    )
    assert settings.neo4j.password == "neo4j-Secret-4"
    assert str(settings.worker.media_root) == "/media"
    assert settings.worker.max_tasks_per_child == 50
    assert settings.log_level == "debug"
    assert settings.worker.concurrency == 2  # the compose default: unset in .env.example


def test_the_service_reads_the_same_env_file(sample_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Outside compose, the service reads the file named by ANALYSIS_ENV_FILE (or ./.env) itself,
    # expanding ${...} like compose: one file configures both.
    settings_from({Settings.env_file_variable(): str(sample_project / ".env")}, monkeypatch)
    settings = Settings()
    assert urlsplit(settings.rabbitmq.url).password == "rabbit-Secret-1"
    assert urlsplit(settings.postgres.dsn).password == "pg-Secret-3"
    assert urlsplit(settings.redis.url).password == "redis-Secret-2"
    assert settings.neo4j.password == "neo4j-Secret-4"
    assert settings.worker.max_tasks_per_child == 50
    assert Settings.unknown_env_names() == []


def test_compose_refuses_to_start_without_the_passwords(sample_project: Path) -> None:
    compose = yaml.safe_load((sample_project / "docker-compose.yaml").read_text())
    for password in ("RABBITMQ_PASSWORD", "REDIS_PASSWORD", "POSTGRES_PASSWORD", "NEO4J_PASSWORD"):
        env = project_env(sample_project)
        del env[password]
        with pytest.raises(InterpolationError, match=f"{password} is missing a value"):
            render(compose, env)


def test_no_literal_passwords_or_ports_in_compose(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if re.search(r"PASS|AUTH", key) or re.search(r"://[^/@]*:[^/@]*@", str(value)):
                assert "${" in str(value), f"{name}: {key} is not taken from .env"
        for port in service.get("ports", []):
            assert str(port).count("${") == 2, f"{name}: port {port} is not taken from .env"
        for volume in service.get("volumes", []):
            if str(volume).endswith(":/media:ro"):
                assert str(volume).startswith("${MEDIA_DIR"), volume


# ------------------------------------------------------------------------------------- prometheus


def test_prometheus_scrapes_every_worker_replica(
    services: dict[str, dict[str, Any]], worker: dict[str, Any]
) -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    port = int(environment_of(worker).get("ANALYSIS_HTTP__PORT", "8080"))
    found = [
        sd
        for job in config["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", [])
    ]
    assert {"names": ["worker"], "type": "A", "port": port} in [
        {k: sd.get(k) for k in ("names", "type", "port")} for sd in found
    ]
    assert "worker" in services


def test_prometheus_service_loads_this_config(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus.get("command", []) if "=" in arg)
    config_path = flags.get("--config.file", "/etc/prometheus/prometheus.yml")
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target, *_ = interpolate(volume).split(":")
        mounts[target] = source
    assert (COMPOSE_FILE.parent / mounts[config_path]).resolve() == PROMETHEUS_FILE


# ------------------------------------------------------------------------------------ .env.example


def test_env_example_lists_exactly_the_settings_fields() -> None:
    names = [name for name, _, _ in env_example_entries()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"listed twice: {duplicates}"
    assert set(names) <= SETTINGS_NAMES, f"not fields of Settings: {sorted(set(names) - SETTINGS_NAMES)}"
    missing = SETTINGS_NAMES - set(names)
    assert not missing, f"missing from .env.example: {sorted(missing)}"
    mentioned = set(ENV_NAME_RE.findall(ENV_EXAMPLE.read_text())) - CONTROL_NAMES
    assert mentioned <= SETTINGS_NAMES, f"not fields of Settings: {sorted(mentioned - SETTINGS_NAMES)}"


def test_env_example_comments_out_only_optional_fields() -> None:
    defaults = Settings.model_construct()
    for name, _, active in env_example_entries():
        if active:
            continue
        section, _, field = name.removeprefix(PREFIX).lower().partition("__")
        value = getattr(getattr(defaults, section), field) if field else getattr(defaults, section)
        assert value is None, f"{name} has a default ({value!r}); list it uncommented"


def test_env_example_loads_with_compose_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    settings_from({}, monkeypatch)  # clears the test process's own ANALYSIS_* variables
    settings = Settings(_env_file=ENV_EXAMPLE)
    assert urlsplit(settings.rabbitmq.url).hostname == "rabbitmq"
    assert urlsplit(settings.redis.url).hostname == "redis"
    assert urlsplit(settings.postgres.dsn).hostname == "postgres"
    assert urlsplit(settings.neo4j.uri).hostname == "neo4j"
    assert settings.neo4j.database is None
    assert settings.worker.concurrency is None


def test_env_example_values_are_the_defaults_except_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    settings_from({}, monkeypatch)
    loaded = Settings(_env_file=ENV_EXAMPLE).model_dump()
    defaults = Settings(_env_file=None).model_dump()
    connections = {
        ("rabbitmq", "url"),
        ("redis", "url"),
        ("postgres", "dsn"),
        ("neo4j", "uri"),
        ("neo4j", "password"),
    }
    differing = {
        (section, field)
        for section, values in defaults.items()
        if isinstance(values, dict)
        for field, value in values.items()
        if loaded[section][field] != value
    } | {
        (name, "")
        for name, value in defaults.items()
        if not isinstance(value, dict) and loaded[name] != value
    }
    assert differing <= connections, f"differ from the Settings defaults: {sorted(differing - connections)}"


# -------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args.split(":")[0] for instruction, args in dockerfile_instructions() if instruction == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1] not in ("root", "0")


def test_dockerfile_numba_cache_is_writable_by_the_user() -> None:
    env = dockerfile_env()
    cache = env["NUMBA_CACHE_DIR"]
    assert cache.startswith("/")
    user = next(args for instruction, args in reversed(dockerfile_instructions()) if instruction == "USER")
    runs = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    owner = re.escape(user.split(":")[0])
    assert re.search(rf"chown\s+(-\S+\s+)*{owner}(:\S+)?\s+([^&;]*\s)?{re.escape(cache)}(\s|$)", runs), (
        f"{cache} is not chowned to {user}"
    )


def test_dockerfile_environment() -> None:
    env = dockerfile_env()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env.get(name) == "1", name
    names = set(ENV_NAME_RE.findall(DOCKERFILE.read_text()))
    assert names <= SETTINGS_NAMES, f"not fields of Settings: {sorted(names - SETTINGS_NAMES)}"


def test_dockerfile_healthcheck_and_entrypoint() -> None:
    instructions = dockerfile_instructions()
    (healthcheck,) = [args for instruction, args in instructions if instruction == "HEALTHCHECK"]
    assert "http://127.0.0.1:" in healthcheck
    assert "'8080'" in healthcheck or ":8080/" in healthcheck
    assert "/health'" in healthcheck
    assert ("EXPOSE", "8080") in instructions

    scripts = tomllib.loads(SERVICE_PYPROJECT.read_text())["project"]["scripts"]
    entrypoint = [args for instruction, args in instructions if instruction == "ENTRYPOINT"][-1]
    command = [args for instruction, args in instructions if instruction == "CMD"][-1]
    assert yaml.safe_load(entrypoint) == ["analysis-service"]
    assert "analysis-service" in scripts
    assert yaml.safe_load(command) == ["worker"]


def test_dockerfile_base_image_and_locked_install() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for instruction, a in instructions if instruction == "ARG" and "=" in a)
    bases = [
        INTERPOLATION_RE.sub(lambda m: args.get(m.group(1), ""), a.split()[0])
        for instruction, a in instructions
        if instruction == "FROM"
    ]
    assert len(bases) >= 2, "multi-stage build expected"
    assert set(bases) == {"python:3.11-slim"}
    runs = [a for instruction, a in instructions if instruction == "RUN"]
    assert any(re.search(r"uv sync --frozen --no-dev --package analysis-service\b", r) for r in runs)
    assert any("libsndfile1" in r and "ffmpeg" in r for r in runs)


# ------------------------------------------------------------------------------------------------ CI


def test_ci_service_containers_match_compose_versions() -> None:
    workflow = yaml.safe_load(CI_WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    images = {name: spec["image"] for name, spec in job["services"].items()}
    assert images == {name: BACKEND_IMAGES[name] for name in ("postgres", "redis", "rabbitmq")}
    assert job["services"]["postgres"]["env"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    assert any(step.get("run", "").strip() == "bash .ci/run" for step in job["steps"])


# -------------------------------------------------------------------------------------- job API


def test_api_service_runs_the_api_command_against_healthy_backends(
    services: dict[str, dict[str, Any]], worker: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = services["api"]
    assert api["command"] == ["api"]
    assert api["image"] == worker["image"]
    for name in ("rabbitmq", "redis", "postgres"):
        assert api["depends_on"][name]["condition"] == "service_healthy", name
    env = environment_of(api)
    settings = settings_from(env, monkeypatch)
    worker_settings = settings_from(environment_of(worker), monkeypatch)
    # The API publishes where the workers consume and reads what they write.
    assert settings.rabbitmq.url == worker_settings.rabbitmq.url
    assert settings.postgres.dsn == worker_settings.postgres.dsn
    assert settings.redis.url == worker_settings.redis.url
    assert settings.worker.media_root == worker_settings.worker.media_root
    assert ["/media", "ro"] in [interpolate(v).split(":")[1:] for v in api["volumes"] if isinstance(v, str)]
    port = settings.api.port
    assert [interpolate(p).rsplit(":", 1)[1] for p in api["ports"]] == [str(port)]
    assert f"http://127.0.0.1:{port}/health" in " ".join(api["healthcheck"]["test"])
    # The keys (and any other ANALYSIS_API__* setting) come from infrastructure/.env.
    assert api["env_file"] == worker["env_file"]


def test_prometheus_scrapes_every_api_replica(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    port = int(environment_of(services["api"])["ANALYSIS_API__PORT"])
    targets = [
        {k: sd.get(k) for k in ("names", "type", "port")}
        for job in config["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", [])
    ]
    assert {"names": ["api"], "type": "A", "port": port} in targets
