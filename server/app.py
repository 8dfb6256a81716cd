"""The coordinator's Flower ServerApp: thin glue around ``server.training``,
``server.validation`` and ``server.report``.

Start-up matters: the deployment engine starts a fresh ServerApp process per study. The
heavy imports (torch, segmentation-models-pytorch, pandas, matplotlib) and reading the study
model happen in a background thread while the ServerApp waits for the sites anyway (the
identify query, the validation round), not before the first message goes out. Each phase
is logged as ``timing: <phase> ...`` (wall-clock start and seconds) for ``flwr log`` and
``bench/bench_deployment.py``.

A wrong study config fails at once: the run config is parsed first (unknown keys, bad values,
a ``model.image-size`` that is not a multiple of 32), and the model names, which need the
model zoo, are checked first thing in the background: :func:`wait_for_sites` stops with that
error as soon as it is known, and no site is sent a model before the check has passed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common import paths
from common.errors import SarcofedError
from protocols.findings import ErrorProfile
from protocols.report import RoundRecord, SiteResult, StudyReport
from protocols.study import StudyConfig, recipe_note
from server.central_dp import central_dp_note
from server.validation import identify_sites, run_validation

if TYPE_CHECKING:
    from common.model import LoadedModel

app = ServerApp()

#: How long the study waits for the minimum number of sites to connect.
CONNECT_TIMEOUT_S = 300.0
#: After the minimum is reached, a short grace period for the remaining sites.
GRACE_S = 3.0
#: How long sites may take to say who they are (a fresh ClientApp imports torch first).
IDENTIFY_TIMEOUT_S = 120.0


def studies_dir(study: StudyConfig) -> Path:
    """Where this study's run folders go: ``study.output-dir``, or ``$SARCOFED_HOME/studies``."""
    return paths.studies_dir(study.study.output_dir)


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


def check_model_names(study: StudyConfig) -> None:
    """The study's ``model.arch`` and ``model.encoder`` name a network the model zoo can build.

    A :class:`SarcofedError` naming the run-config key and the valid choices otherwise. Imports
    the model zoo (seconds): :func:`main` runs it in the background while sites connect.
    """
    from common.model import check_arch, check_encoder

    for key, check, value in (
        ("model.arch", check_arch, study.model.arch),
        ("model.encoder", check_encoder, study.model.encoder),
    ):
        try:
            check(value)
        except ValueError as err:
            raise SarcofedError(f"invalid run config: {key}: {err}") from err


def wait_for_sites(grid: Grid, minimum: int, *, abort: Future[None] | None = None) -> list[int]:
    """The connected sites, once at least ``minimum`` are.

    If the minimum had to be waited for, sites are connecting right now: the others get
    ``GRACE_S`` more to join. If it was already met when the study started (SuperNodes
    that stay connected between studies), the study takes the sites connected now.
    While waiting, a failed ``abort`` (the config check) raises its error at once.
    """
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    waited = False
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if abort is not None and abort.done():
            abort.result()  # raises the check's error; a passed check lets the wait go on
        if time.monotonic() > deadline:
            raise SarcofedError(
                f"only {len(nodes)} site(s) connected after {CONNECT_TIMEOUT_S:.0f} s; "
                f"study.min-sites = {minimum}"
            )
        waited = True
        time.sleep(1.0)
    if waited:
        time.sleep(GRACE_S)
    return sorted(grid.get_node_ids())


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """Log ``timing: <phase> started <UTC ISO time>, <seconds> s`` when the phase ends."""
    wall = datetime.now(UTC).isoformat(timespec="milliseconds")
    start = time.monotonic()
    try:
        yield
    finally:
        log(INFO, "timing: %s started %s, %.3f s", phase, wall, time.monotonic() - start)


def _load_study_model(path: str) -> LoadedModel:
    """The coordinator's study model (imports torch and the model zoo on first use)."""
    from common.model import load_model

    with timed("load-model"):
        return load_model(Path(path).expanduser())


def _warm_report_imports() -> None:
    """Import what ``write_report`` needs (pandas, matplotlib) while the sites work."""
    with timed("report-imports"):
        import server.report  # noqa: F401


@app.main()
def main(grid: Grid, context: Context) -> None:
    log(INFO, "timing: main started %s", datetime.now(UTC).isoformat(timespec="milliseconds"))
    study = StudyConfig.from_run_config(context.run_config)
    run_dir = prepare_run_dir(study, context.run_id)
    log(INFO, "sarcofed study '%s': run folder %s", study.study.name, run_dir)
    if study.study.mode == "evaluate" and not study.study.model:
        raise SarcofedError("study.mode = evaluate needs study.model = a model.pt path on the coordinator")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sarcofed-warm-up") as background:
        _run_study(grid, context, study, run_dir, background)


def _run_study(
    grid: Grid, context: Context, study: StudyConfig, run_dir: Path, background: ThreadPoolExecutor
) -> None:
    # Work the ServerApp would otherwise do before its first message, done while it waits.
    # The config check goes first: its error ends the wait for sites.
    names_checked = background.submit(check_model_names, study)
    model_future: Future[LoadedModel] | None = None
    if study.study.mode == "evaluate":
        model_future = background.submit(_load_study_model, str(study.study.model))
    background.submit(_warm_report_imports)
    with timed("wait-for-sites"):
        nodes = wait_for_sites(grid, study.study.min_sites, abort=names_checked)
    with timed("identify"):
        sites = identify_sites(grid, nodes, timeout=IDENTIFY_TIMEOUT_S)
    log(
        INFO,
        "sites: %s",
        ", ".join(f"{s} (node {n})" for n, s in sorted(sites.items(), key=lambda kv: kv[1])),
    )
    names_checked.result()  # identify needs no model; everything below does
    from common.model import load_model

    spec = study.model
    mode = study.study.mode
    history: list[RoundRecord] = []
    notes: list[str] = []
    state_dict = None
    model_hash = None
    internal: set[str] = set()

    if mode in ("train+evaluate", "train"):
        from server.training import exclusion_note, run_training, training_notes

        with timed("training"):
            outcome = run_training(
                grid,
                study,
                run_dir,
                sites,
                on_round=lambda r: log(
                    INFO,
                    "round %s: %d site(s) replied, pooled val loss %s, failed: %s",
                    r.round,
                    len(r.sites_replied),
                    r.pooled_val_loss,
                    r.sites_failed or "none",
                ),
            )
        history = outcome.history
        notes += training_notes(outcome)
        if (recipe := recipe_note(study)) is not None:  # e.g. the demo's faster schedule
            notes.append(recipe)
        if (excluded := exclusion_note(study.study.exclude_from_training, sites.values())) is not None:
            notes.append(excluded)
        if study.dp.enabled:
            aggregated = sum(1 for r in history if r.status == "ok")
            notes.append(central_dp_note(study.dp.noise_multiplier, study.dp.clipping_norm, aggregated))
        loaded = load_model(outcome.model_path)
        spec, state_dict, model_hash = loaded.spec, loaded.model.state_dict(), loaded.weights_hash
        from server.training import contributing_sites

        internal = contributing_sites(history, int(loaded.meta.get("round", study.study.num_rounds)))
    elif model_future is not None:
        loaded = model_future.result()
        spec, state_dict, model_hash = loaded.spec, loaded.model.state_dict(), loaded.weights_hash

    if mode == "train":
        results = []
    else:
        task = "compare" if mode == "compare" else "evaluate"
        with timed(f"{task}-round"):
            results = run_validation(
                grid,
                study,
                sites,
                task=task,
                spec=spec,
                state_dict=state_dict,
                model_hash=model_hash,
                internal_sites=internal,
            )
    results, profile = _attribute(results, study)
    if mode in ("train+evaluate", "train") and state_dict is not None:
        _record_context(run_dir / "model.pt", internal, study, profile)
    report = StudyReport(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        run_id=str(context.run_id),
        study_name=study.study.name,
        task="compare" if mode == "compare" else "evaluate",
        model_hash=model_hash if state_dict is not None else None,
        model_spec=spec.model_dump(mode="json") if state_dict is not None else None,
        cutoff_set=study.study.cutoff_set,
        protocol=study.protocol,
        error_profile=profile,
        sites=results,
        training=history,
        notes=notes,
    )
    from server.report import write_report

    with timed("report"):
        written = write_report(report, run_dir)
        (studies_dir(study) / "LATEST").write_text(str(run_dir), encoding="utf-8")
    for result in results:
        level = INFO if result.status == "ok" else WARNING
        log(
            level, "site %s: %s%s", result.site, result.status, f" ({result.reason})" if result.reason else ""
        )
    log(INFO, "study report: %s", written.html)


def _attribute(results: list[SiteResult], study: StudyConfig) -> tuple[list[SiteResult], ErrorProfile | None]:
    """Every site's findings attributed with the study's evidence (see common.attribution)."""
    from common.attribution import study_attribution

    payloads = {r.site: r.payload for r in results if r.payload is not None}
    profile, findings = study_attribution(payloads, study.protocol)
    return [r.model_copy(update={"findings": findings.get(r.site, [])}) for r in results], profile


def _record_context(
    model_path: Path, internal: set[str], study: StudyConfig, profile: ErrorProfile | None
) -> None:
    """Write into model.pt who trained it, their split, the protocol and its error profile, so a
    later `sarcofed site evaluate` scores a training site as internal and attributes findings."""
    from common.model import load_model, save_model
    from common.model_meta import context_meta

    loaded = load_model(model_path)
    meta = dict(loaded.meta) | context_meta(internal, study.train, study.protocol, profile)
    save_model(model_path, loaded.model.state_dict(), loaded.spec, meta=meta)


__all__ = ["app", "check_model_names", "main", "timed", "wait_for_sites"]
