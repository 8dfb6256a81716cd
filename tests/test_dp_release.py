"""The site's release policy with differential privacy: one release function, consistent marks,
noised numbers inside their bounds, a budget that cannot overspend (``client.guard.policy_release``,
``client.dp_release``, ``[aggregate-dp]`` in ``client.policy``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.policy import SitePolicy, load_policy


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
