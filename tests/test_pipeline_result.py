"""Result objects: frozen, typed, lossless JSON."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pipeline.labels import LABEL_OF, LUMBAR_LEVELS
from pipeline.result import (
    DEMO_NOTICE,
    RESEARCH_NOTICE,
    LevelResult,
    ModelInfo,
    PatientResult,
    SeriesResult,
    StudyResult,
)
from pipeline.selection import SkippedSeries
from pipeline.vbq import vbq_score
from tests.pipeline_fixtures import toy_spine

MODEL = ModelInfo(
    name="cls-t1",
    task="classification",
    architecture="efficientnet_b4",
    version="1.0.0",
    sequence="T1",
    input_size=256,
    weights_sha256="ab" * 32,
    synthetic=True,
    training_data="synthetic cohort",
    threshold=0.5,
)


def _study(synthetic: bool = True) -> StudyResult:
    spine = toy_spine()
    vbq = vbq_score(spine.array, spine.labelmap, spine.geometry)
    levels = tuple(
        LevelResult(
            level=level,
            label=LABEL_OF[level],
            found=True,
            probability=0.1 * (n + 1),
            voxels=int((spine.labelmap == LABEL_OF[level]).sum()),
            volume_ml=3.6,
            mid_slice=4,
            centroid_lps=(1.0, 2.0, 3.0),
            trabecular_signal=vbq.level_signals.get(level),
        )
        for n, level in enumerate(LUMBAR_LEVELS)
    )
    series = SeriesResult(
        sequence="T1",
        series_instance_uid="1.2.3.4",
        series_number=3,
        series_description="t1_tse_sag",
        sop_instance_uids=tuple(f"1.2.3.4.{k}" for k in range(9)),
        source_paths=tuple(f"/spool/{k}.dcm" for k in range(9)),
        frame_of_reference_uid="1.2.3.9",
        geometry=spine.geometry,
        labelmap=spine.labelmap.copy(),
        levels=levels,
        probability=0.25,
        threshold=0.5,
        positive=False,
        model=dataclasses.replace(MODEL, synthetic=synthetic),
        vbq=vbq,
    )
    return StudyResult(
        study_instance_uid="1.2.3",
        outcome="analysed",
        reason=None,
        series=(series,),
        skipped=(SkippedSeries("1.2.3.5", 4, "t2_tirm_sag", 15, "inversion recovery"),),
        patient=PatientResult(0.25, None, 0.25, 0.5, False, vbq.score, ("T1",)),
        models=(dataclasses.replace(MODEL, synthetic=synthetic),),
        demo_models=synthetic,
        timings={"segment": 0.3, "total": 1.0},
    )


def test_json_round_trip_is_lossless() -> None:
    result = _study()
    text = result.to_json()
    again = StudyResult.from_json(text)
    assert again.to_json() == text
    series, original = again.series[0], result.series[0]
    np.testing.assert_array_equal(series.labelmap, original.labelmap)
    assert series.geometry == original.geometry
    assert series.levels == original.levels
    assert series.vbq is not None and series.vbq.score == original.vbq.score  # type: ignore[union-attr]
    assert again.patient == result.patient and again.skipped == result.skipped
    data = json.loads(text)
    affine = np.array(data["series"][0]["geometry"]["affine"])
    np.testing.assert_allclose(affine, original.geometry.affine, atol=1e-6)
    assert data["outcome"] == "analysed" and data["demo_models"] is True


def test_demo_models_are_always_announced() -> None:
    demo = _study(synthetic=True)
    assert DEMO_NOTICE in demo.notice and RESEARCH_NOTICE in demo.notice
    assert json.loads(demo.to_json())["notice"] == demo.notice
    real = _study(synthetic=False)
    assert real.notice == RESEARCH_NOTICE


def test_results_are_frozen() -> None:
    result = _study()
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.outcome = "not_analysable"  # type: ignore[misc]
    with pytest.raises(TypeError):
        result.timings["total"] = 0.0  # type: ignore[index]
    with pytest.raises(ValueError):
        result.series[0].labelmap[0, 0, 0] = 1


def test_not_analysable_needs_a_reason_and_json_without_masks_is_not_readable() -> None:
    with pytest.raises(ValueError, match="reason"):
        StudyResult("1.2", "not_analysable", None, (), (), None, (), False, {})
    small = _study().to_json(include_masks=False)
    assert json.loads(small)["series"][0]["labelmap"] is None
    with pytest.raises(ValueError, match="without masks"):
        StudyResult.from_json(small)
    with pytest.raises(ValueError, match="not a opmri-study-result"):
        StudyResult.from_json("{}")
