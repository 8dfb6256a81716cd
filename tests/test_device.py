"""common.device: which device and precision a request gets on a machine, and running on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_toys import Tiny, phantom

from client.site_tasks import site_compute
from common.device import (
    REFERENCE,
    Capabilities,
    Compute,
    ComputeUnavailable,
    choose_compute,
    probe_capabilities,
)
from common.errors import SarcofedError
from common.inference import predict_masks
from common.model import ModelSpec, build_model, pack_state, unpack_state
from common.onnx_forward import MIN_SLICES
from common.training import ModelInputs, TrainConfig, train_local
from common.training import training_compute as train_local_compute
from protocols.study import StudyConfig

GPU_BF16 = Capabilities(cuda=True, cuda_bf16=True, cpu_bf16=True)
GPU_OLD = Capabilities(cuda=True, cuda_bf16=False)
MAC = Capabilities(mps=True)
CPU_BF16 = Capabilities(cpu_bf16=True)
CPU_PLAIN = Capabilities()


@pytest.mark.parametrize(
    ("caps", "training", "inference"),
    [
        (GPU_BF16, Compute("cuda", "bf16", True), Compute("cuda", "fp32", True)),
        (GPU_OLD, Compute("cuda", "fp16", True), Compute("cuda", "fp32", True)),
        (MAC, Compute("mps", "fp32", False), Compute("mps", "fp32", False)),
        (CPU_BF16, Compute("cpu", "bf16", True), Compute("cpu", "fp32", True)),
        (CPU_PLAIN, Compute("cpu", "fp32", True), Compute("cpu", "fp32", True)),
    ],
)
def test_auto_is_the_best_the_machine_has(caps: Capabilities, training: Compute, inference: Compute) -> None:
    """CUDA, then MPS, then CPU; bf16 where the device has it (fp16 on an older GPU) for training,
    fp32 for inference (bf16 masks moved more than 0.1% of pixels); channels_last off on MPS."""
    assert choose_compute("auto", "auto", caps) == training
    assert choose_compute("auto", "auto", caps, purpose="inference") == inference


def test_a_named_request_is_kept_on_a_machine_that_can_run_it() -> None:
    assert choose_compute("cpu", "auto", GPU_BF16) == Compute(
        "cpu", "bf16", True
    )  # a GPU site asking for CPU
    assert choose_compute("cuda", "fp32", GPU_BF16) == Compute("cuda", "fp32", True)
    assert choose_compute("auto", "fp16", GPU_BF16).precision == "fp16"
    # a precision asked for by name holds for inference too
    assert choose_compute("cpu", "bf16", CPU_BF16, purpose="inference").precision == "bf16"


def test_cpu_fp32_inference_runs_on_onnx_runtime_where_installed_for_jobs_large_enough() -> None:
    """ONNX Runtime is chosen for fp32 CPU inference only; a job below its slice count, training,
    bf16 and GPUs stay on PyTorch; and the reply says which ran."""
    ort = Capabilities(cpu_bf16=True, onnxruntime=True)
    chosen = choose_compute("auto", "auto", ort, purpose="inference")
    assert chosen.runtime == "onnxruntime" and chosen.runtime_min_slices == MIN_SLICES > 1
    assert chosen.for_slices(MIN_SLICES) == chosen
    assert chosen.for_slices(MIN_SLICES - 1) == Compute("cpu", "fp32", True)
    assert chosen.used.runtime == "onnxruntime" and chosen.used.label() == "cpu fp32 (ONNX Runtime)"
    assert chosen.for_slices(1).used.label() == "cpu fp32"
    assert choose_compute("cpu", "fp32", ort, purpose="inference").runtime == "onnxruntime"
    assert choose_compute("auto", "auto", ort).runtime == "torch"  # training
    assert choose_compute("cpu", "bf16", ort, purpose="inference").runtime == "torch"
    gpu = Capabilities(cuda=True, cuda_bf16=True, onnxruntime=True)
    assert choose_compute("auto", "auto", gpu, purpose="inference").runtime == "torch"
    assert choose_compute("auto", "auto", CPU_BF16, purpose="inference").runtime == "torch"  # not installed
    with pytest.raises(ComputeUnavailable, match="CPU in fp32 only"):
        Compute("cpu", "bf16", True, runtime="onnxruntime")


def test_a_model_onnx_cannot_take_is_segmented_by_pytorch_and_the_reply_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import common.onnx_forward
    from common.inference import Segmenter

    def broken_export(*args: object) -> bytes:
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(common.onnx_forward, "export_onnx", broken_export)
    monkeypatch.setattr(common.onnx_forward, "onnxruntime_available", lambda: True)
    spec = ModelSpec(encoder="resnet18", image_size=64)
    model = build_model(spec)
    asked = Compute("cpu", "fp32", True, runtime="onnxruntime")
    with caplog.at_level("WARNING", logger="common.onnx_forward"):
        segment = Segmenter.build(model, spec, asked, slices=40)
    assert segment.compute == asked.with_torch() and segment.compute.used.runtime == "torch"
    assert "aten::fancy" in caplog.text and "segmenting with PyTorch" in caplog.text
    masks = segment([np.zeros((64, 64), np.float32)])
    assert masks[0].shape == (64, 64)


@pytest.mark.parametrize(
    ("device", "precision", "caps", "names"),
    [
        ("cuda", "auto", CPU_BF16, ("--device = 'cuda'", "no CUDA GPU", "'auto' or 'cpu'")),
        ("mps", "auto", GPU_BF16, ("--device = 'mps'", "MPS", "'auto' or 'cpu'")),
        ("cpu", "bf16", CPU_PLAIN, ("--precision = 'bf16'", "no bf16", "'auto' or 'fp32'")),
        ("cuda", "bf16", GPU_OLD, ("--precision = 'bf16'", "this GPU has no bf16", "'fp32'")),
        ("cpu", "fp16", CPU_BF16, ("--precision = 'fp16'", "CUDA GPUs", "'fp32'")),
        ("tpu", "auto", CPU_BF16, ("--device = 'tpu'", "auto, cpu, cuda, mps")),
        ("cpu", "fp8", CPU_BF16, ("--precision = 'fp8'", "auto, fp32, bf16, fp16")),
    ],
)
def test_a_request_the_machine_cannot_run_names_the_setting_and_the_fix(
    device: str, precision: str, caps: Capabilities, names: tuple[str, ...]
) -> None:
    with pytest.raises(ComputeUnavailable) as err:
        choose_compute(device, precision, caps, device_setting="--device", precision_setting="--precision")
    assert isinstance(err.value, SarcofedError)  # the CLIs print it without a traceback
    for name in names:
        assert name in str(err.value)


def test_the_site_node_config_wins_over_the_study() -> None:
    """The site knows its hardware: node config ``device`` / ``precision`` override compute.*; a
    device it does not have is refused naming the node config, not the study key."""
    study = StudyConfig.from_run_config({"compute.device": "cpu", "compute.precision": "fp32"})
    assert site_compute({}, study, "training") == Compute("cpu", "fp32", True)
    cpu_bf16 = probe_capabilities().cpu_bf16
    if cpu_bf16:
        assert site_compute({"precision": "bf16"}, study, "training").precision == "bf16"
    if not torch.cuda.is_available():
        with pytest.raises(ComputeUnavailable, match=r"node config's 'device'"):
            site_compute({"device": "cuda"}, study, "training")
        with pytest.raises(ComputeUnavailable, match=r"compute\.device = 'cuda'"):
            site_compute({}, StudyConfig.from_run_config({"compute.device": "cuda"}), "training")


def test_a_dp_sgd_site_trains_and_says_fp32_whatever_is_asked() -> None:
    """Opacus cannot take bf16 per-slice gradients: under the policy's DP-SGD the site trains in
    fp32 on the same device, and what it says it used is that (its validation is unaffected)."""
    from client.policy import DpSgd, SitePolicy

    policy = SitePolicy(dp_sgd=DpSgd(enabled=True))
    study = StudyConfig.from_run_config({"compute.device": "cpu"})
    assert site_compute({}, study, "training", policy) == Compute("cpu", "fp32", False)
    inference = site_compute({}, study, "inference", policy)
    assert inference.with_torch() == Compute("cpu", "fp32", True)
    assert inference.runtime == ("onnxruntime" if probe_capabilities().onnxruntime else "torch")
    assert train_local_compute(Compute("cpu", "bf16", True), private=True) == Compute("cpu", "fp32", False)


def test_the_study_refuses_an_unknown_device_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"compute\.device") as err:
        StudyConfig.from_run_config({"compute.device": "gpu"})
    assert "'cuda'" in str(err.value)


def test_model_inputs_are_made_once_per_training_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sample is windowed and resized once per train_local call, not once per batch of
    every epoch (3 epochs over 6 slices, BatchNorm statistics recomputed: still 6 images)."""
    import common.training as training

    made: list[int] = []
    real = training.to_model_input

    def counted(hu: np.ndarray, size: int, window: tuple[float, float]) -> torch.Tensor:
        made.append(1)
        return real(hu, size, window)

    monkeypatch.setattr(training, "to_model_input", counted)
    spec = ModelSpec(image_size=32)
    torch.manual_seed(0)
    train_local(
        Tiny(),
        spec,
        [phantom(i, 32) for i in range(6)],
        [],
        TrainConfig(local_epochs=3, batch_size=2, augment=True),
        running_stats="recompute",
    )
    assert len(made) == 6


def test_model_inputs_keep_the_ignored_pixels_and_the_classes() -> None:
    """Targets are kept as uint8 (a quarter of int64's memory) and leave as int64 with
    IGNORE_INDEX where the sample says so and the canonical class everywhere else."""
    sample = phantom(0, 32)
    sample.ignore = np.zeros((32, 32), dtype=bool)
    sample.ignore[0, :5] = True
    _images, labels = ModelInputs.of([sample], ModelSpec(image_size=32)).batch([0])
    assert labels.dtype == torch.int64
    assert (labels[0][torch.from_numpy(sample.ignore)] == 255).all()
    kept = ~torch.from_numpy(sample.ignore)
    assert torch.equal(labels[0][kept], torch.from_numpy(sample.label.astype(np.int64))[kept])


def _fast_cpu() -> Compute:
    return Compute("cpu", "bf16" if probe_capabilities().cpu_bf16 else "fp32", channels_last=True)


def test_fast_cpu_training_is_deterministic_and_returns_float32_contiguous_weights() -> None:
    """bf16 autocast + channels_last: the same seed gives the same weights; the state_dict that
    leaves is float32, contiguous and on the CPU, so it packs and unpacks exactly."""
    spec = ModelSpec(encoder="resnet18", image_size=32)
    samples = [phantom(i, 32) for i in range(4)]
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(spec)
        result = train_local(model, spec, samples, samples[:2], TrainConfig(seed=3), compute=_fast_cpu())
        states.append(result.state_dict)
        assert result.val_loss_mean is not None and np.isfinite(result.val_loss_mean)
        assert all(p.is_contiguous() and p.device.type == "cpu" for p in model.parameters())
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name
        assert tensor.device.type == "cpu" and tensor.is_contiguous(), name
        assert tensor.dtype in (torch.float32, torch.int64), (name, tensor.dtype)
    packed, layout = pack_state(states[0])
    back = unpack_state(packed, layout)
    assert all(torch.equal(back[n], t) for n, t in states[0].items())


def test_received_weights_load_exactly_whatever_the_compute() -> None:
    """Preparing a model (device, channels_last) never rounds its float32 weights."""
    spec = ModelSpec(encoder="resnet18", image_size=32)
    torch.manual_seed(0)
    model = build_model(spec)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    _fast_cpu().prepare(model)
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == before[n].dtype for n in before)


def test_the_reference_path_is_todays_prediction() -> None:
    """compute=REFERENCE is fp32 and contiguous: the masks are the ones predict_masks gave before."""
    spec = ModelSpec(encoder="resnet18", image_size=32)
    torch.manual_seed(0)
    model = build_model(spec)
    images = [phantom(i, 40).hu for i in range(3)]
    assert REFERENCE == Compute("cpu", "fp32", False)
    plain = predict_masks(model, spec, images)
    ref = predict_masks(model, spec, images, compute=REFERENCE)
    assert all(np.array_equal(a, b) for a, b in zip(plain, ref, strict=True))


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU on this machine (torch.cuda.is_available() is False)"
)
def test_cuda_smoke_one_training_step_and_a_prediction() -> None:
    """On a GPU: auto picks CUDA; training runs there (DataLoader, pinned memory, autocast) and the
    weights come back float32 on the CPU; prediction on CUDA gives masks of the native shape."""
    compute = choose_compute("auto", "auto", probe_capabilities())
    assert compute.device == "cuda"
    spec = ModelSpec(encoder="resnet18", image_size=64)
    samples = [phantom(i, 64) for i in range(4)]
    torch.manual_seed(0)
    model = build_model(spec)
    result = train_local(model, spec, samples, samples[:2], TrainConfig(batch_size=4), compute=compute)
    assert all(t.device.type == "cpu" for t in result.state_dict.values())
    assert np.isfinite(result.train_loss_mean)
    inference = choose_compute("auto", "auto", probe_capabilities(), purpose="inference")
    masks = predict_masks(model, spec, [s.hu for s in samples], compute=inference)
    assert next(model.parameters()).device.type == "cuda"
    assert [m.shape for m in masks] == [(64, 64)] * 4
