"""Vertebral-body segmentation: a MONAI 2D UNet on sagittal slices, labelled T12..S1 + CSF.

Each sagittal slice (with its neighbours as extra channels, 2.5D) is padded to a square,
resized to ``input_size`` and segmented; the class scores are resized back to the slice's
own matrix before the arg-max, so the label map lies on the exact source grid. Post-processing
then keeps one connected body per level in anatomical (cranio-caudal) order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import torch
from monai.networks.nets import UNet
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from pipeline.config import SegmentationSettings
from pipeline.device import inference_context
from pipeline.labels import CSF_LABEL, NUM_CLASSES, VERTEBRAE
from pipeline.preprocess import intensity_window, normalise, resize_images
from pipeline.volume import Geometry

log = logging.getLogger(__name__)

SEGMENTATION_INPUT_VERSION: Final = "sagittal-slices/1"
NUM_BODY_LABELS: Final[int] = len(VERTEBRAE)

ASSIGN_BONUS: Final[float] = 0.6
"""Reward for labelling a component, as a fraction of its size (keeps bodies whose votes are
for a neighbouring level when their position says otherwise)."""
SKIP_PENALTY: Final[float] = 0.5
"""Cost of a level skipped between two labelled bodies, as a fraction of the median body size
(vertebral bodies are contiguous; a skip is only taken when the votes insist)."""


class SegmentationInputSpec(BaseModel):
    """How slices are prepared for the segmenter; stored in the segmenter's manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sagittal-slices"] = "sagittal-slices"
    version: Literal["sagittal-slices/1"] = SEGMENTATION_INPUT_VERSION
    input_size: int = Field(default=256, ge=32, le=1024)
    context_slices: int = Field(default=1, ge=0, le=4)
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    clip: tuple[float, float] = (0.0, 2.0)

    @property
    def in_chans(self) -> int:
        return 2 * self.context_slices + 1


class UNetParams(BaseModel):
    """Architecture of the MONAI UNet (recorded in the manifest as ``architecture_params``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = Field(default=2, ge=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> UNetParams:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("UNet strides need one entry fewer than channels")
        return self


SEGMENTER_ARCHITECTURE: Final[str] = "monai_unet_2d"


def build_segmenter(
    in_chans: int = 3,
    params: UNetParams | None = None,
    out_channels: int = NUM_CLASSES,
) -> torch.nn.Module:
    """The vertebral-body segmenter: a MONAI 2D UNet with ``out_channels`` class scores."""
    params = params or UNetParams()
    return UNet(
        spatial_dims=2,
        in_channels=in_chans,
        out_channels=out_channels,
        channels=params.channels,
        strides=params.strides,
        num_res_units=params.num_res_units,
        dropout=params.dropout,
    )


def _square_pad(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding that makes a ``(rows, cols)`` slice square."""
    rows, cols = shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    return top, side - rows - top, left, side - cols - left


def prepare_slices(array: np.ndarray, spec: SegmentationInputSpec) -> torch.Tensor:
    """Segmenter input ``(k, in_chans, S, S)`` float32 for a ``(k, j, i)`` volume.

    Channel ``c`` of slice ``k`` is slice ``k + c - context_slices`` (edges repeat).
    """
    window = intensity_window(array, spec.intensity_percentiles)
    normed = torch.from_numpy(normalise(array, window, spec.clip))
    depth = normed.shape[0]
    offsets = torch.arange(-spec.context_slices, spec.context_slices + 1)
    index = (torch.arange(depth)[:, None] + offsets[None, :]).clamp(0, depth - 1)
    stacked = normed[index]  # (k, C, j, i)
    top, bottom, left, right = _square_pad((int(array.shape[1]), int(array.shape[2])))
    if top or bottom or left or right:
        fill = float(normalise(np.zeros(1, np.float32), window, spec.clip)[0])
        stacked = torch.nn.functional.pad(stacked, (left, right, top, bottom), value=fill)
    return resize_images(stacked, spec.input_size, "bilinear").contiguous()


def prepare_labels(labelmap: np.ndarray, spec: SegmentationInputSpec) -> torch.Tensor:
    """Training target ``(k, S, S)`` int64 for a ``(k, j, i)`` label map (nearest neighbour)."""
    labels = torch.from_numpy(np.ascontiguousarray(labelmap, dtype=np.int64))
    top, bottom, left, right = _square_pad((int(labelmap.shape[1]), int(labelmap.shape[2])))
    if top or bottom or left or right:
        labels = torch.nn.functional.pad(labels, (left, right, top, bottom), value=0)
    resized = resize_images(labels[:, None].float(), spec.input_size, "nearest-exact")
    return resized[:, 0].round().long()


def scores_to_source_grid(scores: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Resize ``(N, classes, S, S)`` scores back to a ``(rows, cols)`` slice (undo the padding)."""
    top, bottom, left, right = _square_pad(shape)
    side = max(shape)
    resized = torch.nn.functional.interpolate(
        scores, size=(side, side), mode="bilinear", align_corners=False
    )
    return resized[:, :, top : side - bottom, left : side - right]


def predict_labelmaps(
    model: torch.nn.Module,
    arrays: Sequence[np.ndarray],
    spec: SegmentationInputSpec,
    device: torch.device,
    *,
    half: bool = False,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """Raw arg-max label maps (uint8, source grid) of several volumes in shared batches."""
    inputs = [prepare_slices(array, spec) for array in arrays]
    owners = np.concatenate([np.full(len(x), n) for n, x in enumerate(inputs)])
    slices = torch.cat(inputs)
    outputs = [np.empty(array.shape, dtype=np.uint8) for array in arrays]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in inputs])])
    with inference_context(device, half):
        for start in range(0, len(slices), batch_size):
            batch = slices[start : start + batch_size].to(device, non_blocking=True)
            scores = model(batch).float()
            # Scores are resized per volume (matrices may differ between series).
            for owner in np.unique(owners[start : start + batch_size]):
                rows = np.flatnonzero(owners[start : start + batch_size] == owner)
                shape = (int(arrays[owner].shape[1]), int(arrays[owner].shape[2]))
                labels = scores_to_source_grid(scores[rows], shape).max(dim=1).indices
                first = start + int(rows[0]) - int(offsets[owner])
                outputs[owner][first : first + len(rows)] = labels.to(torch.uint8).cpu().numpy()
    return outputs


@dataclass(frozen=True, eq=False)
class _Part:
    box: tuple[slice, ...]
    mask: np.ndarray  # inside ``box``
    votes: np.ndarray  # voxels per label 1..7
    superior: float  # mm towards the head of the centroid


def _heights(mask: np.ndarray, offset: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Head-ward millimetres (up to a constant) of every voxel of a mask inside a box."""
    axis = geometry.superior_axis()
    heights = np.zeros(int(mask.sum()))
    for index, start, step in zip(np.nonzero(mask), offset, axis, strict=True):
        if step:
            heights += (index + start) * step
    return heights


def postprocess_labelmap(
    raw: np.ndarray,
    geometry: Geometry,
    settings: SegmentationSettings | None = None,
) -> np.ndarray:
    """One connected body per level, labels strictly cranio-caudal, plus the largest CSF part.

    Bodies are the connected components of all voxels predicted as any vertebra. A component
    whose labels are clearly mixed (two bodies joined through a missed disc) is split by
    label. Components are then ordered from head to feet and given labels that increase
    downwards and agree best with the network's votes (dynamic programming), so swapped or
    repeated levels cannot occur; components that fit no level are dropped.
    """
    settings = settings or SegmentationSettings()
    min_voxels = max(1, int(settings.min_body_ml / geometry.voxel_volume_ml))
    bodies = (raw >= 1) & (raw <= NUM_BODY_LABELS)
    components, count = ndimage.label(bodies)
    out = np.zeros(raw.shape, dtype=np.uint8)
    if count:
        parts = _body_parts(raw, components, min_voxels, settings, geometry)
        assignment = _assign_levels(parts)
        for part, label in zip(parts, assignment, strict=True):
            if label:
                out[part.box][part.mask] = label
        for label, box in enumerate(ndimage.find_objects(out), start=1):
            if box is None or label > NUM_BODY_LABELS:
                continue
            region = out[box]
            mask = region == label
            kept = _fill_slices(_largest_component(mask))
            region[mask & ~kept] = 0
            region[kept & (region == 0)] = label
    boxes = ndimage.find_objects((raw == CSF_LABEL).view(np.uint8))
    if boxes and boxes[0] is not None:
        box = boxes[0]
        kept = _largest_component(raw[box] == CSF_LABEL)
        if kept.sum() * geometry.voxel_volume_ml >= settings.min_csf_ml:
            region = out[box]
            region[kept & (region == 0)] = CSF_LABEL
    return out


def _body_parts(
    raw: np.ndarray,
    components: np.ndarray,
    min_voxels: int,
    settings: SegmentationSettings,
    geometry: Geometry,
) -> list[_Part]:
    parts: list[_Part] = []
    slices = ndimage.find_objects(components)
    for index, box in enumerate(slices, start=1):
        if box is None:
            continue
        local = components[box] == index
        size = int(local.sum())
        if size < min_voxels:
            continue
        labels = raw[box][local]
        votes = np.bincount(labels, minlength=NUM_BODY_LABELS + 1)[1:]
        order = np.argsort(votes)[::-1]
        offset = np.array([s.start for s in box])
        pieces: list[np.ndarray] = []
        if votes[order[1]] >= settings.split_fraction * size:
            pieces = _split_by_label(raw[box], local, votes, settings.split_fraction * size)
            if not _stacked(pieces, offset, geometry):
                pieces = []
        if len(pieces) < 2:
            pieces = [local]
        for piece in pieces:
            if piece.sum() < min_voxels:
                continue
            piece_votes = np.bincount(raw[box][piece], minlength=NUM_BODY_LABELS + 1)[1:]
            superior = float(_heights(piece, offset, geometry).mean())
            parts.append(_Part(box, piece, piece_votes, superior))
    return parts


def _stacked(pieces: list[np.ndarray], offset: np.ndarray, geometry: Geometry) -> bool:
    """Whether pieces lie one above the other (two bodies) rather than side by side (one body
    with mixed votes): their cranio-caudal extents overlap by less than half."""
    extents = []
    for piece in pieces:
        heights = _heights(piece, offset, geometry)
        if heights.size == 0:
            return False
        extents.append((float(heights.min()), float(heights.max())))
    for n, (low_a, high_a) in enumerate(extents):
        for low_b, high_b in extents[n + 1 :]:
            overlap = min(high_a, high_b) - max(low_a, low_b)
            shorter = min(high_a - low_a, high_b - low_b)
            if overlap > 0.5 * shorter:
                return False
    return True


def _split_by_label(
    labels: np.ndarray, local: np.ndarray, votes: np.ndarray, min_votes: float
) -> list[np.ndarray]:
    """Split a component into one piece per strongly voted label; other voxels go to the
    nearest piece."""
    strong = [label + 1 for label in np.flatnonzero(votes >= min_votes)]
    seeds = np.zeros(labels.shape, dtype=np.int32)
    for n, label in enumerate(strong, start=1):
        seeds[local & (labels == label)] = n
    if (local & (seeds == 0)).any():
        _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        seeds = seeds[tuple(nearest)]
    return [local & (seeds == n) for n in range(1, len(strong) + 1)]


def _assign_levels(parts: list[_Part]) -> list[int]:
    """Labels (0 = dropped) strictly increasing from head to feet.

    Maximises the agreeing votes plus a bonus per labelled component, minus a penalty per
    level skipped between labelled components (dynamic programming over the components in
    cranio-caudal order).
    """
    if not parts:
        return []
    order = sorted(range(len(parts)), key=lambda n: -parts[n].superior)
    sizes = np.array([float(part.votes.sum()) for part in parts])
    skip_cost = SKIP_PENALTY * float(np.median(sizes))
    m, levels = len(order), NUM_BODY_LABELS
    # best[a][last]: best score for components order[a:], given the label of the previous
    # labelled component (0: none yet).
    best = np.zeros((m + 1, levels + 1))
    choice = np.zeros((m + 1, levels + 1), dtype=np.int64)
    for a in range(m - 1, -1, -1):
        part = parts[order[a]]
        for last in range(levels, -1, -1):
            score, pick = best[a + 1][last], 0
            for label in range(last + 1, levels + 1):
                skipped = label - last - 1 if last else 0
                candidate = (
                    float(part.votes[label - 1])
                    + ASSIGN_BONUS * sizes[order[a]]
                    - skip_cost * skipped
                    + best[a + 1][label]
                )
                if candidate > score:
                    score, pick = candidate, label
            best[a][last], choice[a][last] = score, pick
    assigned = [0] * len(parts)
    last = 0
    for a in range(m):
        pick = int(choice[a][last])
        if pick:
            assigned[order[a]] = pick
            last = pick
    return assigned


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())[1:]
    return components == (int(np.argmax(sizes)) + 1)


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (sagittal planes), where the body outline is closed."""
    filled = mask.copy()
    for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        filled[k] = ndimage.binary_fill_holes(mask[k])
    return filled
