"""What a failure or refusal reason may say when it leaves the site: no path, no manifest string.

A reason is built from an exception (``SiteFolderError``, ``OSError``, a library's crash),
and exceptions name files. Before a reason goes back to the coordinator,
``client.guard`` passes it through :func:`redact`; ``client.app`` passes the few errors
raised before the guard exists (study config, no site folder) through
:func:`machine_paths`. The full text stays in the site's own log.

:func:`redact`, in order: the site folder in every form it may take (as given, ``~``
expanded, absolute, resolved through symlinks, and as ``repr()`` escapes each) becomes
``<site>``; a file name or patient key of manifest.csv becomes ``<file>``;
``$SARCOFED_HOME`` and the home folder become their names; any other absolute path of two
or more parts becomes ``<path>``; the folder holding the site becomes ``<parent>``. So
``/data/hospital-b/ct/P-0042.dcm: unreadable`` leaves as ``<site>/<file>: unreadable``: it
still says which file of the site is wrong, and the site's log names it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path

from common.paths import HOME_ENV, sarcofed_home

SITE = "<site>"
FILE = "<file>"
PATH = "<path>"
PARENT = "<parent>"

_PART = r"[^\s'\"<>|:;,()\[\]{}\\/]"
#: An absolute path of at least two parts (``/a/b``, ``C:\a\b``), not inside a URL, a
#: fraction (``mm/px``) or a path already redacted (``<site>/ct``, ``~/x``).
_ABSOLUTE = re.compile(rf"(?<![\w.:~>\\/-])(?:[A-Za-z]:)?[\\/](?:{_PART}+[\\/])+{_PART}*")


def path_forms(path: Path | str) -> set[str]:
    """The strings under which ``path`` may appear in a message (none shorter than 2 characters)."""
    given = Path(path)
    expanded = given.expanduser()
    forms = {str(given), str(expanded), os.path.abspath(expanded)}
    try:
        forms.add(str(expanded.resolve()))
    except (OSError, RuntimeError):  # a symlink loop: the other forms still apply
        pass
    forms |= {repr(form)[1:-1] for form in forms}  # as an OSError message writes it: escaped
    return {form for form in forms if len(form) > 1}


def _replace(text: str, forms: Iterable[str], label: str, *, whole: bool = False) -> str:
    """``forms`` in ``text`` (longest first, any case) replaced by ``label``.

    ``whole``: only where the form is whole path parts: it neither ends nor starts inside a
    word (``/home/ann`` but not ``/home/anna``; a relative parent ``data`` but not ``metadata``).
    """
    ordered = sorted({f for f in forms if f}, key=len, reverse=True)
    if not ordered:
        return text
    pattern = "|".join(re.escape(form) for form in ordered)
    if whole:
        pattern = f"(?<![\\w-])(?:{pattern})(?![\\w-])"
    return re.sub(pattern, lambda _: label, text, flags=re.IGNORECASE)


def machine_paths(text: str) -> str:
    """``text`` with ``$SARCOFED_HOME`` (when set) and the home folder written as such and as ``~``."""
    out = text
    if os.environ.get(HOME_ENV):
        out = _replace(out, path_forms(sarcofed_home()), f"${HOME_ENV}", whole=True)
    return _replace(out, path_forms(Path.home()), "~", whole=True)


def redact(text: str, site_dir: Path | str | None, strings: Collection[str] = ()) -> str:
    """``text`` as it may leave the site (see the module's docstring for what is replaced, in order).

    ``site_dir`` is the site folder (``None`` before one is known); ``strings`` are the
    manifest's file names and group keys (``client.guard.never_leave``).
    """
    out = text
    if site_dir is not None:
        out = _replace(out, path_forms(site_dir), SITE)
    out = _replace(out, {form for value in strings for form in (value, repr(value)[1:-1])}, FILE)
    out = machine_paths(out)
    out = _ABSOLUTE.sub(PATH, out)
    if site_dir is not None:
        parents = path_forms(Path(site_dir).expanduser().parent) | path_forms(
            Path(site_dir).expanduser().resolve().parent
        )
        out = _replace(out, {p for p in parents if p.strip("/\\") and p != "."}, PARENT, whole=True)
    return out
