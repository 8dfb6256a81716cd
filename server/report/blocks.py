"""The report's content as format-independent blocks: what ``document`` builds and ``render`` draws."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Table:
    frame: pd.DataFrame
    caption: str = ""
    index: bool = False
    #: Same shape as ``frame``: True cells are emphasised (systematic findings).
    highlight: pd.DataFrame | None = None
    #: The HTML id of the table's wrapper (``verdict``: the verdict table), for links and browser tests.
    id: str | None = None


@dataclass(frozen=True)
class Image:
    name: str
    png: bytes
    caption: str


Block = Heading | Text | Bullets | Table | Image
