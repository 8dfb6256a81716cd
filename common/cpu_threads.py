"""The threads a simulated ClientApp computes on: every CPU Flower's simulation engine reserved.

The simulation engine runs each ClientApp in a Ray actor reserved ``client-resources``
``num_cpus`` CPUs (2 by default), but Ray starts its worker processes with
``OMP_NUM_THREADS=1``, so PyTorch trained on one of them and the others sat idle (the demo study
on 2 cores: one core at 99%, rounds of 110-133 s instead of 62-81 s). Outside Ray (the
deployment engine, site commands) nothing changes, and torch is not imported: each message
there is a fresh ClientApp process, and identify and compare need no model.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def use_assigned_cpus() -> int | None:
    """Give PyTorch the CPUs Ray reserved for this ClientApp; returns the thread count now in
    use, or ``None`` outside a Ray worker (nothing changed)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    import torch

    threads = torch.get_num_threads()
    try:
        assigned = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    except Exception as err:  # an older or newer Ray without this API: leave PyTorch as it is
        log.debug("Ray's assigned resources are unavailable (%s); PyTorch keeps %d thread(s)", err, threads)
        return threads
    if assigned > threads:
        torch.set_num_threads(assigned)
        log.info("simulation: PyTorch uses the %d CPU(s) Ray reserved for this ClientApp", assigned)
    return torch.get_num_threads()
