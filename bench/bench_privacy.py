"""The cost of a site's release policy in utility: exact vs differentially private pooled numbers.

Scores one model at every demo site (as ``client.site_tasks.run_evaluate`` does), then
releases each site's reply twice through the site's own ``client.guard.policy_release``:
under the default policy (exact numbers; medians and quartiles withheld) and with
``[aggregate-dp]`` at ``--epsilon`` per reply, ``--draws`` times to show the spread of the
noise. Pools each with the coordinator's ``common.pooling.pool_payloads`` and prints the
pooled muscle-IoU bin shares, the pooled mean muscle-area difference and its limits of
agreement, exact vs DP, and the time the DP release adds per reply (one run; nothing is
asserted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _util import print_table, set_threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model.pt (e.g. the demo study's)")
    parser.add_argument("--sites", type=Path, required=True, help="a folder of site folders (demo-sites)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="epsilon per reply (the policy default)")
    parser.add_argument("--draws", type=int, default=50, help="DP releases per site, for the noise's spread")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from client.guard import policy_release
    from client.ledger import ReleaseLedger
    from client.policy import AggregateDp, SitePolicy
    from client.site_tasks import run_evaluate
    from common.dataset import load_site
    from common.model import load_model
    from common.pooling import limits_of_agreement, pool_payloads
    from protocols.payloads import EvaluationPayload
    from protocols.study import StudyConfig

    loaded = load_model(args.model)
    study = StudyConfig()
    scored = {}
    started = time.perf_counter()
    for folder in sorted(p for p in args.sites.iterdir() if (p / "manifest.csv").exists()):
        site = load_site(folder)
        scored[site.name] = run_evaluate(site, loaded.model, loaded.spec, study)
    evaluation_s = time.perf_counter() - started

    exact_policy = SitePolicy()
    default_dp = AggregateDp()
    dp_policy = SitePolicy(
        aggregate_dp=AggregateDp(
            enabled=True,
            epsilon_per_reply=args.epsilon,
            epsilon_per_study=max(args.epsilon, default_dp.epsilon_per_study),
            epsilon_total=max(args.epsilon, default_dp.epsilon_total),
        )
    )
    refusals: dict[str, str] = {}
    # a ledger that never exists: each release is judged afresh and nothing is recorded
    empty = tempfile.TemporaryDirectory()
    no_history = ReleaseLedger(Path(empty.name) / "bench.releases.jsonl")

    def release(site: str, policy: SitePolicy) -> EvaluationPayload:
        """The reply exactly as the site's guard would release it (before screening and audit)."""
        result = scored[site]
        out = policy_release(result.payload, result.records, policy, no_history)
        if out.refusal:
            refusals[site] = out.refusal
        return out.payload

    def summary(payloads: dict[str, EvaluationPayload]) -> dict[str, float | None]:
        pooled = pool_payloads(payloads)
        bins = pooled.scores["muscle"].bins
        total = sum(bins.values()) or 1
        area = pooled.areas.get("muscle")
        loa = limits_of_agreement(area.mean_diff_cm2, area.sd_diff_cm2) if area else None
        out: dict[str, float | None] = {f"muscle {b}": bins.get(b, 0) / total for b in bins}
        out["mean muscle area diff (cm2)"] = area.mean_diff_cm2 if area else None
        out["LoA low (cm2)"], out["LoA high (cm2)"] = loa if loa else (None, None)
        return out

    exact = summary({s: release(s, exact_policy) for s in scored})
    draws: list[dict[str, float | None]] = []
    dp_s = 0.0
    for _ in range(args.draws):
        clock = time.perf_counter()
        released = {s: release(s, dp_policy) for s in scored}
        dp_s += time.perf_counter() - clock
        draws.append(summary(released))
    rows = []
    for key, value in exact.items():
        values = [d[key] for d in draws if d[key] is not None]
        if value is None or not values:
            rows.append([key, "-" if value is None else f"{value:.3f}", "not released", "-"])
            continue
        mean, sd = statistics.fmean(values), statistics.pstdev(values)
        diff = statistics.fmean(abs(v - value) for v in values)
        rows.append([key, f"{value:.3f}", f"{mean:.3f} ± {sd:.3f}", f"{diff:.3f}"])
    n_slices = sum(r.payload.n_used for r in scored.values())
    print(
        f"{len(scored)} sites, {n_slices} slices, epsilon {args.epsilon:g} per reply, {args.draws} DP draws\n"
    )
    print_table(
        ["pooled statistic", "exact", f"DP (mean ± sd over {args.draws} draws)", "mean |DP - exact|"], rows
    )
    for site, reason in sorted(refusals.items()):
        print(f"note: {site}'s policy would refuse its reply ({reason}); shown as released anyway")
    per_reply = dp_s / (args.draws * len(scored))
    print(
        f"\ntime: evaluation {evaluation_s / len(scored):.2f} s per site; the DP release adds "
        f"{1000 * per_reply:.1f} ms per reply ({100 * per_reply / (evaluation_s / len(scored)):.2f}% of it)"
    )
    empty.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
