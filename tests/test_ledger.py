"""The release ledger (``client.ledger``): beside the site like the audit log, private, and an
unreadable ledger stops releases with the fix, never with its content."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from client.audit import audit_path
from client.ledger import ReleaseLedger, ledger_path
from common.errors import SarcofedError


def test_the_ledger_lives_beside_the_site_folder_like_the_audit_log(tmp_path: Path) -> None:
    site = tmp_path / "hospital-b"
    assert ledger_path(Path(f"{site}/")) == tmp_path / "hospital-b.releases.jsonl"
    assert ledger_path(site).parent == audit_path(site).parent


def test_the_ledger_is_private_and_holds_keyed_hashes_only(tmp_path: Path) -> None:
    ledger = ReleaseLedger.for_site(tmp_path / "hospital-b")
    ledger.record(run_id=1, task="compare", patients=["patient-001", "patient-002"], epsilon=0.5)
    ledger.record(run_id=2, task="compare", patients=["patient-001"])
    assert stat.S_IMODE(os.stat(ledger.path).st_mode) == 0o600
    assert "patient-" not in ledger.path.read_text(encoding="utf-8")
    assert ledger.spent() == 0.5 and ledger.spent(2) == 0.0
    assert ledger.too_close(["patient-001", "patient-002"], 2) is not None  # differs from run 2 by one


@pytest.mark.parametrize(
    "first_line",
    [
        {"format": "something-else", "key": "ab" * 32},
        {"format": "sarcofed-release-ledger-v1", "key": "not hex " + "cd" * 28},
        {"format": "sarcofed-release-ledger-v1"},
    ],
)
def test_an_unreadable_ledger_names_the_fix_and_never_echoes_its_content(
    tmp_path: Path, first_line: dict[str, str]
) -> None:
    ledger = ReleaseLedger.for_site(tmp_path / "hospital-b")
    ledger.path.write_text(json.dumps(first_line) + "\n", encoding="utf-8")
    for ask in (
        lambda: ledger.too_close(["p"], 5),
        ledger.spent,
        lambda: ledger.record(run_id=1, task="x", patients=[]),
    ):
        with pytest.raises(SarcofedError) as err:
            ask()
        reason = str(err.value)
        assert "hospital-b.releases.jsonl aside" in reason and "resets" in reason and "DP budget" in reason
        assert first_line.get("key", "no key")[-20:] not in reason and "something-else" not in reason


def test_a_damaged_entry_is_named_by_line_without_its_content(tmp_path: Path) -> None:
    ledger = ReleaseLedger.for_site(tmp_path / "hospital-b")
    ledger.record(run_id=1, task="compare", patients=["patient-001"])
    with ledger.path.open("a", encoding="utf-8") as handle:
        handle.write('{"time": "t", "run_id": 2, "task": "x", "patients": [], "epsilon": "SECRETVALUE"}\n')
    with pytest.raises(SarcofedError, match="line 3") as err:
        ledger.spent()
    assert "SECRETVALUE" not in str(err.value)
