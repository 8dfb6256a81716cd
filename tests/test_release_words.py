"""What a site withheld or noised, said in words (report and CLI share these sentences)."""

from __future__ import annotations

from common.release_words import release_sentences, withheld_text
from protocols.classes import IOU_BINS
from protocols.payloads import DpRelease, EvaluationPayload


def _payload(**update: object) -> EvaluationPayload:
    base = EvaluationPayload(
        task="evaluate",
        site="s",
        dataset_fingerprint="f" * 16,
        n_listed=5,
        n_used=5,
        n_groups=5,
        scores={},
        areas={},
    )
    return base.model_copy(update=update)


def test_withheld_marks_read_as_words_not_paths() -> None:
    text = withheld_text(
        ["quantiles", "scores.muscle.bins", "areas.muscle.sd", "findings.muscle:site_excludes:psoas"]
    )
    assert "medians and quartiles" in text and "muscle IoU bins" in text
    assert "limits of agreement" in text and "psoas" in text and "scores.muscle" not in text


def test_a_dp_release_states_epsilon_and_the_expected_error_of_what_was_noised() -> None:
    dp = DpRelease(
        epsilon=1.0,
        delta=0.0,
        mechanism="Laplace (OpenDP)",
        max_slices_per_patient=2,
        noised={f"scores.muscle.bins.{IOU_BINS[0]}": 36.8, "scores.muscle.undefined": 36.8, "n_used": 36.8},
    )
    sentences = release_sentences(_payload(dp=dp, suppressed=["scores.muscle.dice"]))
    assert len(sentences) == 2
    assert (
        "epsilon 1 per patient" in sentences[0] and "muscle IoU bins (slices per bin) ±36.8" in sentences[0]
    )
    assert sentences[1].startswith("Withheld by the site's release policy: muscle Dice summary")
    assert release_sentences(_payload()) == []


def test_discrepancy_and_audit_marks_read_as_words_with_finding_kinds_in_words() -> None:
    """What a site withheld from the label-definition analysis, as the guard and the analysis name
    it: no internal field names, no '<class>:<direction>:<region>' keys."""
    marks = [
        "discrepancy.findings",
        "discrepancy.region_area_share",
        "discrepancy.key_stats",
        "discrepancy.key_stats.muscle:site_excludes:psoas",
        "discrepancy.findings.visceral_fat:site_includes:boundary",
        "findings.muscle:site_includes:intramuscular_fat",
        "label_audit.checks",
        "label_audit.muscle:site_excludes:paraspinal",
    ]
    text = withheld_text(marks)
    for internal in ("_", "site_excludes", "site_includes", "key_stats", ":", "discrepancy"):
        assert internal not in text, (internal, text)
    assert "psoas left out of muscle" in text
    assert "tissue along the contours added to visceral fat" in text
    assert "intramuscular fat added to muscle" in text
    assert "the paraspinal muscles left out of muscle" in text
    assert text.count("(too few slices)") == len(marks)
