"""Patient-level splits: stratified k-fold and train/validation, never a patient on both sides.

Every vertebra image of a patient carries the patient's DXA label, so splitting images instead
of patients would put near-copies of a patient's marrow on both sides and inflate the AUC.
All splits here take one entry per *patient*; :func:`check_disjoint` is the leakage guard the
trainers and the evaluation call on every split they use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Fold",
    "SplitLeakageError",
    "check_disjoint",
    "stratified_patient_folds",
    "train_validation_split",
]


class SplitLeakageError(ValueError):
    """A patient appears on more than one side of a split."""


@dataclass(frozen=True)
class Fold:
    """One fold: patient ids used for training and for testing."""

    index: int
    train: tuple[str, ...]
    test: tuple[str, ...]


def _validate(patient_ids: Sequence[str], labels: Sequence[bool] | np.ndarray) -> np.ndarray:
    if len(patient_ids) != len(labels):
        raise ValueError(
            f"got {len(patient_ids)} patient ids but {len(labels)} labels; give one per patient"
        )
    seen: set[str] = set()
    for pid in patient_ids:
        if pid in seen:
            raise ValueError(
                "patient ids must be unique (one entry per patient, not per image or series)"
            )
        seen.add(pid)
    return np.asarray(labels, dtype=bool)


def check_disjoint(**groups: Iterable[str]) -> None:
    """Raise :class:`SplitLeakageError` if any patient id occurs in two of the named groups.

    Example: ``check_disjoint(train=train_ids, validation=val_ids, test=test_ids)``. The error
    names the groups and the number of shared patients (not the ids themselves).
    """
    sets = {name: set(ids) for name, ids in groups.items()}
    names = list(sets)
    for a_index, a in enumerate(names):
        for b in names[a_index + 1 :]:
            shared = sets[a] & sets[b]
            if shared:
                raise SplitLeakageError(
                    f"{len(shared)} patient(s) are in both '{a}' and '{b}': splits must be by "
                    "patient"
                )


def stratified_patient_folds(
    patient_ids: Sequence[str],
    labels: Sequence[bool] | np.ndarray,
    k: int = 5,
    seed: int = 0,
) -> list[Fold]:
    """``k`` folds over patients, each class spread evenly across the test folds.

    Each patient is in exactly one test fold. Patients of each class are shuffled with
    ``seed`` and dealt round-robin, so fold sizes and positive counts differ by at most one.
    """
    y = _validate(patient_ids, labels)
    if k < 2:
        raise ValueError('Argument "k" should be at least 2')
    if len(patient_ids) < k:
        raise ValueError(f"{len(patient_ids)} patients cannot fill {k} folds")
    for cls, name in ((True, "positive"), (False, "negative")):
        if int((y == cls).sum()) < k:
            raise ValueError(
                f"only {int((y == cls).sum())} {name} patients for {k} folds; every test fold "
                "needs both classes (use fewer folds or more patients)"
            )
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(y), dtype=np.int64)
    offset = 0
    for cls in (True, False):
        members = np.flatnonzero(y == cls)
        rng.shuffle(members)
        assignment[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    ids = np.asarray(patient_ids, dtype=object)
    folds = []
    for index in range(k):
        test = tuple(str(v) for v in ids[assignment == index])
        train = tuple(str(v) for v in ids[assignment != index])
        check_disjoint(train=train, test=test)
        folds.append(Fold(index, train, test))
    return folds


def train_validation_split(
    patient_ids: Sequence[str],
    labels: Sequence[bool] | np.ndarray,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Stratified patient-level split into (training ids, validation ids).

    The validation side gets ``round(fraction * n)`` patients of each class, at least one of
    each class when both exist and the training side keeps at least one of each.
    """
    y = _validate(patient_ids, labels)
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError('Argument "validation_fraction" should lie between 0 and 1')
    rng = np.random.default_rng(seed)
    ids = np.asarray(patient_ids, dtype=object)
    validation: list[str] = []
    train: list[str] = []
    for cls in (True, False):
        members = np.flatnonzero(y == cls)
        rng.shuffle(members)
        count = round(validation_fraction * len(members))
        count = min(max(count, 1), len(members) - 1) if len(members) >= 2 else 0
        validation += [str(v) for v in ids[members[:count]]]
        train += [str(v) for v in ids[members[count:]]]
    order = {pid: n for n, pid in enumerate(patient_ids)}
    train_ids = tuple(sorted(train, key=order.__getitem__))
    validation_ids = tuple(sorted(validation, key=order.__getitem__))
    check_disjoint(train=train_ids, validation=validation_ids)
    return train_ids, validation_ids
