"""A small synthetic lumbar study on disk and a StudyResult built from its ground-truth masks.

Used by the result-object tests: the writers need a result and its source files, not trained
models, so the label map here is the drawn ground truth and the probabilities are given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from pipeline.labels import CSF_LABEL, LABEL_OF, VERTEBRAE
from pipeline.result import LevelResult, ModelInfo, PatientResult, SeriesResult, StudyResult
from pipeline.vbq import VBQResult
from pipeline.volume import load_series
from tests.pipeline_fixtures import write_series

MODELS = (
    ModelInfo("segmenter", "segmentation", "monai-unet-2d", "demo-1", None, 256, "a" * 64, True,
              "synthetic lumbar MRI phantom"),
    ModelInfo("cls-t1", "classification", "efficientnet_b4", "demo-1", "T1", 160, "b" * 64, True,
              "synthetic lumbar MRI phantom", 0.5),
    ModelInfo("cls-t2", "classification", "efficientnet_b4", "demo-1", "T2", 160, "c" * 64, True,
              "synthetic lumbar MRI phantom", 0.5),
)


def phantom_labelmap(shape: tuple[int, int, int] = (11, 160, 128)) -> np.ndarray:
    """Label map ``(k, j, i)``: T12..S1 bodies stacked down the rows, CSF behind them."""
    depth, rows, cols = shape
    labelmap = np.zeros(shape, dtype=np.uint8)
    body_rows, gap = rows // 9, rows // 45 + 1
    top = rows // 20
    for n, name in enumerate(VERTEBRAE):
        j0 = top + n * (body_rows + gap)
        j1 = min(j0 + body_rows, rows)
        for k in range(2, depth - 2):
            shrink = abs(k - depth // 2)
            labelmap[k, j0 + shrink : j1 - shrink, cols // 5 + shrink : cols // 2 - shrink] = (
                LABEL_OF[name]
            )
    labelmap[depth // 2 - 1 : depth // 2 + 2, top:, cols // 2 + 6 : cols // 2 + 12] = CSF_LABEL
    return labelmap


def phantom_image(labelmap: np.ndarray, brightness: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = 200 + 40 * rng.standard_normal(labelmap.shape)
    image[(labelmap >= 1) & (labelmap <= 7)] = brightness
    image[labelmap == CSF_LABEL] = 400
    return np.clip(image, 0, 4095).astype(np.uint16)


@dataclass(frozen=True)
class PhantomStudy:
    study_uid: str
    folder: Path
    result: StudyResult
    series_paths: Mapping[str, list[Path]]


def make_phantom_study(
    folder: Path,
    *,
    probabilities: Mapping[str, Mapping[str, float]] | None = None,
    sequences: tuple[str, ...] = ("T1", "T2"),
    study_uid: str | None = None,
    header_overrides: Mapping[str, object] | None = None,
    shape: tuple[int, int, int] = (11, 160, 128),
) -> PhantomStudy:
    """Write a sagittal T1 (and T2) series and build the StudyResult of their ground truth."""
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    labelmap = phantom_labelmap(shape)
    probabilities = probabilities or {
        "T1": {"L1": 0.81, "L2": 0.74, "L3": 0.69, "L4": 0.77, "L5": 0.55},
        "T2": {"L1": 0.71, "L2": 0.64, "L3": 0.59, "L4": 0.67, "L5": 0.45},
    }
    overrides = {
        "FrameOfReferenceUID": frame_uid,
        "PatientName": "Doe^Jane",
        "PatientID": "PID-0042",
        "PatientBirthDate": "19500101",
        "PatientSex": "F",
        "AccessionNumber": "ACC-77",
        "StudyID": "S77",
        "StudyDescription": "MRI LUMBAR SPINE",
        "ReferringPhysicianName": "Ref^Doctor",
        **(header_overrides or {}),
    }
    series_results = []
    series_paths: dict[str, list[Path]] = {}
    for number, sequence in enumerate(sequences, start=3):
        written = write_series(
            folder / sequence.lower(),
            phantom_image(labelmap, 900 if sequence == "T1" else 700, number),
            study_uid=study_uid,
            description=f"{sequence.lower()}_tse_sag",
            series_number=number,
            tr=550.0 if sequence == "T1" else 3500.0,
            te=11.0 if sequence == "T1" else 100.0,
            header_overrides=dict(overrides),
        )
        volume = load_series(written.paths)
        series_paths[sequence] = list(written.paths)
        per_level = probabilities[sequence]
        levels = tuple(
            LevelResult(
                level=level,
                label=LABEL_OF[level],
                found=True,
                probability=per_level.get(level),
                voxels=int((labelmap == LABEL_OF[level]).sum()),
                mid_slice=labelmap.shape[0] // 2,
            )
            for level in ("L1", "L2", "L3", "L4", "L5")
        )
        scored = [per_level[level] for level in ("L1", "L2", "L3", "L4") if level in per_level]
        probability = float(np.mean(scored))
        model = next(m for m in MODELS if m.sequence == sequence)
        series_results.append(
            SeriesResult(
                sequence=sequence,  # type: ignore[arg-type]
                series_instance_uid=volume.series_instance_uid,
                series_number=number,
                series_description=f"{sequence.lower()}_tse_sag",
                sop_instance_uids=volume.sop_instance_uids,
                source_paths=volume.paths,
                frame_of_reference_uid=frame_uid,
                geometry=volume.geometry,
                labelmap=labelmap.copy(),
                levels=levels,
                probability=probability,
                threshold=0.5,
                positive=probability >= 0.5,
                model=model,
                vbq=VBQResult(score=3.12, csf_signal=400.0, csf_level="L3")
                if sequence == "T1"
                else None,
            )
        )
    p1 = next((s.probability for s in series_results if s.sequence == "T1"), None)
    p2 = next((s.probability for s in series_results if s.sequence == "T2"), None)
    present = [p for p in (p1, p2) if p is not None]
    fused = float(np.mean(present))
    result = StudyResult(
        study_instance_uid=study_uid,
        outcome="analysed",
        reason=None,
        series=tuple(series_results),
        skipped=(),
        patient=PatientResult(
            probability_t1=p1,
            probability_t2=p2,
            probability=fused,
            threshold=0.5,
            osteoporosis=fused >= 0.5,
            vbq=3.12 if "T1" in sequences else None,
            sequences=tuple(sequences),
        ),
        models=MODELS,
        demo_models=True,
        timings={},
    )
    return PhantomStudy(study_uid, folder, result, series_paths)
