"""The external validation round on Flower's simulation engine: coordination overhead and throughput.

A study with ``study.mode = "evaluate"`` validates one saved model (an untrained U-Net,
``--encoder`` resnet34 at ``--size`` 512 by default: cost does not depend on the weights) on
three demo hospitals of ``--slices`` slices each, through ``flwr run`` with a private
FLWR_HOME and local-SuperLink ports.

The ServerApp cannot be instrumented from outside, so the round is timed from its own log
lines as ``flwr run --stream`` delivers them, timestamped on arrival: ``sites: ...`` (logged
after the identify query, before the model is loaded) and ``study report: ...`` (logged
after ``run_validation`` and ``write_report``). Both lines pass the same log path (uploaded
every 0.2 s, streamed every 0.5 s), so the difference is good to about +-0.7 s. From it the
bench subtracts the two coordinator steps that are not the round: ``write_report``, timed by
the coordinator's own files (mtime of ``LATEST``, written right after the report, minus the
mtime of ``report.json``, its first file), and ``load_model(model.pt)``, re-timed here.

What the round then includes: packing the weights, sending them to every site (model
transfer), each site's ClientApp handling (guard, unpacking, reading its slices, inference,
scoring, discrepancy analysis, the reply), and collecting and schema-checking the replies.
ClientApp start-up (the simulated ClientApps' imports) happens before it, in the identify
query.

Per site, two times: ``ClientApp`` = received -> sent in the site's audit log (inside the
ClientApp, model unpacking included), and ``local`` = ``client.site_tasks.run_evaluate``
called here on the same folder and model, alone on the machine (``--threads`` torch threads).

    python bench/bench_validation_round.py                       # 3 sites x 6 slices, 512 px, resnet34
    python bench/bench_validation_round.py --size 256 --slices 4 # quicker
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_federated import (
    ROOT,
    AuditSpan,
    TimedLines,
    add_simulation_args,
    audit_spans,
    busy_seconds,
    federation_config,
    flower_sandbox,
    fmt,
    ratio,
)

from client.audit import audit_path
from client.site_tasks import run_evaluate
from common.dataset import load_site
from common.demo.hospitals import make_demo
from common.model import ModelSpec, build_model, load_model, save_model
from protocols.report import StudyReport
from protocols.study import StudyConfig
from server.flwr_cli import flwr_run

#: ServerApp log lines that bracket the validation round (server/app.py).
BEFORE_ROUND = "sites: "
AFTER_ROUND = "study report: "


@dataclass(frozen=True)
class RoundEstimate:
    """The validation round at the coordinator, from two log lines minus re-timed extra steps."""

    between_lines: float  #: arrival("study report") - arrival("sites")
    load_model: float  #: coordinator's load_model(model.pt), re-timed locally
    write_report: float  #: coordinator's write_report, from its files' mtimes

    @property
    def seconds(self) -> float:
        return self.between_lines - self.load_model - self.write_report


def round_between(echo: TimedLines) -> float | None:
    """Seconds between the ``sites:`` and ``study report:`` lines (None if either is missing)."""
    start, end = echo.first(BEFORE_ROUND), echo.first(AFTER_ROUND)
    return end - start if start is not None and end is not None else None


def report_write_seconds(run_dir: Path, latest: Path) -> float:
    """How long the coordinator's ``write_report`` took: ``report.json`` is its first file and
    ``LATEST`` is written right after it returns (``server/app.py``)."""
    return latest.stat().st_mtime - (run_dir / "report.json").stat().st_mtime


def site_spans(site_dirs: list[Path], run_id: int) -> dict[Path, AuditSpan]:
    """Each site's ``evaluate`` span (received -> sent) of this run, from its audit log."""
    out = {}
    for site_dir in site_dirs:
        path = audit_path(site_dir)
        spans = audit_spans(path.read_text(encoding="utf-8").splitlines(), run_id, "evaluate")
        if spans:
            out[site_dir] = spans[-1]
    return out


def main() -> None:
    doc = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=doc)
    parser.add_argument("--size", type=int, default=512, help="demo image size = model image size")
    parser.add_argument("--slices", type=int, default=6, help="slices per demo site (site policy needs >= 5)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--batch-size", type=int, default=4, help="eval.batch-size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local re-timing")
    add_simulation_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="sarcofed-bench-val-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        demo_dir, studies = work / "sites", work / "studies"
        site_dirs = make_demo(demo_dir, sites=args.sites, slices=args.slices, size=args.size, seed=args.seed)
        spec = ModelSpec(encoder=args.encoder, image_size=args.size)
        torch.manual_seed(args.seed)
        model_path = save_model(work / "model.pt", build_model(spec), spec, meta={"bench": "untrained"})
        flat: dict[str, object] = {
            "study.mode": "evaluate",
            "study.model": str(model_path),
            "study.min-sites": args.sites,
            "study.round-timeout": 1800.0,
            "study.output-dir": str(studies),
            "study.run-name": "bench-validation",
            "model.encoder": args.encoder,
            "model.image-size": args.size,
            "demo.dir": str(demo_dir),
            "demo.slices": args.slices,
            "demo.size": args.size,
            "eval.batch-size": args.batch_size,
        }
        study = StudyConfig.from_run_config(flat)  # type: ignore[arg-type]
        print(
            f"{args.sites} demo sites x {args.slices} slices at {args.size} px, {args.encoder} "
            f"(untrained), eval batch {args.batch_size}, discrepancy {study.study.discrepancy}, "
            f"harmonised {study.study.harmonised}",
            flush=True,
        )

        print("validation study on Flower's simulation engine ...", flush=True)
        echo = TimedLines(show=args.show_log)
        fed_config = federation_config(args.sites, args.client_cpus)
        with flower_sandbox(work) as env:
            started = time.monotonic()
            outcome = flwr_run(
                ROOT, run_config=flat, federation_config=fed_config, env=env, echo=echo, timeout=3600
            )
            wall = time.monotonic() - started
        between = round_between(echo)
        if not outcome.ok or between is None:
            raise SystemExit(
                f"validation run {outcome.status} ({outcome.details}):\n{outcome.output[-4000:]}"
            )
        run_dir = studies / "bench-validation"
        report = StudyReport.model_validate_json((run_dir / "report.json").read_text(encoding="utf-8"))
        spans = site_spans(site_dirs, outcome.run_id)

        print("re-timing load_model and each site alone ...", flush=True)
        clock = time.perf_counter()
        loaded = load_model(model_path)
        t_load = time.perf_counter() - clock
        t_write = report_write_seconds(run_dir, studies / "LATEST")
        estimate = RoundEstimate(between_lines=between, load_model=t_load, write_report=t_write)
        local: dict[Path, tuple[float, int]] = {}
        for site_dir in site_dirs:
            clock = time.perf_counter()
            payload = run_evaluate(load_site(site_dir), loaded.model, spec, study).payload
            local[site_dir] = (time.perf_counter() - clock, payload.n_used)

    used = {r.site: r.payload.n_used for r in report.sites if r.payload is not None}
    print(f"  flwr run wall time {wall:.1f} s, federation config {fed_config}")
    print(f"  site statuses: {', '.join(f'{r.site} {r.status}' for r in report.sites)}\n")
    print("per site: slices used | ClientApp s (audit) | local s | local slices/s")
    for site_dir in site_dirs:
        seconds, n_used = local[site_dir]
        span = spans.get(site_dir)
        print(
            f"  {site_dir.name}: {n_used:>3} | {fmt(span.seconds if span else None, 2):>7} | "
            f"{seconds:7.2f} | {n_used / seconds:.3f}"
        )
    n_total = sum(used.values())
    slowest_local = max(s for s, _ in local.values())
    sum_local = sum(s for s, _ in local.values())
    app = [s.seconds for s in spans.values()]
    print(f"\nvalidation round at the coordinator ({n_total} slices over {len(used)} sites)")
    print(f"  between the log lines:           {estimate.between_lines:7.2f} s")
    print(f"  - load_model (re-timed):         {estimate.load_model:7.2f} s")
    print(f"  - write_report (file mtimes):    {estimate.write_report:7.2f} s")
    print(f"  = round:                         {estimate.seconds:7.2f} s")
    busy = busy_seconds(list(spans.values()))
    coordination = estimate.seconds - busy
    slowest_app = max(app, default=0.0)
    print(f"  sites busy (union of their ClientApp spans): {busy:6.2f} s")
    print(f"  coordination = round - busy:                  {coordination:6.2f} s")
    print("ratios (goal: round / slowest site <= 1.10)")
    print(f"  round / slowest site (local):             {fmt(ratio(estimate.seconds, slowest_local))}")
    print(f"  round / sum of the sites (local):         {fmt(ratio(estimate.seconds, sum_local))}")
    print(f"  round / sum of the sites (ClientApp):     {fmt(ratio(estimate.seconds, sum(app)))}")
    print(
        f"  projected, own machines: (coordination + slowest ClientApp) / slowest local: "
        f"{fmt(ratio(coordination + slowest_app, slowest_local))}"
    )
    print(
        f"  projected, own machines: (coordination + slowest ClientApp) / slowest ClientApp: "
        f"{fmt(ratio(coordination + slowest_app, slowest_app))}"
    )
    print("throughput (slices/s)")
    print(f"  end to end (round, sites one after another): {fmt(ratio(n_total, estimate.seconds))}")
    print(f"  inside the ClientApps (audit spans):          {fmt(ratio(n_total, sum(app)))}")
    print(f"  one site alone (local, run_evaluate):         {fmt(ratio(n_total, sum_local))}")


if __name__ == "__main__":
    main()
