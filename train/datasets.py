"""Training and evaluation samples, and the network inputs made from them.

Whatever the source (synthetic cohort, a site cohort of DICOM studies with DXA, a public
segmentation dataset), a patient becomes a :class:`PatientSample`: per sequence a ``(k, j, i)``
volume and its label map in the values of :mod:`pipeline.labels`, on the same grid the
pipeline sees at inference. The network inputs are then made by the pipeline's own code:

* classifier crops by :func:`pipeline.preprocess.vertebra_crops` (:func:`build_crop_set`);
* segmenter slices by :func:`pipeline.segment.prepare_slices` and
  :func:`pipeline.segment.prepare_labels` (:func:`build_slice_set`),

so training and inference cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from pipeline.labels import LUMBAR_LEVELS
from pipeline.preprocess import PreprocessSpec, vertebra_crops
from pipeline.segment import SegmentationInputSpec, prepare_labels, prepare_slices
from pipeline.volume import Geometry

SequenceName = Literal["T1", "T2"]
SEQUENCES: tuple[SequenceName, ...] = ("T1", "T2")
LabelSource = Literal["truth", "file", "segmenter"]

__all__ = [
    "SEQUENCES",
    "CropSet",
    "PatientSample",
    "SeriesSample",
    "SliceSet",
    "build_crop_set",
    "build_slice_set",
    "patient_labels",
    "select_patients",
]


@dataclass(frozen=True, eq=False)
class SeriesSample:
    """One sagittal series of a patient: volume, label map and geometry (same ``(k, j, i)``).

    ``label_source`` says where the label map came from: ``truth`` (synthetic ground truth or a
    public dataset's reference masks), ``file`` (a site cohort's mask file) or ``segmenter``
    (predicted by the current segmenter, post-processed as in the pipeline).
    """

    sequence: SequenceName
    array: np.ndarray
    labelmap: np.ndarray
    geometry: Geometry
    label_source: LabelSource = "truth"

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a series volume must be 3-D (k, j, i); got {self.array.shape}")
        if self.array.shape != self.labelmap.shape:
            raise ValueError(
                f"volume {self.array.shape} and label map {self.labelmap.shape} differ in shape"
            )
        if tuple(self.array.shape) != tuple(self.geometry.shape):
            raise ValueError("the volume's shape does not match its geometry")

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """(row, column) spacing in millimetres."""
        return (self.geometry.spacing[1], self.geometry.spacing[2])


@dataclass(frozen=True, eq=False)
class PatientSample:
    """A patient's sagittal series with the DXA reference.

    ``osteoporosis`` is the target (DXA T-score <= -2.5). ``oracle_score`` is, for synthetic
    patients, the simulator's latent marrow value that the images can reveal at best (higher =
    more likely osteoporotic); ``info`` holds source-specific extras (never identifying).
    """

    patient_id: str
    osteoporosis: bool
    t_score: float | None
    series: Mapping[SequenceName, SeriesSample]
    oracle_score: float | None = None
    info: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "series", dict(self.series))
        object.__setattr__(self, "info", dict(self.info))


def patient_labels(patients: Sequence[PatientSample]) -> tuple[list[str], np.ndarray]:
    """Patient ids and their labels (one entry per patient), for the splitters."""
    return [p.patient_id for p in patients], np.array([p.osteoporosis for p in patients])


def select_patients(
    patients: Sequence[PatientSample], ids: Iterable[str]
) -> list[PatientSample]:
    """The patients whose ids are in ``ids`` (in the order of ``patients``)."""
    wanted = set(ids)
    return [p for p in patients if p.patient_id in wanted]


@dataclass(frozen=True, eq=False)
class CropSet:
    """Classifier inputs of one sequence: one image per found vertebra.

    ``images`` ``(N, C, S, S)`` (float16 to halve memory; cast to float32 for the network),
    ``labels`` the patient's DXA class per image, ``patient_ids`` and ``levels`` per image.
    """

    sequence: SequenceName
    spec: PreprocessSpec
    images: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray
    levels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, ids: Iterable[str]) -> CropSet:
        """The images of the given patients."""
        rows = np.isin(self.patient_ids, list(set(ids)))
        return CropSet(
            self.sequence,
            self.spec,
            self.images[rows],
            self.labels[rows],
            self.patient_ids[rows],
            self.levels[rows],
        )

    @classmethod
    def concatenate(
        cls, parts: Sequence[CropSet], sequence: SequenceName, spec: PreprocessSpec
    ) -> CropSet:
        """One crop set of the images of ``parts`` (all of ``sequence`` made with ``spec``)."""
        if any(part.sequence != sequence or part.spec != spec for part in parts):
            raise ValueError("crop sets of another sequence or preprocessing cannot be joined")
        if not parts:
            shape = (0, spec.in_chans, spec.input_size, spec.input_size)
            return CropSet(
                sequence, spec, np.zeros(shape, np.float16), np.zeros(0, bool),
                np.zeros(0, object), np.zeros(0, object),
            )  # fmt: skip
        return CropSet(
            sequence,
            spec,
            np.concatenate([part.images for part in parts]),
            np.concatenate([part.labels for part in parts]),
            np.concatenate([part.patient_ids for part in parts]),
            np.concatenate([part.levels for part in parts]),
        )

    def tensor(self, rows: np.ndarray | slice | None = None) -> torch.Tensor:
        """Images (all or ``rows``) as a float32 tensor."""
        picked = self.images if rows is None else self.images[rows]
        return torch.from_numpy(np.ascontiguousarray(picked, dtype=np.float32))


def build_crop_set(
    patients: Sequence[PatientSample],
    sequence: SequenceName,
    spec: PreprocessSpec,
    levels: Sequence[str] = LUMBAR_LEVELS,
    *,
    on_patient: Callable[[], None] | None = None,
) -> CropSet:
    """Crops of ``levels`` from every patient's ``sequence`` series, made by the pipeline's
    :func:`~pipeline.preprocess.vertebra_crops` (patients without that series are skipped)."""
    images: list[np.ndarray] = []
    labels: list[bool] = []
    ids: list[str] = []
    found_levels: list[str] = []
    for patient in patients:
        series = patient.series.get(sequence)
        if series is not None:
            crops = vertebra_crops(
                series.array,
                series.labelmap,
                levels,
                spec,
                pixel_spacing=series.pixel_spacing,
            )
            for level, crop in crops.items():
                images.append(crop.astype(np.float16))
                labels.append(patient.osteoporosis)
                ids.append(patient.patient_id)
                found_levels.append(level)
        if on_patient is not None:
            on_patient()
    shape = (0, spec.in_chans, spec.input_size, spec.input_size)
    return CropSet(
        sequence=sequence,
        spec=spec,
        images=np.stack(images) if images else np.zeros(shape, np.float16),
        labels=np.array(labels, dtype=bool),
        patient_ids=np.array(ids, dtype=object),
        levels=np.array(found_levels, dtype=object),
    )


@dataclass(frozen=True, eq=False)
class SliceSet:
    """Segmenter training pairs: ``inputs`` ``(M, C, S, S)`` float16, ``targets`` ``(M, S, S)``
    uint8, with the patient id of each slice."""

    spec: SegmentationInputSpec
    inputs: np.ndarray
    targets: np.ndarray
    patient_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


def build_slice_set(
    patients: Sequence[PatientSample],
    spec: SegmentationInputSpec,
    sequences: Sequence[SequenceName] = SEQUENCES,
    *,
    only_labelled_slices: bool = False,
    on_patient: Callable[[], None] | None = None,
) -> SliceSet:
    """All slices of the patients' series, prepared by the pipeline's segmenter input code.

    With ``only_labelled_slices`` slices without any label are left out (they still teach the
    network what lies lateral to the spine, so keep them unless memory is short).
    """
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    ids: list[str] = []
    for patient in patients:
        for sequence in sequences:
            series = patient.series.get(sequence)
            if series is None:
                continue
            x = prepare_slices(series.array, spec).numpy().astype(np.float16)
            y = prepare_labels(series.labelmap, spec).numpy().astype(np.uint8)
            if only_labelled_slices:
                keep = y.reshape(len(y), -1).any(axis=1)
                x, y = x[keep], y[keep]
            inputs.append(x)
            targets.append(y)
            ids += [patient.patient_id] * len(y)
        if on_patient is not None:
            on_patient()
    size = spec.input_size
    return SliceSet(
        spec=spec,
        inputs=np.concatenate(inputs) if inputs else np.zeros((0, spec.in_chans, size, size)),
        targets=np.concatenate(targets) if targets else np.zeros((0, size, size), np.uint8),
        patient_ids=np.array(ids, dtype=object),
    )
