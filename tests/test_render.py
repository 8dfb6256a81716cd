"""The human preview of a reply (``client.render.render_payload``): says what a coordinator would read
in the JSON (role and split, the label audit, whose difference each finding is) and never claims
what a withheld field would have said."""

from __future__ import annotations

from report_builders import attributed_boundary, attributed_psoas, hospital_b
from rich.console import Console

from client.render import render_payload
from protocols.payloads import EvaluationPayload


def _text(payload: EvaluationPayload) -> str:
    console = Console(record=True, width=400, color_system=None)
    render_payload(payload, console)
    return " ".join(console.export_text().split())


def test_an_internal_reply_says_its_role_split_and_how_many_rows_the_test_split_holds() -> None:
    text = _text(hospital_b(role="internal"))
    assert "internal" in text and "test split" in text and "10 manifest rows" in text
    assert "external" in _text(hospital_b(role="external"))


def test_the_label_audit_and_each_findings_attribution_are_shown() -> None:
    found = [attributed_psoas(8), attributed_boundary(8, 2, systematic=False)]
    text = _text(hospital_b(role="external").model_copy(update={"findings": found}))
    assert "Your labels against the alberta protocol" in text  # the model-free label audit
    assert "a labelling convention of this site, unlike the alberta protocol" in text
    assert (
        "a convention of this site" in text
        and found[0].evidence is not None
        and found[0].evidence[:40] in text
    )
    assert "the model's" in text


def test_withheld_findings_are_not_reported_as_agreement() -> None:
    withheld = hospital_b().model_copy(
        update={"findings": [], "suppressed": ["findings.muscle:site_excludes:psoas"]}
    )
    text = _text(withheld)
    assert "agree with the reference convention" not in text
    assert "withheld" in text
    agreeing = hospital_b().model_copy(update={"findings": []})
    assert "agree with the reference convention" in _text(agreeing)


def test_a_withheld_patient_count_is_not_printed_as_zero_patients() -> None:
    text = _text(hospital_b().model_copy(update={"n_groups": 0, "suppressed": ["n_groups"]}))
    assert "(0 patients)" not in text and "patient count withheld" in text


def test_what_was_withheld_is_said_even_when_no_slice_was_scored() -> None:
    empty = hospital_b().model_copy(update={"n_used": 0, "suppressed": ["quantiles"]})
    assert "Withheld by the site's release policy" in _text(empty)
