"""Evaluation metrics against hand-computed cases (AUC, bootstrap CI, DeLong, operating points,
calibration)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.metrics import (
    auc_interval,
    bootstrap_aucs,
    brier_score,
    delong_covariance,
    delong_test,
    operating_point,
    reliability_curve,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
    youden_threshold,
)

# Two negatives (0.1, 0.4) and two positives (0.35, 0.8): of the four positive-negative pairs,
# three are ordered correctly -> AUC 3/4.
Y4 = np.array([0, 0, 1, 1])
S4 = np.array([0.1, 0.4, 0.35, 0.8])


def test_auc_hand_computed() -> None:
    assert roc_auc(Y4, S4) == pytest.approx(0.75)
    assert roc_auc(Y4, -S4) == pytest.approx(0.25)
    # A tie between a positive and a negative counts one half: pairs (1, 1, 0.5, 1) -> 3.5 / 4.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert roc_auc([True, False], [0.2, 0.2]) == pytest.approx(0.5)


def test_auc_agrees_with_scikit_learn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + y, 1)  # rounded: many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_curve_points() -> None:
    fpr, tpr, thresholds = roc_curve(Y4, S4)
    assert thresholds[0] == math.inf
    np.testing.assert_allclose(thresholds[1:], [0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "one positive and one negative"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "only 0 and 1"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1, 1], [0.1, 0.2], "equal length"),
    ],
)
def test_auc_rejects_bad_input(labels: list[int], scores: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        roc_auc(labels, scores)


def test_delong_variance_hand_computed() -> None:
    # Structural components: positives 0.35 -> 1/2 (beats 0.1 only), 0.8 -> 1;
    # negatives 0.1 -> 1 (beaten by both), 0.4 -> 1/2. Sample variances 1/8 and 1/8, so
    # Var(AUC) = 1/8 / 2 + 1/8 / 2 = 1/8.
    aucs, cov = delong_covariance(Y4, [S4])
    assert aucs[0] == pytest.approx(0.75)
    assert cov[0, 0] == pytest.approx(0.125)


def test_delong_test_hand_computed() -> None:
    # Score b separates perfectly: its structural components are all 1 (variance 0, and no
    # covariance with a), so Var(AUC_a - AUC_b) = 1/8 and z = -0.25 / sqrt(1/8).
    b = np.array([0.2, 0.1, 0.6, 0.5])
    result = delong_test(Y4, S4, b)
    assert result.auc_a == pytest.approx(0.75)
    assert result.auc_b == pytest.approx(1.0)
    assert result.std_error == pytest.approx(math.sqrt(0.125))
    assert result.z == pytest.approx(-0.25 / math.sqrt(0.125))
    assert result.p_value == pytest.approx(math.erfc(0.5), abs=1e-12)  # 0.4795


def test_delong_identical_scores_and_known_difference() -> None:
    same = delong_test(Y4, S4, S4)
    assert same.difference == 0.0 and same.p_value == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.4
    strong = y + rng.normal(0, 0.6, 400)
    weak = y + rng.normal(0, 2.5, 400)
    result = delong_test(y, strong, weak)
    assert result.difference > 0.1 and result.p_value < 1e-4


def test_delong_variance_matches_bootstrap_for_large_samples() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(600) < 0.35
    s = y + rng.normal(0, 1.2, 600)
    _, cov = delong_covariance(y, [s])
    boot = bootstrap_aucs(y, s, n_boot=2000, seed=2)
    assert float(np.var(boot)) == pytest.approx(float(cov[0, 0]), rel=0.2)


def test_stratified_bootstrap_distribution_hand_computed() -> None:
    # Resampling positives {0.35, 0.8} and negatives {0.1, 0.4} with replacement gives 16
    # equally likely cases with AUC 0 (1 case), 0.5 (4), 0.75 (4) and 1 (7).
    samples = bootstrap_aucs(Y4, S4, n_boot=20000, seed=7)
    for value, expected in ((0.0, 1 / 16), (0.5, 4 / 16), (0.75, 4 / 16), (1.0, 7 / 16)):
        assert float(np.mean(np.isclose(samples, value))) == pytest.approx(expected, abs=0.015)
    interval = auc_interval(Y4, S4, n_boot=20000, seed=7)
    assert (interval.low, interval.auc, interval.high) == pytest.approx((0.0, 0.75, 1.0))


def test_bootstrap_interval_of_a_perfect_score_and_its_width() -> None:
    perfect = auc_interval([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9], n_boot=500)
    assert (perfect.low, perfect.auc, perfect.high) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(5)
    y = rng.random(2000) < 0.3
    s = y + rng.normal(0, 1.0, 2000)
    small = auc_interval(y[:200], s[:200], n_boot=1000)
    large = auc_interval(y, s, n_boot=1000)
    assert small.low < small.auc < small.high
    assert large.high - large.low < small.high - small.low


def test_clustered_bootstrap_keeps_patients_together() -> None:
    # Each patient contributes three identical vertebra scores: resampling by patient gives
    # exactly the distribution of the per-patient bootstrap.
    y = np.repeat(Y4, 3)
    s = np.repeat(S4, 3)
    groups = np.repeat(["a", "b", "c", "d"], 3)
    clustered = bootstrap_aucs(y, s, groups=groups, n_boot=20000, seed=7)
    for value, expected in ((0.0, 1 / 16), (1.0, 7 / 16)):
        assert float(np.mean(np.isclose(clustered, value))) == pytest.approx(expected, abs=0.015)
    with pytest.raises(ValueError, match="single class"):
        bootstrap_aucs([0, 1], [0.1, 0.2], groups=["p", "p"])


def test_youden_and_fixed_sensitivity_hand_computed() -> None:
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.6, 0.4, 0.7, 0.9]
    # J is 2/3 when cutting below 0.7 (sens 2/3, spec 1) and below 0.4 (sens 1, spec 2/3);
    # the tie goes to the higher sensitivity, halfway between 0.4 and 0.2.
    assert youden_threshold(y, s) == pytest.approx(0.3)
    point = operating_point(y, s, 0.3)
    assert (point.tp, point.fp, point.tn, point.fn) == (3, 1, 2, 0)
    assert point.sensitivity == pytest.approx(1.0)
    assert point.specificity == pytest.approx(2 / 3)
    assert point.accuracy == pytest.approx(5 / 6)
    assert point.f1 == pytest.approx(6 / 7)
    # Sensitivity 0.85 needs all three positives: the same cut.
    assert threshold_for_sensitivity(y, s, 0.85) == pytest.approx(0.3)
    # Sensitivity 0.6 is reached by 2 of 3 positives: cut halfway between 0.7 and 0.6.
    assert threshold_for_sensitivity(y, s, 0.6) == pytest.approx(0.65)


def test_brier_and_reliability_hand_computed() -> None:
    assert brier_score([0, 1], [0.2, 0.6]) == pytest.approx((0.04 + 0.16) / 2)
    curve = reliability_curve([0, 0, 1, 1], [0.05, 0.15, 0.12, 0.95], n_bins=10)
    assert curve.counts == (1, 2, 1)
    assert curve.mean_predicted == pytest.approx((0.05, 0.135, 0.95))
    assert curve.observed == pytest.approx((0.0, 0.5, 1.0))
    assert curve.expected_calibration_error == pytest.approx((0.05 + 2 * 0.365 + 0.05) / 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([0, 1], [0.2, 1.5])
