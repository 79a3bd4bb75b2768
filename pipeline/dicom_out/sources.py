"""The source images the result objects refer to: their headers and the key image's pixels.

The writers are pure functions of a :class:`~pipeline.result.StudyResult` and a
:class:`ResultSources`; :func:`load_sources` reads the latter from the files the result names
(``SeriesResult.source_paths``), so the writers never touch the file system themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pipeline.labels import LABEL_OF, LUMBAR_LEVELS
from pipeline.preprocess import mid_sagittal_slice
from pipeline.result import SeriesResult, StudyResult

TYPE2_DEFAULTS: Final[tuple[str, ...]] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)
"""Type 2 patient/study attributes highdicom reads from a source image; absent ones are
given empty values on a copy (the source itself is never modified)."""

_PIXEL_KEYWORDS: Final[tuple[str, ...]] = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class SourceError(ValueError):
    """The source images do not match the result (missing, different or unreadable files)."""


@dataclass(frozen=True, eq=False)
class KeySlice:
    """The slice shown in the key image: its header, its rescaled pixels and its index."""

    series_instance_uid: str
    index: int
    header: Dataset = field(repr=False)
    pixels: np.ndarray = field(repr=False)
    """Rescaled values ``(rows, columns)`` as float32."""


@dataclass(frozen=True, eq=False)
class ResultSources:
    """Source headers per analysed series (slice order) and the key slice."""

    headers: Mapping[str, tuple[Dataset, ...]]
    key_slice: KeySlice | None


def key_series(result: StudyResult) -> SeriesResult | None:
    """The series shown in the key image: the T1 series, else the T2 series."""
    return result.series_for("T1") or result.series_for("T2")


def key_slice_index(series: SeriesResult) -> int:
    """The mid-sagittal slice of the lumbar vertebral bodies (the middle slice if none)."""
    labels = [LABEL_OF[level] for level in LUMBAR_LEVELS]
    index = mid_sagittal_slice(np.isin(series.labelmap, labels))
    return series.labelmap.shape[0] // 2 if index is None else index


def check_headers(series: SeriesResult, headers: Sequence[Dataset]) -> list[Dataset]:
    """``headers`` checked against ``series``: same instances, in slice order.

    Raises:
        SourceError: naming what does not match (no UIDs in the message).
    """
    if len(headers) != len(series.sop_instance_uids):
        raise SourceError(
            f"{len(headers)} source headers given for a series of "
            f"{len(series.sop_instance_uids)} slices"
        )
    by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in headers}
    try:
        ordered = [by_uid[uid] for uid in series.sop_instance_uids]
    except KeyError:
        raise SourceError("the source headers are not the instances of the series") from None
    for ds in ordered:
        if str(ds.get("SeriesInstanceUID", "")) != series.series_instance_uid:
            raise SourceError("a source header belongs to another series")
    return ordered


def highdicom_source(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` with empty values for absent type 2 patient/study attributes."""
    copy = Dataset()
    copy.update(ds)
    for keyword in TYPE2_DEFAULTS:
        if keyword not in copy:
            setattr(copy, keyword, "")
    return copy


def rescaled_pixels(ds: Dataset) -> np.ndarray:
    """The pixel values of a single-frame greyscale image after Modality LUT rescale."""
    pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    if pixels.ndim != 2:
        raise SourceError("the key image source is not a single-frame greyscale image")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels * np.float32(slope) + np.float32(intercept)


def _read(path: str, *, pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises many exception types for bad files
        raise SourceError(f"a source file cannot be read ({type(exc).__name__})") from exc


def load_sources(result: StudyResult) -> ResultSources:
    """Read the source headers of every analysed series and the key slice's pixels.

    Raises:
        SourceError: a source file is missing, unreadable or not the instance the result names.
    """
    headers: dict[str, tuple[Dataset, ...]] = {}
    for series in result.series:
        datasets = [_read(path, pixels=False) for path in series.source_paths]
        headers[series.series_instance_uid] = tuple(check_headers(series, datasets))
    key: KeySlice | None = None
    shown = key_series(result)
    if shown is not None:
        index = key_slice_index(shown)
        ds = _read(shown.source_paths[index], pixels=True)
        if str(ds.get("SOPInstanceUID", "")) != shown.sop_instance_uids[index]:
            raise SourceError("the key slice file is not the instance the result names")
        try:
            pixels = rescaled_pixels(ds)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"the key slice cannot be decoded ({type(exc).__name__})") from exc
        for keyword in _PIXEL_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
        key = KeySlice(shown.series_instance_uid, index, ds, pixels)
    return ResultSources(headers=headers, key_slice=key)
