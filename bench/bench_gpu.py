"""One epoch of the seed's recipe where a hospital computes: training and inference slices/s, and
how busy the GPU was (issue 16).

The seed's recipe: ``--slices`` (1,480) slices at ``--size`` (512) px, resnet34 U-Net, batch 4,
RMSprop lr 2e-4, 0.5 Dice + 0.5 CE (``protocols.study.TrainSection`` defaults), one local epoch
through ``common.training.train_local``: the path ``sarcofed site train`` takes, with the
``auto`` training compute of this machine (``common.device``: CUDA with bf16 or fp16 autocast,
channels_last, a pinned-memory DataLoader) unless ``--device`` / ``--precision`` say otherwise.
Then inference over the same slices in batches of ``--batch-size``, with the ``auto``
inference compute (fp32) and, on a GPU, with bf16 autocast too; the share of pixels whose
class the two agree on is printed beside them.

The slices are synthetic (no DICOM decoding: this measures the device, the site cache and
``bench_data_loading.py`` measure the reading): a body ellipse of fat, a muscle ring and
visceral fat inside, radii and HU noise drawn per slice. GPU utilisation is sampled from
``nvidia-smi`` every 0.5 s during each phase (mean and peak); ``n/a`` where there is none.

    python bench/bench_gpu.py                     # the seed's recipe on the GPU (minutes)
    python bench/bench_gpu.py --json              # the same, as JSON
    python bench/bench_gpu.py --device cpu --slices 8 --size 64 --encoder resnet18   # smoke, anywhere
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import print_table

from common.device import Compute, inference, resolve_compute
from common.model import ModelSpec, build_model
from common.preprocess import to_model_input
from common.training import TrainConfig, TrainSample, train_local
from protocols.study import TrainSection


def synthetic_slices(n: int, size: int, seed: int = 0) -> list[TrainSample]:
    """``n`` labelled slices: air, a body ellipse of subcutaneous fat (2), a muscle ring (1),
    visceral fat (3) inside it; radii, position and HU noise differ per slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    out = []
    for i in range(n):
        ry, rx = rng.uniform(0.30, 0.42), rng.uniform(0.36, 0.47)
        cy, cx = rng.uniform(-0.03, 0.03, size=2)
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        label = np.zeros((size, size), np.uint8)
        label[r < 1.0] = 2
        label[r < rng.uniform(0.80, 0.88)] = 1
        label[r < rng.uniform(0.65, 0.72)] = 3
        hu = np.choose(label, [-1000.0, 45.0, -100.0, -80.0]).astype(np.float32)
        hu += rng.normal(0.0, 20.0, size=hu.shape).astype(np.float32)
        out.append(TrainSample(hu=hu, label=label, group=f"p{i // 2}", spacing_mm=(0.78, 0.78)))
    return out


class GpuSampler:
    """``nvidia-smi`` utilisation (%) every ``every`` seconds while running; empty without it."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.every):
            try:
                text = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
                self.samples.append(float(text.split()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return

    def summary(self) -> tuple[float | None, float | None]:
        """(mean, peak) utilisation in %, or (None, None) when nothing was sampled."""
        if not self.samples:
            return None, None
        return float(np.mean(self.samples)), float(np.max(self.samples))


@dataclass
class Phase:
    what: str
    compute: str
    slices: int
    seconds: float
    slices_per_s: float
    gpu_util_mean: float | None
    gpu_util_peak: float | None
    peak_memory_gib: float | None


def timed(what: str, compute: Compute, n: int, run: Callable[[], object]) -> Phase:
    """Run ``run()`` once on ``n`` slices, timed to the device's last kernel, GPU sampled."""
    if compute.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() as gpu:
        start = time.perf_counter()
        run()
        if compute.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    mean, peak = gpu.summary()
    memory = torch.cuda.max_memory_allocated() / 2**30 if compute.device == "cuda" else None
    return Phase(what, compute.label(), n, seconds, n / seconds, mean, peak, memory)


def train_epoch(
    model: torch.nn.Module, spec: ModelSpec, samples: Sequence[TrainSample], compute: Compute
) -> Phase:
    """One local epoch of the seed's recipe (``train_local``), timed end to end."""
    config = TrainConfig.from_study(TrainSection(), local_epochs=1)
    return timed(
        "training, 1 epoch",
        compute,
        len(samples),
        lambda: train_local(model, spec, samples, [], config, compute=compute),
    )


def predict(
    model: torch.nn.Module, spec: ModelSpec, samples: Sequence[TrainSample], compute: Compute, batch: int
) -> tuple[Phase, np.ndarray]:
    """Class maps of every slice at model resolution, batch by batch (input prepared as
    evaluation prepares it), timed with the transfers and the argmax."""
    net = compute.prepare(model.eval())
    inputs = [to_model_input(s.hu, spec.image_size, spec.hu_window) for s in samples]
    classes: list[torch.Tensor] = []

    def run() -> None:
        with inference(compute):
            for k in range(0, len(inputs), batch):
                images = compute.batch(torch.stack(inputs[k : k + batch]))
                classes.append(net(images).argmax(1).to("cpu", torch.uint8))

    phase = timed("inference", compute, len(samples), run)
    return phase, torch.cat(classes).numpy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=1480, help="training slices (the seed's 1,480)")
    parser.add_argument("--size", type=int, default=512, help="slice and model size in px")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--batch-size", type=int, default=16, help="inference batch")
    parser.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    parser.add_argument("--precision", default="auto", help="training precision: auto | fp32 | bf16 | fp16")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    train_compute = resolve_compute(args.device, args.precision, purpose="training")
    infer_compute = resolve_compute(args.device, "auto", purpose="inference")
    spec = ModelSpec(encoder=args.encoder, image_size=args.size)
    torch.manual_seed(0)
    samples = synthetic_slices(args.slices, args.size)
    model = build_model(spec)
    phases = [train_epoch(model, spec, samples, train_compute)]
    reference, masks = predict(model, spec, samples, infer_compute, args.batch_size)
    phases.append(reference)
    agreement: float | None = None
    if infer_compute.device == "cuda" and train_compute.precision != "fp32":
        fast_compute = resolve_compute("cuda", train_compute.precision, purpose="inference")
        fast, fast_masks = predict(model, spec, samples, fast_compute, args.batch_size)
        phases.append(fast)
        agreement = float(np.mean(fast_masks == masks))
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if args.json:
        out = {
            "settings": vars(args),
            "gpu": gpu_name,
            "phases": [asdict(p) for p in phases],
            "agreement": agreement,
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{args.slices} synthetic slices at {args.size} px, {args.encoder} U-Net; GPU: {gpu_name or 'none'}"
    )

    def cell(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    print_table(
        ["phase", "compute", "slices", "seconds", "slices/s", "GPU util mean %", "peak %", "peak GiB"],
        [
            [
                p.what,
                p.compute,
                str(p.slices),
                f"{p.seconds:.1f}",
                f"{p.slices_per_s:.1f}",
                cell(p.gpu_util_mean, ".0f"),
                cell(p.gpu_util_peak, ".0f"),
                cell(p.peak_memory_gib, ".2f"),
            ]
            for p in phases
        ],
    )
    if agreement is not None:
        print(
            f"inference classes, {phases[-1].compute} vs {reference.compute}: {agreement:.5%} of pixels agree"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
