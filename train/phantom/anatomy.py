"""Per-patient anatomy of the lumbar region as an ordered list of painted layers.

The spine is a chain of rigid vertebrae T10..S4 (T12..S1 carry the labels of
:mod:`pipeline.labels`) separated by discs whose wedge angles make the lordosis; the sacrum
continues with a kyphotic curve. Soft tissue that follows the spine (canal, thecal sac, cord
and cauda equina, vessels, psoas, back muscles, the torso and its subcutaneous fat) is a set of
tubes tabulated along the spine's centre line. Everything is in patient coordinates (LPS,
millimetres), so any image plane — sagittal, axial, coronal, oblique — can be rendered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from pipeline.labels import LABEL_OF
from train.phantom.latent import LEVEL_INDEX
from train.phantom.render import Layer, Patch, WeightFunction
from train.phantom.shapes import (
    FAR,
    Disc,
    Frame,
    Inset,
    Intersection,
    Shape,
    SuperEllipsoid,
    Tube,
    VertebralBody,
)
from train.phantom.tissue import CHANNEL

LEVELS: Final[tuple[str, ...]] = (
    "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3", "S4",
)  # fmt: skip
_IDX: Final[dict[str, int]] = {name: index for index, name in enumerate(LEVELS)}
_SACRAL_FROM: Final[int] = _IDX["S1"]

# Typical dimensions per level (mm): body height, AP depth, width; disc height below the level.
_HEIGHT: Final = np.array([21.0, 22.5, 24.0, 26.0, 27.0, 27.8, 27.8, 27.0, 26.0, 19.0, 15.0, 11.0])
_DEPTH: Final = np.array([27.0, 28.5, 30.0, 31.5, 33.0, 34.0, 35.0, 35.5, 34.0, 24.0, 18.0, 13.0])
_WIDTH: Final = np.array([36.0, 38.0, 40.0, 42.0, 44.0, 46.0, 48.0, 50.0, 46.0, 36.0, 28.0, 20.0])
_DISC: Final = np.array([5.5, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 10.5, 2.0, 1.5, 1.0])
# Segmental angles (degrees, lordosis positive) between consecutive bodies.
_SEGMENT_ANGLE: Final = np.array([-4.0, -3.0, -1.0, 4.0, 6.0, 9.0, 13.0, 18.0, -12.0, -12.0, -10.0])
_LORDOTIC: Final = slice(_IDX["L1"], _IDX["S1"])  # L1-2 .. L5-S1 segments
# Bony canal half-width / half-depth per level (mm).
_CANAL_X: Final = np.array([8.5, 9.0, 10.0, 11.0, 11.5, 12.0, 12.5, 13.0, 11.0, 8.0, 6.0, 4.0])
_CANAL_U: Final = np.array([7.5, 7.5, 8.0, 8.5, 8.5, 8.5, 8.5, 9.0, 7.0, 5.0, 4.0, 3.0])


@dataclass(frozen=True)
class VertebraSpec:
    """Marrow and lesion values of one vertebra, as the simulator needs them."""

    fat_fraction: float
    bone_fraction: float
    texture_scale_mm: float
    texture_amplitude: float
    texture_anisotropy: float
    cortex_mm: float
    fracture_loss: float = 0.0
    fracture_kind: str = ""  # "wedge" | "biconcave" | "crush"
    fracture_acute: bool = False
    haemangioma_mm: float = 0.0
    haemangioma_at: tuple[float, float, float] = (0.0, 0.0, 0.0)  # relative to half extents
    modic_top: int = 0  # 0 none, 1 oedema, 2 fatty
    modic_bottom: int = 0
    modic_mm: float = 4.0


@dataclass(frozen=True)
class AnatomySpec:
    """Everything random about one patient's anatomy (drawn by :func:`sample_anatomy`)."""

    centre: tuple[float, float, float]  # LPS of the L3 body centre
    size: float  # body size factor (men larger)
    height_factor: float
    depth_factor: float
    lordosis_factor: float
    sacral_slope_deg: float
    lateral_shift_mm: float  # scoliotic shift of the apex at L2-L3
    disc_degeneration: tuple[float, ...]  # per disc below T10..S1 (0 healthy .. 1 collapsed)
    stenosis: tuple[float, ...]  # per disc, narrowing of the thecal sac
    canal_scale: float
    conus_level: float  # fractional level index where the cord ends
    subcutaneous_fat_mm: float
    torso_half_width: float
    torso_half_depth: float
    back_muscle_depth: float
    muscle_fat: float  # fat fraction of the paraspinal muscles
    aorta_radius: float
    vertebrae: tuple[VertebraSpec, ...]  # T10..S4
    bowel: tuple[tuple[float, float, float, float, int], ...]  # (x, u, h, radius, content)
    root_seed: int


def sample_anatomy(
    rng: np.random.Generator,
    *,
    age: float,
    female: bool,
    fat_fraction: np.ndarray,
    bone_fraction: np.ndarray,
    fracture_loss: np.ndarray,
    fracture_acute: np.ndarray,
    texture: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> AnatomySpec:
    """Draw a patient's anatomy. Bone values are given for the labelled levels T12..S1."""
    aging = max(age - 40.0, 0.0) / 45.0
    size = float(rng.normal(1.0 if female else 1.05, 0.035))
    ff_all = np.empty(len(LEVELS))
    bvf_all = np.empty(len(LEVELS))
    labelled = [LEVEL_INDEX[name] for name in ("T12", "L1", "L2", "L3", "L4", "L5", "S1")]
    for level, source in zip(range(_IDX["T12"], _IDX["S1"] + 1), labelled, strict=True):
        ff_all[level] = fat_fraction[source]
        bvf_all[level] = bone_fraction[source]
    ff_all[: _IDX["T12"]] = fat_fraction[0] - rng.uniform(0.0, 0.03, _IDX["T12"])
    bvf_all[: _IDX["T12"]] = bone_fraction[0]
    ff_all[_IDX["S2"] :] = np.clip(fat_fraction[-1] + rng.uniform(0.03, 0.1, 3), 0.0, 0.95)
    bvf_all[_IDX["S2"] :] = bone_fraction[-1]

    scale, amplitude, anisotropy = texture
    tex_all = [np.empty(len(LEVELS)) for _ in range(3)]
    for k, values in enumerate((scale, amplitude, anisotropy)):
        for level, source in zip(range(_IDX["T12"], _IDX["S1"] + 1), labelled, strict=True):
            tex_all[k][level] = values[source]
        tex_all[k][: _IDX["T12"]] = values[0]
        tex_all[k][_IDX["S2"] :] = values[-1]

    n_discs = len(_DISC)
    degeneration = np.clip(
        aging * rng.uniform(0.0, 1.2, n_discs) * np.linspace(0.5, 1.3, n_discs), 0.0, 1.0
    )
    stenosis = np.where(
        np.arange(n_discs) >= _IDX["L3"],
        np.clip(aging * rng.uniform(0.0, 0.55, n_discs), 0.0, 0.6),
        0.0,
    )

    specs = []
    for level, name in enumerate(LEVELS):
        loss = acute = 0.0
        kind = ""
        if name in LABEL_OF and name != "S1":
            source = LEVEL_INDEX[name]
            loss = float(fracture_loss[source])
            acute = bool(fracture_acute[source])
            if loss > 0:
                kind = str(rng.choice(["wedge", "biconcave", "crush"], p=[0.6, 0.3, 0.1]))
        haem = 0.0
        haem_at = (0.0, 0.0, 0.0)
        if level < _SACRAL_FROM and rng.random() < 0.045 + 0.02 * aging:
            haem = float(rng.uniform(3.0, 8.5))
            x, u, h = (float(v) for v in rng.uniform(-0.35, 0.35, 3))
            haem_at = (x, u, h)
        modic_top = modic_bottom = 0
        if 0 < level <= _SACRAL_FROM:
            disc_above = level - 1
            if rng.random() < 0.6 * degeneration[disc_above] ** 2:
                modic_top = int(rng.choice([1, 2], p=[0.35, 0.65]))
        if level < _SACRAL_FROM and rng.random() < 0.6 * degeneration[level] ** 2:
            modic_bottom = int(rng.choice([1, 2], p=[0.35, 0.65]))
        bvf = float(bvf_all[level])
        specs.append(
            VertebraSpec(
                fat_fraction=float(ff_all[level]),
                bone_fraction=bvf,
                texture_scale_mm=float(tex_all[0][level]),
                texture_amplitude=float(tex_all[1][level]),
                texture_anisotropy=float(tex_all[2][level]),
                cortex_mm=float(np.clip(0.55 + 3.5 * bvf + rng.normal(0, 0.05), 0.5, 1.6)),
                fracture_loss=loss,
                fracture_kind=kind,
                fracture_acute=bool(acute),
                haemangioma_mm=haem,
                haemangioma_at=haem_at,
                modic_top=modic_top,
                modic_bottom=modic_bottom,
                modic_mm=float(rng.uniform(3.0, 8.0)),
            )
        )

    fat_mm = float(np.clip(rng.gamma(4.0, 6.0) + (5.0 if female else 0.0), 6.0, 70.0))
    bowel = []
    for _ in range(int(rng.integers(6, 12))):
        content = int(rng.choice([0, 1, 2], p=[0.5, 0.2, 0.3]))  # fluid, gas, faeces/organ
        bowel.append(
            (
                float(rng.uniform(-90, 90)),
                float(rng.uniform(-120, -55)),
                float(rng.uniform(-90, 60)),
                float(rng.uniform(9, 24)),
                content,
            )
        )
    return AnatomySpec(
        centre=(
            float(rng.normal(0.0, 8.0)),
            float(rng.normal(30.0, 12.0)),
            float(rng.uniform(-70.0, 70.0)),
        ),
        size=size,
        height_factor=float(rng.normal(1.0, 0.03)),
        depth_factor=float(rng.normal(1.0, 0.04)),
        lordosis_factor=float(np.clip(rng.normal(1.0, 0.2), 0.55, 1.5)),
        sacral_slope_deg=float(np.clip(rng.normal(40.0, 6.0), 28.0, 55.0)),
        lateral_shift_mm=float(rng.normal(0.0, 3.0 + 3.0 * aging)),
        disc_degeneration=tuple(float(v) for v in degeneration),
        stenosis=tuple(float(v) for v in stenosis),
        canal_scale=float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.25)),
        conus_level=float(np.clip(_IDX["L1"] + 0.3 + rng.normal(0.0, 0.35), 2.6, 4.3)),
        subcutaneous_fat_mm=fat_mm,
        torso_half_width=float(rng.uniform(140, 175) + 0.8 * fat_mm),
        torso_half_depth=float(rng.uniform(95, 120) + 0.9 * fat_mm),
        back_muscle_depth=float(
            rng.uniform(48, 66) * (1.0 if female else 1.12) * (1 - 0.15 * aging)
        ),
        muscle_fat=float(np.clip(0.05 + 0.22 * aging + rng.normal(0, 0.05), 0.02, 0.5)),
        aorta_radius=float(np.clip(9.5 + 2.5 * aging + rng.normal(0, 0.8), 8.0, 15.0)),
        vertebrae=tuple(specs),
        bowel=tuple(bowel),
        root_seed=int(rng.integers(0, 2**31 - 1)),
    )


@dataclass(frozen=True, eq=False)
class Union(Shape):
    """Union (minimum distance) of parts; parts that cannot reach the queried points are
    skipped."""

    parts: tuple[Shape, ...]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lows, highs = zip(*(part.bounds() for part in self.parts), strict=True)
        return np.min(lows, axis=0), np.max(highs, axis=0)

    def sdf(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        lo = np.array([X.min(), Y.min(), Z.min()]) - 4.0
        hi = np.array([X.max(), Y.max(), Z.max()]) + 4.0
        out = np.full(X.shape, FAR, dtype=np.float32)
        for part in self.parts:
            plo, phi = part.bounds()
            if np.any(plo > hi) or np.any(phi < lo):
                continue
            np.minimum(out, part.sdf(X, Y, Z), out=out)
        return out


@dataclass(frozen=True, eq=False)
class Vertebra:
    """A placed vertebra: its frame and body shape."""

    name: str
    index: int
    frame: Frame
    body: VertebralBody
    spec: VertebraSpec

    @property
    def label(self) -> int:
        return LABEL_OF.get(self.name, 0)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """A patient's anatomy: placed vertebrae and the painted layers in order."""

    spec: AnatomySpec
    vertebrae: tuple[Vertebra, ...]
    layers: tuple[Layer, ...]
    back_surface: Tube  # posterior skin (for the coil sensitivity)
    disc_centres: dict[str, np.ndarray]  # by "L4-L5" style names

    def centre_of(self, name: str) -> np.ndarray:
        return self.vertebrae[_IDX[name]].frame.origin.copy()

    @property
    def spine_x(self) -> float:
        """Mean left-right position of the bodies T12..S1."""
        return float(np.mean([v.frame.origin[0] for v in self.vertebrae[2:9]]))

    def landmarks(self) -> dict[str, np.ndarray]:
        """Body and disc centres by name, and ``mid_x`` (the spine's mean x) for planning."""
        marks = {v.name: v.frame.origin.copy() for v in self.vertebrae}
        marks.update({name: c.copy() for name, c in self.disc_centres.items()})
        marks["mid_x"] = np.array(self.spine_x)
        corners = []
        for v in self.vertebrae:
            if v.label:
                low, high = v.body.bounds()
                corners += [[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1])
                            for z in (low[2], high[2])]  # fmt: skip
        marks["labelled_extent"] = np.array(corners)
        return marks

    def tilts_deg(self) -> dict[str, float]:
        """Sagittal tilt of every body's axis from vertical (positive: lower end posterior)."""
        return {
            v.name: float(np.degrees(np.arctan2(v.frame.axes[1, 2], v.frame.axes[1, 1])))
            for v in self.vertebrae
        }

    def skin_y(self, z: np.ndarray) -> np.ndarray:
        """Posterior skin position (LPS y) at heights ``z``."""
        tube = self.back_surface
        return np.interp(z, tube.z, tube.y)


def _texture_weights(
    frame: Frame, spec: VertebraSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random Fourier features of a vertebra's marrow texture (wave vectors, phases, gains)."""
    m = 14
    directions = rng.standard_normal((m, 3))
    directions[:, 2] *= 1.0 - 0.85 * spec.texture_anisotropy
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelength = spec.texture_scale_mm * rng.uniform(0.7, 1.4, m)
    k = directions * (2.0 * np.pi / wavelength)[:, None]
    phase = rng.uniform(0, 2 * np.pi, m)
    gain = np.full(m, np.sqrt(2.0 / m))
    return k.astype(np.float32), phase.astype(np.float32), gain.astype(np.float32)


def plane_waves(
    patch: Patch, frame: Frame | None, k: np.ndarray, phase: np.ndarray, gain: np.ndarray
) -> np.ndarray:
    """``sum_m gain_m cos(k_m . p + phase_m)`` over a patch, ``p`` in the frame's local
    coordinates (or LPS without a frame); separable in rows and columns, so it costs two
    small complex matrix products instead of a cosine per pixel and wave."""
    origin, step_row, step_col = patch.origin, patch.step_row, patch.step_col
    if frame is not None:
        origin = frame.axes @ (origin - frame.origin)
        step_row = frame.axes @ step_row
        step_col = frame.axes @ step_col
    rows, cols = patch.shape
    start = k @ origin + phase
    along_rows = np.exp(1j * np.outer(np.arange(rows), k @ step_row))
    along_cols = np.exp(1j * np.outer(np.arange(cols), k @ step_col))
    return np.real((along_rows * (gain * np.exp(1j * start))) @ along_cols.T).astype(np.float32)


def _marrow_fn(frame: Frame, spec: VertebraSpec, rng: np.random.Generator) -> WeightFunction:
    k, phase, gain = _texture_weights(frame, spec, rng)
    ff0, bvf0, amp = spec.fat_fraction, spec.bone_fraction, spec.texture_amplitude
    fat_c, water_c, bone_c = CHANNEL["fat"], CHANNEL["marrow_water"], CHANNEL["bone"]

    def weights(patch: Patch) -> dict[int, np.ndarray]:
        tau = plane_waves(patch, frame, k, phase, gain)
        ff = np.clip(np.float32(ff0) + np.float32(amp) * tau, 0.02, 0.98)
        bvf = np.clip(np.float32(bvf0) * (1.0 - 0.45 * np.clip(tau, -1.5, 1.5)), 0.01, 0.5)
        marrow = 1.0 - bvf
        return {fat_c: marrow * ff, water_c: marrow * (1.0 - ff), bone_c: bvf}

    return weights


def _viscera_fn(rng: np.random.Generator) -> WeightFunction:
    """Abdominal content: organ tissue mixed with mesenteric fat and fluid at a few cm."""
    m = 10
    directions = rng.standard_normal((m, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    k = directions * (2.0 * np.pi / rng.uniform(25.0, 70.0, m))[:, None]
    phase = rng.uniform(0, 2 * np.pi, m)
    gain = np.full(m, np.sqrt(2.0 / m))
    k2 = directions[::-1] * (2.0 * np.pi / rng.uniform(15.0, 40.0, m))[:, None]
    organ_c, fat_c, fluid_c = CHANNEL["organ"], CHANNEL["fat"], CHANNEL["fluid"]

    def weights(patch: Patch) -> dict[int, np.ndarray]:
        a = plane_waves(patch, None, k, phase, gain)
        b = plane_waves(patch, None, k2, phase[::-1], gain)
        fat = np.clip(0.22 + 0.22 * a, 0.0, 0.8)
        fluid = np.clip(0.08 + 0.12 * b, 0.0, 0.4)
        return {organ_c: 1.0 - fat - fluid, fat_c: fat, fluid_c: fluid}

    return weights


def _marrow_weights(ff: float, bvf: float) -> dict[str, float]:
    return {"fat": (1 - bvf) * ff, "marrow_water": (1 - bvf) * (1 - ff), "bone": bvf}


class _Centreline:
    """The spine's centre line sampled every millimetre from above T10 to below S4."""

    def __init__(self, points: list[np.ndarray], tilts: list[float], levels: list[float]):
        pts = np.array(points)
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        s = np.concatenate([[0.0], np.cumsum(seg)])
        self.s = np.arange(0.0, s[-1], 1.0)
        self.x = np.interp(self.s, s, pts[:, 0])
        self.y = np.interp(self.s, s, pts[:, 1])
        self.z = np.interp(self.s, s, pts[:, 2])
        self.phi = np.interp(self.s, s, tilts)
        self.level = np.interp(self.s, s, levels)

    def tube(
        self,
        u_offset: np.ndarray | float,
        x_offset: np.ndarray | float,
        rx: np.ndarray | float,
        ry: np.ndarray | float,
        *,
        power: int = 2,
        vertical: bool = False,
    ) -> Tube:
        y = self.y + u_offset * np.cos(self.phi)
        z = self.z + u_offset * np.sin(self.phi)
        x = self.x + x_offset
        # Where the offset curve folds back (a large offset on the concave side of a bend)
        # only its first pass is kept, so that every height has one axis point.
        lowest = np.minimum.accumulate(np.concatenate([[np.inf], z[:-1]]))
        unfolded = z < lowest - 1e-3
        z, y, x = z[unfolded], y[unfolded], x[unfolded]
        radius_x = np.broadcast_to(rx, self.s.shape)[unfolded]
        radius_y = np.broadcast_to(ry, self.s.shape)[unfolded]
        phi = self.phi[unfolded]
        order = np.argsort(z, kind="stable")
        z, y, x = z[order], y[order], x[order]
        radius_x, radius_y = radius_x[order], radius_y[order]
        keep = np.concatenate([[True], np.diff(z) > 1e-3])
        cos_phi = np.ones_like(z) if vertical else np.cos(phi[order])
        return Tube(
            z=z[keep], x=x[keep], y=y[keep], cos_phi=cos_phi[keep],
            rx=radius_x[keep], ry=radius_y[keep],
            power=power,
        )  # fmt: skip

    def at(self, values: np.ndarray) -> np.ndarray:
        """Per-level values interpolated at each sample's fractional level."""
        return np.interp(self.level, np.arange(len(values)), values)

    def bump(self, centres: np.ndarray, amounts: np.ndarray, width: float) -> np.ndarray:
        out = np.zeros_like(self.s)
        for c, a in zip(centres, amounts, strict=True):
            out += a * np.exp(-(((self.level - c) / width) ** 2))
        return out


def build_anatomy(spec: AnatomySpec, rng: np.random.Generator) -> Anatomy:
    """Place the vertebrae and soft tissue of ``spec`` and list the layers to paint."""
    n = len(LEVELS)
    H = _HEIGHT * spec.size * spec.height_factor
    D = _DEPTH * spec.size * spec.depth_factor
    W = _WIDTH * spec.size
    lumbar = slice(_IDX["L1"], _IDX["L5"] + 1)
    H[lumbar] = np.clip(H[lumbar], 25.0, 30.0)
    D[lumbar] = np.clip(D[lumbar], 30.0, 38.0)
    degeneration = np.array(spec.disc_degeneration)
    gaps = _DISC * spec.size * (1.0 - 0.45 * degeneration)
    angles = _SEGMENT_ANGLE.copy()
    angles[_LORDOTIC] *= spec.lordosis_factor

    crush = np.zeros(n)
    wedge = np.zeros(n)
    bicon = np.zeros(n)
    for level, v in enumerate(spec.vertebrae):
        if v.fracture_loss > 0:
            amount = v.fracture_loss * H[level]
            if v.fracture_kind == "wedge":
                wedge[level] = amount
            elif v.fracture_kind == "biconcave":
                bicon[level] = amount / 2.0
            else:
                crush[level] = amount
    psi = np.degrees(np.arctan(wedge / np.maximum(D, 1.0)))

    # Tilt of every body: fixed at S1 by the sacral slope, accumulated upwards and downwards.
    phi = np.zeros(n)
    s1 = _IDX["S1"]
    phi[s1] = spec.sacral_slope_deg
    for level in range(s1 - 1, -1, -1):
        phi[level] = phi[level + 1] - angles[level] + psi[level + 1]
    for level in range(s1 + 1, n):
        phi[level] = phi[level - 1] + angles[level - 1]
    phi_rad = np.radians(phi)

    def up_axis(level: int) -> np.ndarray:
        return np.array([0.0, -np.sin(phi_rad[level]), np.cos(phi_rad[level])])

    top_c = H / 2.0 - crush / 2.0 - wedge / 2.0
    bottom_c = -H / 2.0 + crush / 2.0
    centres = np.zeros((n, 3))
    l3 = _IDX["L3"]
    centres[l3] = spec.centre
    for level in range(l3 + 1, n):
        above = level - 1
        mid = up_axis(above) + up_axis(level)
        mid /= np.linalg.norm(mid)
        bottom = centres[above] + bottom_c[above] * up_axis(above)
        centres[level] = bottom - gaps[above] * mid - top_c[level] * up_axis(level)
    for level in range(l3 - 1, -1, -1):
        below = level + 1
        mid = up_axis(level) + up_axis(below)
        mid /= np.linalg.norm(mid)
        top = centres[below] + top_c[below] * up_axis(below)
        centres[level] = top + gaps[level] * mid - bottom_c[level] * up_axis(level)
    # Scoliotic lateral shift, largest at L2-L3.
    centres[:, 0] += spec.lateral_shift_mm * np.exp(-(((np.arange(n) - 4.5) / 2.5) ** 2))

    vertebrae = []
    for level, name in enumerate(LEVELS):
        frame = Frame.sagittal(centres[level], phi_rad[level])
        v = spec.vertebrae[level]
        body = VertebralBody(
            frame=frame,
            half_width=W[level] / 2.0,
            half_depth=D[level] / 2.0,
            height=H[level],
            concavity=0.8 + 0.8 * max(0.0, 0.12 - v.bone_fraction) / 0.08,
            wedge=wedge[level],
            biconcave=bicon[level],
            crush=crush[level],
            corner=2.0 if level < s1 else 3.0,
        )
        vertebrae.append(Vertebra(name, level, frame, body, v))

    # Centre line through body tops, centres and bottoms.
    points: list[np.ndarray] = []
    tilts: list[float] = []
    levels: list[float] = []
    first = centres[0] + (top_c[0] + 160.0) * up_axis(0)
    points.append(first)
    tilts.append(phi_rad[0])
    levels.append(-4.0)
    for level in range(n):
        for offset, frac in ((top_c[level], -0.5), (0.0, 0.0), (bottom_c[level], 0.5)):
            points.append(centres[level] + offset * up_axis(level))
            tilts.append(phi_rad[level])
            levels.append(level + frac * 0.8)
    points.append(centres[-1] + (bottom_c[-1] - 120.0) * up_axis(n - 1))
    tilts.append(phi_rad[-1])
    levels.append(n - 1 + 4.0)
    line = _Centreline(points, tilts, levels)

    layers: list[Layer] = []
    D_s, W_s = line.at(D), line.at(W)
    canal_x = line.at(_CANAL_X) * spec.canal_scale
    canal_u = line.at(_CANAL_U) * spec.canal_scale
    canal_centre = D_s / 2.0 + 1.5 + canal_u
    sacral_end = np.clip((_IDX["S3"] - line.level) / 1.0, 0.0, 1.0)

    # Back muscles and torso (their posterior edge defines the skin line).
    muscle_depth = spec.back_muscle_depth * np.interp(
        line.level, [-4, 1, 3, 7, 8, 9, 10, 12, 15], [0.7, 0.8, 1.0, 1.0, 0.7, 0.45, 0.25, 0.1, 0.0]
    )
    muscle_u = canal_centre + canal_u + 5.0 + muscle_depth / 2.0
    back_edge = line.tube(muscle_u + muscle_depth / 2.0, 0.0, 1.0, 1.0)
    z_ext = np.arange(back_edge.z[0] - 250.0, back_edge.z[-1] + 250.0, 2.0)
    edge_y = np.interp(z_ext, back_edge.z, back_edge.y)
    kernel = np.exp(-0.5 * (np.arange(-30, 31) / 10.0) ** 2)
    kernel /= kernel.sum()
    padded = np.concatenate([np.full(30, edge_y[0]), edge_y, np.full(30, edge_y[-1])])
    skin_y = np.convolve(padded, kernel, mode="valid") + spec.subcutaneous_fat_mm
    x_mid = float(np.mean(centres[:, 0]))
    ones = np.ones_like(z_ext)
    torso = Tube(
        z=z_ext, x=ones * x_mid, y=skin_y - spec.torso_half_depth, cos_phi=ones,
        rx=ones * spec.torso_half_width, ry=ones * spec.torso_half_depth, power=2,
    )  # fmt: skip
    inner = Tube(
        z=z_ext, x=ones * x_mid, y=skin_y - spec.torso_half_depth, cos_phi=ones,
        rx=ones * (spec.torso_half_width - spec.subcutaneous_fat_mm),
        ry=ones * (spec.torso_half_depth - spec.subcutaneous_fat_mm), power=2,
    )  # fmt: skip
    back_surface = Tube(z=z_ext, x=ones * x_mid, y=skin_y, cos_phi=ones, rx=ones, ry=ones)
    layers.append(Layer("torso", torso, {"fat": 0.97, "skin": 0.03}, stride=4, through_plane=False))
    layers.append(
        Layer("viscera", inner, weight_fn=_viscera_fn(rng), stride=4,
              through_plane=False)
    )  # fmt: skip

    # Kidneys in perirenal fat, bowel loops.
    for side, drop in ((1.0, 0.0), (-1.0, 18.0)):
        c = vertebrae[_IDX["L1"]].frame.origin + np.array([0.0, 0.0, -drop])
        kframe = Frame(c + np.array([side * (W[3] / 2 + 42.0), 8.0, 0.0]), np.eye(3))
        layers.append(
            Layer("perirenal fat", SuperEllipsoid(kframe, (0, 0, 0), (34, 30, 66)), {"fat": 1.0},
                  stride=2, through_plane=False)
        )  # fmt: skip
        layers.append(
            Layer("kidney", SuperEllipsoid(kframe, (0, 0, 0), (24, 21, 54)),
                  {"organ": 0.75, "fluid": 0.25}, stride=2, through_plane=False)
        )  # fmt: skip
    l4 = vertebrae[_IDX["L4"]].frame
    for x, u, h, r, content in spec.bowel:
        weights = [{"fluid": 0.75, "organ": 0.25}, {}, {"organ": 0.7, "fat": 0.2, "fluid": 0.1}]
        layers.append(
            Layer("bowel", SuperEllipsoid(l4, (x, u, h), (r, r * 0.8, r * 1.2)), weights[content],
                  stride=2, through_plane=False)
        )  # fmt: skip

    # Prevertebral fat, vessels, psoas, back muscles.
    zero = np.zeros_like(line.s)
    fat_pad = line.tube(-D_s / 2.0 - 8.0, zero, np.full_like(zero, 40.0), np.full_like(zero, 16.0))
    layers.append(
        Layer("prevertebral fat", fat_pad, {"fat": 0.85, "organ": 0.15}, stride=2,
              through_plane=False)
    )  # fmt: skip
    muscle_w = {"muscle": 1.0 - spec.muscle_fat, "fat": spec.muscle_fat}
    psoas_rx = np.interp(line.level, [2, 3, 5, 7, 8, 9.5], [0, 6, 14, 20, 22, 0])
    psoas_ru = np.interp(line.level, [2, 3, 5, 7, 8, 9.5], [0, 8, 16, 22, 24, 0])
    for side in (1.0, -1.0):
        psoas = line.tube(-0.15 * D_s, side * (W_s / 2.0 + psoas_rx - 3.0), psoas_rx, psoas_ru)
        layers.append(Layer("psoas", psoas, muscle_w, stride=2, through_plane=False))
    back = line.tube(
        muscle_u, zero, np.full_like(zero, 75.0) * np.clip(muscle_depth / 20.0, 0.0, 1.0),
        muscle_depth / 2.0,
    )  # fmt: skip
    layers.append(Layer("back muscles", back, muscle_w, stride=2, through_plane=False))
    aorta_r = spec.aorta_radius * np.clip((_IDX["L4"] + 0.2 - line.level) / 0.4, 0.0, 1.0)
    aorta = line.tube(
        -(D_s / 2.0 + 3.0 + spec.aorta_radius), 14.0 + 0.6 * line.level, aorta_r, aorta_r
    )
    layers.append(Layer("aorta", aorta, {"vessel": 1.0}, stride=2))
    ivc_r = np.clip((_IDX["L5"] - 0.2 - line.level) / 0.4, 0.0, 1.0)
    ivc = line.tube(-(D_s / 2.0 + 8.0), -19.0 + zero, 11.0 * ivc_r, 7.0 * ivc_r)
    layers.append(Layer("vena cava", ivc, {"vessel": 1.0}, stride=2))
    for side in (1.0, -1.0):
        iliac_r = 5.5 * np.clip((line.level - _IDX["L4"]) / 0.3, 0.0, 1.0) * sacral_end
        spread = 14.0 + side * 6.0 + side * 12.0 * np.clip(line.level - _IDX["L4"], 0.0, 4.0)
        iliac = line.tube(-(D_s / 2.0 + 6.0), spread, iliac_r, iliac_r)
        layers.append(Layer("iliac vessel", iliac, {"vessel": 1.0}, stride=2))

    # Canal: epidural fat, thecal sac (CSF) with stenosis at degenerated discs, cord, roots.
    bony = line.tube(canal_centre, zero, canal_x * sacral_end, canal_u * sacral_end)
    layers.append(Layer("epidural fat", bony, {"fat": 0.9, "fluid": 0.1}))
    disc_levels = np.arange(len(_DISC)) + 0.5
    narrowing = line.bump(disc_levels, np.array(spec.stenosis), 0.16)
    sac_end = np.clip((_IDX["S2"] - 0.2 - line.level) / 0.8, 0.0, 1.0)
    sac_rx = (canal_x - 1.8) * sac_end
    sac_ru = (canal_u - 1.6) * (1.0 - narrowing) * sac_end
    sac_u = canal_centre - 1.0 - 0.5 * narrowing * canal_u
    sac = line.tube(sac_u, zero, sac_rx, sac_ru)
    layers.append(Layer("thecal sac", sac, {"csf": 1.0}))
    cord_r = np.clip((spec.conus_level - line.level) / 0.7, 0.0, 1.0)
    cord = line.tube(sac_u - 0.5, zero, 4.6 * cord_r, 3.6 * cord_r)
    layers.append(Layer("spinal cord", cord, {"nerve": 1.0}, stride=1))
    root_rng = np.random.default_rng(spec.root_seed)
    below_conus = np.clip((line.level - spec.conus_level + 0.4) / 0.3, 0.0, 1.0)
    for theta in np.linspace(0.25, np.pi - 0.25, 8):
        fx = 0.62 * np.cos(theta) + root_rng.normal(0, 0.05)
        fu = 0.15 + 0.5 * np.sin(theta) + root_rng.normal(0, 0.05)
        r = float(root_rng.uniform(0.9, 1.3))
        exit_level = float(root_rng.uniform(_IDX["L3"], _IDX["S2"]))
        present = below_conus * np.clip((exit_level - line.level) / 0.3, 0.0, 1.0)
        root = line.tube(sac_u + fu * sac_ru, fx * sac_rx, r * present, r * present)
        layers.append(Layer("cauda equina", root, {"nerve": 1.0}, stride=1))

    # Discs (annulus, then nucleus graded by degeneration).
    disc_centres: dict[str, np.ndarray] = {}
    for k in range(len(_DISC)):
        upper, lower = vertebrae[k], vertebrae[k + 1]
        u_axis = (up_axis(k) + up_axis(k + 1)) / 2.0
        tilt = float(np.arctan2(-u_axis[1], u_axis[2]))
        bottom = upper.frame.origin + bottom_c[k] * up_axis(k)
        top = lower.frame.origin + top_c[k + 1] * up_axis(k + 1)
        frame = Frame.sagittal((bottom + top) / 2.0, tilt)
        disc_centres[f"{LEVELS[k]}-{LEVELS[k + 1]}"] = frame.origin.copy()
        g = degeneration[k]
        disc = Disc(
            frame=frame, upper=upper.frame, lower=lower.frame,
            upper_half_height=-bottom_c[k], lower_half_height=top_c[k + 1],
            half_width=(W[k] + W[k + 1]) / 4.0, half_depth=(D[k] + D[k + 1]) / 4.0,
            gap=gaps[k], bulge=1.0 + 2.5 * g if k < s1 else 0.0,
        )  # fmt: skip
        layers.append(Layer("annulus", disc, {"annulus": 1.0}))
        if k < s1:
            nucleus = SuperEllipsoid(
                frame, (0.0, 0.08 * D[k], 0.0),
                (0.55 * W[k] / 2, 0.42 * D[k] / 2, max(0.32 * gaps[k], 1.2)),
            )  # fmt: skip
            layers.append(
                Layer("nucleus", nucleus, {"nucleus": 1.0 - 0.85 * g, "annulus": 0.85 * g})
            )

    # Posterior elements of each vertebra (one union per vertebra), then the bodies.
    for vert in vertebrae:
        level = vert.index
        f = vert.frame
        b = D[level] / 2.0
        a = W[level] / 2.0
        h = H[level]
        cx, cu = _CANAL_X[level] * spec.canal_scale, _CANAL_U[level] * spec.canal_scale
        uc = b + 1.5 + cu
        parts: list[Shape] = []
        if level < s1:
            parts += [
                SuperEllipsoid(f, (s * (cx + 3.5), (b + uc) / 2.0 + 1.0, h / 2 - 8.0),
                               (4.5, (uc - b) / 2.0 + 4.0, 6.5), power=2)
                for s in (1.0, -1.0)
            ]  # fmt: skip
            parts.append(
                SuperEllipsoid(f, (0.0, uc + cu + 3.0, -2.0), (cx + 6.0, 3.2, h / 2.0 - 1.0),
                               power=4, shear=-0.3)
            )  # fmt: skip
            spin_len = 14.0 + 0.5 * h
            parts.append(
                SuperEllipsoid(f, (0.0, uc + cu + 5.0 + spin_len / 2.0, -h / 2.0 + 2.0),
                               (3.2, spin_len / 2.0, 8.5), power=4, shear=-0.35)
            )  # fmt: skip
            parts += [
                SuperEllipsoid(f, (s * (cx + 5.0), uc + 2.0, -h / 2.0 - gaps[level] / 2.0),
                               (5.0, 6.0, 9.0), power=2)
                for s in (1.0, -1.0)
            ]  # fmt: skip
            parts += [
                SuperEllipsoid(f, (s * (cx + 22.0), uc - 2.0, h / 2.0 - 10.0), (17.0, 3.5, 4.0),
                               power=4)
                for s in (1.0, -1.0)
            ]  # fmt: skip
        else:
            crest = max(2.5, 6.0 - 1.5 * (level - s1))
            parts.append(
                SuperEllipsoid(f, (0.0, uc + cu + 3.0, 0.0), (cx + 8.0, crest, h / 2.0 + 1.0),
                               power=4)
            )  # fmt: skip
            wing = max(12.0, 34.0 - 8.0 * (level - s1))
            parts += [
                SuperEllipsoid(f, (s * (a + wing / 2.0 - 4.0), 0.1 * b, 0.0),
                               (wing / 2.0 + 3.0, b * 0.8, h / 2.0 + 1.0), power=4)
                for s in (1.0, -1.0)
            ]  # fmt: skip
        union = Union(tuple(parts))
        v = vert.spec
        pe_ff = float(np.clip(v.fat_fraction + 0.06, 0.05, 0.95))
        layers.append(Layer("posterior elements", union, {"bone": 1.0}))
        layers.append(Layer("posterior marrow", union, _marrow_weights(pe_ff, 0.22), inset=1.4))

    for vert in vertebrae:
        v = vert.spec
        layers.append(Layer(f"{vert.name} cortex", vert.body, {"bone": 1.0}, label=vert.label))
        fn = _marrow_fn(vert.frame, v, rng)
        layers.append(Layer(f"{vert.name} marrow", vert.body, inset=v.cortex_mm, weight_fn=fn))
        b, a, h = vert.body.half_depth, vert.body.half_width, vert.body.height
        f = vert.frame
        interior = Inset(vert.body, v.cortex_mm)

        def inside(shape: Shape, interior: Shape = interior) -> Shape:
            return Intersection(shape, interior)

        layers.append(
            Layer("basivertebral vein",
                  inside(SuperEllipsoid(f, (0.0, b - 4.0, 0.0), (3.0, 4.5, 1.6))),
                  {"fluid": 0.55, "fat": 0.35, "bone": 0.1})
        )  # fmt: skip
        modic = {
            1: {"oedema": 0.5, "marrow_water": 0.15, "fat": 0.25, "bone": 0.1},
            2: {"fat": 0.82, "marrow_water": 0.08, "bone": 0.1},
        }
        top = h / 2.0 - vert.body.crush / 2.0
        for kind, sign in ((v.modic_top, 1.0), (v.modic_bottom, -1.0)):
            if kind:
                centre_h = sign * (top - v.modic_mm / 2.0)
                band = SuperEllipsoid(
                    f, (0.0, -0.1 * b, centre_h), (0.8 * a, 0.75 * b, v.modic_mm / 2.0 + 1.0),
                    power=4,
                )  # fmt: skip
                layers.append(Layer("modic change", inside(band), modic[kind]))
        if v.fracture_acute:
            band = SuperEllipsoid(f, (0.0, 0.0, top - 0.3 * h), (0.85 * a, 0.85 * b, 0.32 * h),
                                  power=4)  # fmt: skip
            layers.append(
                Layer("fracture oedema", inside(band),
                      {"oedema": 0.5, "marrow_water": 0.15, "fat": 0.25, "bone": 0.1})
            )  # fmt: skip
        if v.haemangioma_mm > 0:
            rel = v.haemangioma_at
            lesion = SuperEllipsoid(
                f, (rel[0] * a, rel[1] * b, rel[2] * h),
                (v.haemangioma_mm, v.haemangioma_mm, v.haemangioma_mm),
            )  # fmt: skip
            layers.append(
                Layer("haemangioma", inside(lesion), {"fat": 0.55, "fluid": 0.3, "bone": 0.15})
            )

    return Anatomy(spec, tuple(vertebrae), tuple(layers), back_surface, disc_centres)
