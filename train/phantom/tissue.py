"""Tissue relaxation parameters and the signal equations of the simulated sequences.

Every voxel is a mixture of the tissue *channels* below (fractions summing to at most one; the
rest is air). A sequence turns each channel into one signal value from its proton density
(PD, relative to water), T1 and T2 at the study's field strength, and the voxel signal is the
fraction-weighted sum. The figures are typical literature values at 37 degC: fat T1 270/340 ms
and fast-spin-echo T2 about 110 ms; red-marrow water T1 750/880 ms with a short T2 (trabecular
susceptibility); muscle T1 1000/1400 ms, T2 about 40 ms; CSF T1 about 4.2 s, T2 about 2 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

CHANNELS: Final[tuple[str, ...]] = (
    "fat",  # adipose tissue and the fat component of marrow
    "marrow_water",  # water component of haematopoietic (red) marrow
    "bone",  # cortical and trabecular bone: no MR signal
    "muscle",
    "csf",
    "nucleus",  # hydrated nucleus pulposus
    "annulus",  # annulus fibrosus and degenerated disc
    "nerve",  # spinal cord, conus, cauda equina roots
    "organ",  # abdominal viscera
    "fluid",  # free fluid: bowel content, vascular lakes of haemangiomas, venous plexus
    "oedema",  # marrow oedema water (acute fracture, Modic type 1)
    "vessel",  # flowing blood: signal void on spin echo
    "ligament",
    "skin",
)
CHANNEL: Final[dict[str, int]] = {name: index for index, name in enumerate(CHANNELS)}
N_CHANNELS: Final[int] = len(CHANNELS)


@dataclass(frozen=True)
class Relaxation:
    """Proton density and relaxation times (ms) of one tissue at 1.5 T and 3 T."""

    pd: float
    t1_15: float
    t1_30: float
    t2_15: float
    t2_30: float

    def t1(self, field: float) -> float:
        return self.t1_15 if field < 2.0 else self.t1_30

    def t2(self, field: float) -> float:
        return self.t2_15 if field < 2.0 else self.t2_30


TISSUES: Final[dict[str, Relaxation]] = {
    "fat": Relaxation(0.90, 270.0, 340.0, 110.0, 95.0),
    "marrow_water": Relaxation(0.75, 750.0, 880.0, 38.0, 32.0),
    "bone": Relaxation(0.0, 1000.0, 1000.0, 1.0, 1.0),
    "muscle": Relaxation(0.80, 1000.0, 1400.0, 42.0, 36.0),
    "csf": Relaxation(1.0, 4200.0, 4300.0, 2000.0, 1800.0),
    "nucleus": Relaxation(0.90, 1100.0, 1350.0, 140.0, 120.0),
    "annulus": Relaxation(0.70, 900.0, 1100.0, 45.0, 38.0),
    "nerve": Relaxation(0.80, 850.0, 1050.0, 85.0, 75.0),
    "organ": Relaxation(0.85, 600.0, 850.0, 55.0, 45.0),
    "fluid": Relaxation(1.0, 3000.0, 3300.0, 700.0, 600.0),
    "oedema": Relaxation(1.0, 1300.0, 1600.0, 90.0, 80.0),
    "vessel": Relaxation(0.05, 1500.0, 1700.0, 200.0, 180.0),
    "ligament": Relaxation(0.35, 900.0, 1100.0, 12.0, 10.0),
    "skin": Relaxation(0.75, 900.0, 1150.0, 40.0, 35.0),
}


@dataclass(frozen=True)
class SequenceParams:
    """Timing of one acquisition (ms); ``flip_deg`` is used by gradient echo only."""

    kind: str  # "se" (spin echo / TSE), "ir" (inversion recovery TSE), "gre" (spoiled GRE)
    tr: float
    te: float
    ti: float = 0.0
    flip_deg: float = 90.0


def tissue_signal(tissue: Relaxation, seq: SequenceParams, field: float) -> float:
    """Noise-free magnitude signal of a tissue (PD = 1 water, full relaxation = 1).

    Spin echo: ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``. Inversion recovery (magnitude):
    ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``. Spoiled gradient echo:
    ``PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2*)`` with T2* taken as T2 / 3.
    """
    t1, t2 = tissue.t1(field), tissue.t2(field)
    e1 = math.exp(-seq.tr / t1)
    if seq.kind == "se":
        value = (1.0 - e1) * math.exp(-seq.te / t2)
    elif seq.kind == "ir":
        value = abs(1.0 - 2.0 * math.exp(-seq.ti / t1) + e1) * math.exp(-seq.te / t2)
    elif seq.kind == "gre":
        alpha = math.radians(seq.flip_deg)
        value = math.sin(alpha) * (1.0 - e1) / (1.0 - math.cos(alpha) * e1)
        value *= math.exp(-seq.te / max(t2 / 3.0, 0.5))
    else:
        raise ValueError(f"unknown sequence kind {seq.kind!r}")
    return tissue.pd * value


def channel_signals(seq: SequenceParams, field: float) -> np.ndarray:
    """Signal of every channel of :data:`CHANNELS` for one sequence, as float32."""
    return np.array(
        [tissue_signal(TISSUES[name], seq, field) for name in CHANNELS], dtype=np.float32
    )
