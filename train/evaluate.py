"""Evaluation like the paper: patient-level splits, ROC AUC with bootstrap CI, DeLong, operating
points, calibration, the VBQ baseline and the T1+T2 fusion in one table.

Two ways to get scores:

* :func:`evaluate_models` runs trained models (a ``models_dir``) on held-out patients exactly
  as the pipeline does: segmenter + post-processing, the pipeline's crops, per-level
  probabilities aggregated over L1-L4, T1/T2 fusion, the VBQ score on the T1 series; it also
  scores the segmentation against the reference masks (Dice per level, level labels);
* :func:`cross_validate` trains classifiers of several architectures per sequence in
  stratified patient-level k-fold cross-validation and pools the out-of-fold predictions, the
  way the paper compared EfficientNet-b4, InceptionResNet-v2 and ResNet-50.

Both give an :class:`Evaluation`; :func:`summarise` turns it into the metrics that
:mod:`train.report` writes as Markdown, PNG and JSON.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from pipeline.classify import aggregate, fuse, predict_levels
from pipeline.config import PipelineSettings
from pipeline.device import resolve_device, use_half
from pipeline.labels import LUMBAR_LEVELS
from pipeline.preprocess import PreprocessSpec, vertebra_crops
from pipeline.registry import CLASSIFIER_OF, SEGMENTER, LoadedModel, load_model
from pipeline.segment import SegmentationInputSpec, postprocess_labelmap, predict_labelmaps
from pipeline.vbq import vbq_score
from train.cls_trainer import (
    ClassifierTrainConfig,
    predict_crops,
    train_classifier,
)
from train.datasets import SEQUENCES, CropSet, PatientSample, SequenceName, build_crop_set
from train.metrics import (
    auc_interval,
    brier_score,
    delong_test,
    operating_point,
    reliability_curve,
    threshold_for_sensitivity,
    youden_threshold,
)
from train.progress import Step
from train.seg_trainer import CORRECT_LEVEL_DICE, dice_per_level
from train.splits import check_disjoint, stratified_patient_folds, train_validation_split

log = logging.getLogger(__name__)

FIXED_SENSITIVITY = 0.85
FUSED = "T1+T2"


@dataclass
class ScoreTable:
    """The scores of one method (an architecture on a sequence, the fusion, VBQ, the oracle)
    on the evaluated patients; ``NaN`` where the method gave no score for a patient."""

    name: str
    method: str
    sequence: str
    patient_ids: list[str]
    labels: np.ndarray
    scores: np.ndarray
    probability: bool
    threshold: float | None = None
    vertebra_patient_ids: list[str] = field(default_factory=list)
    vertebra_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    vertebra_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    vertebra_levels: list[str] = field(default_factory=list)


@dataclass
class SegmentationScores:
    """Dice of every reference L1-L5 vertebra in every evaluated series."""

    dice: dict[str, list[float]] = field(default_factory=lambda: {lv: [] for lv in LUMBAR_LEVELS})
    series: int = 0

    def add(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        for level, value in dice_per_level(truth, predicted).items():
            self.dice[level].append(value)
        self.series += 1

    def summary(self) -> dict[str, Any]:
        values = [v for level in LUMBAR_LEVELS for v in self.dice[level]]
        correct = sum(v >= CORRECT_LEVEL_DICE for v in values)
        return {
            "series": self.series,
            "vertebrae": len(values),
            "dice_mean": {lv: _mean(self.dice[lv]) for lv in LUMBAR_LEVELS},
            "dice_sd": {
                lv: float(np.std(self.dice[lv])) if self.dice[lv] else None for lv in LUMBAR_LEVELS
            },
            "dice_min": {lv: min(self.dice[lv]) if self.dice[lv] else None for lv in LUMBAR_LEVELS},
            "level_accuracy": correct / len(values) if values else None,
        }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


@dataclass
class Evaluation:
    """Everything a report needs: scores per method, segmentation, cohort description."""

    title: str
    cohort: str
    methods: list[ScoreTable]
    segmentation: SegmentationScores | None = None
    info: dict[str, Any] = field(default_factory=dict)
    not_analysable: int = 0


# -- scoring trained models ----------------------------------------------------------------


@dataclass
class LoadedModels:
    segmenter: LoadedModel | None
    classifiers: dict[SequenceName, LoadedModel]


def load_models(
    models_dir: Path, device: torch.device, *, need_segmenter: bool = True
) -> LoadedModels:
    """Load and verify the segmenter and the T1/T2 classifiers of a models folder."""
    segmenter = load_model(models_dir, SEGMENTER, device) if need_segmenter else None
    classifiers: dict[SequenceName, LoadedModel] = {
        seq: load_model(models_dir, CLASSIFIER_OF[seq], device) for seq in SEQUENCES
    }
    return LoadedModels(segmenter, classifiers)


@dataclass
class PatientPrediction:
    patient_id: str
    label: bool
    oracle: float | None
    level_probabilities: dict[SequenceName, dict[str, float]]
    patient_probability: dict[SequenceName, float | None]
    fused: float | None
    vbq: float | None
    vbq_levels: dict[str, float]
    oracle_features: tuple[float, ...] | None = None


def apply_oracle(predictions: Sequence[PatientPrediction]) -> None:
    """Replace the patients' latent scores by the synthetic cohort's oracle: out-of-fold
    probabilities of a logistic model on the noise-free marrow features (the same model as
    the phantom's calibration report). Left as is when a patient lacks the features."""
    if not predictions or any(p.oracle_features is None for p in predictions):
        return
    labels = np.array([p.label for p in predictions], dtype=bool)
    if min(int(labels.sum()), int((~labels).sum())) < 2:
        return
    from train.phantom.calibration import oracle_scores

    features = np.array([p.oracle_features for p in predictions], dtype=np.float64)
    for prediction, score in zip(predictions, oracle_scores(features, labels), strict=True):
        prediction.oracle = float(score)


def _features(patient: PatientSample) -> tuple[float, ...] | None:
    value = patient.info.get("oracle_features")
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else None


def predict_patient(
    models: LoadedModels,
    patient: PatientSample,
    settings: PipelineSettings,
    device: torch.device,
    *,
    segmentation: SegmentationScores | None = None,
) -> PatientPrediction:
    """The pipeline's analysis of one patient's in-memory series (see
    :meth:`pipeline.analyze.Analyzer.analyze_study` for the same steps on DICOM files)."""
    half = use_half(device, settings.half_precision)
    labelmaps: dict[SequenceName, np.ndarray] = {}
    sequences = [seq for seq in SEQUENCES if seq in patient.series]
    if models.segmenter is not None:
        spec = models.segmenter.manifest.preprocessing
        assert isinstance(spec, SegmentationInputSpec)
        raws = predict_labelmaps(
            models.segmenter.module,
            [patient.series[seq].array for seq in sequences],
            spec,
            device,
            half=half,
            batch_size=settings.segmentation.batch_size,
        )
        for seq, raw in zip(sequences, raws, strict=True):
            series = patient.series[seq]
            labelmaps[seq] = postprocess_labelmap(raw, series.geometry, settings.segmentation)
            if segmentation is not None and series.label_source in ("truth", "file"):
                segmentation.add(series.labelmap, labelmaps[seq])
    else:
        labelmaps = {seq: patient.series[seq].labelmap for seq in sequences}

    level_p: dict[SequenceName, dict[str, float]] = {}
    patient_p: dict[SequenceName, float | None] = {}
    for seq in sequences:
        series = patient.series[seq]
        classifier = models.classifiers[seq]
        crop_spec = classifier.manifest.preprocessing
        assert isinstance(crop_spec, PreprocessSpec)
        crops = vertebra_crops(
            series.array, labelmaps[seq], LUMBAR_LEVELS, crop_spec,
            pixel_spacing=series.pixel_spacing,
        )
        probabilities = predict_levels(
            classifier.module, crops, device, half=half,
            batch_size=settings.classifier.batch_size,
        )
        level_p[seq] = probabilities
        patient_p[seq] = aggregate(
            probabilities,
            settings.classifier.patient_levels,
            settings.classifier.aggregation,
            settings.classifier.min_levels,
        )
    fused = fuse((patient_p.get(seq) for seq in sequences), settings.classifier.fusion)
    vbq: float | None = None
    vbq_levels: dict[str, float] = {}
    if "T1" in patient.series:
        series = patient.series["T1"]
        result = vbq_score(series.array, labelmaps["T1"], series.geometry, settings.vbq)
        vbq = result.score
        if result.csf_signal:
            vbq_levels = {lv: s / result.csf_signal for lv, s in result.level_signals.items()}
    return PatientPrediction(
        patient_id=patient.patient_id,
        label=patient.osteoporosis,
        oracle=patient.oracle_score,
        level_probabilities=level_p,
        patient_probability=patient_p,
        fused=fused,
        vbq=vbq,
        vbq_levels=vbq_levels,
        oracle_features=_features(patient),
    )


def _vertebra_rows(
    predictions: Sequence[PatientPrediction],
    getter: Callable[[PatientPrediction], dict[str, float]],
) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    ids: list[str] = []
    labels: list[bool] = []
    scores: list[float] = []
    levels: list[str] = []
    for prediction in predictions:
        for level, value in getter(prediction).items():
            if value is None or not math.isfinite(value):
                continue
            ids.append(prediction.patient_id)
            labels.append(prediction.label)
            scores.append(float(value))
            levels.append(level)
    return ids, np.array(labels, dtype=bool), np.array(scores), levels


def _fused_levels(prediction: PatientPrediction) -> dict[str, float]:
    t1 = prediction.level_probabilities.get("T1", {})
    t2 = prediction.level_probabilities.get("T2", {})
    return {lv: 0.5 * (t1[lv] + t2[lv]) for lv in LUMBAR_LEVELS if lv in t1 and lv in t2}


def tables_from_predictions(
    predictions: Sequence[PatientPrediction],
    *,
    architectures: dict[SequenceName, str],
    thresholds: dict[SequenceName, float | None],
    fused_threshold: float | None = None,
) -> list[ScoreTable]:
    """Score tables (per sequence, fusion, VBQ, oracle) from per-patient predictions."""
    ids = [p.patient_id for p in predictions]
    labels = np.array([p.label for p in predictions], dtype=bool)

    def array(values: Iterable[float | None]) -> np.ndarray:
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)

    tables: list[ScoreTable] = []
    for seq in SEQUENCES:
        vids, vlabels, vscores, vlevels = _vertebra_rows(
            predictions, lambda p, seq=seq: p.level_probabilities.get(seq, {})  # type: ignore[misc]
        )
        tables.append(
            ScoreTable(
                name=f"{architectures[seq]} {seq}",
                method=architectures[seq],
                sequence=seq,
                patient_ids=ids,
                labels=labels,
                scores=array(p.patient_probability.get(seq) for p in predictions),
                probability=True,
                threshold=thresholds.get(seq),
                vertebra_patient_ids=vids,
                vertebra_labels=vlabels,
                vertebra_scores=vscores,
                vertebra_levels=vlevels,
            )
        )
    arch = architectures["T1"] if architectures["T1"] == architectures["T2"] else (
        f"{architectures['T1']} + {architectures['T2']}"
    )
    vids, vlabels, vscores, vlevels = _vertebra_rows(predictions, _fused_levels)
    tables.append(
        ScoreTable(
            name=f"{arch} {FUSED}",
            method=arch,
            sequence=FUSED,
            patient_ids=ids,
            labels=labels,
            scores=array(p.fused for p in predictions),
            probability=True,
            threshold=fused_threshold,
            vertebra_patient_ids=vids,
            vertebra_labels=vlabels,
            vertebra_scores=vscores,
            vertebra_levels=vlevels,
        )
    )
    vids, vlabels, vscores, vlevels = _vertebra_rows(predictions, lambda p: p.vbq_levels)
    tables.append(
        ScoreTable(
            name="VBQ (T1)",
            method="VBQ",
            sequence="T1",
            patient_ids=ids,
            labels=labels,
            scores=array(p.vbq for p in predictions),
            probability=False,
            vertebra_patient_ids=vids,
            vertebra_labels=vlabels,
            vertebra_scores=vscores,
            vertebra_levels=vlevels,
        )
    )
    if all(p.oracle is not None for p in predictions):
        tables.append(
            ScoreTable(
                name="Oracle (latent marrow)",
                method="oracle",
                sequence="-",
                patient_ids=ids,
                labels=labels,
                scores=array(p.oracle for p in predictions),
                probability=False,
            )
        )
    return tables


def evaluate_models(
    models_dir: Path,
    patients: Iterable[PatientSample],
    *,
    n_patients: int | None = None,
    settings: PipelineSettings | None = None,
    use_segmenter: bool = True,
    title: str = "Evaluation",
    cohort: str = "",
    progress: Progress | None = None,
) -> Evaluation:
    """Run the models of ``models_dir`` on ``patients`` (streamed) as the pipeline does."""
    settings = settings or PipelineSettings()
    device = resolve_device(settings.device)
    models = load_models(models_dir, device, need_segmenter=use_segmenter)
    segmentation = SegmentationScores() if use_segmenter else None
    predictions: list[PatientPrediction] = []
    task = Step(progress, "evaluate patients", n_patients)
    for patient in patients:
        predictions.append(
            predict_patient(models, patient, settings, device, segmentation=segmentation)
        )
        task.advance()
    task.finish()
    if not predictions:
        raise ValueError("no patients to evaluate")
    apply_oracle(predictions)
    architectures = {seq: models.classifiers[seq].manifest.architecture for seq in SEQUENCES}
    thresholds = {seq: models.classifiers[seq].manifest.threshold for seq in SEQUENCES}
    both = [t for t in thresholds.values() if t is not None]
    tables = tables_from_predictions(
        predictions,
        architectures=architectures,
        thresholds=thresholds,
        fused_threshold=float(np.mean(both)) if both else None,
    )
    manifests = {
        name: loaded.manifest.model_dump(mode="json", include={
            "name", "architecture", "version", "input_size", "training_data", "synthetic",
            "threshold", "metrics", "notes", "weights_sha256",
        })
        for name, loaded in [
            *([(SEGMENTER, models.segmenter)] if models.segmenter is not None else []),
            *((CLASSIFIER_OF[seq], models.classifiers[seq]) for seq in SEQUENCES),
        ]
    }
    return Evaluation(
        title=title,
        cohort=cohort,
        methods=tables,
        segmentation=segmentation,
        info={"models_dir": str(models_dir), "models": manifests,
              "labelmaps": "segmenter" if use_segmenter else "reference masks"},
    )


# -- cross-validation ----------------------------------------------------------------------


def cross_validate(
    patients: Sequence[PatientSample],
    architectures: Sequence[str],
    config: ClassifierTrainConfig,
    *,
    folds: int = 5,
    seed: int = 0,
    validation_fraction: float = 0.2,
    sequences: Sequence[SequenceName] = SEQUENCES,
    settings: PipelineSettings | None = None,
    work_dir: Path | None = None,
    title: str = "Cross-validation",
    cohort: str = "",
    progress: Progress | None = None,
) -> Evaluation:
    """Stratified patient-level k-fold comparison of ``architectures`` on each sequence.

    In each fold the training patients are split again (stratified, by patient) into training
    and validation; validation picks the epoch (early stopping). The test fold's patients are
    predicted by the best weights, so every patient gets exactly one out-of-fold prediction per
    architecture and sequence. With ``work_dir`` finished trainings are stored and skipped on a
    rerun, and unfinished ones resume from their checkpoints.
    """
    settings = settings or PipelineSettings()
    ids = [p.patient_id for p in patients]
    labels = np.array([p.osteoporosis for p in patients])
    fold_list = stratified_patient_folds(ids, labels, folds, seed)
    spec = config.preprocess_spec()
    crops: dict[SequenceName, CropSet] = {}
    build = Step(progress, "crops", len(patients) * len(sequences))
    for seq in sequences:
        crops[seq] = build_crop_set(patients, seq, spec, on_patient=build.advance)
    build.finish()

    oof: dict[tuple[str, SequenceName], dict[str, dict[str, float]]] = {
        (arch, seq): {} for arch in architectures for seq in sequences
    }
    total = len(fold_list) * len(architectures) * len(sequences)
    overall = Step(progress, "cross-validation runs", total)
    for fold in fold_list:
        fold_labels = np.array([labels[ids.index(pid)] for pid in fold.train])
        train_ids, val_ids = train_validation_split(
            list(fold.train), fold_labels, validation_fraction, seed + fold.index
        )
        check_disjoint(train=train_ids, validation=val_ids, test=fold.test)
        for arch in architectures:
            for seq in sequences:
                key = f"fold{fold.index}-{arch}-{seq}"
                cached = work_dir / f"{key}.json" if work_dir is not None else None
                if cached is not None and cached.is_file():
                    oof[(arch, seq)].update(json.loads(cached.read_text())["levels"])
                    overall.advance()
                    continue
                run_config = config.model_copy(update={"architecture": arch})
                result = train_classifier(
                    crops[seq].subset(train_ids),
                    crops[seq].subset(val_ids),
                    run_config,
                    checkpoint_dir=work_dir / key if work_dir is not None else None,
                    progress=progress,
                    description=f"fold {fold.index + 1}/{folds} {arch} {seq}",
                )
                test = crops[seq].subset(fold.test)
                device = resolve_device(config.device)
                probabilities = predict_crops(result.model.to(device), test, device)
                per_patient: dict[str, dict[str, float]] = {}
                for pid, level, value in zip(
                    test.patient_ids, test.levels, probabilities, strict=True
                ):
                    per_patient.setdefault(str(pid), {})[str(level)] = float(value)
                oof[(arch, seq)].update(per_patient)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_text(
                        json.dumps({"levels": per_patient, "metrics": result.metrics()})
                    )
                overall.advance()
    overall.finish()

    tables: list[ScoreTable] = []
    for arch in architectures:
        predictions = []
        for patient in patients:
            level_p = {seq: oof[(arch, seq)].get(patient.patient_id, {}) for seq in sequences}
            patient_p: dict[SequenceName, float | None] = {
                seq: aggregate(
                    level_p[seq],
                    settings.classifier.patient_levels,
                    settings.classifier.aggregation,
                    settings.classifier.min_levels,
                )
                for seq in sequences
            }
            predictions.append(
                PatientPrediction(
                    patient_id=patient.patient_id,
                    label=patient.osteoporosis,
                    oracle=patient.oracle_score,
                    level_probabilities=level_p,
                    patient_probability=patient_p,
                    fused=fuse(patient_p.values(), settings.classifier.fusion),
                    vbq=None,
                    vbq_levels={},
                )
            )
        arch_tables = tables_from_predictions(
            predictions,
            architectures=dict.fromkeys(SEQUENCES, arch),
            thresholds={},
        )
        tables += [t for t in arch_tables if t.method not in ("VBQ", "oracle")]
    # The training-free rows once, from the reference masks.
    baseline = [
        PatientPrediction(
            patient_id=p.patient_id,
            label=p.osteoporosis,
            oracle=p.oracle_score,
            level_probabilities={},
            patient_probability={},
            fused=None,
            vbq=_vbq(p, settings)[0],
            vbq_levels=_vbq(p, settings)[1],
            oracle_features=_features(p),
        )
        for p in patients
    ]
    apply_oracle(baseline)
    base_tables = tables_from_predictions(
        baseline, architectures=dict.fromkeys(SEQUENCES, "-"), thresholds={}
    )
    tables += [t for t in base_tables if t.method in ("VBQ", "oracle")]
    return Evaluation(
        title=title,
        cohort=cohort,
        methods=tables,
        info={
            "folds": folds,
            "seed": seed,
            "architectures": list(architectures),
            "config": config.model_dump(mode="json"),
            "labelmaps": "reference masks",
        },
    )


def _vbq(
    patient: PatientSample, settings: PipelineSettings
) -> tuple[float | None, dict[str, float]]:
    series = patient.series.get("T1")
    if series is None:
        return None, {}
    result = vbq_score(series.array, series.labelmap, series.geometry, settings.vbq)
    levels = (
        {lv: s / result.csf_signal for lv, s in result.level_signals.items()}
        if result.csf_signal
        else {}
    )
    return result.score, levels


# -- summary ---------------------------------------------------------------------------------


def _finite(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values)


def common_patients(methods: Sequence[ScoreTable]) -> np.ndarray:
    """Mask of the patients every method scored (comparisons use the same patients)."""
    mask = np.ones(len(methods[0].patient_ids), dtype=bool)
    for table in methods:
        mask &= _finite(table.scores)
    return mask


def summarise_method(
    table: ScoreTable, mask: np.ndarray, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """AUC with CI (patient and vertebra level), operating points, calibration."""
    y, s = table.labels[mask], table.scores[mask]
    out: dict[str, Any] = {
        "name": table.name,
        "method": table.method,
        "sequence": table.sequence,
        "patients": int(mask.sum()),
        "positives": int(y.sum()),
    }
    if y.all() or not y.any():
        out["error"] = "the evaluated patients hold a single class"
        return out
    out["patient_auc"] = auc_interval(y, s, n_boot=n_boot, seed=seed).as_dict()
    if len(table.vertebra_scores):
        keep = set(np.asarray(table.patient_ids, dtype=object)[mask].tolist())
        rows = np.array([pid in keep for pid in table.vertebra_patient_ids], dtype=bool)
        vy, vs = table.vertebra_labels[rows], table.vertebra_scores[rows]
        vg = np.asarray(table.vertebra_patient_ids, dtype=object)[rows]
        if vy.any() and not vy.all():
            out["vertebra_auc"] = auc_interval(
                vy, vs, groups=vg, n_boot=n_boot, seed=seed
            ).as_dict()
            out["vertebrae"] = int(rows.sum())
    youden = youden_threshold(y, s)
    fixed = threshold_for_sensitivity(y, s, FIXED_SENSITIVITY)
    out["youden"] = operating_point(y, s, youden).as_dict()
    out["sensitivity_0.85"] = operating_point(y, s, fixed).as_dict()
    if table.threshold is not None:
        out["model_threshold"] = operating_point(y, s, table.threshold).as_dict()
    if table.probability:
        out["brier"] = brier_score(y, s)
        out["reliability"] = reliability_curve(y, s).as_dict()
    return out


def summarise(
    evaluation: Evaluation, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """All metrics of an evaluation (JSON-ready)."""
    mask = common_patients(evaluation.methods)
    methods = [summarise_method(t, mask, n_boot=n_boot, seed=seed) for t in evaluation.methods]
    comparisons: list[dict[str, Any]] = []
    y = evaluation.methods[0].labels[mask]
    cnn = [t for t in evaluation.methods if t.method not in ("VBQ", "oracle")]
    baselines = [t for t in evaluation.methods if t.method in ("VBQ", "oracle")]
    pairs: list[tuple[ScoreTable, ScoreTable]] = []
    for n, a in enumerate(cnn):  # architectures against each other on the same sequence
        for b in cnn[n + 1 :]:
            if a.sequence == b.sequence:
                pairs.append((a, b))
    for t in cnn:  # sequences of one architecture against each other
        for u in cnn:
            if t.method == u.method and (t.sequence, u.sequence) in (
                ("T1", "T2"), (FUSED, "T1"), (FUSED, "T2"),
            ):
                pairs.append((t, u))
    pairs += [(t, b) for t in cnn for b in baselines]
    if y.any() and not y.all():
        for a, b in pairs:
            result = delong_test(y, a.scores[mask], b.scores[mask]).as_dict()
            comparisons.append({"a": a.name, "b": b.name, **result})
    summary: dict[str, Any] = {
        "title": evaluation.title,
        "cohort": evaluation.cohort,
        "patients_evaluated": int(mask.sum()),
        "patients_total": len(mask),
        "patients_without_score": int((~mask).sum()),
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": 0.95},
        "methods": methods,
        "comparisons": comparisons,
        "info": evaluation.info,
    }
    if evaluation.segmentation is not None:
        summary["segmentation"] = evaluation.segmentation.summary()
    return summary


@dataclass(frozen=True)
class TargetCheck:
    """One figure the demo models must reach, as measured."""

    name: str
    value: float | None
    target: str
    passed: bool


def target_checks(summary: dict[str, Any]) -> list[TargetCheck]:
    """The project's figures for demo models: Dice >= 0.90 per level, >= 98 % correct level
    labels, T1/T2 AUC >= VBQ and within 0.03 of the oracle, fused >= the better sequence."""
    checks: list[TargetCheck] = []
    seg = summary.get("segmentation")
    if seg:
        for level, value in seg["dice_mean"].items():
            checks.append(
                TargetCheck(f"Dice {level}", value, ">= 0.90", value is not None and value >= 0.90)
            )
        accuracy = seg["level_accuracy"]
        checks.append(
            TargetCheck(
                "correct level labels", accuracy, ">= 0.98",
                accuracy is not None and accuracy >= 0.98,
            )
        )
    cnn = [m for m in summary["methods"] if m["method"] not in ("VBQ", "oracle")]
    vbq = next((m for m in summary["methods"] if m["method"] == "VBQ"), None)
    oracle = next((m for m in summary["methods"] if m["method"] == "oracle"), None)
    vbq_auc = vbq["patient_auc"]["auc"] if vbq and "patient_auc" in vbq else None
    oracle_auc = oracle["patient_auc"]["auc"] if oracle and "patient_auc" in oracle else None
    for arch in dict.fromkeys(m["method"] for m in cnn):
        aucs = {
            m["sequence"]: m["patient_auc"]["auc"]
            for m in cnn
            if m["method"] == arch and "patient_auc" in m
        }
        for seq in ("T1", "T2"):
            auc = aucs.get(seq)
            if auc is None:
                continue
            if vbq_auc is not None:
                checks.append(
                    TargetCheck(
                        f"{arch} {seq} AUC vs VBQ", auc, f">= {vbq_auc:.3f}", auc >= vbq_auc
                    )
                )
            if oracle_auc is not None:
                checks.append(
                    TargetCheck(
                        f"{arch} {seq} AUC vs oracle",
                        auc,
                        f">= {oracle_auc - 0.03:.3f} (oracle {oracle_auc:.3f} - 0.03)",
                        auc >= oracle_auc - 0.03,
                    )
                )
        if FUSED in aucs and "T1" in aucs and "T2" in aucs:
            best = max(aucs["T1"], aucs["T2"])
            checks.append(
                TargetCheck(
                    f"{arch} fused AUC vs best sequence", aucs[FUSED], f">= {best:.3f}",
                    aucs[FUSED] >= best,
                )
            )
    return checks
