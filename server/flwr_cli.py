"""Driving Flower's own CLI (``flwr run``, ``flwr ls``) and reporting a failed run as failed.

``flwr run --stream`` exits 0 even when the ServerApp fails, so every run started here is
checked afterwards with ``flwr ls --run-id ID --format json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import SarcofedError
from server.deploy import FINAL_OK, flwr_env, flwr_executable, run_status

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"Successfully started run (\d+)")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def config_args(values: Mapping[str, object]) -> str:
    """``{"train.lr": 0.001, "study.name": "x"}`` -> ``train.lr=0.001 study.name="x"`` (TOML values)."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    status: str  #: e.g. "finished:completed", "finished:failed"
    details: str
    output: str

    @property
    def ok(self) -> bool:
        return self.status == FINAL_OK


def flwr_run(
    app_dir: Path,
    *,
    connection: str | None = None,
    run_config: Mapping[str, object] | None = None,
    federation_config: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> RunOutcome:
    """``flwr run APP_DIR [CONNECTION] --stream``, then the real final status."""
    cmd: list[str] = [
        flwr_executable(),
        "run",
        str(app_dir),
        *([connection] if connection else []),
        "--stream",
    ]
    if run_config:
        cmd += ["--run-config", config_args(run_config)]
    if federation_config:
        cmd += ["--federation-config", config_args(federation_config)]
    environment = dict(env or flwr_env())
    log.info("running %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, bufsize=1
    )
    lines: list[str] = []
    run_id: int | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo is not None:
                echo(line.rstrip("\n"))
            if run_id is None and (m := _RUN_ID.search(line)):
                run_id = int(m.group(1))
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        raise SarcofedError(f"flwr run did not finish within {timeout} s") from None
    output = "".join(lines)
    if run_id is None:
        raise SarcofedError(f"flwr run did not start a run (exit {proc.returncode}):\n{output[-3000:]}")
    status = run_status(run_id, connection, env=environment)
    return RunOutcome(run_id=run_id, status=status.status, details=status.details, output=output)


def local_superlink_pids(flwr_home: Path | None = None) -> list[int]:
    """PIDs of local simulation SuperLinks that ``flwr run`` auto-started on this machine.

    With ``flwr_home``, only those started under it (their ``--log-file`` lies in it), so
    other users' SuperLinks are never matched.
    """
    marker = str(Path(flwr_home) / "local-superlink") if flwr_home is not None else None
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            words = [w.decode(errors="replace") for w in (proc / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if not any("flower-superlink" in w for w in words[:2]) or "--simulation" not in words:
            continue
        if marker is None or any(w.startswith(marker) for w in words):
            pids.append(int(proc.name))
    return sorted(pids)


def stop_processes(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
