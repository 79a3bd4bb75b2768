"""A hospital's own cohort: a CSV of patients, their lumbar MRI study folders and DXA results.

Format (UTF-8 CSV with a header row; column order is free; paths are relative to the CSV's
folder unless absolute)::

    patient_id,study_dir,dxa_t_score,dxa_label,dxa_date,mri_date,t1_mask,t2_mask
    P0001,studies/P0001,-2.7,,2023-04-18,2023-05-02,masks/P0001_t1.nii.gz,
    P0002,studies/P0002,,normal,2023-01-09,,,

=============  =========  ===============================================================
column         required   meaning
=============  =========  ===============================================================
patient_id     yes        a pseudonym, unique per row (one row per patient)
study_dir      yes        folder with the DICOM files of the lumbar MRI study (any layout)
dxa_t_score    one of     lowest L1-L4 DXA T-score, -7.0 to 5.0
dxa_label      the two    ``osteoporosis``, ``osteopenia`` or ``normal`` (or 1 / 0)
dxa_date       yes        date of the DXA, ``YYYY-MM-DD`` or ``YYYYMMDD``
mri_date       no         date of the MRI (default: the study's StudyDate)
t1_mask        no         label map of the sagittal T1 series (NIfTI, see below)
t2_mask        no         label map of the sagittal T2 series
=============  =========  ===============================================================

The target is osteoporosis = T-score <= -2.5 (WHO); when both ``dxa_t_score`` and
``dxa_label`` are given they must agree. MRI and DXA more than ``max_gap_days`` (default 365)
apart are rejected. Mask files hold the values of :mod:`pipeline.labels` (1..7 = T12..S1,
8 = CSF) on the grid of the series they belong to, stored as NIfTI with axes ``(i, j, k)`` and
an RAS+ affine (the dcm2niix convention; any axis flips or permutation of the series grid are
accepted). Series without a mask are segmented by the current segmenter.

Errors name the CSV line and column, never the patient id (it may identify the patient).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Final

import numpy as np
import torch

from pipeline.config import PipelineSettings
from pipeline.labels import CSF_LABEL
from pipeline.privacy import uid_tag
from pipeline.registry import LoadedModel
from pipeline.segment import SegmentationInputSpec, postprocess_labelmap, predict_labelmaps
from pipeline.selection import read_headers, select_series
from pipeline.volume import Volume, VolumeError, load_series
from train.datasets import SEQUENCES, PatientSample, SequenceName, SeriesSample

log = logging.getLogger(__name__)

COLUMNS: Final[tuple[str, ...]] = (
    "patient_id",
    "study_dir",
    "dxa_t_score",
    "dxa_label",
    "dxa_date",
    "mri_date",
    "t1_mask",
    "t2_mask",
)
REQUIRED: Final[tuple[str, ...]] = ("patient_id", "study_dir", "dxa_date")
OSTEOPOROSIS_T: Final[float] = -2.5
T_SCORE_RANGE: Final[tuple[float, float]] = (-7.0, 5.0)
LABEL_WORDS: Final[dict[str, bool]] = {
    "osteoporosis": True,
    "1": True,
    "osteopenia": False,
    "normal": False,
    "0": False,
}
MASK_SUFFIXES: Final[tuple[str, ...]] = (".nii", ".nii.gz")


class SiteCohortError(ValueError):
    """The cohort CSV (or one of its studies) is unusable; ``issues`` lists every problem as
    ``FILE:LINE: column: reason``."""

    def __init__(self, issues: Sequence[str]) -> None:
        self.issues = list(issues)
        count = len(self.issues)
        head = f"{count} problem{'s' if count != 1 else ''} in the site cohort:"
        super().__init__("\n".join([head, *(f"  {issue}" for issue in self.issues)]))


@dataclass(frozen=True)
class SiteCohortRow:
    """One validated row of the cohort CSV (paths resolved)."""

    line: int
    patient_id: str
    study_dir: Path
    osteoporosis: bool
    t_score: float | None
    dxa_date: date
    mri_date: date | None
    masks: dict[SequenceName, Path]


@dataclass(frozen=True)
class SiteCohort:
    """A validated cohort CSV."""

    path: Path
    rows: tuple[SiteCohortRow, ...]

    @property
    def positives(self) -> int:
        return sum(row.osteoporosis for row in self.rows)


def _parse_date(text: str) -> date:
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"'{text}' is not a date (use YYYY-MM-DD)")


def read_site_cohort(path: Path | str, *, max_gap_days: int = 365) -> SiteCohort:
    """Read and validate a cohort CSV; raises :class:`SiteCohortError` listing all problems."""
    path = Path(path)
    if not path.is_file():
        raise SiteCohortError([f"{path}: no such file"])
    base = path.parent
    issues: list[str] = []
    rows: list[SiteCohortRow] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteCohortError([f"{path}: cannot be read as UTF-8 text ({exc})"]) from exc
    reader = csv.DictReader(text.splitlines())
    header = [name.strip() for name in (reader.fieldnames or [])]
    if not header:
        raise SiteCohortError([f"{path}:1: the file is empty (a header row is required)"])
    unknown = [name for name in header if name not in COLUMNS]
    missing = [name for name in REQUIRED if name not in header]
    if "dxa_t_score" not in header and "dxa_label" not in header:
        missing.append("dxa_t_score or dxa_label")
    if unknown:
        issues.append(
            f"{path}:1: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}"
        )
    if missing:
        issues.append(f"{path}:1: missing column(s) {', '.join(missing)}")
    if issues:
        raise SiteCohortError(issues)
    reader.fieldnames = header
    first_line: dict[str, int] = {}
    for record in reader:
        line = reader.line_num
        values = {key: (value or "").strip() for key, value in record.items() if key is not None}
        if None in record:
            issues.append(f"{path}:{line}: more values than columns")
            continue
        if not any(values.values()):
            continue

        def issue(column: str, reason: str, line: int = line) -> None:
            issues.append(f"{path}:{line}: {column}: {reason}")

        pid = values.get("patient_id", "")
        if not pid:
            issue("patient_id", "empty")
        elif pid in first_line:
            issue("patient_id", f"repeats the patient of line {first_line[pid]}")
        else:
            first_line[pid] = line

        study_text = values.get("study_dir", "")
        study_dir = (base / study_text) if study_text else base
        if not study_text:
            issue("study_dir", "empty")
        elif not study_dir.is_dir():
            issue("study_dir", f"folder {study_dir} does not exist")
        elif not any(p.is_file() for p in study_dir.rglob("*")):
            issue("study_dir", f"folder {study_dir} holds no files")

        t_score: float | None = None
        t_text = values.get("dxa_t_score", "")
        if t_text:
            try:
                t_score = float(t_text)
            except ValueError:
                issue("dxa_t_score", f"'{t_text}' is not a number")
            else:
                low, high = T_SCORE_RANGE
                if not math.isfinite(t_score) or not low <= t_score <= high:
                    issue("dxa_t_score", f"{t_text} is outside {low} to {high}")
                    t_score = None
        label: bool | None = None
        label_text = values.get("dxa_label", "").lower()
        if label_text:
            if label_text not in LABEL_WORDS:
                issue(
                    "dxa_label",
                    f"'{values['dxa_label']}' is not one of " + ", ".join(LABEL_WORDS),
                )
            else:
                label = LABEL_WORDS[label_text]
        if not t_text and not label_text:
            issue("dxa_t_score", "neither a T-score nor a dxa_label is given")
        if t_score is not None and label is not None and (t_score <= OSTEOPOROSIS_T) != label:
            issue(
                "dxa_label",
                f"'{label_text}' contradicts the T-score {t_score} "
                f"(osteoporosis is T <= {OSTEOPOROSIS_T})",
            )
        osteoporosis = label if label is not None else (
            t_score is not None and t_score <= OSTEOPOROSIS_T
        )

        dxa_date: date | None = None
        date_text = values.get("dxa_date", "")
        if not date_text:
            issue("dxa_date", "empty")
        else:
            try:
                dxa_date = _parse_date(date_text)
            except ValueError as exc:
                issue("dxa_date", str(exc))
        mri_date: date | None = None
        if values.get("mri_date"):
            try:
                mri_date = _parse_date(values["mri_date"])
            except ValueError as exc:
                issue("mri_date", str(exc))
        if dxa_date is not None and mri_date is not None:
            gap = abs((mri_date - dxa_date).days)
            if gap > max_gap_days:
                issue("mri_date", f"MRI and DXA are {gap} days apart (limit {max_gap_days})")

        masks: dict[SequenceName, Path] = {}
        for sequence in SEQUENCES:
            column = f"{sequence.lower()}_mask"
            mask_text = values.get(column, "")
            if not mask_text:
                continue
            mask_path = base / mask_text
            if not mask_path.name.endswith(MASK_SUFFIXES):
                issue(column, f"{mask_path.name} is not a NIfTI file (.nii or .nii.gz)")
            elif not mask_path.is_file():
                issue(column, f"mask file {mask_path} does not exist")
            else:
                masks[sequence] = mask_path

        if dxa_date is not None and pid and study_text:
            rows.append(
                SiteCohortRow(
                    line=line,
                    patient_id=pid,
                    study_dir=study_dir,
                    osteoporosis=bool(osteoporosis),
                    t_score=t_score,
                    dxa_date=dxa_date,
                    mri_date=mri_date,
                    masks=masks,
                )
            )
    if issues:
        raise SiteCohortError(issues)
    if not rows:
        raise SiteCohortError([f"{path}: no patient rows"])
    return SiteCohort(path, tuple(rows))


# -- loading --------------------------------------------------------------------------------


def read_mask(path: Path, volume: Volume) -> np.ndarray:
    """A NIfTI label map resampled (by axis flips/permutation only) onto ``volume``'s
    ``(k, j, i)`` grid; raises :class:`ValueError` when it lies on another grid."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)  # type: ignore[attr-defined]
    except Exception as exc:  # nibabel raises many types for damaged files
        raise ValueError(f"{path.name} cannot be read as NIfTI ({type(exc).__name__})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path.name} is not a 3-D label map (shape {data.shape})")
    if not np.allclose(data, np.round(data)):
        raise ValueError(f"{path.name} holds non-integer values; a label map is expected")
    data = np.round(data).astype(np.int64)
    if data.min() < 0 or data.max() > CSF_LABEL:
        raise ValueError(
            f"{path.name} holds values outside 0..{CSF_LABEL} (see pipeline.labels for the "
            "label values)"
        )
    # Voxel (i, j, k) of the mask -> voxel (i, j, k) of the series.
    series_affine = volume.geometry.nifti_affine
    mapping = np.linalg.inv(series_affine) @ np.asarray(image.affine, dtype=np.float64)  # type: ignore[attr-defined]
    rotation, shift = mapping[:3, :3], mapping[:3, 3]
    permutation = np.round(rotation)
    exact = np.abs(permutation).sum(axis=0).tolist() == [1.0, 1.0, 1.0] and np.abs(
        permutation
    ).sum(axis=1).tolist() == [1.0, 1.0, 1.0]
    if not exact or np.abs(rotation - permutation).max() > 1e-2 or (
        np.abs(shift - np.round(shift)).max() > 0.1
    ):
        raise ValueError(
            f"{path.name} does not lie on the grid of the series it belongs to (its affine "
            "differs beyond flips and axis order); write masks on the series' own grid"
        )
    target_shape = (volume.shape[2], volume.shape[1], volume.shape[0])  # (i, j, k)
    out = np.zeros(target_shape, dtype=np.uint8)
    index = np.indices(data.shape).reshape(3, -1).astype(np.float64)
    target = np.round(permutation @ index + np.round(shift)[:, None]).astype(np.int64)
    if (target.min(axis=1) < 0).any() or (target.max(axis=1) >= np.array(target_shape)).any():
        raise ValueError(f"{path.name} extends beyond the grid of its series")
    out[target[0], target[1], target[2]] = data.reshape(-1)
    if out.sum() == 0:
        raise ValueError(f"{path.name} is empty")
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def load_site_patient(
    row: SiteCohortRow,
    *,
    settings: PipelineSettings | None = None,
    segmenter: LoadedModel | None = None,
    device: torch.device | None = None,
    max_gap_days: int = 365,
) -> PatientSample:
    """Load one patient: pick the sagittal T1/T2 series as the pipeline does, load them with the
    pipeline's volume loader, and take masks from the files or from ``segmenter``.

    Raises :class:`SiteCohortError` naming the CSV line when the study cannot be used.
    """
    settings = settings or PipelineSettings()
    device = device or torch.device("cpu")
    where = f"line {row.line}"

    def fail(reason: str) -> SiteCohortError:
        return SiteCohortError([f"{where}: {reason}"])

    files = sorted(p for p in row.study_dir.rglob("*") if p.is_file())
    headers, unreadable = read_headers(files)
    if not headers:
        raise fail(f"study_dir: no readable DICOM files ({unreadable} unreadable)")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in headers}
    if len(studies) > 1:
        raise fail(f"study_dir: the files belong to {len(studies)} studies; give one study")
    if row.mri_date is None:
        study_date = str(headers[0].get("StudyDate", "") or "")
        if study_date:
            try:
                gap = abs((_parse_date(study_date) - row.dxa_date).days)
            except ValueError:
                gap = 0
            if gap > max_gap_days:
                raise fail(f"mri_date: MRI and DXA are {gap} days apart (limit {max_gap_days})")
    selection = select_series(headers, settings.selection, unreadable_files=unreadable)
    if not selection.analysable:
        raise fail(f"study_dir: {selection.reason()}")
    series: dict[SequenceName, SeriesSample] = {}
    for sequence in SEQUENCES:
        candidates = selection.candidates(sequence)
        if not candidates:
            if sequence in row.masks:
                raise fail(f"{sequence.lower()}_mask: the study has no usable {sequence} series")
            continue
        errors: list[str] = []
        for candidate in candidates:
            try:
                volume = load_series(candidate.paths)
            except VolumeError as exc:
                errors.append(str(exc))
                continue
            mask_path = row.masks.get(sequence)
            if mask_path is not None:
                try:
                    labelmap = read_mask(mask_path, volume)
                except ValueError as exc:
                    errors.append(str(exc))
                    continue
                source = "file"
            else:
                if segmenter is None:
                    raise fail(
                        f"{sequence.lower()}_mask: no mask file and no segmenter to make one "
                        "(train or build a segmenter first)"
                    )
                spec = segmenter.manifest.preprocessing
                assert isinstance(spec, SegmentationInputSpec)
                raw = predict_labelmaps(segmenter.module, [volume.array], spec, device)[0]
                labelmap = postprocess_labelmap(raw, volume.geometry, settings.segmentation)
                source = "segmenter"
            series[sequence] = SeriesSample(
                sequence=sequence,
                array=np.asarray(volume.array),
                labelmap=labelmap,
                geometry=volume.geometry,
                label_source=source,  # type: ignore[arg-type]
            )
            break
        else:
            column = f"{sequence.lower()}_mask" if sequence in row.masks else "study_dir"
            raise fail(f"{column}: no {sequence} series could be used ({'; '.join(errors)})")
    if not series:
        raise fail("study_dir: no sagittal T1 or T2 series")
    log.debug("loaded site patient %s (%s)", uid_tag(row.patient_id), ", ".join(series))
    return PatientSample(
        patient_id=row.patient_id,
        osteoporosis=row.osteoporosis,
        t_score=row.t_score,
        series=series,
        info={"line": row.line},
    )
