"""Opening a file a site lists: regular files only, of a size one slice can have.

``manifest.csv`` may name anything: a FIFO or a link to ``/dev/zero`` (reading either never
ends), a 5,000-character path, a path holding a NUL byte, a folder, a 2 GB series. Every
reader of a listed file (``common.dicom_io.read_ct_slice``, ``common.masks.read_mask``, the
dataset fingerprint) first calls :func:`require_regular_file`, which turns each of these
into a :class:`SliceError` naming the file, so that row is excluded and the site goes on.

The limits are those of one 2-D slice, with room to spare: the largest clinical CT matrix
is 2048 x 2048 (8 MiB at 16 bits); :data:`MAX_FILE_BYTES` allows 8 times that, and
:data:`MAX_SLICE_PIXELS` (4096 x 4096) bounds any decoded array (rows x columns x frames),
so a compressed file cannot unpack into gigabytes either.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from common.errors import SliceError
from protocols.classes import ExclusionReason

#: Largest file accepted for one slice, image or mask (64 MiB).
MAX_FILE_BYTES = 64 * 2**20
#: Largest decoded array (rows x columns x frames) accepted for one slice or mask.
MAX_SLICE_PIXELS = 4096 * 4096

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _link_note(path: Path) -> str:
    try:
        target = os.path.realpath(path)
    except (OSError, ValueError):
        return ""
    return f" (it links to {target})" if target != os.path.abspath(path) else ""


def require_regular_file(path: Path, reason: ExclusionReason, what: str) -> int:
    """The size in bytes of ``path`` after following links, if it is a regular file sarcofed may read.

    Raises ``SliceError(missing_file)`` when it does not exist or cannot (a path too long for
    the file system, or holding a NUL byte), and ``SliceError(reason)`` when it is not a
    regular file, is empty, larger than :data:`MAX_FILE_BYTES`, or cannot be examined.
    ``what`` names the file's role in messages ("image", "mask").
    """
    try:
        info = os.stat(path)
    except ValueError:  # "embedded null byte": such a name cannot exist
        raise SliceError(
            ExclusionReason.missing_file,
            path,
            f"the {what} path in manifest.csv holds a NUL byte (\\x00); such a file cannot exist: "
            "retype the path",
        ) from None
    except (FileNotFoundError, NotADirectoryError):
        raise SliceError(
            ExclusionReason.missing_file,
            path,
            f"{what} file does not exist (check the path in manifest.csv)",
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise SliceError(
                ExclusionReason.missing_file,
                path,
                f"the {what} path is {len(str(path)):,} characters long, more than the file system "
                "allows; such a file cannot exist: check the path in manifest.csv",
            ) from None
        raise SliceError(
            reason, path, f"{what} file cannot be examined: {exc.strerror or exc} (errno {exc.errno})"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise SliceError(
            reason,
            path,
            f"{what} is {_kind(info.st_mode)}{_link_note(path)}, not a regular file; "
            "sarcofed reads regular files only",
        )
    if info.st_size == 0:
        raise SliceError(reason, path, f"{what} file is empty (0 bytes); was the export interrupted?")
    if info.st_size > MAX_FILE_BYTES:
        raise SliceError(
            reason,
            path,
            f"{what} file is {info.st_size:,} bytes, more than one slice can be "
            f"(at most {MAX_FILE_BYTES:,} = {MAX_FILE_BYTES // 2**20} MiB): is it a whole series or volume?",
        )
    return int(info.st_size)


def check_pixel_count(path: Path, shape: tuple[int, ...], reason: ExclusionReason, what: str) -> None:
    """Refuse a decoded ``shape`` holding more than :data:`MAX_SLICE_PIXELS` values (before decoding)."""
    count = 1
    for side in shape:
        count *= max(int(side), 0)
    if count > MAX_SLICE_PIXELS:
        shown = " x ".join(str(int(side)) for side in shape)
        raise SliceError(
            reason,
            path,
            f"{what} is {shown} = {count:,} values, more than one slice can hold "
            f"(at most {MAX_SLICE_PIXELS:,}): is it a whole series or volume?",
        )


__all__ = ["MAX_FILE_BYTES", "MAX_SLICE_PIXELS", "check_pixel_count", "require_regular_file"]
