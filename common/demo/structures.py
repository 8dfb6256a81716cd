"""Fine anatomical structures of the synthetic L3 phantom.

The phantom renders a *structure* map (one of these values per pixel) rather than the
study classes directly, so that a label convention (which muscles count, whether
intramuscular fat counts) can be applied afterwards, the way a human reader would.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class Structure(IntEnum):
    """What a phantom pixel is made of (uint8 values in ``PhantomSlice.structures``)."""

    air = 0
    skin = 1
    subcutaneous_fat = 2
    abdominal_wall_muscle = 3  # rectus, external/internal obliques, transversus, latissimus
    psoas = 4
    paraspinal = 5  # erector spinae and multifidus
    quadratus_lumborum = 6
    intramuscular_fat = 7  # islands inside muscles and fat planes between muscle layers
    visceral_fat = 8  # intraperitoneal and retroperitoneal fat
    vertebral_body = 9
    posterior_elements = 10  # pedicles, laminae, spinous and transverse processes
    spinal_canal = 11
    kidney = 12
    bowel = 13  # bowel wall and soft content
    bowel_gas = 14
    contrast_bowel = 15  # oral contrast inside bowel
    vessel = 16  # aorta, IVC, mesenteric vessels
    liver = 17
    fascia = 18  # linea alba, linea semilunaris (dense connective tissue, not muscle)
    table = 19  # the CT couch under the patient


#: Every skeletal-muscle structure, whether or not a convention counts it.
MUSCLE_STRUCTURES: Final[tuple[Structure, ...]] = (
    Structure.abdominal_wall_muscle,
    Structure.psoas,
    Structure.paraspinal,
    Structure.quadratus_lumborum,
)

__all__ = ["MUSCLE_STRUCTURES", "Structure"]
