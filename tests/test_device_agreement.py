"""The fast CPU inference path is honest: on demo hospitals, with a model trained to be better than
chance, its masks agree with the fp32 contiguous reference on >= 99.9% of pixels and every IoU bin
the seed's table counts is the same (issue 16).

Why ``auto`` inference is fp32 in channels_last and not bf16: with this very model, bf16 autocast
masks agreed with the reference on 99.94-99.96% of pixels, but moved slices between IoU bins at
two of the three hospitals; channels_last fp32 gives the reference's masks, and so does ONNX
Runtime (what ``auto`` uses on a CPU for jobs of 32 slices or more).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.dataset import LoadedSlice, iter_slices, load_site
from common.demo.hospitals import make_site, study_site_profile
from common.device import REFERENCE, Compute, resolve_compute
from common.evaluation import evaluate_site
from common.inference import predict_masks
from common.model import LoadedModel, ModelSpec, build_model, weights_hash
from common.training import TrainConfig, TrainSample, train_local
from protocols.payloads import EvaluationPayload

SIZE = 96  # the hospitals' and the model's size: thin muscle survives, the training stays short
#: the issue's bar: masks agree with the fp32 reference on at least this share of pixels
MIN_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, list[Path]]:
    """Three demo hospitals and a resnet18 U-Net trained on the first for 40 epochs in fp32
    (``REFERENCE``), so the model is the same on a CPU with or without bf16: trained on
    ``resolve_compute("cpu")`` it came out in bf16 on one machine (muscle IoU 0.84) and fp32 on
    another (0.62), and the guard below failed there. Measured in fp32: muscle IoU 0.78 on the
    first hospital, 0.66-0.67 at the others, slices in several IoU bins (~50 s on 2 cores)."""
    root = tmp_path_factory.mktemp("hospitals")
    sites = [
        make_site(root / f"site-{p}", study_site_profile(p), slices=8, size=SIZE, seed=p) for p in range(3)
    ]
    train = [
        TrainSample(hu=s.ct.hu, label=s.label, group=s.group)
        for s in iter_slices(load_site(sites[0]))
        if isinstance(s, LoadedSlice)
    ]
    spec = ModelSpec(encoder="resnet18", image_size=SIZE)
    torch.manual_seed(0)
    model = build_model(spec)
    config = TrainConfig(local_epochs=40, lr=3e-3, optimizer="adam")
    result = train_local(model, spec, train, [], config, compute=REFERENCE)
    assert result.epoch_losses[-1] < 0.3 * result.epoch_losses[0], "the model must have learned"
    model.load_state_dict(result.state_dict)
    return LoadedModel(model, spec, {}, weights_hash(result.state_dict)), sites


def _bins(payload: EvaluationPayload) -> dict[str, dict[str, int]]:
    tables = {"scores": payload.scores, "raw": payload.raw_scores or {}}
    return {f"{kind}:{cls}": s.bins for kind, table in tables.items() for cls, s in table.items()}


def _agrees_with_the_reference(loaded: LoadedModel, sites: list[Path], fast: Compute) -> None:
    agree = total = 0
    for root in sites:
        hus = [s.ct.hu for s in iter_slices(load_site(root)) if isinstance(s, LoadedSlice)]
        reference = predict_masks(loaded.model, loaded.spec, hus, compute=REFERENCE)
        masks = predict_masks(loaded.model, loaded.spec, hus, compute=fast)
        agree += sum(int((a == b).sum()) for a, b in zip(reference, masks, strict=True))
        total += sum(a.size for a in reference)
        ref_payload, _ = evaluate_site(load_site(root), loaded, compute=REFERENCE)
        fast_payload, _ = evaluate_site(load_site(root), loaded, compute=fast)
        assert _bins(fast_payload) == _bins(ref_payload), root.name
        assert fast_payload.compute == fast.used, "the reply says what really ran"
        assert ref_payload.compute is not None and ref_payload.compute.precision == "fp32"
    assert agree / total >= MIN_AGREEMENT, f"{agree / total:.5%} of pixels agree"


def test_auto_cpu_inference_agrees_with_the_fp32_reference(trained: tuple[LoadedModel, list[Path]]) -> None:
    fast = resolve_compute("cpu", purpose="inference").for_slices(8)  # a demo hospital's count
    assert fast.channels_last and fast.runtime == "torch"  # really another path than the reference
    _agrees_with_the_reference(*trained, fast)


def test_onnx_runtime_inference_agrees_with_the_fp32_reference(
    trained: tuple[LoadedModel, list[Path]],
) -> None:
    """The runtime ``auto`` uses for a site's larger jobs: an ONNX export of the same weights."""
    fast = Compute("cpu", "fp32", True, runtime="onnxruntime")
    assert fast.used.runtime == "onnxruntime"
    _agrees_with_the_reference(*trained, fast)


def test_the_reference_is_not_what_a_random_model_gives(trained: tuple[LoadedModel, list[Path]]) -> None:
    """Guards the test above: with an untrained network, or one whose slices all sit in one IoU
    bin, agreeing masks and equal bins would say little."""
    loaded, sites = trained
    payload, _ = evaluate_site(load_site(sites[0]), loaded, compute=Compute())
    muscle = payload.scores["muscle"]
    assert muscle.intersection_px > 0.75 * muscle.union_px
    assert sum(1 for n in muscle.bins.values() if n) >= 2
