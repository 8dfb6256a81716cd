"""How fast does this CPU segment L3 slices? Forward passes of the study U-Net per slice.

Prints ms per slice and slices/s for the seed model (U-Net resnet34 at 512 x 512) and
lighter demo settings (256 / 128 px with light encoders), the speed-up over the seed
setting, and for the demo settings one training step (forward + backward + RMSprop) per
slice. No assertions: numbers for planning round timeouts and demo sizes. Timings on a
shared machine are noisy: compare ratios from the same run.

    python bench/bench_inference.py            # 2 threads, median of 3 batches per setting
    python bench/bench_inference.py --quick    # the seed setting and two light settings only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import print_table, set_threads, time_call

from common.loss import SeedLoss
from common.model import ModelSpec, build_model

SEED = ("resnet34", 512)
LIGHT = [
    ("resnet18", 256),
    ("resnet18", 128),
    ("mobilenet_v2", 128),
    ("efficientnet-b0", 128),
    ("timm-tf_efficientnet_lite0", 128),
]
QUICK_LIGHT = [("resnet18", 128), ("mobilenet_v2", 128)]


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeat: int) -> float:
    """Median seconds of one eval-mode forward pass of the batch ``x``."""
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return time_call(run, repeat=repeat)


def train_step_seconds(model: torch.nn.Module, x: torch.Tensor, repeat: int) -> float:
    """Median seconds of one training step (seed loss, RMSprop) on the batch ``x``."""
    model.train()
    loss_fn = SeedLoss()
    optimiser = torch.optim.RMSprop(model.parameters(), lr=2e-4)
    target = torch.randint(0, 4, (x.shape[0], *x.shape[2:]), generator=torch.Generator().manual_seed(0))

    def run() -> None:
        optimiser.zero_grad()
        loss_fn(model(x), target).backward()
        optimiser.step()

    return time_call(run, repeat=repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="slices per forward pass")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only two light settings")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step column")
    args = parser.parse_args()
    set_threads(args.threads)
    repeat = args.repeat
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, median {repeat}"
    )

    rows: list[list[str]] = []
    seed_s = 0.0
    for encoder, size in [SEED, *(QUICK_LIGHT if args.quick else LIGHT)]:
        torch.manual_seed(0)
        model = build_model(ModelSpec(encoder=encoder, image_size=size))
        x = torch.rand(args.batch, 1, size, size)
        per_slice = forward_seconds(model, x, repeat) / args.batch
        seed_s = seed_s or per_slice
        train = "-"
        if not args.no_train and (encoder, size) != SEED:
            train = f"{train_step_seconds(model, x, repeat) / args.batch * 1000:.0f}"
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append(
            [
                f"unet/{encoder}",
                str(size),
                f"{params:.1f}",
                f"{per_slice * 1000:.0f}",
                f"{1 / per_slice:.1f}",
                f"{seed_s / per_slice:.1f}x",
                train,
            ]
        )
        print(f"  done {encoder} @ {size}", file=sys.stderr)
    print_table(["model", "px", "Mparams", "fwd ms/slice", "slices/s", "vs seed", "train ms/slice"], rows)


if __name__ == "__main__":
    main()
