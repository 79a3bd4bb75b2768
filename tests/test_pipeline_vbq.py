"""VBQ score: trabecular medians L1-L4 over CSF at L3 (L2 fall-back)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import VBQSettings
from pipeline.labels import CSF_LABEL, LABEL_OF
from pipeline.vbq import vbq_score
from tests.pipeline_fixtures import toy_spine


def _rows_of(labelmap: np.ndarray, level: str) -> np.ndarray:
    return np.flatnonzero((labelmap == LABEL_OF[level]).any(axis=(0, 2)))


def test_vbq_of_known_signals() -> None:
    spine = toy_spine(csf_signal=100.0)
    result = vbq_score(spine.array, spine.labelmap, spine.geometry)
    # Trabecular cores L1..L4 = 320, 330, 340, 350 (the dark rim is eroded away).
    assert dict(result.level_signals) == {"L1": 320.0, "L2": 330.0, "L3": 340.0, "L4": 350.0}
    assert result.csf_level == "L3" and result.csf_signal == 100.0
    assert result.score == pytest.approx(335.0 / 100.0)
    assert result.reason is None


def test_cortical_rim_is_excluded_by_erosion() -> None:
    spine = toy_spine(rim=3)
    eroded = vbq_score(spine.array, spine.labelmap, spine.geometry, VBQSettings(erosion_mm=3.0))
    assert eroded.level_signals["L1"] == 320.0
    # Thin bodies (10 mm) without erosion: the rim takes over half the ROI, the median drops.
    thin = toy_spine(body_height=10, rim=3)
    raw = vbq_score(thin.array, thin.labelmap, thin.geometry, VBQSettings(erosion_mm=0.0))
    assert raw.level_signals["L1"] < 320.0


def test_csf_falls_back_to_l2_when_l3_canal_is_empty() -> None:
    spine = toy_spine()
    labels = spine.labelmap.copy()
    rows = _rows_of(labels, "L3")
    band = labels[:, rows[0] : rows[-1] + 1]
    band[band == CSF_LABEL] = 0
    array = spine.array.copy()
    l2 = slice(*_rows_of(labels, "L2")[[0, -1]] + [0, 1])
    array[:, l2][labels[:, l2] == CSF_LABEL] = 80
    result = vbq_score(array, labels, spine.geometry)
    assert result.csf_level == "L2" and result.csf_signal == 80.0
    assert result.score == pytest.approx(335.0 / 80.0)


def test_csf_elsewhere_does_not_count() -> None:
    spine = toy_spine()
    labels = spine.labelmap.copy()
    keep = _rows_of(labels, "L5")
    csf = labels == CSF_LABEL
    csf[:, keep[0] : keep[-1] + 1] = False
    labels[csf] = 0
    result = vbq_score(spine.array, labels, spine.geometry)
    assert result.score is None and "no CSF found at L3 or L2" in (result.reason or "")
    assert len(result.level_signals) == 4


def test_missing_level_gives_no_score_with_reason() -> None:
    spine = toy_spine()
    labels = spine.labelmap.copy()
    labels[labels == LABEL_OF["L4"]] = 0
    result = vbq_score(spine.array, labels, spine.geometry)
    assert result.score is None and "L4" in (result.reason or "")
    nothing = vbq_score(spine.array, np.zeros_like(labels), spine.geometry)
    assert nothing.score is None and nothing.reason


def test_level_signals_are_read_only() -> None:
    spine = toy_spine()
    result = vbq_score(spine.array, spine.labelmap, spine.geometry)
    with pytest.raises(TypeError):
        result.level_signals["L1"] = 0.0  # type: ignore[index]
