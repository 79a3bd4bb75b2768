"""DICOM Segmentation (BINARY) of the lumbar vertebral bodies of one analysed series.

One segment per vertebral body the segmenter found (L1..L5, CID 7151 codes), on the exact grid
of the source series: one frame per source slice and segment, empty frames kept
(``omit_empty_frames=False``), because viewers place overlays more reliably when every source
slice has its frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from pipeline.dicom_out import codes
from pipeline.dicom_out.equipment import (
    MANUFACTURER,
    MODEL_NAME,
    contributing_equipment,
    device_serial_number,
    software_versions,
)
from pipeline.dicom_out.identity import (
    SERIES_NUMBERS,
    ResultIdentity,
    character_set,
    copy_patient_study,
)
from pipeline.dicom_out.sources import check_headers, highdicom_source
from pipeline.labels import LABEL_OF, LUMBAR_LEVELS
from pipeline.result import ModelInfo, SeriesResult, StudyResult

SEGMENT_COLOURS: Final[dict[str, tuple[int, int, int]]] = {
    "L1": (230, 25, 75),
    "L2": (60, 180, 75),
    "L3": (255, 225, 25),
    "L4": (0, 130, 200),
    "L5": (245, 130, 48),
}
"""Display colour (sRGB) per level, shared by the SEG segments and the key image outlines."""


def segment_levels(series: SeriesResult) -> tuple[str, ...]:
    """Levels that get a segment, in segment-number order (segment ``n`` is ``levels[n-1]``)."""
    present = set(np.unique(series.labelmap).tolist())
    return tuple(level for level in LUMBAR_LEVELS if LABEL_OF[level] in present)


def segment_number(series: SeriesResult, level: str) -> int | None:
    """The segment number of ``level`` in the SEG of ``series`` (``None`` if not segmented)."""
    levels = segment_levels(series)
    return levels.index(level) + 1 if level in levels else None


def _segmenter(result: StudyResult) -> ModelInfo | None:
    for model in result.models:
        if model.task == "segmentation":
            return model
    return None


def build_seg(
    result: StudyResult,
    series: SeriesResult,
    headers: Sequence[Dataset],
    identity: ResultIdentity | None = None,
) -> hd.seg.Segmentation:
    """The Segmentation of ``series``'s L1-L5 vertebral bodies.

    Args:
        result: the analysed study (for model identity, notices and UIDs).
        series: one of ``result.series``.
        headers: the series' source datasets in the order of ``series.sop_instance_uids``
            (pixel data not needed).
        identity: UIDs of the result objects (default: derived from ``result``).

    Raises:
        ValueError: if the study was not analysed, the series has no lumbar vertebra or the
            headers do not match the series.
    """
    if not result.analysed:
        raise ValueError('Argument "result" must be an analysed study')
    levels = segment_levels(series)
    if not levels:
        raise ValueError("the series has no segmented lumbar vertebra")
    sources = check_headers(series, headers)
    identity = identity or ResultIdentity.for_result(result.study_instance_uid, result.models)

    labelmap = series.labelmap
    pixel_array = np.zeros(labelmap.shape, dtype=np.uint8)
    for number, level in enumerate(levels, start=1):
        pixel_array[labelmap == LABEL_OF[level]] = number

    segmenter = _segmenter(result)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=(segmenter.name if segmenter else "vertebral-body segmenter")[:64],
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=(segmenter.version if segmenter else result.pipeline_version)[:64],
        source=MANUFACTURER,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{level} vertebral body",
            segmented_property_category=codes.ANATOMICAL_STRUCTURE,
            segmented_property_type=codes.VERTEBRA_OF_LEVEL[level],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=identity.tracking_uid(series.series_instance_uid, level),
            tracking_id=f"{series.sequence} {level} vertebral body",
            anatomic_regions=[codes.LUMBAR_SPINE],
            display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOURS[level])
            if hasattr(hd.color.CIELabColor, "from_rgb")
            else None,
        )
        for number, level in enumerate(levels, start=1)
    ]
    first = sources[0]
    seg = hd.seg.Segmentation(
        source_images=[highdicom_source(ds) for ds in sources],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=identity.seg_series_uid(series.series_instance_uid),
        series_number=SERIES_NUMBERS[f"SEG-{series.sequence}"],
        sop_instance_uid=identity.seg_instance_uid(series.series_instance_uid),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(result),
        device_serial_number=device_serial_number(identity),
        content_label="VERTEBRAE",
        content_description=f"L1-L5 vertebral bodies ({series.sequence}); research use only"[
            :64
        ],
        content_creator_name="opmri-node^",
        omit_empty_frames=False,
        contributing_equipment=contributing_equipment(result),
        series_description=f"Vertebral bodies {series.sequence} (opmri-node, research use)",
        specific_character_set=character_set(first),
    )
    copy_patient_study(first, seg)
    return seg
