"""A simulated ClientApp computes on every CPU Flower's simulation engine reserved for it.

Flower's simulation engine runs each ClientApp in a Ray actor with ``client-resources``
``num_cpus`` CPUs (2 by default), and Ray starts its workers with ``OMP_NUM_THREADS=1``: PyTorch
trained on one core while the others idled (the demo study: 72 s a round instead of 120-133 s
once fixed, on 2 cores). Tested in a real Ray actor, reserved as Flower reserves one.
"""

from __future__ import annotations

import pytest
import torch

from common.cpu_threads import use_assigned_cpus

pytestmark = pytest.mark.slow


def test_a_ray_actor_gets_the_threads_of_the_cpus_it_reserved() -> None:
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote
        class Site:
            def threads(self) -> tuple[int, int]:
                before = torch.get_num_threads()  # 1: Ray's OMP_NUM_THREADS
                return before, use_assigned_cpus()

        actor = Site.options(num_cpus=2).remote()  # type: ignore[attr-defined]
        before, after = ray.get(actor.threads.remote())
        assert after == 2, (before, after)
    finally:
        ray.shutdown()


def test_outside_ray_pytorch_keeps_its_threads() -> None:
    threads = torch.get_num_threads()
    assert use_assigned_cpus() is None
    assert torch.get_num_threads() == threads
