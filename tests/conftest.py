"""Shared pytest fixtures, one section per area of the project."""

from __future__ import annotations

# -- synthetic cohort (train.phantom) ---------------------------------------------------------
#
# A small cohort written once per test session: four patients in 320x320 with all five series,
# one per vendor style, both field strengths, all three DXA classes, a T2 series on its own
# grid, and both InstanceNumber directions. Written in Explicit VR Little Endian.
from dataclasses import dataclass
from pathlib import Path

import pytest

from train.phantom import CohortOptions, PatientLabel, generate_cohort, read_labels

SYNTHETIC_COHORT_OPTIONS = CohortOptions(n_patients=4, seed=5, matrix=(320,))


@dataclass(frozen=True)
class SyntheticCohort:
    """A written cohort: its folder, ``labels.csv``, the parsed rows and the options used."""

    root: Path
    labels_csv: Path
    labels: list[PatientLabel]
    options: CohortOptions

    def study_files(self, patient: PatientLabel) -> list[Path]:
        return sorted(patient.study_dir.rglob("*.dcm"))


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCohort:
    """Four synthetic patients written to disk (DICOM studies, NIfTI masks, labels.csv)."""
    root = tmp_path_factory.mktemp("synthetic-cohort")
    labels_csv = generate_cohort(root, SYNTHETIC_COHORT_OPTIONS, workers=2)
    return SyntheticCohort(root, labels_csv, read_labels(labels_csv), SYNTHETIC_COHORT_OPTIONS)


# -- end of synthetic cohort ------------------------------------------------------------------


# -- result objects and export ----------------------------------------------------------------
#
# Small models trained once per session (tests/pipeline_fixtures.build_tiny_models) on two
# patients of the synthetic cohort above, for the tests that run the node end to end (analysis
# job -> SEG/SR/key image -> outbox -> C-STORE). Like the pipeline's own small models they
# analyse the patients they were trained on: these tests check the plumbing, not the models.

RESULT_MODEL_PATIENTS = (0, 2)


@dataclass(frozen=True)
class TinyModels:
    """A models folder and the classifier architecture its manifests name."""

    models_dir: Path
    architecture: str


@pytest.fixture(scope="session")
def result_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    from tests.pipeline_fixtures import TINY_CLASSIFIER, build_tiny_models
    from train.phantom import simulate_patient

    options = SYNTHETIC_COHORT_OPTIONS
    patients = [simulate_patient(options.seed, index, options) for index in RESULT_MODEL_PATIENTS]
    folder = tmp_path_factory.mktemp("result-models")
    build_tiny_models(folder, patients, seg_steps=150, cls_steps=20)
    return TinyModels(folder, TINY_CLASSIFIER)


# -- end of result objects and export ---------------------------------------------------------
