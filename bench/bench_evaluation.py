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

Each is timed twice: ``today`` (fp32, contiguous memory: the path before issue 16, and the
reference ``common.device.REFERENCE``) and ``after`` (the ``auto`` inference path of
``common.device.resolve_compute`` on this machine for ``--slices`` slices, e.g. ``cpu fp32
onnxruntime`` from 32 slices where ONNX Runtime is installed, else ``cpu fp32 channels_last``),
and the run prints site evaluation throughput (end-to-end slices/s) today vs after; ``after``'s
end to end includes its ONNX export. ``--also`` times more paths (``torch-cl``: channels_last
PyTorch, ``bf16``: bf16 autocast) for the table.

The arithmetic bound: the network's GFLOP per slice (``torch.utils.flop_counter``), a 4096 x
4096 fp32 matmul's GFLOP/s on the same threads (what this CPU sustains), and the GFLOP/s each
path's forward reaches; from them, the fastest an fp32 forward could be here. A short training
comparison follows: ``--train-steps`` steps of batch ``--batch-size`` at ``--train-size`` px,
fp32 contiguous vs the ``auto`` training path (e.g. ``cpu bf16 channels_last``), ms per step.

Goals: read + pre + post + metrics < 10% of forward; end-to-end / forward <= 1.10; after >= 2x
today's slices/s (issue 16). Timings on a shared machine are noisy: compare ratios from the same run.

    python bench/bench_evaluation.py --slices 32 --threads 2 --also torch-cl
    python bench/bench_evaluation.py --slices 8 --threads 2          # below 32 slices: PyTorch
    python bench/bench_evaluation.py --slices 2 --size 64 --encoder resnet18 --train-steps 1  # smoke
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.dataset import LoadedSlice, iter_slices, load_site
from common.device import REFERENCE, Compute, inference, resolve_compute
from common.evaluation import evaluate_site, score_slice
from common.inference import Segmenter, predict_masks
from common.loss import SeedLoss
from common.model import LoadedModel, ModelSpec, build_model, load_model, save_model
from common.preprocess import logits_to_native, to_model_input
from protocols.protocol import HuRanges

PATHS = ("today", "after")
#: more paths ``--also`` can time: name -> the Compute
EXTRA: dict[str, Compute] = {
    "torch-cl": Compute("cpu", "fp32", True),
    "bf16": Compute("cpu", "bf16", True),
}


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
    parser.add_argument("--train-steps", type=int, default=3, help="training steps per path; 0: none")
    parser.add_argument("--train-size", type=int, default=None, help="training input size (default --size)")
    parser.add_argument("--also", nargs="*", default=[], choices=sorted(EXTRA), help="more paths to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    n = args.slices
    computes = {"today": REFERENCE, "after": resolve_compute(purpose="inference").for_slices(n)}
    computes |= {name: EXTRA[name] for name in args.also}

    with tempfile.TemporaryDirectory(prefix="sarcofed-bench-") as tmp:
        tmp_path = Path(tmp)
        site_root = _make_site(tmp_path / "site", n, args.size)
        spec = ModelSpec(encoder=args.encoder, image_size=args.size)
        torch.manual_seed(0)
        model_path = save_model(tmp_path / "model.pt", build_model(spec), spec)
        start = time.perf_counter()
        loaded = load_model(model_path)
        t_load = time.perf_counter() - start

        # read
        site = load_site(site_root)
        start = time.perf_counter()
        slices = [s for s in iter_slices(site) if isinstance(s, LoadedSlice)]
        t_read = time.perf_counter() - start
        if len(slices) != n:
            raise SystemExit(f"expected {n} usable slices, got {len(slices)}")

        totals: dict[str, dict[str, float]] = {}
        for name in computes:
            totals[name] = {"read": t_read} | _inference_times(
                loaded, slices, site_root, model_path, computes[name], args.batch_size
            )
        del slices

    _report(args, t_load, totals, computes)
    _roofline(args, totals, computes)
    if args.train_steps > 0:
        _train_report(args)


def _inference_times(
    loaded: LoadedModel,
    slices: list[LoadedSlice],
    site_root: Path,
    model_path: Path,
    compute: Compute,
    batch_size: int,
) -> dict[str, float]:
    """Seconds of preprocess, forward, postprocess, predict_masks, metrics and end to end on ``compute``."""
    images = [s.ct.hu for s in slices]
    spec, net = loaded.spec, loaded.model
    segment, t_build = _timed(Segmenter.build, net, spec, compute, slices=len(images))
    segment(images[:batch_size], batch_size=batch_size)  # warm-up at the real shapes
    forward = segment.forward  # type: ignore[attr-defined]
    t_pre = t_forward = t_post = 0.0
    with inference(compute):
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            start = time.perf_counter()
            batch = compute.batch(
                torch.stack([to_model_input(hu, spec.image_size, spec.hu_window) for hu in chunk])
            )
            t_pre += time.perf_counter() - start
            start = time.perf_counter()
            logits = forward(batch).float()
            t_forward += time.perf_counter() - start
            start = time.perf_counter()
            for lg, hu in zip(logits, chunk, strict=True):
                logits_to_native(lg, hu.shape)
            t_post += time.perf_counter() - start

    # predict_masks as evaluation calls it (pre + forward + post)
    masks, t_predict = _timed(predict_masks, net, spec, images, batch_size=batch_size, compute=compute)

    # metrics
    start = time.perf_counter()
    for s, mask in zip(slices, masks, strict=True):  # type: ignore[call-overload]
        score_slice(
            mask, s.label, s.ct.hu, s.ct.spacing_mm,
            group=s.group, height_m=s.height_m, sex=s.sex, hu_ranges=HuRanges(),
        )  # fmt: skip
    t_metrics = time.perf_counter() - start

    # end to end: the model.pt read again, as a site does
    _, t_e2e = _timed(
        lambda: evaluate_site(load_site(site_root), model_path, batch_size=batch_size, compute=compute)
    )
    return {"preprocess": t_pre, "forward": t_forward, "postprocess": t_post,
            "predict": t_predict, "metrics": t_metrics, "e2e": t_e2e, "build": t_build}  # fmt: skip


def _report(
    args: argparse.Namespace,
    t_load: float,
    totals: dict[str, dict[str, float]],
    computes: dict[str, Compute],
) -> None:
    n = args.slices
    print(f"{n} slices {args.size}x{args.size}, {args.encoder} U-Net, ", end="")
    print(f"{args.threads} threads, batch {args.batch_size}")
    print(f"model load          {t_load * 1000:8.1f} ms (once)")
    per_path = {}
    for name in computes:
        per = {key: seconds / n * 1000 for key, seconds in totals[name].items() if key != "build"}
        per_path[name] = per
        print(f"-- {name}: {computes[name].label()}")
        print(f"{'build (once)':<19} {totals[name]['build'] * 1000:8.1f} ms (the ONNX export, if any)")
        for key, ms in per.items():
            print(f"{key:<19} {ms:8.1f} ms/slice  {1000 / ms:8.2f} slices/s")
        overhead = per["read"] + per["preprocess"] + per["postprocess"] + per["metrics"]
        share = overhead / per["forward"]
        print(f"read + pre + post + metrics = {overhead:.1f} ms/slice = {share:.1%} of forward (goal < 10%)")
        print(f"end-to-end / forward = {per['e2e'] / per['forward']:.3f} (goal <= 1.10)")
        print(f"end-to-end / predict_masks = {per['e2e'] / per['predict']:.3f}")
    today = 1000 / per_path["today"]["e2e"]
    for name in computes:
        if name == "today":
            continue
        other = 1000 / per_path[name]["e2e"]
        goal = " (goal >= 2x)" if name == "after" else ""
        print(
            f"site evaluation: today {today:.2f} slices/s, {name} {other:.2f} slices/s "
            f"= {other / today:.2f}x{goal}; forward alone: {name} / today time = "
            f"{per_path[name]['forward'] / per_path['today']['forward']:.3f}"
        )


def _roofline(
    args: argparse.Namespace, totals: dict[str, dict[str, float]], computes: dict[str, Compute]
) -> None:
    """GFLOP per slice, the fp32 GFLOP/s a big matmul sustains here, and what each forward reaches."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = ModelSpec(encoder=args.encoder, image_size=args.size)
    net = build_model(spec).eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(torch.zeros(1, spec.in_channels, args.size, args.size))
    gflop = counter.get_total_flops() / 1e9
    side = 4096
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b  # warm-up
    _, seconds = _timed(lambda: [a @ b for _ in range(5)])
    peak = 2 * side**3 * 5 / seconds / 1e9
    print(f"arithmetic: {gflop:.1f} GFLOP per slice (convolutions); fp32 {side}^2 matmul {peak:.0f} GFLOP/s")
    for name in computes:
        forward_s = totals[name]["forward"] / args.slices
        print(f"  {name} ({computes[name].label()}): forward {gflop / forward_s:.0f} GFLOP/s")
    best = max([peak] + [gflop / (totals[name]["forward"] / args.slices) for name in computes])
    rest = (totals["today"]["e2e"] - totals["today"]["forward"]) / args.slices * 1000
    today_ms = totals["today"]["e2e"] / args.slices * 1000
    bound_ms = gflop / best * 1000
    need_ms = today_ms / 2 - rest
    print(
        f"at the best fp32 rate seen here ({best:.0f} GFLOP/s) a forward takes {bound_ms:.0f} ms per slice; "
        f"with today's {rest:.0f} ms of the rest, end to end {today_ms / (bound_ms + rest):.2f}x today's. "
        f"2x needs a {need_ms:.0f} ms forward: {gflop / need_ms * 1000:.0f} GFLOP/s"
    )


def _train_report(args: argparse.Namespace) -> None:
    """ms per training step (forward, float32 loss, backward, RMSprop), fp32 contiguous vs auto."""
    size = args.train_size or args.size
    spec = ModelSpec(encoder=args.encoder, image_size=size)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((args.batch_size, 1, size, size), generator=gen)
    labels = torch.randint(0, 4, (args.batch_size, size, size), generator=gen)
    times = {}
    for name, compute in {"today": REFERENCE, "after": resolve_compute(purpose="training")}.items():
        times[name] = _step_seconds(spec, compute, images, labels, args.train_steps)
        print(
            f"training step ({name}: {compute.label()}): {times[name] * 1000:8.1f} ms at {size} px, "
            f"batch {args.batch_size}"
        )
    print(f"training step: after / today time = {times['after'] / times['today']:.3f}")


def _step_seconds(
    spec: ModelSpec, compute: Compute, images: torch.Tensor, labels: torch.Tensor, steps: int
) -> float:
    """Mean seconds of one training step on ``compute``, after one warm-up step."""
    torch.manual_seed(0)
    model = compute.prepare(build_model(spec)).train()
    optimiser = torch.optim.RMSprop(model.parameters(), lr=2e-4)
    batch, target = compute.batch(images), labels.to(compute.torch_device)
    loss_fn = SeedLoss()
    start = 0.0
    for k in range(steps + 1):
        if k == 1:
            start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        with compute.autocast():
            logits = model(batch)
        loss_fn(logits.float(), target).backward()
        optimiser.step()
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    main()
