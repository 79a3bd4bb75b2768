"""Scanner vendors, their naming and header styles, and the protocol of a lumbar study.

A study is one routine lumbar spine examination on one scanner: a three-plane localizer,
sagittal T1 TSE, sagittal T2 TSE, sagittal STIR and an axial T2 TSE stack. Each vendor
names its series and fills its sequence attributes in its own way (Siemens ``t1_tse_sag``,
GE ``Sag T1 FSE``, Philips ``T1W_TSE_SAG``, Canon ``T1_FSE_SAG``); timing parameters follow
the vendor's typical routine protocol at the study's field strength, with per-study jitter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from train.phantom.geometry import SlicePlane, plan_stack, rotation
from train.phantom.options import SeriesKind, VendorName
from train.phantom.tissue import SequenceParams


@dataclass(frozen=True)
class SeriesStyle:
    """How a vendor names and describes one kind of series."""

    description: str
    sequence_name: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    image_type: tuple[str, ...]


@dataclass(frozen=True)
class VendorStyle:
    manufacturer: str
    models: dict[float, str]
    software: str
    coil: str
    study_description: str
    series_number_step: int  # Philips numbers series 101, 201, ...
    series: dict[SeriesKind, SeriesStyle]
    pixel_level: float  # stored value of the brightest common tissue at unit gain
    t1_tr: dict[float, float]
    t1_te: dict[float, float]
    refocus_flip: float


def _style(
    description: str,
    sequence_name: str,
    scanning: tuple[str, ...],
    variant: tuple[str, ...],
    options: tuple[str, ...],
    image_type: tuple[str, ...],
) -> SeriesStyle:
    return SeriesStyle(description, sequence_name, scanning, variant, options, image_type)


_SIEMENS_IT = ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D")
_GE_IT = ("ORIGINAL", "PRIMARY", "OTHER")
_PHILIPS_SE = ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")
_PHILIPS_IR = ("ORIGINAL", "PRIMARY", "M_IR", "M", "IR")
_PHILIPS_FFE = ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE")
_CANON_IT = ("ORIGINAL", "PRIMARY", "MR")

VENDOR_STYLES: Final[dict[VendorName, VendorStyle]] = {
    "siemens": VendorStyle(
        manufacturer="SIEMENS",
        models={1.5: "MAGNETOM Aera", 3.0: "MAGNETOM Skyra"},
        software="syngo MR E11",
        coil="SP1-4",
        study_description="Spine^LWS",
        series_number_step=1,
        series={
            "localizer": _style("localizer", "*fl2d1", ("GR",), ("SP", "OSP"), (), _SIEMENS_IT),
            "t1": _style("t1_tse_sag", "*tse2d1_3", ("SE",), ("SK", "SP", "OSP"), (), _SIEMENS_IT),
            "t2": _style(
                "t2_tse_sag", "*tse2d1_17", ("SE",), ("SK", "SP", "OSP"), ("PFP",), _SIEMENS_IT
            ),
            "stir": _style(
                "t2_tirm_sag",
                "*tir2d1_13",
                ("SE", "IR"),
                ("SK", "SP", "MP", "OSP"),
                ("IR",),
                _SIEMENS_IT,
            ),
            "axial_t2": _style(
                "t2_tse_tra", "*tse2d1_15", ("SE",), ("SK", "SP", "OSP"), (), _SIEMENS_IT
            ),
        },
        pixel_level=1100.0,
        t1_tr={1.5: 520.0, 3.0: 600.0},
        t1_te={1.5: 10.0, 3.0: 9.5},
        refocus_flip=150.0,
    ),
    "ge": VendorStyle(
        manufacturer="GE MEDICAL SYSTEMS",
        models={1.5: "Optima MR450w", 3.0: "DISCOVERY MR750w"},
        software="27\\LX\\MR Software release:DV26.0_R03",
        coil="CTL456",
        study_description="MR L SPINE WO CONTRAST",
        series_number_step=1,
        series={
            "localizer": _style("3-Plane Loc", "fgre", ("GR",), ("SS",), ("FAST_GEMS",), _GE_IT),
            "t1": _style(
                "Sag T1 FSE", "fse-xl", ("SE",), ("SK",), ("FAST_GEMS", "EDR_GEMS"), _GE_IT
            ),
            "t2": _style(
                "Sag T2 FRFSE", "frfse-xl", ("SE",), ("SK",), ("FAST_GEMS", "FR_GEMS"), _GE_IT
            ),
            "stir": _style(
                "Sag STIR", "fse-ir", ("SE", "IR"), ("SK", "MP"), ("IR_GEMS", "FAST_GEMS"), _GE_IT
            ),
            "axial_t2": _style(
                "Ax T2 FRFSE", "frfse-xl", ("SE",), ("SK",), ("FAST_GEMS", "FR_GEMS"), _GE_IT
            ),
        },
        pixel_level=2400.0,
        t1_tr={1.5: 500.0, 3.0: 580.0},
        t1_te={1.5: 9.0, 3.0: 9.0},
        refocus_flip=90.0,
    ),
    "philips": VendorStyle(
        manufacturer="Philips Medical Systems",
        models={1.5: "Ingenia", 3.0: "Achieva dStream"},
        software="5.4.1\\5.4.1.0",
        coil="dS Posterior",
        study_description="MR LUMBAR SPINE",
        series_number_step=100,
        series={
            "localizer": _style("Survey", "FFE", ("GR",), ("SP",), (), _PHILIPS_FFE),
            "t1": _style("T1W_TSE_SAG", "TSE", ("SE",), ("SK",), (), _PHILIPS_SE),
            "t2": _style("T2W_TSE_SAG", "TSE", ("SE",), ("SK",), (), _PHILIPS_SE),
            "stir": _style("STIR_TSE_SAG", "IR_TSE", ("SE", "IR"), ("SK", "MP"), (), _PHILIPS_IR),
            "axial_t2": _style("T2W_TSE_TRA", "TSE", ("SE",), ("SK",), (), _PHILIPS_SE),
        },
        pixel_level=1600.0,
        t1_tr={1.5: 480.0, 3.0: 560.0},
        t1_te={1.5: 8.5, 3.0: 8.5},
        refocus_flip=90.0,
    ),
    "canon": VendorStyle(
        manufacturer="CANON_MEC",
        models={1.5: "Vantage Orian", 3.0: "Vantage Galan 3T"},
        software="V6.0",
        coil="Spine",
        study_description="L-SPINE ROUTINE",
        series_number_step=1,
        series={
            "localizer": _style("Locator", "FE2D", ("GR",), ("SP",), (), _CANON_IT),
            "t1": _style("T1_FSE_SAG", "FSE2D", ("SE",), ("SK",), (), _CANON_IT),
            "t2": _style("T2_FSE_SAG", "FSE2D", ("SE",), ("SK",), (), _CANON_IT),
            "stir": _style("STIR_SAG", "FSE2D_IR", ("SE", "IR"), ("SK", "MP"), ("IR",), _CANON_IT),
            "axial_t2": _style("T2_FSE_AX", "FSE2D", ("SE",), ("SK",), (), _CANON_IT),
        },
        pixel_level=1900.0,
        t1_tr={1.5: 540.0, 3.0: 620.0},
        t1_te={1.5: 12.0, 3.0: 10.0},
        refocus_flip=160.0,
    ),
}


@dataclass(frozen=True, eq=False)
class SeriesProtocol:
    """Everything about one series except its pixels: naming, timing, geometry."""

    kind: SeriesKind
    series_number: int
    style: SeriesStyle
    sequence: SequenceParams
    echo_train_length: int
    flip_angle: float
    pixel_bandwidth: float
    averages: float
    planes: tuple[SlicePlane, ...]
    snr: float  # signal-to-noise of the brightest common tissue at unit coil sensitivity
    minutes_after_start: float
    grid: str  # name of the plane set (series sharing it share the rendered anatomy)

    @property
    def description(self) -> str:
        return self.style.description


@dataclass(frozen=True)
class _SagittalBlock:
    thickness: float
    spacing: float
    n_slices: int
    fov: float
    turn: np.ndarray

    @staticmethod
    def draw(rng: np.random.Generator) -> _SagittalBlock:
        thickness = float(rng.choice([3.0, 3.5, 4.0], p=[0.3, 0.2, 0.5]))
        factor = float(rng.choice([1.1, 1.2, 1.0], p=[0.6, 0.25, 0.15]))
        return _SagittalBlock(
            thickness=thickness,
            spacing=round(thickness * factor, 2),
            n_slices=int(rng.integers(11, 18)),
            fov=float(rng.choice([280.0, 300.0, 320.0])),
            turn=rotation(
                float(rng.normal(0, 2.0)), float(rng.normal(0, 1.5)), float(rng.normal(0, 2.0))
            ),
        )

    def planes(self, centre: np.ndarray, matrix: int) -> tuple[SlicePlane, ...]:
        return plan_stack(
            centre=centre, row_cosines=self.turn @ np.array([0.0, 1.0, 0.0]),
            col_cosines=self.turn @ np.array([0.0, 0.0, -1.0]), fov_mm=(self.fov, self.fov),
            matrix=(matrix, matrix), n_slices=self.n_slices, spacing_mm=self.spacing,
            thickness_mm=self.thickness,
        )  # fmt: skip

    def fitted(self, centre: np.ndarray, matrix: int, extent: np.ndarray) -> tuple[SlicePlane, ...]:
        """Planes whose field of view holds the labelled vertebrae (moved in-plane if not)."""
        planes = self.planes(centre, matrix)
        shift = _fit_in_view(planes, extent, margin_mm=6.0)
        return self.planes(centre + shift, matrix) if shift.any() else planes


def _fit_in_view(
    planes: tuple[SlicePlane, ...], points: np.ndarray, margin_mm: float
) -> np.ndarray:
    """In-plane shift (LPS) of a stack's centre that brings ``points`` inside the field of
    view with ``margin_mm`` to spare (zero when they already are)."""
    first = planes[0]
    rel = points - first.origin
    shift = np.zeros(3)
    for cosines, spacing, size in (
        (first.row_cosines, first.spacing[1], first.shape[1]),
        (first.col_cosines, first.spacing[0], first.shape[0]),
    ):
        along = rel @ cosines
        low, high = margin_mm, (size - 1) * spacing - margin_mm
        move = 0.0
        if along.min() < low:
            move = along.min() - low
        elif along.max() > high:
            move = along.max() - high
        shift += move * cosines
    return shift


def plan_study(
    rng: np.random.Generator,
    *,
    vendor: VendorName,
    field: float,
    matrix: int,
    landmarks: dict[str, np.ndarray],
    tilts: dict[str, float],
    kinds: tuple[SeriesKind, ...],
) -> tuple[SeriesProtocol, ...]:
    """Plan the study's series (all five are planned so that random draws do not depend on
    which are written; only ``kinds`` are returned), in acquisition order."""
    style = VENDOR_STYLES[vendor]
    high = field > 2.0
    snr_field = 1.7 if high else 1.0

    # Sagittal block centred between the spine and the back, at the L2-L3 level.
    spine = landmarks["L3"]
    sag_centre = np.array(
        [
            float(landmarks["mid_x"]) + rng.normal(0.0, 1.5),
            spine[1] + rng.normal(25.0, 12.0),
            (landmarks["L2"][2] + spine[2]) / 2.0 + rng.normal(0.0, 12.0),
        ]
    )
    extent = landmarks["labelled_extent"]
    t1_planes = _SagittalBlock.draw(rng).fitted(sag_centre, matrix, extent)
    separate_t2 = rng.random() < 0.3
    t2_rng = np.random.default_rng(rng.integers(0, 2**63))
    if separate_t2:
        shift = np.array([t2_rng.normal(0, 1.5), t2_rng.normal(0, 6.0), t2_rng.normal(0, 6.0)])
        t2_planes = _SagittalBlock.draw(t2_rng).fitted(sag_centre + shift, matrix, extent)
    else:
        t2_planes = t1_planes
    stir_planes = t1_planes if rng.random() < 0.7 else t2_planes

    # Axial stack perpendicular to L4, centred on the L4-L5 disc, covering L3 to S1.
    axial_tilt = tilts["L4"] + float(rng.normal(0, 3.0))
    axial_turn = rotation(float(rng.normal(0, 2.0)), 0.0, -axial_tilt)
    ax_centre = landmarks["L4-L5"] + np.array([0.0, 15.0, 0.0])
    ax_fov = float(rng.choice([180.0, 200.0, 220.0]))
    ax_planes = plan_stack(
        centre=ax_centre,
        row_cosines=axial_turn @ np.array([1.0, 0.0, 0.0]),
        col_cosines=axial_turn @ np.array([0.0, 1.0, 0.0]),
        fov_mm=(ax_fov, ax_fov), matrix=(matrix, matrix),
        n_slices=int(rng.integers(20, 31)), spacing_mm=float(rng.choice([4.4, 4.8, 5.0])),
        thickness_mm=4.0,
    )  # fmt: skip

    # Three-plane localizer: three sagittal, three coronal, three axial images.
    loc_centre = spine + np.array([0.0, 10.0, rng.normal(0.0, 20.0)])
    loc_fov = float(rng.choice([400.0, 450.0]))
    loc_gap = float(rng.choice([8.0, 10.0, 12.0]))
    loc_planes: tuple[SlicePlane, ...] = ()
    for row, col in (
        ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
        ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
        ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    ):
        loc_planes += plan_stack(
            centre=loc_centre, row_cosines=np.array(row), col_cosines=np.array(col),
            fov_mm=(loc_fov, loc_fov), matrix=(256, 256), n_slices=3, spacing_mm=loc_gap,
            thickness_mm=8.0,
        )  # fmt: skip

    tr1 = style.t1_tr[field] + float(rng.uniform(-10, 10))
    te1 = round(style.t1_te[field] + float(rng.uniform(-0.5, 0.5)), 1)
    tr2 = round(float(rng.uniform(3000, 4000)), -1)
    te2 = round(float(rng.uniform(88, 112)), 0)
    tr_stir = round(float(rng.uniform(3500, 5000)), -1)
    te_stir = round(float(rng.uniform(40, 70)), 0)
    ti = round(float(rng.uniform(165, 185) if high else rng.uniform(145, 160)), 0)
    tr_ax = round(float(rng.uniform(3500, 5000)), -1)
    te_ax = round(float(rng.uniform(90, 110)), 0)
    loc_flip = float(rng.choice([20.0, 25.0, 30.0]))
    loc_tr = round(float(rng.uniform(6.0, 9.0)), 2)
    loc_te = round(float(rng.uniform(2.0, 3.5)), 2)
    bandwidth = float(rng.choice([130.0, 180.0, 220.0, 250.0]))

    sagittal: tuple[SeriesKind, ...] = ("t1", "t2", "stir")
    order: list[SeriesKind] = [
        "localizer",
        *(sagittal[i] for i in rng.permutation(len(sagittal))),
        "axial_t2",
    ]
    minutes = np.cumsum([0.0, *rng.uniform(2.0, 4.5, 4)])
    refocus = style.refocus_flip
    Spec = tuple[SequenceParams, int, float, tuple[SlicePlane, ...], float, str]
    specs: dict[SeriesKind, Spec] = {
        "localizer": (SequenceParams("gre", loc_tr, loc_te, 0.0, loc_flip), 1, loc_flip,
                      loc_planes, 18.0, "localizer"),
        "t1": (SequenceParams("se", round(tr1, 0), te1), int(rng.integers(3, 6)), refocus,
               t1_planes, 30.0, "sagittal-a"),
        "t2": (SequenceParams("se", tr2, te2), int(rng.integers(15, 25)), refocus,
               t2_planes, 26.0, "sagittal-b" if separate_t2 else "sagittal-a"),
        "stir": (SequenceParams("ir", tr_stir, te_stir, ti), int(rng.integers(11, 18)), refocus,
                 stir_planes, 14.0, "sagittal-a" if stir_planes is t1_planes else "sagittal-b"),
        "axial_t2": (SequenceParams("se", tr_ax, te_ax), int(rng.integers(15, 21)), refocus,
                     ax_planes, 24.0, "axial"),
    }  # fmt: skip
    protocols = []
    for number, kind in enumerate(order, start=1):
        seq, etl, flip, planes, snr, grid = specs[kind]
        pixel = planes[0].spacing[0] * planes[0].spacing[1] * planes[0].thickness
        voxel_factor = float(np.sqrt(pixel / (0.94 * 0.94 * 4.0)))
        protocols.append(
            SeriesProtocol(
                kind=kind,
                series_number=number * style.series_number_step
                + (1 if style.series_number_step > 1 else 0),
                style=style.series[kind],
                sequence=seq,
                echo_train_length=etl,
                flip_angle=flip,
                pixel_bandwidth=bandwidth,
                averages=1.0 if kind != "stir" else 2.0,
                planes=planes,
                snr=snr * snr_field * voxel_factor * (1.4 if kind == "stir" else 1.0),
                minutes_after_start=float(minutes[number - 1]),
                grid=grid,
            )
        )
    return tuple(p for p in protocols if p.kind in kinds)
