"""How much does site evaluation cost on top of model inference? (512 x 512, resnet34 U-Net)

Builds a temporary site of ``--slices`` 512 x 512 slices, then times per slice:

- ``read``: ``common.dataset.iter_slices`` (DICOM -> HU, mask read + label mapping);
- ``preprocess``: HU window + resize to the model size (``common.preprocess.to_model_input``);
- ``forward``: the bare network forward pass on the ready batch (pure inference);
- ``postprocess``: logits back to native shape + argmax (``common.preprocess.logits_to_native``);
- ``predict``: ``common.inference.predict_masks``, the three above as evaluation calls them;
- ``metrics``: ``common.evaluation.score_slice`` (overlap, areas, HU, SMI, harmonised rescoring);
- ``end-to-end``: ``common.evaluation.evaluate_site`` from the model.pt path (model load and
  dataset fingerprint included).

Goals: read + pre + post + metrics < 10% of forward; end-to-end / forward <= 1.10.
Timings on a shared machine are noisy: compare ratios from the same run.

    python bench/bench_evaluation.py --slices 8 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.dataset import iter_slices, load_site
from common.evaluation import evaluate_site, score_slice
from common.inference import predict_masks
from common.model import ModelSpec, build_model, load_model, save_model
from common.preprocess import logits_to_native, to_model_input
from protocols.protocol import HuRanges


def _make_site(root: Path, n: int, size: int) -> Path:
    """A site of ``n`` slices drawn by the test phantom (DICOM CT + PNG labels)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures_site import make_site

    return make_site(root, n=n, size=size, label_suffix=".png", spacing_mm=(0.78, 0.78))


def _timed(fn: object, *args: object, **kwargs: object) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)  # type: ignore[operator]
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--encoder", default="resnet34")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    n = args.slices

    with tempfile.TemporaryDirectory(prefix="sarcofed-bench-") as tmp:
        tmp_path = Path(tmp)
        site_root = _make_site(tmp_path / "site", n, args.size)
        spec = ModelSpec(encoder=args.encoder, image_size=args.size)
        torch.manual_seed(0)
        model_path = save_model(tmp_path / "model.pt", build_model(spec), spec)
        loaded, t_load = _timed(load_model, model_path)

        # read
        site = load_site(site_root)
        start = time.perf_counter()
        slices = [s for s in iter_slices(site) if not isinstance(s, Exception)]
        t_read = time.perf_counter() - start
        if len(slices) != n:
            raise SystemExit(f"expected {n} usable slices, got {len(slices)}")
        images = [s.ct.hu for s in slices]

        # pre-processing, pure forward and post-processing, timed apart, same batching as evaluation
        net = loaded.model  # type: ignore[attr-defined]
        predict_masks(net, spec, images, batch_size=args.batch_size)  # warm-up at the real batch shapes
        t_pre = t_forward = t_post = 0.0
        with torch.inference_mode():
            for i in range(0, n, args.batch_size):
                chunk = images[i : i + args.batch_size]
                start = time.perf_counter()
                batch = torch.stack([to_model_input(hu, spec.image_size, spec.hu_window) for hu in chunk])
                t_pre += time.perf_counter() - start
                start = time.perf_counter()
                logits = net(batch)
                t_forward += time.perf_counter() - start
                start = time.perf_counter()
                for lg, hu in zip(logits, chunk, strict=True):
                    logits_to_native(lg, hu.shape)
                t_post += time.perf_counter() - start

        # predict_masks as evaluation calls it (pre + forward + post)
        masks, t_predict = _timed(predict_masks, net, spec, images, batch_size=args.batch_size)

        # metrics
        start = time.perf_counter()
        for s, mask in zip(slices, masks, strict=True):  # type: ignore[call-overload]
            score_slice(
                mask, s.label, s.ct.hu, s.ct.spacing_mm,
                group=s.group, height_m=s.height_m, sex=s.sex, hu_ranges=HuRanges(),
            )  # fmt: skip
        t_metrics = time.perf_counter() - start
        del slices, images, masks

        # end to end
        _, t_e2e = _timed(lambda: evaluate_site(load_site(site_root), model_path, batch_size=args.batch_size))

    totals = {"read": t_read, "preprocess": t_pre, "forward": t_forward, "postprocess": t_post,
              "predict": t_predict, "metrics": t_metrics, "e2e": t_e2e}  # fmt: skip
    _report(args, t_load, totals)


def _report(args: argparse.Namespace, t_load: float, totals: dict[str, float]) -> None:
    n = args.slices
    per = {name: seconds / n * 1000 for name, seconds in totals.items()}
    overhead = per["read"] + per["preprocess"] + per["postprocess"] + per["metrics"]
    print(f"{n} slices {args.size}x{args.size}, {args.encoder} U-Net, ", end="")
    print(f"{args.threads} threads, batch {args.batch_size}")
    print(f"model load          {t_load * 1000:8.1f} ms (once)")
    for name, ms in per.items():
        print(f"{name:<19} {ms:8.1f} ms/slice  {1000 / ms:8.2f} slices/s")
    share = overhead / per["forward"]
    print(f"read + pre + post + metrics = {overhead:.1f} ms/slice = {share:.1%} of forward (goal < 10%)")
    print(f"end-to-end / forward = {per['e2e'] / per['forward']:.3f} (goal <= 1.10)")
    print(f"end-to-end / predict_masks = {per['e2e'] / per['predict']:.3f}")


if __name__ == "__main__":
    main()
