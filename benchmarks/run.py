"""`make bench`: run every benchmark in order, each writing ``benchmarks/results/<name>.json``,
then render ``benchmarks/README.md`` (a table per benchmark, ratios against the peer measured in
the same run, the machine and the date).

    .venv/bin/python -m benchmarks.run [--quick] [--only NAME ...] [--render-only]

The default sizes keep the whole run under 10 minutes on a 2-core machine; ``--quick`` is a
smaller smoke run (numbers too noisy to publish) into a temporary folder unless ``--results``
is given. A benchmark that fails is recorded as such in ``results/run.json`` and the README,
and the runner exits 1 after rendering the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
README = HERE / "README.md"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Benchmark:
    name: str  # module benchmarks.<name>, results/<name>.json
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    timeout_s: float
    what: str


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "ingest",
        (),  # its defaults: 1,000 instances of 256x256, best of 1
        ("--instances", "40", "--repeats", "1"),
        600,
        "C-STORE ingest: radtriage vs DCMTK storescp vs Orthanc, 1, 2, 4 and 8 storescu senders",
    ),
    Benchmark(
        "inference",
        (),  # its defaults: 5 repeats per batch size, 3 studies
        ("--repeats", "1", "--studies", "1"),
        240,
        "detector: ONNX Runtime vs torch eager (batch 1/2/4); one replica's studies/hour",
    ),
    Benchmark(
        "end_to_end",
        ("--levels", "20:3,10:3,5:6,3:8,2:10"),
        ("--levels", "5:2,2:3"),
        420,
        "real `radtriage serve` (Ray Serve) under a stream of studies; memory of its tree",
    ),
)


# --- the machine ------------------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (run.stdout or run.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def _cpuinfo(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, OS and the versions of everything the benchmarks compare."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("onnxruntime", "torch", "ray", "pynetdicom", "pydicom", "SQLAlchemy", "monai"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    versions["dcmtk"] = _first_line(["storescu", "--version"])
    versions["orthanc"] = _first_line(["Orthanc", "--version"])
    return {
        "cores": os.cpu_count(),
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "memory_gb": _mem_total_gb(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


# --- running ----------------------------------------------------------------------------------


def run_benchmark(bench: Benchmark, results: Path, quick: bool) -> dict[str, Any]:
    """Run one benchmark module as its own process; its output streams to ours."""
    args = bench.quick_args if quick else bench.args
    cmd = [sys.executable, "-m", f"benchmarks.{bench.name}", *args]
    cmd += ["--out", str(results / f"{bench.name}.json")]
    print(f"== {bench.name}: {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    try:
        code = subprocess.run(cmd, cwd=REPO, timeout=bench.timeout_s).returncode
    except subprocess.TimeoutExpired:
        code = 124
    seconds = round(time.monotonic() - started, 1)
    print(f"== {bench.name}: exit {code} after {seconds} s", flush=True)
    return {"exit_code": code, "seconds": seconds, "args": list(args)}


# --- rendering --------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return "-"
    return f"{a / b:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_ingest(d: dict[str, Any]) -> str:
    runs = d["runs"]
    ours = runs["radtriage"]
    senders = [k for k in ours if k.endswith("_sender")]  # "1_sender", "2_sender", "4_sender"
    rows = []
    for name, r in runs.items():
        base = r["1_sender"]["instances_per_s"]
        rows.append(
            [
                f"**{name}**" if name == "radtriage" else name,
                *(_fmt(r[k]["instances_per_s"]) for k in senders),
                _fmt(r[senders[-1]]["mb_per_s"], 2),
                " / ".join(_fmt(r[k].get("cpu_s_per_1000"), 2) for k in senders),
                *(_ratio(r[k]["instances_per_s"], base) for k in senders[1:]),
                "(ours)"
                if name == "radtriage"
                else " / ".join(
                    _ratio(ours[k]["instances_per_s"], r[k]["instances_per_s"]) for k in senders
                ),
            ]
        )
    s = d["series"]
    n = [k.split("_")[0] for k in senders]
    out = [
        f"One classic MR series, {s['instances']} instances of {s['rows']}x{s['columns']} "
        f"({s['megabytes']} MB, {s['transfer_syntax']}), sent by DCMTK storescu over "
        f"{'/'.join(n)} parallel associations; every rate is from the same run.",
        "",
        table(
            [
                "receiver",
                *(f"{k} sender{'s' if k != '1' else ''} inst/s" for k in n),
                f"{n[-1]} senders MB/s",
                f"CPU s per 1,000 ({'/'.join(n)})",
                *(f"{k} ÷ 1 sender" for k in n[1:]),
                f"radtriage ÷ this ({'/'.join(n)})",
            ],
            rows,
        ),
    ]
    lat = d.get("sr_latency")
    if lat:
        out += [
            "",
            f"Node overhead, last instance -> SR accepted (test analyser, no model): "
            f"{_fmt(lat['last_instance_to_sr_accepted_s'], 2)} s, of which quiet period "
            f"{_fmt(lat.get('of_which_quiet_period_s'))} s.",
        ]
    per_association = d.get("one_instance_per_association")
    if per_association:
        out += [
            "",
            "One instance per association (storescu's default proposal, one after another): "
            + "; ".join(
                f"{name} {_fmt(r['associations_per_s'])} associations/s, "
                f"{_fmt(r['cpu_ms_per_association'], 1)} ms CPU each"
                for name, r in per_association.items()
            )
            + ".",
        ]
    durable = d.get("durable_writes_per_s")
    if durable:
        out += [
            "",
            "The durable write alone (`store.spool.write_atomic` of one instance, nothing else), "
            "files/s by 1/2/4 writer processes: "
            + "; ".join(
                f"{when} {' / '.join(_fmt(v, 0) for v in rates.values())}"
                for when, rates in durable.items()
            )
            + ".",
        ]
    if d.get("notes"):
        out += ["", f"_{d['notes']}_"]
    return "\n".join(out)


def render_inference(d: dict[str, Any]) -> str:
    rows = [
        [
            str(r["batch"]),
            _fmt(r["torch_eager_ms"]),
            _fmt(r["onnxruntime_ms"]),
            _ratio(r["torch_eager_ms"], r["onnxruntime_ms"]),
            _fmt(r["ort_ms_per_study"]),
            f"{r['max_abs_diff']:.1e}",
        ]
        for r in d["ort_vs_torch"]
    ]
    det = d["detector"]
    one = d["one_replica"]
    stages = ", ".join(f"{k} {_fmt(v, 0)} ms" for k, v in one["median_stage_ms"].items())
    return "\n".join(
        [
            f"Detector: {det['source']}; input {'x'.join(map(str, det['input_shape']))} "
            f"(channels, z, y, x), {d['machine'].get('threads')} threads.",
            "",
            table(
                [
                    "batch",
                    "torch eager ms",
                    "ONNX Runtime ms",
                    "ORT speed-up",
                    "ORT ms/study",
                    "max abs diff",
                ],
                rows,
            ),
            "",
            f"One replica, whole analysis (DICOM -> both models -> SR/SEG), sequential: "
            f"**{_fmt(one['studies_per_hour'])} studies/hour** "
            f"({_fmt(one['median_s_per_study'], 2)} s/study median of {one['studies']}; {stages}).",
        ]
    )


def render_end_to_end(d: dict[str, Any], peers: dict[str, Any]) -> str:
    rows = []
    for lv in d["levels"]:
        rows.append(
            [
                f"{_fmt(lv['interval_s'], 1)} s",
                _fmt(lv["offered_studies_per_hour"]),
                f"{lv['delivered']}/{lv['studies']}",
                _fmt(lv["latency_p50_s"]),
                _fmt(lv["latency_p95_s"]),
                _fmt(lv["turnaround_p50_s"]),
                _fmt(lv["turnaround_p95_s"]),
                _fmt(lv["push_p50_s"]),
                _fmt(lv["queue_p50_s"]),
                _fmt(lv["analysis_p50_s"]),
                _fmt(lv["turnaround_growth_s"]),
                "**yes**" if lv["queue_grows"] else "no",
                _fmt(lv["departures_per_hour"]),
                _fmt(lv.get("load_average_1m"), 2),
            ]
        )
    st = d["study"]
    out = [
        f"Backend: {d['backend']} ({d['models']}); sender: {d['sender']}; PACS: {d['pacs']}. "
        f"Each study: {st['instances']} instances, {st['megabytes']} MB ({st['series']}). "
        f"Server ready (models warm) {_fmt(d['server_ready_s'])} s after start.",
        "",
        "Latency = last instance received by the node -> SR accepted by the PACS; turnaround = "
        "sender's first byte -> SR at the PACS. Times in seconds; load = the host's 1-minute "
        "load average at the end of the level (other work on a shared machine).",
        "",
        table(
            [
                "one study every",
                "offered /h",
                "SR back",
                "latency p50",
                "latency p95",
                "turnaround p50",
                "turnaround p95",
                "push p50",
                "queue p50",
                "analysis p50",
                "growth",
                "queue grows",
                "departures /h",
                "load 1 min",
            ],
            rows,
        ),
        "",
        f"Sustainable rate (the last level before the queue first grew): "
        f"**{_fmt(d['sustainable_studies_per_hour'])} studies/hour**; capacity: "
        f"**{_fmt(d['capacity_studies_per_hour'])} studies/hour** ({d['capacity_source']}).",
    ]
    inference = peers.get("inference")
    if inference:
        ideal = inference["one_replica"]["studies_per_hour"]
        out.append(
            f"Against the inference benchmark's one-replica analysis rate in the same run "
            f"({_fmt(ideal)} studies/hour, no DICOM network, no queue): end-to-end capacity is "
            f"{_ratio(d['capacity_studies_per_hour'], ideal)}."
        )
    mem = d["memory"]
    mrows = [
        [
            phase,
            _fmt(m.get("peak_pss_mb")),
            _fmt(m.get("mean_pss_mb")),
            _fmt(m.get("peak_rss_mb")),
            _fmt(m.get("peak_processes")),
            _fmt(m.get("samples")),
        ]
        for phase, m in (
            ("idle, models warm", mem["idle_after_ready"]),
            ("during the stream", mem["during_stream"]),
            ("whole run (incl. start-up)", mem["whole_run"]),
        )
    ]
    top = mem["whole_run"].get("top_pss_mb_at_peak") or {}
    out += [
        "",
        "**Memory** of the server's whole process tree (server, Ray GCS/raylet, Serve replicas), "
        f"sampled every {_fmt(mem['whole_run'].get('interval_s'))} s. PSS shares each shared "
        "page among its mappers (the real footprint); the RSS sum counts shared pages per process.",
        "",
        table(
            ["phase", "peak PSS MB", "mean PSS MB", "peak RSS sum MB", "processes", "samples"],
            mrows,
        ),
    ]
    if top:
        out += [
            "",
            "At the peak: " + ", ".join(f"{name} {_fmt(mb, 0)} MB" for name, mb in top.items()),
        ]
    return "\n".join(out)


Renderer = Callable[[dict[str, Any], dict[str, Any]], str]
RENDERERS: dict[str, Renderer] = {
    "ingest": lambda d, _: render_ingest(d),
    "inference": lambda d, _: render_inference(d),
    "end_to_end": render_end_to_end,
}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _machine_section(m: dict[str, Any]) -> str:
    v = m.get("versions", {})
    rows = [
        ["cores", _fmt(m.get("cores"))],
        ["CPU", _fmt(m.get("cpu"))],
        ["memory", f"{_fmt(m.get('memory_gb'))} GB"],
        ["OS", _fmt(m.get("platform"))],
        ["load average at start", ", ".join(map(str, m.get("load_average_at_start", [])))],
    ]
    rows += [[name, _fmt(version)] for name, version in v.items()]
    return table(["", ""], rows)


#: `benchmarks.inference --grid picai` (run by hand: minutes at this size on 2 CPUs).
PICAI_FILE = "inference_picai.json"


def render(results: Path) -> str:
    """The README for the results in `results` (any subset of benchmarks may be missing)."""
    run = _load(results / RUN_FILE) or {}
    data = {b.name: _load(results / f"{b.name}.json") for b in BENCHMARKS}
    peers = {k: v for k, v in data.items() if v is not None}
    status = run.get("benchmarks", {})
    out = [
        "# Benchmarks",
        "",
        "<!-- generated by `python -m benchmarks.run` (make bench); edit benchmarks/run.py -->",
        "",
        "`make bench` runs every benchmark below in one go (`python -m benchmarks.run`); each "
        "writes `benchmarks/results/<name>.json` and this page is rendered from those files. "
        "Ratios compare against a peer measured in the same run, on the same machine. The "
        "machine is shared: read absolute times as orders of magnitude, and the ratios as the "
        "result.",
        "",
        f"Run: {run.get('date', 'unknown date')}"
        + (" (quick mode: too small to publish)" if run.get("quick") else ""),
        "",
    ]
    if run.get("machine"):
        out += ["## Machine", "", _machine_section(run["machine"]), ""]
    for bench in BENCHMARKS:
        out += [f"## {bench.name.replace('_', '-')}", "", f"_{bench.what}._", ""]
        info = status.get(bench.name)
        d = data[bench.name]
        if info is not None and info.get("exit_code") != 0:
            out += [
                f"**Failed in this run** (exit code {info.get('exit_code')} after "
                f"{info.get('seconds')} s)"
                + ("; the table below is from an earlier run." if d is not None else "."),
                "",
            ]
        if d is None:
            out += ["Not run: no results file.", ""]
            continue
        try:
            out += [RENDERERS[bench.name](d, peers), ""]
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            out += [f"Results file present but not in the expected shape ({exc!r}).", ""]
        notes = []
        if d.get("date"):
            notes.append(f"measured {d['date']}")
        if info and info.get("seconds"):
            notes.append(
                f"took {info['seconds']} s with {' '.join(info.get('args', [])) or 'its defaults'}"
            )
        if notes:
            out += [f"<sub>{'; '.join(notes)}</sub>", ""]
        picai = _load(results / PICAI_FILE) if bench.name == "inference" else None
        if picai is not None:
            out += [
                "### At the PI-CAI grid (3 x 20 x 256 x 256)",
                "",
                f"`python -m benchmarks.inference --grid picai` (measured {picai.get('date')}): "
                "the bundled architecture with random weights at the PI-CAI baseline's grid, a "
                "speed measurement only.",
                "",
                render_inference(picai),
                "",
            ]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS])
    parser.add_argument("--render-only", action="store_true", help="only re-render the README")
    parser.add_argument("--results", type=Path, help=f"default {RESULTS} (a temp dir if --quick)")
    parser.add_argument("--readme", type=Path, help="default <results>/../README.md")
    args = parser.parse_args(argv)
    if args.results is None:
        # A quick run must not overwrite the published results.
        args.results = (
            Path(tempfile.mkdtemp(prefix="radtriage-bench-quick-")) if args.quick else RESULTS
        )
    if args.readme is None:
        args.readme = README if args.results == RESULTS else args.results / "README.md"

    args.results.mkdir(parents=True, exist_ok=True)
    failed = False
    if not args.render_only:
        run_path = args.results / RUN_FILE
        run = _load(run_path) or {}
        run.update(
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "quick": args.quick,
                "machine": machine(),
            }
        )
        status = run.setdefault("benchmarks", {})
        started = time.monotonic()
        for bench in BENCHMARKS:
            if args.only and bench.name not in args.only:
                continue
            status[bench.name] = run_benchmark(bench, args.results, args.quick)
            failed = failed or status[bench.name]["exit_code"] != 0
            run_path.write_text(json.dumps(run, indent=2) + "\n")
        run["total_seconds"] = round(time.monotonic() - started, 1)
        run_path.write_text(json.dumps(run, indent=2) + "\n")
        print(f"== all benchmarks: {run['total_seconds']} s", flush=True)
    args.readme.write_text(render(args.results))
    print(f"wrote {args.readme}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
