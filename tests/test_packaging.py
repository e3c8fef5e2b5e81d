"""Dockerfile.gpu and the compose file stay in step with the package and the settings schema.

No Docker engine runs here, so these parse the files with the official Dockerfile parser (the
`dockerfile` package) and YAML, and check what would break a build or a deployment.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import dockerfile
import pytest
import yaml

from core.settings import load_settings
from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile.gpu"
COMPOSE = REPO / "docker-compose.gpu.yml"


@pytest.fixture(scope="module")
def commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _values(commands: list[dockerfile.Command], cmd: str) -> list[tuple[str, ...]]:
    return [c.value for c in commands if c.cmd == cmd]


def test_base_image_is_a_pinned_cuda_runtime(commands: list[dockerfile.Command]) -> None:
    (base,) = _values(commands, "FROM")
    image = base[0]
    assert image.startswith("nvidia/cuda:") and "runtime" in image and ":latest" not in image


def test_runs_as_non_root_with_healthcheck_ports_and_volumes(
    commands: list[dockerfile.Command],
) -> None:
    users = _values(commands, "USER")
    assert users and users[-1][0] not in {"root", "0"}
    last_user = max(c.start_line for c in commands if c.cmd == "USER")
    assert not [c for c in commands if c.cmd == "RUN" and c.start_line > last_user]
    (health,) = [c for c in commands if c.cmd == "HEALTHCHECK"]
    assert "/readyz" in health.original
    exposed = {p for v in _values(commands, "EXPOSE") for p in v}
    assert {"11112", "8000"} <= exposed
    assert _values(commands, "VOLUME")


def test_copies_every_package_and_installs_the_gpu_extra(
    commands: list[dockerfile.Command],
) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {Path(v[0]).name for v in _values(commands, "COPY")}
    assert packages <= copied, f"Dockerfile.gpu misses packages: {packages - copied}"
    runs = " ".join(" ".join(v) for v in _values(commands, "RUN"))
    assert "[gpu" in runs and "constraints/cpu.txt" not in runs
    assert "gpu" in pyproject["project"]["optional-dependencies"]


def test_image_environment_and_config_are_valid_settings(
    commands: list[dockerfile.Command],
) -> None:
    env: dict[str, str] = {}
    for c in commands:
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2], strict=True)))
    settings = load_settings(REPO / "configs" / "docker.toml", env)
    assert settings.dicom.bind_address == "0.0.0.0"
    assert settings.serving.device == "cuda"
    cmd = _values(commands, "CMD")[0]
    assert (REPO / Path(cmd[-1]).relative_to("/opt/radtriage")).is_file()


def test_compose_wires_orthanc_and_valid_settings() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"orthanc", "radtriage"} <= set(services)
    radtriage = services["radtriage"]
    assert radtriage["build"]["dockerfile"] == "Dockerfile.gpu"
    settings = load_settings(REPO / "configs" / "docker.toml", radtriage["environment"])
    (dest,) = settings.dicom.destinations
    assert dest.host == "orthanc" and dest.port == 4242
    # safe defaults (issue 23 item 8): nothing published beyond loopback; DICOM admits only the
    # compose network Orthanc sits on, by address (an AE title alone opens nothing)
    for service in services.values():
        assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))
    (subnet,) = [c["subnet"] for c in compose["networks"]["pacsnet"]["ipam"]["config"]]
    assert settings.dicom.allowed_hosts == [subnet]
    assert "pacsnet" in services["orthanc"]["networks"] and "pacsnet" in radtriage["networks"]


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(config: Path) -> None:
    load_settings(config, {})
