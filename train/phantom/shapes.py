"""Signed-distance shapes in patient coordinates, the building blocks of the anatomy.

Every shape returns an approximate signed distance in millimetres (negative inside) for
arrays of LPS coordinates, and an axis-aligned bounding box so that the renderer only
evaluates the pixels it can touch. Rigid bony parts live in a :class:`Frame` (a vertebra's
local axes: lateral ``x``, posterior ``u``, superior ``h``); soft tissue that follows the
spine's curve is a :class:`Tube` whose axis and radii are tabulated against height.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

FAR = 1e3
"""Distance reported for points certainly outside a shape."""


@dataclass(frozen=True, eq=False)
class Frame:
    """Local axes of a rigid part: rows of ``axes`` are the unit vectors of ``x`` (towards
    the patient's left), ``u`` (posterior) and ``h`` (superior), in LPS."""

    origin: np.ndarray
    axes: np.ndarray

    @staticmethod
    def sagittal(origin: np.ndarray, tilt_rad: float) -> Frame:
        """A frame whose ``h`` axis leans by ``tilt_rad`` in the sagittal plane (positive:
        the part's lower end lies more posterior)."""
        s, c = np.sin(tilt_rad), np.cos(tilt_rad)
        axes = np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])
        return Frame(np.asarray(origin, dtype=np.float64), axes)

    def to_local(
        self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dx, dy, dz = X - self.origin[0], Y - self.origin[1], Z - self.origin[2]
        a = self.axes
        return (
            a[0, 0] * dx + a[0, 1] * dy + a[0, 2] * dz,
            a[1, 0] * dx + a[1, 1] * dy + a[1, 2] * dz,
            a[2, 0] * dx + a[2, 1] * dy + a[2, 2] * dz,
        )

    def to_world(self, local: np.ndarray) -> np.ndarray:
        """LPS coordinates of ``(..., 3)`` local points."""
        return self.origin + np.asarray(local) @ self.axes

    def box_bounds(self, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array(
            [
                [x, u, h]
                for x in (low[0], high[0])
                for u in (low[1], high[1])
                for h in (low[2], high[2])
            ]
        )
        world = self.to_world(corners)
        return world.min(axis=0), world.max(axis=0)


def _sq(v: np.ndarray) -> np.ndarray:
    """Fourth power (the exponent of box-like super-ellipses)."""
    v2 = v * v
    return v2 * v2


def _radial_sd(r: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Distance along the ray from the centre: ``r (1 - 1 / rho)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = r - r / np.maximum(rho, 1e-9)
    return out


class Shape:
    """Base class: ``bounds()`` in LPS and ``sdf(X, Y, Z)`` in millimetres.

    Subclasses implement ``_bounds``; ``bounds`` caches it (shapes are immutable)."""

    @functools.cached_property
    def _cached_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self._bounds()

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self._cached_bounds

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sdf(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class SuperEllipsoid(Shape):
    """``(|x/a|^p + |u/b|^p + |h/c|^p)^(1/p) <= 1`` around ``centre`` (local), optionally
    sheared (``h += shear * u``) so plates can slope."""

    frame: Frame
    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    power: int = 2  # 2 (ellipsoid) or 4 (rounded box)
    shear: float = 0.0

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        c, r = np.asarray(self.centre), np.asarray(self.half)
        extra = abs(self.shear) * r[1]
        return self.frame.box_bounds(c - r - [0, 0, extra], c + r + [0, 0, extra])

    def sdf(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        x, u, h = self.frame.to_local(X, Y, Z)
        x = x - self.centre[0]
        u = u - self.centre[1]
        h = h - self.centre[2] + self.shear * u
        a, b, c = self.half
        xa, ub, hc = x * np.float32(1.0 / a), u * np.float32(1.0 / b), h * np.float32(1.0 / c)
        q = xa * xa + ub * ub + hc * hc if self.power == 2 else _sq(xa) + _sq(ub) + _sq(hc)
        rho = np.sqrt(q) if self.power == 2 else np.sqrt(np.sqrt(q))
        return _radial_sd(np.sqrt(x * x + u * u + h * h), rho)


@dataclass(frozen=True, eq=False)
class VertebralBody(Shape):
    """A vertebral body: a kidney-shaped cross-section (flatter posterior wall) extruded
    between two endplates that may be concave, wedged (anterior collapse) or biconcave.

    ``wedge`` and ``biconcave`` are height losses in millimetres of a compression fracture.
    """

    frame: Frame
    half_width: float
    half_depth: float
    height: float
    concavity: float = 1.0
    wedge: float = 0.0
    biconcave: float = 0.0
    crush: float = 0.0
    corner: float = 2.0

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = np.array([self.half_width, self.half_depth, self.height / 2.0]) + 1.0
        return self.frame.box_bounds(-r, r)

    def axial(self, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius ``rho`` of the cross-section and its radial distance."""
        xa = np.abs(x) / self.half_width
        ub = np.abs(u) / self.half_depth
        rho_front = np.sqrt(xa * xa + ub * ub)
        ub2 = ub * ub
        rho_back = np.sqrt(np.sqrt(xa**4 + ub2 * ub2))
        rho = np.where(u < 0, rho_front, rho_back)
        return rho, _radial_sd(np.sqrt(x * x + u * u), rho)

    def endplates(
        self, x: np.ndarray, u: np.ndarray, rho: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        q = 1.0 - np.minimum(rho, 1.0) ** 2
        dip = (self.concavity + self.biconcave) * q
        top = self.height / 2.0 - dip - self.crush / 2.0
        bottom = -self.height / 2.0 + dip + self.crush / 2.0
        if self.wedge:
            front = np.clip(0.5 - u / (2.0 * self.half_depth), 0.0, 1.0)
            top = top - self.wedge * front
        return top, bottom

    def sdf(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        x, u, h = self.frame.to_local(X, Y, Z)
        return self.sdf_local(x, u, h)

    def sdf_local(self, x: np.ndarray, u: np.ndarray, h: np.ndarray) -> np.ndarray:
        rho, sd_axial = self.axial(x, u)
        top, bottom = self.endplates(x, u, rho)
        sd_h = np.maximum(h - top, bottom - h)
        rc = self.corner
        qa = sd_axial + rc
        qh = sd_h + rc
        outside = np.hypot(np.maximum(qa, 0.0), np.maximum(qh, 0.0))
        return outside + np.minimum(np.maximum(qa, qh), 0.0) - rc


@dataclass(frozen=True, eq=False)
class Disc(Shape):
    """An intervertebral disc: the space between the lower endplate plane of the body above
    and the upper endplate plane of the body below, with a cross-section that bulges by
    ``bulge`` millimetres at mid-height. Painted before the bodies, which cover the overlap."""

    frame: Frame  # mid-disc frame
    upper: Frame
    lower: Frame
    upper_half_height: float
    lower_half_height: float
    half_width: float
    half_depth: float
    gap: float
    bulge: float

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = np.array(
            [self.half_width + self.bulge + 1, self.half_depth + self.bulge + 1, self.gap / 2 + 8]
        )
        return self.frame.box_bounds(-r, r)

    def sdf(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        x, u, h = self.frame.to_local(X, Y, Z)
        t = np.clip(h / max(self.gap / 2.0, 0.5), -1.0, 1.0)
        grow = self.bulge * (1.0 - t * t)
        a = self.half_width + grow
        b = self.half_depth + grow
        xa, ub = np.abs(x) / a, np.abs(u) / b
        rho = np.where(u < 0, np.sqrt(xa * xa + ub * ub), np.sqrt(np.sqrt(xa**4 + ub**4)))
        sd_axial = _radial_sd(np.sqrt(x * x + u * u), rho)
        _, _, h_up = self.upper.to_local(X, Y, Z)
        _, _, h_low = self.lower.to_local(X, Y, Z)
        sd_top = h_up - (-self.upper_half_height + 3.0)
        sd_bottom = (self.lower_half_height - 3.0) - h_low
        return np.maximum(sd_axial, np.maximum(sd_top, sd_bottom))


@dataclass(frozen=True, eq=False)
class Tube(Shape):
    """A soft-tissue tube along the spine: its axis ``(x(z), y(z))``, the axis' tilt from
    vertical ``cos(phi(z))`` and the radii are tabulated against ascending ``z``. Outside the
    tabulated range (or where a radius is zero) the tube is absent."""

    z: np.ndarray
    x: np.ndarray
    y: np.ndarray
    cos_phi: np.ndarray
    rx: np.ndarray
    ry: np.ndarray
    power: int = 2  # 2 (ellipse) or 4 (rounded rectangle)

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = np.maximum(self.rx, self.ry)
        present = reach > 0.05
        if not present.any():
            low = high = np.zeros(3)
        else:
            xs, ys, zs = self.x[present], self.y[present], self.z[present]
            r = reach[present]
            rxp = self.rx[present]
            low = np.array([(xs - rxp).min(), (ys - r).min(), zs.min() - r.max()])
            high = np.array([(xs + rxp).max(), (ys + r).max(), zs.max() + r.max()])
        return low, high

    def sdf(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        xc = np.interp(Z, self.z, self.x)
        yc = np.interp(Z, self.z, self.y)
        cp = np.interp(Z, self.z, self.cos_phi)
        rx = np.interp(Z, self.z, self.rx)
        ry = np.interp(Z, self.z, self.ry)
        dx = X - xc
        dy = (Y - yc) * cp
        absent = (np.minimum(rx, ry) < 0.05) | (self.z[0] > Z) | (self.z[-1] < Z)
        xa = dx / np.maximum(rx, 0.05)
        yb = dy / np.maximum(ry, 0.05)
        q = xa * xa + yb * yb if self.power == 2 else np.sqrt(_sq(xa) + _sq(yb))
        sd = _radial_sd(np.sqrt(dx * dx + dy * dy), np.sqrt(q))
        return np.where(absent, FAR, sd)


@dataclass(frozen=True, eq=False)
class Inset(Shape):
    """``shape`` shrunk by ``mm`` millimetres."""

    shape: Shape
    mm: float

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.shape.bounds()

    def sdf(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        return self.shape.sdf(X, Y, Z) + np.float32(self.mm)


@dataclass(frozen=True, eq=False)
class Intersection(Shape):
    """Points inside both shapes; bounds are those of ``first`` (the smaller one)."""

    first: Shape
    second: Shape

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.first.bounds()

    def sdf(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
        return np.maximum(self.first.sdf(X, Y, Z), self.second.sdf(X, Y, Z))
