"""Starting a local Ray: a start that fails twice is one clear error, not a Ray traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]


def test_a_ray_that_cannot_start_is_retried_then_reported(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code = (
        "from serving.ray_local import init_local_ray\n"
        f"init_local_ray(1, pause_s=0, _temp_dir={str(not_a_dir / 'ray')!r})\n"
    )
    # a subprocess: a failed ray.init leaves process-wide Ray state behind
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "Ray did not start (attempt 1 of 2)" in proc.stderr
    assert "core.errors.ModelError: Ray did not start on this host after 2 attempts" in proc.stderr
    assert f"{not_a_dir / 'ray'}/session_latest/logs" in proc.stderr
