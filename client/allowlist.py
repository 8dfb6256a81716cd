"""App allow-list: the site runs only the sarcofed code it reviewed.

Flower's ``--trusted-entities`` only accepts apps signed by the Flower hub, so a site pins
the code itself: ``allowed-apps`` in ``policy.toml`` lists sha256 digests of the sarcofed
source, and the guard refuses any instruction when the code actually loaded in the
ClientApp hashes to something else.

The hash covers exactly what the app bundle (FAB) ships (``fab-include`` in
pyproject.toml): every ``.py`` file under ``protocols/``, ``common/``, ``client/`` and
``server/`` except the demo generator ``common/demo/``, plus ``pyproject.toml``, in
sorted relative-path order, each as ``path NUL size NUL bytes``. ``flwr build`` rewrites
pyproject.toml (comments and layout dropped), so its parsed content (canonical JSON) is
hashed instead of its bytes.
A site computes the hash of the code it reviewed with
``sarcofed site policy hash /path/to/reviewed/sarcofed`` (a checkout or an unpacked FAB).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterable
from pathlib import Path

PACKAGES: tuple[str, ...] = ("protocols", "common", "client", "server")
#: Folders of those packages the app bundle leaves out (``fab-include`` in pyproject.toml).
NOT_SHIPPED: tuple[str, ...] = ("common/demo",)
PROJECT_FILE = "pyproject.toml"


def code_files(root: Path) -> list[Path]:
    """The files the hash covers, as paths relative to ``root``, sorted."""
    root = Path(root)
    found = [p.relative_to(root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py") if p.is_file()]
    files = [rel for rel in found if not any(rel.is_relative_to(folder) for folder in NOT_SHIPPED)]
    if (root / PROJECT_FILE).is_file():
        files.append(Path(PROJECT_FILE))
    return sorted(files, key=lambda p: p.as_posix())


def code_hash(root: Path) -> str:
    """sha256 of the sarcofed source under ``root`` (see the module docstring)."""
    root = Path(root)
    files = code_files(root)
    if not any(f.parts[0] == "client" for f in files):
        raise FileNotFoundError(f"{root} holds no sarcofed source (expected {', '.join(PACKAGES)} folders)")
    digest = hashlib.sha256()
    for rel in files:
        data = (root / rel).read_bytes()
        if rel.as_posix() == PROJECT_FILE:
            # `flwr build` rewrites pyproject.toml (tomli_w: comments and layout dropped), so
            # its *content* is hashed, not its bytes: a checkout and the installed FAB agree.
            data = json.dumps(tomllib.loads(data.decode("utf-8")), sort_keys=True).encode("utf-8")
        digest.update(rel.as_posix().encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0")
        digest.update(data)
    return digest.hexdigest()


def loaded_code_root() -> Path:
    """The folder the running sarcofed code was imported from (a checkout or an installed FAB)."""
    import protocols

    return Path(protocols.__file__).resolve().parent.parent


def current_app_hash() -> str:
    """sha256 over the sarcofed source actually loaded in this process."""
    return code_hash(loaded_code_root())


def app_refusal(app_hash: str, allowed: Iterable[str]) -> str | None:
    """Why ``app_hash`` is refused (``None`` = allowed). An empty allow-list pins nothing."""
    allowed = tuple(allowed)
    if not allowed or app_hash in allowed:
        return None
    return (
        f"app code hash {app_hash} is not on this site's allow-list "
        f"(allowed-apps in policy.toml: {', '.join(allowed)}); the site reviews the new code and "
        "adds its hash (`sarcofed site policy allow`) before it runs"
    )
