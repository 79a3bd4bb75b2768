"""Rasterise a scene of layered shapes onto an image plane as tissue-channel fractions.

Layers are painted in order with alpha compositing: a layer covering a fraction ``a`` of a
pixel scales what lies below by ``1 - a`` and adds ``a`` times its channel weights. The
renderer composites front to back (last layer first) with a running transmittance, so each
layer only touches its own pixels, and layers hidden by those above are skipped. The
coverage ``a`` comes from the signed distance with a ramp one pixel wide (in-plane partial
volume), averaged over sub-samples across the slice thickness (through-plane partial
volume). Large smooth layers are evaluated on a coarse grid and their distance field is
interpolated, which keeps their edges sharp at a fraction of the cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from train.phantom.geometry import SlicePlane
from train.phantom.shapes import Shape
from train.phantom.tissue import CHANNEL, N_CHANNELS


@dataclass(frozen=True)
class Patch:
    """A rectangle of pixels on the slice centre plane: pixel ``(j, i)`` of the patch lies at
    ``origin + j * step_row + i * step_col`` (LPS)."""

    origin: np.ndarray
    step_row: np.ndarray
    step_col: np.ndarray
    shape: tuple[int, int]


WeightFunction = Callable[[Patch], dict[int, np.ndarray]]
"""Per-pixel channel weights of a layer over a patch of pixels."""


@dataclass(frozen=True, eq=False)
class Layer:
    """One painted shape. ``weights`` are static channel weights (by channel name) summing to
    at most one (the rest is air); ``weight_fn`` gives per-pixel weights instead. ``inset``
    shrinks the shape by that many millimetres (an inner marrow layer inside a cortex).
    ``label`` (non-zero) marks pixels covered at least half in the label map. ``stride`` > 1
    evaluates the distance on a coarse grid; ``through_plane`` False uses the slice centre
    only."""

    name: str
    shape: Shape
    weights: dict[str, float] = field(default_factory=dict)
    weight_fn: WeightFunction | None = None
    inset: float = 0.0
    label: int = 0
    stride: int = 2
    through_plane: bool = True

    def channel_weights(self) -> dict[int, float]:
        return {CHANNEL[name]: value for name, value in self.weights.items()}


@dataclass
class RenderResult:
    fractions: np.ndarray  # (channels, rows, cols) float32
    labels: np.ndarray  # (rows, cols) uint8


class Scene:
    """Layers with their bounding boxes stacked for fast culling against many planes."""

    def __init__(self, layers: list[Layer] | tuple[Layer, ...]):
        self.layers = tuple(layers)
        corners = []
        for layer in self.layers:
            low, high = layer.shape.bounds()
            corners.append(
                [[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1])
                 for z in (low[2], high[2])]
            )  # fmt: skip
        self.corners = np.asarray(corners, dtype=np.float64).reshape(len(self.layers), 8, 3)
        self.weights = [layer.channel_weights() for layer in self.layers]


def _pixel_boxes(scene: Scene, plane: SlicePlane, margin_mm: float) -> np.ndarray:
    """``(layers, 5)`` int array: visible flag, j0, j1, i0, i1 for every layer."""
    rel = scene.corners - plane.origin
    t = rel @ plane.normal
    half = plane.thickness / 2.0 + margin_mm
    visible = (t.min(axis=1) <= half) & (t.max(axis=1) >= -half)
    i = rel @ plane.row_cosines / plane.spacing[1]
    j = rel @ plane.col_cosines / plane.spacing[0]
    rows, cols = plane.shape
    pad = 2
    i0 = np.clip(np.floor(i.min(axis=1)).astype(int) - pad, 0, cols)
    i1 = np.clip(np.ceil(i.max(axis=1)).astype(int) + pad + 1, 0, cols)
    j0 = np.clip(np.floor(j.min(axis=1)).astype(int) - pad, 0, rows)
    j1 = np.clip(np.ceil(j.max(axis=1)).astype(int) + pad + 1, 0, rows)
    visible &= (i0 < i1) & (j0 < j1)
    return np.stack([visible.astype(int), j0, j1, i0, i1], axis=1)


def _coords(
    plane: SlicePlane, jj: np.ndarray, ii: np.ndarray, t: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS coordinates of the outer product of row indices ``jj`` and column indices ``ii``."""
    base = plane.origin + t * plane.normal
    dj = plane.col_cosines * plane.spacing[0]
    di = plane.row_cosines * plane.spacing[1]
    jf = jj.astype(np.float32)[:, None]
    if_ = ii.astype(np.float32)[None, :]
    out = []
    for axis in range(3):
        out.append(np.float32(base[axis]) + jf * np.float32(dj[axis]) + if_ * np.float32(di[axis]))
    return out[0], out[1], out[2]


@functools.lru_cache(maxsize=4096)
def _upsample_matrix(n_out: int, stride: int) -> np.ndarray:
    """Linear interpolation from samples every ``stride`` pixels (starting at 0 and reaching
    at least ``n_out - 1``) to all ``n_out`` pixels."""
    n_in = (n_out - 1) // stride + 2
    matrix = interp_matrix(n_out, np.arange(n_in, dtype=np.float64) * stride)
    matrix.setflags(write=False)
    return matrix


def interp_matrix(n_out: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation matrix from samples at ``positions`` (ascending) to 0..n_out-1."""
    target = np.arange(n_out, dtype=np.float64)
    k = np.clip(np.searchsorted(positions, target, side="right") - 1, 0, len(positions) - 2)
    left, right = positions[k], positions[k + 1]
    w = np.clip((target - left) / np.maximum(right - left, 1e-9), 0.0, 1.0)
    matrix = np.zeros((n_out, len(positions)), dtype=np.float32)
    matrix[np.arange(n_out), k] = 1.0 - w
    matrix[np.arange(n_out), k + 1] += w
    return matrix


_PAD = 8  # coordinates are computed this many pixels beyond the image for coarse grids


class _PlaneSampler:
    """Coordinates of a plane's pixels at sub-sample offsets, and distances cached per shape."""

    def __init__(self, plane: SlicePlane, offsets: np.ndarray):
        rows, cols = plane.shape
        self.plane = plane
        jj, ii = np.arange(rows + _PAD), np.arange(cols + _PAD)
        self.full = {float(t): _coords(plane, jj, ii, float(t)) for t in offsets}
        self.cache: dict[tuple[int, float, tuple[int, int, int, int]], np.ndarray] = {}

    def distance(
        self, shape: Shape, stride: int, box: tuple[int, int, int, int], t: float
    ) -> np.ndarray:
        key = (id(shape), t, box)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        j0, j1, i0, i1 = box
        h, w = j1 - j0, i1 - i0
        if stride > 1 and h > 2 * stride and w > 2 * stride and stride <= _PAD:
            rows = _upsample_matrix(h, stride)
            cols = _upsample_matrix(w, stride)
            j_end = j0 + stride * (rows.shape[1] - 1) + 1
            i_end = i0 + stride * (cols.shape[1] - 1) + 1
            X, Y, Z = (a[j0:j_end:stride, i0:i_end:stride] for a in self.full[t])
            coarse = np.asarray(shape.sdf(X, Y, Z), dtype=np.float32)
            out = rows @ coarse @ cols.T
        else:
            X, Y, Z = (a[j0:j1, i0:i1] for a in self.full[t])
            out = np.asarray(shape.sdf(X, Y, Z), dtype=np.float32)
        self.cache[key] = out
        return out


def render(scene: Scene | list[Layer], plane: SlicePlane, sub_samples: int = 3) -> RenderResult:
    """Paint the layers of ``scene`` onto ``plane``; returns channel fractions and labels."""
    if not isinstance(scene, Scene):
        scene = Scene(scene)
    rows, cols = plane.shape
    fractions = np.zeros((N_CHANNELS, rows, cols), dtype=np.float32)
    labels = np.zeros((rows, cols), dtype=np.uint8)
    transmit = np.ones((rows, cols), dtype=np.float32)
    pixel = float(np.mean(plane.spacing))
    inv_ramp = np.float32(1.0 / pixel)
    if sub_samples > 1:
        offsets = ((np.arange(sub_samples) + 0.5) / sub_samples - 0.5) * plane.thickness
    else:
        offsets = np.zeros(1)
    sampler = _PlaneSampler(plane, np.unique(np.append(offsets, 0.0)))
    boxes = _pixel_boxes(scene, plane, margin_mm=1.0)
    for index in range(len(scene.layers) - 1, -1, -1):
        visible, j0, j1, i0, i1 = (int(v) for v in boxes[index])
        if not visible:
            continue
        seen = transmit[j0:j1, i0:i1]
        layer = scene.layers[index]
        if not layer.label and not layer_matters(seen):
            continue
        box = (j0, j1, i0, i1)
        samples = offsets if layer.through_plane else np.zeros(1)
        alpha = np.zeros((j1 - j0, i1 - i0), dtype=np.float32)
        for t in samples:
            sd = sampler.distance(layer.shape, layer.stride, box, float(t))
            a = np.float32(0.5) - (sd + np.float32(layer.inset)) * inv_ramp
            np.clip(a, 0.0, 1.0, out=a)
            alpha += a
        if len(samples) > 1:
            alpha *= np.float32(1.0 / len(samples))
        if not alpha.any():
            continue
        if layer.label:
            labels[j0:j1, i0:i1][alpha >= 0.5] = layer.label
        contribution = alpha * seen
        if layer.weight_fn is not None:
            patch = Patch(
                origin=plane.origin
                + j0 * plane.spacing[0] * plane.col_cosines
                + i0 * plane.spacing[1] * plane.row_cosines,
                step_row=plane.spacing[0] * plane.col_cosines,
                step_col=plane.spacing[1] * plane.row_cosines,
                shape=(j1 - j0, i1 - i0),
            )
            for channel, weight in layer.weight_fn(patch).items():
                fractions[channel, j0:j1, i0:i1] += contribution * weight
        else:
            for channel, value in scene.weights[index].items():
                fractions[channel, j0:j1, i0:i1] += contribution * np.float32(value)
        seen *= np.float32(1.0) - alpha
    return RenderResult(fractions, labels)


def layer_matters(transmittance: np.ndarray) -> bool:
    """Whether anything below the layers painted so far can still be seen in a region."""
    return bool(transmittance.max() > 1e-3)
