"""bench/bench_deployment.py: the log parsing that its phase table rests on (times nothing)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_deployment import _signed, audit_times, supernode_messages, timing_phases


def _t(clock: str) -> float:
    return datetime.strptime(f"2026-01-01 {clock}", "%Y-%m-%d %H:%M:%S,%f").timestamp()


SUPERNODE_LOG = "\n".join(
    [
        "\x1b[92mINFO 2026-01-01 10:00:01,000\x1b[0m:      Receiving: query message (ID: a)",
        "\x1b[92mINFO 2026-01-01 10:00:01,100\x1b[0m:      Received successfully",
        "\x1b[92mINFO 2026-01-01 10:00:02,000\x1b[0m:      Start `flwr-clientapp` process",
        "\x1b[94mDEBUG 2026-01-01 10:00:02,050\x1b[0m:     Loading ClientApp `client.app:app`",
        'INFO:     127.0.0.1:1 - "POST /v1/runtime/push-messages HTTP/1.1" 200 OK',
        "\x1b[92mINFO 2026-01-01 10:00:05,000\x1b[0m:      Sent successfully",
        "\x1b[92mINFO 2026-01-01 10:00:09,000\x1b[0m:      Receiving: evaluate message (ID: b)",
        "\x1b[92mINFO 2026-01-01 10:00:10,500\x1b[0m:      Received successfully",
    ]
)


def test_supernode_messages_split_by_receiving_and_keep_first_event_times() -> None:
    msgs = supernode_messages(SUPERNODE_LOG, _t("10:00:00,000"), _t("10:00:20,000"))
    assert [m.kind for m in msgs] == ["query", "evaluate"]
    query, evaluate = msgs
    assert query.received == _t("10:00:01,100") and query.process == _t("10:00:02,000")
    assert query.loading == _t("10:00:02,050") and query.sent == _t("10:00:05,000")
    assert evaluate.received == _t("10:00:10,500") and evaluate.sent is None
    # a window that starts after the query keeps only the evaluate message
    assert [m.kind for m in supernode_messages(SUPERNODE_LOG, _t("10:00:08,000"), 1e12)] == ["evaluate"]


def test_timing_phases_read_batched_serverapp_log_rows() -> None:
    row = (
        "\x1b[92mINFO 2026-01-01 10:00:03,000\x1b[0m:      "
        "timing: main started 2026-01-01T10:00:02.500+00:00\n"
        "\x1b[92mINFO 2026-01-01 10:00:09,000\x1b[0m:      timing: identify started "
        "2026-01-01T10:00:03.000+00:00, 6.000 s\n"
    )
    phases = timing_phases([row, "unrelated"])
    assert phases["identify"][1] == 6.0
    assert phases["identify"][0] - phases["main"][0] == 0.5


def test_audit_times_keep_only_the_run_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "site.audit.jsonl"
    entries = [
        {"time": "2026-01-01T10:00:00.000+00:00", "event": "received", "task": "evaluate", "run_id": 1},
        {"time": "2026-01-01T10:00:02.000+00:00", "event": "sent", "task": "evaluate", "run_id": 1},
        {"time": "2026-01-01T10:01:00.000+00:00", "event": "received", "task": "evaluate", "run_id": 2},
    ]
    path.write_text("\n".join(json.dumps(e) for e in entries), encoding="utf-8")
    times = audit_times(path, 1)
    assert times["evaluate"]["sent"] - times["evaluate"]["received"] == 2.0
    assert _signed(2**64 - 1) == -1 and _signed(5) == 5
