"""Progress of long commands on stderr: a plain counter line ("phantom studies: 12/50"), at the
first item, then at most every few seconds, and at the end. Plain lines (no carriage returns)
read well in a terminal and in a CI or service log alike; stdout stays for results and JSON.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T],
    what: str,
    total: int | None = None,
    *,
    every_s: float = 5.0,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """Yield `items`, reporting how many have been handled as `what: done/total` on stderr."""
    out = stream if stream is not None else sys.stderr
    of = f"/{total}" if total is not None else ""
    started = last = time.monotonic()
    done = 0
    for item in items:
        if done == 0:
            print(f"{what}: 0{of} ...", file=out, flush=True)
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            print(f"{what}: {done}{of} ({now - started:.0f} s)", file=out, flush=True)
    print(f"{what}: {done}{of} done in {time.monotonic() - started:.0f} s", file=out, flush=True)
