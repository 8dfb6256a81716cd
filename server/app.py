"""The coordinator's Flower ServerApp: thin glue around ``server.training``,
``server.validation`` and ``server.report``."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.errors import SarcofedError
from common.model import ModelSpec, load_model, weights_hash
from protocols.payloads import HuRanges
from protocols.report import StudyReport
from protocols.study import StudyConfig
from server.report import write_report
from server.training import run_training
from server.validation import identify_sites, run_validation

app = ServerApp()

#: How long the study waits for the minimum number of sites to connect.
CONNECT_TIMEOUT_S = 300.0
#: After the minimum is reached, a short grace period for the remaining sites.
GRACE_S = 3.0
#: How long sites may take to say who they are (a fresh ClientApp imports torch first).
IDENTIFY_TIMEOUT_S = 120.0


def studies_dir(study: StudyConfig) -> Path:
    if study.study.output_dir:
        return Path(study.study.output_dir).expanduser()
    home = Path(os.environ.get("SARCOFED_HOME", Path.home() / "sarcofed")).expanduser()
    return home / "studies"


def prepare_run_dir(study: StudyConfig, run_id: int) -> Path:
    name = study.study.run_name or f"{study.study.name}-{run_id}"
    run_dir = studies_dir(study) / name
    if run_dir.exists() and not study.study.resume and study.study.run_name:
        raise SarcofedError(
            f"{run_dir} already exists: set study.resume=true to continue it, "
            "or choose another study.run-name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "study-config.json").write_text(json.dumps(study.to_flat(), indent=2), encoding="utf-8")
    return run_dir


def wait_for_sites(grid: Grid, minimum: int) -> list[int]:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise SarcofedError(
                f"only {len(nodes)} site(s) connected after {CONNECT_TIMEOUT_S:.0f} s; "
                f"study.min-sites = {minimum}"
            )
        time.sleep(1.0)
    time.sleep(GRACE_S)
    return sorted(grid.get_node_ids())


@app.main()
def main(grid: Grid, context: Context) -> None:
    study = StudyConfig.from_run_config(context.run_config)  # type: ignore[arg-type]
    run_dir = prepare_run_dir(study, context.run_id)
    log(INFO, "sarcofed study '%s': run folder %s", study.study.name, run_dir)
    nodes = wait_for_sites(grid, study.study.min_sites)
    sites = identify_sites(grid, nodes, timeout=IDENTIFY_TIMEOUT_S)
    log(
        INFO,
        "sites: %s",
        ", ".join(f"{s} (node {n})" for n, s in sorted(sites.items(), key=lambda kv: kv[1])),
    )
    spec = ModelSpec(arch=study.model.arch, encoder=study.model.encoder, image_size=study.model.image_size)
    mode = study.study.mode
    history: list[dict[str, object]] = []
    notes: list[str] = []
    state_dict = None
    model_hash = None

    if mode in ("train+evaluate", "train"):
        outcome = run_training(
            grid,
            study,
            spec,
            run_dir,
            sites,
            on_round=lambda r: log(
                INFO,
                "round %s: %d site(s) replied, pooled val loss %s, failed: %s",
                r["round"],
                len(r["sites_replied"]),
                r["pooled_val_loss"],
                r["sites_failed"] or "none",
            ),
        )
        history = outcome.history
        if outcome.stopped_early:
            notes.append("training stopped early on the pooled validation loss")
        if study.study.exclude_from_training:
            notes.append(
                f"excluded from training (validated only): {', '.join(study.study.exclude_from_training)}"
            )
        if study.dp.enabled:
            notes.append(
                f"central DP (server-side fixed clipping): noise multiplier {study.dp.noise_multiplier}, "
                f"clipping norm {study.dp.clipping_norm}"
            )
        loaded = load_model(outcome.model_path)
        spec, state_dict, model_hash = loaded.spec, loaded.model.state_dict(), loaded.weights_hash
    elif mode == "evaluate":
        if not study.study.model:
            raise SarcofedError(
                "study.mode = evaluate needs study.model = a model.pt path on the coordinator"
            )
        loaded = load_model(Path(study.study.model).expanduser())
        spec, state_dict, model_hash = loaded.spec, loaded.model.state_dict(), loaded.weights_hash

    if mode == "train":
        results = []
    else:
        task = "compare" if mode == "compare" else "evaluate"
        results = run_validation(
            grid, study, sites, task=task, spec=spec, state_dict=state_dict, model_hash=model_hash
        )
    report = StudyReport(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        run_id=str(context.run_id),
        study_name=study.study.name,
        task="compare" if mode == "compare" else "evaluate",
        model_hash=model_hash if state_dict is not None else None,
        model_spec=spec.model_dump(mode="json") if state_dict is not None else None,
        cutoff_set=study.study.cutoff_set,
        hu_ranges=HuRanges(),
        sites=results,
        training=history,
        notes=notes,
    )
    paths = write_report(report, run_dir)
    (studies_dir(study) / "LATEST").write_text(str(run_dir), encoding="utf-8")
    for result in results:
        level = INFO if result.status == "ok" else WARNING
        log(
            level, "site %s: %s%s", result.site, result.status, f" ({result.reason})" if result.reason else ""
        )
    log(INFO, "study report: %s", paths.html)


__all__ = ["app", "weights_hash"]
