"""The site-dataset contract: ``site.toml`` and the rows of ``manifest.csv``.

See ``shared/docs/PRODUCT.md`` ("The site dataset"). Parsing files lives in
``common.dataset``; these models only say what a valid site dataset is.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocols.keys import CONVENTION_ADJUSTMENTS

MANIFEST_REQUIRED: tuple[str, ...] = ("image", "label")
MANIFEST_OPTIONAL: tuple[str, ...] = ("reference", "group", "height_m", "sex")
#: Largest mask value a site may use (masks are at most 16-bit images).
MAX_LABEL_VALUE = 65535


class LabelMap(BaseModel):
    """Which integer values in this site's masks mean which canonical class.

    0 is always background and need not be listed. ``background`` lists values that are
    labelled but are not a study class (IMAT, for example).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    muscle: list[int] = Field(min_length=1)
    subcutaneous_fat: list[int] = Field(min_length=1)
    visceral_fat: list[int] = Field(min_length=1)
    background: list[int] = Field(default_factory=list)

    @field_validator("muscle", "subcutaneous_fat", "visceral_fat", "background")
    @classmethod
    def _non_negative(cls, values: list[int]) -> list[int]:
        bad = [v for v in values if v < 0 or v > MAX_LABEL_VALUE]
        if bad:
            raise ValueError(f"label values must be integers 0..{MAX_LABEL_VALUE}, got {bad}")
        return values

    @model_validator(mode="after")
    def _disjoint(self) -> LabelMap:
        seen: dict[int, str] = {}
        for name in ("muscle", "subcutaneous_fat", "visceral_fat", "background"):
            for value in getattr(self, name):
                if value in seen:
                    raise ValueError(f"value {value} is declared for both '{seen[value]}' and '{name}'")
                seen[value] = name
        for name in ("muscle", "subcutaneous_fat", "visceral_fat"):
            if 0 in getattr(self, name):
                raise ValueError(f"value 0 is always background; remove it from '{name}'")
        return self

    def lookup(self) -> dict[int, int]:
        """Site value -> canonical class value (0 background, 1-3 tissues)."""
        table = {0: 0}
        for value in self.background:
            table[value] = 0
        for canonical, name in enumerate(("muscle", "subcutaneous_fat", "visceral_fat"), 1):
            for value in getattr(self, name):
                table[value] = canonical
        return table


class SiteConfig(BaseModel):
    """``site.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=80)
    description: str | None = None
    labels: LabelMap
    #: hashes (or their first 12+ hex digits) of models this site's data helped train: such a
    #: model is scored here as internal, on the site's held-out test patients only.
    contributed_models: tuple[str, ...] = ()
    #: where manifest paths point (absolute, or relative to the site folder); default the site
    #: folder itself. ``sarcofed site init`` sets it to the export it read, so that nothing is
    #: copied: the files stay where they are, read only. Paths still may not leave it.
    data_root: str | None = Field(default=None, min_length=1)
    #: where decoded slices are cached between rounds and studies (``common.slice_cache``):
    #: not set (or ``true``), the site folder's ``.sarcofed-cache`` (``$SARCOFED_HOME/cache/...``
    #: when the site folder is not writable); a folder (absolute, or relative to the site
    #: folder); ``false`` or ``""`` to decode every slice every time.
    cache_dir: str | bool | None = None
    #: the most the slice cache may hold, in MiB; past it the least recently used entries
    #: are deleted (an upgrade of sarcofed or a library makes every old entry unusable, so
    #: without a cap they would pile up). The default holds ~20,000 512-px slices.
    cache_max_mb: int = Field(default=10_240, ge=1)
    #: labelling conventions this site knows it follows (``protocols.keys.CONVENTION_ADJUSTMENTS``:
    #: e.g. ``["psoas"]`` for a site that leaves psoas out). Convention-aware training applies
    #: a declared one when the site's own label audit confirms it, even where the audit alone
    #: would not call it systematic (few slices); one the audit contradicts is not applied.
    label_conventions: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        # The name is sent to the coordinator and printed on terminals and in reports:
        # newlines, tabs and escape codes would forge lines or recolour a screen.
        if not value.isprintable() or value != value.strip():
            raise ValueError(
                f"name must be one line of printable text without leading or trailing spaces "
                f"(no newline, tab or terminal control code), got {value!r}"
            )
        return value

    @field_validator("contributed_models")
    @classmethod
    def _hash_prefixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [v for v in value if len(v) < 12 or any(c not in "0123456789abcdef" for c in v.lower())]
        if bad:
            raise ValueError(
                f"contributed_models holds {bad}; give each model's weights hash (at least its first 12 "
                "hex digits, as `sarcofed site evaluate` and the study report print it)"
            )
        return tuple(v.lower() for v in value)

    @field_validator("label_conventions")
    @classmethod
    def _known_conventions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in CONVENTION_ADJUSTMENTS]
        if unknown:
            raise ValueError(
                f"label_conventions holds {unknown}; each must be one of {list(CONVENTION_ADJUSTMENTS)} "
                "(psoas: psoas left out or added; paraspinal: likewise; boundary: contours drawn inside "
                "the tissue edge; hu_range: tissue outside the protocol's HU ranges labelled, e.g. IMAT "
                "in muscle; imat_holes: intramuscular fat left out where the protocol counts it)"
            )
        return tuple(dict.fromkeys(value))

    def contributed_to(self, model_hash: str | None) -> bool:
        """Whether this site declares that its data trained the model with ``model_hash``."""
        return model_hash is not None and any(
            model_hash.lower().startswith(p) for p in self.contributed_models
        )


class ManifestRow(BaseModel):
    """One row of ``manifest.csv``: a labelled axial slice."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    image: str = Field(min_length=1)
    label: str = Field(min_length=1)
    reference: str | None = None
    group: str | None = None
    height_m: float | None = Field(default=None, gt=0.5, lt=2.8)
    sex: Literal["M", "F"] | None = None

    @field_validator("reference", "group", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("height_m", mode="before")
    @classmethod
    def _blank_height(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("sex", mode="before")
    @classmethod
    def _sex(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str):
            v = value.strip().upper()
            return {"MALE": "M", "FEMALE": "F"}.get(v, v)
        return value
