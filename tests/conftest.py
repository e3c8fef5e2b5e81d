"""Shared fixtures: real data in ../shared/data, real peer tools, free ports."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from cli.pacs import free_port  # the tests import it from here

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RADTRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# No per-example deadline: timings are never asserted in tests, and a loaded 2-core CI box
# would make deadlines flaky. Property tests stay deterministic (derandomize) in CI.
settings.register_profile(
    "radtriage",
    deadline=None,
    derandomize=IN_CI,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("radtriage")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real DICOM). Skips where a fresh clone has no ../shared beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (clone has no ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prostatex(shared_data: Path) -> Path:
    path = shared_data / "prostatex" / "ProstateX-0001"
    if not path.is_dir():
        pytest.skip(f"ProstateX-0001 exam not found under {shared_data}")
    return path


# Debian keeps PostgreSQL's server programs (initdb, pg_ctl) off PATH.
for _pg_bin in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)[:1]:
    os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{_pg_bin}"


def require_tool(name: str) -> str:
    """Path of an external program. Skips locally when missing; in CI (where .ci/run installs
    it) a missing tool is a failure, so no test silently stops running there."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (apt: see .ci/run)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


RUN_LAST = ("tests/serving/test_ray_cluster.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the multi-node Ray test last when one process runs everything (`make test` gives it
    a process of its own): it connects this process to a remote cluster, and Ray keeps
    process-wide driver state that another in-process Ray should not share."""
    last = [item for item in items if item.nodeid.startswith(RUN_LAST)]
    items[:] = [item for item in items if item not in last] + last
