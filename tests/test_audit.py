"""Audit log: beside the site folder, append-only JSONL, hash-chained."""

from __future__ import annotations

import json
from pathlib import Path

from client.audit import AuditLog, audit_path, payload_sha256, read_audit, verify_chain


def test_log_lives_beside_the_site_folder(tmp_path: Path) -> None:
    site = tmp_path / "hospital-b"
    site.mkdir()
    assert audit_path(site) == tmp_path / "hospital-b.audit.jsonl"
    assert audit_path(Path(str(site) + "/")) == tmp_path / "hospital-b.audit.jsonl"


def test_entries_append_in_order_with_payload_and_hash(tmp_path: Path) -> None:
    log = AuditLog.for_site(tmp_path / "site")
    log.append("received", run_id=7, task="evaluate", app_hash="h", payload={"config": {"task": "evaluate"}})
    log.append("sent", run_id=7, task="evaluate", app_hash="h", payload={"n_used": 12, "site": "b"})
    log.append("refused", run_id=8, task="train", app_hash="h", detail="not accepted")
    entries = list(read_audit(log.path))
    assert [e.event for e in entries] == ["received", "sent", "refused"]
    assert entries[1].payload == {"n_used": 12, "site": "b"}
    assert entries[1].payload_sha256 == payload_sha256({"site": "b", "n_used": 12})  # key order irrelevant
    assert entries[2].detail == "not accepted" and entries[2].run_id == 8
    lines = log.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    # a second writer (a new ClientApp process) appends, never truncates
    AuditLog(log.path).append("received", run_id=9, task="compare", app_hash="h")
    assert len(log.path.read_text(encoding="utf-8").splitlines()) == 4
    assert verify_chain(log.path) == []


def test_chain_detects_an_edited_or_removed_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "s.audit.jsonl")
    for n in range(3):
        log.append("sent", run_id=n, task="evaluate", app_hash="h", payload={"n": n})
    lines = log.path.read_text(encoding="utf-8").splitlines()
    edited = lines[1].replace('"n":1', '"n":2')
    log.path.write_text("\n".join([lines[0], edited, lines[2]]) + "\n", encoding="utf-8")
    problems = verify_chain(log.path)
    assert any("line 2: payload" in p for p in problems)
    assert any("line 3" in p for p in problems)
    log.path.write_text("\n".join([lines[0], lines[2]]) + "\n", encoding="utf-8")
    assert any("line 2: does not follow" in p for p in verify_chain(log.path))


def test_site_audit_command_shows_the_table_and_verifies(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from client.site_ops_cli import register

    app = typer.Typer()
    register(app)
    site = tmp_path / "hospital-b"
    log = AuditLog.for_site(site)
    log.append("received", run_id=41, task="evaluate", app_hash="f" * 64, payload={"config": {}})
    log.append("refused", run_id=41, task="evaluate", app_hash="f" * 64, detail="does not accept")
    out = CliRunner().invoke(app, ["audit", str(site), "--verify"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "refused" in out.stdout and "does not accept" in out.stdout and "41" in out.stdout
    assert "hash chain intact" in out.stdout
    as_json = CliRunner().invoke(app, ["audit", str(site), "--json"]).stdout.splitlines()
    assert [json.loads(line)["event"] for line in as_json] == ["received", "refused"]
    log.path.write_text(log.path.read_text().replace("does not accept", "accepted"), encoding="utf-8")
    assert CliRunner().invoke(app, ["audit", str(site), "--verify"]).exit_code == 1


def test_has_run_answers_from_the_entries_not_from_text_inside_them(tmp_path: Path) -> None:
    log = AuditLog.for_site(tmp_path / "site")
    assert not log.has_run(3)  # no log yet
    # a payload that spells another run id inside it must not count as that run's entry
    log.append("received", run_id=12, task="evaluate", app_hash="h", payload={"config": {"run_id": 3}})
    assert log.has_run(12)
    assert not log.has_run(3) and not log.has_run(1)
    with log.path.open("a", encoding="utf-8") as handle:
        handle.write('{"run_id": 3, "not": "canonical"\n')  # a damaged line is skipped, not fatal
    assert not log.has_run(3)
    log.append("refused", run_id=3, task="train", app_hash="h", detail="x")
    assert log.has_run(3)
