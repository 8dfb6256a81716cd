"""What a model file says about its own validation: written once, read back, refused in words."""

from __future__ import annotations

import json

import pytest

from common.errors import SarcofedError
from common.model_meta import CONTEXT_KEY, ModelContext, context_meta, model_context
from common.pooling import error_profile
from protocols.findings import KeyStats
from protocols.protocol import LabelProtocol
from protocols.study import TrainSection


def test_the_context_round_trips_through_the_model_metadata() -> None:
    stats = KeyStats(
        n=6, n_present=5, sum_net_share=0.1, sum_sq_net_share=0.01, sum_net_cm2=3, sum_sq_net_cm2=2
    )
    profile = error_profile({"a": (6, {"muscle:site_excludes:boundary": stats})}, "test", withheld={"b": "x"})
    protocol = LabelProtocol(name="no-imat", imat_in_muscle=True)
    split = TrainSection(val_fraction=0.1, test_fraction=0.3, seed=7)
    meta = context_meta({"b", "a"}, split, protocol, profile)
    context = model_context(meta)
    assert context.internal_sites == ("a", "b")
    assert (context.split.val_fraction, context.split.test_fraction, context.split.seed) == (0.1, 0.3, 7)
    assert context.protocol == protocol and context.profile == profile


def test_a_bare_model_has_the_empty_context() -> None:
    assert model_context({}) == ModelContext()


@pytest.mark.parametrize(
    ("part", "value"),
    [
        ("protocol", {"name": "site-x", "muscle_groups": ["psoas"]}),
        ("split", {"test_fraction": 2.0}),
        ("error_profile", {"source": "s", "n_sites": "many"}),
    ],
)
def test_a_context_this_version_cannot_read_is_refused_in_words_not_a_traceback(
    part: str, value: object
) -> None:
    """A model written by another sarcofed version (an unknown field, a value out of range): a
    user-facing error naming the part and the fix, never pydantic's ValidationError."""
    context = {"internal_sites": ["a"], "split": {}, "protocol": {}} | {part: value}
    with pytest.raises(SarcofedError, match="cannot be read by this sarcofed version") as caught:
        model_context({CONTEXT_KEY: json.dumps(context)})
    message = str(caught.value)
    assert part in message and "sarcofed version that trained it" in message
    assert "pydantic" not in message and "Value error," not in message
