"""A throwaway PostgreSQL server for index tests (initdb + pg_ctl; as the postgres user when
running as root). Import `postgresql_server` into a test module, then ask for `postgresql_url`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, require_tool


@pytest.fixture(name="postgresql_url")
def postgresql_server() -> Iterator[str]:
    """A throwaway PostgreSQL server (skips locally where PostgreSQL is not installed; .ci/run
    installs it and puts its bin folder on PATH)."""
    initdb, pg_ctl = require_tool("initdb"), require_tool("pg_ctl")
    top = Path(tempfile.mkdtemp(prefix="radtriage-pg-"))  # not under pytest's 0700 tmp
    data = top / "pg"
    data.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        run_as = [runuser, "-u", "postgres", "--"]
        shutil.chown(top, "postgres")
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run(
        [*run_as, initdb, "-A", "trust", "-U", "postgres", "-D", str(data)],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    # the server inherits pg_ctl's stdout/stderr: give it a log file, not our pipes
    start = [*run_as, pg_ctl, "-D", str(data), "-l", str(top / "pg.log"), "-o", options]
    subprocess.run(
        [*start, "-w", "start"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        shutil.rmtree(top, ignore_errors=True)
