"""What does the discrepancy analysis cost next to U-Net inference? (512 x 512, resnet34)

Renders ``--slices`` demo-phantom slices at 512 x 512 and, per slice, times:

- ``forward``: the bare U-Net forward pass (``encoder_weights=None``, batch 1, inference mode);
- ``analyse``: ``common.discrepancy.analyse_slice`` on a site mask that leaves out the
  paraspinals and draws contours 2 px tight against the reference mask (the costly case:
  body frame, boundary and region pieces, polar map);
- ``accumulate``: ``DiscrepancyAccumulator.add`` and one ``finalise``.

Goal: (analyse + accumulate) / forward <= 0.10. Timings on a shared machine are noisy:
compare ratios from the same run.

    python bench/bench_discrepancy.py --slices 6 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common.demo.anatomy import make_patient
from common.demo.labels import REFERENCE, LabelConvention, canonical_labels
from common.demo.phantom import apply_scanner, render_l3
from common.discrepancy import DiscrepancyAccumulator, analyse_slice
from common.model import ModelSpec, build_model
from common.preprocess import to_model_input


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder", default="resnet34")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    site_convention = LabelConvention(name="bench", include_paraspinal=False, contour_erosion_px=2)
    slices = []
    for _ in range(args.slices):
        phantom = render_l3(make_patient(rng), args.size, float(rng.uniform(360, 440)))
        hu = apply_scanner(phantom.hu, rng, 15.0, 0.8)
        spacing = (phantom.spacing_mm, phantom.spacing_mm)
        ref = canonical_labels(phantom.structures, REFERENCE, hu)
        site = canonical_labels(phantom.structures, site_convention, hu)
        slices.append((hu, spacing, site, ref))

    spec = ModelSpec(encoder=args.encoder, image_size=args.size)
    torch.manual_seed(0)
    net = build_model(spec).eval()
    batches = [to_model_input(hu, spec.image_size, spec.hu_window)[None] for hu, *_ in slices]
    with torch.inference_mode():
        net(batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            net(batch)
        t_forward = (time.perf_counter() - start) / len(batches)

    analyse_slice(*slices[0])  # warm-up
    start = time.perf_counter()
    results = [analyse_slice(*s) for s in slices]
    t_analyse = (time.perf_counter() - start) / len(slices)
    start = time.perf_counter()
    acc = DiscrepancyAccumulator()
    for result in results:
        acc.add(result)
    summary = acc.finalise(min_slices=1)
    t_acc = (time.perf_counter() - start) / len(slices)

    found = ", ".join(f"{f.tissue}/{f.direction}/{f.region}" for f in summary.findings if f.systematic)
    ratio = (t_analyse + t_acc) / t_forward
    print(f"{len(slices)} slices {args.size}x{args.size}, {args.encoder} U-Net, {args.threads} threads")
    print(f"forward      {t_forward * 1000:8.1f} ms/slice")
    print(f"analyse      {t_analyse * 1000:8.1f} ms/slice")
    print(f"accumulate   {t_acc * 1000:8.1f} ms/slice (incl. one finalise)")
    print(f"systematic findings: {found or 'none'}")
    print(f"discrepancy / forward = {ratio:.3f} (goal <= 0.10)")


if __name__ == "__main__":
    main()
