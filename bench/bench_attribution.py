"""Model or labels? Precision and recall of ``site_convention`` findings with an imperfect model.

The validation issue's acceptance experiment, on synthetic hospitals (``common.demo``):

1. train a U-Net on the train patients of reference-convention hospitals (their test
   patients held out, exactly as a training study splits them);
2. score it at those hospitals as *internal* sites (their test patients only): the model's
   findings there are its own errors, pooled into its error profile;
3. score it as *external* sites at unseen hospitals: one per planted label convention
   (psoas left out, IMAT included, paraspinals left out, contours 2 px tight, VAT range
   -190..-30) and two reference-convention hospitals;
4. attribute every finding with the coordinator's own function
   (``common.attribution.study_attribution``) and count (:func:`score`): a site convention
   the report names (a ``site_convention`` finding or the site's label audit) is correct when
   the hospital's planted convention implies it (:data:`EXPECTED`); recall is over the planted
   conventions' primary findings.

Every site is scored with ``client.site_tasks.run_evaluate``, the function the ClientApp
runs. Prints one line per hospital and the precision / recall; ``--json`` for machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _util import print_table, set_threads

from common.attribution import study_attribution, systematic_in_profile
from common.dataset import load_site
from common.splits import split_site
from protocols.classes import IOU_BINS
from protocols.payloads import EvaluationPayload
from protocols.study import StudyConfig

#: Per demo profile key: the findings its convention implies (the first is the one to find).
EXPECTED: dict[str, tuple[str, ...]] = {
    "psoas left out": ("muscle:site_excludes:psoas",),
    "IMAT included in muscle": ("muscle:site_includes:intramuscular_fat", "muscle:site_includes:boundary"),
    "paraspinals left out": ("muscle:site_excludes:paraspinal",),
    "contours drawn 2 px tight": ("muscle:site_excludes:boundary",),
    "VAT range -190..-30": ("visceral_fat:site_includes:boundary", "visceral_fat:site_includes:other"),
}
#: Demo profile indices (``common.demo.hospitals.SITE_PROFILES``).
REFERENCE, NOISY_REFERENCE = 0, 6
PLANTED = (1, 2, 3, 4, 5)
#: The suite's defaults (bench/README.md's numbers), for :func:`run_suite` and the command line alike.
SLICES, SIZE, IMAGE_SIZE, EPOCHS, ENCODER, TRAIN_SITES, SEEDS, LR = 24, 192, 192, 30, "resnet18", 2, 2, 1e-3
#: The seed's headline bin: muscle IoU >= 0.9.
TOP_BIN = IOU_BINS[0]


@dataclass
class SiteOutcome:
    """One hospital of the suite: what it is, how it was scored and what was attributed."""

    site: str
    convention: str
    role: str
    n_used: int
    muscle_ge_09: float | None
    systematic: dict[str, str] = field(default_factory=dict)  # finding key -> attribution
    audit: list[str] = field(default_factory=list)  # label-audit conventions


@dataclass
class SuiteResult:
    sites: list[SiteOutcome]
    model_errors: list[str]
    precision: float | None
    recall: float
    true_positive: int
    false_positive: list[str]
    missed: list[str]
    train_seconds: float
    internal_muscle_ge_09: float | None


def _top_bin(payloads: list[EvaluationPayload]) -> tuple[int, int]:
    """Slices with muscle IoU >= 0.9 and slices binned, summed over ``payloads`` (bins add)."""
    bins = [p.scores["muscle"].bins for p in payloads if "muscle" in p.scores]
    return sum(b.get(TOP_BIN, 0) for b in bins), sum(sum(b.values()) for b in bins)


def _share_ge_09(*payloads: EvaluationPayload) -> float | None:
    """Share of the slices with muscle IoU >= 0.9 (None when no slice was binned)."""
    hits, total = _top_bin(list(payloads))
    return hits / total if total else None


def score(sites: list[SiteOutcome]) -> tuple[float | None, float, int, list[str], list[str]]:
    """Precision and recall of the site conventions the coordinator's report names.

    The report names a site convention in two places: a systematic finding attributed
    ``site_convention``, and the site's label audit (its "label conventions" section, which
    needs no model). A claim in either counts; a key claimed in both counts once. A planted
    convention is missed when neither names its primary finding, or when the model comparison
    shows it but attributes it to anything else (the report would then contradict itself).
    A model whose own error cancels the convention (a model that under-segments the muscle
    boundary at a site that draws it tight) shows no finding at all: the audit still names it.
    """
    tp, false_positive, missed = 0, [], []
    planted = [s for s in sites if s.convention in EXPECTED]
    for s in sites:
        claimed = sorted({k for k, a in s.systematic.items() if a == "site_convention"} | set(s.audit))
        allowed = EXPECTED.get(s.convention, ())
        for key in claimed:
            if key in allowed:
                tp += 1
            else:
                false_positive.append(f"{s.site}: {key}")
    for s in planted:
        primary = EXPECTED[s.convention][0]
        attributed = s.systematic.get(primary)
        if attributed not in (None, "site_convention") or (attributed is None and primary not in s.audit):
            missed.append(f"{s.site}: {primary}" + (f" (attributed {attributed})" if attributed else ""))
    claimed_total = tp + len(false_positive)
    precision = tp / claimed_total if claimed_total else None
    recall = (len(planted) - len(missed)) / len(planted) if planted else 0.0
    return precision, recall, tp, false_positive, missed


def audit_only(sites: list[SiteOutcome]) -> list[str]:
    """Planted conventions the label audit names but the model comparison does not show."""
    return [
        f"{s.site}: {EXPECTED[s.convention][0]}"
        for s in sites
        if s.convention in EXPECTED
        and EXPECTED[s.convention][0] not in s.systematic
        and EXPECTED[s.convention][0] in s.audit
    ]


def run_suite(
    work: Path,
    *,
    slices: int = SLICES,
    size: int = SIZE,
    image_size: int = IMAGE_SIZE,
    epochs: int = EPOCHS,
    encoder: str = ENCODER,
    train_sites: int = TRAIN_SITES,
    seeds: int = SEEDS,
    lr: float = LR,
) -> SuiteResult:
    """Make the hospitals under ``work``, train, score, attribute (see the module docstring)."""
    import torch  # torch and what imports it load here, so that score() is importable without them

    from client.site_tasks import run_evaluate, training_samples
    from common.demo.hospitals import SITE_PROFILES, make_site
    from common.model import build_model
    from common.training import TrainConfig, train_local

    study = StudyConfig.from_run_config(
        {"model.encoder": encoder, "model.image-size": image_size, "train.test-fraction": 0.25}
    )
    trainers = []
    for i in range(train_sites):
        profile = SITE_PROFILES[(REFERENCE, NOISY_REFERENCE)[i % 2]]
        trainers.append(
            load_site(make_site(work / f"train-{i}", profile, slices=slices, size=size, seed=100 + i))
        )
    externals = []
    for seed in range(seeds):
        for index in (*PLANTED, REFERENCE, NOISY_REFERENCE):
            profile = SITE_PROFILES[index]
            path = make_site(
                work / f"ext-{index}-{seed}", profile, slices=slices, size=size, seed=500 + 10 * seed + index
            )
            externals.append((profile.key, path))
    train, val = [], []
    for site in trainers:  # the split a training study makes (the test patients are never loaded)
        split = split_site(site, study.train)
        train += training_samples(site, split.train)[0]
        val += training_samples(site, split.val)[0] if split.val else []
    torch.manual_seed(0)
    model = build_model(study.model)
    started = time.perf_counter()
    config = TrainConfig(local_epochs=epochs, optimizer="adam", lr=lr, augment=True)
    train_local(model, study.model, train, val, config)
    train_seconds = time.perf_counter() - started

    payloads: dict[str, EvaluationPayload] = {}
    conventions: dict[str, str] = {}
    for i, site in enumerate(trainers):
        payloads[site.name] = run_evaluate(site, model, study.model, study, role="internal").payload
        conventions[site.name] = f"reference (trained on, #{i})"
    for key, path in externals:
        site = load_site(path)
        name = f"{site.name}@{path.name}"
        payloads[name] = run_evaluate(site, model, study.model, study, role="external").payload
        conventions[name] = key
    profile, attributed = study_attribution(payloads, study.protocol)
    outcomes = []
    for name, payload in payloads.items():
        audit = payload.label_audit.findings if payload.label_audit else []
        outcomes.append(
            SiteOutcome(
                site=name,
                convention=conventions[name],
                role=str(payload.role),
                n_used=payload.n_used,
                muscle_ge_09=_share_ge_09(payload),
                systematic={
                    f"{f.tissue}:{f.direction}:{f.region}": str(f.attribution)
                    for f in attributed.get(name, [])
                    if f.systematic
                },
                audit=[f"{c.tissue}:{c.direction}:{c.region}" for c in audit],
            )
        )
    precision, recall, tp, fp, missed = score(outcomes)
    return SuiteResult(
        sites=outcomes,
        model_errors=systematic_in_profile(profile) if profile else [],
        precision=precision,
        recall=recall,
        true_positive=tp,
        false_positive=fp,
        missed=missed,
        train_seconds=train_seconds,
        internal_muscle_ge_09=_share_ge_09(*(payloads[site.name] for site in trainers)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="where the demo hospitals are written")
    parser.add_argument("--slices", type=int, default=SLICES, help="labelled slices per hospital")
    parser.add_argument("--size", type=int, default=SIZE, help="CT image size (pixels)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="model input size")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--encoder", default=ENCODER)
    parser.add_argument("--train-sites", type=int, default=TRAIN_SITES)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="hospitals per profile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    result = run_suite(
        args.work_dir,
        slices=args.slices,
        size=args.size,
        image_size=args.image_size,
        epochs=args.epochs,
        encoder=args.encoder,
        train_sites=args.train_sites,
        seeds=args.seeds,
    )
    if args.json:
        print(json.dumps(result, default=lambda o: o.__dict__, indent=2))
        return 0
    rows = [
        [
            s.site,
            s.convention,
            s.role,
            str(s.n_used),
            "-" if s.muscle_ge_09 is None else f"{s.muscle_ge_09:.0%}",
            "; ".join(f"{k}={a}" for k, a in sorted(s.systematic.items())) or "-",
            ", ".join(s.audit) or "-",
        ]
        for s in result.sites
    ]
    print_table(
        [
            "site",
            "convention",
            "role",
            "n",
            "muscle>=0.9",
            "systematic findings = attribution",
            "label audit",
        ],
        rows,
    )
    errors = ", ".join(result.model_errors) or "none"
    print(f"\nmodel's own systematic errors (internal test patients): {errors}")
    share = result.internal_muscle_ge_09
    print(
        f"internal muscle IoU >= 0.9: {'n/a' if share is None else f'{share:.0%}'} of the internal test "
        f"slices; training {result.train_seconds:.0f} s"
    )
    p = "n/a" if result.precision is None else f"{result.precision:.2f}"
    print(
        f"site conventions named: precision {p} ({result.true_positive} correct), recall {result.recall:.2f}"
    )
    for line in result.false_positive:
        print(f"  false site_convention: {line}")
    for line in result.missed:
        print(f"  missed: {line}")
    for line in audit_only(result.sites):
        print(f"  named by the label audit only (no systematic finding): {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
