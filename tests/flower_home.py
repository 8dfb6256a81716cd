"""A private Flower home for tests that run ``flwr run`` on the simulation engine.

``private_flower_home`` gives the environment (FLWR_HOME, SARCOFED_HOME and the local
SuperLink's ports under ``tmp_path``) and, on exit, stops every SuperLink started under that
FLWR_HOME by pid: SIGTERM, up to ``grace_s`` seconds to exit, then SIGKILL, and it fails the test
if one ignored both. Free ports by default, so a test never reaches another test's SuperLink
(which would run its study with that test's code).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from deploy_harness import free_port

from server.deploy import flwr_env
from server.flwr_cli import local_superlink_pids, stop_processes


@contextlib.contextmanager
def private_flower_home(
    tmp_path: Path, *, http_port: int | None = None, control_port: int | None = None, grace_s: float = 30.0
) -> Iterator[dict[str, str]]:
    home = tmp_path / "flwr-home"
    env = flwr_env(
        extra={
            "FLWR_HOME": str(home),
            "SARCOFED_HOME": str(tmp_path / "sarcofed-home"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port or free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port or free_port()),
        }
    )
    try:
        yield env
    finally:
        stop_processes(local_superlink_pids(home))
        deadline = time.monotonic() + grace_s
        while (left := local_superlink_pids(home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # SIGTERM was not enough: these are ours (started under this FLWR_HOME)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"local SuperLink(s) {left} ignored SIGTERM for {grace_s:.0f} s"
