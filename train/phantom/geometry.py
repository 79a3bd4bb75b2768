"""Image planes in patient coordinates (DICOM LPS+, millimetres) and helpers for stacks."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.volume import Geometry


@dataclass(frozen=True, eq=False)
class SlicePlane:
    """One image: pixel ``(j, i)`` sits at ``origin + i * spacing[1] * row_cosines +
    j * spacing[0] * col_cosines`` (``spacing`` is DICOM PixelSpacing: row spacing first)."""

    origin: np.ndarray
    row_cosines: np.ndarray
    col_cosines: np.ndarray
    spacing: tuple[float, float]
    shape: tuple[int, int]
    thickness: float

    @functools.cached_property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row_cosines, self.col_cosines)
        return n / np.linalg.norm(n)

    @property
    def orientation(self) -> list[float]:
        """ImageOrientationPatient."""
        return [float(v) for v in (*self.row_cosines, *self.col_cosines)]

    @property
    def position(self) -> list[float]:
        """ImagePositionPatient."""
        return [float(v) for v in self.origin]

    def pixel_to_lps(self, j: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Patient coordinates of (row, column) pixel indices, shape ``(..., 3)``."""
        j = np.asarray(j, dtype=np.float64)[..., None]
        i = np.asarray(i, dtype=np.float64)[..., None]
        return (
            self.origin
            + i * self.spacing[1] * self.row_cosines
            + j * self.spacing[0] * self.col_cosines
        )


def rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Rotation matrix: about z (yaw), then y (pitch), then x (roll), applied to LPS vectors."""
    a, b, c = np.radians([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rx @ ry @ rz


def plan_stack(
    *,
    centre: np.ndarray,
    row_cosines: np.ndarray,
    col_cosines: np.ndarray,
    fov_mm: tuple[float, float],
    matrix: tuple[int, int],
    n_slices: int,
    spacing_mm: float,
    thickness_mm: float,
) -> tuple[SlicePlane, ...]:
    """Parallel planes centred on ``centre``, sorted by ascending position along the normal."""
    row_cosines = row_cosines / np.linalg.norm(row_cosines)
    col_cosines = col_cosines / np.linalg.norm(col_cosines)
    normal = np.cross(row_cosines, col_cosines)
    rows, cols = matrix
    pixel = (fov_mm[0] / rows, fov_mm[1] / cols)
    corner = (
        centre
        - (cols - 1) / 2.0 * pixel[1] * row_cosines
        - (rows - 1) / 2.0 * pixel[0] * col_cosines
    )
    offsets = (np.arange(n_slices) - (n_slices - 1) / 2.0) * spacing_mm
    return tuple(
        SlicePlane(
            origin=np.round(corner + t * normal, 4),
            row_cosines=np.round(row_cosines, 8),
            col_cosines=np.round(col_cosines, 8),
            spacing=(round(pixel[0], 6), round(pixel[1], 6)),
            shape=(rows, cols),
            thickness=thickness_mm,
        )
        for t in offsets
    )


def stack_geometry(planes: tuple[SlicePlane, ...]) -> Geometry:
    """The :class:`pipeline.volume.Geometry` of planes sorted along their normal."""
    first = planes[0]
    normal = first.normal
    if len(planes) > 1:
        spacing = float(np.median(np.diff([float(p.origin @ normal) for p in planes])))
    else:
        spacing = first.thickness
    return Geometry(
        origin=(float(first.origin[0]), float(first.origin[1]), float(first.origin[2])),
        row_cosines=(
            float(first.row_cosines[0]),
            float(first.row_cosines[1]),
            float(first.row_cosines[2]),
        ),
        col_cosines=(
            float(first.col_cosines[0]),
            float(first.col_cosines[1]),
            float(first.col_cosines[2]),
        ),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        spacing=(spacing, first.spacing[0], first.spacing[1]),
        shape=(len(planes), first.shape[0], first.shape[1]),
    )
