"""Loading one DICOM series into a volume on the grid of its source images.

The array convention is the one of :mod:`pipeline.labels`: ``array[k, j, i]`` with ``k`` the
slice index sorted by ascending position along the slice normal ``n = row x column`` cosines,
``j`` the pixel row and ``i`` the pixel column. Slices are never ordered by InstanceNumber.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pipeline.privacy import uid_tag

log = logging.getLogger(__name__)

DECODABLE_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
)
"""Transfer syntaxes whose pixel data :func:`load_series` decodes (tested with real files).

JPEG 2000 Part 2 multi-component syntaxes are not among them: they are meant for colour and
multi-spectral data and no decoder for them is installed; such MR series are rejected with
the reason."""

MAX_MATRIX: Final[int] = 4096
"""Largest accepted Rows or Columns; larger claims are rejected before decoding."""

_PIXEL_KEYWORDS: Final[tuple[str, ...]] = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class VolumeError(ValueError):
    """A series cannot be assembled into a consistent volume; the message gives the reason."""


@dataclass(frozen=True)
class Geometry:
    """Position of a volume's voxel grid in patient coordinates (DICOM LPS+, millimetres).

    ``row_cosines`` is the direction of increasing column index ``i`` (the first three values of
    ImageOrientationPatient), ``col_cosines`` the direction of increasing row index ``j``,
    ``normal`` their cross product (direction of increasing ``k``). ``spacing`` is
    ``(slice, row, column)`` spacing: distance between slice centres, between pixel rows
    (PixelSpacing[0]) and between pixel columns (PixelSpacing[1]). ``origin`` is the
    ImagePositionPatient of slice ``k = 0``.
    """

    origin: tuple[float, float, float]
    row_cosines: tuple[float, float, float]
    col_cosines: tuple[float, float, float]
    normal: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous array indices ``(k, j, i, 1)`` to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, 0] = np.asarray(self.normal) * self.spacing[0]
        matrix[:3, 1] = np.asarray(self.col_cosines) * self.spacing[1]
        matrix[:3, 2] = np.asarray(self.row_cosines) * self.spacing[2]
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def nifti_affine(self) -> np.ndarray:
        """4x4 RAS+ affine for the same data stored with axes ``(i, j, k)`` (dcm2niix style)."""
        lps = self.affine[:, [2, 1, 0, 3]]
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_lps(self, kji: np.ndarray) -> np.ndarray:
        """Map an ``(..., 3)`` array of ``(k, j, i)`` indices to LPS millimetres."""
        kji = np.asarray(kji, dtype=np.float64)
        return kji @ self.affine[:3, :3].T + self.affine[:3, 3]

    def superior_axis(self) -> np.ndarray:
        """Millimetres towards the head per unit step of ``(k, j, i)`` (LPS +z component)."""
        return self.affine[2, :3].copy()


@dataclass(frozen=True, eq=False)
class Volume:
    """One series as a float32 volume (rescale slope/intercept applied) with its geometry.

    ``headers`` are the source datasets in slice order without their pixel data, for writing
    results (SEG, SR) that reference the exact source images.
    """

    array: np.ndarray
    geometry: Geometry
    sop_instance_uids: tuple[str, ...]
    headers: tuple[Dataset, ...] = field(repr=False)
    paths: tuple[str, ...] = field(repr=False)
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntaxes: tuple[str, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if self.array.dtype != np.float32 or self.array.ndim != 3:
            raise TypeError("Volume.array must be a 3-D float32 array")
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError("Volume.array shape does not match its geometry")
        self.array.setflags(write=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape


def _float_attribute(ds: Dataset, keyword: str, default: float) -> float:
    """A numeric attribute (``default`` when absent or empty); garbage is a VolumeError."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{keyword} is not a number") from exc
    if not math.isfinite(number):
        raise VolumeError(f"{keyword} is not finite")
    return number


def _floats(value: object, count: int, name: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{name} is not numeric") from exc
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise VolumeError(f"{name} must hold {count} finite numbers")
    return numbers


def orientation_of(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosines, column cosines and slice normal of an image, validated.

    Raises :class:`VolumeError` when ImageOrientationPatient is missing or not two orthogonal
    unit vectors.
    """
    if "ImageOrientationPatient" not in ds or ds.ImageOrientationPatient is None:
        raise VolumeError("ImageOrientationPatient is missing")
    values = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient")
    row = np.asarray(values[:3])
    col = np.asarray(values[3:])
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2:
        raise VolumeError("ImageOrientationPatient does not hold unit vectors")
    if abs(float(row @ col)) > 1e-2:
        raise VolumeError("ImageOrientationPatient row and column are not orthogonal")
    row = row / np.linalg.norm(row)
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _read(path: str) -> tuple[Dataset, np.ndarray]:
    # File names can carry identifying text: messages name a file by a tag of its path.
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise VolumeError(f"file [{uid_tag(path)}] is not a DICOM file") from exc
    except Exception as exc:  # malformed files raise many types (struct, recursion, ...)
        raise VolumeError(
            f"file [{uid_tag(path)}] cannot be read: {type(exc).__name__}"
        ) from exc
    _check_pixel_module(ds)
    tag = uid_tag(ds.get("SOPInstanceUID", path))
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pixel decoders raise many exception types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VolumeError(f"pixel data of instance {tag} cannot be decoded: {reason}") from exc
    expected = (int(ds.Rows), int(ds.Columns))
    if pixels.shape != expected:
        raise VolumeError(
            f"instance {tag} decodes to shape {pixels.shape}, expected a single {expected} frame"
        )
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    return ds, pixels


def _check_pixel_module(ds: Dataset) -> None:
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise VolumeError("an instance has no pixel data")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
        high_bit = int(ds.HighBit)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    except (AttributeError, TypeError, ValueError) as exc:
        raise VolumeError("the image pixel module is incomplete") from exc
    if not (0 < rows <= MAX_MATRIX and 0 < columns <= MAX_MATRIX):
        raise VolumeError(f"image matrix {rows}x{columns} is outside 1..{MAX_MATRIX}")
    if bits_allocated not in (8, 16, 32) or not 0 < bits_stored <= bits_allocated:
        raise VolumeError(f"BitsAllocated {bits_allocated} / BitsStored {bits_stored} invalid")
    if high_bit != bits_stored - 1:
        raise VolumeError(f"HighBit {high_bit} does not match BitsStored {bits_stored}")
    if samples != 1:
        raise VolumeError(f"SamplesPerPixel is {samples}; MR volumes must be greyscale")
    if frames != 1:
        raise VolumeError(f"multi-frame instances ({frames} frames) are not supported")
    if photometric != "MONOCHROME2":
        raise VolumeError(f"PhotometricInterpretation {photometric} is not supported")


def load_series(
    paths: Iterable[Path | str],
    *,
    spacing_tolerance: float = 0.05,
    workers: int = 2,
) -> Volume:
    """Read, validate and stack the files of one series into a :class:`Volume`.

    Slices are sorted by their position along the slice normal. The series is rejected with a
    :class:`VolumeError` naming the reason when the files are not one single-frame greyscale
    series with identical orientation, pixel spacing and matrix, when two slices share a
    position, when the slices are not stacked along the normal, or when the distance between
    neighbouring slices varies by more than ``spacing_tolerance`` (relative).
    """
    path_list = [str(path) for path in paths]
    if not path_list:
        raise VolumeError("the series has no files")
    if workers > 1 and len(path_list) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            loaded = list(pool.map(_read, path_list))
    else:
        loaded = [_read(path) for path in path_list]
    return stack_slices(
        [ds for ds, _ in loaded],
        [pixels for _, pixels in loaded],
        path_list,
        spacing_tolerance=spacing_tolerance,
    )


def stack_slices(
    datasets: Sequence[Dataset],
    pixels: Sequence[np.ndarray],
    paths: Sequence[str],
    *,
    spacing_tolerance: float = 0.05,
) -> Volume:
    """Stack decoded single-frame images of one series (see :func:`load_series`)."""
    first = datasets[0]
    series_uid = str(first.get("SeriesInstanceUID", ""))
    study_uid = str(first.get("StudyInstanceUID", ""))
    if not series_uid:
        raise VolumeError("SeriesInstanceUID is missing")
    if any(str(ds.get("SeriesInstanceUID", "")) != series_uid for ds in datasets):
        raise VolumeError("the files belong to more than one series")
    sop_uids = [str(ds.get("SOPInstanceUID", "")) for ds in datasets]
    if "" in sop_uids:
        raise VolumeError("an instance has no SOPInstanceUID")
    if len(set(sop_uids)) != len(sop_uids):
        raise VolumeError("the series holds the same SOPInstanceUID more than once")

    row, col, normal = orientation_of(first)
    for ds in datasets[1:]:
        other_row, other_col, _ = orientation_of(ds)
        if np.abs(other_row - row).max() > 1e-3 or np.abs(other_col - col).max() > 1e-3:
            raise VolumeError("the instances have different ImageOrientationPatient")
    shape_2d = (int(first.Rows), int(first.Columns))
    if any((int(ds.Rows), int(ds.Columns)) != shape_2d for ds in datasets):
        raise VolumeError("the instances have different Rows/Columns")
    if "PixelSpacing" not in first or first.PixelSpacing is None:
        raise VolumeError("PixelSpacing is missing")
    pixel_spacing = _floats(first.PixelSpacing, 2, "PixelSpacing")
    if min(pixel_spacing) <= 0:
        raise VolumeError("PixelSpacing must be positive")
    for ds in datasets[1:]:
        other = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing")
        if max(abs(a - b) for a, b in zip(other, pixel_spacing, strict=True)) > 1e-4:
            raise VolumeError("the instances have different PixelSpacing")

    positions = np.array(
        [
            _floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient")
            if ds.get("ImagePositionPatient") is not None
            else _missing_position()
            for ds in datasets
        ]
    )
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    in_plane = positions - np.outer(along, normal)
    offset = np.abs(in_plane - in_plane[0]).max()
    if offset > 0.1 * min(pixel_spacing) + 1e-3:
        raise VolumeError(
            f"the slices are not stacked along the slice normal (in-plane shift {offset:.2f} mm)"
        )
    if len(datasets) > 1:
        gaps = np.diff(along)
        if gaps.min() < 1e-3:
            raise VolumeError("two instances share the same slice position")
        slice_spacing = float(np.median(gaps))
        if np.abs(gaps - slice_spacing).max() > spacing_tolerance * slice_spacing:
            raise VolumeError(
                f"uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm): "
                "missing or extra slices"
            )
    else:
        slice_spacing = _float_attribute(first, "SpacingBetweenSlices", 0.0) or (
            _float_attribute(first, "SliceThickness", 1.0)
        )
        if slice_spacing <= 0:
            slice_spacing = 1.0

    array = np.empty((len(datasets), *shape_2d), dtype=np.float32)
    for k, index in enumerate(order):
        ds = datasets[index]
        slope = _float_attribute(ds, "RescaleSlope", 1.0)
        intercept = _float_attribute(ds, "RescaleIntercept", 0.0)
        np.multiply(pixels[index], slope, out=array[k], casting="unsafe")
        if intercept:
            array[k] += intercept
    if not np.isfinite(array).all():
        raise VolumeError("the rescaled pixel values are not finite")

    geometry = Geometry(
        origin=(float(positions[0, 0]), float(positions[0, 1]), float(positions[0, 2])),
        row_cosines=(float(row[0]), float(row[1]), float(row[2])),
        col_cosines=(float(col[0]), float(col[1]), float(col[2])),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        spacing=(slice_spacing, pixel_spacing[0], pixel_spacing[1]),
        shape=(len(datasets), shape_2d[0], shape_2d[1]),
    )
    ordered = [datasets[index] for index in order]
    log.debug(
        "loaded series %s: %d slices of %dx%d",
        uid_tag(series_uid),
        len(ordered),
        *shape_2d,
    )
    return Volume(
        array=array,
        geometry=geometry,
        sop_instance_uids=tuple(sop_uids[index] for index in order),
        headers=tuple(ordered),
        paths=tuple(paths[index] for index in order),
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        transfer_syntaxes=tuple(
            str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")) for ds in ordered
        ),
    )


def _missing_position() -> tuple[float, float, float]:
    raise VolumeError("ImagePositionPatient is missing")
