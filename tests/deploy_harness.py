"""A real Flower deployment on 127.0.0.1 for tests and benches: one SuperLink with TLS and
SuperNode authentication, one SuperNode per demo site, each with its own ports and
FLWR_HOME. Every process is started in its own session and stopped by its pid (its
process group), never by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from client.allowlist import code_files
from client.deploy import JoinSpec, generate_site_keys, supernode_command, supernode_env
from server.deploy import (
    CoordinatorLog,
    RunStatus,
    StudyCerts,
    make_study_certs,
    register_supernode,
    run_study,
    start_run,
    superlink_command,
    wait_for_run,
    write_connection,
)

REPO = Path(__file__).resolve().parent.parent
CONNECTION = "study"


def snapshot_app(dest: Path, source: Path = REPO) -> Path:
    """Copy exactly the files the app bundle ships (see ``client.allowlist.code_files``).

    ``flwr run`` on the snapshot is immune to edits in the working tree during a test,
    and ``code_hash(snapshot)`` is the hash every site will compute.
    """
    for rel in code_files(source):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, target)
    return dest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to this process's own group (by its pid), then SIGKILL if it lingers."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        # children (superexec, ClientApp processes) share the group; make sure none survive
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


@dataclass
class Deployment:
    root: Path
    certs: StudyCerts
    superlink_port: int
    flwr_home: Path
    app_dir: Path = REPO
    proxy_address: str | None = None
    procs: dict[str, Proc] = field(default_factory=dict)
    coordinator_log: CoordinatorLog | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str]) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log, "ab")
        popen = subprocess.Popen(
            cmd, stdout=handle, stderr=subprocess.STDOUT, env=dict(env), cwd=self.root, start_new_session=True
        )
        handle.close()
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> Proc:
        env = supernode_env()
        env["FLWR_HOME"] = str(self.root / "superlink-home")
        cmd = superlink_command(self.certs, port=self.superlink_port, database=self.root / "superlink.db")
        proc = self._spawn("superlink", cmd, env)
        wait_for_port(self.superlink_port, proc=proc.popen)
        return proc

    def restart_superlink(self) -> Proc:
        """Stop the SuperLink (by its pid / process group, with the ServerApps it runs) and
        start it again on the same port with the same ``--database``."""
        old = self.procs.pop("superlink", None)
        if old is not None:
            old.stop()
            os.replace(old.log, old.log.with_name(f"superlink-{old.popen.pid}.log"))
        return self.start_superlink()

    def start_proxy(self) -> str:
        """The Fleet-only proxy in front of the SuperLink; returns the address sites use."""
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "server.proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--superlink",
            self.address,
            "--certs",
            str(self.certs.ca_cert.parent),
        ]
        proc = self._spawn("proxy", cmd, supernode_env())
        wait_for_port(port, proc=proc.popen)
        self.proxy_address = f"127.0.0.1:{port}"
        return self.proxy_address

    def add_site(
        self,
        site_dir: Path,
        *,
        register: bool = True,
        name: str | None = None,
        max_wait_time: float | None = None,
        via_proxy: bool = False,
    ) -> Proc:
        """Make keys for the site, register them (unless told not to), start its SuperNode."""
        name = name or Path(site_dir).name
        keys = generate_site_keys(self.root / "keys" / name)
        if register:
            answer = register_supernode(keys.public_key, CONNECTION, flwr_home=self.flwr_home)
            if self.coordinator_log:
                self.coordinator_log.append("supernode-registered", site=name, answer=answer)
        spec = JoinSpec(
            site_dir=site_dir,
            superlink=self.proxy_address if via_proxy and self.proxy_address else self.address,
            root_certificates=self.certs.ca_cert,
            private_key=keys.private_key,
            runtime_port=free_port(),
            max_wait_time=max_wait_time,
        )
        env = supernode_env()
        env["FLWR_HOME"] = str(self.root / "homes" / name)
        return self._spawn(f"supernode-{name}", supernode_command(spec), env)

    def run(self, run_config: Mapping[str, object], timeout: float = 600.0) -> RunStatus:
        return run_study(
            self.app_dir,
            CONNECTION,
            run_config,
            timeout=timeout,
            flwr_home=self.flwr_home,
            coordinator_log=self.coordinator_log,
        )

    def start(self, run_config: Mapping[str, object]) -> int:
        """``flwr run`` without waiting for the end; returns the run id (see ``run`` to wait)."""
        run_id = start_run(self.app_dir, CONNECTION, run_config, flwr_home=self.flwr_home)
        if self.coordinator_log:
            self.coordinator_log.append(
                "run-started", run_id=run_id, connection=CONNECTION, run_config=dict(run_config)
            )
        return run_id

    def wait(self, run_id: int, timeout: float = 600.0) -> RunStatus:
        """The run's final status (logged as ``run-finished`` like ``run``)."""
        status = wait_for_run(run_id, CONNECTION, timeout=timeout, flwr_home=self.flwr_home)
        if self.coordinator_log:
            self.coordinator_log.append(
                "run-finished", run_id=run_id, status=status.status, details=status.details
            )
        return status

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


@contextlib.contextmanager
def deployment(root: Path) -> Iterator[Deployment]:
    """A SuperLink (TLS + node auth) and a flwr CLI connection to it; stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    certs = make_study_certs(root / "certs")
    flwr_home = root / "coordinator-home"
    app_dir = snapshot_app(root / "app")
    log = CoordinatorLog(root / "coordinator.jsonl")
    dep = Deployment(root, certs, free_port(), flwr_home, app_dir=app_dir, coordinator_log=log)
    write_connection(CONNECTION, dep.address, certs.ca_cert, flwr_home=flwr_home)
    try:
        dep.start_superlink()
        yield dep
    finally:
        dep.stop()
