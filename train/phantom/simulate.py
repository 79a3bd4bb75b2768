"""Simulate one patient's lumbar MRI study in memory (:func:`simulate_patient`).

The result holds, for every series, the stored pixel values as written to DICOM, its image
planes and — for the sagittal series — the ground-truth label map on the exact same grid,
together with the patient's latent values. Training code can use it directly; the DICOM
writer (:mod:`train.phantom.dicomio`) writes exactly these arrays.

Randomness is drawn from independent streams keyed by ``(seed, index, purpose)``, so a
patient does not depend on the size of the cohort, and the pixels of a series do not depend
on which other series are simulated.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.labels import CSF_LABEL, VERTEBRAE
from pipeline.volume import Geometry
from train.phantom.anatomy import LEVELS, Anatomy, build_anatomy, sample_anatomy
from train.phantom.geometry import SlicePlane, stack_geometry
from train.phantom.latent import (
    LEVEL_INDEX,
    BoneSample,
    dxa_class,
    prevalence_offset,
    sample_bone,
    texture_parameters,
)
from train.phantom.options import PHANTOM_VERSION, CohortOptions, SeriesKind, VendorName
from train.phantom.protocol import VENDOR_STYLES, SeriesProtocol, plan_study
from train.phantom.render import RenderResult, Scene, interp_matrix, render
from train.phantom.tissue import CHANNEL, channel_signals

_STREAMS: Final[dict[str, int]] = {
    "bone": 1,
    "anatomy": 2,
    "texture": 3,
    "study": 4,
    "protocol": 5,
    "numbering": 6,
    "physiology": 7,
    "noise": 16,
}
_KIND_INDEX: Final[dict[str, int]] = {"localizer": 0, "t1": 1, "t2": 2, "stir": 3, "axial_t2": 4}
_MAX_STORED: Final[int] = 4095  # 12 bits stored


def _rng(seed: int, index: int, stream: str, sub: int = 0) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(index, _STREAMS[stream], sub))
    )


def shaping_key(options: CohortOptions) -> str:
    """Digest of the options that shape a patient (part of every UID's entropy)."""
    text = repr(
        (
            PHANTOM_VERSION,
            round(options.prevalence, 6),
            options.vendors,
            options.field_strengths,
            options.matrix,
            round(options.female_fraction, 6),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_UID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:opmri-node:synthetic-cohort")


def derived_uid(*parts: object) -> str:
    """A deterministic UID in the ``2.25`` (UUID) form, from a name-based (SHA-1) UUID of
    ``parts`` (PS3.5 B.2)."""
    name = "\x1f".join(str(part) for part in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def phantom_uid(options: CohortOptions, index: int, *parts: object) -> str:
    """A deterministic UID for the patient ``index`` of a cohort: the same seed, options and
    parts always give the same UID, different ones practically never do."""
    return derived_uid(shaping_key(options), options.seed, index, *parts)


@dataclass(frozen=True)
class VertebraTruth:
    """Latent values of one labelled vertebra (T12..S1)."""

    name: str
    bmd_t: float  # latent density, T-score units
    fat_fraction: float  # noise-free marrow PDFF (0..1)
    bone_fraction: float  # trabecular bone volume fraction
    texture_scale_mm: float
    texture_amplitude: float
    texture_anisotropy: float
    fracture: str  # "" | "wedge" | "biconcave" | "crush"
    fracture_loss: float
    fracture_acute: bool
    haemangioma_mm: float
    modic: int  # highest Modic type at either endplate (0 none)


@dataclass(frozen=True)
class PatientTruth:
    """The patient's latent values and the DXA result."""

    age: int
    sex: str  # "F" | "M"
    t_patient: float
    t_score: float  # DXA (lowest valid of L1-L4)
    dxa_levels: Mapping[str, float]  # DXA T-score per level L1..L4
    vertebrae: tuple[VertebraTruth, ...]  # T12..S1

    @property
    def dxa_class(self) -> str:
        return dxa_class(self.t_score)

    @property
    def osteoporosis(self) -> bool:
        return self.dxa_class == "osteoporosis"

    def level(self, name: str) -> VertebraTruth:
        return self.vertebrae[LEVEL_INDEX[name]]


@dataclass(frozen=True)
class StudyInfo:
    """Patient, study and equipment attributes of the simulated examination."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    age: int
    weight_kg: float
    height_m: float
    study_uid: str
    frame_of_reference_uid: str
    study_date: str
    study_time: str
    accession: str
    study_id: str
    vendor: VendorName
    manufacturer: str
    model: str
    software: str
    field_strength: float
    imaging_frequency: float
    device_serial: str
    institution: str
    station: str
    study_description: str
    receive_coil: str


@dataclass(frozen=True, eq=False)
class SimulatedSeries:
    """One series: ``pixels[k, j, i]`` are the stored values (uint16), ``k`` following the
    planes, which for stacks are sorted by ascending position along the slice normal (the
    convention of :mod:`pipeline.labels`). ``labelmap`` is the ground truth on the same grid
    (sagittal series), ``geometry`` the stack geometry (``None`` for the localizer, whose
    images lie in three planes)."""

    protocol: SeriesProtocol
    series_uid: str
    sop_instance_uids: tuple[str, ...]
    instance_numbers: tuple[int, ...]
    pixels: np.ndarray
    labelmap: np.ndarray | None
    geometry: Geometry | None

    def __post_init__(self) -> None:
        self.pixels.setflags(write=False)
        if self.labelmap is not None:
            self.labelmap.setflags(write=False)

    @property
    def kind(self) -> SeriesKind:
        return self.protocol.kind

    @property
    def planes(self) -> tuple[SlicePlane, ...]:
        return self.protocol.planes


@dataclass(frozen=True, eq=False)
class SimulatedPatient:
    """A simulated patient: study attributes, latent truth and series in acquisition order."""

    index: int
    seed: int
    study: StudyInfo
    truth: PatientTruth
    series: tuple[SimulatedSeries, ...]
    matrix: int

    @property
    def patient_id(self) -> str:
        return self.study.patient_id

    def get(self, kind: SeriesKind) -> SimulatedSeries:
        for series in self.series:
            if series.kind == kind:
                return series
        raise KeyError(f"series {kind!r} was not simulated")

    @property
    def sagittal(self) -> Mapping[str, SimulatedSeries]:
        """The sagittal series with label maps, by kind (``t1``, ``t2``, ``stir``)."""
        return MappingProxyType({s.kind: s for s in self.series if s.labelmap is not None})


def _truth(b: BoneSample, anatomy: Anatomy) -> PatientTruth:
    """The truth of a patient drawn as the only patient of a :class:`BoneSample`."""
    vertebrae = []
    for name in VERTEBRAE:
        source = LEVEL_INDEX[name]
        spec = anatomy.spec.vertebrae[LEVELS.index(name)]
        vertebrae.append(
            VertebraTruth(
                name=name,
                bmd_t=round(float(b.t_level[0, source]), 4),
                fat_fraction=round(spec.fat_fraction, 4),
                bone_fraction=round(spec.bone_fraction, 4),
                texture_scale_mm=round(spec.texture_scale_mm, 3),
                texture_amplitude=round(spec.texture_amplitude, 4),
                texture_anisotropy=round(spec.texture_anisotropy, 3),
                fracture=spec.fracture_kind,
                fracture_loss=round(spec.fracture_loss, 3),
                fracture_acute=spec.fracture_acute,
                haemangioma_mm=round(spec.haemangioma_mm, 2),
                modic=max(spec.modic_top, spec.modic_bottom),
            )
        )
    dxa = {name: float(b.dxa_level[0, k]) for k, name in enumerate(("L1", "L2", "L3", "L4"))}
    return PatientTruth(
        age=int(b.age[0]),
        sex="F" if bool(b.female[0]) else "M",
        t_patient=round(float(b.t_patient[0]), 4),
        t_score=float(b.t_score[0]),
        dxa_levels=MappingProxyType(dxa),
        vertebrae=tuple(vertebrae),
    )


def _study_info(
    options: CohortOptions, index: int, truth: PatientTruth, rng: np.random.Generator,
    vendor: VendorName, field: float, fat_mm: float,
) -> StudyInfo:  # fmt: skip
    style = VENDOR_STYLES[vendor]
    start = dt.date(2018, 1, 1) + dt.timedelta(days=int(rng.integers(0, 7 * 365)))
    birth = start - dt.timedelta(days=int(truth.age * 365.25 + rng.integers(1, 364)))
    hour = int(rng.integers(7, 19))
    minute, second = int(rng.integers(0, 60)), int(rng.integers(0, 60))
    female = truth.sex == "F"
    height = float(np.clip(rng.normal(1.62 if female else 1.75, 0.065), 1.45, 2.0))
    bmi = float(np.clip(20.0 + 0.2 * fat_mm + rng.normal(0, 2.0), 16.0, 45.0))
    site = int(rng.integers(1, 4))
    return StudyInfo(
        patient_id=f"SYN{options.seed:04d}{index + 1:05d}"[-16:],
        patient_name=f"SYNTH^PATIENT{index + 1:05d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=truth.sex,
        age=truth.age,
        weight_kg=round(bmi * height * height, 0),
        height_m=round(height, 2),
        study_uid=phantom_uid(options, index, "study"),
        frame_of_reference_uid=phantom_uid(options, index, "frame-of-reference"),
        study_date=start.strftime("%Y%m%d"),
        study_time=f"{hour:02d}{minute:02d}{second:02d}",
        accession=f"SYN{int(rng.integers(10**8, 10**9))}",
        study_id=str(int(rng.integers(1000, 99999))),
        vendor=vendor,
        manufacturer=style.manufacturer,
        model=style.models[field],
        software=style.software,
        field_strength=field,
        imaging_frequency=round(42.577478 * field * float(rng.uniform(0.9995, 1.0005)), 6),
        device_serial=f"{vendor[:2].upper()}{int(field * 10):02d}{site:03d}",
        institution=f"Synthetic Spine Centre {site}",
        station=f"SYN{vendor[:3].upper()}{int(field * 10)}",
        study_description=style.study_description,
        receive_coil=style.coil,
    )


def _coil_sensitivity(
    plane: SlicePlane, anatomy: Anatomy, falloff_mm: float, centre_z: float, body_coil: bool
) -> np.ndarray:
    rows, cols = plane.shape
    step = 4
    jj = np.arange(0, rows + step, step, dtype=np.float64)
    ii = np.arange(0, cols + step, step, dtype=np.float64)
    pts = plane.pixel_to_lps(jj[:, None], ii[None, :])
    X, Y, Z = pts[..., 0], pts[..., 1], pts[..., 2]
    if body_coil:
        sens = 0.85 + 0.15 * np.exp(-(((Z - centre_z) / 350.0) ** 2))
    else:
        depth = np.maximum(anatomy.skin_y(Z) - Y, 0.0)
        sens = 0.22 + 0.78 * np.exp(-depth / falloff_mm)
        sens *= 0.55 + 0.45 * np.exp(-(((Z - centre_z) / 210.0) ** 2))
        sens *= np.exp(-(((X - float(anatomy.spine_x)) / 260.0) ** 2))
    # Bilinear upsampling to the full grid (the field is smooth).
    r = interp_matrix(rows, jj)
    c = interp_matrix(cols, ii)
    return (r @ sens.astype(np.float32) @ c.T).astype(np.float32)


def _signal(
    result: RenderResult,
    protocol: SeriesProtocol,
    field: float,
    shape: tuple[int, int],
    csf_scale: float = 1.0,
) -> tuple[np.ndarray, float]:
    """Noise-free signal of a rendered plane on the image grid ``shape`` (a render at a
    coarser acquisition matrix is interpolated, as scanners do), and the signal of the
    brightest common tissue. ``csf_scale`` scales the CSF signal (pulsation and flow)."""
    weights = channel_signals(protocol.sequence, field)
    reference = float(np.delete(weights, [CHANNEL["vessel"]]).max())
    weights[CHANNEL["csf"]] *= np.float32(csf_scale)
    channels, rows, cols = result.fractions.shape
    image = (weights @ result.fractions.reshape(channels, rows * cols)).reshape(rows, cols)
    if (rows, cols) != shape:
        factor_r, factor_c = shape[0] / rows, shape[1] / cols
        r = interp_matrix(shape[0], factor_r * np.arange(rows) + (factor_r - 1) / 2)
        c = interp_matrix(shape[1], factor_c * np.arange(cols) + (factor_c - 1) / 2)
        image = r @ image @ c.T
    return image, reference


_ACQUISITION_FACTOR: Final[dict[str, int]] = {"localizer": 2, "axial_t2": 2}
"""Image matrix / rendered matrix: the distractor series are rendered at half resolution."""


def _acquisition_plane(plane: SlicePlane, factor: int) -> SlicePlane:
    if factor == 1:
        return plane
    rows, cols = plane.shape
    shift = (factor - 1) / 2.0
    return SlicePlane(
        origin=plane.origin
        + shift * plane.spacing[0] * plane.col_cosines
        + shift * plane.spacing[1] * plane.row_cosines,
        row_cosines=plane.row_cosines,
        col_cosines=plane.col_cosines,
        spacing=(plane.spacing[0] * factor, plane.spacing[1] * factor),
        shape=(rows // factor, cols // factor),
        thickness=plane.thickness,
    )


@dataclass(frozen=True, eq=False)
class PreparedPatient:
    """Everything about a patient before any image is rendered (see :func:`prepare_patient`)."""

    seed: int
    index: int
    options: CohortOptions
    anatomy: Anatomy
    scene: Scene
    truth: PatientTruth
    study: StudyInfo
    protocols: tuple[SeriesProtocol, ...]
    matrix: int
    gain: float
    coil_falloff_mm: float
    csf_scale: float

    def protocol(self, kind: SeriesKind) -> SeriesProtocol:
        for protocol in self.protocols:
            if protocol.kind == kind:
                return protocol
        raise KeyError(f"series {kind!r} is not part of the options' series")


def prepare_patient(seed: int, index: int, options: CohortOptions) -> PreparedPatient:
    """Draw patient ``index`` of the cohort ``(seed, options)``: latent values, anatomy,
    study attributes and series protocols (cheap; no image is rendered)."""
    if index < 0:
        raise ValueError(f'Argument "index" must be non-negative, got {index}')
    if seed != options.seed:
        options = options.model_copy(update={"seed": seed})
    offset = prevalence_offset(options.prevalence, options.female_fraction)
    bone = sample_bone(
        _rng(seed, index, "bone"), 1, offset=offset, female_fraction=options.female_fraction
    )
    texture = texture_parameters(bone.bone_fraction[0], _rng(seed, index, "texture"))
    anatomy_rng = _rng(seed, index, "anatomy")
    spec = sample_anatomy(
        anatomy_rng,
        age=float(bone.age[0]),
        female=bool(bone.female[0]),
        fat_fraction=bone.fat_fraction[0],
        bone_fraction=bone.bone_fraction[0],
        fracture_loss=bone.fracture_loss[0],
        fracture_acute=bone.fracture_acute[0],
        texture=(texture[0], texture[1], texture[2]),
    )
    anatomy = build_anatomy(spec, anatomy_rng)
    truth = _truth(bone, anatomy)

    protocol_rng = _rng(seed, index, "protocol")
    vendor = options.vendors[int(protocol_rng.integers(len(options.vendors)))]
    if len(options.field_strengths) == 1:
        field = options.field_strengths[0]
    else:
        field = 1.5 if protocol_rng.random() < 0.6 else 3.0
    matrix = int(options.matrix[int(protocol_rng.integers(len(options.matrix)))])
    coil_falloff = float(protocol_rng.uniform(110.0, 170.0))
    gain = float(np.exp(protocol_rng.normal(0.0, 0.18)))
    study = _study_info(
        options, index, truth, _rng(seed, index, "study"), vendor, field,
        spec.subcutaneous_fat_mm,
    )  # fmt: skip
    protocols = plan_study(
        protocol_rng,
        vendor=vendor,
        field=field,
        matrix=matrix,
        landmarks=anatomy.landmarks(),
        tilts=anatomy.tilts_deg(),
        kinds=options.series,
    )
    return PreparedPatient(
        seed=seed, index=index, options=options, anatomy=anatomy, scene=Scene(anatomy.layers),
        truth=truth, study=study, protocols=protocols, matrix=matrix, gain=gain,
        coil_falloff_mm=coil_falloff,
        csf_scale=float(np.clip(_rng(seed, index, "physiology").normal(1.0, 0.035), 0.88, 1.12)),
    )  # fmt: skip


def _sub_samples(kind: str) -> int:
    """Samples across the slice thickness (through-plane partial volume)."""
    return {"localizer": 1, "axial_t2": 1}.get(kind, 2)


def render_planes(
    prepared: PreparedPatient, protocol: SeriesProtocol, slices: list[int]
) -> list[RenderResult]:
    """Tissue fractions and labels of some planes of a series (at its acquisition matrix)."""
    factor = _ACQUISITION_FACTOR.get(protocol.kind, 1)
    sub = _sub_samples(protocol.kind)
    return [
        render(prepared.scene, _acquisition_plane(protocol.planes[k], factor), sub) for k in slices
    ]


def body_labels(prepared: PreparedPatient, protocol: SeriesProtocol) -> np.ndarray:
    """The vertebral-body labels of a sagittal series, ``(k, j, i)``, without rendering the
    rest of the anatomy (identical to the body labels of :func:`simulate_patient`)."""
    bodies = Scene([layer for layer in prepared.scene.layers if layer.label])
    sub = _sub_samples(protocol.kind)
    return np.stack([render(bodies, plane, sub).labels for plane in protocol.planes])


def image_slice(
    prepared: PreparedPatient, protocol: SeriesProtocol, k: int, result: RenderResult
) -> np.ndarray:
    """Stored pixel values (uint16) of slice ``k`` of a series from its rendered plane."""
    plane = protocol.planes[k]
    style = VENDOR_STYLES[prepared.study.vendor]
    field = prepared.study.field_strength
    anatomy = prepared.anatomy
    image, reference = _signal(result, protocol, field, plane.shape, prepared.csf_scale)
    image *= _coil_sensitivity(
        plane, anatomy, prepared.coil_falloff_mm, float(anatomy.centre_of("L3")[2]),
        body_coil=protocol.kind == "localizer",
    )  # fmt: skip
    scale = style.pixel_level * prepared.gain / reference
    sigma = style.pixel_level * prepared.gain / protocol.snr
    image *= np.float32(scale)
    noise_rng = _rng(prepared.seed, prepared.index, "noise", _KIND_INDEX[protocol.kind] * 4096 + k)
    noise = noise_rng.standard_normal((2, *image.shape), dtype=np.float32)
    noise *= np.float32(sigma)
    image += noise[0]
    magnitude = np.hypot(image, noise[1])
    np.clip(np.rint(magnitude), 0, _MAX_STORED, out=magnitude)
    return magnitude.astype(np.uint16)


def slice_labels(result: RenderResult) -> np.ndarray:
    """Label map of a rendered sagittal plane: bodies, and CSF where it fills half a pixel."""
    csf = (result.labels == 0) & (result.fractions[CHANNEL["csf"]] >= 0.5)
    return np.where(csf, np.uint8(CSF_LABEL), result.labels).astype(np.uint8)


def _numbering(prepared: PreparedPatient, protocol: SeriesProtocol) -> np.ndarray:
    numbering = np.arange(1, len(protocol.planes) + 1)
    rng = _rng(prepared.seed, prepared.index, "numbering", _KIND_INDEX[protocol.kind])
    if protocol.kind != "localizer" and rng.random() < 0.5:
        numbering = numbering[::-1]
    return numbering


def simulate_patient(seed: int, index: int, options: CohortOptions) -> SimulatedPatient:
    """Simulate patient ``index`` of the cohort ``(seed, options)`` in memory.

    ``options.n_patients`` and ``options.transfer_syntax`` play no role; ``options.series``
    selects the series to simulate. A patient's pixels do not depend on the other patients,
    on which other series are simulated, or on the order of work.

    The work is small matrix products and element-wise numpy: it runs on one core (BLAS
    threads are limited to one while it runs), so parallelise over patients with processes.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _simulate(seed, index, options)


def _simulate(seed: int, index: int, options: CohortOptions) -> SimulatedPatient:
    prepared = prepare_patient(seed, index, options)
    rendered: dict[str, list[RenderResult]] = {}
    series: list[SimulatedSeries] = []
    for protocol in prepared.protocols:
        planes = protocol.planes
        if protocol.grid not in rendered:
            rendered[protocol.grid] = render_planes(prepared, protocol, list(range(len(planes))))
        results = rendered[protocol.grid]
        stack = np.stack([image_slice(prepared, protocol, k, r) for k, r in enumerate(results)])
        labelmap = None
        if protocol.kind in ("t1", "t2", "stir"):
            labelmap = np.stack([slice_labels(r) for r in results])
        geometry = stack_geometry(planes) if protocol.kind != "localizer" else None
        numbering = _numbering(prepared, protocol)
        series.append(
            SimulatedSeries(
                protocol=protocol,
                series_uid=phantom_uid(prepared.options, index, "series", protocol.kind),
                sop_instance_uids=tuple(
                    phantom_uid(prepared.options, index, "instance", protocol.kind, int(n))
                    for n in numbering
                ),
                instance_numbers=tuple(int(n) for n in numbering),
                pixels=stack,
                labelmap=labelmap,
                geometry=geometry,
            )
        )
    return SimulatedPatient(
        index=index, seed=seed, study=prepared.study, truth=prepared.truth,
        series=tuple(series), matrix=prepared.matrix,
    )  # fmt: skip
