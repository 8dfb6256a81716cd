"""Convention-aware federated training (issue 17): does every hospital's data teach the protocol?

Demo hospitals (``common.demo.hospitals``), each its own patients (own seed):
two that label by the reference (Alberta) convention, and three that do not: psoas left
out, IMAT included in muscle, contours drawn 2 px tight. A sixth, reference-convention
hospital with patients of its own is held out and scores every arm. ``--held-out scanner``
(the default) gives it a scanner no training hospital has (:data:`HELD_OUT_SCANNER`), so no
arm has seen its images; ``--held-out reference-like`` uses the first reference hospital's
scanner, which only favours the arm that trains on that hospital alone.

Four arms, one run, same recipe, same initial weights, same rounds x local epochs:

- (a) ``reference only``: FedAvg over the two reference hospitals;
- (b) ``plain, all``: FedAvg over all five with the seed's loss on their own labels;
- (c) ``convention-aware, all``: FedAvg over all five, each site training on the targets
  its own audit gives (``common.label_conventions.plan_conventions``: the same function
  ``client.site_tasks.run_train`` calls with ``train.convention-aware``), weighted by
  training slices (sarcofed before 2026-12-03);
- (d) ``convention-aware, weighted``: (c) with each site weighted as the coordinator weighs
  a convention-aware reply now (``server.training.training_weight`` on the reply's metrics
  from ``client.site_tasks.convention_metrics``): slices x the share of labelled pixels that
  still teach;
- (e) ``all, reference labels``: FedAvg over all five, each on the reference-convention labels
  the demo drew for its own images (what the hospitals would teach if they all labelled by the
  protocol): the bound for (c) and (d), which (a) is not.

``--arms acd`` runs only those arms. ``--alone KEY`` instead trains that one hospital alone
three ways (its own labels, its convention-aware targets, and the reference-convention labels
the demo drew for the same images) and scores each on the held-out hospital: what the
adjustment teaches, against what the truth would.

The federation runs in-process (``common.training.train_local`` per site, FedAvg of the state
dicts weighted by training slices, as Flower's FedAvg does): Flower per arm would triple the
run time on 2 cores without changing the arithmetic. Every site trains on all its slices
(no validation or test split: the held-out hospital is the test).

Scores on the held-out hospital, at its native resolution, against its reference labels:
muscle IoU pooled over pixels (the network's prediction, and cut to the protocol's HU ranges
as the study reports it), psoas recall (share of the phantom's psoas pixels, reference muscle,
predicted muscle) and the SMI bias (mean over slices of predicted minus labelled muscle area
over height squared, cm^2/m^2).

    python bench/bench_conventions.py          # 128 px sites, 96 px model, 12 slices/site, 12 x 3 epochs
    python bench/bench_conventions.py --json   # the table as JSON
    python bench/bench_conventions.py --slices 32 --alone "contours drawn 2 px tight"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import print_table, set_threads

from client.site_tasks import convention_metrics
from common.demo.hospitals import SITE_PROFILES, DemoSlice, ScannerProfile, SiteProfile, demo_slices
from common.demo.structures import Structure
from common.evaluation import harmonise
from common.label_conventions import plan_conventions
from common.model import ModelSpec, build_model
from common.preprocess import logits_to_native, to_model_input
from common.training import TrainConfig, TrainSample, train_local
from protocols import keys
from protocols.protocol import ALBERTA
from server.training import training_weight

#: The held-out hospital's own scanner: between the training hospitals' kernels and noise,
#: equal to none of them.
HELD_OUT_SCANNER = ScannerProfile(
    fov_mm=(370, 430), noise_sd=18, blur_mm=1.0, signed=True, intercept=-1024, summary="held-out scanner"
)
REFERENCE_KEYS = ("reference-like", "reference-like, noisy scanner")
OTHER_KEYS = ("psoas left out", "IMAT included in muscle", "contours drawn 2 px tight")
ARMS = (
    "reference only",
    "plain, all",
    "convention-aware, all",
    "convention-aware, weighted",
    "all, reference labels",
)


def _profile(key: str) -> SiteProfile:
    return next(p for p in SITE_PROFILES if p.key == key)


@dataclass
class Site:
    name: str
    samples: list[TrainSample]
    #: what the site's training reply says besides num-examples (the weight's other inputs)
    metrics: dict[str, float] = field(default_factory=dict)


def _samples(slices: Sequence[DemoSlice]) -> list[TrainSample]:
    return [
        TrainSample(hu=s.hu, label=s.label, group=str(s.patient), spacing_mm=(s.spacing_mm, s.spacing_mm))
        for s in slices
    ]


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts (integer buffers rounded back), as Flower's FedAvg."""
    total = float(sum(weights))
    out = {}
    for name, first in states[0].items():
        mean = sum(s[name].double() * (w / total) for s, w in zip(states, weights, strict=True))
        out[name] = mean.round().to(first.dtype) if not first.is_floating_point() else mean.to(first.dtype)
    return out


def federate(
    sites: Sequence[Site], spec: ModelSpec, config: TrainConfig, rounds: int, init: dict[str, torch.Tensor]
) -> torch.nn.Module:
    model, local = build_model(spec), build_model(spec)
    model.load_state_dict(init)
    for r in range(rounds):
        states, weights = [], []
        for site in sites:
            local.load_state_dict(model.state_dict())
            result = train_local(
                local, spec, site.samples, [], config.model_copy(update={"seed": config.seed + r})
            )
            states.append(result.state_dict)
            weights.append(training_weight({keys.NUM_EXAMPLES: float(result.n_train), **site.metrics}))
        model.load_state_dict(fedavg(states, weights))
    return model


@dataclass
class Scores:
    muscle_iou: float
    muscle_iou_hu: float
    psoas_recall: float
    smi_bias: float
    smi_bias_sd: float


def score(model: torch.nn.Module, spec: ModelSpec, held_out: Sequence[DemoSlice]) -> Scores:
    model.eval()
    inter = union = inter_hu = union_hu = 0
    psoas_hit = psoas_n = 0
    diffs = []
    with torch.inference_mode():
        for s in held_out:
            logits = model(to_model_input(s.hu, spec.image_size, spec.hu_window)[None])[0]
            pred = logits_to_native(logits, s.hu.shape)
            truth = s.reference == 1
            mine = pred == 1
            inter += int(np.count_nonzero(mine & truth))
            union += int(np.count_nonzero(mine | truth))
            cut = harmonise(pred, s.hu, ALBERTA.hu_ranges) == 1
            inter_hu += int(np.count_nonzero(cut & truth))
            union_hu += int(np.count_nonzero(cut | truth))
            psoas = truth & (s.structures == Structure.psoas)
            psoas_hit += int(np.count_nonzero(psoas & mine))
            psoas_n += int(np.count_nonzero(psoas))
            px_cm2 = s.spacing_mm**2 / 100.0
            diffs.append((np.count_nonzero(cut) - np.count_nonzero(truth)) * px_cm2 / s.anatomy.height_m**2)
    return Scores(
        inter / union,
        inter_hu / union_hu,
        psoas_hit / psoas_n,
        float(np.mean(diffs)),
        float(np.std(diffs, ddof=1)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="demo image size (px)")
    parser.add_argument("--model-size", type=int, default=96)
    parser.add_argument("--slices", type=int, default=12, help="per hospital")
    parser.add_argument("--held-out-slices", type=int, default=24)
    parser.add_argument(
        "--held-out",
        choices=("scanner", "reference-like"),
        default="scanner",
        help="the held-out hospital's scanner: its own (default) or the first reference hospital's",
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--arms",
        default="abcd",
        help="which arms to run, by letter (default abcd; e: every hospital on the reference labels "
        "the demo drew for its images, the bound no convention adjustment can pass)",
    )
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=OTHER_KEYS,
        help="leave this hospital out of every arm (an ablation: which convention costs what)",
    )
    parser.add_argument(
        "--alone",
        choices=OTHER_KEYS,
        default=None,
        help="train this hospital alone: own labels, convention-aware targets, reference labels",
    )
    parser.add_argument(
        "--truth-at",
        action="append",
        default=[],
        choices=OTHER_KEYS,
        help="this hospital trains on the reference labels of its images in arms (c) and (d): "
        "how much of the gap to (e) its adjustments leave",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    started = time.perf_counter()

    def hospital(key: str, i: int) -> list[DemoSlice]:
        return list(demo_slices(_profile(key), slices=args.slices, size=args.size, seed=100 + i))

    reference = [Site(k, _samples(hospital(k, i))) for i, k in enumerate(REFERENCE_KEYS)]
    others_slices = [(k, hospital(k, 10 + i)) for i, k in enumerate(OTHER_KEYS) if k not in args.without]
    plain = [Site(k, _samples(s)) for k, s in others_slices]
    oracle = [
        *reference,
        *(
            Site(k, [replace(t, label=d.reference) for t, d in zip(_samples(s), s, strict=True)])
            for k, s in others_slices
        ),
    ]
    truth = {site.name: site for site in oracle}
    aware, weighted, plans = [], [], {}
    for site in [*reference, *plain]:
        if site.name in args.truth_at:
            plans[site.name] = ((), {"reference labels": 1.0})
            aware.append(truth[site.name])
            weighted.append(truth[site.name])
            continue
        plan = plan_conventions(site.samples, [], ALBERTA)
        plans[site.name] = (plan.adjustments, {k: round(v, 3) for k, v in plan.tally.shares().items()})
        aware.append(Site(site.name, plan.train))
        reply = convention_metrics(plan.tally.shares(), plan.tally.slices)
        weighted.append(Site(site.name, plan.train, reply))
    held_profile = _profile("reference-like")
    if args.held_out == "scanner":
        held_profile = replace(held_profile, scanner=HELD_OUT_SCANNER)
    held_out = list(demo_slices(held_profile, slices=args.held_out_slices, size=args.size, seed=999))
    spec = ModelSpec(encoder=args.encoder, image_size=args.model_size)
    config = TrainConfig(local_epochs=args.local_epochs, lr=1e-3, optimizer="adam", seed=args.seed)
    torch.manual_seed(args.seed)
    init = {k: v.clone() for k, v in build_model(spec).state_dict().items()}
    every = dict(zip(ARMS, (reference, [*reference, *plain], aware, weighted, oracle), strict=True))
    arms = {
        name: sites
        for letter, (name, sites) in zip("abcde", every.items(), strict=True)
        if letter in args.arms
    }
    if args.alone is not None:
        own = hospital(args.alone, 10 + OTHER_KEYS.index(args.alone))
        adjusted = next(s for s in aware if s.name == args.alone)
        truth = [replace(t, label=s.reference) for t, s in zip(_samples(own), own, strict=True)]
        arms = {
            f"{args.alone} alone, own labels": [Site(args.alone, _samples(own))],
            f"{args.alone} alone, convention-aware": [adjusted],
            f"{args.alone} alone, reference labels": [Site(args.alone, truth)],
        }
    results: dict[str, Scores] = {}
    seconds: dict[str, float] = {}
    for name, sites in arms.items():
        t0 = time.perf_counter()
        results[name] = score(federate(sites, spec, config, args.rounds, init), spec, held_out)
        seconds[name] = time.perf_counter() - t0
    if args.json:
        out = {
            "settings": vars(args),
            "adjustments": plans,
            "arms": {n: vars(s) | {"seconds": seconds[n]} for n, s in results.items()},
        }
        print(json.dumps(out, indent=2))
        return 0
    n_sites = len(REFERENCE_KEYS) + len(OTHER_KEYS)
    print(
        f"{n_sites} training hospitals x {args.slices} slices at {args.size} px, "
        f"held-out reference hospital {args.held_out_slices} slices; {args.encoder} at {args.model_size} px, "
        f"{args.rounds} rounds x {args.local_epochs} local epochs, {args.threads} threads"
    )
    for site, (adj, shares) in plans.items():
        print(f"  {site}: adjustments {list(adj) or 'none'} {shares or ''}")
    rows = [
        [
            name,
            f"{s.muscle_iou:.3f}",
            f"{s.muscle_iou_hu:.3f}",
            f"{s.psoas_recall:.3f}",
            f"{s.smi_bias:+.2f} (sd {s.smi_bias_sd:.2f})",
            f"{seconds[name]:.0f}",
        ]
        for name, s in results.items()
    ]
    header = ["arm", "muscle IoU", "muscle IoU (HU-cut)", "psoas recall", "SMI bias cm2/m2", "s"]
    print_table(header, rows)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
