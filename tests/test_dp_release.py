"""The site's release policy with differential privacy: one release function, consistent marks,
noised numbers inside their bounds, a budget that cannot overspend (``client.guard.policy_release``,
``client.dp_release``, ``[aggregate-dp]`` in ``client.policy``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from guard_sites import APP

from client.policy import SitePolicy, load_policy
from common.site_evaluation import Scored
from protocols import keys
from protocols.payloads import EvaluationPayload


@pytest.mark.parametrize(
    ("table", "names"),
    [
        ("epsilon-per-reply = 4.0\nepsilon-per-study = 3.0", "epsilon-per-reply"),
        ("epsilon-per-study = 30.0\nepsilon-total = 20.0", "epsilon-per-study"),
    ],
)
def test_an_epsilon_budget_smaller_than_one_reply_is_refused_naming_the_keys(
    tmp_path: Path, table: str, names: str
) -> None:
    """A reply may never spend more than a study, nor a study more than the site's total."""
    from common.errors import SiteFolderError

    (tmp_path / "policy.toml").write_text(f"[aggregate-dp]\nenabled = true\n{table}\n", encoding="utf-8")
    with pytest.raises(SiteFolderError) as err:
        load_policy(tmp_path)
    assert names in str(err.value) and "<=" in str(err.value)


def test_the_default_budget_is_ordered() -> None:
    dp = SitePolicy().aggregate_dp
    assert dp.epsilon_per_reply <= dp.epsilon_per_study <= dp.epsilon_total


# ------------------------------------------------------------------ releases with [aggregate-dp]


def _dp_site(tmp_path: Path, *, n: int = 6, **policy: object) -> Path:
    """A site with reference masks, one manifest row that cannot be used, and [aggregate-dp] on."""
    from fixtures_site import make_site

    from client.policy import AggregateDp, write_policy

    site = make_site(tmp_path, n=n, size=48, with_reference=True, name="hospital-dp")
    with (site / "manifest.csv").open("a", encoding="utf-8") as handle:
        handle.write("ct/missing.dcm,labels/missing.png,patient-missing,1.70,M,references/missing.npy\n")
    write_policy(site, SitePolicy(aggregate_dp=AggregateDp(enabled=True), **policy))  # type: ignore[arg-type]
    return site


def _scored(site: Path) -> Scored:
    from common.dataset import load_site
    from common.site_evaluation import compare_with_reference

    return compare_with_reference(load_site(site))


def _sent(site: Path, scored: Scored, run_id: int = 1) -> EvaluationPayload:
    """What the site guard releases (the ClientApp's path: open, attach the parsed site, release)."""
    from client.guard import open_guard
    from common.dataset import load_site

    guard = open_guard(site, run_id=run_id, task="compare", config={keys.TASK: "compare"}, app_hash=APP)
    guard.attach(load_site(site))
    return guard.release_payload(scored.payload, records=scored.records)


def _contradictions(payload: EvaluationPayload) -> list[str]:
    """Marks in ``suppressed`` whose field still holds data (the report would say both)."""
    out = []
    for mark in payload.suppressed:
        parts = mark.split(".")
        if parts[0] in ("scores", "raw_scores", "harmonised_scores") and len(parts) == 3:
            scores = (getattr(payload, parts[0]) or {}).get(parts[1])
            if scores is None:
                continue
            held = {
                "bins": bool(scores.bins),
                "undefined": scores.undefined != 0,
                "iou": scores.iou.n != 0,
                "dice": scores.dice.n != 0,
                "pixels": scores.union_px != 0,
            }.get(parts[2], False)
            if held:
                out.append(mark)
        elif parts[0] == "areas" and len(parts) == 2 and payload.areas.get(parts[1]) is not None:
            if payload.areas[parts[1]].n:
                out.append(mark)
        elif mark in ("smi", "sarcopenia") and getattr(payload, mark) is not None:
            out.append(mark)
        elif mark == "excluded" and payload.excluded:
            out.append(mark)
        elif mark == "n_in_split" and payload.n_in_split is not None:
            out.append(mark)
    return out


def test_a_dp_release_never_marks_withheld_what_it_sends(tmp_path: Path) -> None:
    """min-cell-count suppresses small cells; the DP release then noises them: it must not do both."""
    site = _dp_site(tmp_path, **{"min-cell-count": 7})
    scored = _scored(site)
    assert any(0 < c < 7 for c in scored.payload.scores["muscle"].bins.values()), "needs a small cell"
    released = _sent(site, scored)
    assert released.dp is not None
    assert _contradictions(released) == []
    # the noised bins are what leaves (every bin, each a noised count; all may round to 0)
    assert "scores.muscle.bins" not in released.suppressed
    assert set(released.scores["muscle"].bins) == set(scored.payload.scores["muscle"].bins)


def test_a_dp_release_withholds_the_counts_that_give_back_the_exact_slice_count(tmp_path: Path) -> None:
    """n_used is noised; n_listed - sum(excluded) would give it back exactly, so excluded is withheld
    (n_listed, the manifest's row count, leaves exactly), as is an internal site's n_in_split."""
    site = _dp_site(tmp_path)
    scored = _scored(site)
    assert sum(scored.payload.excluded.values()) == 1
    internal = scored.payload.model_copy(update={"role": "internal", "split": "test", "n_in_split": 7})
    released = _sent(site, Scored(internal, scored.records))
    assert released.n_listed == scored.payload.n_listed
    assert released.excluded == {} and "excluded" in released.suppressed
    assert released.n_in_split is None and "n_in_split" in released.suppressed
    assert _contradictions(released) == []


def test_a_dp_release_marks_every_mean_it_drops(tmp_path: Path) -> None:
    site = _dp_site(tmp_path)
    scored = _scored(site)
    exact = scored.payload.areas["muscle"]
    assert exact.mean_label_cm2 is not None and exact.mean_hu_label is not None
    released = _sent(site, scored)
    muscle = released.areas["muscle"]
    assert (muscle.mean_label_cm2, muscle.mean_test_cm2, muscle.mean_hu_label, muscle.mean_hu_test) == (
        None,
    ) * 4
    assert "areas.muscle.means" in released.suppressed
    assert released.smi is not None and released.smi.mean_label is None and "smi.means" in released.suppressed
    assert released.scores["muscle"].iou.sd is None and "scores.muscle.iou.sd" in released.suppressed


def test_noised_means_stay_inside_their_clipping_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sum's noise can take its mean anywhere; the released mean is clamped to the per-slice bound."""
    from client import dp_release

    def huge(value: float, scale: float, *, integer: bool) -> float:
        return value if integer else value + 1e6

    monkeypatch.setattr(dp_release, "_laplace", huge)
    site = _dp_site(tmp_path)
    released = _sent(site, _scored(site))
    assert released.areas["muscle"].mean_diff_cm2 == dp_release.AREA_CLIP_CM2
    assert released.smi is not None and released.smi.mean_diff == dp_release.SMI_CLIP
    assert released.scores["muscle"].iou.mean == 1.0
    assert released.areas["muscle"].sum_diff_cm2 > 1e5  # the sums stay unbiased: they pool


def test_the_epsilon_of_a_dp_release_adds_up_to_what_the_policy_allows(tmp_path: Path) -> None:
    """Recompute the privacy loss from the noise that was added (Laplace: epsilon = sensitivity /
    scale, one histogram is one statistic): adding a statistic without its share would overspend."""
    from client.dp_release import AREA_CLIP_CM2, SMI_CLIP

    site = _dp_site(tmp_path)
    released = _sent(site, _scored(site))
    assert released.dp is not None
    k = released.dp.max_slices_per_patient
    statistics: dict[str, float] = {}
    for path, sd in released.dp.noised.items():
        scale = sd / math.sqrt(2)
        parts = path.split(".")
        if parts[0] == "scores" and parts[2] in ("bins", "undefined"):
            statistics[f"scores.{parts[1]}.histogram"] = k / scale
        elif parts[0] == "sarcopenia":
            statistics["sarcopenia"] = k / scale
        elif path in ("n_used", "smi.n"):
            statistics[path] = k / scale
        else:
            bound = {"areas.muscle.sum_diff_cm2": AREA_CLIP_CM2, "smi.sum_diff": SMI_CLIP}.get(path, 1.0)
            statistics[path] = k * bound / scale
    assert sum(statistics.values()) == pytest.approx(released.dp.epsilon)
    assert "bias" in released.dp.mechanism  # counts are clamped at 0: the report says so


def test_the_cli_preview_is_the_dp_release_the_site_would_send(tmp_path: Path) -> None:
    """`sarcofed site compare --json` shows the reply as sent (noised, with the same marks), and the
    human rendering of a DP reply prints "-" where a number was withheld instead of crashing."""
    from typer.testing import CliRunner

    from server.cli import app as cli

    site = _dp_site(tmp_path, **{"min-cell-count": 7})
    sent = _sent(site, _scored(site))
    result = CliRunner().invoke(cli, ["site", "compare", str(site), "--json"])
    assert result.exit_code == 0, result.output
    previewed = EvaluationPayload.model_validate_json(result.stdout)
    assert previewed.dp is not None and sent.dp is not None
    assert sorted(previewed.dp.noised) == sorted(sent.dp.noised)
    assert sorted(previewed.suppressed) == sorted(sent.suppressed)
    human = CliRunner().invoke(cli, ["site", "compare", str(site)])
    assert human.exit_code == 0, human.output
    assert "Released with differential privacy" in " ".join(human.stdout.split())
