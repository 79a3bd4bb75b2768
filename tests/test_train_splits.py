"""Patient-level splits: no patient on both sides of any split, stratification, guards."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.preprocess import PreprocessSpec
from train.cls_trainer import ClassifierTrainConfig, train_classifier
from train.datasets import CropSet
from train.splits import (
    SplitLeakageError,
    check_disjoint,
    stratified_patient_folds,
    train_validation_split,
)


def _cohort(n: int = 53, prevalence: float = 0.3, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = [f"patient-{i:03d}" for i in range(n)]
    labels = rng.random(n) < prevalence
    labels[:5] = True  # at least five of each class for five folds
    labels[5:10] = False
    return ids, labels


def test_folds_partition_patients_and_are_stratified() -> None:
    ids, labels = _cohort()
    folds = stratified_patient_folds(ids, labels, k=5, seed=3)
    assert len(folds) == 5
    tested = [pid for fold in folds for pid in fold.test]
    assert sorted(tested) == sorted(ids)  # every patient tested exactly once
    by_id = dict(zip(ids, labels, strict=True))
    positives = [sum(by_id[p] for p in fold.test) for fold in folds]
    sizes = [len(fold.test) for fold in folds]
    assert max(positives) - min(positives) <= 1
    assert max(sizes) - min(sizes) <= 1
    for fold in folds:
        assert not set(fold.train) & set(fold.test)
        assert set(fold.train) | set(fold.test) == set(ids)
    again = stratified_patient_folds(ids, labels, k=5, seed=3)
    assert [f.test for f in again] == [f.test for f in folds]
    other = stratified_patient_folds(ids, labels, k=5, seed=4)
    assert [f.test for f in other] != [f.test for f in folds]


def test_fold_and_split_errors() -> None:
    ids, labels = _cohort()
    with pytest.raises(ValueError, match="unique"):
        stratified_patient_folds([*ids, ids[0]], [*labels, labels[0]], k=5)
    with pytest.raises(ValueError, match="one per patient"):
        stratified_patient_folds(ids, labels[:-1], k=5)
    with pytest.raises(ValueError, match="positive patients for 5 folds"):
        stratified_patient_folds(ids[:12], np.array([True] * 3 + [False] * 9), k=5)
    with pytest.raises(ValueError, match="at least 2"):
        stratified_patient_folds(ids, labels, k=1)


def test_train_validation_split_is_disjoint_and_stratified() -> None:
    ids, labels = _cohort(n=100)
    train, validation = train_validation_split(ids, labels, 0.25, seed=1)
    assert not set(train) & set(validation)
    assert set(train) | set(validation) == set(ids)
    by_id = dict(zip(ids, labels, strict=True))
    assert sum(by_id[p] for p in validation) == round(0.25 * labels.sum())
    assert len(validation) == round(0.25 * labels.sum()) + round(0.25 * (~labels).sum())


def test_check_disjoint_names_groups_not_patients() -> None:
    check_disjoint(train=["a", "b"], validation=["c"], test=["d"])
    with pytest.raises(SplitLeakageError) as info:
        check_disjoint(train=["a", "secret-id"], test=["secret-id", "e"])
    assert "'train' and 'test'" in str(info.value)
    assert "secret-id" not in str(info.value)


def _crops(ids: list[str], labels: list[bool], per_patient: int = 3) -> CropSet:
    spec = PreprocessSpec(input_size=16, context_slices=0)
    rows = [(pid, lab, lv) for pid, lab in zip(ids, labels, strict=True)
            for lv in ("L1", "L2", "L3")[:per_patient]]  # fmt: skip
    rng = np.random.default_rng(0)
    return CropSet(
        sequence="T1",
        spec=spec,
        images=rng.normal(size=(len(rows), 1, 16, 16)).astype(np.float16),
        labels=np.array([r[1] for r in rows]),
        patient_ids=np.array([r[0] for r in rows], dtype=object),
        levels=np.array([r[2] for r in rows], dtype=object),
    )


def test_vertebra_images_follow_their_patient() -> None:
    ids, labels = _cohort(n=20)
    crops = _crops(ids, list(labels))
    train_ids, val_ids = train_validation_split(ids, labels, 0.3, seed=0)
    train, validation = crops.subset(train_ids), crops.subset(val_ids)
    assert len(train) + len(validation) == len(crops)
    assert not set(train.patient_ids) & set(validation.patient_ids)
    for pid in val_ids:  # all three vertebrae of a validation patient are in validation
        assert int((validation.patient_ids == pid).sum()) == 3


def test_crop_sets_of_patients_join_into_one() -> None:
    ids, labels = _cohort(n=6)
    whole = _crops(ids, list(labels))
    parts = [whole.subset([pid]) for pid in ids]
    joined = CropSet.concatenate(parts, "T1", whole.spec)
    assert np.array_equal(joined.images, whole.images)
    assert np.array_equal(joined.labels, whole.labels)
    assert joined.patient_ids.tolist() == whole.patient_ids.tolist()
    assert joined.levels.tolist() == whole.levels.tolist()
    assert len(CropSet.concatenate([], "T1", whole.spec)) == 0
    with pytest.raises(ValueError, match="cannot be joined"):
        CropSet.concatenate(parts, "T2", whole.spec)
    with pytest.raises(ValueError, match="cannot be joined"):
        CropSet.concatenate(parts, "T1", PreprocessSpec(input_size=16, context_slices=1))


def test_trainer_refuses_a_leaking_split() -> None:
    ids, labels = _cohort(n=12)
    crops = _crops(ids, list(labels))
    leaked = crops.subset(ids[:8])
    config = ClassifierTrainConfig(
        architecture="resnet10t", input_size=16, context_slices=0, epochs=1, device="cpu"
    )
    with pytest.raises(SplitLeakageError):
        train_classifier(crops.subset(ids[4:]), leaked, config)
