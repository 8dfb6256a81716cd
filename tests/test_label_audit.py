"""The model-free label audit: each convention is named from the image alone, reference labels are not."""

from __future__ import annotations

import numpy as np
import pytest
from discrepancy_toy import SIZE, SPACING, toy_slice
from scipy import ndimage

from common.discrepancy.slice import Key
from common.label_audit import LabelAuditAccumulator, audit_slice
from protocols.protocol import LabelProtocol


def _labels(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(hu, site label) of one toy slice labelled with convention ``kind``."""
    rng = np.random.default_rng(seed)
    toy = toy_slice(angle_deg=float(rng.uniform(-15, 15)), noise_sd=8.0, seed=seed)
    hu, site = toy.hu.copy(), toy.ref.copy()
    muscle = toy.ref == 1
    if kind == "psoas":
        site[toy.psoas] = 0
    elif kind == "paraspinal":
        site[toy.paraspinal] = 0
    elif kind == "tight":
        site[muscle & ~ndimage.binary_erosion(muscle, iterations=2)] = 0
    elif kind == "imat":
        # small fat islands inside the back muscles (~1.5% of muscle), labelled muscle by this site
        inner = ndimage.binary_erosion(toy.paraspinal, iterations=3)
        rows, cols = np.nonzero(inner)
        pick = rng.choice(rows.size, size=max(3, int(0.015 * muscle.sum())), replace=False)
        hu[rows[pick], cols[pick]] = -80.0
    elif kind == "vat-range":
        # visceral fat labelled down to -190 HU: a few pixels of the cavity at -170 HU
        cavity = np.nonzero(toy.ref == 3)
        pick = rng.choice(cavity[0].size, size=40, replace=False)
        hu[cavity[0][pick], cavity[1][pick]] = -170.0
    elif kind != "reference":
        raise ValueError(kind)
    return hu, site, toy.spacing


def _audit(kind: str, n: int = 6, protocol: LabelProtocol | None = None):
    acc = LabelAuditAccumulator(protocol or LabelProtocol())
    for seed in range(n):
        hu, site, spacing = _labels(kind, seed)
        acc.add(audit_slice(hu, spacing, site, acc.protocol))
    return acc.finalise()


def _named(audit) -> set[tuple[str, str, str]]:
    return {(c.tissue, c.direction, c.region) for c in audit.findings}


def test_reference_labels_follow_the_protocol_everywhere_the_audit_looks() -> None:
    audit = _audit("reference")
    assert _named(audit) == set()
    checked = {(c.tissue, c.direction, c.region) for c in audit.checks}
    assert ("muscle", "site_excludes", "psoas") in checked and (
        "muscle",
        "site_excludes",
        "boundary",
    ) in checked
    assert all(c.conforms for c in audit.checks), [c.sentence for c in audit.checks if not c.conforms]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("psoas", ("muscle", "site_excludes", "psoas")),
        ("paraspinal", ("muscle", "site_excludes", "paraspinal")),
        ("tight", ("muscle", "site_excludes", "boundary")),
        ("imat", ("muscle", "site_includes", "intramuscular_fat")),
        ("vat-range", ("visceral_fat", "site_includes", "other")),
    ],
)
def test_each_convention_is_named_from_the_image_alone(kind: str, expected: tuple[str, str, str]) -> None:
    audit = _audit(kind)
    assert _named(audit) == {expected}
    (check,) = audit.findings
    assert check.n_present == check.n_slices == 6
    assert check.prevalence_low > 0.5 and "convention" in check.sentence


def test_a_small_convention_on_every_slice_is_systematic_with_a_small_effect() -> None:
    audit = _audit("imat", n=8)
    (check,) = audit.findings
    assert check.mean_area_share < 0.02  # small ...
    assert check.systematic  # ... but on every slice


def test_a_convention_on_a_few_slices_is_not_systematic() -> None:
    acc = LabelAuditAccumulator()
    for seed in range(8):
        hu, site, spacing = _labels("psoas" if seed < 2 else "reference", seed)
        acc.add(audit_slice(hu, spacing, site))
    audit = acc.finalise()
    (check,) = [c for c in audit.checks if c.region == "psoas"]
    assert check.n_present == 2 and not check.systematic and not check.conforms


def test_a_protocol_without_psoas_turns_the_check_around() -> None:
    protocol = LabelProtocol(name="no-psoas", muscles=("paraspinal", "quadratus_lumborum", "abdominal_wall"))
    with_psoas = _audit("reference", protocol=protocol)
    assert _named(with_psoas) == {("muscle", "site_includes", "psoas")}
    assert _named(_audit("psoas", protocol=protocol)) == set()


def test_too_few_slices_release_only_the_count() -> None:
    audit = _audit("psoas", n=3)
    assert audit.n_slices == 3 and audit.checks == [] and audit.suppressed


def test_dense_tissue_that_is_not_the_spine_does_not_widen_the_spine_check() -> None:
    """A contrast-filled vessel (or a rib tip) beside the psoas, in muscle-density soft tissue the
    labels rightly leave out: the psoas check looks around the spine only, so it stays clean."""
    toy = toy_slice(noise_sd=8.0, seed=0)
    hu, site = toy.hu.copy(), toy.ref.copy()
    coords = (np.arange(SIZE) - (SIZE - 1) / 2) * SPACING
    y, x = np.meshgrid(coords, coords, indexing="ij")
    distance = np.hypot(x + 55.0, y + 5.0)  # ahead of the left psoas, inside the psoas region
    hu[(distance <= 22.0) & (site == 3)] = 40.0
    hu[distance <= 7.0] = 320.0
    site[distance <= 7.0] = 3
    psoas = Key("muscle", "site_excludes", "psoas")
    clean = audit_slice(toy.hu, toy.spacing, toy.ref).checks[psoas]
    checked = audit_slice(hu, toy.spacing, site).checks[psoas]
    assert checked.share == pytest.approx(clean.share, abs=0.02), (clean, checked)
