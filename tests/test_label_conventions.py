"""common.label_conventions: a site's conventions turned into protocol targets (relabel / ignore)."""

from __future__ import annotations

import numpy as np
import pytest

from common.demo.hospitals import SITE_PROFILES, demo_slices
from common.demo.structures import Structure
from common.label_conventions import adjust_slice, contour_erosion_px, plan_conventions
from common.training import TrainSample
from protocols.protocol import LabelProtocol

SPACING = (1.0, 1.0)


def _profile(key: str):
    return next(p for p in SITE_PROFILES if p.key == key)


def _samples(key: str, n: int = 8, size: int = 128) -> tuple[list, list[TrainSample]]:
    slices = list(demo_slices(_profile(key), slices=n, size=size, seed=4))
    samples = [
        TrainSample(hu=s.hu, label=s.label, group=str(s.patient), spacing_mm=(s.spacing_mm, s.spacing_mm))
        for s in slices
    ]
    return slices, samples


def test_hu_range_relabels_only_pixels_outside_their_class_range() -> None:
    hu = np.array([[40.0, -100.0, 400.0], [-100.0, -100.0, -200.0]])
    label = np.array([[1, 1, 1], [2, 3, 2]], dtype=np.uint8)
    out = adjust_slice(hu, SPACING, label, ["hu_range"])
    # muscle at -100 (IMAT) and 400 (bone) -> background; fat inside its range stays; SAT at -200 -> 0
    assert out.label.tolist() == [[1, 0, 0], [2, 3, 0]]
    assert out.changed_px == {"hu_range": 3} and not out.ignore.any()
    imat_counts = LabelProtocol(name="imat-counts", imat_in_muscle=True)
    assert adjust_slice(hu, SPACING, label, ["hu_range"], imat_counts).label[0].tolist() == [1, 1, 0]


def test_boundary_ignores_the_unlabelled_band_around_muscle_and_nothing_else() -> None:
    hu = np.full((11, 11), 40.0)
    label = np.zeros((11, 11), dtype=np.uint8)
    label[5, 5] = 1
    label[5, 9] = 3  # labelled (visceral) fat in the band keeps teaching fat
    out = adjust_slice(hu, SPACING, label, ["boundary"])
    distance = np.abs(np.arange(11)[:, None] - 5) + np.abs(np.arange(11)[None, :] - 5)  # cross steps
    expected = (distance >= 1) & (distance <= 3)
    expected[5, 9] = False
    assert np.array_equal(out.ignore, expected)
    assert out.changed_px["boundary"] == int(expected.sum())
    assert np.array_equal(out.label, label)  # ignoring never relabels


def test_boundary_ignores_a_thin_wall_muscle_a_tight_contour_erased_but_not_a_distant_organ() -> None:
    hu = np.full((20, 20), -100.0)  # fat density everywhere ...
    label = np.zeros((20, 20), dtype=np.uint8)
    label[0:3, :] = 2  # subcutaneous fat along the top
    hu[3:5, 2:18] = 45.0  # ... a 2-px muscle strip just inside it, erased by the site (label 0)
    hu[14:17, 8:12] = 45.0  # an organ of muscle density, far from the fat and from any muscle
    out = adjust_slice(hu, SPACING, label, ["boundary"])
    assert out.ignore[3:5, 2:18].all()
    assert not out.ignore[14:17, 8:12].any()
    assert not out.ignore[0:3].any()  # labelled fat keeps teaching fat


def test_a_contour_drawn_two_pixels_tight_is_measured_and_the_muscle_regrown_to_its_edge() -> None:
    """A muscle of muscle density in fat, labelled 2 cross steps inside its edge: the erosion is
    measured as 2, the label regrown to exactly the muscle (never into the fat), and only the
    ring just outside the edge ignored; the regrown pixels are tallied apart from the ignored."""
    from scipy import ndimage

    hu = np.full((24, 24), -100.0)
    rows, cols = np.indices((24, 24))
    # a disc in cross steps: eroded, then regrown, it is itself again
    muscle = np.abs(rows - 12) + np.abs(cols - 11) <= 7
    hu[muscle] = 45.0
    label = ndimage.binary_erosion(muscle, iterations=2).astype(np.uint8)  # the tight contour
    sample = TrainSample(hu=hu, label=label, group="p", spacing_mm=SPACING)
    assert contour_erosion_px([sample]) == 2
    assert contour_erosion_px([TrainSample(hu=hu, label=muscle.astype(np.uint8), group="p")]) == 0

    out = adjust_slice(hu, SPACING, label, ["boundary"], erosion_px=2)
    assert np.array_equal(out.label == 1, muscle)
    ring = ndimage.binary_dilation(muscle) & ~muscle
    assert np.array_equal(out.ignore, ring)
    assert out.changed_px == {"contour": int(muscle.sum() - label.sum()), "boundary": int(ring.sum())}
    # measured without the regrowth (erosion 0), the band of 3 steps is ignored and nothing relabelled
    band = adjust_slice(hu, SPACING, label, ["boundary"])
    assert np.array_equal(band.label, label) and band.ignore.sum() > out.ignore.sum()


def test_a_group_left_out_on_a_slice_without_a_spine_ignores_all_unlabelled_muscle_density() -> None:
    """No spine, no regions: the group cannot be placed, so no such pixel may teach background."""
    hu = np.full((16, 16), -100.0)
    hu[4:8, 4:8] = 45.0  # unlabelled muscle density (the left-out group, somewhere)
    label = np.zeros((16, 16), dtype=np.uint8)
    label[10:12, 10:12] = 1
    hu[10:12, 10:12] = 45.0
    out = adjust_slice(hu, SPACING, label, ["psoas"])
    assert out.ignore[4:8, 4:8].all() and not out.ignore[10:12, 10:12].any()
    assert out.changed_px["psoas"] == 16


def test_unknown_adjustment_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"\['psoas-left'\].*hu_range"):
        adjust_slice(np.zeros((4, 4)), SPACING, np.zeros((4, 4), dtype=np.uint8), ["psoas-left"])


@pytest.mark.parametrize(
    ("key", "adjustments"),
    [
        ("reference-like", ()),
        ("psoas left out", ("psoas",)),
        ("IMAT included in muscle", ("hu_range",)),
        ("contours drawn 2 px tight", ("boundary",)),
        ("paraspinals left out", ("paraspinal",)),
    ],
)
def test_the_audit_of_each_demo_convention_asks_for_its_adjustment_and_the_kept_targets_follow_the_protocol(
    key: str, adjustments: tuple[str, ...]
) -> None:
    """Demo hospitals (the truth known): after the adjustments, the pixels the loss keeps agree
    with the reference-convention labels far better than the site's raw labels do."""
    slices, samples = _samples(key)
    plan = plan_conventions(samples, samples[:2])
    assert plan.adjustments == adjustments
    tight = key == "contours drawn 2 px tight"
    assert contour_erosion_px(samples) == (2 if tight else 0)
    assert set(plan.tally.shares()) == set(adjustments) | ({"contour"} if tight else set())
    assert plan.tally.n_slices == len(samples)
    assert len(plan.val) == 2 and plan.val[0].ignore is not None
    wrong_raw = sum(int(np.count_nonzero(s.label != s.reference)) for s in slices)
    wrong_kept = sum(
        int(np.count_nonzero((a.label != s.reference) & ~a.ignore))
        for s, a in zip(slices, plan.train, strict=True)
    )
    if not adjustments:
        assert wrong_raw == 0 and wrong_kept == 0
        assert all(not a.ignore.any() for a in plan.train)
        return
    # measured: 0.000 (psoas, paraspinal), 0.010 (IMAT), 0.012 (tight: the abdominal wall that a
    # tight contour erases altogether is ignored too; 0.38 before it was)
    assert wrong_kept <= 0.05 * wrong_raw, (wrong_kept, wrong_raw)
    if tight:  # measured: 14% of its labelled pixels regrown, 25% ignored (44% ignored before)
        assert plan.tally.shares()["boundary"] < 0.3 and plan.tally.shares()["contour"] > 0.1
    ignored_share = sum(int(a.ignore.sum()) for a in plan.train) / sum(a.ignore.size for a in plan.train)
    assert ignored_share <= 0.1  # the rest of the image still teaches
    if key == "psoas left out":  # the reference's psoas is ignored entirely, other muscle kept
        psoas = [(s.structures == Structure.psoas) & (s.reference == 1) for s in slices]
        ignored = sum(int(np.count_nonzero(p & a.ignore)) for p, a in zip(psoas, plan.train, strict=True))
        assert ignored >= 0.99 * sum(int(p.sum()) for p in psoas)
        muscle = sum(int(np.count_nonzero(a.label == 1)) for a in plan.train)
        muscle_ignored = sum(int(np.count_nonzero((a.label == 1) & a.ignore)) for a in plan.train)
        assert muscle_ignored == 0 and muscle > 0


def test_a_convention_the_audit_sees_on_two_thirds_of_the_slices_is_adjusted_for() -> None:
    """The psoas-excluding hospital of bench_conventions at 32 slices: the audit sees psoas left
    out on 20 of its 31 slices with a spine (where the psoas is large enough to measure). That is
    not "most slices" with 95% confidence, the report's systematic finding, and before training
    used a weaker test that site's psoas labels went in unadjusted (psoas recall on a held-out
    hospital 0.73, against 0.95 from the reference hospitals alone). The protocol-following
    hospitals show none of these deviations and get no adjustment."""
    from common.label_conventions import TRAINING_SHARE

    def bench_hospital(key: str, seed: int) -> list[TrainSample]:  # bench_conventions' hospitals
        return [
            TrainSample(hu=s.hu, label=s.label, group=str(s.patient), spacing_mm=(s.spacing_mm, s.spacing_mm))
            for s in demo_slices(_profile(key), slices=32, size=128, seed=seed)
        ]

    plan = plan_conventions(bench_hospital("psoas left out", 110), [])
    (check,) = [c for c in plan.audit.checks if c.region == "psoas" and c.n_present]
    assert not check.systematic and check.prevalence_low > TRAINING_SHARE, check
    assert plan.adjustments == ("psoas",)
    for key, seed in (("reference-like", 100), ("reference-like, noisy scanner", 101)):
        assert plan_conventions(bench_hospital(key, seed), []).adjustments == (), key


def test_too_few_slices_decide_nothing_and_a_missing_spacing_is_named() -> None:
    _, samples = _samples("psoas left out", n=4)
    plan = plan_conventions(samples, [], min_slices=5)
    assert plan.adjustments == () and all(not a.ignore.any() for a in plan.train)
    samples[1].spacing_mm = None
    with pytest.raises(ValueError, match=r"training sample 1 .*pixel spacing"):
        plan_conventions(samples, [])


def test_a_declared_convention_is_applied_where_the_audit_confirms_it_and_only_there() -> None:
    """site.toml label_conventions: a site whose psoas is left out on half its slices (say two
    readers) is not systematic by its audit alone; declared, the audit confirms it (some slices
    show it, and the labels do not clearly follow the protocol), so the psoas region is ignored.
    A site whose labels plainly include psoas declares it in vain: the audit contradicts it."""
    from common.label_conventions import confirms

    mixed_slices, mixed = _samples("psoas left out", n=4)
    _, ref = _samples("reference-like", n=4)
    samples = [*mixed, *ref]
    plain = plan_conventions(samples, [])
    assert "psoas" not in plain.adjustments  # the audit alone: not systematic
    assert confirms(plain.audit, "psoas")
    declared = plan_conventions(samples, [], declared=("psoas",))
    assert "psoas" in declared.adjustments and declared.unconfirmed == ()
    psoas = [(s.structures == Structure.psoas) & (s.reference == 1) for s in mixed_slices]
    ignored = sum(int(np.count_nonzero(p & a.ignore)) for p, a in zip(psoas, declared.train[:4], strict=True))
    assert ignored >= 0.99 * sum(
        int(p.sum()) for p in psoas
    )  # the slices that left it out teach nothing there

    _, reference = _samples("reference-like", n=8)
    contradicted = plan_conventions(reference, [], declared=("psoas", "boundary"))
    assert contradicted.adjustments == () and contradicted.unconfirmed == ("psoas", "boundary")
    assert not confirms(contradicted.audit, "psoas")
    assert all(not a.ignore.any() for a in contradicted.train)


def test_site_toml_label_conventions_are_checked_by_name() -> None:
    from pydantic import ValidationError

    from protocols.site import SiteConfig

    labels = {"muscle": [1], "subcutaneous_fat": [2], "visceral_fat": [3]}
    assert SiteConfig(name="h", labels=labels, label_conventions=["psoas", "psoas"]).label_conventions == (
        "psoas",
    )
    with pytest.raises(ValidationError, match=r"label_conventions holds \['no-psoas'\].*one of"):
        SiteConfig(name="h", labels=labels, label_conventions=["no-psoas"])
