"""Diagnostic-accuracy metrics for binary scores, as used in the evaluation reports.

* ROC AUC (Mann-Whitney statistic with mid-ranks for ties) and the ROC curve;
* 95 % bootstrap confidence interval of the AUC, stratified by class and optionally clustered
  (per-vertebra scores are resampled by patient, so the vertebrae of one patient stay
  together);
* DeLong's test for two correlated AUCs (same cases, two scores), in the fast form of
  Sun & Xu (IEEE SPL 2014);
* operating points: the Youden threshold (max sensitivity + specificity - 1) and the threshold
  that reaches a fixed sensitivity, each with sensitivity, specificity, accuracy and F1;
* calibration: Brier score and the reliability curve (equal-width probability bins).

Every function takes ``labels`` as a 0/1 (or boolean) array and ``scores`` where a higher value
means "more likely positive". A case is called positive when ``score >= threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata

__all__ = [
    "AUCInterval",
    "DeLongResult",
    "OperatingPoint",
    "ReliabilityCurve",
    "auc_interval",
    "bootstrap_aucs",
    "brier_score",
    "delong_covariance",
    "delong_test",
    "operating_point",
    "reliability_curve",
    "roc_auc",
    "roc_curve",
    "threshold_for_sensitivity",
    "youden_threshold",
]


def _binary(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise ValueError(
            f'Arguments "labels" and "scores" should be 1-D of equal length; '
            f"got shapes {y.shape} and {s.shape}"
        )
    if y.dtype != bool:
        unique = np.unique(y)
        if not np.isin(unique, (0, 1)).all():
            raise ValueError(f'Argument "labels" should hold only 0 and 1; got {unique[:5]}')
    if not np.isfinite(s).all():
        raise ValueError('Argument "scores" holds NaN or infinite values')
    return y.astype(bool), s


def _both_classes(y: np.ndarray) -> None:
    if y.all() or not y.any():
        raise ValueError("the AUC needs at least one positive and one negative case")


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` with ties given their mean rank."""
    return np.asarray(rankdata(values, method="average"), dtype=np.float64)


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2."""
    y, s = _binary(labels, scores)
    _both_classes(y)
    ranks = _midranks(s)
    m, n = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - m * (m + 1) / 2.0) / (m * n))


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds, from (0, 0) to (1, 1).

    Point ``n`` calls positive every case with ``score >= thresholds[n]``; the first threshold
    is ``+inf`` (nothing positive).
    """
    y, s = _binary(labels, scores)
    _both_classes(y)
    distinct = np.unique(s)[::-1]
    thresholds = np.concatenate([[np.inf], distinct])
    positives, negatives = int(y.sum()), int((~y).sum())
    # Cases at or above each threshold, by class.
    order = np.argsort(-s, kind="mergesort")
    sorted_scores, sorted_y = s[order], y[order]
    tp_cum = np.concatenate([[0], np.cumsum(sorted_y)])
    fp_cum = np.concatenate([[0], np.cumsum(~sorted_y)])
    counts = np.searchsorted(-sorted_scores, -thresholds, side="right")
    tpr = tp_cum[counts] / positives
    fpr = fp_cum[counts] / negatives
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


@dataclass(frozen=True)
class AUCInterval:
    """AUC with its bootstrap percentile interval (``level`` is e.g. 0.95)."""

    auc: float
    low: float
    high: float
    level: float
    n_boot: int
    n_positive: int
    n_negative: int

    def as_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def bootstrap_aucs(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """AUCs of ``n_boot`` stratified bootstrap resamples.

    Positives and negatives are resampled separately (with replacement, keeping their counts),
    so every resample holds both classes. With ``groups`` (e.g. patient ids of per-vertebra
    scores) whole groups are resampled; a group must then hold a single class.
    """
    y, s = _binary(labels, scores)
    _both_classes(y)
    if n_boot < 1:
        raise ValueError('Argument "n_boot" should be a positive integer')
    rng = np.random.default_rng(seed)
    if groups is None:
        pos, neg = s[y], s[~y]
        out = np.empty(n_boot)
        for b in range(n_boot):
            out[b] = _auc_two_samples(
                pos[rng.integers(0, len(pos), len(pos))],
                neg[rng.integers(0, len(neg), len(neg))],
            )
        return out
    g = np.asarray(groups)
    if len(g) != len(y):
        raise ValueError('Argument "groups" should have one entry per score')
    names, inverse = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inverse == index) for index in range(len(names))]
    group_label = np.empty(len(names), dtype=bool)
    for index, rows in enumerate(members):
        classes = np.unique(y[rows])
        if len(classes) != 1:
            raise ValueError("every group must hold cases of a single class")
        group_label[index] = classes[0]
    pos_groups = np.flatnonzero(group_label)
    neg_groups = np.flatnonzero(~group_label)
    out = np.empty(n_boot)
    for b in range(n_boot):
        pos_pick = pos_groups[rng.integers(0, len(pos_groups), len(pos_groups))]
        neg_pick = neg_groups[rng.integers(0, len(neg_groups), len(neg_groups))]
        pos = np.concatenate([s[members[index]] for index in pos_pick])
        neg = np.concatenate([s[members[index]] for index in neg_pick])
        out[b] = _auc_two_samples(pos, neg)
    return out


def _auc_two_samples(pos: np.ndarray, neg: np.ndarray) -> float:
    values = np.concatenate([pos, neg])
    ranks = _midranks(values)
    m, n = len(pos), len(neg)
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


def auc_interval(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> AUCInterval:
    """AUC and its stratified (optionally clustered) bootstrap percentile interval."""
    if not 0.0 < level < 1.0:
        raise ValueError('Argument "level" should lie between 0 and 1')
    y, s = _binary(labels, scores)
    samples = bootstrap_aucs(y, s, groups=groups, n_boot=n_boot, seed=seed)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return AUCInterval(
        auc=roc_auc(y, s),
        low=float(low),
        high=float(high),
        level=level,
        n_boot=n_boot,
        n_positive=int(y.sum()),
        n_negative=int((~y).sum()),
    )


# -- DeLong -----------------------------------------------------------------------------------


def delong_covariance(
    labels: ArrayLike, scores: Sequence[ArrayLike] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs ``(k,)`` and their DeLong covariance matrix ``(k, k)`` for ``k`` scores of the same
    cases (DeLong, DeLong & Clarke-Pearson 1988; mid-rank algorithm of Sun & Xu 2014)."""
    rows = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    y = _binary(labels, rows[0])[0]
    for row in rows[1:]:
        _binary(y, row)
    _both_classes(y)
    m, n = int(y.sum()), int((~y).sum())
    k = rows.shape[0]
    positives, negatives = rows[:, y], rows[:, ~y]
    tx = np.stack([_midranks(row) for row in positives])
    ty = np.stack([_midranks(row) for row in negatives])
    tz = np.stack([_midranks(row) for row in np.concatenate([positives, negatives], axis=1)])
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: fraction of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: fraction of positives that outrank it
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((k, k))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((k, k))
    return aucs, s10 / m + s01 / n


@dataclass(frozen=True)
class DeLongResult:
    """Two correlated AUCs compared with DeLong's test (two-sided)."""

    auc_a: float
    auc_b: float
    difference: float
    std_error: float
    z: float
    p_value: float

    def as_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def delong_test(labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike) -> DeLongResult:
    """DeLong's test of ``AUC(a) == AUC(b)`` for two scores of the same cases."""
    aucs, cov = delong_covariance(labels, [scores_a, scores_b])
    difference = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if variance <= 1e-15:
        z = 0.0 if abs(difference) < 1e-12 else math.copysign(math.inf, difference)
        se = 0.0
    else:
        se = math.sqrt(variance)
        z = difference / se
    p_value = math.erfc(abs(z) / math.sqrt(2.0)) if math.isfinite(z) else 0.0
    return DeLongResult(float(aucs[0]), float(aucs[1]), difference, se, z, p_value)


# -- operating points ----------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingPoint:
    """Confusion counts and rates when scores ``>= threshold`` are called positive."""

    threshold: float
    sensitivity: float
    specificity: float
    accuracy: float
    f1: float
    ppv: float
    npv: float
    tp: int
    fp: int
    tn: int
    fn: int

    def as_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def operating_point(labels: ArrayLike, scores: ArrayLike, threshold: float) -> OperatingPoint:
    """Sensitivity, specificity, accuracy, F1, PPV and NPV at ``threshold``."""
    y, s = _binary(labels, scores)
    called = s >= threshold
    tp = int((called & y).sum())
    fp = int((called & ~y).sum())
    tn = int((~called & ~y).sum())
    fn = int((~called & y).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return OperatingPoint(
        threshold=float(threshold),
        sensitivity=recall,
        specificity=ratio(tn, tn + fp),
        accuracy=ratio(tp + tn, len(y)),
        f1=f1,
        ppv=precision,
        npv=ratio(tn, tn + fn),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


def _cut_between(distinct_desc: np.ndarray, index: int) -> float:
    """Threshold that calls positive ``distinct_desc[: index + 1]``: halfway to the next lower
    distinct score (so that it generalises to unseen scores), the score itself at the end."""
    if index + 1 < len(distinct_desc):
        return float(0.5 * (distinct_desc[index] + distinct_desc[index + 1]))
    return float(distinct_desc[index])


def youden_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1.

    Candidate cuts lie halfway between neighbouring distinct scores; among equal J the cut with
    the higher sensitivity (lower threshold) wins, as suits screening.
    """
    fpr, tpr, thresholds = roc_curve(labels, scores)
    distinct = thresholds[1:]
    j = tpr[1:] - fpr[1:]
    best = np.flatnonzero(j >= j.max() - 1e-12)
    index = int(best[-1])
    return _cut_between(distinct, index)


def threshold_for_sensitivity(
    labels: ArrayLike, scores: ArrayLike, sensitivity: float = 0.85
) -> float:
    """The highest threshold whose sensitivity is at least ``sensitivity`` (best specificity)."""
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError('Argument "sensitivity" should lie in (0, 1]')
    _, tpr, thresholds = roc_curve(labels, scores)
    distinct = thresholds[1:]
    reached = np.flatnonzero(tpr[1:] >= sensitivity - 1e-12)
    return _cut_between(distinct, int(reached[0]))


# -- calibration -------------------------------------------------------------------------


def brier_score(labels: ArrayLike, probabilities: ArrayLike) -> float:
    """Mean squared difference between probability and outcome (0 is perfect)."""
    y, p = _binary(labels, probabilities)
    if (p < 0).any() or (p > 1).any():
        raise ValueError('Argument "probabilities" should lie in [0, 1]')
    return float(np.mean((p - y.astype(np.float64)) ** 2))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Observed frequency of positives per probability bin (empty bins left out)."""

    bin_edges: tuple[float, ...]
    mean_predicted: tuple[float, ...]
    observed: tuple[float, ...]
    counts: tuple[int, ...]
    expected_calibration_error: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def reliability_curve(
    labels: ArrayLike, probabilities: ArrayLike, n_bins: int = 10
) -> ReliabilityCurve:
    """Reliability (calibration) curve over ``n_bins`` equal-width bins of ``[0, 1]``.

    Bin ``b`` holds probabilities in ``[b/n, (b+1)/n)`` (the last bin includes 1). The expected
    calibration error is the count-weighted mean of ``|observed - mean predicted|``.
    """
    y, p = _binary(labels, probabilities)
    if (p < 0).any() or (p > 1).any():
        raise ValueError('Argument "probabilities" should lie in [0, 1]')
    if n_bins < 1:
        raise ValueError('Argument "n_bins" should be a positive integer')
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    mean_predicted, observed, counts = [], [], []
    ece = 0.0
    for b in range(n_bins):
        rows = index == b
        count = int(rows.sum())
        if not count:
            continue
        mp, ob = float(p[rows].mean()), float(y[rows].mean())
        mean_predicted.append(mp)
        observed.append(ob)
        counts.append(count)
        ece += count * abs(ob - mp)
    return ReliabilityCurve(
        bin_edges=tuple(float(e) for e in edges),
        mean_predicted=tuple(mean_predicted),
        observed=tuple(observed),
        counts=tuple(counts),
        expected_calibration_error=ece / len(y) if len(y) else float("nan"),
    )
