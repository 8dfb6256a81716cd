"""Federated vs centralised training on the demo federation, and the cost of coordinating it.

Three demo hospitals (``common.demo.hospitals.make_demo``), the same total epochs both ways:

- centralised: every site's *train* split (the grouped split each site uses in federated
  training, ``common.splits.split_site(site, study.train)`` per site, exactly as
  ``client.site_tasks.run_train``) pooled into one training set; one model trained with
  ``common.training.train_local`` for ``rounds x local-epochs`` epochs (the seed's recipe,
  same initial weights: ``torch.manual_seed(train.seed)`` then ``build_model``). Its muscle
  IoU pooled over pixels (sum of intersections / sum of unions, at model resolution) on
  every site's validation split.
- federated: the real study (``study.mode = "train"``) on Flower's simulation engine via
  ``flwr run`` (``server.flwr_cli.flwr_run``), with a private FLWR_HOME and local-SuperLink
  ports; the final round's ``pooled_val_iou.muscle`` from the run folder's ``rounds.jsonl``
  (the same pooling over the same validation slices).

Printed ratios (see bench/README.md for which one is the issue's goal):

- ``federated / centralised`` pooled validation muscle IoU (goal >= 0.99);
- per round: ``round wall time / slowest site's local training`` (goal <= 1.10; sites train
  in parallel only if the machine has a core budget for each), ``round / sum of the sites'
  training`` (the overhead when sites cannot run at once) and ``round / sum of the sites'
  whole ClientApp handling`` (from each site's audit log: received -> sent, so data loading
  and weight (un)packing are counted as site work, not as coordination).

    python bench/bench_federated.py                      # 128 px, 12 slices/site, 8 x 4 epochs
    python bench/bench_federated.py --client-cpus 1      # let two simulated sites train at once
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from client.audit import audit_path
from client.site_tasks import training_samples
from common.dataset import load_site
from common.demo.hospitals import make_demo
from common.model import build_model, model_from_state
from common.splits import split_site
from common.training import TrainConfig, evaluate_loss, train_local
from protocols import keys
from protocols.report import RoundRecord
from protocols.study import StudyConfig
from server.checkpoint import load_checkpoint
from server.deploy import flwr_env
from server.flwr_cli import flwr_run, local_superlink_pids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import print_table

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class RoundTiming:
    """One training round as ``server.training`` recorded it in ``rounds.jsonl``."""

    round: int
    seconds: float  #: round wall time at the coordinator (configure -> replies -> aggregated)
    site_seconds: dict[str, float]  #: each site's ``train_local`` time (training + validation)
    muscle_iou: float | None  #: pooled over pixels over every site's validation split

    @property
    def vs_slowest(self) -> float | None:
        return self.seconds / max(self.site_seconds.values()) if self.site_seconds else None

    @property
    def vs_sum(self) -> float | None:
        return self.seconds / sum(self.site_seconds.values()) if self.site_seconds else None


def parse_rounds(lines: Sequence[str]) -> list[RoundTiming]:
    """The ``status == "ok"`` rounds of a ``rounds.jsonl`` text, in order."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        record = RoundRecord.model_validate_json(line)
        if record.status != "ok":
            continue
        out.append(
            RoundTiming(
                round=record.round,
                seconds=float(record.seconds or 0.0),
                site_seconds={site: float(m[keys.SECONDS]) for site, m in record.per_site.items()},
                muscle_iou=record.pooled_val_iou.get("muscle"),
            )
        )
    return out


def pooled_iou(counts: Sequence[tuple[float, float]]) -> float | None:
    """Pooled over pixels: sum of intersections / sum of unions (None when every union is 0)."""
    union = sum(u for _, u in counts)
    return sum(i for i, _ in counts) / union if union else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


@dataclass(frozen=True)
class AuditSpan:
    """One instruction handled by a site's ClientApp, from its audit log (received -> sent)."""

    task: str
    received: datetime
    sent: datetime

    @property
    def seconds(self) -> float:
        return (self.sent - self.received).total_seconds()


def audit_spans(lines: Sequence[str], run_id: int, task: str) -> list[AuditSpan]:
    """Pair each ``received`` entry of ``run_id``/``task`` with the next ``sent`` one.

    A ``refused`` entry closes an instruction without a span (nothing was sent).
    """
    spans: list[AuditSpan] = []
    opened: datetime | None = None
    for line in lines:
        if not line.strip():
            continue
        entry = json.loads(line)
        if int(entry["run_id"]) != run_id or entry["task"] != task:
            continue
        when = datetime.fromisoformat(entry["time"])
        if entry["event"] == "received":
            opened = when
        elif entry["event"] == "sent" and opened is not None:
            spans.append(AuditSpan(task=task, received=opened, sent=when))
            opened = None
        elif entry["event"] == "refused":
            opened = None
    return spans


def busy_seconds(spans: Sequence[AuditSpan]) -> float:
    """Length of the union of the spans: time during which at least one site was working."""
    total, end = 0.0, None
    for span in sorted(spans, key=lambda s: s.received):
        if end is None or span.received >= end:
            total += span.seconds
            end = span.sent
        elif span.sent > end:
            total += (span.sent - end).total_seconds()
            end = span.sent
    return total


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- Flower sandbox


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of local SuperLinks started under ``flwr_home`` only (never other engineers')."""
    return local_superlink_pids(flwr_home)


@contextmanager
def flower_sandbox(work: Path) -> Iterator[dict[str, str]]:
    """Environment for ``flwr_run`` with a private FLWR_HOME and ports; stops its SuperLink after."""
    flwr_home = work / "flwr-home"
    env = flwr_env(
        extra={
            "FLWR_HOME": str(flwr_home),
            "SARCOFED_HOME": str(work / "sarcofed-home"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        }
    )
    try:
        yield env
    finally:
        for pid in superlink_pids(flwr_home):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@dataclass
class TimedLines:
    """``flwr_run``'s ``echo``: each streamed line with its arrival time (``time.monotonic``)."""

    show: bool = False
    lines: list[tuple[float, str]] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        self.lines.append((time.monotonic(), line))
        if self.show:
            print(f"  | {line}", flush=True)

    def first(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)


def federation_config(sites: int, client_cpus: int | None) -> dict[str, object]:
    config: dict[str, object] = {"num-supernodes": sites}
    if client_cpus is not None:
        config["client-resources-num-cpus"] = client_cpus
    return config


# --------------------------------------------------------------------------- the two arms


@dataclass(frozen=True)
class CentralisedResult:
    muscle_iou: float | None
    n_train: int
    n_val: int
    seconds: float


def splits(site_dirs: Sequence[Path], study: StudyConfig) -> tuple[list, list]:
    """Every site's train and validation samples, split exactly as ``run_train`` splits them."""
    train, val = [], []
    for site_dir in site_dirs:
        site = load_site(site_dir)
        split = split_site(site, study.train)
        train += training_samples(site, split.train)[0]
        val += training_samples(site, split.val)[0] if split.val else []
    return train, val


def centralised(site_dirs: Sequence[Path], study: StudyConfig) -> CentralisedResult:
    """Pool every site's train split, train once for rounds x local epochs, score pooled val."""
    train, val = splits(site_dirs, study)
    torch.manual_seed(study.train.seed)
    model = build_model(study.model)
    config = TrainConfig.from_study(
        study.train, local_epochs=study.study.num_rounds * study.train.local_epochs
    )
    result = train_local(model, study.model, train, val, config)
    return CentralisedResult(
        muscle_iou=pooled_iou([result.val_counts["muscle"]]),
        n_train=result.n_train,
        n_val=result.n_val,
        seconds=result.seconds,
    )


def global_model_iou(
    state_dict: dict[str, torch.Tensor], site_dirs: Sequence[Path], study: StudyConfig
) -> float | None:
    """Pooled validation muscle IoU of the federation's final aggregated weights.

    The model the study ships is the aggregate, not any site's locally trained copy, so this
    is the number to hold against the centralised model (same slices, same pooling).
    """
    _, val = splits(site_dirs, study)
    model = model_from_state(study.model, state_dict)
    _, _, counts = evaluate_loss(model, study.model, val, TrainConfig.from_study(study.train))
    return pooled_iou([counts["muscle"]])


def run_config(args: argparse.Namespace, demo_dir: Path, studies: Path) -> dict[str, object]:
    """The study's run config, every training key explicit (both arms read the same values)."""
    flat: dict[str, object] = {
        "study.mode": "train",
        "study.num-rounds": args.rounds,
        "study.min-sites": args.sites,
        "study.round-timeout": 1800.0,
        "study.output-dir": str(studies),
        "study.run-name": "bench-federated",
        "model.encoder": args.encoder,
        "model.image-size": args.size,
        "train.local-epochs": args.local_epochs,
        "train.val-fraction": args.val_fraction,
        # no held-out test patients: the measured numbers (bench/README.md) predate
        # train.test-fraction, and both arms train on every non-validation patient
        "train.test-fraction": 0.0,
        "train.seed": args.seed,
        "train.patience": args.rounds,  # never stop early: both arms train the same epochs
        "demo.dir": str(demo_dir),
        "demo.slices": args.slices,
        "demo.size": args.size,
    }
    study = StudyConfig.from_run_config(flat)  # type: ignore[arg-type]
    return flat | study.to_flat("train")


def add_simulation_args(parser: argparse.ArgumentParser) -> None:
    """Flags of every bench that runs a study on Flower's simulation engine."""
    parser.add_argument(
        "--client-cpus", type=int, default=None, help="Flower client-resources-num-cpus (default: Flower's 2)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and run folders here")
    parser.add_argument("--show-log", action="store_true", help="echo Flower's streamed log")


def main() -> None:
    doc = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=doc)
    parser.add_argument("--size", type=int, default=128, help="demo image size = model image size")
    parser.add_argument("--slices", type=int, default=12, help="slices per demo site")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=4)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the centralised arm")
    parser.add_argument(
        "--skip-central",
        action="store_true",
        help="time the federation only (e.g. the overhead at 512 px); no IoU ratio",
    )
    add_simulation_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sarcofed-bench-fed-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        demo_dir, studies = work / "sites", work / "studies"
        site_dirs = make_demo(demo_dir, sites=args.sites, slices=args.slices, size=args.size, seed=args.seed)
        flat = run_config(args, demo_dir, studies)
        study = StudyConfig.from_run_config(flat)  # type: ignore[arg-type]
        print(
            f"{args.sites} demo sites x {args.slices} slices at {args.size} px, {args.encoder}, "
            f"{args.rounds} rounds x {args.local_epochs} local epochs (= {args.rounds * args.local_epochs} "
            f"epochs centralised), val fraction {args.val_fraction}, seed {args.seed}",
            flush=True,
        )

        if args.skip_central:
            central = CentralisedResult(None, 0, len(splits(site_dirs, study)[1]), 0.0)
        else:
            print("centralised baseline ...", flush=True)
            central = centralised(site_dirs, study)
            took = f"{central.seconds:.1f} s"
            print(f"  {central.n_train} train / {central.n_val} val slices, {took}", flush=True)

        print("federated study on Flower's simulation engine ...", flush=True)
        echo = TimedLines(show=args.show_log)
        fed_config = federation_config(args.sites, args.client_cpus)
        with flower_sandbox(work) as env:
            started = time.monotonic()
            outcome = flwr_run(
                ROOT, run_config=flat, federation_config=fed_config, env=env, echo=echo, timeout=3600
            )
            wall = time.monotonic() - started
        rounds_file = studies / "bench-federated" / "rounds.jsonl"
        rounds = (
            parse_rounds(rounds_file.read_text(encoding="utf-8").splitlines()) if rounds_file.exists() else []
        )
        if len(rounds) < args.rounds:
            raise SystemExit(f"federated run {outcome.status} ({outcome.details}):\n{outcome.output[-4000:]}")
        if not outcome.ok:  # e.g. the report step failed after the last round: training numbers stand
            print(f"  WARNING: run {outcome.status} after all {len(rounds)} rounds: {outcome.details}")
        handling = [
            audit_spans(audit_path(d).read_text(encoding="utf-8").splitlines(), outcome.run_id, "train")
            for d in site_dirs
        ]
        final_global = global_model_iou(
            load_checkpoint(studies / "bench-federated").state_dict, site_dirs, study
        )
        report(args, central, rounds, handling, wall, fed_config, final_global)


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def report(
    args: argparse.Namespace,
    central: CentralisedResult,
    rounds: list[RoundTiming],
    handling: list[list[AuditSpan]],
    wall: float,
    fed_config: dict[str, object],
    final_global: float | None,
) -> None:
    """Print the per-round table and the ratios (``handling``: each site's train spans, in order)."""
    print(f"  {len(rounds)} rounds, flwr run wall time {wall:.1f} s, federation config {fed_config}\n")
    rows, projected, coordination = [], [], []
    for k, r in enumerate(rounds):
        spans = [site[k] for site in handling if len(site) > k]
        busy = busy_seconds(spans)
        coordination.append(r.seconds - busy)
        slowest_app = max((s.seconds for s in spans), default=0.0)
        slowest = max(r.site_seconds.values())
        projected.append(ratio(coordination[-1] + slowest_app, slowest))
        seconds = [r.seconds, slowest, sum(r.site_seconds.values()), slowest_app, busy, coordination[-1]]
        ratios = [fmt(r.vs_slowest), fmt(r.vs_sum), fmt(projected[-1]), fmt(r.muscle_iou, 4)]
        rows.append([str(r.round), *(f"{v:.2f}" for v in seconds), *ratios])
    header = ["round", "wall", "slowest", "sum", "slowest app", "busy", "coord", "/slowest", "/sum", "proj."]
    print("seconds: wall = round at the coordinator; slowest/sum = the sites' train_local; slowest app =")
    print("the slowest site's whole ClientApp handling (audit log); busy = time any site's ClientApp was")
    print("working; coord = wall - busy. proj. = (coord + slowest app) / slowest: the round / slowest")
    print("site if every site had its own machine.\n")
    print_table([*header, "IoU"], rows)
    later = slice(1, None) if len(rounds) > 1 else slice(None)  # round 1 also starts the ClientApps
    local_iou = rounds[-1].muscle_iou if rounds else None
    epochs = args.rounds * args.local_epochs
    print(f"\npooled validation muscle IoU (over pixels, {central.n_val} val slices, model resolution)")
    print(f"  centralised, {epochs} epochs on the pooled train splits: {fmt(central.muscle_iou, 4)}")
    print(f"  federated, final aggregated model:             {fmt(final_global, 4)}")
    print(f"  federated / centralised (goal >= 0.99):        {fmt(ratio(final_global, central.muscle_iou))}")
    print(
        f"  (sites' own models after the last local round: {fmt(local_iou, 4)}, ratio "
        f"{fmt(ratio(local_iou, central.muscle_iou))})"
    )
    vs_slowest = _median([r.vs_slowest for r in rounds[later]])
    vs_sum = _median([r.vs_sum for r in rounds[later]])
    print("coordination overhead, median over rounds 2..")
    print(f"  round / slowest site's train_local:            {fmt(vs_slowest)}")
    print(f"  round / sum of the sites' train_local:         {fmt(vs_sum)}")
    print(f"  projected round / slowest site (own machines): {fmt(_median(projected[later]))}")
    print(f"  coordination outside any ClientApp (s/round):  {fmt(_median(coordination[later]), 2)}")


if __name__ == "__main__":
    main()
