"""Key image: a Secondary Capture of the mid-sagittal slice with outlines and a banner.

Many viewers (OHIF v3, Orthanc's viewers) show neither SEG overlays nor SR findings reliably,
but every viewer shows an image. The key image is the mid-sagittal T1 slice (T2 when there is
no T1) resampled to square pixels, with a coloured outline and the probability next to each
vertebral body, above a banner with the verdict, the probabilities, the VBQ and the notice
that the result is not for diagnostic use (and, with demo models, that the models were trained
on synthetic data). Everything is burned into the pixels (Burned In Annotation ``YES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage

from pipeline.dicom_out.equipment import (
    MANUFACTURER,
    MODEL_NAME,
    contributing_equipment,
    device_serial_number,
)
from pipeline.dicom_out.identity import (
    SERIES_NUMBERS,
    ResultIdentity,
    character_set,
    copy_patient_study,
)
from pipeline.dicom_out.seg import SEGMENT_COLOURS
from pipeline.dicom_out.sources import KeySlice, SourceError, highdicom_source
from pipeline.labels import LABEL_OF, LUMBAR_LEVELS
from pipeline.result import SeriesResult, StudyResult

TARGET_SIZE: Final[int] = 768
"""Longer side of the rendered slice in pixels (the banner is added above it)."""
WINDOW_PERCENTILES: Final[tuple[float, float]] = (1.0, 99.5)

POSITIVE_COLOUR: Final[tuple[int, int, int]] = (255, 80, 80)
NEGATIVE_COLOUR: Final[tuple[int, int, int]] = (120, 220, 120)
TEXT_COLOUR: Final[tuple[int, int, int]] = (235, 235, 235)
WARNING_COLOUR: Final[tuple[int, int, int]] = (255, 200, 60)
BANNER_BACKGROUND: Final[tuple[int, int, int]] = (20, 20, 20)


@dataclass(frozen=True)
class BannerLine:
    text: str
    colour: tuple[int, int, int]


def banner_lines(result: StudyResult) -> list[BannerLine]:
    """The banner's text, top to bottom (plain ASCII, so any font renders it)."""
    patient = result.patient
    if patient is None:
        raise ValueError('Argument "result" must be an analysed study')
    if patient.osteoporosis:
        verdict = BannerLine("OSTEOPOROSIS SUSPECTED", POSITIVE_COLOUR)
    else:
        verdict = BannerLine("Osteoporosis not suspected", NEGATIVE_COLOUR)
    parts = []
    if patient.probability is not None:
        parts.append(f"probability {patient.probability:.2f}")
        if patient.threshold is not None:
            parts.append(f"threshold {patient.threshold:.2f}")
    for sequence, value in (("T1", patient.probability_t1), ("T2", patient.probability_t2)):
        if value is not None:
            parts.append(f"{sequence} {value:.2f}")
    parts.append("VBQ " + ("n/a" if patient.vbq is None else f"{patient.vbq:.2f}"))
    lines = [
        BannerLine(f"{verdict.text}  ({parts[0]})" if parts else verdict.text, verdict.colour),
        BannerLine("   ".join(parts[1:]), TEXT_COLOUR),
        BannerLine("NOT FOR DIAGNOSTIC USE - research use only (opmri-node)", WARNING_COLOUR),
    ]
    if result.demo_models:
        lines.append(
            BannerLine("DEMO MODELS trained on synthetic data: values are not findings",
                       WARNING_COLOUR)
        )
    return lines


def _window(pixels: np.ndarray) -> np.ndarray:
    low, high = np.percentile(pixels, WINDOW_PERCENTILES)
    if not high > low:
        high = low + 1.0
    scaled = (pixels.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _display_size(shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[int, int]:
    """(width, height) with square pixels and the longer side :data:`TARGET_SIZE`."""
    rows, cols = shape
    height_mm, width_mm = rows * spacing[0], cols * spacing[1]
    scale = TARGET_SIZE / max(height_mm, width_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _pixel_spacing(header: Dataset) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in header.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return (1.0, 1.0)
    return (row, col) if row > 0 and col > 0 else (1.0, 1.0)


def render_key_image(result: StudyResult, series: SeriesResult, key: KeySlice) -> np.ndarray:
    """The key image as an RGB ``uint8`` array ``(rows, columns, 3)``."""
    if key.series_instance_uid != series.series_instance_uid:
        raise SourceError("the key slice does not belong to the key series")
    labels = series.labelmap[key.index]
    if key.pixels.shape != labels.shape:
        raise SourceError("the key slice's pixels do not match the label map")
    size = _display_size(labels.shape, _pixel_spacing(key.header))
    grey = Image.fromarray(_window(key.pixels)).resize(size, Image.Resampling.BILINEAR)
    label_image = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
    picture = np.repeat(np.asarray(grey)[:, :, None], 3, axis=2).copy()

    thickness = max(1, size[0] // 300)
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for level in LUMBAR_LEVELS:
        mask = label_image == LABEL_OF[level]
        if not mask.any():
            continue
        inner = ndimage.binary_erosion(mask, iterations=thickness)
        picture[mask & ~inner] = SEGMENT_COLOURS[level]
        rows, cols = np.nonzero(mask)
        boxes[level] = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))

    canvas_image = Image.fromarray(picture)
    draw = ImageDraw.Draw(canvas_image)
    font = _font(max(12, size[0] // 36))
    for level, (x0, y0, x1, y1) in boxes.items():
        probability = series.level(level).probability
        text = level if probability is None else f"{level} {probability:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left, bottom - top
        y = (y0 + y1) // 2 - height // 2
        x = x1 + 6 if x1 + 6 + width <= size[0] else max(0, x0 - 6 - width)
        draw.rectangle((x - 2, y - 2, x + width + 2, y + height + 4), fill=(0, 0, 0))
        draw.text((x - left, y - top), text, fill=SEGMENT_COLOURS[level], font=font)

    lines = banner_lines(result)
    banner_font = _font(max(14, size[0] // 32))
    line_height = int(banner_font.size * 1.35) if hasattr(banner_font, "size") else 16
    banner_height = line_height * len(lines) + line_height // 2
    banner = Image.new("RGB", (size[0], banner_height), BANNER_BACKGROUND)
    banner_draw = ImageDraw.Draw(banner)
    for n, line in enumerate(lines):
        banner_draw.text(
            (line_height // 3, line_height // 4 + n * line_height),
            line.text,
            fill=line.colour,
            font=banner_font,
        )
    full = Image.new("RGB", (size[0], banner_height + size[1]))
    full.paste(banner, (0, 0))
    full.paste(canvas_image, (0, banner_height))
    return np.asarray(full, dtype=np.uint8).copy()


def _orientation_letter(vector: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(vector)))
    positive = vector[axis] > 0
    return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]


def patient_orientation(header: Dataset) -> tuple[str, str]:
    """Patient Orientation (row direction, column direction) from ImageOrientationPatient."""
    try:
        values = np.asarray([float(v) for v in header.ImageOrientationPatient], dtype=float)
    except (AttributeError, TypeError, ValueError):
        raise SourceError("the key slice has no usable ImageOrientationPatient") from None
    if values.shape != (6,):
        raise SourceError("the key slice has no usable ImageOrientationPatient")
    return _orientation_letter(values[:3]), _orientation_letter(values[3:])


def build_key_image(
    result: StudyResult,
    key: KeySlice,
    identity: ResultIdentity | None = None,
) -> hd.sc.SCImage:
    """The key image Secondary Capture of an analysed study.

    Args:
        result: the analysed study.
        key: the key slice (see :func:`pipeline.dicom_out.sources.load_sources`).
        identity: UIDs of the result objects (default: derived from ``result``).

    Raises:
        ValueError: if the study was not analysed or the key slice does not fit the result.
    """
    if not result.analysed or result.patient is None:
        raise ValueError('Argument "result" must be an analysed study')
    series = next(
        (s for s in result.series if s.series_instance_uid == key.series_instance_uid), None
    )
    if series is None:
        raise SourceError("the key slice belongs to no analysed series")
    identity = identity or ResultIdentity.for_result(result.study_instance_uid, result.models)
    pixels = render_key_image(result, series, key)
    header = highdicom_source(key.header)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=identity.sc_series_uid,
        series_number=SERIES_NUMBERS["SC"],
        sop_instance_uid=identity.sc_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=patient_orientation(header),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        contributing_equipment=contributing_equipment(result),
        series_description="Osteoporosis key image (opmri-node, not for diagnostic use)",
        manufacturer_model_name=MODEL_NAME,
        software_versions=result.pipeline_version[:64],
        device_serial_number=device_serial_number(identity),
        specific_character_set=character_set(header),
    )
    sc.ConversionType = "WSD"
    sc.BodyPartExamined = "LSPINE"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = result.notice[:10240]
    sc.DerivationDescription = (
        f"Sagittal {series.sequence} slice {key.index + 1} of {series.labelmap.shape[0]} with "
        "vertebral body outlines and the osteoporosis screening result burned in"
    )[:1024]
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = series.sop_instance_uids[key.index]
    sc.SourceImageSequence = [source]
    copy_patient_study(header, sc)
    return sc
