"""Attacks on what a site releases: each tries to recover one patient's value, and must fail.

Written as a coordinator would attack, through the real ClientApp handler (the reply a site
sends) with nothing but run-config keys and the site's default policy:

1. order statistics of a small site: n, mean, sd, median and quartiles of 5 values give back
   all 5 values;
2. (training replies: tests/test_training_replies.py);
3. differencing over time: the same study run before and after the site adds one labelled
   slice gives that patient's exact muscle area as n2 * mean2 - n1 * mean1.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_site import make_site
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import app
from common.dataset import iter_slices, load_site
from common.metrics import overlap_counts
from protocols import keys
from protocols.payloads import Distribution, EvaluationPayload

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _compare(site: Path, run_id: int) -> Message:
    """The coordinator asks for a label-vs-reference comparison (no model needed)."""
    msg = Message(
        RecordDict({keys.CONFIG: ConfigRecord({keys.TASK: "compare"})}),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    context = Context(
        run_id=run_id, node_id=1, node_config={"site-dir": str(site)}, state=RecordDict(), run_config={}
    )
    return app._handle(msg, context, "evaluate")


def _released(reply: Message) -> EvaluationPayload | None:
    if reply.has_error():
        return None
    return EvaluationPayload.model_validate_json(str(reply.content[keys.PAYLOAD][keys.PAYLOAD_JSON]))


# ------------------------------------------------------------------ attack 1: order statistics


def reconstruct_five(d: Distribution) -> list[float] | None:
    """All five values from n, mean, sd, median and quartiles (numpy's linear quantiles).

    For n = 5 the quartiles and median are the 2nd, 3rd and 4th values; the sum and sum of
    squares (from mean and sd) leave a quadratic for the smallest and largest.
    """
    if d.n != 5 or None in (d.mean, d.sd, d.median, d.q1, d.q3):
        return None
    middle = [d.q1, d.median, d.q3]
    total = 5 * d.mean - sum(middle)  # type: ignore[operator, arg-type]
    squares = 4 * d.sd**2 + 5 * d.mean**2 - sum(v * v for v in middle)  # type: ignore[operator, misc]
    disc = 2 * squares - total * total
    if disc < 0:
        return None
    low, high = (total - math.sqrt(disc)) / 2, (total + math.sqrt(disc)) / 2
    return [low, *middle, high]  # type: ignore[list-item]


def test_a_five_patient_site_cannot_be_rebuilt_from_its_distribution(tmp_path: Path) -> None:
    site = make_site(tmp_path, n=5, size=48, with_reference=True, name="small-hospital")
    truth = sorted(
        overlap_counts(s.reference, s.label).classes["muscle"].iou  # type: ignore[union-attr, arg-type]
        for s in iter_slices(load_site(site), with_reference=True)
    )
    assert len(truth) == 5 and len(set(truth)) == 5, "the attack needs five different values"
    released = _released(_compare(site, run_id=1))
    assert released is not None, "five patients meet the default policy: the site replies"
    guess = reconstruct_five(released.scores["muscle"].iou)
    # The attack works on the statistics as they were computed (checked here, so the test
    # cannot pass because the attack is wrong): the site withheld what made it work.
    full = Distribution(
        n=5,
        mean=float(np.mean(truth)),
        sd=float(np.std(truth, ddof=1)),
        median=float(np.median(truth)),
        q1=float(np.quantile(truth, 0.25)),
        q3=float(np.quantile(truth, 0.75)),
    )
    assert reconstruct_five(full) == pytest.approx(truth, abs=1e-9)
    assert guess is None or max(abs(g - t) for g, t in zip(guess, truth, strict=True)) > 1e-3
    assert "quantiles" in released.suppressed


# ------------------------------------------------------------------ attack 3: differencing


def _add_patient(site: Path, donor: Path, index: int) -> None:
    """Copy one labelled slice of ``donor`` into ``site`` as a new patient's row."""
    with (donor / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        row = list(csv.DictReader(handle))[index]
    for column in ("image", "label", "reference"):
        source = donor / row[column]
        target = site / "added" / f"{index}-{source.name}"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(source, target)
        row[column] = target.relative_to(site).as_posix()
    row["group"] = f"new-patient-{index}"
    with (site / "manifest.csv").open("a", newline="", encoding="utf-8") as handle:
        csv.DictWriter(handle, fieldnames=list(row)).writerow(row)


def _muscle_area_of(site: Path, group: str) -> float:
    ds = load_site(site)
    (item,) = [s for s in iter_slices(ds) if not isinstance(s, Exception) and s.group == group]
    return float((item.label == 1).sum()) * item.ct.spacing_mm[0] * item.ct.spacing_mm[1] / 100.0


def test_adding_one_patient_does_not_give_that_patients_value_away(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", n=6, size=48, with_reference=True, name="hospital-d")
    donor = make_site(tmp_path / "donor", n=7, size=48, with_reference=True, name="donor")
    first = _released(_compare(site, run_id=1))
    assert first is not None
    _add_patient(site, donor, 6)
    truth = _muscle_area_of(site, "new-patient-6")
    reply = _compare(site, run_id=2)
    second = _released(reply)
    if second is not None:  # if anything was released, subtraction must not give the value back
        a1, a2 = first.areas["muscle"], second.areas["muscle"]
        implied = a2.n * a2.mean_label_cm2 - a1.n * a1.mean_label_cm2  # type: ignore[operator]
        assert abs(implied - truth) > 1.0, "the new patient's muscle area follows by subtraction"
    else:
        assert "min-patients" in reply.error.reason and "subtraction" in reply.error.reason
        assert str(site) not in reply.error.reason
    # Enough new patients at once: a release is possible again, and no one patient stands out.
    for index in range(5):
        _add_patient(site, donor, index)
    assert _released(_compare(site, run_id=3)) is not None


def test_the_same_patients_may_be_released_again(tmp_path: Path) -> None:
    """A study run again on unchanged data (another model, another run) is not differencing."""
    site = make_site(tmp_path, n=6, size=48, with_reference=True, name="hospital-e")
    assert _released(_compare(site, run_id=1)) is not None
    assert _released(_compare(site, run_id=2)) is not None
    ledger = (tmp_path / "hospital-e.releases.jsonl").read_text(encoding="utf-8")
    assert len(ledger.splitlines()) == 3 and "patient-" not in ledger  # keyed hashes only, every line
    assert oct((tmp_path / "hospital-e.releases.jsonl").stat().st_mode & 0o777) == "0o600"


# ------------------------------------------------------------------ with differential privacy


def _enable_dp(site: Path, **budget: float) -> None:
    from client.policy import AggregateDp, SitePolicy, write_policy

    write_policy(site, SitePolicy(aggregate_dp=AggregateDp(enabled=True, **budget)))  # type: ignore[arg-type]


def _muscle_area_difference_of(site: Path, group: str) -> float:
    """The patient's (reference - label) muscle area, clipped as the DP release clips it."""
    from client.dp_release import AREA_CLIP_CM2

    ds = load_site(site)
    (item,) = [s for s in iter_slices(ds, with_reference=True) if s.group == group]
    pixels = float((item.reference == 1).sum()) - float((item.label == 1).sum())  # type: ignore[union-attr]
    diff = pixels * item.ct.spacing_mm[0] * item.ct.spacing_mm[1] / 100.0
    return min(max(diff, -AREA_CLIP_CM2), AREA_CLIP_CM2)


@pytest.mark.parametrize("noise", [True, False], ids=["dp", "noise-off"])
def test_with_dp_the_difference_of_two_releases_is_noise_not_the_patient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noise: bool
) -> None:
    """The attacker subtracts the released sums of (reference - label) muscle area before and after
    the patient was added. With the noise switched off the same subtraction gives the patient's
    value exactly (so the attack is the right one); with it, it is off by far more than 0.1 cm²
    (the chance that Laplace noise of sd ~1800 cm² lands within 0.1 of it is about 4e-5)."""
    from client import dp_release

    if not noise:
        monkeypatch.setattr(dp_release, "_laplace", lambda value, scale, *, integer: float(value))
    site = make_site(tmp_path / "site", n=6, size=48, with_reference=True, name="hospital-dp")
    donor = make_site(tmp_path / "donor", n=7, size=48, with_reference=True, name="donor")
    _enable_dp(site)
    first = _released(_compare(site, run_id=1))
    _add_patient(site, donor, 6)
    truth = _muscle_area_difference_of(site, "new-patient-6")
    second = _released(_compare(site, run_id=2))
    assert first is not None and second is not None  # DP releases may differ by one patient...
    a1, a2 = first.areas["muscle"], second.areas["muscle"]
    assert a1.mean_label_cm2 is None and "areas.muscle.sd" in first.suppressed  # ...label areas withheld
    implied = a2.sum_diff_cm2 - a1.sum_diff_cm2  # the closest an attacker gets: noise, not the patient
    if not noise:
        assert implied == pytest.approx(truth, abs=1e-6)
        return
    assert second.dp is not None
    most_one_patient_moves = second.dp.max_slices_per_patient * dp_release.AREA_CLIP_CM2
    assert second.dp.noised["areas.muscle.sum_diff_cm2"] > 10 * most_one_patient_moves  # documented
    assert abs(implied - truth) > 0.1
    for withheld in ("scores.muscle.dice", "scores.muscle.pixels", "discrepancy", "label_audit"):
        assert withheld in second.suppressed
    assert second.findings == [] and second.discrepancy is None
    assert second.scores["muscle"].iou.median is None and second.scores["muscle"].dice.n == 0


def test_the_epsilon_budget_is_spent_per_reply_and_refused_beyond(tmp_path: Path) -> None:
    site = make_site(tmp_path, n=6, size=48, with_reference=True, name="hospital-budget")
    _enable_dp(site, epsilon_per_reply=1.0, epsilon_per_study=2.0, epsilon_total=3.0)
    assert _released(_compare(site, run_id=1)) is not None
    assert _released(_compare(site, run_id=1)) is not None
    third = _compare(site, run_id=1)  # a third reply in the same study would reach epsilon 3 > 2
    assert third.has_error() and "epsilon-per-study" in third.error.reason
    assert _released(_compare(site, run_id=2)) is not None  # another study: total 3 <= 3
    last = _compare(site, run_id=3)
    assert last.has_error() and "epsilon-total" in last.error.reason
    from client.audit import audit_path, read_audit

    sent = [e for e in read_audit(audit_path(site)) if e.event == "sent"]
    assert [e.payload["dp"]["epsilon"] for e in sent] == [1.0, 1.0, 1.0]  # the audit log records the spend


def test_the_site_cli_preview_withholds_the_same_quantiles(tmp_path: Path) -> None:
    """`sarcofed site compare --json` shows exactly what would be sent: no order statistics either."""
    from typer.testing import CliRunner

    from server.cli import app as cli

    site = make_site(tmp_path, n=5, size=48, with_reference=True, name="small-cli")
    result = CliRunner().invoke(cli, ["site", "compare", str(site), "--json"])
    assert result.exit_code == 0, result.output
    previewed = EvaluationPayload.model_validate_json(result.stdout)
    assert reconstruct_five(previewed.scores["muscle"].iou) is None and "quantiles" in previewed.suppressed
