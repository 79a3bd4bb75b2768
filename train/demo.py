"""Demo models: the synthetic cohort -> segmenter + T1 and T2 classifiers, on a CPU budget.

``opmri-node models build-demo`` calls :func:`build_demo`. The schedule is sized for a 2-core
CPU: a cohort of :attr:`DemoPlan.n_patients` synthetic patients simulated in memory one at a
time (the classifier crops are made as they come; only the segmenter's pool keeps its
volumes), a patient-level stratified split into training and validation, a segmenter at a
reduced input size and classifiers of the default architecture at a small input size, each
stopping at its own time budget with the best validation weights. The manifests record that
the models are synthetic and not for clinical use, the training data, input sizes, schedules,
validation metrics and the decision thresholds (Youden on the validation patients).

The build is idempotent: valid demo models (manifests verified, weights' SHA-256 matching)
are left alone unless ``force`` is given. Intermediate checkpoints in
``<models_dir>/.demo-build`` let an interrupted build resume.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import Progress

from pipeline.config import ClassifierSettings
from pipeline.preprocess import PreprocessSpec
from pipeline.registry import (
    CLASSIFIER_OF,
    MODEL_NAMES,
    SEGMENTER,
    ModelManifest,
    ModelRegistryError,
    classifier_manifest,
    load_model,
    save_model,
    segmenter_manifest,
)
from pipeline.segment import UNetParams
from train.cls_trainer import ClassifierTrainConfig, train_classifier
from train.datasets import (
    SEQUENCES,
    CropSet,
    PatientSample,
    SequenceName,
    build_crop_set,
    build_slice_set,
    patient_labels,
)
from train.phantom.options import PHANTOM_VERSION
from train.progress import Step, make_progress
from train.seg_trainer import SegmenterTrainConfig, train_segmenter
from train.splits import check_disjoint, train_validation_split
from train.synthetic import cohort_options, describe, synthetic_patients

log = logging.getLogger(__name__)

DEMO_SEED = 20260301
BUILD_DIR = ".demo-build"
TRAINING_RECORD = "training.json"


class DemoPlan(BaseModel):
    """The demo build's data, schedules and time budgets (recorded in the manifests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = DEMO_SEED
    n_patients: int = Field(default=360, ge=8)
    """Cheap to simulate (about 0.4 s a patient); the classifiers need a few hundred: on 110
    patients with the body masked they stayed near 0.72 patient AUC on a fresh cohort."""
    validation_fraction: float = Field(default=0.25, gt=0, lt=1)
    segmenter_patients: int = Field(default=50, ge=2)
    """Training patients whose slices train the segmenter (memory and time)."""
    segmenter_validation_patients: int = Field(default=8, ge=1)
    segmenter_pool: int = Field(default=120, ge=3)
    """The first this many patients keep their volumes in memory; the segmenter's training and
    validation patients are the first of them on each side of the split."""
    segmenter: SegmenterTrainConfig = SegmenterTrainConfig(
        input_size=192,
        steps=1000,
        batch_size=8,
        eval_every=250,
        min_steps=750,
        learning_rate=2e-3,
        time_budget_s=330.0,
        unet=UNetParams(),
    )
    """About 200 s on the reference CPU (UNet @ 192 px trains ~40 slices/s there). The time
    budget only shortens the schedule on a much slower or busy machine, and never below
    ``min_steps`` (validation Dice had reached 0.96 there). A schedule of 800 steps saved
    about 50 s but lowered the validation Dice to 0.95 and the fused AUC on a fresh cohort."""
    classifier: ClassifierTrainConfig = ClassifierTrainConfig(
        architecture=ClassifierSettings().architecture,
        input_size=48,
        mask_outside=False,
        epochs=8,
        batch_size=16,
        learning_rate=1e-3,
        patience=6,
        min_epochs=6,
        time_budget_s=260.0,
    )
    """About 180 s per sequence on the reference CPU (270 training patients, 8 epochs). The crops
    keep the tissue around the body: the canal's CSF, the discs and the prevertebral tissue are
    the references against which the marrow's brightness reads (with the body alone the
    classifiers stayed 0.06 AUC lower on T1)."""
    device: str = "auto"


@dataclass
class DemoBuildResult:
    models_dir: Path
    built: bool
    seconds: float
    manifests: dict[str, ModelManifest] = field(default_factory=dict)
    reason: str = ""


def default_models_dir() -> Path:
    """``models/`` in the repository root (where the README's quick start expects them)."""
    return Path(__file__).resolve().parent.parent / "models"


def demo_version(plan: DemoPlan) -> str:
    return f"demo-{plan.seed}-phantom{PHANTOM_VERSION}"


def existing_demo_models(models_dir: Path) -> dict[str, ModelManifest] | None:
    """The manifests of valid demo models in ``models_dir``, or ``None``.

    Valid means: all three models load (manifest checks and SHA-256 of the weights pass) and
    each says it is synthetic.
    """
    manifests: dict[str, ModelManifest] = {}
    for name in MODEL_NAMES:
        try:
            loaded = load_model(models_dir, name, "cpu")
        except ModelRegistryError:
            return None
        if not loaded.manifest.synthetic:
            return None
        manifests[name] = loaded.manifest
    return manifests


def _schedule_note(kind: str, config: BaseModel, result_metrics: dict[str, float]) -> str:
    data = config.model_dump(mode="json", exclude={"device", "num_workers"})
    return (
        f"Synthetic demo {kind}, not for clinical use. Schedule: "
        + json.dumps(data, sort_keys=True)
        + f". Stopped after {int(result_metrics.get('steps', 0))} steps in "
        f"{result_metrics.get('train_seconds', 0):.0f} s."
    )


def build_demo(
    models_dir: Path,
    *,
    plan: DemoPlan | None = None,
    force: bool = False,
    console: Console | None = None,
    progress_factory: Callable[[], Progress] | None = None,
) -> DemoBuildResult:
    """Build (or keep) the demo models in ``models_dir``; prints progress with ETA."""
    plan = plan or DemoPlan()
    console = console or Console(stderr=True)
    models_dir = Path(models_dir)
    start = time.perf_counter()
    if not force:
        existing = existing_demo_models(models_dir)
        if existing is not None:
            return DemoBuildResult(
                models_dir, False, 0.0, existing, "valid demo models exist (use --force)"
            )
    for name in MODEL_NAMES:
        if (models_dir / name / "manifest.json").is_file() and not force:
            try:
                manifest = load_model(models_dir, name, "cpu").manifest
            except ModelRegistryError:
                continue
            if not manifest.synthetic:
                raise FileExistsError(
                    f"{models_dir / name} holds a model trained on real data; refusing to "
                    "overwrite it with a demo model (choose another --models-dir)"
                )
    work = models_dir / BUILD_DIR
    work.mkdir(parents=True, exist_ok=True)
    version = demo_version(plan)
    description = describe(plan.seed, plan.n_patients)
    seg_config = plan.segmenter.model_copy(update={"device": plan.device, "seed": plan.seed})
    cls_config = plan.classifier.model_copy(update={"device": plan.device, "seed": plan.seed})

    make = progress_factory or (lambda: make_progress(console))
    with make() as progress:
        patients, crop_sets = _simulate(plan, cls_config.preprocess_spec(), progress)
        ids, labels = patient_labels(patients)
        train_ids, val_ids = train_validation_split(
            ids, labels, plan.validation_fraction, plan.seed
        )
        check_disjoint(train=train_ids, validation=val_ids)
        kept = [p for p in patients if p.series]
        seg_train = [p for p in kept if p.patient_id in set(train_ids)]
        seg_val = [p for p in kept if p.patient_id in set(val_ids)]
        if not seg_train or not seg_val:
            raise ValueError(
                "the segmenter pool holds no training or no validation patient; "
                "raise segmenter_pool"
            )

        # Segmenter.
        seg_train = seg_train[: plan.segmenter_patients]
        seg_val = seg_val[: plan.segmenter_validation_patients]
        slice_task = Step(progress, "segmenter slices", len(seg_train))
        slices = build_slice_set(seg_train, seg_config.input_spec(), on_patient=slice_task.advance)
        slice_task.finish()
        seg_result = train_segmenter(
            slices, seg_val, seg_config, checkpoint_dir=work, progress=progress
        )
        del slices
        seg_metrics = seg_result.metrics()
        seg_manifest = segmenter_manifest(
            version=version,
            training_data=description,
            synthetic=True,
            params=seg_config.unet,
            spec=seg_config.input_spec(),
            metrics=seg_metrics,
            notes=_schedule_note("segmenter", seg_config, seg_metrics),
        )
        written: dict[str, ModelManifest] = {}
        staging = work / "staging"
        if staging.exists():
            shutil.rmtree(staging)
        written[SEGMENTER] = save_model(staging / SEGMENTER, seg_result.model, seg_manifest)
        _record(staging / SEGMENTER, plan, seg_result.history, train_ids, val_ids)

        # Classifiers, one per sequence.
        for sequence in SEQUENCES:
            crops = crop_sets[sequence]
            result = train_classifier(
                crops.subset(train_ids),
                crops.subset(val_ids),
                cls_config,
                checkpoint_dir=work / sequence,
                progress=progress,
                description=f"train {sequence} classifier",
            )
            metrics = result.metrics()
            manifest = classifier_manifest(
                sequence,
                architecture=cls_config.architecture,
                threshold=result.threshold,
                version=version,
                training_data=description,
                synthetic=True,
                spec=cls_config.preprocess_spec(),
                metrics=metrics,
                notes=_schedule_note(f"{sequence} classifier", cls_config, metrics),
            )
            name = CLASSIFIER_OF[sequence]
            written[name] = save_model(staging / name, result.model, manifest)
            _record(
                staging / name, plan, [h.__dict__ for h in result.history], train_ids, val_ids
            )

    # Swap the finished models in, one folder at a time.
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_NAMES:
        target = models_dir / name
        if target.exists():
            shutil.rmtree(target)
        (staging / name).rename(target)
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    return DemoBuildResult(models_dir, True, seconds, written)


def _simulate(
    plan: DemoPlan, spec: PreprocessSpec, progress: Progress
) -> tuple[list[PatientSample], dict[SequenceName, CropSet]]:
    """Simulate the cohort and make the classifiers' crops patient by patient.

    Only the first :attr:`DemoPlan.segmenter_pool` patients keep their volumes (the segmenter
    trains and validates on some of them); the others keep their DXA reference and crops, which
    bounds the memory a large cohort needs.
    """
    task = Step(progress, "simulate synthetic patients, make crops", plan.n_patients)
    options = cohort_options(plan.seed, plan.n_patients)
    patients: list[PatientSample] = []
    parts: dict[SequenceName, list[CropSet]] = {sequence: [] for sequence in SEQUENCES}
    for index in range(plan.n_patients):
        patient = synthetic_patients(plan.seed, [index], options=options)[0]
        for sequence in SEQUENCES:
            parts[sequence].append(build_crop_set([patient], sequence, spec))
        if index >= plan.segmenter_pool:
            patient = replace(patient, series={})
        patients.append(patient)
        task.advance()
    task.finish()
    positives = int(np.sum([p.osteoporosis for p in patients]))
    if positives < 4 or positives > len(patients) - 4:
        raise ValueError(
            f"the synthetic cohort holds {positives} osteoporotic patients of {len(patients)}; "
            "choose more patients"
        )
    crops = {seq: CropSet.concatenate(parts[seq], seq, spec) for seq in SEQUENCES}
    return patients, crops


def _record(
    directory: Path,
    plan: DemoPlan,
    history: list[dict[str, Any]],
    train_ids: tuple[str, ...],
    val_ids: tuple[str, ...],
) -> None:
    """``training.json`` beside the weights: plan, history and the split (patient counts)."""
    record = {
        "plan": plan.model_dump(mode="json"),
        "history": history,
        "training_patients": len(train_ids),
        "validation_patients": len(val_ids),
    }
    (directory / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
