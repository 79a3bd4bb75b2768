"""Synthetic lumbar spine MRI cohort with DXA-like labels (the phantom).

Each patient is one routine lumbar MR study — three-plane localizer, sagittal T1 TSE,
sagittal T2 TSE, sagittal STIR and axial T2 TSE — simulated from physics (spin-echo signal of
each tissue's proton density, T1 and T2; marrow as a fat/water mixture whose fat fraction
depends on the vertebra's latent bone density; coil sensitivity, receiver gain and Rician
noise) on an anatomy that varies per patient, and written as single-frame MR Image Storage
files in the header style of one of several vendors, with ground-truth vertebral-body and
CSF label maps and a DXA-like T-score.

Public API::

    from train.phantom import CohortOptions, generate_cohort, read_labels, simulate_patient

    labels_csv = generate_cohort(Path("cohort"), CohortOptions(n_patients=200, seed=1))
    rows = read_labels(labels_csv)                      # list[PatientLabel]
    patient = simulate_patient(1, 0, CohortOptions())   # in memory, no files
    t1 = patient.sagittal["t1"]                          # pixels, labelmap, geometry

See ``docs/synthetic-cohort.md`` for the model, the calibration and the file layout.
"""

from __future__ import annotations

from train.phantom.calibration import (
    CalibrationRecord,
    VBQValue,
    calibrate,
    report_for_cohort,
    vbq,
)
from train.phantom.cohort import generate_cohort
from train.phantom.labels import LabelsError, PatientLabel, read_labels
from train.phantom.options import (
    PHANTOM_VERSION,
    SERIES_KINDS,
    TRANSFER_SYNTAXES,
    VENDORS,
    CohortOptions,
    SeriesKind,
    TransferSyntaxName,
    VendorName,
)
from train.phantom.simulate import (
    PatientTruth,
    SimulatedPatient,
    SimulatedSeries,
    StudyInfo,
    VertebraTruth,
    simulate_patient,
)

__all__ = [
    "PHANTOM_VERSION",
    "SERIES_KINDS",
    "TRANSFER_SYNTAXES",
    "VENDORS",
    "CalibrationRecord",
    "CohortOptions",
    "LabelsError",
    "PatientLabel",
    "PatientTruth",
    "SeriesKind",
    "SimulatedPatient",
    "SimulatedSeries",
    "StudyInfo",
    "TransferSyntaxName",
    "VBQValue",
    "VendorName",
    "VertebraTruth",
    "calibrate",
    "generate_cohort",
    "read_labels",
    "report_for_cohort",
    "simulate_patient",
    "vbq",
]
