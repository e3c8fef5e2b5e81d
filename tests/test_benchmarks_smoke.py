"""The `make bench` runner renders its README from a results folder; the end-to-end summary and
the memory sampler are pure enough to check without running a server. No timings asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import run
from benchmarks.end_to_end import Push, parse_levels, summarise_level
from benchmarks.memory import TreeSampler, process_memory, process_tree
from cli.demo import DemoStudy

REPO = Path(__file__).resolve().parents[1]

INGEST = {
    "series": {
        "instances": 40,
        "rows": 64,
        "columns": 64,
        "megabytes": 0.4,
        "transfer_syntax": "Explicit VR Little Endian",
    },
    "runs": {
        "radtriage": {
            "1_sender": {"seconds": 1.0, "instances_per_s": 100.0, "mb_per_s": 1.0},
            "4_sender": {
                "seconds": 0.5,
                "instances_per_s": 200.0,
                "mb_per_s": 2.0,
                "cpu_s_per_1000": 1.25,
            },
        },
        "storescp": {
            "1_sender": {"seconds": 0.1, "instances_per_s": 400.0, "mb_per_s": 4.0},
            "4_sender": {"seconds": 0.1, "instances_per_s": 400.0, "mb_per_s": 4.0},
        },
        "orthanc": {
            "1_sender": {"seconds": 2.0, "instances_per_s": 50.0, "mb_per_s": 0.5},
            "4_sender": {"seconds": 1.0, "instances_per_s": 80.0, "mb_per_s": 0.8},
        },
    },
    "sr_latency": {"last_instance_to_sr_accepted_s": 1.5, "of_which_quiet_period_s": 1.0},
    "one_instance_per_association": {
        "radtriage": {"associations": 5, "associations_per_s": 20.0, "cpu_ms_per_association": 9.5},
    },
    "notes": "fake",
    "date": "2030-01-01T00:00:00Z",
}

INFERENCE = {
    "machine": {"threads": 2},
    "detector": {"source": "fake", "input_shape": [3, 8, 32, 32]},
    "ort_vs_torch": [
        {
            "batch": b,
            "torch_eager_ms": 30.0 * b,
            "onnxruntime_ms": 10.0 * b,
            "ort_ms_per_study": 10.0,
            "max_abs_diff": 1e-6,
        }
        for b in (1, 2, 4)
    ],
    "one_replica": {
        "studies": 1,
        "median_s_per_study": 2.0,
        "studies_per_hour": 1800,
        "median_stage_ms": {"load": 500.0, "inference": 1500.0},
    },
}


def _level(interval: float, grows: bool, departures: int) -> dict[str, Any]:
    return {
        "interval_s": interval,
        "offered_studies_per_hour": round(3600 / interval),
        "studies": 3,
        "delivered": 3,
        "latency_p50_s": 4.0,
        "latency_p95_s": 5.0,
        "turnaround_p50_s": 8.0,
        "turnaround_p95_s": 12.0,
        "push_p50_s": 3.0,
        "queue_p50_s": 0.5,
        "analysis_p50_s": 3.0,
        "turnaround_growth_s": 6.0 if grows else 0.1,
        "queue_grows": grows,
        "departures_per_hour": departures,
    }


MEM = {
    "samples": 10,
    "interval_s": 0.2,
    "peak_rss_mb": 3000.0,
    "peak_pss_mb": 1900.0,
    "mean_pss_mb": 1500.0,
    "peak_processes": 14,
    "top_pss_mb_at_peak": {"ray::ServeReplica:radtriage:TriageIngress": 345.0},
}

END_TO_END = {
    "backend": "ray",
    "models": "bundled",
    "pacs": "local",
    "sender": "storescu",
    "study": {"instances": 188, "megabytes": 23.7, "series": "bpMRI"},
    "server_ready_s": 30.0,
    "levels": [_level(10.0, False, 360), _level(2.0, True, 900)],
    "sustainable_studies_per_hour": 360,
    "capacity_studies_per_hour": 900,
    "capacity_source": "departure rate of the fastest overloaded level",
    "memory": {"idle_after_ready": MEM, "during_stream": MEM, "whole_run": MEM},
}


def _write(folder: Path, **files: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))


def test_render_tables_ratios_and_machine(tmp_path: Path) -> None:
    machine = {"cores": 2, "cpu": "Fake CPU", "versions": {"onnxruntime": "9.9"}}
    _write(
        tmp_path,
        ingest=INGEST,
        inference=INFERENCE,
        end_to_end=END_TO_END,
        run={"date": "2030-01-01T00:00:00Z", "machine": machine, "benchmarks": {}},
    )
    text = run.render(tmp_path)
    for heading in ("## Machine", "## ingest", "## inference", "## end-to-end"):
        assert heading in text
    assert "Fake CPU" in text and "2030-01-01T00:00:00Z" in text
    # ingest: radtriage 100 inst/s vs storescp 400 and Orthanc 50 in the same run
    assert "| **radtriage** | 100.0 | 200.0 | 2.00 | - / 1.25 | 2.00x | (ours) |" in text
    assert "| storescp | 400.0 | 400.0 | 4.00 | - / - | 1.00x | 0.25x / 0.50x |" in text
    assert "| orthanc | 50.0 | 80.0 | 0.80 | - / - | 1.60x | 2.00x / 2.50x |" in text
    assert "radtriage 20.0 associations/s, 9.5 ms CPU each" in text
    # inference: ORT vs torch eager
    assert "| 1 | 30.0 | 10.0 | 3.00x | 10.0 |" in text
    # end-to-end: levels, the verdict, the ratio to the inference benchmark, memory
    assert "| 2.0 s | 1,800 | 3/3 |" in text and "**yes**" in text
    assert "**360 studies/hour**" in text and "**900 studies/hour**" in text
    assert "0.50x" in text.split("## end-to-end", 1)[1]
    assert "| during the stream | 1,900.0 |" in text
    assert "TriageIngress" in text


def test_render_missing_failed_and_malformed(tmp_path: Path) -> None:
    _write(
        tmp_path,
        ingest={"runs": {}},
        run={"benchmarks": {"inference": {"exit_code": 1, "seconds": 3.0}}},
    )
    text = run.render(tmp_path)
    assert "not in the expected shape" in text.split("## inference", 1)[0]
    inference = text.split("## inference", 1)[1].split("## end-to-end", 1)[0]
    assert "Failed in this run" in inference and "Not run" in inference
    assert "Not run" in text.split("## end-to-end", 1)[1]


def test_runner_render_only_cli(tmp_path: Path) -> None:
    _write(tmp_path / "results", inference=INFERENCE)
    readme = tmp_path / "README.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--render-only",
            "--results",
            str(tmp_path / "results"),
            "--readme",
            str(readme),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1,800 studies/hour" in readme.read_text()


def test_committed_results_render() -> None:
    """The JSON committed under benchmarks/results renders without a shape error."""
    text = run.render(REPO / "benchmarks" / "results")
    assert "not in the expected shape" not in text


def _push(i: int, started: float, sr_after: float, queue_ms: float) -> Push:
    p = Push(DemoStudy(Path("."), f"1.2.3.{i}", "x", "bench"), 0, started)
    p.started_at, p.done_at = started, started + 2.0
    p.sr_at = started + sr_after
    p.row = {
        "status": "sent",
        "last_received_at": started + 2.0,
        "timings_ms": {"wait_complete": 500.0, "queue": queue_ms, "analysis": 3000.0, "send": 1.0},
    }
    return p


def test_summarise_level_flags_a_growing_queue() -> None:
    steady = summarise_level(10.0, [_push(i, 10.0 * i, 6.0, 10.0) for i in range(4)])
    assert steady["queue_grows"] is False and steady["delivered"] == 4
    assert steady["latency_p50_s"] == 4.0 and steady["turnaround_p50_s"] == 6.0
    assert steady["departures_per_hour"] == 360
    growing = summarise_level(2.0, [_push(i, 2.0 * i, 6.0 + 3.0 * i, 3000.0 * i) for i in range(6)])
    assert growing["queue_grows"] is True and growing["turnaround_growth_s"] == 9.0
    lost = summarise_level(2.0, [_push(0, 0.0, 6.0, 1.0), _push(1, 2.0, 6.0, 1.0)])
    lost_sr = Push(DemoStudy(Path("."), "1.2.3.9", "x", "bench"), 0, 0.0)
    assert summarise_level(2.0, [lost_sr])["delivered"] == 0
    assert lost["delivered"] == 2
    assert parse_levels("20:3,2.5:8") == [(20.0, 3), (2.5, 8)]


def test_memory_sampler_sees_a_child_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in process_tree(os.getpid())
        rss, pss = process_memory(os.getpid()) or (0, 0)
        assert rss > 0 and pss > 0
        sampler = TreeSampler(os.getpid(), interval_s=0.05)
        for _ in range(3):
            sampler.sample_once()
        summary = sampler.summary()
        assert summary["samples"] == 3 and summary["peak_processes"] >= 2
        assert summary["peak_pss_mb"] <= summary["peak_rss_mb"]
        assert child.pid in sampler.seen_pids
    finally:
        child.kill()
        child.wait()
