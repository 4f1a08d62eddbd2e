"""Ray, for the two parts that run on it (dataset jobs, `recon-run serve --ray`): join a cluster or
start a local Ray sized for the work.

Ray (the `ray` extra) is imported only when `start_ray` runs.
"""

from __future__ import annotations

import logging
import math
import os


def start_ray(address: str | None, cpus: float) -> bool:
    """Connect to the Ray cluster at `address`, or start a local Ray in this process with at least
    `cpus` logical CPUs (and no fewer than this machine's cores); True when this call started or
    connected it (the caller then shuts it down), False when Ray was running already."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)), include_dashboard=False, logging_level=logging.WARNING
        )
    return True
