"""Outlines of label regions on one slice, as polylines in DICOM pixel coordinates.

DICOM 2D spatial coordinates (PS3.3 C.18.6.1.1) put the top left corner of the top left pixel
at ``(0, 0)`` and give points as ``(column, row)``; a pixel ``(j, i)`` has its centre at
``(i + 0.5, j + 0.5)``.
"""

from __future__ import annotations

import contourpy
import numpy as np
from scipy.spatial import ConvexHull, QhullError


def outline(mask: np.ndarray) -> np.ndarray | None:
    """The closed outline of the largest region of a 2-D boolean mask.

    Returns:
        ``(N, 2)`` float32 ``(column, row)`` points with the first point repeated at the end,
        or ``None`` when the mask is empty.
    """
    if not mask.any():
        return None
    padded = np.pad(mask.astype(np.float32), 1)
    lines = [np.asarray(line) for line in contourpy.contour_generator(
        z=padded, name="serial"
    ).lines(0.5)]
    if not lines:
        return None
    line = max(lines, key=lambda points: int(points.shape[0]))
    # contourpy gives (x, y) = (column, row) in padded index units; undo the padding and move
    # from index to DICOM pixel coordinates (+0.5).
    points = np.asarray(line, dtype=np.float64) - 1.0 + 0.5
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return _simplify(points).astype(np.float32)


def hull_outline(mask: np.ndarray) -> np.ndarray | None:
    """The closed convex hull around every pixel of a 2-D mask (``(column, row)`` points)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    corners = np.concatenate(
        [
            np.stack([cols + dx, rows + dy], axis=1)
            for dx in (0.0, 1.0)
            for dy in (0.0, 1.0)
        ]
    ).astype(np.float64)
    try:
        hull = ConvexHull(corners)
    except QhullError:  # all pixels on one line
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        box = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
        return np.vstack([box, box[:1]]).astype(np.float32)
    points = corners[hull.vertices]
    return np.vstack([points, points[:1]]).astype(np.float32)


def _simplify(points: np.ndarray) -> np.ndarray:
    """Drop points that lie on the straight line between their neighbours."""
    if len(points) <= 4:
        return points
    before = points[:-2]
    middle = points[1:-1]
    after = points[2:]
    cross = (middle[:, 0] - before[:, 0]) * (after[:, 1] - before[:, 1]) - (
        middle[:, 1] - before[:, 1]
    ) * (after[:, 0] - before[:, 0])
    keep = np.concatenate([[True], np.abs(cross) > 1e-9, [True]])
    return points[keep]
