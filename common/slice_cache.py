"""The site's on-disk cache of decoded slices, keyed by file content, never sent anywhere.

Each Flower message starts a fresh ClientApp process, so without a cache every round
re-reads and re-decodes every DICOM file and mask. ``common.dataset.load_slice`` asks a
:class:`SliceCache` (``SiteDataset.cache``, built by ``load_site`` from site.toml's
``cache_dir``) for a slice's decoded arrays before decoding it, and stores them after.

- **Key**: sha256 of the bytes of every file that makes the entry (image, label mask; or
  image and reference mask), the site's ``[labels]`` map, and :func:`decoder_version`
  (the format version, the source of the decoding modules and the versions of the
  libraries they call). A file whose bytes change is re-read, whatever its name, size or
  modification time; paths never enter the key, and no path is stored in an entry.
- **Entry**: one ``.npz`` (``np.savez``, no pickle; read with ``allow_pickle=False``)
  under ``<folder>/<key[:2]>/<key>.npz``; each array in the smallest integer type that
  holds it exactly (:func:`compact`), read back in its own type. Written to a temporary
  file in the same folder, then ``os.replace``d: two ClientApps writing the same entry
  each leave a whole file.
  An entry that cannot be read (truncated, corrupt, another key) is a miss, logged, and
  rewritten; the cache never turns a usable slice into an error.
- **Where**: :func:`cache_folders` (``<site>/.sarcofed-cache``, else
  ``$SARCOFED_HOME/cache/<hash of the site path>`` when the site folder is not writable;
  site.toml ``cache_dir`` moves it or, ``false`` / ``""``, turns it off). The entries hold
  the site's pixel data: they stay on the site's machine like the data itself, and no
  reply reads from them (replies are built from the decoded slices, as without a cache).
- **Size**: at most ``max_bytes`` (site.toml ``cache_max_mb``). A hit marks its entry used
  (its modification time); after writing, once at first and then every twentieth of the cap,
  :func:`prune_cache` deletes the least recently used entries until the cache fits. Entries
  of an older decoder are never hit again, so they are the first to go.
- Only decodable slices are cached; a file that cannot be used is decoded (and refused
  with its reason) every time. Warnings the decoders log are logged on a miss only.

Pure: never imports flwr. Called by ``common.dataset``; ``sarcofed site cache`` empties it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.paths import sarcofed_home
from common.site_file import MAX_FILE_BYTES
from protocols.site import SiteConfig

log = logging.getLogger(__name__)

#: Bump when the layout of an entry changes (array names, dtypes).
CACHE_FORMAT_VERSION = 1
#: The cache folder's name inside a site folder (hidden: folder scans skip it).
CACHE_DIR_NAME = ".sarcofed-cache"
#: site.toml ``cache_dir`` strings that turn the cache off (case-insensitive), besides ``false``.
DISABLED_WORDS: frozenset[str] = frozenset({"", "false", "off", "no", "none"})
#: site.toml ``cache_dir`` strings that mean the default place, besides ``true``.
DEFAULT_WORDS: frozenset[str] = frozenset({"true", "on", "yes", "default"})
#: Source files whose code decides what a slice decodes to (relative to the repository root).
DECODER_SOURCES: tuple[str, ...] = (
    "common/dicom_io.py",
    "common/masks.py",
    "common/tagfile.py",
    "common/site_file.py",
    "common/dataset.py",
    "common/slice_cache.py",
)
#: Libraries whose version can change a decoded array.
DECODER_LIBRARIES: tuple[str, ...] = (
    "numpy",
    "pydicom",
    "nibabel",
    "pillow",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pyjpegls",
    "highdicom",
)
_README = (
    "Decoded CT slices and masks cached by sarcofed between rounds and studies.\n"
    "They hold this site's pixel data: keep them where the data is; they are never sent.\n"
    "Safe to delete at any time (`sarcofed site cache SITE_DIR --clear`); entries are\n"
    "keyed by file content, so a changed file is always re-read.\n"
)
_CODE_ROOT = Path(__file__).resolve().parent.parent


def _library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def decoder_version() -> str:
    """A digest of what decides a decoded slice: format version, decoder source, library versions.

    Any edit to the decoding modules (:data:`DECODER_SOURCES`) or an upgrade of a library in
    :data:`DECODER_LIBRARIES` gives new keys, so no entry decoded by other code is ever used.
    """
    digest = hashlib.sha256(f"format {CACHE_FORMAT_VERSION}\n".encode())
    for relative in DECODER_SOURCES:
        path = _CODE_ROOT / relative
        digest.update(relative.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"absent")
    for name in DECODER_LIBRARIES:
        digest.update(f"{name}={_library_version(name)}\n".encode())
    return digest.hexdigest()


def content_digest(path: Path) -> str | None:
    """sha256 of a regular file's bytes; ``None`` when it is not one sarcofed would read.

    ``None`` (missing, a FIFO or device, larger than ``MAX_FILE_BYTES``, unreadable) makes
    the caller decode without the cache, so the decoder refuses the file with its reason.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES:
            return None
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except (OSError, ValueError):
        return None


def entry_key(kind: str, digests: Sequence[str], labels: Mapping[int, int], decoder: str) -> str:
    """The key of one entry: ``kind`` ("slice", "reference"), file digests, label map, decoder."""
    text = json.dumps(
        {"kind": kind, "files": list(digests), "labels": sorted(labels.items()), "decoder": decoder},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def site_fallback_folder(site_root: Path) -> Path:
    """``$SARCOFED_HOME/cache/<first 16 hex of sha256(absolute site path)>``."""
    tag = hashlib.sha256(str(Path(site_root).resolve()).encode()).hexdigest()[:16]
    return sarcofed_home() / "cache" / tag


def cache_disabled(setting: str | bool | None) -> bool:
    """Whether site.toml's ``cache_dir`` value turns the cache off (``false``, ``""``, "off" ...)."""
    if isinstance(setting, bool):
        return not setting
    return setting is not None and setting.strip().lower() in DISABLED_WORDS


def cache_folders(site_root: Path, setting: str | bool | None) -> tuple[Path, ...]:
    """The folders to try, in order, for site.toml's ``cache_dir`` value; ``()`` when disabled.

    Not set (or ``true``): the site folder's ``.sarcofed-cache``, then the ``$SARCOFED_HOME``
    fallback. A path (absolute, or relative to the site folder): that folder only, so a
    folder the site chose is never silently replaced by another.
    """
    if cache_disabled(setting):
        return ()
    if setting is None or isinstance(setting, bool) or setting.strip().lower() in DEFAULT_WORDS:
        return (Path(site_root) / CACHE_DIR_NAME, site_fallback_folder(site_root))
    return (Path(site_root) / Path(setting.strip()).expanduser(),)


def _usable(folder: Path) -> bool:
    """Create ``folder`` if needed and check a file can be written there (one probe file)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-", suffix=".tmp"):
            pass
        readme = folder / "README.txt"
        if not readme.exists():
            _write_atomic(readme, _README.encode())
        return True
    except OSError as exc:
        log.info("slice cache: %s is not writable (%s)", folder, exc)
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: The arrays of one entry, by name (what ``np.savez`` stores).
Arrays = dict[str, np.ndarray]
_SMALL_INTS = (np.uint8, np.int8, np.uint16, np.int16)


def compact(array: np.ndarray) -> np.ndarray:
    """``array`` in the smallest integer type that gives back exactly its bytes, else itself.

    HU of a slice with an integer RescaleIntercept and slope 1 are whole numbers (int16 on
    disk, half of float32); masks fit uint8. The check is on the bytes, so -0.0, NaN and
    fractions keep the original type: the arrays read back are bit for bit those stored.
    """
    if array.dtype.kind not in "iuf" or array.size == 0:
        return array
    low, high = array.min(), array.max()
    for dtype in _SMALL_INTS:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            if array.dtype.itemsize <= np.dtype(dtype).itemsize:
                return array
            stored = array.astype(dtype)
            return stored if stored.astype(array.dtype).tobytes() == array.tobytes() else array
    return array


#: The cap of a site.toml without ``cache_max_mb`` (its default there), in bytes.
DEFAULT_MAX_BYTES: int = SiteConfig.model_fields["cache_max_mb"].default * 2**20
#: Prune after writing this share of the cap since the last prune (and at the first write).
PRUNE_EVERY = 0.05


@dataclass
class SliceCache:
    """A content-keyed store of decoded slices in the first writable folder of ``candidates``.

    The folder is chosen on first use (nothing is created until a slice is loaded).
    ``hits``, ``misses`` and ``corrupt`` (unreadable entries, decoded again and rewritten)
    count this process's lookups, and ``evicted`` the entries its prunes deleted, for
    benches and tests. ``max_bytes``: the most the folder's entries may hold.
    """

    candidates: tuple[Path, ...]
    max_bytes: int = DEFAULT_MAX_BYTES
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evicted: int = 0
    _unpruned: int | None = field(default=None, repr=False)  # bytes written since the last prune
    _folder: Path | None = field(default=None, repr=False)
    _resolved: bool = field(default=False, repr=False)
    _decoder: str | None = field(default=None, repr=False)

    @property
    def folder(self) -> Path | None:
        """The folder in use, or ``None`` when no candidate is writable (then nothing is cached)."""
        if not self._resolved:
            self._resolved = True
            self._folder = next((c for c in self.candidates if _usable(c)), None)
            if self._folder is None:
                log.warning(
                    "slice cache: none of %s is writable; slices are decoded every round",
                    ", ".join(str(c) for c in self.candidates),
                )
            elif self._folder != self.candidates[0]:
                log.info("slice cache: using %s (%s is not writable)", self._folder, self.candidates[0])
        return self._folder

    @property
    def decoder(self) -> str:
        if self._decoder is None:
            self._decoder = decoder_version()
        return self._decoder

    def key(self, kind: str, files: Sequence[Path], labels: Mapping[int, int]) -> str | None:
        """The entry key for these files, or ``None`` when one of them cannot be hashed."""
        digests = [content_digest(path) for path in files]
        if any(d is None for d in digests):
            return None
        return entry_key(kind, [d for d in digests if d is not None], labels, self.decoder)

    def _path(self, folder: Path, key: str) -> Path:
        return folder / key[:2] / f"{key}.npz"

    def get(self, key: str) -> Arrays | None:
        """The entry's arrays, or ``None`` on a miss (absent, unreadable or not this key's)."""
        folder = self.folder
        if folder is None:
            return None
        path = self._path(folder, key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            if str(arrays.pop("_key", "")) != key:
                raise ValueError("entry holds another key")
            dtypes: dict[str, str] = json.loads(str(arrays.pop("_dtypes")))
            arrays = {name: a.astype(np.dtype(dtypes[name]), copy=False) for name, a in arrays.items()}
        except Exception as exc:  # zip, npy and OS errors come in many types: all mean "decode again"
            log.warning("slice cache: entry %s cannot be read (%s); decoding again", path.name, exc)
            self.misses += 1
            self.corrupt += 1
            return None
        self.hits += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the last to be pruned
        return arrays

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Store an entry atomically; a failure to write is logged, never raised."""
        folder = self.folder
        if folder is None:
            return
        path = self._path(folder, key)
        tmp: str | None = None
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
            with os.fdopen(fd, "wb") as handle:
                dtypes = json.dumps({name: a.dtype.str for name, a in arrays.items()})
                payload: dict[str, Any] = {"_key": np.array(key), "_dtypes": np.array(dtypes)}
                payload |= {name: compact(a) for name, a in arrays.items()}
                np.savez(handle, allow_pickle=False, **payload)  # an object array is refused
            os.replace(tmp, path)
            tmp = None
            self._after_write(folder, path.stat().st_size)
        except (OSError, ValueError) as exc:
            log.warning("slice cache: cannot write %s (%s); continuing without it", path, exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _after_write(self, folder: Path, size: int) -> None:
        """Prune at the first write of this process, then every ``PRUNE_EVERY`` of the cap."""
        if self._unpruned is not None:
            self._unpruned += size
            if self._unpruned < self.max_bytes * PRUNE_EVERY:
                return
        removed = prune_cache(folder, self.max_bytes)
        self.evicted += removed.entries
        self._unpruned = 0


def open_site_cache(
    site_root: Path, setting: str | bool | None, max_bytes: int = DEFAULT_MAX_BYTES
) -> SliceCache | None:
    """The cache for a site folder and its site.toml ``cache_dir`` value; ``None`` when disabled."""
    candidates = cache_folders(site_root, setting)
    return SliceCache(candidates, max_bytes=max_bytes) if candidates else None


@dataclass(frozen=True)
class CacheUsage:
    """What a cache folder holds: entries, their bytes, and leftover temporary files."""

    folder: Path
    entries: int
    bytes: int
    temporary: int


def cache_usage(folder: Path) -> CacheUsage:
    """Count the entries (``*.npz``) and their size under ``folder`` (zero when it is absent)."""
    entries = size = temporary = 0
    if folder.is_dir():
        for path in folder.glob("*/*"):
            if path.suffix == ".npz" and path.is_file():
                entries += 1
                size += path.stat().st_size
            elif path.name.startswith(".tmp-"):
                temporary += 1
    return CacheUsage(folder=folder, entries=entries, bytes=size, temporary=temporary)


def _entries(folder: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, path) of every entry under ``folder``; entries gone meanwhile are skipped."""
    found = []
    for path in folder.glob("*/*.npz"):
        with contextlib.suppress(OSError):
            info = path.stat()
            found.append((info.st_mtime, info.st_size, path))
    return found


def prune_cache(folder: Path, max_bytes: int) -> CacheUsage:
    """Delete the least recently used entries under ``folder`` until the rest hold at most
    ``max_bytes``; return what was removed (nothing when the cache already fits)."""
    entries = sorted(_entries(folder)) if folder.is_dir() else []
    total = sum(size for _, size, _ in entries)
    removed = freed = 0
    for _, size, path in entries:
        if total - freed <= max_bytes:
            break
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
            freed += size
    if removed:
        log.info(
            "slice cache: %s held %.1f MiB, over its %.1f MiB cap; removed the %d least recently used",
            folder,
            total / 2**20,
            max_bytes / 2**20,
            removed,
        )
    return CacheUsage(folder=folder, entries=removed, bytes=freed, temporary=0)


def clear_cache(folder: Path) -> CacheUsage:
    """Delete every entry and leftover temporary file under ``folder``; return what was removed.

    Only the cache's own files (``<2 hex>/*.npz`` and ``.tmp-*``) are removed, so a
    ``cache_dir`` pointed at a folder holding other files never loses them.
    """
    removed = cache_usage(folder)
    if folder.is_dir():
        for sub in folder.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2 and all(c in "0123456789abcdef" for c in sub.name)):
                continue
            for path in sub.iterdir():
                if (path.suffix == ".npz" or path.name.startswith(".tmp-")) and path.is_file():
                    path.unlink(missing_ok=True)
            try:
                sub.rmdir()
            except OSError:
                pass  # another process is writing into it
    return removed


__all__ = [
    "CACHE_DIR_NAME",
    "CACHE_FORMAT_VERSION",
    "DEFAULT_MAX_BYTES",
    "Arrays",
    "CacheUsage",
    "SliceCache",
    "cache_disabled",
    "cache_folders",
    "cache_usage",
    "clear_cache",
    "compact",
    "content_digest",
    "decoder_version",
    "entry_key",
    "open_site_cache",
    "prune_cache",
    "site_fallback_folder",
]
