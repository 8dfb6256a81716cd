"""Label-definition discrepancy analysis: "the model is wrong" or "this hospital labels differently".

Entry points (pure numpy/scipy, no Flower):

- :func:`analyse_slice` ``(hu, spacing_mm, site, ref) -> SliceDiscrepancy``: one slice, site
  mask versus reference mask (model prediction or the manifest's ``reference`` mask);
- :class:`DiscrepancyAccumulator`: ``add(SliceDiscrepancy)`` per slice, then
  ``finalise(min_slices=5) -> protocols.payloads.DiscrepancySummary`` (aggregates only);
- :func:`body_frame` ``(hu, spacing_mm) -> BodyFrame``: the body-relative frame used to
  name regions and draw polar maps.
"""

from __future__ import annotations

from common.discrepancy.findings import DiscrepancyAccumulator
from common.discrepancy.frame import BodyFrame, body_frame
from common.discrepancy.slice import Key, RegionStat, SliceDiscrepancy, analyse_slice

__all__ = [
    "BodyFrame",
    "DiscrepancyAccumulator",
    "Key",
    "RegionStat",
    "SliceDiscrepancy",
    "analyse_slice",
    "body_frame",
]
