"""The one definition of the classifier input: vertebral-body crops, resized and normalised.

Training (``train/``) and inference import this module, so both see identical images. A
vertebral-body image is a 2.5D crop: its channels are the body's mid-sagittal slice and its
neighbours, cut around the body's outline on that slice plus a margin, resized to a square
``input_size`` and normalised with the intensity window of the whole series. Any change to the
algorithm must bump :data:`PREPROCESS_VERSION`, which model manifests record and check.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal

import numpy as np
import torch
import torch.nn.functional as nnf
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.labels import LABEL_OF, LUMBAR_LEVELS
from pipeline.volume import Volume

PREPROCESS_VERSION: Final = "vertebra-crop-2.5d/1"
DEFAULT_INPUT_SIZE: Final[int] = 256
"""Default classifier input size: EfficientNet-b4 at 256 px classifies the ten bodies of a
study in under a second on two CPU cores (380 px, the network's native size, takes ~4x)."""


class PreprocessSpec(BaseModel):
    """Parameters of the vertebral-body crop, stored in every classifier manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["vertebra-crop"] = "vertebra-crop"
    version: Literal["vertebra-crop-2.5d/1"] = PREPROCESS_VERSION
    input_size: int = Field(default=DEFAULT_INPUT_SIZE, ge=16, le=1024)
    context_slices: int = Field(default=1, ge=0, le=4)
    """Neighbouring slices on each side of the mid-sagittal slice (channels = 2n + 1)."""
    margin: float = Field(default=0.15, ge=0.0, le=1.0)
    """Margin added on each side, as a fraction of the body's larger in-plane extent."""
    square: bool = True
    """Make the crop square in millimetres (keeps the body's height-to-depth ratio)."""
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    """Series percentiles mapped to 0 and 1 (the window of the whole series, not the crop)."""
    clip: tuple[float, float] = (0.0, 2.0)
    mean: float = 0.5
    std: float = Field(default=0.25, gt=0)
    mask_outside: bool = False
    """Set pixels outside the body (on every channel) to the window's zero."""

    @model_validator(mode="after")
    def _check(self) -> PreprocessSpec:
        low, high = self.intensity_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError("intensity_percentiles must satisfy 0 <= low < high <= 100")
        if self.clip[0] >= self.clip[1]:
            raise ValueError("clip must be (low, high) with low < high")
        return self

    @property
    def in_chans(self) -> int:
        return 2 * self.context_slices + 1


def intensity_window(array: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Low and high intensity of a series at the given percentiles (robust to outliers)."""
    values = np.asarray(array, dtype=np.float32).reshape(-1)
    low, high = np.percentile(values, percentiles)
    low, high = float(low), float(high)
    if not high > low:
        high = low + 1.0
    return low, high


def normalise(
    array: np.ndarray, window: tuple[float, float], clip: tuple[float, float] = (0.0, 2.0)
) -> np.ndarray:
    """Map ``window`` to ``[0, 1]`` (float32), clipped to ``clip``."""
    low, high = window
    out = (np.asarray(array, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, clip[0], clip[1], out=out)


def resize_images(images: torch.Tensor, size: int | tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` images; area-correct (antialiased) when shrinking bilinearly."""
    target = (size, size) if isinstance(size, int) else size
    if tuple(images.shape[-2:]) == target:
        return images
    if mode == "bilinear":
        shrinking = images.shape[-2] > target[0] or images.shape[-1] > target[1]
        return nnf.interpolate(
            images, size=target, mode="bilinear", align_corners=False, antialias=shrinking
        )
    return nnf.interpolate(images, size=target, mode=mode)


def mid_sagittal_slice(mask: np.ndarray) -> int | None:
    """Index ``k`` of the slice where a body's mask is largest (ties: nearest its centre)."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if areas.max() == 0:
        return None
    centre = float((areas * np.arange(len(areas))).sum() / areas.sum())
    best = np.flatnonzero(areas == areas.max())
    return int(best[np.argmin(np.abs(best - centre))])


def crop_box(
    mask_2d: np.ndarray,
    spec: PreprocessSpec,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
) -> tuple[int, int, int, int]:
    """``(j0, j1, i0, i1)`` (end exclusive) of the crop around a body outline on one slice.

    The box may extend beyond the image; :func:`vertebra_crops` pads with the window's zero.
    """
    rows = np.flatnonzero(mask_2d.any(axis=1))
    cols = np.flatnonzero(mask_2d.any(axis=0))
    if rows.size == 0:
        raise ValueError("the body mask is empty on its mid-sagittal slice")
    row_mm, col_mm = pixel_spacing
    height = (rows[-1] - rows[0] + 1) * row_mm
    width = (cols[-1] - cols[0] + 1) * col_mm
    centre_j = (rows[0] + rows[-1] + 1) / 2.0
    centre_i = (cols[0] + cols[-1] + 1) / 2.0
    extra = spec.margin * max(height, width)
    if spec.square:
        height = width = max(height, width)
    half_j = (height / 2.0 + extra) / row_mm
    half_i = (width / 2.0 + extra) / col_mm
    j0 = int(np.floor(centre_j - half_j))
    i0 = int(np.floor(centre_i - half_i))
    j1 = max(int(np.ceil(centre_j + half_j)), j0 + 1)
    i1 = max(int(np.ceil(centre_i + half_i)), i0 + 1)
    return j0, j1, i0, i1


def _cut(image: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """Sub-array ``image[..., j0:j1, i0:i1]`` padded with ``fill`` where the box leaves it."""
    j0, j1, i0, i1 = box
    rows, cols = image.shape[-2:]
    out = np.full((*image.shape[:-2], j1 - j0, i1 - i0), fill, dtype=np.float32)
    sj0, sj1 = max(j0, 0), min(j1, rows)
    si0, si1 = max(i0, 0), min(i1, cols)
    if sj1 > sj0 and si1 > si0:
        out[..., sj0 - j0 : sj1 - j0, si0 - i0 : si1 - i0] = image[..., sj0:sj1, si0:si1]
    return out


def vertebra_crops(
    volume: Volume | np.ndarray,
    labelmap: np.ndarray,
    levels: Iterable[str] = LUMBAR_LEVELS,
    spec: PreprocessSpec | None = None,
    *,
    pixel_spacing: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Classifier inputs ``(in_chans, input_size, input_size)`` float32 per found level.

    ``volume`` is a :class:`~pipeline.volume.Volume` or a raw ``(k, j, i)`` array (then give
    ``pixel_spacing`` as ``(row, column)`` millimetres). ``labelmap`` holds the label values of
    :mod:`pipeline.labels` on the same grid. Levels without any voxel are left out.
    ``window`` overrides the series intensity window (default: from ``spec``).
    """
    spec = spec or PreprocessSpec()
    if isinstance(volume, Volume):
        array = volume.array
        spacing = pixel_spacing or (volume.geometry.spacing[1], volume.geometry.spacing[2])
    else:
        array = np.asarray(volume)
        spacing = pixel_spacing or (1.0, 1.0)
    if array.shape != labelmap.shape:
        raise ValueError(f"volume {array.shape} and label map {labelmap.shape} differ in shape")
    window = window or intensity_window(array, spec.intensity_percentiles)
    fill = float(normalise(np.zeros(1, np.float32), window, spec.clip)[0])
    crops: dict[str, np.ndarray] = {}
    depth = array.shape[0]
    for level in levels:
        mask = labelmap == LABEL_OF[level]
        k = mid_sagittal_slice(mask)
        if k is None:
            continue
        box = crop_box(mask[k], spec, spacing)
        indices = np.clip(
            np.arange(k - spec.context_slices, k + spec.context_slices + 1), 0, depth - 1
        )
        block = normalise(array[indices], window, spec.clip)
        if spec.mask_outside:
            block = np.where(mask[k][None], block, np.float32(fill))
        cut = _cut(block, box, fill)
        resized = resize_images(torch.from_numpy(cut)[None], spec.input_size, "bilinear")[0]
        crops[level] = ((resized.numpy() - spec.mean) / spec.std).astype(np.float32)
    return crops
