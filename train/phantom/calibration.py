"""Calibration of the synthetic cohort against the literature.

Two figures tell whether the cohort's osteoporosis signal is as weak and as confounded as in
real patients:

* the **VBQ AUC**: the Vertebral Bone Quality score (Ehresman et al. 2020: median signal of
  the L1-L4 trabecular bone on the mid-sagittal T1 slice divided by the CSF signal at L3)
  computed from the T1 images and their ground-truth masks, as a patient-level predictor of
  DXA osteoporosis. The literature reports 0.79-0.82; the cohort targets 0.75-0.85.
* the **oracle AUC**: the best AUC a score can reach from what the images encode — a
  cross-validated logistic model on the noise-free marrow fat fraction, trabecular bone
  fraction and texture scale of L1-L4. It stays below 1 because DXA measures with noise,
  is raised by degenerative changes and picks the lowest level. Model results are judged
  against it.

:func:`calibrate` computes the report in memory (rendering only the slices the VBQ needs,
with pixel values identical to the written cohort), :func:`report_for_cohort` from a cohort
folder written by :func:`train.phantom.generate_cohort` (DICOM files and NIfTI masks).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
from nibabel.filebasedimages import ImageFileError
from pydicom.errors import InvalidDicomError

from pipeline.labels import CSF_LABEL, LABEL_OF, SCORED_LEVELS
from pipeline.volume import Geometry
from train.phantom.options import PHANTOM_VERSION, CohortOptions

VBQ_TARGET: Final[tuple[float, float]] = (0.75, 0.85)
PREVALENCE_TARGET: Final[tuple[float, float]] = (0.30, 0.40)
ORACLE_FEATURES: Final[tuple[str, ...]] = ("fat_fraction", "bone_fraction", "texture_scale")
_BOOTSTRAP: Final[int] = 2000
_CSF_LEVELS: Final[tuple[str, ...]] = ("L3", "L2")


class CalibrationError(ValueError):
    """The cohort cannot be calibrated (missing files, no usable patient)."""


@dataclass(frozen=True)
class VBQValue:
    """A VBQ score and its parts."""

    score: float
    body_signal: float
    csf_signal: float
    csf_level: str
    mid_slices: dict[str, int]


@dataclass(frozen=True)
class CalibrationRecord:
    """What the report needs of one patient."""

    patient_id: str
    osteoporosis: bool
    dxa_class: str
    t_score: float
    t_latent: float
    field_strength: float
    vbq: float | None
    features: tuple[float, ...]  # ORACLE_FEATURES x L1..L4, noise-free
    fat_fraction_mean: float  # L1-L4


# -- VBQ -------------------------------------------------------------------------------------


def mid_slice(mask: np.ndarray) -> int | None:
    """The slice ``k`` where a body's mask is largest (ties: the one nearest its centre)."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if areas.max() == 0:
        return None
    centre = float((areas * np.arange(len(areas))).sum() / areas.sum())
    best = np.flatnonzero(areas == areas.max())
    return int(best[np.argmin(np.abs(best - centre))])


def vbq_slices(labelmap: np.ndarray) -> list[int]:
    """Slices the VBQ reads: the mid-sagittal slice of L1-L4 and the neighbours of L3 and L2."""
    needed: set[int] = set()
    for level in SCORED_LEVELS:
        k = mid_slice(labelmap == LABEL_OF[level])
        if k is None:
            continue
        needed.add(k)
        if level in _CSF_LEVELS:
            needed.update(j for j in (k - 1, k + 1) if 0 <= j < labelmap.shape[0])
    return sorted(needed)


def _trabecular_roi(
    mask_2d: np.ndarray, erosion_mm: float, spacing: tuple[float, float]
) -> np.ndarray:
    from scipy import ndimage

    radius = (max(1, round(erosion_mm / spacing[0])), max(1, round(erosion_mm / spacing[1])))
    jj, ii = np.ogrid[-radius[0] : radius[0] + 1, -radius[1] : radius[1] + 1]
    structure = (jj / radius[0]) ** 2 + (ii / radius[1]) ** 2 <= 1.0
    eroded = ndimage.binary_erosion(mask_2d, structure=structure)
    return eroded if eroded.sum() >= 4 else mask_2d


def vbq(
    pixels: np.ndarray, labelmap: np.ndarray, geometry: Geometry, erosion_mm: float = 2.0
) -> VBQValue | None:
    """VBQ of a T1 volume from its label map (both ``(k, j, i)``), or ``None`` when a level
    of L1-L4 or the CSF at L3 (else L2) is missing.

    Body signal: the median, over L1-L4, of the median signal in the body's mask eroded by
    ``erosion_mm`` (the trabecular bone) on its mid-sagittal slice. CSF signal: the median of
    the CSF-labelled pixels within the level's head-to-foot extent on its mid-sagittal slice
    and the two neighbours.
    """
    spacing = (geometry.spacing[1], geometry.spacing[2])
    signals: dict[str, float] = {}
    mids: dict[str, int] = {}
    for level in SCORED_LEVELS:
        mask = labelmap == LABEL_OF[level]
        k = mid_slice(mask)
        if k is None:
            return None
        roi = _trabecular_roi(mask[k], erosion_mm, spacing)
        signals[level] = float(np.median(pixels[k][roi]))
        mids[level] = k
    body_signal = float(np.median(list(signals.values())))
    axis = geometry.affine[2, :3]  # LPS z per unit (k, j, i)
    rows, cols = labelmap.shape[1:]
    superior = np.arange(rows)[:, None] * axis[1] + np.arange(cols)[None, :] * axis[2]
    csf = labelmap == CSF_LABEL
    for level in _CSF_LEVELS:
        k = mids[level]
        extent = superior[labelmap[k] == LABEL_OF[level]]
        band = (superior >= extent.min()) & (superior <= extent.max())
        first, last = max(0, k - 1), min(labelmap.shape[0], k + 2)
        values = pixels[first:last][csf[first:last] & band[None]]
        if values.size >= 4:
            csf_signal = float(np.median(values))
            if csf_signal > 0:
                return VBQValue(body_signal / csf_signal, body_signal, csf_signal, level, mids)
    return None


# -- statistics ------------------------------------------------------------------------------


def auc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise CalibrationError("the AUC needs patients with and without osteoporosis")
    ranks = _ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    boundaries = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1], [True]])
    starts = np.flatnonzero(boundaries)
    for a, b in itertools.pairwise(starts):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return ranks


def auc_interval(
    scores: np.ndarray, positive: np.ndarray, n_boot: int = _BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """95 % bootstrap interval of the AUC (resampling patients, fixed seed)."""
    rng = np.random.default_rng(seed)
    n = len(scores)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, n, n)
        y = positive[pick]
        if y.all() or not y.any():
            continue
        values.append(auc(scores[pick], y))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def oracle_scores(features: np.ndarray, positive: np.ndarray, folds: int = 5) -> np.ndarray:
    """Out-of-fold probabilities of a logistic model on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_splits = max(2, min(folds, int(positive.sum()), int((~positive).sum())))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=0)
    return cross_val_predict(model, features, positive, cv=cv, method="predict_proba")[:, 1]


def build_report(
    records: Sequence[CalibrationRecord], options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The calibration report of a cohort (a JSON-serialisable dict)."""
    if not records:
        raise CalibrationError("the cohort has no patients")
    y = np.array([r.osteoporosis for r in records])
    classes = np.array([r.dxa_class for r in records])
    report: dict[str, Any] = {
        "phantom_version": PHANTOM_VERSION,
        "n_patients": len(records),
        "prevalence": {
            name: round(float((classes == name).mean()), 4)
            for name in ("osteoporosis", "osteopenia", "normal")
        },
        "targets": {
            "vbq_auc": list(VBQ_TARGET),
            "osteoporosis_prevalence": list(PREVALENCE_TARGET),
        },
    }
    if options is not None:
        report["options"] = options
    with_vbq = [r for r in records if r.vbq is not None and math.isfinite(r.vbq)]
    report["n_with_vbq"] = len(with_vbq)
    vbq_section: dict[str, Any] = {"auc": None}
    if with_vbq and 0 < sum(r.osteoporosis for r in with_vbq) < len(with_vbq):
        scores = np.array([r.vbq for r in with_vbq], dtype=np.float64)
        pos = np.array([r.osteoporosis for r in with_vbq])
        vbq_section["auc"] = round(auc(scores, pos), 4)
        vbq_section["ci95"] = [round(v, 4) for v in auc_interval(scores, pos)]
        by_field: dict[str, Any] = {}
        for field in sorted({r.field_strength for r in with_vbq}):
            sel = np.array([r.field_strength == field for r in with_vbq])
            entry: dict[str, Any] = {
                "n": int(sel.sum()),
                "mean": round(float(scores[sel].mean()), 3),
            }
            if 0 < pos[sel].sum() < sel.sum():
                entry["auc"] = round(auc(scores[sel], pos[sel]), 4)
            by_field[f"{field:.1f}"] = entry
        vbq_section["by_field_strength"] = by_field
        vbq_section["mean_by_class"] = {
            name: round(float(scores[np.array([r.dxa_class == name for r in with_vbq])].mean()), 3)
            for name in ("osteoporosis", "osteopenia", "normal")
            if any(r.dxa_class == name for r in with_vbq)
        }
    report["vbq"] = vbq_section

    oracle: dict[str, Any] = {"auc": None}
    if 0 < y.sum() < len(y) and min(int(y.sum()), int((~y).sum())) >= 2:
        features = np.array([r.features for r in records], dtype=np.float64)
        probabilities = oracle_scores(features, y)
        oracle["auc"] = round(auc(probabilities, y), 4)
        oracle["ci95"] = [round(v, 4) for v in auc_interval(probabilities, y)]
        oracle["features"] = [
            f"{name}_{level}" for name in ORACLE_FEATURES for level in SCORED_LEVELS
        ]
        oracle["method"] = "logistic regression on standardised noise-free features, 5-fold CV"
        report["latent_auc"] = round(auc(-np.array([r.t_latent for r in records]), y), 4)
    report["oracle"] = oracle

    ff = np.array([r.fat_fraction_mean for r in records])
    t = np.array([r.t_score for r in records])
    report["fat_fraction"] = {
        "by_class": {
            name: {
                "mean": round(float(ff[classes == name].mean()), 4),
                "sd": round(float(ff[classes == name].std()), 4),
            }
            for name in ("osteoporosis", "osteopenia", "normal")
            if (classes == name).any()
        },
        "corr_with_t_score": round(float(np.corrcoef(ff, t)[0, 1]), 4) if len(ff) > 2 else None,
    }
    vbq_auc = vbq_section["auc"]
    prevalence = report["prevalence"]["osteoporosis"]
    report["within_targets"] = bool(
        vbq_auc is not None
        and VBQ_TARGET[0] <= vbq_auc <= VBQ_TARGET[1]
        and PREVALENCE_TARGET[0] <= prevalence <= PREVALENCE_TARGET[1]
    )
    report["patients"] = [
        {
            "patient_id": r.patient_id,
            "vbq": None if r.vbq is None else round(r.vbq, 5),
            "osteoporosis": r.osteoporosis,
            "t_score": r.t_score,
            "field_strength": r.field_strength,
        }
        for r in records
    ]
    return report


def write_report(
    report: dict[str, Any], out_dir: Path, records: Sequence[CalibrationRecord]
) -> Path:
    """Write ``calibration.json`` and ``calibration_roc.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "calibration.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    _plot_roc(records, out_dir / "calibration_roc.png", report)
    return path


def _roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="mergesort")
    y = positive[order]
    tpr = np.concatenate([[0.0], np.cumsum(y) / max(1, y.sum())])
    fpr = np.concatenate([[0.0], np.cumsum(~y) / max(1, (~y).sum())])
    return fpr, tpr


def _plot_roc(records: Sequence[CalibrationRecord], path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    with_vbq = [r for r in records if r.vbq is not None]
    if report["vbq"]["auc"] is not None:
        fpr, tpr = _roc_points(
            np.array([r.vbq for r in with_vbq], dtype=np.float64),
            np.array([r.osteoporosis for r in with_vbq]),
        )
        ax.plot(fpr, tpr, label=f"VBQ (AUC {report['vbq']['auc']:.3f})")
    if report["oracle"]["auc"] is not None:
        y = np.array([r.osteoporosis for r in records])
        features = np.array([r.features for r in records], dtype=np.float64)
        fpr, tpr = _roc_points(oracle_scores(features, y), y)
        ax.plot(fpr, tpr, label=f"oracle (AUC {report['oracle']['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"Osteoporosis (DXA T <= -2.5), n = {len(records)}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    # Fixed metadata keeps the PNG byte-identical between runs.
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


# -- in memory -------------------------------------------------------------------------------


def record_from_truth(
    patient_id: str, truth: Any, field_strength: float, value: VBQValue | None
) -> CalibrationRecord:
    """A record from a :class:`train.phantom.simulate.PatientTruth`."""
    levels = [truth.level(name) for name in SCORED_LEVELS]
    features = (
        *(v.fat_fraction for v in levels),
        *(v.bone_fraction for v in levels),
        *(v.texture_scale_mm for v in levels),
    )
    return CalibrationRecord(
        patient_id=patient_id,
        osteoporosis=truth.osteoporosis,
        dxa_class=truth.dxa_class,
        t_score=truth.t_score,
        t_latent=truth.t_patient,
        field_strength=field_strength,
        vbq=None if value is None else value.score,
        features=tuple(float(f) for f in features),
        fat_fraction_mean=float(np.mean([v.fat_fraction for v in levels])),
    )


def patient_record(seed: int, index: int, options: CohortOptions) -> CalibrationRecord:
    """Calibration record of one patient, rendering only the T1 slices the VBQ reads.

    The pixels and labels of those slices are identical to those of
    :func:`train.phantom.simulate_patient` (and of the written DICOM files), so the VBQ is too.
    """
    from train.phantom.geometry import stack_geometry
    from train.phantom.simulate import (
        body_labels,
        image_slice,
        prepare_patient,
        render_planes,
        slice_labels,
    )

    if "t1" not in options.series:
        options = options.model_copy(update={"series": (*options.series, "t1")})
    prepared = prepare_patient(seed, index, options)
    protocol = prepared.protocol("t1")
    labels = body_labels(prepared, protocol)
    needed = vbq_slices(labels)
    pixels = np.zeros((len(protocol.planes), *protocol.planes[0].shape), dtype=np.uint16)
    for k, result in zip(needed, render_planes(prepared, protocol, needed), strict=True):
        pixels[k] = image_slice(prepared, protocol, k, result)
        labels[k] = slice_labels(result)
    value = vbq(pixels, labels, stack_geometry(protocol.planes))
    return record_from_truth(
        prepared.study.patient_id, prepared.truth, prepared.study.field_strength, value
    )


def _record_task(args: tuple[int, int, CohortOptions]) -> CalibrationRecord:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return patient_record(*args)


def calibrate(
    options: CohortOptions, *, workers: int = 1, indices: Iterable[int] | None = None
) -> tuple[dict[str, Any], list[CalibrationRecord]]:
    """Calibration report of the cohort ``options`` computed in memory."""
    tasks = [(options.seed, i, options) for i in (indices or range(options.n_patients))]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            records = list(pool.map(_record_task, tasks, chunksize=4))
    else:
        records = [_record_task(task) for task in tasks]
    return build_report(records, options.model_dump(mode="json")), records


# -- from a cohort folder --------------------------------------------------------------------


def read_series_volume(folder: Path) -> tuple[np.ndarray, Geometry]:
    """Read a single-orientation DICOM series into ``(k, j, i)`` stored values and geometry
    (slices sorted by position along the normal)."""
    from train.phantom.geometry import SlicePlane, stack_geometry

    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise CalibrationError(f"the series folder {folder.name} holds no DICOM files")
    items = []
    for path in files:
        ds = pydicom.dcmread(path)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        plane = SlicePlane(
            origin=np.array([float(v) for v in ds.ImagePositionPatient]),
            row_cosines=iop[:3],
            col_cosines=iop[3:],
            spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            shape=(int(ds.Rows), int(ds.Columns)),
            thickness=float(ds.SliceThickness),
        )
        items.append((float(plane.origin @ plane.normal), plane, ds.pixel_array))
    items.sort(key=lambda item: item[0])
    planes = tuple(item[1] for item in items)
    return np.stack([item[2] for item in items]).astype(np.uint16), stack_geometry(planes)


def report_for_cohort(
    cohort_dir: Path, *, progress: bool = False
) -> tuple[dict[str, Any], list[CalibrationRecord]]:
    """Recompute the calibration report of a written cohort from its DICOM files and masks."""
    from train.phantom.dicomio import read_labelmap
    from train.phantom.labels import read_labels

    labels = read_labels(cohort_dir / "labels.csv")
    options: dict[str, Any] | None = None
    meta = cohort_dir / "cohort.json"
    if meta.exists():
        options = json.loads(meta.read_text(encoding="utf-8")).get("options")
    records = []
    iterator: Iterable[Any] = labels
    if progress:
        import sys

        from rich.console import Console
        from rich.progress import track

        console = Console(file=sys.stderr)
        iterator = track(labels, description="Reading T1 series", console=console)
    for label in iterator:
        value = None
        where = f"patient at index {label.index}"
        if label.t1_series_dir is not None and label.t1_mask is not None:
            try:
                pixels, geometry = read_series_volume(label.t1_series_dir)
                labelmap, _ = read_labelmap(label.t1_mask)
            except CalibrationError as exc:
                raise CalibrationError(f"{where}: {exc}") from exc
            except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
                raise CalibrationError(
                    f"{where}: cannot read the T1 series or its mask ({type(exc).__name__})"
                ) from exc
            except (InvalidDicomError, ImageFileError) as exc:
                raise CalibrationError(f"{where}: a T1 file or mask is not readable") from exc
            if labelmap.shape != pixels.shape:
                raise CalibrationError(f"{where}: the T1 mask does not match its series' grid")
            value = vbq(pixels, labelmap, geometry)
        features = (
            *(label.fat_fraction[level] for level in SCORED_LEVELS),
            *(label.bone_fraction[level] for level in SCORED_LEVELS),
            *(label.texture_scale[level] for level in SCORED_LEVELS),
        )
        records.append(
            CalibrationRecord(
                patient_id=label.patient_id,
                osteoporosis=label.osteoporosis,
                dxa_class=label.dxa_class,
                t_score=label.t_score,
                t_latent=label.t_latent,
                field_strength=label.field_strength,
                vbq=None if value is None else value.score,
                features=tuple(float(f) for f in features),
                fat_fraction_mean=float(np.mean([label.fat_fraction[lv] for lv in SCORED_LEVELS])),
            )
        )
    return build_report(records, options), records
