"""A two-node Ray cluster on loopback, started with `ray start` as an operator would: the model
replicas spread over both nodes, and a second `radtriage serve` attaches to the one Serve app.

Both raylets run on this host (own ports, one temp dir). The head runs the dashboard because
Ray's state API (`ray.util.state.list_actors`, which says where each replica runs) is served by
it; a production head can leave it off. Each `ray start --block` runs in its
own session, and the test ends exactly those process groups: `ray stop --force` would stop every
Ray on the machine, including other tests'. Token authentication (on by default for `ray start`
in Ray 2.5x+) is turned off for this loopback cluster (RAY_AUTH_MODE=disabled).

The worker node runs in a mount namespace of its own (`unshare -m`) with an empty tmpfs over the
DICOM node's storage folder: a Ray worker that cannot see the node's disk, as on a central
inference cluster without a shared file system.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.demo.pacs import free_ports
from core.errors import ConfigError, ModelError
from core.settings import Settings

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.own_process  # Ray's driver state is process-wide: see the Makefile

RAY = str(Path(sys.executable).with_name("ray"))


#: The ports each `ray start` is given (else Ray picks fixed defaults that two nodes share).
PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


def _ports(ports: Iterator[int]) -> list[str]:
    """`PORT_FLAGS` with the next ports of `ports` (distinct: Ray refuses a port given twice)."""
    return [arg for name in PORT_FLAGS for arg in (f"--{name}", str(next(ports)))]


def _end(proc: subprocess.Popen[bytes]) -> None:
    """End one `ray start --block` and everything it started (its process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # daemons left after `ray start` exits
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30  # the next test's Ray starts on a host free of this one
    while _group_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, dead but not reaped, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


HIDDEN = Path(tempfile.gettempdir()) / f"rt-node-disk-{os.getpid()}"


def _hide_from(cmd: list[str], folder: Path) -> list[str]:
    """`cmd` in a new mount namespace where `folder` is an empty tmpfs (needs root)."""
    script = 'mount -t tmpfs radtriage-hidden "$0" && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(folder), *cmd]


@pytest.fixture(scope="module")
def node_disk() -> Iterator[Path]:
    """The DICOM node's storage folder, invisible to the cluster's worker node."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to hide a folder from the Ray worker node")
    HIDDEN.mkdir(exist_ok=True)
    try:
        yield HIDDEN
    finally:
        shutil.rmtree(HIDDEN, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(node_disk: Path) -> Iterator[str]:
    """Head (2 CPUs, resource rt_head) + worker node (2 CPUs, resource rt_worker, `node_disk`
    hidden); yields the head address."""
    temp = Path(tempfile.mkdtemp(prefix="rt-ray-", dir="/tmp"))  # short: unix socket paths
    # every port of both nodes drawn at once, so that no two are the same
    ports = iter(free_ports(3 + 2 * len(PORT_FLAGS)))
    port = next(ports)
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", "2", "--temp-dir", str(temp), "--disable-usage-stats", "--block"]
    head_cmd = [RAY, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1"]
    # the dashboard serves the state API (ray.util.state.list_actors) the test reads
    head_cmd += ["--resources", '{"rt_head": 1}', "--include-dashboard=true"]
    head_cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(next(ports))]
    head_cmd += ["--ray-client-server-port", str(next(ports)), *common, *_ports(ports)]
    worker_cmd = [RAY, "start", "--address", address, "--node-ip-address", "127.0.0.1"]
    worker_cmd += ["--resources", '{"rt_worker": 100}', *common, *_ports(ports)]
    worker_cmd = _hide_from(worker_cmd, node_disk)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd, log in ((head_cmd, "head.log"), (worker_cmd, "worker.log")):
            with open(temp / log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            time.sleep(3 if log == "head.log" else 0)
        os.environ["RAY_ADDRESS"] = address
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(configure_logging=False, log_to_driver=False)
        deadline = time.monotonic() + 90
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert time.monotonic() < deadline, (temp / "worker.log").read_text()[-2000:]
            time.sleep(0.5)
        ray.shutdown()
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.pop("RAY_AUTH_MODE", None)
        for proc in reversed(procs):
            _end(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _settings(model_repository: Path, root: Path, **serving: object) -> Settings:
    return Settings.model_validate(
        {
            "storage": {"root": str(root), "database_url": f"sqlite:///{root}/radtriage.db"},
            "models": {"repository": str(model_repository)},
            "serving": {
                "replicas": 2,
                "num_cpus_per_replica": 0.25,
                "batch_wait_timeout_s": 0.01,
                "device": "cpu",
                **serving,
            },
        }
    )


def test_attach_without_a_cluster_address_is_a_config_error(
    model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.composition import RadtriageApp

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process")
    app = RadtriageApp(_settings(model_repository, tmp_path, deploy=False))
    with pytest.raises(ConfigError, match="RAY_ADDRESS"):
        app.start_models()


@pytest.mark.integration
def test_replicas_spread_over_nodes_and_a_second_server_attaches(
    ray_cluster: str, model_repository: Path, phantoms: dict[str, Path], tmp_path: Path
) -> None:
    from ray import serve
    from ray.util.state import list_actors

    from cli.composition import RadtriageApp

    owner = RadtriageApp(_settings(model_repository, tmp_path / "a"))
    owner.start_models()  # ray.init(RAY_ADDRESS) + serve.run: the one app of the cluster
    try:
        replicas = [
            a
            for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
            if a.class_name.startswith("ServeReplica:radtriage:")
        ]
        nodes = {a.class_name.rsplit(":", 1)[1]: set() for a in replicas}
        for a in replicas:
            nodes[a.class_name.rsplit(":", 1)[1]].add(a.node_id)
        detectors = [a for a in replicas if a.class_name.endswith(":detector")]
        assert len(detectors) == 2
        assert len(nodes["detector"]) == 2, f"detector replicas on one node: {nodes}"
        assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} >= nodes["detector"]

        first = owner.analyse_folder(phantoms["positive"], tmp_path / "pos")
        assert first.result.priority == "urgent"

        attached = RadtriageApp(_settings(model_repository, tmp_path / "b", deploy=False))
        attached.start_models()  # no deployment: a handle to the running app
        assert attached.loaded_models() == owner.loaded_models()
        assert attached.check_promotions() == {}  # the owner rolls out promotions
        second = attached.analyse_folder(phantoms["negative"], tmp_path / "neg")
        assert second.result.priority == "routine"
        assert (tmp_path / "neg" / "sr.dcm").is_file()

        missing = RadtriageApp(
            _settings(model_repository, tmp_path / "c", deploy=False, app_name="elsewhere")
        )
        with pytest.raises(ModelError, match="elsewhere"):
            missing.start_models()

        attached.shutdown()  # leaves Ray, not the shared app
        ray.init(configure_logging=False, log_to_driver=False)
        assert serve.status().applications["radtriage"].status == "RUNNING"
    finally:
        owner.shutdown()  # RAY_ADDRESS set: deletes its app, keeps the cluster
    ray.init(configure_logging=False, log_to_driver=False)
    try:
        assert "radtriage" not in serve.status().applications
    finally:
        ray.shutdown()


@pytest.mark.integration
def test_serve_on_a_worker_that_cannot_read_the_node_storage(
    ray_cluster: str, node_disk: Path, model_repository: Path, phantoms: dict[str, Path]
) -> None:
    """Every deployment runs on the worker node, which cannot see the node's files; the node
    reads the study, Ray gets volumes only, and the SR comes back into the node's storage."""
    from cli.composition import RadtriageApp

    root = node_disk / "var"
    study = node_disk / "incoming" / "positive"
    shutil.copytree(phantoms["positive"], study)
    app = RadtriageApp(_settings(model_repository, root, replicas=1, resources={"rt_worker": 1}))
    app.start_models()
    try:

        @ray.remote(resources={"rt_worker": 1}, num_cpus=0)
        def visible(path: str) -> bool:
            return os.path.exists(path)

        assert ray.get(visible.remote(str(study))) is False, "the worker node sees the study"
        assert ray.get(visible.remote(str(model_repository))) is True
        analysis = app.analyse_folder(study, root / "results" / "positive")
        assert analysis.result.priority == "urgent"
        assert analysis.result.status == "reported"
        assert {d.path.name for d in analysis.documents} == {"sr.dcm", "seg.dcm"}
        assert all(d.path.is_file() and d.path.is_relative_to(root) for d in analysis.documents)
    finally:
        app.shutdown()
