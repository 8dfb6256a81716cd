"""The study model's spec: everything that rebuilds the network, apart from its weights.

One schema, three uses: the study config's ``model`` section (run-config keys
``model.arch``, ``model.encoder``, ``model.image-size``, ``model.norm``), the ``model-spec`` JSON a site
receives with the weights (``protocols.keys.MODEL_SPEC``), and the ``spec`` entry of every
``model.pt`` file. Pure pydantic: the rules that need no model zoo are checked here. That
``arch`` and ``encoder`` name a network the zoo can build is checked by
``common.model.check_model_names`` (``build_model`` calls it; so does the ServerApp before
a study starts).
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal

from pydantic import (
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from protocols.base import Schema
from protocols.classes import Tissue

#: HU window mapped to [0, 1] before the network (see ``common.preprocess``).
#: -250..+250 keeps the whole fat range (-190..-30) and muscle (-29..+150) unclipped and
#: apart, lets air (< -250) saturate at 0 and bone / dense contrast (> +250) at 1.
DEFAULT_HU_WINDOW: Final[tuple[float, float]] = (-250.0, 250.0)

#: A U-Net encoder halves its input 5 times: the image size must divide by 2**5.
SIZE_MULTIPLE: Final = 32

#: How the network normalises its feature maps. ``batch``: the model zoo's BatchNorm (the
#: seed's model). ``group``: every BatchNorm replaced by GroupNorm (``common.model``), which
#: has no running statistics and normalises each image on its own, so it can be trained with
#: DP-SGD (a site whose policy requires DP-SGD refuses a ``batch`` study; docs/PRIVACY.md).
Norm = Literal["batch", "group"]
NORMS: Final[tuple[str, ...]] = ("batch", "group")
DEFAULT_NORM: Final = "batch"


class ModelSpec(Schema):
    """The network of a study. The defaults are the seed's model (U-Net, ResNet-34, 512 px)."""

    #: The fields a study sets in its run config (``model.<name>``). The others are fixed by
    #: the pipeline: one CT channel in, the canonical classes out, the HU window.
    RUN_CONFIG_FIELDS: ClassVar[tuple[str, ...]] = ("arch", "encoder", "image_size", "norm")

    #: a segmentation_models_pytorch architecture (``unet``, ``fpn``, ...), any case.
    arch: str = "unet"
    #: an smp encoder name, or ``tu-<timm model name>``.
    encoder: str = "resnet34"
    in_channels: int = Field(1, ge=1)
    classes: int = Field(len(Tissue), ge=2)
    image_size: int = Field(512, ge=SIZE_MULTIPLE, le=2048)
    #: (low, high) HU mapped to (0, 1); part of the spec because a model trained on one
    #: window is wrong on another.
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW
    #: the normalisation layers (see :data:`Norm`); every site trains the same network, so it is
    #: a study setting, never a site's choice.
    norm: Norm = DEFAULT_NORM

    @field_validator("norm", mode="before")
    @classmethod
    def _known_norm(cls, value: object) -> object:
        if isinstance(value, str) and value.lower() in NORMS:
            return value.lower()
        raise ValueError(f"unknown model norm {value!r}; valid choices are: {', '.join(NORMS)}")

    @model_serializer(mode="wrap")
    def _omit_default_norm(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        """JSON leaves ``norm`` out when it is the default: a batch-norm spec is written byte for
        byte as before the option existed, so model.pt files and model-spec messages of earlier
        versions (which forbid unknown fields) still read each other."""
        data = handler(self)
        if info.mode_is_json() and isinstance(data, dict) and data.get("norm") == DEFAULT_NORM:
            del data["norm"]
        return data

    @field_validator("arch")
    @classmethod
    def _lower_case_arch(cls, value: str) -> str:
        return value.lower()

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % SIZE_MULTIPLE:
            lower = max(value // SIZE_MULTIPLE * SIZE_MULTIPLE, SIZE_MULTIPLE)
            upper = value // SIZE_MULTIPLE * SIZE_MULTIPLE + SIZE_MULTIPLE
            raise ValueError(
                f"the image size must be a multiple of {SIZE_MULTIPLE} (the encoder halves it 5 times), "
                f"got {value}; use {lower} or {upper}"
            )
        return value

    @model_validator(mode="after")
    def _ordered_window(self) -> ModelSpec:
        low, high = self.hu_window
        if not low < high:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        return self
