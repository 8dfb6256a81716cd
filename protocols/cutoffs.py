"""Names of the SMI cut-off sets for sarcopenia; the thresholds live in ``common.cutoffs``.

One owner for the names: the study config (``study.cutoff-set``), the site commands
(``--cutoff-set``) and ``common.cutoffs`` all take this enum. Names are matched without regard
to case or surrounding spaces (``Korean`` is ``korean``); an unknown name fails with the list.
"""

from __future__ import annotations

from enum import StrEnum


class CutoffSet(StrEnum):
    """Names of the available cut-off sets (lower case; parsing ignores case)."""

    prado2008 = "prado2008"
    martin2013 = "martin2013"
    korean = "korean"

    @classmethod
    def _missing_(cls, value: object) -> CutoffSet | None:
        if isinstance(value, str):
            wanted = value.strip().lower()
            for member in cls:
                if member.value == wanted:
                    return member
        return None

    @classmethod
    def choices(cls) -> str:
        """The valid names, for an error message: ``prado2008, martin2013, korean``."""
        return ", ".join(member.value for member in cls)
