"""How much of a training step is data loading, first round (cold cache) vs later rounds (warm)?

Each Flower message starts a fresh ClientApp, so a site re-reads its slices every round;
the site's slice cache (``common.slice_cache``) keeps the decoded slices between rounds.
For demo sites (``common.demo.hospitals.make_site``, one per ``--profiles`` entry: each
profile is another mask format and DICOM transfer syntax) this times one "round" of loading
every slice as a fresh process would (``load_site`` + ``iter_slices``) plus preprocessing to
model size (``to_model_input``, ``mask_to_size``), three ways:

- ``no cache``: site.toml ``cache_dir = false`` (today's behaviour before the cache),
- ``cold``: first round, empty cache (decodes and writes the entries),
- ``warm``: later rounds (a new ``SiteDataset`` and ``SliceCache``, as in a new process).

and one training step (forward + backward + RMSprop, seed loss) of the U-Net at ``--batch``.
It prints ms per slice (load, and preprocessing apart: the cache holds decoded slices, not
model inputs) and the load + preprocessing of one batch as a share of the whole step (that
+ one training step). The issue's goal: <= 5% after the first round. Files were just
written, so the OS page cache is warm in every column: the disk read of a true cold start is
not in these numbers. Ratios from one run; timings on a shared machine are noisy.

    python bench/bench_data_loading.py                            # 512 px, resnet34, batch 4
    python bench/bench_data_loading.py --size 64 --slices 4 --encoder resnet18 --repeat 1  # smoke
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import print_table, set_threads, time_call

from common.dataset import LoadedSlice, iter_slices, load_site
from common.demo.hospitals import SITE_PROFILES, make_site
from common.loss import SeedLoss
from common.model import ModelSpec, build_model
from common.preprocess import mask_to_size, to_model_input


def load_round(site_dir: Path, spec: ModelSpec) -> tuple[float, float, int]:
    """Seconds to load every slice as a fresh ClientApp would (``load_site`` + ``iter_slices``),
    seconds to preprocess them to model size, and the number of slices loaded."""
    start = time.perf_counter()
    site = load_site(site_dir)
    loaded = [item for item in iter_slices(site) if isinstance(item, LoadedSlice)]
    load = time.perf_counter() - start
    start = time.perf_counter()
    for item in loaded:
        to_model_input(item.ct.hu, spec.image_size, spec.hu_window)
        mask_to_size(item.label, spec.image_size)
    return load, time.perf_counter() - start, len(loaded)


def train_step_seconds(spec: ModelSpec, batch: int, repeat: int) -> float:
    """Median seconds of one training step (seed loss, RMSprop) on a random batch."""
    torch.manual_seed(0)
    model = build_model(spec)
    model.train()
    loss_fn = SeedLoss()
    optimiser = torch.optim.RMSprop(model.parameters(), lr=2e-4)
    x = torch.rand(batch, 1, spec.image_size, spec.image_size)
    target = torch.randint(0, 4, (batch, spec.image_size, spec.image_size))

    def run() -> None:
        optimiser.zero_grad()
        loss_fn(model(x), target).backward()
        optimiser.step()

    return time_call(run, repeat=repeat)


def _disable_cache(site_dir: Path) -> None:
    toml = site_dir / "site.toml"
    lines = toml.read_text(encoding="utf-8").splitlines()
    toml.write_text("\n".join([lines[0], "cache_dir = false", *lines[1:]]) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="slice and model size in pixels")
    parser.add_argument("--slices", type=int, default=12, help="slices per demo site")
    parser.add_argument(
        "--profiles",
        default="0,1,4",
        help=f"demo site profiles, comma-separated (0..{len(SITE_PROFILES) - 1})",
    )
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="warm rounds, and training steps timed")
    args = parser.parse_args()
    set_threads(args.threads)
    spec = ModelSpec(encoder=args.encoder, image_size=args.size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} px, "
        f"unet/{args.encoder}, batch {args.batch}, {args.slices} slices per site"
    )
    step = train_step_seconds(spec, args.batch, args.repeat)
    print(f"  training step: {step * 1000:.0f} ms per batch of {args.batch}", file=sys.stderr)

    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-loading-") as work:
        for index in (int(p) for p in args.profiles.split(",")):
            profile = SITE_PROFILES[index]
            site_dir = make_site(Path(work) / f"site-{index}", profile, slices=args.slices, size=args.size)
            plain = Path(work) / f"plain-{index}"
            shutil.copytree(site_dir, plain)
            _disable_cache(plain)
            load_round(plain, spec)  # imports and first-touch costs out of every column
            uncached, prep, n = load_round(plain, spec)
            cold, _, _ = load_round(site_dir, spec)
            warm = min(load_round(site_dir, spec)[0] for _ in range(max(1, args.repeat)))
            if n == 0:
                print(f"  profile {index}: no usable slice", file=sys.stderr)
                continue
            per_slice = {"none": uncached / n, "cold": cold / n, "warm": warm / n}
            # one batch: load + preprocess args.batch slices, then one training step
            share = {
                name: (t + prep / n) * args.batch / ((t + prep / n) * args.batch + step)
                for name, t in per_slice.items()
            }
            rows.append(
                [
                    f"{index} {profile.name}",
                    profile.mask_suffix,
                    str(n),
                    *(f"{per_slice[name] * 1000:.1f}" for name in ("none", "cold", "warm")),
                    f"{prep / n * 1000:.1f}",
                    f"{uncached / warm:.1f}x",
                    *(f"{share[name]:.1%}" for name in ("none", "cold", "warm")),
                    "yes" if share["warm"] <= 0.05 else "NO",
                ]
            )
            print(f"  done profile {index}", file=sys.stderr)
    print_table(
        [
            "site profile",
            "mask",
            "slices",
            "load ms/slice: no cache",
            "cold",
            "warm",
            "preprocess ms/slice",
            "load none/warm",
            "share of step: no cache",
            "cold",
            "warm",
            "warm <= 5%",
        ],
        rows,
    )
    print(
        f"share of step = (load + preprocess) of one batch of {args.batch} / (that + one training step "
        f"of {step * 1000:.0f} ms); load = load_site + iter_slices as a fresh ClientApp does each round"
    )


if __name__ == "__main__":
    main()
