"""Start a single-node Ray for `radtriage serve` (and the tests that run Serve in-process).

Ray's head start waits a fixed 30 s for its raylet to register with the GCS. On a small, busy
host (2 cores, another Ray still shutting down) that wait can run out although nothing is wrong.
One more attempt after a clean `ray.shutdown()` is what an operator would do by hand; a second
failure is a real one and is reported with where Ray's own logs are.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from core.errors import ModelError

log = logging.getLogger(__name__)

RAY_TEMP = "/tmp/ray"


def init_local_ray(num_cpus: int, attempts: int = 2, pause_s: float = 5.0, **kwargs: Any) -> None:
    """`ray.init` a new local cluster with `num_cpus`, retrying a failed start `attempts` times.

    A process already connected to Ray keeps that connection (nothing is started).
    """
    import ray

    if ray.is_initialized():
        return
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, **kwargs)
            return
        except Exception as exc:  # Ray raises bare Exception for a raylet start timeout
            last = exc
            ray.shutdown()  # a half-started node leaves a driver state behind
            if attempt < attempts:
                log.warning("Ray did not start (attempt %d of %d): %s", attempt, attempts, exc)
                time.sleep(pause_s)
    logs = f"{kwargs.get('_temp_dir', RAY_TEMP)}/session_latest/logs"
    raise ModelError(
        f"Ray did not start on this host after {attempts} attempts ({last}); Ray's own logs are "
        f"in {logs}. Check free memory and /dev/shm, that no other Ray is still stopping, "
        "or set RAY_ADDRESS to use a running cluster"
    ) from last
