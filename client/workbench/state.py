"""What the workbench server holds: the folder it may read, loaded series, labelling sessions.

Every path that comes from the browser goes through :func:`resolve_inside`, which refuses
absolute paths, ``..`` and symbolic links that lead outside the folder the server was
started on. Series are then addressed only by their key from a scan, never by a path.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.l3_suggestion import L3Suggestion, suggest_l3
from common.series import CTVolume, SeriesInfo, SeriesListing, load_volume, scan_folder

log = logging.getLogger(__name__)


class OutsideFolderError(ValueError):
    """A requested path is not inside the folder the workbench was started on."""


def resolve_inside(root: Path, relative: str, *, what: str = "the workbench folder") -> Path:
    """``root / relative`` with symlinks resolved; raise if it is absolute or leaves ``root``.

    ``what`` names ``root`` in the error (the workbench folder, or the site folder it saves to).
    """
    text = (relative or "").strip().replace("\\", "/")
    if text in ("", "."):
        return Path(os.path.realpath(root))
    if os.path.isabs(text) or (len(text) > 1 and text[1] == ":"):
        raise OutsideFolderError(f"absolute path {text!r} refused: give a path relative to {what}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, text))
    if os.path.commonpath([real_root, real]) != real_root:
        raise OutsideFolderError(
            f"path {text!r} leaves {what} {real_root} ('..' or a symbolic link) and is refused"
        )
    return Path(real)


@dataclass
class SliceLabels:
    """One slice being labelled: where it comes from and its canonical mask (0-3)."""

    file: Path
    index: int  #: z index in the series (superior first)
    hu: np.ndarray
    spacing_mm: tuple[float, float]
    labels: np.ndarray  #: uint8 canonical classes, same shape as ``hu``


@dataclass
class Session:
    """A labelling session: the slices selected in one series and how they were pre-segmented."""

    id: str
    series: SeriesInfo
    method: str  #: "model" or "fallback"
    method_label: str
    slices: list[SliceLabels]
    height_m: float | None
    sex: str | None
    saved: list[str] = field(default_factory=list)


@dataclass
class WorkbenchState:
    """The server's state; one instance per running workbench."""

    root: Path
    site_dir: Path | None = None
    model_path: Path | None = None
    mask_format: str = "auto"
    max_volumes: int = 2
    _listings: dict[str, SeriesListing] = field(default_factory=dict)
    _volumes: OrderedDict[str, tuple[CTVolume, L3Suggestion]] = field(default_factory=OrderedDict)
    sessions: dict[str, Session] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.root = Path(os.path.realpath(self.root))

    def scan(self, relative: str = "") -> SeriesListing:
        folder = resolve_inside(self.root, relative)
        if not folder.is_dir():
            raise FileNotFoundError(f"{relative!r} is not a folder inside the workbench folder")
        with self.lock:
            listing = scan_folder(folder)
            self._listings[str(folder)] = listing
            return listing

    def series(self, key: str) -> SeriesInfo:
        with self.lock:
            for listing in self._listings.values():
                found = listing.get(key)
                if found is not None:
                    return found
        raise KeyError(f"unknown series {key!r}: list the folder's series first")

    def volume(self, key: str) -> tuple[CTVolume, L3Suggestion]:
        with self.lock:
            if key in self._volumes:
                self._volumes.move_to_end(key)
                return self._volumes[key]
            volume = load_volume(self.series(key))
            suggestion = suggest_l3(volume)
            self._volumes[key] = (volume, suggestion)
            while len(self._volumes) > self.max_volumes:
                self._volumes.popitem(last=False)
            return volume, suggestion

    def new_session(self, session: Session) -> Session:
        with self.lock:
            session.id = secrets.token_hex(8)
            self.sessions[session.id] = session
            return session

    def session(self, sid: str) -> Session:
        with self.lock:
            if sid not in self.sessions:
                raise KeyError(f"unknown labelling session {sid!r}: segment a selection first")
            return self.sessions[sid]

    def relative(self, path: Path) -> str:
        """A file's path relative to the workbench folder (for display and zip names)."""
        try:
            return Path(os.path.realpath(path)).relative_to(self.root).as_posix()
        except ValueError:
            return path.name
