"""Faults on Flower's deployment engine (a real SuperLink with TLS + SuperNode auth and
real SuperNodes on 127.0.0.1) leave a complete, honest study record.

1. One site is genuinely slower than the round timeout (its CT slices are 1024 px and it
   lists over a thousand rows, the fast sites six 64-px slices): the report names it with
   status ``timeout`` and the reason, and keeps the fast sites' results.
2. The SuperLink restarts in the middle of a training study: the interrupted run ends
   ``finished:failed`` (never completed), the SuperNodes stay up, and ``flwr run`` with the
   same run name and ``study.resume = true`` continues from the last checkpoint's round
   and weights to the last round; every round is recorded once.

(One quick test besides: a resume fills in a round that a stop between writing the
checkpoint and writing rounds.jsonl left out of rounds.jsonl.)
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from deploy_harness import CONNECTION, deployment

from client.audit import audit_path, read_audit
from protocols.report import RoundRecord
from server.deploy import run_logs

SIZE = 64
ENCODER = "tu-mobilenetv3_small_050"

#: The validation round's timeout. A fast site needs a fresh ClientApp process (~4-8 s
#: to import torch, more on a loaded machine) and under a second to score six 64-px
#: slices, so it has a wide margin; the slow site needs several times this.
ROUND_TIMEOUT_S = 90.0
#: The slow site: SLOW_SLICES distinct 1024-px slices, each listed SLOW_REPEAT times in its
#: manifest (~0.6 s per row unloaded, ~12 min in all: > 8x the round timeout, so even a
#: CI machine several times faster than this one cannot finish in time). The test itself
#: does not wait for it: the study ends at the timeout and the SuperNode is stopped.
SLOW_SLICES = 8
SLOW_REPEAT = 150


def site_name(site_dir: Path) -> str:
    return str(tomllib.loads((site_dir / "site.toml").read_text(encoding="utf-8"))["name"])


def make_slow_site(site_dir: Path) -> Path:
    """A demo site with large slices and many rows: genuinely slow to validate.

    Each repeat lists hard links under ``copies/<k>/``: a row listing an image listed above
    is a ``duplicate_row`` and is never loaded, so plain repeated rows would make it fast.
    """
    from common.demo.hospitals import make_site, site_profile

    make_site(site_dir, site_profile(2), slices=SLOW_SLICES, size=1024, seed=2, site_tag="2")
    manifest = site_dir / "manifest.csv"
    header, *rows = manifest.read_text(encoding="utf-8").splitlines()
    columns = header.split(",")
    files = [c for c in ("image", "label", "reference") if c in columns]
    listed = []
    for k in range(SLOW_REPEAT):
        for row in rows:
            cells = dict(zip(columns, row.split(","), strict=True))
            for column in files:
                if cells[column]:
                    copy = Path("copies") / str(k) / cells[column]
                    (site_dir / copy).parent.mkdir(parents=True, exist_ok=True)
                    os.link(site_dir / cells[column], site_dir / copy)
                    cells[column] = copy.as_posix()
            cells["group"] = f"{cells['group']}-{k}"
            listed.append(",".join(cells[c] for c in columns))
    manifest.write_text("\n".join([header, *listed]) + "\n", encoding="utf-8")
    return site_dir


@pytest.mark.slow
def test_a_site_slower_than_the_round_timeout_is_named_and_the_fast_sites_are_kept(
    tmp_path: Path,
) -> None:
    from common.demo.hospitals import make_site, site_profile
    from common.model import ModelSpec, build_model, save_model

    fast = [
        make_site(tmp_path / f"site-{i}", site_profile(i), slices=6, size=SIZE, seed=i, site_tag=str(i))
        for i in range(2)
    ]
    slow = make_slow_site(tmp_path / "site-slow")
    spec = ModelSpec(encoder=ENCODER, image_size=SIZE)
    model = save_model(tmp_path / "model.pt", build_model(spec), spec)
    with deployment(tmp_path / "deploy") as dep:
        nodes = [dep.add_site(site) for site in [*fast, slow]]
        config = {
            "study.mode": "evaluate",
            "study.model": str(model),
            "study.min-sites": 3,
            "study.round-timeout": ROUND_TIMEOUT_S,
            "study.output-dir": str(dep.root / "studies"),
            "study.run-name": "one-slow-site",
            "model.encoder": ENCODER,
            "model.image-size": SIZE,
            "eval.batch-size": 6,
        }
        started = time.monotonic()
        status = dep.run(config, timeout=600)
        seconds = time.monotonic() - started
        assert status.ok, status  # a late site does not fail the study
        assert seconds > ROUND_TIMEOUT_S  # the coordinator waited the full round for it
        assert all(p.popen.poll() is None for p in nodes), "a SuperNode died"

        run_dir = dep.root / "studies" / "one-slow-site"
        sites = {s["site"]: s for s in json.loads((run_dir / "report.json").read_text())["sites"]}
        assert sorted(sites) == sorted(site_name(s) for s in [*fast, slow]), sites.keys()
        late = sites[site_name(slow)]
        assert late["status"] == "timeout", late
        assert "round-timeout" in late["reason"] and f"{ROUND_TIMEOUT_S:.0f} s" in late["reason"], late
        assert late.get("payload") is None
        for site in fast:  # the fast sites' results are kept in full
            result = sites[site_name(site)]
            assert result["status"] == "ok", result
            assert result["payload"]["n_used"] == 6, result
        report_md = (run_dir / "report.md").read_text(encoding="utf-8")
        late_row = next(line for line in report_md.splitlines() if line.startswith(f"| {site_name(slow)} |"))
        assert "| timeout |" in late_row and late["reason"] in late_row, late_row
        # it was slow, not unreachable: the site received the instruction and was working on it
        audit = [e for e in read_audit(audit_path(slow)) if e.run_id == status.run_id]
        assert ("received", "evaluate") in [(e.event, e.task) for e in audit], audit
        print(f"slow-site study: {seconds:.0f} s; {late['site']}: {late['status']} ({late['reason']})")


# ---------------------------------------------------------------- SuperLink restart + resume
NUM_ROUNDS = 4


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """rounds.jsonl as written so far (a line still being written is left for the next poll)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def records(rounds: list[dict[str, Any]]) -> list[RoundRecord]:
    """rounds.jsonl lines as the RoundRecords the checkpoint holds."""
    return [RoundRecord.model_validate(r) for r in rounds]


def wait_for_round(path: Path, at_least: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rounds = read_rounds(path)
        if any(r.get("status") == "ok" and r["round"] >= at_least for r in rounds):
            return rounds
        if any(r.get("status") == "failed" for r in rounds):
            raise AssertionError(f"{path}: a round failed: {rounds}")
        time.sleep(0.2)
    raise TimeoutError(f"{path}: no round >= {at_least} done after {timeout:.0f} s: {read_rounds(path)}")


def test_resume_records_a_round_the_checkpoint_has_but_rounds_jsonl_lacks(tmp_path: Path) -> None:
    from server.training import _record_missing_rounds

    history = [
        RoundRecord(round=1, status="ok", weights_hash="a"),
        RoundRecord(round=2, status="ok", weights_hash="b"),
    ]
    rounds_file = tmp_path / "rounds.jsonl"
    rounds_file.write_text(history[0].model_dump_json() + "\n", encoding="utf-8")  # stopped before round 2
    _record_missing_rounds(rounds_file, history)
    assert records(read_rounds(rounds_file)) == history
    _record_missing_rounds(rounds_file, history)  # a second resume writes nothing twice
    assert records(read_rounds(rounds_file)) == history
    _record_missing_rounds(tmp_path / "fresh.jsonl", [])
    assert not (tmp_path / "fresh.jsonl").exists()


@pytest.mark.slow
def test_training_resumes_from_its_checkpoint_after_the_superlink_restarts(tmp_path: Path) -> None:
    from common.demo.hospitals import make_site, site_profile
    from common.model import weights_hash
    from server.checkpoint import load_checkpoint

    sites = [
        make_site(tmp_path / f"site-{i}", site_profile(i), slices=10, size=SIZE, seed=i, site_tag=str(i))
        for i in range(2)
    ]
    with deployment(tmp_path / "deploy") as dep:
        nodes = [dep.add_site(site) for site in sites]
        run_dir = dep.root / "studies" / "resumable"
        config: dict[str, object] = {
            "study.mode": "train",
            "study.num-rounds": NUM_ROUNDS,
            "study.min-sites": 2,
            "study.round-timeout": 180.0,
            "study.output-dir": str(dep.root / "studies"),
            "study.run-name": "resumable",
            "model.encoder": ENCODER,
            "model.image-size": SIZE,
            "train.local-epochs": 1,
            # 8 of each site's 10 slices train (a 0.35 / 0.2 split leaves site-0 with 3,
            # below the demo policy's min-slices): this test is about resuming, not validation
            "train.val-fraction": 0.2,
            "train.test-fraction": 0.0,
            "study.exclude-from-training": "",  # both sites train (the demo config excludes site-1's profile)
        }
        started = time.monotonic()
        run_id = dep.start(config)
        wait_for_round(run_dir / "rounds.jsonl", at_least=1, timeout=400)
        dep.restart_superlink()  # stops it (and its ServerApp) by pid; same port, same database
        restarted = time.monotonic()

        interrupted = dep.wait(run_id, timeout=180)
        assert interrupted.status == "finished:failed", interrupted  # never reported as completed
        before = read_rounds(run_dir / "rounds.jsonl")
        checkpoint = load_checkpoint(run_dir)
        done = checkpoint.completed_round
        print(f"interrupted after round {done} ({restarted - started:.0f} s after flwr run)")
        assert 1 <= done < NUM_ROUNDS, done
        # what was already received is on disk, once per round, and agrees with the checkpoint
        assert [r["round"] for r in before] == list(range(1, done + 1)), before
        assert {r["status"] for r in before} == {"ok"}, before
        assert checkpoint.history == records(before)
        assert weights_hash(checkpoint.state_dict) == before[-1]["weights_hash"]
        assert all(p.popen.poll() is None for p in nodes), "a SuperNode gave up during the restart"

        resumed = dep.run(config | {"study.resume": True}, timeout=600)
        assert resumed.ok, (resumed, {p.name: p.text()[-4000:] for p in nodes})  # the SuperNodes' view
        finished = time.monotonic()
        rounds = read_rounds(run_dir / "rounds.jsonl")
        assert [r["round"] for r in rounds] == list(range(1, NUM_ROUNDS + 1)), rounds
        assert {r["status"] for r in rounds} == {"ok"}, rounds
        assert rounds[:done] == before  # nothing already recorded was lost or rewritten
        first_new = rounds[done]
        assert first_new["round"] == done + 1
        # the resumed run started from the checkpoint's weights (its own log says so) and trained on
        resumed_from = weights_hash(checkpoint.state_dict)
        server_log = run_logs(resumed.run_id, CONNECTION, flwr_home=dep.flwr_home)
        assert f"after round {done} from weights {resumed_from}" in server_log, server_log[-3000:]
        assert len({r["weights_hash"] for r in rounds}) == NUM_ROUNDS
        for record in rounds:
            assert sorted(record["sites_replied"]) == sorted(site_name(s) for s in sites), record
            assert record["sites_failed"] == {}, record
        final = load_checkpoint(run_dir)
        assert final.completed_round == NUM_ROUNDS and final.history == records(rounds)
        assert weights_hash(final.state_dict) == rounds[-1]["weights_hash"]
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        assert [r["round"] for r in report["training"]] == list(range(1, NUM_ROUNDS + 1))
        # every round started from the weights the previous round produced, across the resume too
        for previous, record in pairwise(report["training"]):
            assert record["start_weights_hash"] == previous["weights_hash"], (previous, record)
        assert all(p.popen.poll() is None for p in nodes)
        assert dep.coordinator_log is not None
        ends = [
            (e["run_id"], e["status"]) for e in dep.coordinator_log.entries() if e["event"] == "run-finished"
        ]
        assert ends == [(run_id, "finished:failed"), (resumed.run_id, "finished:completed")], ends
        print(f"resumed run: {finished - restarted:.0f} s after the restart")
