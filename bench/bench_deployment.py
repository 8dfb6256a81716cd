"""Bench: a validation study on Flower's deployment engine vs the same evaluation run locally.

Starts a real SuperLink (TLS + SuperNode auth) and one SuperNode per demo site on
127.0.0.1 (tests/deploy_harness.py), runs the validation study ``--runs`` times with
``flwr run`` (the first run also installs the app bundle at every site), and times every
phase of the last (warm) run from the records the processes keep anyway:

- the SuperLink's database (``superlink.db``): the ServerApp task's pending / running /
  finished times and the ServerApp's own log lines (``timing: <phase> started <t>, <s> s``,
  written by ``server.app``);
- each SuperNode's log (``FLWR_LOG_LEVEL=DEBUG`` adds millisecond timestamps): message
  received from the SuperLink, ``flwr-clientapp`` process start, app loading, reply sent;
- each site's audit log: ``received`` (the ClientApp's handler starts, after its imports)
  and ``sent`` (the guarded reply leaves the handler);
- the study folder's file times.

Local arm: the same sites one after another in this process, each as a site does it
(``site_tasks.load_state`` from the packed weights, then ``site_tasks.run_evaluate`` from
reading its files to the payload). Ratios: warm study / local, evaluation round / local.

    python bench/bench_deployment.py                                   # 3 x 12 slices, 128 px, resnet18
    python bench/bench_deployment.py --size 512 --encoder resnet34 --slices 24
    python bench/bench_deployment.py --server-from f7cf63a             # ServerApp code of a past commit
    python bench/bench_deployment.py --client-patch bench/deployment_client_lazy_imports.patch
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _util import print_table, set_threads

REPO = Path(__file__).resolve().parent.parent
#: The coordinator code ``--server-from`` takes from a past commit (into the app snapshot only): files,
#: and folders taken whole. The report was one module before it became a package: both are listed,
#: and whichever the commit has replaces the snapshot's.
SERVER_PATHS = (
    "server/app.py",
    "server/validation.py",
    "server/messaging.py",
    "server/report.py",
    "server/report",
    "server/figures.py",
    "common/pooling.py",
)
_FLWR_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_TIMING = re.compile(r"timing: (?P<phase>[\w-]+) started (?P<start>\S+?)(?:, (?P<seconds>[\d.]+) s)?$")


# ------------------------------------------------------------------ parsing (pure)
def flwr_time(line: str) -> float | None:
    """Epoch seconds of a Flower log line with timestamps (local time, ``FLWR_LOG_LEVEL=DEBUG``)."""
    match = _FLWR_TIME.search(line)
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def iso_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def timing_phases(lines: Iterable[str]) -> dict[str, tuple[float, float]]:
    """``phase -> (start, seconds)`` from the ServerApp's ``timing:`` log lines."""
    out: dict[str, tuple[float, float]] = {}
    for line in lines:
        for part in line.splitlines():
            match = _TIMING.search(part.strip())
            if match:
                out[match["phase"]] = (iso_time(match["start"]), float(match["seconds"] or 0.0))
    return out


@dataclass
class SiteMessage:
    """One instruction as one SuperNode handled it (epoch seconds; None when not logged)."""

    kind: str  #: Flower message type: query, evaluate, train
    receiving: float
    received: float | None = None  #: all of the message's objects pulled from the SuperLink
    process: float | None = None  #: the ``flwr-clientapp`` process is up (Flower imported)
    loading: float | None = None  #: it starts loading ``client.app:app``
    finished: float | None = None  #: the ClientApp process finished its task
    sent: float | None = None  #: the reply is at the SuperLink


_EVENTS = (
    ("received", "Received successfully"),
    ("process", "Start `flwr-clientapp` process"),
    ("loading", "Loading ClientApp"),
    ("finished", "Finished task"),
    ("sent", "Sent successfully"),
)


def supernode_messages(text: str, start: float, end: float) -> list[SiteMessage]:
    """The messages a SuperNode log shows between ``start`` and ``end`` (epoch seconds)."""
    out: list[SiteMessage] = []
    last: float | None = None
    for line in text.splitlines():
        when = flwr_time(line) or last
        last = when
        if when is None or not (start <= when <= end):
            continue
        if match := re.search(r"Receiving: (\w+) message", line):
            out.append(SiteMessage(kind=match.group(1), receiving=when))
            continue
        if not out:
            continue
        for attr, needle in _EVENTS:
            if needle in line and getattr(out[-1], attr) is None:
                setattr(out[-1], attr, when)
    return out


def audit_times(path: Path, run_id: int) -> dict[str, dict[str, float]]:
    """``task -> {received, sent | refused}`` times of one run from a site's audit log."""
    out: dict[str, dict[str, float]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if int(entry.get("run_id", -1)) == run_id:
            out.setdefault(entry["task"], {})[entry["event"]] = iso_time(entry["time"])
    return out


# ------------------------------------------------------------------ the SuperLink's records
def _signed(run_id: int) -> int:
    """The SuperLink stores uint64 ids in signed BIGINT columns."""
    return run_id - 2**64 if run_id >= 2**63 else run_id


def _db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)


@dataclass
class TaskTimes:
    pending: float
    running: float | None
    finished: float | None
    logs: list[str] = field(default_factory=list)


def serverapp_task(db: Path, run_id: int) -> TaskTimes | None:
    with _db(db) as conn:
        row = conn.execute(
            "SELECT task_id, pending_at, running_at, finished_at FROM task "
            "WHERE run_id = ? AND type = 'flwr-serverapp'",
            (_signed(run_id),),
        ).fetchone()
        if row is None:
            return None
        logs = [
            r[0]
            for r in conn.execute("SELECT log FROM task_logs WHERE task_id = ? ORDER BY timestamp", (row[0],))
        ]

    def t(value: str | None) -> float | None:
        return iso_time(value) if value else None

    return TaskTimes(t(row[1]) or 0.0, t(row[2]), t(row[3]), logs)


def wait_finished(db: Path, run_id: int, timeout: float) -> TaskTimes:
    """Poll the SuperLink's own record (a cheap read; ``flwr ls`` costs a CLI start each time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = serverapp_task(db, run_id)
        if task is not None and task.finished is not None:
            return task
        time.sleep(0.2)
    raise SystemExit(f"run {run_id} not finished after {timeout:.0f} s")


def wait_connected(log: Path, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count('"POST /v1/fleet/activate-node HTTP/1.1" 200') >= n:
            return
        time.sleep(0.1)
    raise SystemExit(f"{n} SuperNodes not connected after {timeout:.0f} s")


def take_server_code(rev: str, app_dir: Path) -> None:
    """Replace the snapshot's coordinator code (``SERVER_PATHS``) with the code of commit ``rev``."""
    listed = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "--", *SERVER_PATHS],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in SERVER_PATHS:
        target = app_dir / rel
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for rel in listed:
        text = subprocess.run(
            ["git", "show", f"{rev}:{rel}"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        (app_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (app_dir / rel).write_text(text, encoding="utf-8")


# ------------------------------------------------------------------ one run
@dataclass
class RunTimes:
    run_id: int
    submit: float
    task: TaskTimes
    status_known: float
    status: str
    phases: dict[str, tuple[float, float]]
    sites: dict[str, list[SiteMessage]]
    audit: dict[str, dict[str, dict[str, float]]]
    report_files: dict[str, float]

    @property
    def wall(self) -> float:
        """flwr run submitted -> ServerApp finished (the SuperLink's record)."""
        return (self.task.finished or self.status_known) - self.submit


def run_once(dep, config: dict[str, object], name: str, timeout: float) -> RunTimes:
    from server.deploy import run_status, start_run

    submit = time.time()
    run_id = start_run(dep.app_dir, "study", config | {"study.run-name": name}, flwr_home=dep.flwr_home)
    task = wait_finished(dep.root / "superlink.db", run_id, timeout)
    status = run_status(run_id, "study", flwr_home=dep.flwr_home)
    status_known = time.time()
    if not status.ok:
        raise SystemExit(f"run {name} ended {status.status}: {status.details}")
    end = (task.finished or status_known) + 1.0
    sites: dict[str, list[SiteMessage]] = {}
    audit: dict[str, dict[str, dict[str, float]]] = {}
    for proc_name, proc in dep.procs.items():
        if proc_name.startswith("supernode-"):
            site = proc_name.removeprefix("supernode-")
            sites[site] = supernode_messages(proc.text(), submit, end)
            audit[site] = audit_times(dep.sites[site].with_name(site + ".audit.jsonl"), run_id)
    run_dir = Path(str(config["study.output-dir"])) / name
    files = {p.name: p.stat().st_mtime for p in run_dir.iterdir()} if run_dir.exists() else {}
    return RunTimes(
        run_id, submit, task, status_known, status.status, timing_phases(task.logs), sites, audit, files
    )


# ------------------------------------------------------------------ tables
def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def breakdown(run: RunTimes) -> list[list[str]]:
    """Timeline rows: phase, start (s after submit), seconds."""
    t0 = run.submit
    rows: list[list[str]] = []

    def add(label: str, start: float | None, seconds: float | None) -> None:
        rows.append([label, _s(None if start is None else start - t0), _s(seconds)])

    task, ph = run.task, run.phases
    main = ph.get("main", (None, 0.0))[0]
    add("flwr run CLI -> run queued at the SuperLink", t0, task.pending - t0)
    add(
        "queued -> ServerApp process running (SuperExec poll, flwr-serverapp start)",
        task.pending,
        _span(task.pending, task.running),
    )
    add("ServerApp: import our app, start main()", task.running, _span(task.running, main))
    for phase, label in (
        ("wait-for-sites", "ServerApp: wait for sites (+ grace)"),
        ("identify", "identify round (query)"),
        ("load-model", "  (background) load study model"),
        ("report-imports", "  (background) import pandas/matplotlib"),
        ("evaluate-round", "evaluate round (model out, payloads back)"),
        ("report", "report: json, csv, figures, md, html"),
    ):
        if phase in ph:
            add(label, ph[phase][0], ph[phase][1])
    report_end = ph["report"][0] + ph["report"][1] if "report" in ph else run.report_files.get("report.html")
    add("ServerApp exit (log flush, task finished)", report_end, _span(report_end, task.finished))
    add("final status known (flwr ls)", task.finished, _span(task.finished, run.status_known))
    add("WHOLE STUDY: submit -> ServerApp finished", t0, run.wall)
    return rows


def site_rows(run: RunTimes, kind: str, task: str, round_start: float | None) -> list[list[str]]:
    """Per-site split of one round (seconds)."""
    header_sites = sorted(run.sites)
    labels = [
        ("pick-up: round start -> SuperNode pulls the message", lambda m, a: _span(round_start, m.receiving)),
        ("message objects pulled from the SuperLink", lambda m, a: _span(m.receiving, m.received)),
        ("SuperExec launch + flwr-clientapp process up", lambda m, a: _span(m.received, m.process)),
        ("ClientApp: import client.app (torch, smp...)", lambda m, a: _span(m.loading, a.get("received"))),
        (
            "handler: guard, unpack, evaluate, payload",
            lambda m, a: _span(a.get("received"), a.get("sent") or a.get("refused")),
        ),
        ("handler -> reply at the SuperLink", lambda m, a: _span(a.get("sent") or a.get("refused"), m.sent)),
        ("pick-up -> reply at the SuperLink", lambda m, a: _span(m.receiving, m.sent)),
    ]
    rows = []
    for label, fn in labels:
        row = [label]
        for site in header_sites:
            msgs = [m for m in run.sites[site] if m.kind == kind]
            msg = msgs[-1] if msgs else None
            row.append(_s(fn(msg, run.audit[site].get(task, {})) if msg else None))
        rows.append(row)
    return rows


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local arm")
    parser.add_argument("--runs", type=int, default=2, help="studies in a row (the first installs the app)")
    parser.add_argument("--server-from", metavar="REV", help="take the ServerApp files from this commit")
    parser.add_argument("--client-patch", type=Path, help="apply this patch to the app snapshot (-p1)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, databases)")
    args = parser.parse_args()
    set_threads(args.threads)
    os.environ.setdefault("FLWR_LOG_LEVEL", "DEBUG")  # millisecond timestamps in every Flower log

    from deploy_harness import deployment

    from client import site_tasks
    from common.dataset import load_site
    from common.demo.hospitals import make_site, site_profile
    from common.model import ModelSpec, build_model, pack_state, save_model
    from protocols.study import StudyConfig

    root = Path(tempfile.mkdtemp(prefix="sarcofed-bench-deploy-"))
    sites = [
        make_site(
            root / "sites" / f"site-{i}",
            site_profile(i),
            slices=args.slices,
            size=args.size,
            seed=i,
            site_tag=str(i),
        )
        for i in range(args.sites)
    ]
    spec = ModelSpec(encoder=args.encoder, image_size=args.size)
    model = build_model(spec)
    model_path = save_model(root / "model.pt", model, spec)
    packed, layout = pack_state(model.state_dict())

    common_config: dict[str, object] = {
        "model.encoder": args.encoder,
        "model.image-size": args.size,
        "eval.batch-size": args.batch_size,
    }
    study = StudyConfig.from_run_config(common_config)  # type: ignore[arg-type]

    local_unpack: dict[str, float] = {}
    local_eval: dict[str, float] = {}
    start = time.perf_counter()
    for site in sites:
        t0 = time.perf_counter()
        site_model = site_tasks.load_state(spec, packed, layout)
        t1 = time.perf_counter()
        site_tasks.run_evaluate(load_site(site), site_model, spec, study)
        local_unpack[site.name], local_eval[site.name] = t1 - t0, time.perf_counter() - t1
    local = time.perf_counter() - start
    load_local = os.getloadavg()[0]

    runs: list[RunTimes] = []
    t_start = time.perf_counter()
    try:
        with deployment(root / "deploy") as dep:
            dep.sites = {s.name: s for s in sites}  # type: ignore[attr-defined]
            if args.server_from:
                take_server_code(args.server_from, dep.app_dir)
            if args.client_patch:
                subprocess.run(
                    ["patch", "-p1", "-s", "-d", str(dep.app_dir), "-i", str(args.client_patch.resolve())],
                    check=True,
                )
            for site in sites:
                dep.add_site(site)
            wait_connected(dep.procs["superlink"].log, args.sites)
            startup = time.perf_counter() - t_start
            config = common_config | {
                "study.mode": "evaluate",
                "study.model": str(model_path),
                "study.min-sites": args.sites,
                "study.output-dir": str(dep.root / "studies"),
            }
            for n in range(args.runs):
                runs.append(run_once(dep, config, f"bench-{n}", timeout=3600))
            load_runs = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    warm = runs[-1]
    print(
        f"\n{args.sites} sites x {args.slices} slices, {args.size} px, {args.encoder}, "
        f"eval batch {args.batch_size}; "
        f"local arm {args.threads} torch thread(s); server files: {args.server_from or 'working tree'}; "
        f"client patch: {args.client_patch or 'none'}"
    )
    print(f"load average: {load_local:.1f} after the local arm, {load_runs:.1f} after the runs")
    print(f"work folder: {root}{'' if args.keep else ' (removed; --keep to keep)'}\n")
    print(f"Warm run {len(runs)} (run id {warm.run_id}), seconds:")
    print_table(["phase", "start", "seconds"], breakdown(warm))
    for kind, task, phase in (("query", "identify", "identify"), ("evaluate", "evaluate", "evaluate-round")):
        round_start = warm.phases.get(phase, (None, 0.0))[0]
        print(f"\n{task} round per site, seconds:")
        print_table(["", *sorted(warm.sites)], site_rows(warm, kind, task, round_start))

    eval_round = warm.phases.get("evaluate-round", (None, None))[1]
    last_reply = max(
        (m.sent for msgs in warm.sites.values() for m in msgs if m.kind == "evaluate" and m.sent),
        default=None,
    )
    sent_to_last = _span(warm.phases.get("evaluate-round", (None, 0.0))[0], last_reply)
    print("\nLocal arm (per site: unpack weights + run_evaluate), seconds:")
    print_table(
        ["site", "unpack", "run_evaluate"],
        [[s, f"{local_unpack[s]:.2f}", f"{local_eval[s]:.2f}"] for s in sorted(local_unpack)],
    )
    rows = [
        ["start-up: SuperLink up, keys registered, SuperNodes connected", f"{startup:.1f}"],
        *[
            [
                f"run {i + 1}{' (installs the app bundle)' if i == 0 else ''}: submit -> finished",
                f"{r.wall:.1f}",
            ]
            for i, r in enumerate(runs)
        ],
    ]
    if len(runs) > 1:
        rows.append(["first-run app install (run 1 - warm run)", f"{runs[0].wall - warm.wall:.1f}"])
    rows += [
        ["warm run, incl. final status by flwr ls", f"{warm.status_known - warm.submit:.1f}"],
        ["local evaluation, sites one after another", f"{local:.1f}"],
        ["fixed overhead (warm run - local)", f"{warm.wall - local:.1f}"],
        ["RATIO warm study / local (goal <= 1.15)", f"{warm.wall / local:.2f}"],
    ]
    if eval_round is not None:
        rows.append(["evaluate round as the ServerApp sees it", f"{eval_round:.1f}"])
        rows.append(["RATIO evaluate round / local", f"{eval_round / local:.2f}"])
    if sent_to_last is not None:
        rows.append(["evaluate sent -> last reply at the SuperLink", f"{sent_to_last:.1f}"])
        rows.append(["RATIO evaluate sent -> last reply / local", f"{sent_to_last / local:.2f}"])
    print()
    print_table(["measure", "seconds"], rows)
    print(f"weights message: 1 packed float32 array, {packed.size:,} values, {packed.nbytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
