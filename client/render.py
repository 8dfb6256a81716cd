"""Rich rendering for the site's CLIs: what a site would send (the seed's tables, agreement and
findings), the report of ``sarcofed site check``, and progress bars."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console, RenderableType
from rich.console import Group as RenderGroup
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from common.release_words import release_sentences
from protocols.classes import IOU_BINS, METRIC_CLASSES, SEED_COLUMN, TISSUES, ExclusionReason
from protocols.findings import LabelAudit
from protocols.payloads import EvaluationPayload

if TYPE_CHECKING:
    from common.check import SiteCheckReport, SliceProblem
    from common.label_guess import MappingVerdict
    from common.mask_values import ValueStats


@contextmanager
def counting_progress(
    label: str, console: Console, total: int | None = None
) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar; yields the ``on_step(done, total)`` callback long jobs take."""
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda done, of: progress.update(task, completed=done, total=of)


def bullets(items: Iterable[RenderableType]) -> Table:
    """A "- item" list whose wrapped lines stay indented under their item's text.

    A ``str`` item is rich markup (escape what it quotes); a ``Text`` item prints verbatim.
    """
    listing = Table.grid(padding=(0, 1))
    listing.add_column(no_wrap=True)
    listing.add_column(overflow="fold")
    for item in items:
        listing.add_row("-", item)
    return listing


def _cell(value: int | None) -> str:
    return "suppressed" if value is None else str(value)


def seed_table(payload: EvaluationPayload, title: str) -> Table:
    """Rows = the seed's IoU bins, columns M, S, V, MSV, plus the seed's ratio column."""
    table = Table(title=title, title_justify="left")
    table.add_column("IoU")
    for cls in METRIC_CLASSES:
        table.add_column(SEED_COLUMN[cls], justify="right")
    table.add_column("ratio", justify="right")
    scores = payload.scores
    defined = sum(sum(v for v in scores[c].bins.values()) for c in METRIC_CLASSES if c in scores)
    for bin_name in IOU_BINS:
        values = [scores[c].bins.get(bin_name) if c in scores else None for c in METRIC_CLASSES]
        total = sum(v for v in values if v is not None)
        ratio = f"{total}/{defined} ({100 * total / defined:.0f}%)" if defined else "-"
        table.add_row(bin_name, *(_cell(v) for v in values), ratio)
    table.add_row(
        "undefined",
        *(str(scores[c].undefined) if c in scores else "-" for c in METRIC_CLASSES),
        "",
        style="dim",
    )
    return table


#: What the reader is told about whose difference a finding is (``Finding.attribution``).
_ATTRIBUTION = {
    "site_convention": "a convention of this site",
    "model": "the model's",
    "undetermined": "undetermined",
}


def _scope(payload: EvaluationPayload) -> str:
    """Which of the site's slices were scored, in words (role, split and its size)."""
    if payload.role == "internal":
        rows = (
            "its size withheld"
            if "n_in_split" in payload.suppressed or payload.n_in_split is None
            else f"{payload.n_in_split} manifest rows"
        )
        return f"; internal site (trained the model): its held-out test split only ({rows})"
    if payload.role == "external":
        return "; external site: every usable slice"
    return ""


def _findings_withheld(payload: EvaluationPayload) -> bool:
    marks = [*payload.suppressed, *(payload.discrepancy.suppressed if payload.discrepancy else [])]
    return any(m == "findings" or m.startswith(("findings.", "discrepancy.findings")) for m in marks)


def render_payload(payload: EvaluationPayload, console: Console) -> None:
    """What a site would send, for the person at the site: the seed's tables, agreement, the label
    audit, findings with whose difference each is, and what the policy noised or withheld."""
    what = "model vs site labels" if payload.task == "evaluate" else "reference masks vs site labels"
    patients = (
        "patient count withheld" if "n_groups" in payload.suppressed else f"{payload.n_groups} patients"
    )
    console.print(
        f"[bold]{escape(payload.site)}[/]: {payload.n_used} of {payload.n_listed} slices scored "
        f"({patients}), {what}{_scope(payload)}; dataset fingerprint {payload.dataset_fingerprint}"
    )
    if payload.excluded:
        excluded = ", ".join(f"{k} {v}" for k, v in sorted(payload.excluded.items()))
        console.print(f"excluded: {escape(excluded)}")
    if payload.n_used or payload.dp is not None:  # a noised count of 0 still comes with noised tables
        _render_results(payload, console)
    for sentence in release_sentences(payload):  # what was noised or withheld, whatever was scored
        console.print(f"[yellow]{escape(sentence)}[/yellow]")


def _render_results(payload: EvaluationPayload, console: Console) -> None:
    """The seed's tables, area / SMI agreement, sarcopenia calls, label audit and findings."""
    console.print(seed_table(payload, "Slices per IoU bin (the seed's Table 2/3 layout)"))
    if payload.harmonised_scores:
        harmonised = payload.model_copy(update={"scores": payload.harmonised_scores})
        console.print(seed_table(harmonised, "After applying the HU ranges to both masks (harmonised)"))
    # short headers and word-wrappable tissue names: the table fits 80 columns
    areas = Table(
        title="Area agreement, cm^2 (means; diff = test - label)",
        title_justify="left",
    )
    for col in ("tissue", "n", "label", "test", "diff", "SD diff", "95% limits"):
        areas.add_column(col, justify="right" if col != "tissue" else "left")
    for tissue in TISSUES:
        a = payload.areas.get(tissue)
        if a is None or a.n == 0:
            continue
        limits = (
            f"{a.mean_diff_cm2 - 1.96 * a.sd_diff_cm2:+.1f}..{a.mean_diff_cm2 + 1.96 * a.sd_diff_cm2:+.1f}"
            if a.mean_diff_cm2 is not None and a.sd_diff_cm2 is not None
            else "-"
        )
        areas.add_row(
            tissue.replace("_", " "),
            str(a.n),
            f"{a.mean_label_cm2:.1f}" if a.mean_label_cm2 is not None else "-",
            f"{a.mean_test_cm2:.1f}" if a.mean_test_cm2 is not None else "-",
            f"{a.mean_diff_cm2:+.1f}" if a.mean_diff_cm2 is not None else "-",
            f"{a.sd_diff_cm2:.1f}" if a.sd_diff_cm2 is not None else "-",
            limits,
        )
    console.print(areas)
    if payload.smi and payload.smi.n:
        s = payload.smi
        console.print(
            f"SMI (cm^2/m^2) over {s.n} slices with height: "
            f"label {_fmt(s.mean_label)}, test {_fmt(s.mean_test)}, "
            f"mean diff {_fmt(s.mean_diff, '{:+.2f}')}"
        )
    if payload.sarcopenia:
        c = payload.sarcopenia
        console.print(
            f"Sarcopenia calls ({escape(c.cutoff_set)}): both {c.both_sarcopenic}, "
            f"label only {c.label_only}, test only {c.test_only}, neither {c.neither}, "
            f"unknown sex/height {c.unknown}"
        )
    if payload.label_audit is not None and payload.label_audit.checks:
        render_label_audit(payload.label_audit, console)
    if payload.findings:
        console.print("[bold]Label-definition findings[/]")
        items: list[RenderableType] = []
        for f in payload.findings:
            mark = "[red]systematic[/]" if f.systematic else "scattered"
            lines = [f"({mark}) {escape(f.sentence)}"]
            if f.attribution is not None:
                why = f": {escape(f.evidence)}" if f.evidence else ""
                lines.append(f"[dim]whose difference: {_ATTRIBUTION[f.attribution]}{why}[/dim]")
            items.append("\n".join(lines))
        console.print(bullets(items))
    elif payload.discrepancy is not None and not _findings_withheld(payload):
        console.print("No label-definition finding: this site's labels agree with the reference convention.")
    elif payload.discrepancy is not None:
        console.print("No label-definition finding is shown: the site's policy withheld them (below).")


def _fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "-" if value is None else pattern.format(value)


def render_check(report: SiteCheckReport, console: Console) -> None:
    """Print the report as rich tables for the person at the site."""
    verdict = "[green]usable[/green]" if report.usable else "[red]NOT usable[/red]"
    console.print(f"[bold]Site[/bold] {escape(report.site)}: {verdict}")
    summary = Table(show_header=False, box=None)
    summary.add_row("slices listed", str(report.n_listed))
    summary.add_row("slices usable", str(report.n_usable))
    summary.add_row("patients (groups)", str(report.n_groups))
    summary.add_row("height known", f"{report.n_heights_known} of {report.n_usable}")
    summary.add_row("sex known", f"{report.n_sex_known} of {report.n_usable}")
    if report.pixel_spacing:
        summary.add_row(
            "pixel spacing", f"{report.pixel_spacing.min_mm:.3g} - {report.pixel_spacing.max_mm:.3g} mm"
        )
    summary.add_row("image sizes", ", ".join(report.image_sizes) or "-")
    summary.add_row("background values", ", ".join(map(str, report.background_values)) or "-")
    summary.add_row("dataset fingerprint", report.fingerprint)
    console.print(summary)

    classes = Table(title="Tissues (pooled over pixels of usable slices)")
    for column in ("class", "site values", "pixels", "HU range", "in range", "mean HU"):
        classes.add_column(column, justify="left" if column in ("class", "site values") else "right")
    for name, stats in report.classes.items():
        share = stats.share_in_hu_range
        style = "" if share is None or share >= 0.5 else "[yellow]"
        classes.add_row(
            name,
            ", ".join(map(str, stats.label_values)) or "-",
            str(stats.pixels),
            f"{stats.hu_range[0]:g}..{stats.hu_range[1]:g}",
            style + _fmt(share * 100 if share is not None else None, "{:.0f}%"),
            _fmt(stats.mean_hu),
        )
    console.print(classes)
    if report.mapping is not None:
        render_mapping(report.mapping, report.mask_values, console)
    if report.mapping is not None and not report.mapping.fits:
        # the audit reads the labels through [labels]: through a wrong mapping its findings are noise
        console.print(escape("(Label audit skipped: it needs a [labels] mapping that fits the data.)"))
    elif report.label_audit is not None and report.label_audit.checks:
        render_label_audit(report.label_audit, console)
    for name, confirmed in report.declared_conventions.items():
        console.print(
            f"site.toml declares the label convention {name!r}: "
            + (
                "the audit confirms it; convention-aware training applies it."
                if confirmed
                else "the audit does not confirm it (no slice shows it, or your labels follow the "
                "protocol there); convention-aware training will not apply it."
            ),
            highlight=False,
        )

    if report.excluded:
        reasons = Table(title="Excluded rows by reason")
        reasons.add_column("reason")
        reasons.add_column("count", justify="right")
        reasons.add_column("meaning")
        for reason, count in report.excluded.items():
            reasons.add_row(reason, str(count), escape(ExclusionReason(reason).label))
        console.print(reasons)
        render_problems(report.problems, console)
    if report.reference_problems:
        references = Table(
            title="Reference masks `site compare` cannot use (the rows stay usable; local only: names files)"
        )
        references.add_column("file", overflow="fold")
        references.add_column("line", justify="right")
        references.add_column("what to fix", overflow="fold")
        for problem in report.reference_problems:
            references.add_row(escape(problem.file), str(problem.line or ""), escape(problem.detail))
        console.print(references)


#: How many file names a group of excluded rows shows before "and N more".
SHOWN_FILES = 3


@dataclass(frozen=True)
class ProblemGroup:
    """Excluded rows that share one reason and one fix: the fix is printed once, with the count."""

    reason: str
    detail: str
    files: tuple[str, ...]  #: "path (line N)" of each row, in manifest order


def group_problems(problems: Iterable[SliceProblem]) -> list[ProblemGroup]:
    """``problems`` grouped by (reason, fix text), in the order each group first appears."""
    groups: dict[tuple[str, str], list[str]] = {}
    for problem in problems:
        where = f"{problem.file} (line {problem.line})" if problem.line else problem.file
        groups.setdefault((problem.reason, problem.detail), []).append(where)
    return [ProblemGroup(reason, detail, tuple(files)) for (reason, detail), files in groups.items()]


def render_problems(problems: Iterable[SliceProblem], console: Console) -> None:
    """Each distinct fix once: its reason, how many rows, the fix, and a few of the files.

    Plain ``Text`` throughout: file names and fixes are printed verbatim (``[labels]`` included),
    never read as rich markup; wrapped to the terminal, so it reads at 80 columns.
    """
    items: list[RenderableType] = []
    for group in group_problems(problems):
        count = len(group.files)
        rows = "1 row" if count == 1 else f"{count} rows"
        more = f" and {count - SHOWN_FILES} more" if count > SHOWN_FILES else ""
        items.append(
            RenderGroup(
                Text.assemble((group.reason, "yellow"), f", {rows}: ", group.detail),
                Text(", ".join(group.files[:SHOWN_FILES]) + more, style="dim", overflow="fold"),
            )
        )
    console.print(Text("What to fix (local only: names files)", style="bold"))
    console.print(bullets(items))


def render_label_audit(audit: LabelAudit, console: Console) -> None:
    """The model-free label audit: each check, how consistent, and the verdict in words."""
    table = Table(title=f"Your labels against the {audit.protocol} protocol (from the images, no model)")
    for column in ("class / direction / region", "slices", "mean cm²", "verdict"):
        table.add_column(column, justify="right" if column in ("slices", "mean cm²") else "left")
    for check in audit.checks:
        verdict = (
            "[yellow]a convention of this site[/yellow]"
            if check.systematic
            else ("follows the protocol" if check.conforms else "not consistent")
        )
        table.add_row(
            f"{check.tissue} / {check.direction} / {check.region}",
            f"{check.n_present} of {check.n_slices}",
            f"{check.mean_area_cm2:.1f}",
            verdict,
        )
    console.print(table)
    if audit.findings:
        console.print(bullets([Text(check.sentence) for check in audit.findings]))


def render_mapping(verdict: MappingVerdict, values: list[ValueStats], console: Console) -> None:
    """What each raw mask value looks like, and whether site.toml [labels] fits; if not, the fix."""
    console.print(escape("Mask values (before mapping), from the images:"))
    pixels = {v.value: v.pixels for v in values}
    for guess in verdict.proposal.guesses:
        console.print(f"- {escape(guess.sentence)}; {pixels.get(guess.value, 0)} pixels", highlight=False)
    if verdict.proposal.note:
        console.print(escape(verdict.proposal.note), highlight=False)
    for problem in verdict.problems:
        console.print(f"[yellow]- {escape(problem)}[/yellow]", highlight=False)
    if verdict.fits:
        if not verdict.problems:
            console.print(escape("site.toml [labels] fits the data."))
        return
    console.print(
        escape("site.toml [labels] does not fit the data. The mapping that fits (check it, then replace ")
        + escape("the [labels] table of site.toml with):"),
        style="red",
    )
    console.print(verdict.toml.rstrip("\n"), markup=False, highlight=False)
