"""Shared fixtures: real data in ../shared/data, real peer tools, free ports."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from cli.demo.pacs import free_port  # the tests import it from here

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


#: Programs a unit test may run: file validators, parsers and dumpers that start no server.
UNIT_TOOLS = frozenset(
    {"dciodvfy", "dcentvfy", "dsrdump", "dcmdump", "dcmftest", "openssl", "java", "node"}
)
#: `radtriage` subcommands that start servers (the CLI's other subcommands are unit-test fair).
SERVER_COMMANDS = frozenset({"serve", "demo"})


def _starts_a_peer(argv: list[str]) -> bool:
    program = Path(str(argv[0])).name if argv else ""
    if program in UNIT_TOOLS:
        return False
    if program.startswith("python") or program == "radtriage":
        return any(str(a) in SERVER_COMMANDS or str(a).endswith("dicom_node.node") for a in argv)
    return True


def _peer_guard(item: pytest.Item, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside `integration` tests, starting a server process or Ray fails the test: the
    marker then stays true, and `make test-fast` really runs without peers."""
    import subprocess

    real_init = subprocess.Popen.__init__

    def guarded_init(self: subprocess.Popen, args: Any, *a: Any, **kw: Any) -> None:
        argv = str(args).split() if isinstance(args, str | os.PathLike) else list(args)
        if _starts_a_peer(argv):
            raise AssertionError(
                f"{item.nodeid} starts {argv[:3]}: a test that starts a real peer is marked "
                "@pytest.mark.integration"
            )
        real_init(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
    try:
        import ray
    except ImportError:
        return

    def no_ray(*_: Any, **__: Any) -> None:
        raise AssertionError(f"{item.nodeid} starts Ray: mark it @pytest.mark.integration")

    monkeypatch.setattr(ray, "init", no_ray)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_peers(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if request.node.get_closest_marker("integration") is None:
        _peer_guard(request.node, monkeypatch)
