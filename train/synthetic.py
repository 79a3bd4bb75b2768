"""Training samples from the synthetic cohort, simulated in memory (no DICOM round trip).

:func:`train.phantom.simulate.simulate_patient` returns for every series the stored pixel
values that its DICOM writer puts into the files and the ground-truth label map on the same
``(k, j, i)`` grid, so the arrays here are what the pipeline's volume loader returns for the
written files. Each patient depends only on
``(seed, index)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pipeline.labels import SCORED_LEVELS
from train.datasets import PatientSample, SequenceName, SeriesSample
from train.phantom.options import CohortOptions
from train.phantom.simulate import SimulatedPatient, simulate_patient

KIND_OF: dict[SequenceName, str] = {"T1": "t1", "T2": "t2"}


def cohort_options(seed: int, n_patients: int, **overrides: object) -> CohortOptions:
    """Options of a synthetic training cohort: only the sagittal T1 and T2 series."""
    values: dict[str, object] = {"seed": seed, "n_patients": n_patients, "series": ("t1", "t2")}
    values.update(overrides)
    return CohortOptions.model_validate(values)


def oracle_score(simulated: SimulatedPatient) -> float:
    """A simple latent score: the noise-free L1-L4 marrow fat fraction (higher = more likely
    osteoporotic). Evaluations use the cohort's oracle model instead when the patients carry
    ``oracle_features`` (see :func:`oracle_features`)."""
    truth = simulated.truth
    return float(np.mean([truth.level(level).fat_fraction for level in SCORED_LEVELS]))


def oracle_features(simulated: SimulatedPatient) -> tuple[float, ...]:
    """The noise-free features of the phantom's oracle (fat fraction, bone fraction and texture
    scale of L1-L4), as its calibration report uses them."""
    levels = [simulated.truth.level(level) for level in SCORED_LEVELS]
    return (
        *(v.fat_fraction for v in levels),
        *(v.bone_fraction for v in levels),
        *(v.texture_scale_mm for v in levels),
    )


def to_patient_sample(simulated: SimulatedPatient) -> PatientSample:
    """A simulated patient as a :class:`PatientSample` (T1 and T2 with ground-truth labels)."""
    series: dict[SequenceName, SeriesSample] = {}
    for sequence, kind in KIND_OF.items():
        try:
            sim = simulated.get(kind)  # type: ignore[arg-type]
        except KeyError:
            continue
        if sim.labelmap is None or sim.geometry is None:
            continue
        series[sequence] = SeriesSample(
            sequence=sequence,
            array=sim.pixels.astype(np.float32),
            labelmap=np.array(sim.labelmap, dtype=np.uint8),
            geometry=sim.geometry,
            label_source="truth",
        )
    truth = simulated.truth
    return PatientSample(
        patient_id=f"synthetic-{simulated.seed}-{simulated.index:05d}",
        osteoporosis=truth.osteoporosis,
        t_score=truth.t_score,
        series=series,
        oracle_score=oracle_score(simulated),
        info={
            "index": simulated.index,
            "age": truth.age,
            "sex": truth.sex,
            "field_strength": simulated.study.field_strength,
            "vendor": simulated.study.vendor,
            "oracle_features": oracle_features(simulated),
        },
    )


def synthetic_patients(
    seed: int,
    indices: Sequence[int] | int,
    *,
    options: CohortOptions | None = None,
    on_patient: Callable[[], None] | None = None,
) -> list[PatientSample]:
    """Simulate patients ``indices`` (or ``range(indices)``) of the cohort with ``seed``.

    The simulator's numpy/BLAS work already uses the CPU's cores, so patients are simulated one
    after the other (worker processes measured slower on two cores).
    """
    index_list = list(range(indices)) if isinstance(indices, int) else list(indices)
    options = options or cohort_options(seed, max(1, len(index_list)))
    out: list[PatientSample] = []
    for index in index_list:
        out.append(to_patient_sample(simulate_patient(seed, index, options)))
        if on_patient is not None:
            on_patient()
    return out


def describe(seed: int, n_patients: int) -> str:
    """Training-data description recorded in manifests of models trained on the cohort."""
    return f"synthetic cohort, seed {seed}, {n_patients} patients — not for clinical use"


__all__ = [
    "cohort_options",
    "describe",
    "oracle_features",
    "oracle_score",
    "synthetic_patients",
    "to_patient_sample",
]
