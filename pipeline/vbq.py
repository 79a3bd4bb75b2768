"""Vertebral Bone Quality (VBQ) score, a training-free baseline beside the CNN.

Ehresman et al. (Spine J 2020): the median signal intensity of the L1-L4 vertebral bodies'
trabecular bone on the mid-sagittal non-contrast T1-weighted image, divided by the signal of
the cerebrospinal fluid at L3 (L2 where L3's canal holds no CSF). More marrow fat means a
brighter marrow and a higher score; published osteoporosis cut-offs lie near 3.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from scipy import ndimage

from pipeline.config import VBQSettings
from pipeline.labels import LABEL_OF
from pipeline.preprocess import mid_sagittal_slice
from pipeline.volume import Geometry


@dataclass(frozen=True)
class VBQResult:
    """VBQ score and its parts; ``score`` is ``None`` with a ``reason`` when not computable."""

    score: float | None
    level_signals: Mapping[str, float] = field(default_factory=dict)
    csf_signal: float | None = None
    csf_level: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_signals", MappingProxyType(dict(self.level_signals)))


def _trabecular_mask(
    mask_2d: np.ndarray, erosion_mm: float, spacing: tuple[float, float]
) -> np.ndarray:
    if erosion_mm <= 0:
        return mask_2d
    radius = (max(1, round(erosion_mm / spacing[0])), max(1, round(erosion_mm / spacing[1])))
    jj, ii = np.ogrid[-radius[0] : radius[0] + 1, -radius[1] : radius[1] + 1]
    structure = (jj / radius[0]) ** 2 + (ii / radius[1]) ** 2 <= 1.0
    eroded = ndimage.binary_erosion(mask_2d, structure=structure)
    return eroded if eroded.sum() >= 4 else mask_2d


def _superior_mm_map(geometry: Geometry, shape: tuple[int, int]) -> np.ndarray:
    """Head-ward millimetres of every pixel of a sagittal slice (up to a constant)."""
    axis = geometry.superior_axis()
    jj, ii = np.indices(shape, dtype=np.float64)
    return jj * axis[1] + ii * axis[2]


def vbq_score(
    array: np.ndarray,
    labelmap: np.ndarray,
    geometry: Geometry,
    settings: VBQSettings | None = None,
) -> VBQResult:
    """VBQ of a T1 volume and its post-processed label map (same ``(k, j, i)`` grid)."""
    settings = settings or VBQSettings()
    spacing = (geometry.spacing[1], geometry.spacing[2])
    signals: dict[str, float] = {}
    mid_slices: dict[str, int] = {}
    for level in settings.levels:
        mask = labelmap == LABEL_OF[level]
        k = mid_sagittal_slice(mask)
        if k is None:
            continue
        roi = _trabecular_mask(mask[k], settings.erosion_mm, spacing)
        signals[level] = float(np.median(array[k][roi]))
        mid_slices[level] = k
    if not signals:
        return VBQResult(None, reason="no lumbar vertebral body found for the VBQ")
    missing = [level for level in settings.levels if level not in signals]
    if missing:
        return VBQResult(
            None, signals, reason="VBQ needs " + ", ".join(missing) + " (not segmented)"
        )

    csf = labelmap == settings.csf_label
    for level in settings.csf_levels:
        body = labelmap == LABEL_OF[level]
        k = mid_slices.get(level) if level in mid_slices else mid_sagittal_slice(body)
        if k is None:
            continue
        superior = _superior_mm_map(geometry, body.shape[1:])
        extent = superior[body[k]]
        low, high = float(extent.min()), float(extent.max())
        first, last = max(0, k - 1), min(labelmap.shape[0], k + 2)
        band = (superior >= low) & (superior <= high)
        values = array[first:last][csf[first:last] & band[None]]
        if values.size >= 4:
            csf_signal = float(np.median(values))
            if csf_signal <= 0:
                continue
            body_signal = float(np.median(list(signals.values())))
            return VBQResult(body_signal / csf_signal, signals, csf_signal, level)
    return VBQResult(
        None, signals, reason="no CSF found at " + " or ".join(settings.csf_levels)
    )
