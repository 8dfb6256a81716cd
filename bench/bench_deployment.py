"""Bench: a validation study on Flower's deployment engine vs the same evaluation run locally.

Starts a real SuperLink (TLS + SuperNode auth) and one SuperNode per demo site on
127.0.0.1 (tests/deploy_harness.py), then runs the validation study twice with
``flwr run`` (the first run also installs the app bundle at every site). Reports:

- start-up: SuperLink up, keys registered, SuperNodes started and connected;
- each run's wall time, ``flwr run`` to final status (identify round, evaluation
  round, report writing, the ServerApp's 3 s grace for late sites);
- local: the same sites evaluated one after another in this process (model in memory);
- ratio = warm run / local, and the fixed overhead (warm run - local) in seconds, which
  is what decides the ratio at seed scale (512 px, hundreds of slices per site);
- the weights message: one packed float32 array, its size.

    python bench/bench_deployment.py --sites 3 --slices 12 --size 128 --encoder resnet18
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _util import print_table, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)

    from deploy_harness import deployment

    from client import site_tasks
    from common.demo.hospitals import make_site, site_profile
    from common.model import ModelSpec, build_model, pack_state, save_model, weights_hash
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
    packed, _layout = pack_state(model.state_dict())
    study = StudyConfig.from_run_config(
        {"model.encoder": args.encoder, "model.image-size": args.size, "eval.batch-size": 4}
    )

    start = time.perf_counter()
    for site in sites:
        site_tasks.run_evaluate(site, model, spec, study, weights_hash(model.state_dict()))
    local = time.perf_counter() - start

    runs: list[float] = []
    start = time.perf_counter()
    with deployment(root / "deploy") as dep:
        for site in sites:
            dep.add_site(site)
        startup = time.perf_counter() - start
        config = {
            "study.mode": "evaluate",
            "study.model": str(model_path),
            "study.min-sites": args.sites,
            "study.output-dir": str(dep.root / "studies"),
            "model.encoder": args.encoder,
            "model.image-size": args.size,
            "eval.batch-size": 4,
        }
        for n in range(2):
            t0 = time.perf_counter()
            status = dep.run(config | {"study.run-name": f"bench-{n}"}, timeout=1800)
            runs.append(time.perf_counter() - t0)
            if not status.ok:
                raise SystemExit(f"run failed: {status}")

    print(
        f"{args.sites} sites x {args.slices} slices, {args.size} px, {args.encoder}, {args.threads} thread(s)"
    )
    print_table(
        ["measure", "seconds"],
        [
            ["start-up (SuperLink, register, SuperNodes)", f"{startup:.1f}"],
            ["run 1 (installs the app bundle)", f"{runs[0]:.1f}"],
            ["run 2 (warm)", f"{runs[1]:.1f}"],
            ["local evaluation, sites in sequence", f"{local:.1f}"],
            ["fixed overhead (run 2 - local)", f"{runs[1] - local:.1f}"],
            ["ratio run 2 / local (goal <= 1.15)", f"{runs[1] / local:.2f}"],
        ],
    )
    print(f"weights message: 1 packed float32 array, {packed.size:,} values, {packed.nbytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
