"""Coordinator side of a real deployment on Flower's engine.

- ``make_study_certs``: a study CA and the SuperLink's TLS certificate (SANs for every
  host name / IP the sites and the coordinator use). Sites get ``ca.crt`` only.
- ``write_connection``: the SuperLink connection in ``$FLWR_HOME/config.toml`` (Flower
  1.42 keeps connections there; pyproject has no federations table any more).
- ``start_run`` / ``wait_for_run`` / ``run_study``: ``flwr run`` and then the run's *final*
  status from ``flwr ls --run-id ID --format json`` (``flwr run --stream`` exits 0 even
  when the ServerApp fails, so its exit code proves nothing).
- ``CoordinatorLog``: the coordinator's own append-only JSONL log of what it started,
  registered and what each run ended as.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import SarcofedError
from server.messaging import poll_intervals

log = logging.getLogger(__name__)

FLOWER_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
FINAL_OK = "finished:completed"


class DeploymentError(SarcofedError):
    """A deployment step failed; the message says which command and why."""


# ------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class StudyCerts:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_study_certs(
    out_dir: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    *,
    days: int = 365,
    overwrite: bool = False,
) -> StudyCerts:
    """A study CA (``ca.crt``/``ca.key``) and a SuperLink certificate for ``hosts``."""
    out_dir = Path(out_dir)
    certs = StudyCerts(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.pem", out_dir / "server.key")
    if not overwrite and certs.ca_key.exists():
        raise FileExistsError(f"{certs.ca_key} already exists; pass --force to make a new study CA")
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sarcofed study CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    certs.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(certs.ca_key, ca_key)
    certs.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(certs.server_key, key)
    return certs


def superlink_command(
    certs: StudyCerts, *, host: str = "127.0.0.1", port: int = 9093, database: Path | None = None
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication on, dependency install off."""
    cmd = [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.server_cert),
        "--ssl-keyfile",
        str(certs.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


# ------------------------------------------------------------------ flwr CLI connection
def flower_home(flwr_home: Path | None = None) -> Path:
    if flwr_home is not None:
        return Path(flwr_home)
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def write_connection(
    name: str, address: str, root_certificates: Path, *, flwr_home: Path | None = None, default: bool = True
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``; keep other connections."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise DeploymentError(f"connection name {name!r}: use letters, digits, '-' and '_' only")
    path = flower_home(flwr_home) / "config.toml"
    existing: dict[str, Any] = {}
    if path.exists():
        existing = tomllib.loads(path.read_text(encoding="utf-8"))
    superlink = dict(existing.get("superlink", {}))
    superlink[name] = {"address": address, "root-certificates": str(Path(root_certificates).resolve())}
    if default or "default" not in superlink:
        superlink["default"] = name
    lines = ["[superlink]", f'default = "{superlink.pop("default")}"', ""]
    for conn, values in superlink.items():
        lines.append(f"[superlink.{conn}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict)]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------ flwr commands
def flwr_env(flwr_home: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes (the one owner): no telemetry, no dependency installs
    at run time, no update check; ``FLWR_HOME`` when given, then ``extra``."""
    env = dict(os.environ) | FLOWER_ENV
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def flwr_executable() -> str:
    """The ``flwr`` of this Python's environment (a venv not activated included), else PATH's."""
    exe = Path(sys.executable).with_name("flwr")
    return str(exe) if exe.exists() else "flwr"


def _flwr(
    args: Sequence[str],
    *,
    flwr_home: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    cmd = [flwr_executable(), *args]
    try:
        done = subprocess.run(
            cmd,
            cwd=cwd,
            env=dict(env) if env is not None else flwr_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DeploymentError(f"`{' '.join(cmd)}` did not complete: {err}") from err
    return done


def _json_out(text: str, cmd: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise DeploymentError(f"`{cmd}` printed no JSON: {text.strip()[:500]}")
    try:
        return json.loads(text[start : text.rfind("}") + 1])
    except ValueError as err:
        raise DeploymentError(f"`{cmd}` printed invalid JSON: {text.strip()[:500]}") from err


def register_supernode(public_key: Path, connection: str, *, flwr_home: Path | None = None) -> dict[str, Any]:
    """``flwr supernode register KEY CONNECTION``; returns Flower's JSON answer (node id)."""
    done = _flwr(
        ["supernode", "register", str(public_key), connection, "--format", "json"], flwr_home=flwr_home
    )
    if done.returncode != 0:
        raise DeploymentError(
            f"registering {public_key} failed (exit {done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-800:]}"
        )
    return _json_out(done.stdout, "flwr supernode register")


@dataclass(frozen=True)
class RunStatus:
    run_id: int
    status: str  #: e.g. "running", "finished:completed", "finished:failed"
    details: str

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def ok(self) -> bool:
        return self.status == FINAL_OK


def run_config_toml(run_config: Mapping[str, object]) -> str:
    """Run-config overrides as a TOML file of quoted dotted keys (``"study.mode" = "evaluate"``)."""
    lines = []
    for key, value in run_config.items():
        if not isinstance(value, bool | int | float | str):
            raise DeploymentError(f"run-config {key!r}: {value!r} is not a bool, int, float or str")
        lines.append(f"{json.dumps(key)} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def start_run(
    app_dir: Path,
    connection: str,
    run_config: Mapping[str, object] | None = None,
    *,
    flwr_home: Path | None = None,
) -> int:
    """``flwr run APP CONNECTION --format json``; returns the run id."""
    args = ["run", str(app_dir), connection, "--format", "json"]
    with tempfile.TemporaryDirectory(prefix="sarcofed-run-") as tmp:
        if run_config:
            # One TOML file, not repeated --run-config flags: Flower 1.42 merges repeated
            # flags with dict.update on the *nested* table, so `study.a=1 --run-config study.b=2`
            # silently drops study.a.
            overrides = Path(tmp) / "overrides.toml"
            overrides.write_text(run_config_toml(run_config), encoding="utf-8")
            args += ["--run-config", str(overrides)]
        done = _flwr(args, flwr_home=flwr_home, timeout=300.0)
    if done.returncode != 0:
        raise DeploymentError(
            f"`flwr run` failed (exit {done.returncode}): {(done.stdout + done.stderr).strip()[-800:]}"
        )
    answer = _json_out(done.stdout, "flwr run")
    if not answer.get("success") or not answer.get("run-id"):
        raise DeploymentError(f"`flwr run` did not start a run: {answer}")
    return int(answer["run-id"])


def run_status(
    run_id: int,
    connection: str | None,
    *,
    flwr_home: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> RunStatus:
    """The run's status from ``flwr ls [CONNECTION] --run-id ID --format json`` (the one reader of
    it: ``flwr run --stream`` exits 0 on a failed run, so every caller asks this)."""
    where = [connection] if connection else []
    done = _flwr(["ls", *where, "--run-id", str(run_id), "--format", "json"], flwr_home=flwr_home, env=env)
    answer = _json_out(done.stdout + done.stderr, "flwr ls")
    runs = answer.get("runs") or []
    if done.returncode != 0 or not answer.get("success") or not runs:
        raise DeploymentError(f"`flwr ls --run-id {run_id}` failed: {answer}")
    row = runs[0]
    return RunStatus(run_id, str(row.get("status", "")), str(row.get("status-details", "")))


def wait_for_run(
    run_id: int, connection: str, *, timeout: float, poll: float = 4.0, flwr_home: Path | None = None
) -> RunStatus:
    """Poll until the run is finished (or ``timeout`` seconds pass: DeploymentError).

    Each ``flwr ls`` starts the Flower CLI (~1 s of CPU), on the coordinator's machine that
    also runs the ServerApp: the wait starts at 1 s and grows to ``poll`` seconds.
    """
    deadline = time.monotonic() + timeout
    for wait in poll_intervals(first=min(1.0, poll), cap=poll):
        status = run_status(run_id, connection, flwr_home=flwr_home)
        if status.finished:
            return status
        if time.monotonic() > deadline:
            raise DeploymentError(f"run {run_id} still '{status.status}' after {timeout:.0f} s")
        time.sleep(wait)
    raise AssertionError("unreachable: poll_intervals never ends")  # pragma: no cover


def run_logs(run_id: int, connection: str, *, flwr_home: Path | None = None) -> str:
    """The ServerApp's logs (``flwr log ID CONNECTION --show``), for the coordinator log."""
    done = _flwr(["log", str(run_id), connection, "--show"], flwr_home=flwr_home)
    return done.stdout + done.stderr


# ------------------------------------------------------------------ coordinator log
@dataclass(frozen=True)
class CoordinatorLog:
    """Append-only JSONL log of the coordinator's actions (one JSON object per line, fsync'ed)."""

    path: Path

    def append(self, event: str, **fields: Any) -> None:
        entry = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [
            json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]


def run_study(
    app_dir: Path,
    connection: str,
    run_config: Mapping[str, object] | None = None,
    *,
    timeout: float = 3600.0,
    flwr_home: Path | None = None,
    coordinator_log: CoordinatorLog | None = None,
) -> RunStatus:
    """Start a study run and return its *final* status (never trusts ``flwr run``'s exit code)."""
    run_id = start_run(app_dir, connection, run_config, flwr_home=flwr_home)
    if coordinator_log:
        coordinator_log.append(
            "run-started", run_id=run_id, connection=connection, run_config=dict(run_config or {})
        )
    status = wait_for_run(run_id, connection, timeout=timeout, flwr_home=flwr_home)
    if coordinator_log:
        coordinator_log.append("run-finished", run_id=run_id, status=status.status, details=status.details)
    return status
