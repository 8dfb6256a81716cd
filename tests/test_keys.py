"""protocols.keys: the metric names a training reply carries are a wire format between versions."""

from __future__ import annotations

from protocols import keys
from protocols.classes import METRIC_CLASSES


def test_training_metric_keys_are_the_wire_names() -> None:
    assert keys.val_overlap_keys("muscle") == ("val-muscle-intersection", "val-muscle-union")
    assert keys.TRAIN_METRIC_KEYS == (
        "num-examples",
        "n-val",
        "train-loss",
        "train-loss-sum",
        "val-loss",
        "val-loss-sum",
        "epochs",
        "seconds",
        *(f"val-{cls}-{part}" for cls in METRIC_CLASSES for part in ("intersection", "union")),
        "n-val-patients",
        "val-withheld",
        "dp-epsilon",
        "dp-delta",
        "convention-aware",
        "convention-withheld",
        *(
            f"convention-{name}-{part}"
            for name in ("hu_range", "imat_holes", "boundary", "contour", "psoas", "paraspinal")
            for part in ("share", "slices")
        ),
        *(
            f"convention-{name}-declared"
            for name in ("hu_range", "imat_holes", "boundary", "psoas", "paraspinal")
        ),
    )
    assert len(set(keys.TRAIN_METRIC_KEYS)) == len(keys.TRAIN_METRIC_KEYS) == 31 + 2 * len(METRIC_CLASSES)
    # what a site withholds with a too small validation split: every per-slice validation sum
    assert set(keys.VAL_METRIC_KEYS) == {"val-loss", "val-loss-sum"} | {
        f"val-{cls}-{part}" for cls in METRIC_CLASSES for part in ("intersection", "union")
    }
