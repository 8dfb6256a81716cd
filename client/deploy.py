"""What a hospital needs to join a study on Flower's deployment engine.

- ``generate_site_keys``: the SuperNode's EC P-384 key pair (OpenSSH format, as
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read
  them). The public key goes to the coordinator; the private key never leaves the site.
- ``supernode_command``: the exact SuperNode command for a site folder (TLS on, node
  authentication, the site folder in ``--node-config``, its own runtime port). It runs
  ``sarcofed-supernode``: Flower's ``flower-supernode`` with the same flags and one repair
  (a stale reply can no longer hold back a live one; see ``client.supernode``).
- ``supernode_env``: the environment it runs with (telemetry and dependency installation off).

Keys default to ``<parent>/<site folder>.keys/`` beside the site folder, never inside it.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PRIVATE_KEY_NAME = "supernode_ec384"
PUBLIC_KEY_NAME = "supernode_ec384.pub"
#: Port of the SuperNode's local runtime API (ClientApp processes talk to it); one per SuperNode.
DEFAULT_RUNTIME_PORT = 9094

#: Environment for every Flower process sarcofed starts: no telemetry, never install
#: dependencies at run time (the site runs only the code it installed and reviewed).
FLOWER_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


@dataclass(frozen=True)
class SiteKeys:
    private_key: Path
    public_key: Path


def default_keys_dir(site_dir: Path) -> Path:
    site = Path(site_dir).expanduser().resolve()
    return site.with_name(site.name + ".keys")


def site_keys(keys_dir: Path) -> SiteKeys:
    keys_dir = Path(keys_dir)
    return SiteKeys(keys_dir / PRIVATE_KEY_NAME, keys_dir / PUBLIC_KEY_NAME)


def generate_site_keys(keys_dir: Path, *, overwrite: bool = False) -> SiteKeys:
    """Write a new EC P-384 key pair (private key mode 0600). Refuses to overwrite by default."""
    paths = site_keys(keys_dir)
    if not overwrite and (paths.private_key.exists() or paths.public_key.exists()):
        raise FileExistsError(
            f"{paths.private_key} already exists; the coordinator registered its public key. "
            "Pass --force to make a new pair (and send the new public key to the coordinator)."
        )
    Path(keys_dir).mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP384R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    fd = os.open(paths.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    paths.public_key.write_bytes(public + b"\n")
    return paths


@dataclass(frozen=True)
class JoinSpec:
    """Everything the SuperNode command of one site needs."""

    site_dir: Path
    superlink: str  #: host:port of the coordinator's Fleet API (or of its Fleet-only proxy)
    root_certificates: Path  #: the study CA certificate (ca.crt) from the coordinator
    private_key: Path
    runtime_port: int = DEFAULT_RUNTIME_PORT
    max_wait_time: float | None = None  #: give up reconnecting after this many seconds (None = never)


#: Flower's ``flower-supernode`` with sarcofed's repair of its push loop (``client.supernode``)
SUPERNODE_EXECUTABLE = "sarcofed-supernode"


def supernode_command(spec: JoinSpec, executable: str = SUPERNODE_EXECUTABLE) -> list[str]:
    """The SuperNode argv for one site (TLS on, node authentication on)."""
    site = Path(spec.site_dir).expanduser().resolve()
    if '"' in str(site) or "\\" in str(site):
        raise ValueError(f"{site}: the site folder path may not contain quotes or backslashes (TOML value)")
    cmd = [
        executable,
        "--superlink",
        spec.superlink,
        "--root-certificates",
        str(Path(spec.root_certificates).expanduser().resolve()),
        "--auth-supernode-private-key",
        str(Path(spec.private_key).expanduser().resolve()),
        "--node-config",
        f'site-dir="{site}"',
        "--host",
        "127.0.0.1",
        "--port",
        str(spec.runtime_port),
    ]
    if spec.max_wait_time is not None:
        cmd += ["--max-wait-time", str(spec.max_wait_time)]
    return cmd


def supernode_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    return env


def shell_line(cmd: list[str]) -> str:
    """The command as one line to paste in a shell (environment included)."""
    env = " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items())
    return f"{env} {shlex.join(cmd)}"
