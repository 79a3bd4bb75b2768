"""DICOM result objects of an analysed study: SEG, TID 1500 SR and a key image (SC).

The writers are pure: they take a :class:`~pipeline.result.StudyResult` and the source
headers (plus the key slice's pixels) and return ``pydicom`` datasets built and validated by
highdicom. Nothing here talks to the network.

>>> objects = build_result_objects(result)          # reads the source files it needs
>>> paths = write_result_files(objects, out_dir)    # seg-t1.dcm, seg-t2.dcm, sr.dcm, ...

A study that was not analysed (no lumbar series, nothing found) gives no objects.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from pipeline.dicom_out.identity import ResultIdentity, copy_patient_study, models_key
from pipeline.dicom_out.keyimage import build_key_image, render_key_image
from pipeline.dicom_out.seg import build_seg, segment_levels
from pipeline.dicom_out.sources import ResultSources, SourceError, load_sources
from pipeline.dicom_out.sr import build_sr
from pipeline.result import StudyResult

__all__ = [
    "ResultIdentity",
    "ResultObjects",
    "ResultSources",
    "SourceError",
    "build_key_image",
    "build_result_objects",
    "build_seg",
    "build_sr",
    "copy_patient_study",
    "load_sources",
    "models_key",
    "render_key_image",
    "write_dataset",
    "write_result_files",
]


@dataclass(frozen=True, eq=False)
class ResultObjects:
    """The result objects of one study (all empty when the study was not analysed)."""

    identity: ResultIdentity | None
    segs: tuple[tuple[str, Dataset], ...]
    """(sequence, SEG) per analysed series with at least one segmented vertebra."""
    sr: Dataset | None
    key_image: Dataset | None

    @property
    def named(self) -> list[tuple[str, Dataset]]:
        """(file name, dataset) of every object, in the order they should be sent."""
        items = [(f"seg-{sequence.lower()}.dcm", seg) for sequence, seg in self.segs]
        if self.sr is not None:
            items.append(("sr.dcm", self.sr))
        if self.key_image is not None:
            items.append(("key-image.dcm", self.key_image))
        return items

    @property
    def datasets(self) -> list[Dataset]:
        return [dataset for _, dataset in self.named]

    def __len__(self) -> int:
        return len(self.named)


def build_result_objects(
    result: StudyResult, sources: ResultSources | None = None
) -> ResultObjects:
    """SEG per analysed series, the SR and the key image of ``result``.

    Args:
        result: the study's analysis.
        sources: source headers and key slice; read from ``result``'s source files when
            omitted (see :func:`load_sources`).

    Raises:
        SourceError: the source files are missing or do not match the result.
    """
    if not result.analysed or result.patient is None:
        return ResultObjects(None, (), None, None)
    identity = ResultIdentity.for_result(result.study_instance_uid, result.models)
    sources = sources or load_sources(result)
    segs: dict[str, Dataset] = {}
    named: list[tuple[str, Dataset]] = []
    for series in result.series:
        if not segment_levels(series):
            continue
        headers = sources.headers.get(series.series_instance_uid)
        if headers is None:
            raise SourceError(f"no source headers for the {series.sequence} series")
        seg = build_seg(result, series, headers, identity)
        segs[series.series_instance_uid] = seg
        named.append((series.sequence, seg))
    sr = build_sr(result, sources.headers, segs, identity)
    key_image = (
        build_key_image(result, sources.key_slice, identity)
        if sources.key_slice is not None
        else None
    )
    return ResultObjects(identity, tuple(named), sr, key_image)


def write_dataset(dataset: Dataset, path: Path) -> Path:
    """Write ``dataset`` as a DICOM file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            dataset.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_result_files(objects: ResultObjects, out_dir: Path) -> list[Path]:
    """Write every object of ``objects`` into ``out_dir``; returns the paths in send order."""
    return [write_dataset(dataset, Path(out_dir) / name) for name, dataset in objects.named]
