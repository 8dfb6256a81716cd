"""common.model: spec validation, hashing, transport packing and model.pt round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from common.errors import SarcofedError
from common.model import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    ModelSpec,
    build_model,
    check_model_names,
    load_model,
    model_from_state,
    pack_state,
    save_model,
    unpack_state,
    weights_hash,
)

SMALL = ModelSpec(encoder="resnet18", image_size=64)


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(SMALL)
    # Non-default buffers so a round trip that dropped or zeroed them would show.
    for name, buf in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.fill_(123)
        elif name.endswith("running_mean"):
            buf.normal_()
    return model


def test_spec_defaults_are_the_seed_model() -> None:
    spec = ModelSpec()
    assert (spec.arch, spec.encoder, spec.in_channels, spec.classes, spec.image_size) == (
        "unet",
        "resnet34",
        1,
        4,
        512,
    )
    low, high = spec.hu_window
    assert low < -190 and high > 150  # fat and muscle ranges are inside the window


def test_unknown_arch_lists_valid_choices() -> None:
    with pytest.raises(ValueError) as err:
        check_model_names(ModelSpec(arch="unte"))
    text = str(err.value)
    assert "'unte'" in text and "unet" in text and "deeplabv3plus" in text and "fpn" in text
    with pytest.raises(ValueError, match="unknown model arch 'unte'"):
        build_model(ModelSpec(arch="unte"))  # never smp's own error
    assert check_model_names(ModelSpec(arch="UNet")).arch == "unet"


def test_unknown_encoder_suggests_close_matches() -> None:
    with pytest.raises(ValueError) as err:
        check_model_names(ModelSpec(encoder="resnet35"))
    assert "'resnet35'" in str(err.value) and "resnet34" in str(err.value)
    with pytest.raises(ValueError, match="unknown encoder 'resnet35'"):
        build_model(ModelSpec(encoder="resnet35"))


def test_image_size_must_be_multiple_of_32() -> None:
    with pytest.raises(ValidationError, match=r"multiple of 32.*got 100"):
        ModelSpec(image_size=100)
    assert ModelSpec(image_size=96).image_size == 96


def test_hu_window_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="low < high"):
        ModelSpec(hu_window=(300.0, -200.0))


def test_spec_json_round_trip_and_frozen() -> None:
    assert ModelSpec.model_validate_json(SMALL.model_dump_json()) == SMALL
    with pytest.raises(ValidationError):
        ModelSpec(encoder="resnet18", bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        SMALL.image_size = 128  # type: ignore[misc]


def test_build_model_output_shape(small_model: torch.nn.Module) -> None:
    small_model.eval()
    with torch.inference_mode():
        out = small_model(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 4, 64, 64)


def test_timm_universal_encoder_is_accepted() -> None:
    spec = check_model_names(ModelSpec(encoder="tu-mobilenetv3_small_100"))
    assert spec.encoder == "tu-mobilenetv3_small_100"
    with pytest.raises(ValueError, match="unknown encoder 'tu-no_such_model'"):
        check_model_names(ModelSpec(encoder="tu-no_such_model"))


#: A spec as sarcofed 0.1 wrote it (model-spec messages, model.pt files) before the schema
#: moved to protocols.model: it must keep reading.
SPEC_V01_JSON = (
    '{"arch":"unet","encoder":"resnet18","in_channels":1,"classes":4,"image_size":64,'
    '"hu_window":[-250.0,250.0]}'
)


def test_spec_written_by_earlier_versions_still_reads() -> None:
    assert ModelSpec.model_validate_json(SPEC_V01_JSON) == SMALL
    assert SMALL.model_dump_json() == SPEC_V01_JSON  # and is written the same way


def test_model_file_written_by_earlier_versions_still_loads(
    small_model: torch.nn.Module, tmp_path: Path
) -> None:
    """The model.pt payload of sarcofed 0.1, written field by field (not with save_model)."""
    state = {k: v.detach().clone() for k, v in small_model.state_dict().items()}
    payload = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "spec": json.loads(SPEC_V01_JSON),
        "state_dict": state,
        "meta": {"round": 2},
        "weights_hash": weights_hash(state),
    }
    torch.save(payload, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert loaded.spec == SMALL and loaded.weights_hash == weights_hash(state)
    torch.save(payload | {"spec": {**payload["spec"], "encoder": "resnet35"}}, tmp_path / "bad.pt")
    with pytest.raises(SarcofedError, match=r"bad\.pt: invalid model spec: unknown encoder 'resnet35'"):
        load_model(tmp_path / "bad.pt")


def test_weights_hash_sees_names_values_and_dtypes() -> None:
    state = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3], dtype=torch.int64)}
    base = weights_hash(state)
    assert len(base) == 64
    assert weights_hash(dict(reversed(list(state.items())))) == base  # key order is irrelevant
    assert weights_hash({**state, "a": torch.tensor([1.0, 2.5])}) != base
    assert weights_hash({"c": state["a"], "b": state["b"]}) != base
    assert weights_hash({**state, "b": torch.tensor([3], dtype=torch.int32)}) != base
    assert weights_hash({**state, "a": torch.tensor([[1.0, 2.0]])}) != base  # shape


def test_pack_unpack_exact_round_trip(small_model: torch.nn.Module) -> None:
    state = small_model.state_dict()
    packed, layout = pack_state(state)
    assert packed.dtype == np.float32 and packed.ndim == 1
    assert packed.size == sum(t.numel() for t in state.values() if t.is_floating_point())
    json.loads(layout)  # a JSON string that a ConfigRecord can carry
    back = unpack_state(packed, layout)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    assert back["encoder.bn1.num_batches_tracked"].item() == 123
    assert weights_hash(back) == weights_hash(state)
    rebuilt = build_model(SMALL)
    rebuilt.load_state_dict(back)  # strict: every key fits


def test_integer_buffers_travel_in_the_layout_not_the_array() -> None:
    state = {
        "w": torch.tensor([1.0, 2.0]),
        "n": torch.tensor(2**40 + 1, dtype=torch.int64),  # beyond float32: must stay exact
        "flags": torch.tensor([True, False]),
    }
    packed, layout = pack_state(state)
    np.testing.assert_array_equal(packed, [1.0, 2.0])  # only weights: safe to average / clip / noise
    other, _ = pack_state({**state, "w": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)})
    mean = unpack_state((packed + other) / 2, layout)  # what FedAvg does to the packed vectors
    assert mean["w"].tolist() == [2.0, 3.0]
    assert mean["n"].dtype == torch.int64 and mean["n"].item() == 2**40 + 1  # the layout's counter
    assert mean["flags"].dtype == torch.bool and mean["flags"].tolist() == [True, False]


def test_pack_rejects_lossy_dtypes_and_unpack_checks_size() -> None:
    with pytest.raises(ValueError, match="float64"):
        pack_state({"x": torch.zeros(2, dtype=torch.float64)})
    packed, layout = pack_state({"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="1-D array of 3"):
        unpack_state(packed[:2], layout)
    with pytest.raises(ValueError, match="layout"):
        unpack_state(packed, "{not json")


def test_model_from_state_is_the_same_network_and_owns_its_weights(small_model: torch.nn.Module) -> None:
    packed, layout = pack_state(small_model.state_dict())
    state = unpack_state(packed, layout)
    model = model_from_state(SMALL, state)
    assert weights_hash(model.state_dict()) == weights_hash(small_model.state_dict())
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    small_model.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), small_model(x))
    # Training the rebuilt model must not write into the received array (the site computes
    # its update as new - received, so a shared buffer would make every update zero).
    before = packed.copy()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert np.array_equal(packed, before)
    wrong = {k: v for k, v in state.items() if not k.startswith("decoder")}
    with pytest.raises(RuntimeError, match="Missing key"):
        model_from_state(SMALL, wrong)


def test_save_load_reproduces_outputs(tmp_path, small_model: torch.nn.Module) -> None:
    path = save_model(tmp_path / "sub" / "model.pt", small_model, SMALL, {"round": 3, "study": "demo"})
    loaded = load_model(path)
    assert loaded.spec == SMALL
    assert loaded.meta == {"round": 3, "study": "demo"}
    assert loaded.weights_hash == weights_hash(small_model.state_dict())
    assert not loaded.model.training
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    small_model.eval()
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), small_model(x))


def test_load_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(SarcofedError, match=r"nope.pt.*not found"):
        load_model(missing)
    raw = tmp_path / "raw.pt"
    torch.save({"w": torch.zeros(1)}, raw)
    with pytest.raises(SarcofedError, match=r"raw.pt.*not a sarcofed model"):
        load_model(raw)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(SarcofedError, match=r"junk\.pt"):
        load_model(junk)


def test_load_detects_tampered_weights(tmp_path) -> None:
    spec = ModelSpec(encoder="resnet18", image_size=64)
    path = save_model(tmp_path / "model.pt", build_model(spec), spec)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["segmentation_head.0.bias"] += 1.0
    torch.save(payload, path)
    with pytest.raises(SarcofedError, match=r"model.pt.*hash mismatch"):
        load_model(path)


def test_save_rejects_non_scalar_meta(tmp_path) -> None:
    with pytest.raises(ValueError, match="'sites'"):
        save_model(tmp_path / "m.pt", {"w": torch.zeros(1)}, SMALL, {"sites": ["a"]})  # type: ignore[dict-item]


def test_group_norm_spec_builds_the_same_network_without_batchnorm(tmp_path: Path) -> None:
    spec = ModelSpec(encoder="resnet18", image_size=64, norm="group")
    model = build_model(spec)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in build_model(SMALL).modules())
    assert all(m.num_channels % m.num_groups == 0 and m.num_groups <= 32 for m in norms)
    assert not any("running" in name for name in model.state_dict())
    model.eval()
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 64, 64)
    # written with its norm (a batch spec is written without, as before), and read back as it was
    assert '"norm":"group"' in spec.model_dump_json()
    assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec
    loaded = load_model(save_model(tmp_path / "group.pt", model, spec))
    assert loaded.spec == spec and loaded.weights_hash == weights_hash(model.state_dict())


def test_group_norm_refuses_encoders_whose_batchnorm_holds_more_than_a_norm() -> None:
    """timm's BatchNormAct2d also holds the activation: replacing it would drop the activation."""
    with pytest.raises(ValueError, match=r"BatchNormAct2d.*resnet18.*model\.norm = 'batch'"):
        build_model(ModelSpec(encoder="tu-mobilenetv3_small_050", image_size=64, norm="group"))
