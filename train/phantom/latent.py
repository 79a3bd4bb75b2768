"""Latent (hidden) values of a synthetic patient: demographics, bone density and marrow.

The causal model, per patient:

* age (mostly 50-90) and sex (75 % women by default) set the expected bone density; each
  patient's latent lumbar density, in T-score units, scatters around it, and each vertebra
  scatters around the patient's value;
* the DXA T-score is what a densitometer reports: the lowest of L1-L4 (fractured vertebrae
  excluded), each level measured with noise and raised by degenerative changes (osteophytes,
  facet sclerosis) that grow with age — so DXA and the latent density disagree, as in practice;
* each vertebra's marrow proton-density fat fraction rises with age and falls with density,
  its trabecular bone volume fraction falls with density, and its marrow texture grows
  coarser and more anisotropic as the bone volume fraction falls;
* low density raises the chance of compression fractures; haemangiomas, Modic endplate
  changes, disc degeneration and muscle fat infiltration come with age, independently of
  density.

The functions here are vectorised over patients so that the same code draws one patient for
the simulator and many for solving the intercept that gives the requested prevalence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

import numpy as np

from pipeline.labels import SCORED_LEVELS, VERTEBRAE

LEVEL_INDEX: Final[dict[str, int]] = {name: index for index, name in enumerate(VERTEBRAE)}
SCORED_INDEX: Final[tuple[int, ...]] = tuple(LEVEL_INDEX[name] for name in SCORED_LEVELS)
OSTEOPOROSIS_T: Final[float] = -2.5
OSTEOPENIA_T: Final[float] = -1.0

# Fracture risk weight per level T12..S1 (thoracolumbar junction most, sacrum never).
_FRACTURE_WEIGHT: Final = np.array([1.5, 1.5, 1.0, 0.8, 0.6, 0.4, 0.0])
# Degenerative DXA overestimation weight per scored level L1..L4.
_DEGENERATION_WEIGHT: Final = np.array([0.5, 0.7, 1.0, 1.2])
# Fat fraction rises caudally (per level, T12..S1).
_FF_LEVEL_TREND: Final = np.linspace(-0.015, 0.03, len(VERTEBRAE))

_SOLVER_PATIENTS: Final[int] = 40_000


@dataclass(frozen=True)
class BoneSample:
    """Bone and marrow values of ``n`` patients (arrays over patients, levels T12..S1)."""

    age: np.ndarray  # (n,) years
    female: np.ndarray  # (n,) bool
    t_patient: np.ndarray  # (n,) latent lumbar density, T-score units
    t_level: np.ndarray  # (n, 7) latent density per vertebra
    fat_fraction: np.ndarray  # (n, 7) marrow PDFF, 0..1
    bone_fraction: np.ndarray  # (n, 7) trabecular bone volume fraction
    fracture_loss: np.ndarray  # (n, 7) fractional height loss, 0 = intact
    fracture_acute: np.ndarray  # (n, 7) bool, marrow oedema of a recent fracture
    dxa_level: np.ndarray  # (n, 4) DXA T-score per level L1..L4
    t_score: np.ndarray  # (n,) reported DXA T-score (lowest valid of L1-L4, one decimal)

    @property
    def osteoporosis(self) -> np.ndarray:
        return self.t_score <= OSTEOPOROSIS_T


def _expected_t(age: np.ndarray, female: np.ndarray) -> np.ndarray:
    """Mean latent lumbar T-score by age and sex (women lose bone faster after menopause)."""
    years = np.maximum(age - 45.0, 0.0)
    return np.where(female, 0.3 - 0.058 * years, 0.3 - 0.032 * years)


def sample_bone(
    rng: np.random.Generator, n: int, *, offset: float, female_fraction: float
) -> BoneSample:
    """Draw the bone model of ``n`` patients; ``offset`` shifts every latent T-score."""
    young = rng.random(n) < 0.08
    age = np.where(
        young,
        rng.uniform(35.0, 50.0, n),
        np.clip(rng.normal(67.0, 9.5, n), 50.0, 92.0),
    )
    age = np.round(age)
    female = rng.random(n) < female_fraction
    t_patient = _expected_t(age, female) + 1.15 * rng.standard_normal(n) + offset
    t_level = t_patient[:, None] + 0.32 * rng.standard_normal((n, len(VERTEBRAE)))

    # Marrow: PDFF rises with age, falls with density (patient-level and vertebra-level terms).
    ff_patient = (
        0.52
        + 0.0035 * (age - 50.0)
        - np.where(female, 0.0, 0.02)
        - 0.032 * t_patient
        + 0.050 * rng.standard_normal(n)
    )
    fat_fraction = (
        ff_patient[:, None]
        - 0.030 * (t_level - t_patient[:, None])
        + _FF_LEVEL_TREND[None, :]
        + 0.025 * rng.standard_normal((n, len(VERTEBRAE)))
    )
    fat_fraction = np.clip(fat_fraction, 0.08, 0.92)
    # Trabecular bone volume fraction: density explains about half of its variance (the
    # rest is microarchitecture that DXA does not see), shared by the patient's vertebrae.
    bvf_patient = 0.017 * rng.standard_normal(n)
    bone_fraction = np.clip(
        0.125 + 0.014 * t_level + bvf_patient[:, None] + 0.008 * rng.standard_normal(t_level.shape),
        0.035,
        0.26,
    )

    # Compression fractures: risk grows below T = -1.5.
    risk = (0.003 + 0.03 * np.maximum(-t_level - 1.5, 0.0)) * _FRACTURE_WEIGHT[None, :]
    fractured = rng.random(t_level.shape) < risk
    loss = np.where(fractured, rng.uniform(0.15, 0.45, t_level.shape), 0.0)
    acute = fractured & (rng.random(t_level.shape) < 0.25)

    # DXA: per-level noise and degenerative overestimation; fractured levels are excluded.
    scored = np.array(SCORED_INDEX)
    scale = (0.04 + 0.012 * np.maximum(age - 50.0, 0.0))[:, None] * _DEGENERATION_WEIGHT[None, :]
    degeneration = rng.exponential(1.0, (n, len(scored))) * scale
    dxa_level = t_level[:, scored] + degeneration + 0.25 * rng.standard_normal((n, len(scored)))
    valid = ~fractured[:, scored]
    too_few = valid.sum(axis=1) < 2
    valid[too_few] = True
    t_score = np.round(np.where(valid, dxa_level, np.inf).min(axis=1), 1)
    return BoneSample(
        age=age,
        female=female,
        t_patient=t_patient,
        t_level=t_level,
        fat_fraction=fat_fraction,
        bone_fraction=bone_fraction,
        fracture_loss=loss,
        fracture_acute=acute,
        dxa_level=np.round(dxa_level, 1),
        t_score=t_score,
    )


@functools.lru_cache(maxsize=64)
def prevalence_offset(prevalence: float, female_fraction: float) -> float:
    """The latent T-score shift that makes ``prevalence`` of patients DXA-osteoporotic.

    Solved once per (prevalence, female fraction) on a fixed internal sample, so it is
    deterministic and independent of the cohort's seed.
    """
    low, high = -4.0, 4.0
    rng_seed = 20_240_601
    for _ in range(40):
        middle = 0.5 * (low + high)
        sample = sample_bone(
            np.random.default_rng(rng_seed),
            _SOLVER_PATIENTS,
            offset=middle,
            female_fraction=female_fraction,
        )
        if float(sample.osteoporosis.mean()) > prevalence:
            low = middle
        else:
            high = middle
        if high - low < 1e-3:
            break
    return round(0.5 * (low + high), 3)


def dxa_class(t_score: float) -> str:
    """WHO category of a DXA T-score."""
    if t_score <= OSTEOPOROSIS_T:
        return "osteoporosis"
    if t_score <= OSTEOPENIA_T:
        return "osteopenia"
    return "normal"


def texture_parameters(
    bone_fraction: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marrow texture of vertebrae: correlation length (mm), fat-fraction amplitude and
    anisotropy (0 isotropic .. 1 vertical striation), all coarser as bone volume falls."""
    loss = np.clip((0.16 - bone_fraction) / 0.12, 0.0, 1.0)
    jitter = rng.normal(0.0, 1.0, (3, *np.shape(bone_fraction)))
    scale = np.clip((1.6 + 3.4 * loss) * np.exp(0.10 * jitter[0]), 1.2, 6.5)
    amplitude = np.clip(0.025 + 0.06 * loss + 0.008 * jitter[1], 0.01, 0.12)
    anisotropy = np.clip(0.15 + 0.7 * loss + 0.08 * jitter[2], 0.0, 1.0)
    return scale, amplitude, anisotropy
