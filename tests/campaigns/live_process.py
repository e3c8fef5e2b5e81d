"""The server a campaign attacks: its own process group, ready once it prints ``READY ...`` on
stdout, its memory read from /proc, stopped with SIGTERM (SIGKILL after 30 s). Shared by the
HL7 and DICOM fuzz campaigns."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class CampaignFailure(AssertionError):
    """A property of the campaign does not hold."""


class LiveProcess:
    """`argv` started from the repository root, stderr to `log`; `ready` is its READY line."""

    def __init__(self, argv: list[str], log: Path, what: str) -> None:
        self.log = log.open("w")
        # the child must not inherit a pending SIGTERM/SIGINT meant for the campaign
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=self.log,
                text=True,
                start_new_session=True,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        assert self.proc.stdout is not None
        self.ready = self.proc.stdout.readline()
        if not self.ready.startswith("READY"):
            self.stop()
            raise CampaignFailure(f"{what} did not start: {self.ready!r}; see {log}")
        self.pids = {self.proc.pid}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of `pids` together."""
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
