"""Synthetic demo hospitals: site folders in the site-dataset format, from the L3 phantom.

Each site folder (PRODUCT.md, "The site dataset") holds real single-frame CT DICOM files of
distinct synthetic patients, their masks in the site's own format and values, a
``site.toml`` whose description says in plain words which scanner and label convention the
site uses, and a ``manifest.csv`` whose ``reference`` column points at a second mask of
each slice drawn under the Alberta reference convention (so ``site compare`` can be shown
without a model).

Sites differ the way hospitals do: field of view (pixel spacing), noise, reconstruction
blur, pixel storage (signed / unsigned, rescale intercept), mask format and values, and
label convention (:data:`SITE_PROFILES`). Patients depend only on ``seed``, never on the
profile, so two profiles built with one seed show the same patients.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.uid import RLELossless, generate_uid

from common.demo.anatomy import PatientAnatomy, make_patient, next_level
from common.demo.labels import REFERENCE, LabelConvention, canonical_labels, imat_mask
from common.demo.phantom import apply_scanner, render_l3
from common.dicom_io import PatientInfo, write_ct_slice
from common.masks import write_mask
from protocols.classes import Tissue
from protocols.site import LabelMap

log = logging.getLogger(__name__)

#: Largest field of view a scanner reconstructs (mm); big patients get up to this.
MAX_FOV_MM = 500.0
#: Share of patients who contribute a second slice (sharing a ``group``).
TWO_SLICE_SHARE = 0.3

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LabelValues:
    """Which integer values a site writes in its masks."""

    muscle: int
    subcutaneous_fat: int
    visceral_fat: int
    imat: int | None = None  # written where the reader marks intramuscular fat

    def encode(self, canonical: np.ndarray, imat: np.ndarray | None) -> np.ndarray:
        """Canonical classes (0-3) -> this site's values (uint16), IMAT where given."""
        lut = np.array([0, self.muscle, self.subcutaneous_fat, self.visceral_fat], dtype=np.uint16)
        out = lut[canonical]
        if self.imat is not None and imat is not None:
            out[imat & (canonical == Tissue.background)] = self.imat
        return out

    def label_map(self) -> LabelMap:
        """The ``[labels]`` table these values need (what :meth:`toml` writes)."""
        return LabelMap(
            muscle=[self.muscle],
            subcutaneous_fat=[self.subcutaneous_fat],
            visceral_fat=[self.visceral_fat],
            background=[self.imat] if self.imat is not None else [],
        )

    def toml(self) -> str:
        lines = [
            "[labels]",
            f"muscle = [{self.muscle}]",
            f"subcutaneous_fat = [{self.subcutaneous_fat}]",
            f"visceral_fat = [{self.visceral_fat}]",
        ]
        if self.imat is not None:
            lines.append(f"background = [{self.imat}]  # intramuscular fat (IMAT), not a study class")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ScannerProfile:
    """How a site's scanner and PACS make and store its images."""

    fov_mm: tuple[float, float]  # field of view range (pixel spacing = fov / size)
    noise_sd: float  # HU
    blur_mm: float  # reconstruction kernel sharpness (Gaussian sigma)
    signed: bool = True
    intercept: float = -1024.0
    slope: float = 1.0
    transfer_syntax: str | None = None
    summary: str = ""

    def describe(self) -> str:
        storage = "signed" if self.signed else "unsigned"
        syntax = ", RLE-compressed" if self.transfer_syntax == RLELossless else ""
        return (
            f"{self.summary} (field of view {self.fov_mm[0]:g}-{self.fov_mm[1]:g} mm, noise about "
            f"{self.noise_sd:g} HU, {storage} pixels with rescale intercept {self.intercept:g}{syntax})"
        )


@dataclass(frozen=True)
class SiteProfile:
    """One kind of demo hospital: its convention, mask format and values, and scanner."""

    key: str  # what the convention is, in a few words
    name: str  # the site's pseudonym in site.toml
    convention: LabelConvention
    values: LabelValues
    mask_suffix: str
    scanner: ScannerProfile
    manifest_demographics: float = 0.75  # share of rows giving height_m and sex in manifest.csv

    def describe(self) -> str:
        return (
            f"Synthetic demo hospital ({self.key}). Scanner: {self.scanner.describe()}. "
            f"Labels: {self.convention.describe()}; {self.mask_suffix} masks."
        )

    @property
    def follows_reference(self) -> bool:
        """Whether the site labels by the reference (Alberta) convention, whatever it calls it."""
        return replace(self.convention, name=REFERENCE.name) == REFERENCE


SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        key="reference-like",
        name="demo-hospital-a",
        convention=replace(REFERENCE, name="reference-like"),
        values=LabelValues(muscle=1, subcutaneous_fat=7, visceral_fat=5, imat=2),  # Slice-O-Matic
        mask_suffix=".tag",
        scanner=ScannerProfile((360, 400), 10, 0.5, signed=False, intercept=-1024, summary="sharp kernel"),
    ),
    SiteProfile(
        key="psoas left out",
        name="demo-hospital-b",
        convention=LabelConvention(name="psoas left out", include_psoas=False),
        values=LabelValues(1, 2, 3),
        mask_suffix=".png",
        scanner=ScannerProfile((380, 440), 16, 0.9, signed=True, intercept=-1024, summary="standard kernel"),
    ),
    SiteProfile(
        key="IMAT included in muscle",
        name="demo-hospital-c",
        convention=LabelConvention(name="IMAT included in muscle", imat_as_muscle=True, muscle_hu_range=None),
        values=LabelValues(10, 20, 30),
        mask_suffix=".nii.gz",
        scanner=ScannerProfile((340, 380), 8, 1.2, signed=True, intercept=0, summary="soft kernel"),
    ),
    SiteProfile(
        key="paraspinals left out",
        name="demo-hospital-d",
        convention=LabelConvention(name="paraspinals left out", include_paraspinal=False),
        values=LabelValues(1, 2, 3, imat=4),
        mask_suffix=".npy",
        scanner=ScannerProfile(
            (400, 460),
            20,
            0.6,
            signed=False,
            intercept=-1024,
            transfer_syntax=RLELossless,
            summary="low dose",
        ),
    ),
    SiteProfile(
        key="contours drawn 2 px tight",
        name="demo-hospital-e",
        convention=LabelConvention(name="contours drawn 2 px tight", contour_erosion_px=2),
        values=LabelValues(1, 2, 3),
        mask_suffix=".dcm",
        scanner=ScannerProfile((360, 420), 12, 0.8, signed=True, intercept=-1024, summary="standard kernel"),
    ),
    SiteProfile(
        key="VAT range -190..-30",
        name="demo-hospital-f",
        convention=LabelConvention(name="VAT range -190..-30", vat_hu_range=(-190.0, -30.0)),
        values=LabelValues(3, 1, 2),
        mask_suffix=".nii",
        scanner=ScannerProfile(
            (350, 420), 14, 0.7, signed=True, intercept=0, summary="iterative reconstruction"
        ),
        manifest_demographics=0.4,
    ),
    SiteProfile(
        key="reference-like, noisy scanner",
        name="demo-hospital-g",
        convention=replace(REFERENCE, name="reference-like, noisy scanner"),
        values=LabelValues(1, 2, 3),
        mask_suffix=".png",
        scanner=ScannerProfile(
            (420, 460), 25, 0.5, signed=False, intercept=-1024, summary="old low-dose scanner"
        ),
    ),
)

#: Profiles used by ``make_demo(sites=3)``: they must show a convention difference.
DEFAULT_ORDER: tuple[int, ...] = tuple(range(len(SITE_PROFILES)))


#: The demo study's hospitals (``sarcofed study demo``, ``flwr run .``), partition by partition,
#: like the seed's study: the first two label by the study protocol and train the model; the
#: others keep their own conventions and are validated as external sites, the psoas-excluding
#: hospital first (the seed's other hospital). ``protocols.study.DEMO_STUDY`` names the others in
#: ``study.exclude-from-training`` (tests/test_demo_study.py checks the two agree).
STUDY_ORDER: tuple[int, ...] = (0, 6, 1, 2, 3, 4, 5)


def _profile(order: tuple[int, ...], index: int) -> SiteProfile:
    profile = SITE_PROFILES[order[index % len(order)]]
    cycle = index // len(order)
    return profile if cycle == 0 else replace(profile, name=f"{profile.name}-{cycle + 1}")


def site_profile(index: int) -> SiteProfile:
    """Profile of demo site ``index``; beyond the registry the profiles repeat (with new seeds)."""
    return _profile(DEFAULT_ORDER, index)


def study_site_profile(partition: int) -> SiteProfile:
    """Profile of the demo study's hospital ``partition`` (:data:`STUDY_ORDER`; repeats beyond it)."""
    return _profile(STUDY_ORDER, partition)


@dataclass(frozen=True)
class _Row:
    image: str
    label: str
    reference: str
    group: str
    height_m: str
    sex: str


def _uid(*parts: object) -> str:
    """A deterministic UID (the parts, canary included, only enter its hash)."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _patients(rng: np.random.Generator, slices: int) -> list[tuple[int, int, PatientAnatomy]]:
    """(patient number, slice number, anatomy) for ``slices`` slices; some patients give two."""
    out: list[tuple[int, int, PatientAnatomy]] = []
    patient = 0
    while len(out) < slices:
        patient += 1
        anatomy = make_patient(rng)
        out.append((patient, 1, anatomy))
        if len(out) < slices and rng.random() < TWO_SLICE_SHARE:
            out.append((patient, 2, next_level(anatomy, rng)))
    return out


def _fov(profile: SiteProfile, anatomy: PatientAnatomy, rng: np.random.Generator) -> float:
    lo, hi = profile.scanner.fov_mm
    need = 2.0 * max(anatomy.extent_mm) + 30.0  # technologists widen the FOV for big patients
    return float(min(max(rng.uniform(lo, hi), need), MAX_FOV_MM))


def _stored_hu(hu: np.ndarray, scanner: ScannerProfile) -> np.ndarray:
    """HU exactly as the DICOM file will give them back (integer storage, clipping)."""
    limits = (-32768, 32767) if scanner.signed else (0, 65535)
    stored = np.clip(np.rint((hu - scanner.intercept) / scanner.slope), *limits)
    return (stored * scanner.slope + scanner.intercept).astype(np.float32)


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


@dataclass(frozen=True, eq=False)
class DemoSlice:
    """One demo slice as a site would hold it, plus the truth it was made from."""

    patient: int  # 1-based within the site
    level: int  # 1 for the first slice of a patient, 2 for a second one
    anatomy: PatientAnatomy
    spacing_mm: float
    structures: np.ndarray  # phantom structure map
    hu: np.ndarray  # float32, exactly as the DICOM file gives it back
    label: np.ndarray  # canonical 0-3 under the site's convention
    reference: np.ndarray  # canonical 0-3 under the reference convention
    site_mask: np.ndarray  # the site's values (IMAT value included when the site has one)
    reference_mask: np.ndarray


def demo_slices(
    profile: SiteProfile, *, slices: int = 12, size: int = 256, seed: int = 0
) -> Iterator[DemoSlice]:
    """The slices of one demo site, rendered and labelled but not written.

    Patients depend only on ``seed`` (same seed, other profile: same patients); field of
    view and scanner noise on ``seed`` and the profile.
    """
    if slices < 1 or size < 32:
        raise ValueError(f"a demo site needs slices >= 1 and size >= 32, got slices={slices}, size={size}")
    patient_rng = np.random.default_rng([seed, 0])
    scanner_rng = np.random.default_rng([seed, 1, *profile.key.encode()])
    scanner = profile.scanner
    for patient, level, anatomy in _patients(patient_rng, slices):
        phantom = render_l3(anatomy, size, _fov(profile, anatomy, scanner_rng))
        hu = apply_scanner(phantom.hu, scanner_rng, scanner.noise_sd, scanner.blur_mm / phantom.spacing_mm)
        hu = _stored_hu(hu, scanner)
        label = canonical_labels(phantom.structures, profile.convention, hu)
        reference = canonical_labels(phantom.structures, REFERENCE, hu)
        yield DemoSlice(
            patient=patient,
            level=level,
            anatomy=anatomy,
            spacing_mm=phantom.spacing_mm,
            structures=phantom.structures,
            hu=hu,
            label=label,
            reference=reference,
            site_mask=profile.values.encode(label, imat_mask(phantom.structures, profile.convention, hu)),
            reference_mask=profile.values.encode(reference, imat_mask(phantom.structures, REFERENCE, hu)),
        )


def make_site(
    out_dir: Path | str,
    profile: SiteProfile,
    *,
    slices: int = 12,
    size: int = 256,
    seed: int = 0,
    site_tag: str = "0",
    canary: str | None = None,
    on_slice: Progress | None = None,
) -> Path:
    """Write one demo site folder at ``out_dir`` (created; must be empty or absent).

    The slices are :func:`demo_slices` ``(profile, slices=, size=, seed=)``. Patient IDs
    are ``DEMO-{site_tag}-{patient:03d}``. ``canary`` is planted in PatientID, PatientName,
    Study/SeriesDescription, the UIDs' hashed part, file names and the site description,
    for privacy leak tests. ``on_slice(done, total)`` reports progress.
    """
    root = Path(out_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root}: exists and is not an empty folder; demo sites are written into new folders"
        )
    root.mkdir(parents=True, exist_ok=True)
    manifest_rng = np.random.default_rng([seed, 2])
    scanner = profile.scanner
    prefix = f"{canary}-" if canary else ""
    note = f"{canary} " if canary else ""
    rows: list[_Row] = []
    for done, item in enumerate(demo_slices(profile, slices=slices, size=size, seed=seed), start=1):
        anatomy, patient = item.anatomy, item.patient
        pid = f"{prefix}DEMO-{site_tag}-{patient:03d}"
        stem = f"{pid}-{item.level}"
        image = root / "images" / f"{stem}.dcm"
        write_ct_slice(
            image,
            item.hu,
            spacing_mm=(item.spacing_mm, item.spacing_mm),
            signed=scanner.signed,
            slope=scanner.slope,
            intercept=scanner.intercept,
            patient=PatientInfo(
                patient_id=pid,
                patient_name=f"{prefix}DEMO^{site_tag}-{patient:03d}",
                sex=anatomy.sex,
                height_m=anatomy.height_m,
                age=f"{anatomy.age:03d}Y",
            ),
            study_uid=_uid(seed, site_tag, patient, "study", canary),
            series_uid=_uid(seed, site_tag, patient, item.level, "series", canary),
            sop_uid=_uid(seed, site_tag, patient, item.level, "sop", canary),
            frame_of_reference_uid=_uid(seed, site_tag, patient, "frame", canary),
            position_z=-350.0 - 5.0 * (item.level - 1),
            instance_number=item.level,
            transfer_syntax=scanner.transfer_syntax,
            series_description=f"{note}Synthetic L3 (sarcofed demo)",
            extra={"StudyDescription": f"{note}Synthetic abdomen CT"},
        )
        label = root / "labels" / f"{stem}{profile.mask_suffix}"
        reference = root / "reference" / f"{stem}{profile.mask_suffix}"
        write_mask(label, item.site_mask, ct_path=image)
        write_mask(reference, item.reference_mask, ct_path=image)
        in_manifest = manifest_rng.random() < profile.manifest_demographics
        rows.append(
            _Row(
                image=image.relative_to(root).as_posix(),
                label=label.relative_to(root).as_posix(),
                reference=reference.relative_to(root).as_posix(),
                group=pid,
                height_m=f"{anatomy.height_m:.2f}" if in_manifest else "",
                sex=anatomy.sex if in_manifest else "",
            )
        )
        if on_slice is not None:
            on_slice(done, slices)
    _write_manifest(root, rows)
    description = profile.describe() + (f" Canary {canary}." if canary else "")
    (root / "site.toml").write_text(
        f"name = {_toml_string(profile.name)}\ndescription = {_toml_string(description)}\n\n"
        + profile.values.toml(),
        encoding="utf-8",
    )
    (root / "policy.toml").write_text(DEMO_POLICY, encoding="utf-8")
    log.info("wrote demo site %s (%s, %d slices)", root, profile.key, len(rows))
    return root


#: The fewest patients a demo hospital's reply may summarise: its held-out test split has only
#: a few. Real sites keep the default of 5 (client.policy, docs/PRIVACY.md).
DEMO_MIN_PATIENTS = 2
#: The demo hospitals' release policy: the defaults (client.policy) but ``DEMO_MIN_PATIENTS``.
DEMO_POLICY = f"""\
# Demo hospital: the default release policy (see docs/PRIVACY.md), relaxed for tiny demo data:
# a reply may summarise as few as {DEMO_MIN_PATIENTS} patients (the default, and what real sites
# should keep, is 5).
min-patients = {DEMO_MIN_PATIENTS}
"""


def _write_manifest(root: Path, rows: list[_Row]) -> None:
    with (root / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "reference", "group", "height_m", "sex"])
        for row in rows:
            writer.writerow([row.image, row.label, row.reference, row.group, row.height_m, row.sex])


def make_demo(
    out_dir: Path | str,
    *,
    sites: int = 3,
    slices: int = 12,
    size: int = 256,
    seed: int = 0,
    series: bool = False,
    force: bool = False,
    on_slice: Progress | None = None,
) -> list[Path]:
    """Write ``sites`` demo site folders ``out_dir/site-0 ...`` and return their paths.

    Site ``i`` uses :func:`site_profile` ``(i)`` and its own patients (seed ``seed * 1000 + i``).
    ``series`` is reserved for whole CT series (not written yet). A non-empty ``out_dir`` is
    refused unless ``force``, which replaces the ``site-*`` folders it would write.
    ``on_slice(done, total)`` counts slices over all sites.
    """
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file; give a folder for the demo sites")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out}: folder is not empty; choose a new folder or pass force=True")
        for i in range(sites):
            shutil.rmtree(out / f"site-{i}", ignore_errors=True)
    if series:
        log.warning("whole-series demo data is not written yet; writing single slices only")
    total = sites * slices
    paths = []
    for i in range(sites):
        offset = i * slices

        def report(done: int, _total: int, offset: int = offset) -> None:
            if on_slice is not None:
                on_slice(offset + done, total)

        paths.append(
            make_site(
                out / f"site-{i}",
                site_profile(i),
                slices=slices,
                size=size,
                seed=seed * 1000 + i,
                site_tag=str(i),
                on_slice=report,
            )
        )
    return paths


__all__ = [
    "DEMO_MIN_PATIENTS",
    "SITE_PROFILES",
    "STUDY_ORDER",
    "DemoSlice",
    "LabelValues",
    "ScannerProfile",
    "SiteProfile",
    "demo_slices",
    "make_demo",
    "make_site",
    "site_profile",
    "study_site_profile",
]
