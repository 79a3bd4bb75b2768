"""Builders for the pipeline tests: MR headers in vendor styles, DICOM series on disk in any
transfer syntax, and small trained models (see :func:`train_tiny_models`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

SAGITTAL_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows run posterior, columns run down
AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL_IOP = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def tool_env() -> dict[str, str]:
    """Environment for dcmtk tools (TCP_NODELAY as everywhere in the project)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool fails the test (it must not be skipped)."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"required tool {name!r} is not installed (see Makefile system-deps)")
    return path


def set_raw(ds: Dataset, keyword: str, text: str) -> None:
    """Store ``text`` as the undecoded value of an attribute (how a broken file arrives)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    data = text.encode("ascii")
    if len(data) % 2:
        data += b" "
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(data), data, 0, False, True)  # type: ignore[assignment]


# -- headers ---------------------------------------------------------------------------------

VENDOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "SIEMENS": {
        "Manufacturer": "SIEMENS",
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
    },
    "GE": {"Manufacturer": "GE MEDICAL SYSTEMS", "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"]},
    "PHILIPS": {
        "Manufacturer": "Philips Medical Systems",
        "ImageType": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
    },
    "CANON": {"Manufacturer": "CANON_MEC", "ImageType": ["ORIGINAL", "PRIMARY", "MR"]},
    "FUJIFILM": {"Manufacturer": "FUJIFILM Healthcare", "ImageType": ["ORIGINAL", "PRIMARY"]},
}


def mr_header(
    *,
    study_uid: str,
    series_uid: str,
    series_number: int,
    description: str,
    position: Sequence[float],
    orientation: Sequence[float] = SAGITTAL_IOP,
    tr: float | None = 600.0,
    te: float | None = 10.0,
    scanning_sequence: str | list[str] = "SE",
    sequence_variant: str | list[str] = "SK",
    vendor: str = "SIEMENS",
    rows: int = 64,
    columns: int = 64,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    instance_number: int = 1,
    **overrides: Any,
) -> Dataset:
    """An MR Image Storage header (no pixel data) with the given acquisition parameters."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "MR"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = description
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "TEST-0001"
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 4.0
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if tr is not None:
        ds.RepetitionTime = tr
    if te is not None:
        ds.EchoTime = te
    ds.ScanningSequence = scanning_sequence
    ds.SequenceVariant = sequence_variant
    ds.MagneticFieldStrength = 1.5
    for key, value in {**VENDOR_DEFAULTS[vendor], **overrides}.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def series_headers(
    study_uid: str,
    series_number: int,
    description: str,
    n_slices: int = 15,
    *,
    slice_spacing: float = 4.0,
    orientation: Sequence[float] = SAGITTAL_IOP,
    reverse: bool = False,
    filename_prefix: str | None = None,
    **kwargs: Any,
) -> list[Dataset]:
    """Headers of one series; slices step along the normal (``reverse``: files in opposite
    order with shuffled InstanceNumbers). Each dataset gets a ``filename``."""
    series_uid = generate_uid()
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    origin = np.array([-28.0, -60.0, 120.0])
    headers = []
    order = list(range(n_slices))[::-1] if reverse else list(range(n_slices))
    for n, k in enumerate(order):
        position = origin + k * slice_spacing * normal
        ds = mr_header(
            study_uid=study_uid,
            series_uid=series_uid,
            series_number=series_number,
            description=description,
            position=position,
            orientation=orientation,
            instance_number=(n * 7) % n_slices + 1,
            **kwargs,
        )
        ds.filename = f"{filename_prefix or 'mem'}/s{series_number}-{n}.dcm"
        headers.append(ds)
    return headers


# -- series on disk ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenSeries:
    paths: list[Path]
    array: np.ndarray  # stored values (k, j, i), slices in ascending normal order
    slope: float
    intercept: float


def write_series(
    out_dir: Path,
    array: np.ndarray,
    *,
    study_uid: str | None = None,
    orientation: Sequence[float] = SAGITTAL_IOP,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    slice_spacing: float = 3.5,
    origin: Sequence[float] = (-25.0, -80.0, 140.0),
    slope: float = 1.0,
    intercept: float = 0.0,
    order: Sequence[int] | None = None,
    description: str = "t1_tse_sag",
    series_number: int = 3,
    tr: float = 550.0,
    te: float = 11.0,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    header_overrides: dict[str, Any] | None = None,
    bits_stored: int = 12,
    compress_kwargs: dict[str, Any] | None = None,
) -> WrittenSeries:
    """Write ``array`` (stored unsigned values, ``(k, j, i)``) as a single-frame MR series.

    Slice ``k`` lies at ``origin + k * slice_spacing * normal``; ``order`` gives the file order
    (InstanceNumber follows the file order, not the position).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    order = list(order) if order is not None else list(range(array.shape[0]))
    paths = []
    for n, k in enumerate(order):
        ds = mr_header(
            study_uid=study_uid,
            series_uid=series_uid,
            series_number=series_number,
            description=description,
            position=np.asarray(origin) + k * slice_spacing * normal,
            orientation=orientation,
            tr=tr,
            te=te,
            rows=array.shape[1],
            columns=array.shape[2],
            pixel_spacing=pixel_spacing,
            instance_number=n + 1,
        )
        ds.StudyDate, ds.StudyTime = "20240101", "120000"
        ds.SpacingBetweenSlices = slice_spacing
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.RescaleType = "US"
        dtype = np.uint8 if bits_stored <= 8 else np.uint16
        ds.BitsAllocated = 8 if bits_stored <= 8 else 16
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
        for key, value in (header_overrides or {}).items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(array[k], dtype=dtype).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, **(compress_kwargs or {}))
        path = out_dir / f"img{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return WrittenSeries(paths, array, slope, intercept)


DCMTK_CONVERSIONS: dict[str, tuple[str, list[str]]] = {
    # transfer syntax UID: (tool, options)
    "1.2.840.10008.1.2": ("dcmconv", ["+ti"]),
    "1.2.840.10008.1.2.2": ("dcmconv", ["+tb"]),
    "1.2.840.10008.1.2.1.99": ("dcmconv", ["+td"]),
    "1.2.840.10008.1.2.4.50": ("dcmcjpeg", ["+eb", "+rm"]),
    "1.2.840.10008.1.2.4.51": ("dcmcjpeg", ["+ee", "+rm"]),
    "1.2.840.10008.1.2.4.57": ("dcmcjpeg", ["+el"]),
    "1.2.840.10008.1.2.4.70": ("dcmcjpeg", ["+e1"]),
    "1.2.840.10008.1.2.4.80": ("dcmcjpls", ["+el"]),
    "1.2.840.10008.1.2.4.81": ("dcmcjpls", ["+en"]),
    "1.2.840.10008.1.2.5": ("dcmcrle", []),
}


def dcmtk_convert(paths: Sequence[Path], out_dir: Path, transfer_syntax: str) -> list[Path]:
    """Convert files with the dcmtk tool for ``transfer_syntax`` (see DCMTK_CONVERSIONS)."""
    tool, options = DCMTK_CONVERSIONS[transfer_syntax]
    executable = require_tool(tool)
    out_dir.mkdir(parents=True, exist_ok=True)
    converted = []
    for path in paths:
        target = out_dir / path.name
        subprocess.run(
            [executable, *options, str(path), str(target)],
            check=True,
            env=tool_env(),
            capture_output=True,
            timeout=60,
        )
        converted.append(target)
    return converted


def htj2k_convert(
    paths: Sequence[Path], out_dir: Path, transfer_syntax: str, level: float | None = None
) -> list[Path]:
    """Re-encode files as High-Throughput JPEG 2000 (OpenJPH through imagecodecs).

    ``level`` None is reversible (lossless); a small float is the irreversible quantisation.
    """
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate

    out_dir.mkdir(parents=True, exist_ok=True)
    converted = []
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        if level is None:
            stream = imagecodecs.htj2k_encode(pixels, reversible=True)
        else:
            stream = imagecodecs.htj2k_encode(pixels, level=level, reversible=False)
        ds.PixelData = encapsulate([bytes(stream)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        if level is not None:
            ds.LossyImageCompression = "01"
        target = out_dir / path.name
        ds.save_as(target, enforce_file_format=True)
        converted.append(target)
    return converted


# -- a toy spine with known geometry and intensities ---------------------------------------------


@dataclass(frozen=True)
class ToySpine:
    array: np.ndarray  # float32 (k, j, i)
    labelmap: np.ndarray  # uint8 (k, j, i), labels of pipeline.labels
    geometry: Any  # pipeline.volume.Geometry
    body_signal: dict[str, float]
    csf_signal: float


def toy_spine(
    shape: tuple[int, int, int] = (9, 200, 120),
    spacing: tuple[float, float, float] = (4.0, 1.0, 1.0),
    *,
    body_height: int = 20,
    disc: int = 6,
    csf_signal: float = 100.0,
    rim: int = 2,
) -> ToySpine:
    """Seven box-shaped bodies T12..S1 (head at small ``j``) with a CSF column behind them.

    Each body has a bright trabecular core and a dark ``rim`` (cortex, voxels); a body's core
    signal is 300 + 10 * label. Geometry: sagittal (rows run posterior, columns inferior).
    """
    from pipeline.labels import CSF_LABEL, LABEL_OF, VERTEBRAE
    from pipeline.volume import Geometry

    array = np.full(shape, 20.0, dtype=np.float32)
    labelmap = np.zeros(shape, dtype=np.uint8)
    body_signal: dict[str, float] = {}
    k0, k1 = 2, shape[0] - 2
    for n, name in enumerate(VERTEBRAE):
        label = LABEL_OF[name]
        j0 = 15 + n * (body_height + disc)
        j1 = j0 + body_height
        i0, i1 = 20, 56
        labelmap[k0:k1, j0:j1, i0:i1] = label
        array[k0:k1, j0:j1, i0:i1] = 60.0
        core = 300.0 + 10.0 * label
        array[k0:k1, j0 + rim : j1 - rim, i0 + rim : i1 - rim] = core
        body_signal[name] = core
    labelmap[k0 + 1 : k1 - 1, 8:192, 62:72] = CSF_LABEL
    array[k0 + 1 : k1 - 1, 8:192, 62:72] = csf_signal
    geometry = Geometry(
        origin=(-16.0, -60.0, 150.0),
        row_cosines=(0.0, 1.0, 0.0),
        col_cosines=(0.0, 0.0, -1.0),
        normal=(-1.0, 0.0, 0.0),
        spacing=spacing,
        shape=shape,
    )
    return ToySpine(array, labelmap, geometry, body_signal, csf_signal)


# -- small models trained for the tests (and the benchmark's segmenter) ---------------------------


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Train small networks on one thread: their steps are too small to gain from more, and
    on a busy machine several threads mostly wait for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_segmenter(
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    params: Any,
    spec: Any,
    steps: int,
    batch_size: int = 8,
    seed: int = 0,
    lr: float = 3e-3,
) -> Any:
    """Train :func:`pipeline.segment.build_segmenter` on ``(array, labelmap)`` volumes for a
    fixed number of steps (deterministic for a seed); returns the model in eval mode."""
    import torch
    from monai.losses import DiceCELoss

    from pipeline.segment import build_segmenter, prepare_labels, prepare_slices

    torch.manual_seed(seed)
    inputs = torch.cat([prepare_slices(array, spec) for array, _ in volumes])
    targets = torch.cat([prepare_labels(labels, spec) for _, labels in volumes])
    model = build_segmenter(spec.in_chans, params)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with _single_thread():
        for _ in range(steps):
            index = torch.randint(len(inputs), (batch_size,), generator=generator)
            # Intensity augmentation: scanners differ in gain.
            gain = 0.8 + 0.4 * torch.rand(batch_size, 1, 1, 1, generator=generator)
            loss = loss_fn(model(inputs[index] * gain), targets[index][:, None])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def train_classifier(
    crops: np.ndarray,
    labels: np.ndarray,
    *,
    architecture: str,
    steps: int,
    batch_size: int = 16,
    seed: int = 0,
    lr: float = 1e-3,
) -> Any:
    """Train :func:`pipeline.classify.build_classifier` on crops ``(N, C, S, S)`` with binary
    labels for a fixed number of steps; returns the model in eval mode."""
    import torch

    from pipeline.classify import build_classifier

    torch.manual_seed(seed)
    x_all = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    model = build_classifier(architecture, int(x_all.shape[1]))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with _single_thread():
        for _ in range(steps):
            size = min(batch_size, len(x_all))
            index = torch.randint(len(x_all), (size,), generator=generator)
            loss = loss_fn(model(x_all[index])[:, 0], y_all[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def dice_per_level(
    prediction: np.ndarray, truth: np.ndarray, levels: Sequence[str]
) -> dict[str, float]:
    """Dice coefficient of each level's mask."""
    from pipeline.labels import LABEL_OF

    scores = {}
    for level in levels:
        a, b = prediction == LABEL_OF[level], truth == LABEL_OF[level]
        denominator = int(a.sum() + b.sum())
        scores[level] = 2.0 * float((a & b).sum()) / denominator if denominator else 1.0
    return scores


# -- the synthetic cohort (train.phantom) ---------------------------------------------------------


def simulate(seed: int, index: int = 0, **options: Any) -> Any:
    """``train.phantom`` patient ``index`` of the cohort ``(seed, options)``."""
    from train.phantom.options import CohortOptions
    from train.phantom.simulate import simulate_patient

    return simulate_patient(seed, index, CohortOptions(seed=seed, **options))


TINY_CLASSIFIER = "resnet10t"


def build_tiny_models(
    models_dir: Path,
    patients: Sequence[Any],
    *,
    seg_steps: int = 400,
    cls_steps: int = 30,
    seg_input: int = 96,
    threshold: float = 0.42,
) -> str:
    """Train a small segmenter and two small classifiers on simulated phantom patients (fixed
    steps, deterministic) and save them through the registry; returns the training-data
    description written into the manifests."""
    from pipeline.labels import LUMBAR_LEVELS
    from pipeline.preprocess import PreprocessSpec, vertebra_crops
    from pipeline.registry import (
        CLASSIFIER_OF,
        SEGMENTER,
        classifier_manifest,
        save_model,
        segmenter_manifest,
    )
    from pipeline.segment import SegmentationInputSpec, UNetParams

    unet = UNetParams(channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=1)
    seg_spec = SegmentationInputSpec(input_size=seg_input)
    volumes = [
        (p.get(kind).pixels.astype(np.float32), p.get(kind).labelmap)
        for p in patients
        for kind in ("t1", "t2")
    ]
    segmenter = train_segmenter(volumes, params=unet, spec=seg_spec, steps=seg_steps)
    description = f"synthetic phantom, {len(patients)} patients (test fixture)"
    save_model(
        models_dir / SEGMENTER,
        segmenter,
        segmenter_manifest(
            version="test-1", training_data=description, synthetic=True, params=unet,
            spec=seg_spec, metrics={"steps": float(seg_steps)},
        ),
    )
    crop_spec = PreprocessSpec(input_size=48)
    for sequence, kind in (("T1", "t1"), ("T2", "t2")):
        crops, labels = [], []
        for patient in patients:
            series = patient.get(kind)
            spacing = (series.geometry.spacing[1], series.geometry.spacing[2])
            found = vertebra_crops(
                series.pixels, series.labelmap, LUMBAR_LEVELS, crop_spec, pixel_spacing=spacing
            )
            crops += list(found.values())
            labels += [float(patient.truth.osteoporosis)] * len(found)
        model = train_classifier(
            np.stack(crops), np.array(labels), architecture=TINY_CLASSIFIER, steps=cls_steps
        )
        save_model(
            models_dir / CLASSIFIER_OF[sequence],
            model,
            classifier_manifest(
                sequence,  # type: ignore[arg-type]
                architecture=TINY_CLASSIFIER, threshold=threshold, version="test-1",
                training_data=description, synthetic=True, spec=crop_spec,
            ),
        )
    return description
