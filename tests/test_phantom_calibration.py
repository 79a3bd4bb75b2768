"""Calibration of the synthetic cohort on 250 patients: the VBQ reaches a patient-level AUC
of 0.75-0.85 for DXA osteoporosis, the oracle stays between it and 1, the prevalence is
30-40 %, and the marrow fat fraction behaves as in the literature.

The report is computed in memory, rendering only the T1 slices the VBQ reads; those pixels
are identical to the written cohort's (``test_phantom_dicom`` checks the report of written
files against the generator's), so ``opmri-node synth-report`` on the same cohort written to
disk gives the same figures.
"""

from __future__ import annotations

import numpy as np
import pytest

from train.phantom import CohortOptions, calibrate, simulate_patient
from train.phantom.calibration import auc, patient_record, vbq

N_PATIENTS = 250
SEED = 0


@pytest.fixture(scope="module")
def report() -> dict:
    result, _ = calibrate(CohortOptions(n_patients=N_PATIENTS, seed=SEED), workers=2)
    return result


def test_vbq_auc_is_in_the_literature_range(report: dict) -> None:
    assert report["n_with_vbq"] == N_PATIENTS
    assert 0.75 <= report["vbq"]["auc"] <= 0.85
    low, high = report["vbq"]["ci95"]
    assert low < report["vbq"]["auc"] < high and high - low < 0.2
    # The VBQ rises from normal to osteoporosis, at values close to the published ones.
    means = report["vbq"]["mean_by_class"]
    assert means["normal"] < means["osteopenia"] < means["osteoporosis"]
    assert 2.3 <= means["normal"] <= 3.1 and 2.9 <= means["osteoporosis"] <= 3.6
    # Field strength confounds it: lower at 3 T.
    fields = report["vbq"]["by_field_strength"]
    assert fields["3.0"]["mean"] < fields["1.5"]["mean"]


def test_oracle_lies_between_the_vbq_and_one(report: dict) -> None:
    oracle = report["oracle"]["auc"]
    assert report["vbq"]["auc"] + 0.03 < oracle < 0.96
    assert oracle < report["latent_auc"] < 1.0


def test_prevalence_and_marrow_fat(report: dict) -> None:
    prevalence = report["prevalence"]
    assert 0.30 <= prevalence["osteoporosis"] <= 0.40
    assert prevalence["osteopenia"] > 0.2 and prevalence["normal"] > 0.1
    ff = report["fat_fraction"]["by_class"]
    assert 0.60 <= ff["osteoporosis"]["mean"] <= 0.74
    assert 0.50 <= ff["normal"]["mean"] <= 0.60
    assert -0.75 <= report["fat_fraction"]["corr_with_t_score"] <= -0.55
    assert report["within_targets"] is True


def test_fast_record_equals_the_full_simulation() -> None:
    """The calibration's partial rendering gives the VBQ of the complete T1 series."""
    options = CohortOptions(seed=SEED, series=("t1",))
    for index in (0, 5):
        t1 = simulate_patient(SEED, index, options).get("t1")
        full = vbq(t1.pixels, t1.labelmap, t1.geometry)
        assert full is not None
        assert patient_record(SEED, index, options).vbq == full.score


def test_auc_matches_its_definition() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=60).round(1)  # with ties
    positive = rng.random(60) < 0.4
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p in scores[positive]
        for n in scores[~positive]
    ]
    assert auc(scores, positive) == pytest.approx(np.mean(pairs))
