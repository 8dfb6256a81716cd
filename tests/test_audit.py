"""Audit log: beside the site folder, append-only JSONL, owner-only, keyed chain and anchor."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from client.audit import AuditLog, audit_path, payload_sha256, read_audit, verify_chain, verify_log
from client.audit_anchor import AuditLogError


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


# ---------------------------------------------------------------- files, key, anchor
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _log_with(tmp_path: Path, n: int) -> AuditLog:
    log = AuditLog.for_site(tmp_path / "hospital-b")
    for i in range(n):
        log.append("sent", run_id=i, task="evaluate", app_hash="h", payload={"n_used": 10 + i})
    return log


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A permissive umask, as on many servers: files must still come out 0600."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_log_key_and_anchor_are_readable_by_the_site_account_only(tmp_path: Path, open_umask: None) -> None:
    log = _log_with(tmp_path, 2)
    assert log.key_path == tmp_path / "hospital-b.audit.key"
    assert log.anchor_path == tmp_path / "hospital-b.audit.anchor.json"
    for path in (log.path, log.key_path, log.anchor_path):
        assert _mode(path) == 0o600, path
    assert not list(tmp_path.glob("*.tmp"))


def test_a_log_others_can_read_is_tightened_on_the_next_append_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = _log_with(tmp_path, 1)
    for path in (log.path, log.key_path, log.anchor_path):
        path.chmod(0o644)
    assert set(verify_log(log.path).loose) == {log.path.name, log.key_path.name, log.anchor_path.name}
    with caplog.at_level(logging.WARNING, logger="client.audit_anchor"):
        log.append("received", run_id=2, task="evaluate", app_hash="h")
    for path in (log.path, log.key_path, log.anchor_path):
        assert _mode(path) == 0o600, path
        assert any(str(path) in r.getMessage() and "0644" in r.getMessage() for r in caplog.records)
    assert verify_chain(log.path) == []


def test_entries_are_keyed_and_the_key_never_enters_the_log(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 3)
    entries = list(read_audit(log.path))
    assert [(e.chain, e.seq) for e in entries] == [("hmac-sha256", 1), ("hmac-sha256", 2), ("hmac-sha256", 3)]
    key = log.key_path.read_text().strip()
    assert len(key) == 64 and key not in log.path.read_text() and key not in log.anchor_path.read_text()
    report = verify_log(log.path)
    assert report.intact and report.chain == "keyed" and report.entries == 3
    assert report.current_anchor is not None and report.current_anchor.entries == 3


def _rechain_unkeyed(lines: list[str]) -> list[str]:
    """What anyone can do without the key: edit entries and recompute a plain sha256 chain."""
    out: list[str] = []
    for line in lines:
        entry = json.loads(line)
        entry = {k: v for k, v in entry.items() if k not in ("chain", "seq")}
        entry["prev"] = hashlib.sha256(out[-1].encode()).hexdigest() if out else "0" * 64
        entry["digest"] = ""
        entry["digest"] = payload_sha256({k: v for k, v in entry.items() if k != "digest"})
        out.append(json.dumps(entry, sort_keys=True, separators=(",", ":")))
    return out


def _rechain_keyed(lines: list[str], key: bytes) -> list[str]:
    """The same with an HMAC chain under a key of the attacker's own."""
    out: list[str] = []
    for line in lines:
        entry = json.loads(line)
        entry["prev"] = hmac.new(key, out[-1].encode(), hashlib.sha256).hexdigest() if out else "0" * 64
        body = json.dumps(
            {k: v for k, v in entry.items() if k != "digest"}, sort_keys=True, separators=(",", ":")
        )
        entry["digest"] = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
        out.append(json.dumps(entry, sort_keys=True, separators=(",", ":")))
    return out


def _forged(log: AuditLog) -> list[str]:
    """The log's lines with what was sent on run 1 changed (n_used 11 -> 99)."""
    lines = log.path.read_text(encoding="utf-8").splitlines()
    edited = [line.replace('"n_used":11', '"n_used":99') for line in lines]
    assert edited != lines
    return [
        json.dumps(
            e | {"payload_sha256": payload_sha256(e["payload"])}, sort_keys=True, separators=(",", ":")
        )
        for e in map(json.loads, edited)
    ]


def test_a_log_rewritten_whole_with_a_recomputed_chain_is_detected(tmp_path: Path) -> None:
    """Attack: rewrite what a site sent, recomputing every digest and link (unkeyed, or keyed
    under the attacker's own key, even replacing the key file). Each verifies as intact on
    today's main; here each is caught."""
    log = _log_with(tmp_path, 3)
    forged = _forged(log)

    log.path.write_text("\n".join(_rechain_unkeyed(forged)) + "\n", encoding="utf-8")
    problems = verify_chain(log.path)
    assert any("is not the one the anchor saw" in p for p in problems), problems

    log.path.write_text("\n".join(_rechain_keyed(forged, b"k" * 32)) + "\n", encoding="utf-8")
    problems = verify_chain(log.path)
    assert any("line 1: edited" in p for p in problems), problems

    log.key_path.unlink()
    log.key_path.write_text((b"k" * 32).hex() + "\n", encoding="ascii")  # their key in place of the site's
    problems = verify_chain(log.path)
    assert any("taken with another audit key" in p for p in problems), problems
    with pytest.raises(AuditLogError, match="another audit key"):
        log.append("received", run_id=9, task="evaluate", app_hash="h")  # the site does not go on


def test_cutting_entries_from_the_end_is_detected_and_the_log_is_not_continued(tmp_path: Path) -> None:
    """Attack: remove the last entries (what was sent last). Undetected on today's main."""
    log = _log_with(tmp_path, 4)
    lines = log.path.read_text(encoding="utf-8").splitlines()
    log.path.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    problems = verify_chain(log.path)
    assert any("the log ends before entry 4 the anchor saw (it holds 2)" in p for p in problems), problems
    with pytest.raises(AuditLogError, match="ends before entry 4"):
        log.append("received", run_id=9, task="evaluate", app_hash="h")
    assert len(log.path.read_text(encoding="utf-8").splitlines()) == 2  # nothing appended
    log.path.write_text("", encoding="utf-8")  # cut to nothing
    assert any("ends before entry 4" in p for p in verify_chain(log.path))


def test_an_anchor_kept_elsewhere_catches_what_the_folder_alone_cannot(tmp_path: Path) -> None:
    """Attacks the stored anchor cannot see (documented): the log, key and anchor deleted
    together; the log cut back to an older anchor put back in place."""
    log = _log_with(tmp_path, 2)
    older_anchor = log.anchor_path.read_bytes()
    log.append("sent", run_id=2, task="evaluate", app_hash="h", payload={"n_used": 12})
    exported = verify_log(log.path).current_anchor
    assert exported is not None and exported.entries == 3
    lines = log.path.read_text(encoding="utf-8").splitlines()

    # cut back to entry 2 and put the anchor of entry 2 back
    log.path.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    log.anchor_path.write_bytes(older_anchor)
    assert verify_chain(log.path) == []  # the folder alone cannot tell
    assert any("ends before entry 3" in p for p in verify_chain(log.path, exported))

    # all three files deleted: the site starts a fresh log that verifies by itself
    for path in (log.path, log.key_path, log.anchor_path):
        path.unlink()
    log.append("received", run_id=5, task="evaluate", app_hash="h")
    assert verify_chain(log.path) == []
    assert any("another audit key" in p for p in verify_chain(log.path, exported))


def test_an_edited_exported_anchor_is_refused(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 3)
    exported = verify_log(log.path).current_anchor
    assert exported is not None
    lowered = exported.model_copy(update={"entries": 1})  # to hide a cut
    assert any("anchor was edited" in p for p in verify_chain(log.path, lowered))


def test_a_keyed_log_without_its_key_is_reported_and_not_continued(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 2)
    log.key_path.unlink()
    assert any("key hospital-b.audit.key is missing" in p for p in verify_chain(log.path))
    with pytest.raises(AuditLogError, match="audit key is missing"):
        log.append("received", run_id=9, task="evaluate", app_hash="h")
    log.path.unlink()  # the log gone too, the anchor left: still not a fresh start
    with pytest.raises(AuditLogError, match="anchor exists but the audit key is missing"):
        log.append("received", run_id=9, task="evaluate", app_hash="h")


def _legacy_log(path: Path, n: int) -> list[str]:
    """A log as sarcofed wrote it before the chain was keyed (sha256 prev/digest, no seq)."""
    lines: list[str] = []
    for i in range(n):
        entry = {
            "time": f"2025-01-0{i + 1}T00:00:00.000+00:00",
            "event": "sent",
            "run_id": i,
            "task": "evaluate",
            "app_hash": "h",
            "payload_sha256": payload_sha256({"n_used": i}),
            "payload": {"n_used": i},
            "detail": None,
            "prev": hashlib.sha256(lines[-1].encode()).hexdigest() if lines else "0" * 64,
        }
        entry["digest"] = payload_sha256(entry)
        lines.append(json.dumps(entry, sort_keys=True, separators=(",", ":")))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def test_an_old_unkeyed_log_is_still_read_verified_and_then_keyed(tmp_path: Path) -> None:
    log = AuditLog.for_site(tmp_path / "hospital-b")
    lines = _legacy_log(log.path, 3)
    report = verify_log(log.path)
    assert report.intact and report.chain == "unkeyed" and report.current_anchor is None
    assert [e.chain for e in read_audit(log.path)] == ["sha256"] * 3
    assert not log.key_path.exists() and log.has_run(2)

    log.append("received", run_id=3, task="evaluate", app_hash="h")
    report = verify_log(log.path)
    assert report.intact and report.chain == "partly keyed" and report.entries == 4
    assert [e.seq for e in read_audit(log.path)] == [None, None, None, 4]
    # the old prefix rewritten with a recomputed sha256 chain: the first keyed entry pins it
    keyed = log.path.read_text(encoding="utf-8").splitlines()[3]
    first = json.loads(lines[0]) | {"payload": {"n_used": 7}, "payload_sha256": payload_sha256({"n_used": 7})}
    forged = _rechain_unkeyed([json.dumps(first), *lines[1:]])
    assert verify_chain_of(forged, tmp_path) == []  # on its own, the old prefix would pass
    log.path.write_text("\n".join([*forged, keyed]) + "\n", encoding="utf-8")
    assert any("line 4: does not follow line 3" in p for p in verify_chain(log.path))


def verify_chain_of(lines: list[str], tmp_path: Path) -> list[str]:
    path = tmp_path / "alone.audit.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return verify_chain(path)


def test_an_unkeyed_entry_after_keyed_ones_is_a_problem(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 2)
    lines = log.path.read_text(encoding="utf-8").splitlines()
    tail = _rechain_unkeyed(lines)[1]
    log.path.write_text("\n".join([lines[0], tail]) + "\n", encoding="utf-8")
    assert any("line 2: unkeyed after keyed entries" in p for p in verify_chain(log.path))


def _append_many(path: str, start: int) -> None:
    log = AuditLog(Path(path))
    for i in range(start, start + 15):
        log.append("received", run_id=i, task="evaluate", app_hash="h")


def test_concurrent_writers_share_one_key_and_one_chain(tmp_path: Path) -> None:
    """Two ClientApp processes appending at once (the first time: both find no key)."""
    path = tmp_path / "hospital-b.audit.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), s)) for s in (0, 100)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    report = verify_log(path)
    assert report.intact and report.entries == 30 and report.chain == "keyed", report.problems


# ---------------------------------------------------------------- the command
def _cli() -> typer.Typer:
    from client.site_ops_cli import register

    app = typer.Typer()
    register(app)
    app.callback()(lambda: None)  # keep "audit" a subcommand
    return app


def test_site_audit_reports_the_chain_and_exports_and_checks_an_anchor(tmp_path: Path) -> None:
    app = _cli()
    site = tmp_path / "hospital-b"
    log = _log_with(tmp_path, 3)
    out = CliRunner().invoke(app, ["audit", str(site)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert (
        "keyed (HMAC-SHA256" in out.stdout and "3 entries" in out.stdout and "hash chain intact" in out.stdout
    )
    assert "no anchor kept elsewhere was checked" in out.stdout

    kept = tmp_path / "elsewhere" / "anchor.json"
    kept.parent.mkdir()
    out = CliRunner().invoke(app, ["audit", str(site), "--export-anchor", str(kept)])
    assert out.exit_code == 0, out.output
    assert json.loads(kept.read_text())["entries"] == 3
    printed = CliRunner().invoke(app, ["audit", str(site), "--export-anchor", "-"])
    assert (
        printed.exit_code == 0 and json.loads(printed.stdout)["last"] == json.loads(kept.read_text())["last"]
    )

    log.append("sent", run_id=7, task="evaluate", app_hash="h", payload={"n_used": 30})
    out = CliRunner().invoke(app, ["audit", str(site), "--anchor", str(kept)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "entry 3" in out.stdout and "matches" in out.stdout

    lines = log.path.read_text(encoding="utf-8").splitlines()
    log.path.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    out = CliRunner().invoke(app, ["audit", str(site), "--anchor", str(kept)], env={"COLUMNS": "200"})
    assert out.exit_code == 1
    assert "the log ends before entry 3 the anchor saw" in out.stdout
    as_json = CliRunner().invoke(app, ["audit", str(site), "--json", "--anchor", str(kept)])
    assert as_json.exit_code == 1
    verification = json.loads(as_json.stdout.splitlines()[-1])["verification"]
    assert verification["intact"] is False and verification["chain"] == "keyed"
    assert [a["entries"] for a in verification["anchors"]] == [4, 3]
    refused = CliRunner().invoke(app, ["audit", str(site), "--export-anchor", str(tmp_path / "new.json")])
    assert refused.exit_code == 1 and not (tmp_path / "new.json").exists()  # never bless a cut log


def test_site_audit_help_says_why_to_keep_the_anchor_elsewhere() -> None:
    out = CliRunner().invoke(_cli(), ["audit", "--help"], env={"COLUMNS": "120"})
    assert out.exit_code == 0
    text = " ".join(out.stdout.split())
    assert "--export-anchor" in text and "--anchor" in text
    assert "delete the log, its key and its anchor together" in text and "kept elsewhere" in text


def test_site_audit_says_an_old_log_is_unkeyed(tmp_path: Path) -> None:
    _legacy_log(audit_path(tmp_path / "hospital-b"), 2)
    out = CliRunner().invoke(
        _cli(), ["audit", str(tmp_path / "hospital-b"), "--verify"], env={"COLUMNS": "200"}
    )
    assert out.exit_code == 0, out.output
    assert "unkeyed (written by an older sarcofed)" in out.stdout
    exported = CliRunner().invoke(_cli(), ["audit", str(tmp_path / "hospital-b"), "--export-anchor", "-"])
    assert exported.exit_code == 1 and "no anchor to export" in exported.output
