"""The cohort's ground truth table ``labels.csv``: one row per patient.

Columns (paths are relative to the cohort folder, ``/`` separated):

=====================================  ============================================================
``patient_id``                          PatientID of the study (also its folder name)
``index``                               position of the patient in the cohort (0-based)
``study_instance_uid``                  StudyInstanceUID
``t1_series_uid``, ``t2_series_uid``,   SeriesInstanceUID of the sagittal T1, T2, STIR series
``stir_series_uid``                     (empty when the series was not written)
``study_dir``                           folder holding all DICOM files of the study
``t1_series_dir``, ``t2_series_dir``,   folder of each sagittal series inside the study folder
``stir_series_dir``
``t1_mask``, ``t2_mask``, ``stir_mask``  NIfTI label map on the exact grid of that series
``t_score``                             DXA T-score: the lowest of L1-L4 without fractured levels
``dxa_class``                           ``osteoporosis`` (T <= -2.5), ``osteopenia`` (T <= -1)
                                        or ``normal``
``osteoporosis``                        1 when ``dxa_class`` is osteoporosis, else 0
``age``, ``sex``                        years; ``F`` or ``M``
``field_strength``                      tesla (1.5 or 3.0)
``vendor``, ``manufacturer``, ``model``  header style and the Manufacturer / model written
``matrix``                              image matrix of the sagittal series (320 or 512)
``t_latent``                            the patient's latent lumbar density (T-score units)
``dxa_L1`` .. ``dxa_L4``                DXA T-score of each level
``bmd_t_<level>``                       latent density of each vertebra T12..S1 (T-score units)
``fat_fraction_<level>``                noise-free marrow proton-density fat fraction (0..1)
``bone_fraction_<level>``               trabecular bone volume fraction
``texture_scale_<level>``               correlation length of the marrow texture (mm)
``fracture_<level>``                    compression fracture: ``wedge``, ``biconcave``, ``crush``
                                        or empty
=====================================  ============================================================
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from pipeline.labels import SCORED_LEVELS, VERTEBRAE
from train.phantom.dicomio import WrittenPatient
from train.phantom.simulate import SimulatedPatient

LEVEL_FIELDS: Final[tuple[str, ...]] = (
    "bmd_t", "fat_fraction", "bone_fraction", "texture_scale", "fracture",
)  # fmt: skip
BASE_COLUMNS: Final[tuple[str, ...]] = (
    "patient_id", "index", "study_instance_uid", "t1_series_uid", "t2_series_uid",
    "stir_series_uid", "study_dir", "t1_series_dir", "t2_series_dir", "stir_series_dir",
    "t1_mask", "t2_mask", "stir_mask", "t_score", "dxa_class", "osteoporosis", "age", "sex",
    "field_strength", "vendor", "manufacturer", "model", "matrix", "t_latent",
)  # fmt: skip
COLUMNS: Final[tuple[str, ...]] = (
    *BASE_COLUMNS,
    *(f"dxa_{level}" for level in SCORED_LEVELS),
    *(f"{name}_{level}" for name in LEVEL_FIELDS for level in VERTEBRAE),
)


class LabelsError(ValueError):
    """``labels.csv`` is missing, malformed or lacks a required column."""


@dataclass(frozen=True)
class PatientLabel:
    """One row of ``labels.csv``; paths are absolute (resolved against the cohort folder)."""

    patient_id: str
    index: int
    study_instance_uid: str
    t1_series_uid: str | None
    t2_series_uid: str | None
    stir_series_uid: str | None
    study_dir: Path
    t1_series_dir: Path | None
    t2_series_dir: Path | None
    stir_series_dir: Path | None
    t1_mask: Path | None
    t2_mask: Path | None
    stir_mask: Path | None
    t_score: float
    dxa_class: str
    osteoporosis: bool
    age: int
    sex: str
    field_strength: float
    vendor: str
    manufacturer: str
    model: str
    matrix: int
    t_latent: float
    dxa: Mapping[str, float]  # L1..L4
    bmd_t: Mapping[str, float]  # T12..S1
    fat_fraction: Mapping[str, float]
    bone_fraction: Mapping[str, float]
    texture_scale: Mapping[str, float]
    fracture: Mapping[str, str]

    def series_uid(self, kind: str) -> str | None:
        return {"t1": self.t1_series_uid, "t2": self.t2_series_uid,
                "stir": self.stir_series_uid}[kind]  # fmt: skip

    def mask(self, kind: str) -> Path | None:
        return {"t1": self.t1_mask, "t2": self.t2_mask, "stir": self.stir_mask}[kind]

    def series_dir(self, kind: str) -> Path | None:
        return {"t1": self.t1_series_dir, "t2": self.t2_series_dir,
                "stir": self.stir_series_dir}[kind]  # fmt: skip


def label_row(patient: SimulatedPatient, written: WrittenPatient | None) -> dict[str, str]:
    """The ``labels.csv`` row of a patient (``written`` gives the paths, if written)."""
    truth, study = patient.truth, patient.study
    sagittal = patient.sagittal
    row: dict[str, str] = {
        "patient_id": study.patient_id,
        "index": str(patient.index),
        "study_instance_uid": study.study_uid,
        "study_dir": written.study_dir if written else "",
        "t_score": f"{truth.t_score:.1f}",
        "dxa_class": truth.dxa_class,
        "osteoporosis": "1" if truth.osteoporosis else "0",
        "age": str(truth.age),
        "sex": truth.sex,
        "field_strength": f"{study.field_strength:.1f}",
        "vendor": study.vendor,
        "manufacturer": study.manufacturer,
        "model": study.model,
        "matrix": str(patient.matrix),
        "t_latent": f"{truth.t_patient:.4f}",
    }
    for kind in ("t1", "t2", "stir"):
        series = sagittal.get(kind)
        row[f"{kind}_series_uid"] = series.series_uid if series else ""
        row[f"{kind}_series_dir"] = written.series_dirs.get(kind, "") if written else ""
        row[f"{kind}_mask"] = written.masks.get(kind, "") if written else ""
    for level in SCORED_LEVELS:
        row[f"dxa_{level}"] = f"{truth.dxa_levels[level]:.1f}"
    for v in truth.vertebrae:
        row[f"bmd_t_{v.name}"] = f"{v.bmd_t:.4f}"
        row[f"fat_fraction_{v.name}"] = f"{v.fat_fraction:.4f}"
        row[f"bone_fraction_{v.name}"] = f"{v.bone_fraction:.4f}"
        row[f"texture_scale_{v.name}"] = f"{v.texture_scale_mm:.3f}"
        row[f"fracture_{v.name}"] = v.fracture
    return row


def write_labels(rows: list[dict[str, str]], path: Path) -> None:
    """Write rows (sorted by ``index``) with the columns of :data:`COLUMNS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: int(r["index"])):
            writer.writerow({column: row.get(column, "") for column in COLUMNS})


def _path(root: Path, value: str) -> Path | None:
    return (root / value).resolve() if value else None


def read_labels(path: Path | str) -> list[PatientLabel]:
    """Read ``labels.csv`` into typed rows, in file order.

    Raises :class:`LabelsError` naming the line and column when a value is missing or
    malformed.
    """
    path = Path(path)
    root = path.parent
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise LabelsError(f"{path}: cannot read labels: {exc.strerror}") from exc
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in BASE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise LabelsError(f"{path}: missing columns: {', '.join(missing)}")
        labels = []
        for line, row in enumerate(reader, start=2):
            try:
                labels.append(_parse(row, root))
            except (KeyError, ValueError, TypeError) as exc:
                raise LabelsError(f"{path}:{line}: invalid row ({exc})") from exc
    return labels


def _levels(row: dict[str, str], name: str, levels: tuple[str, ...]) -> dict[str, float]:
    return {level: float(row[f"{name}_{level}"]) for level in levels if row.get(f"{name}_{level}")}


def _parse(row: dict[str, str], root: Path) -> PatientLabel:
    dxa_class = row["dxa_class"]
    if dxa_class not in ("osteoporosis", "osteopenia", "normal"):
        raise ValueError(f"dxa_class {dxa_class!r}")
    return PatientLabel(
        patient_id=row["patient_id"],
        index=int(row["index"]),
        study_instance_uid=row["study_instance_uid"],
        t1_series_uid=row["t1_series_uid"] or None,
        t2_series_uid=row["t2_series_uid"] or None,
        stir_series_uid=row["stir_series_uid"] or None,
        study_dir=(root / row["study_dir"]).resolve(),
        t1_series_dir=_path(root, row["t1_series_dir"]),
        t2_series_dir=_path(root, row["t2_series_dir"]),
        stir_series_dir=_path(root, row["stir_series_dir"]),
        t1_mask=_path(root, row["t1_mask"]),
        t2_mask=_path(root, row["t2_mask"]),
        stir_mask=_path(root, row["stir_mask"]),
        t_score=float(row["t_score"]),
        dxa_class=dxa_class,
        osteoporosis=row["osteoporosis"] == "1",
        age=int(row["age"]),
        sex=row["sex"],
        field_strength=float(row["field_strength"]),
        vendor=row["vendor"],
        manufacturer=row["manufacturer"],
        model=row["model"],
        matrix=int(row["matrix"]),
        t_latent=float(row["t_latent"]),
        dxa=MappingProxyType(_levels(row, "dxa", SCORED_LEVELS)),
        bmd_t=MappingProxyType(_levels(row, "bmd_t", VERTEBRAE)),
        fat_fraction=MappingProxyType(_levels(row, "fat_fraction", VERTEBRAE)),
        bone_fraction=MappingProxyType(_levels(row, "bone_fraction", VERTEBRAE)),
        texture_scale=MappingProxyType(_levels(row, "texture_scale", VERTEBRAE)),
        fracture=MappingProxyType({level: row.get(f"fracture_{level}", "") for level in VERTEBRAE}),
    )
