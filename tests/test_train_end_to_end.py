"""A tiny train -> evaluate run on a few synthetic patients (small networks, few steps), the
demo build's manifests and idempotence, resuming from checkpoints, and the CLI commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from opmri_node.cli import main
from pipeline.registry import (
    CLASSIFIER_T1,
    CLASSIFIER_T2,
    MODEL_NAMES,
    SEGMENTER,
    load_model,
    read_manifest,
)
from pipeline.segment import UNetParams
from train.cls_trainer import ClassifierTrainConfig, train_classifier
from train.datasets import PatientSample, build_crop_set, patient_labels
from train.demo import DemoPlan, build_demo, existing_demo_models
from train.evaluate import evaluate_models, summarise, target_checks
from train.report import write_report
from train.seg_trainer import SegmenterTrainConfig
from train.splits import train_validation_split
from train.synthetic import synthetic_patients

TINY_UNET = UNetParams(channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
TINY_ARCH = "resnet10t"
PLAN = DemoPlan(
    seed=3,
    n_patients=12,
    validation_fraction=0.34,
    segmenter_patients=6,
    segmenter_validation_patients=2,
    segmenter_pool=9,
    segmenter=SegmenterTrainConfig(
        input_size=64, steps=6, eval_every=3, batch_size=4, unet=TINY_UNET
    ),
    classifier=ClassifierTrainConfig(
        architecture=TINY_ARCH, input_size=32, epochs=2, batch_size=8, patience=2
    ),
    device="cpu",
)


@pytest.fixture(scope="module")
def held_out() -> list[PatientSample]:
    """Six patients of another seed, three of each class.

    Folds and validation splits need both classes on every side; where the draw has fewer than
    three of a class, the three lowest T-scores are labelled osteoporosis.
    """
    patients = synthetic_patients(777, 6)
    labels = [p.osteoporosis for p in patients]
    if sum(labels) != 3:
        lowest = sorted(range(len(patients)), key=lambda i: patients[i].t_score)[:3]
        labels = [i in lowest for i in range(len(patients))]
    return [
        PatientSample(p.patient_id, bool(lab), p.t_score, p.series, p.oracle_score, p.info)
        for p, lab in zip(patients, labels, strict=True)
    ]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models_dir = tmp_path_factory.mktemp("models")
    result = build_demo(models_dir, plan=PLAN, force=True)
    assert result.built
    return models_dir


def test_demo_manifests_say_synthetic_and_record_the_schedule(demo_dir: Path) -> None:
    for name in MODEL_NAMES:
        manifest = read_manifest(demo_dir, name)
        assert manifest.synthetic is True
        assert manifest.training_data == (
            "synthetic cohort, seed 3, 12 patients — not for clinical use"
        )
        assert manifest.version == "demo-3-phantom" + manifest.version.split("phantom")[1]
        assert "not for clinical use" in manifest.notes
        assert '"steps"' in manifest.notes or '"epochs"' in manifest.notes
        record = json.loads((demo_dir / name / "training.json").read_text())
        assert record["training_patients"] + record["validation_patients"] == 12
        assert record["history"]
    seg = read_manifest(demo_dir, SEGMENTER)
    assert seg.input_size == 64 and seg.architecture_params["channels"] == [8, 16, 32]
    assert {"val_dice_mean", "val_level_accuracy", "steps"} <= set(seg.metrics)
    for name in (CLASSIFIER_T1, CLASSIFIER_T2):
        manifest = read_manifest(demo_dir, name)
        assert manifest.architecture == TINY_ARCH and manifest.input_size == 32
        assert manifest.threshold is not None and 0.0 <= manifest.threshold <= 1.0
        assert {"val_patient_auc", "threshold", "best_epoch"} <= set(manifest.metrics)
        assert manifest.metrics["threshold"] == pytest.approx(manifest.threshold, abs=1e-4)
    assert not (demo_dir / ".demo-build").exists()


def test_demo_build_is_idempotent_and_detects_tampering(demo_dir: Path, tmp_path: Path) -> None:
    before = {name: (demo_dir / name / "weights.pt").stat().st_mtime_ns for name in MODEL_NAMES}
    again = build_demo(demo_dir, plan=PLAN)
    assert not again.built and "exist" in again.reason
    result = CliRunner().invoke(main, ["models", "build-demo", "--models-dir", str(demo_dir)])
    assert result.exit_code == 0 and "valid demo models exist" in result.output
    after = {name: (demo_dir / name / "weights.pt").stat().st_mtime_ns for name in MODEL_NAMES}
    assert before == after
    # A copy with one corrupted weights file is not a valid demo build any more.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_dir, copy)
    weights = copy / CLASSIFIER_T2 / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert existing_demo_models(demo_dir) is not None
    assert existing_demo_models(copy) is None
    result = CliRunner().invoke(main, ["models", "list", "--models-dir", str(copy)])
    assert result.exit_code == 1
    assert "2 of 3 models verified" in result.output
    assert "does not match the manifest" in result.output
    result = CliRunner().invoke(main, ["models", "list", "--models-dir", str(demo_dir)])
    assert result.exit_code == 0, result.output
    assert "3 of 3 models verified" in result.output


def test_tiny_train_evaluate_report(
    demo_dir: Path, held_out: list[PatientSample], tmp_path: Path
) -> None:
    evaluation = evaluate_models(demo_dir, held_out, title="tiny", cohort="6 held-out patients")
    summary = summarise(evaluation, n_boot=200)
    names = [m["name"] for m in summary["methods"]]
    assert names[:3] == [f"{TINY_ARCH} T1", f"{TINY_ARCH} T2", f"{TINY_ARCH} T1+T2"]
    assert "VBQ (T1)" in names and "Oracle (latent marrow)" in names
    seg = summary["segmentation"]
    assert seg["series"] == 12 and seg["vertebrae"] == 60
    checks = target_checks(summary)
    assert [c.name for c in checks][:6] == [
        "Dice L1", "Dice L2", "Dice L3", "Dice L4", "Dice L5", "correct level labels",
    ]  # fmt: skip
    report = write_report(evaluation, summary, tmp_path / "report", checks)
    text = report.read_text()
    assert "| Architecture | T1 | T2 | T1+T2 (fused) |" in text
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["patients_total"] == 6 and len(metrics["figures"]) == len(checks)


def test_evaluate_on_reference_masks_scores_every_method(
    demo_dir: Path, held_out: list[PatientSample], tmp_path: Path
) -> None:
    evaluation = evaluate_models(demo_dir, held_out, use_segmenter=False)
    summary = summarise(evaluation, n_boot=200)
    assert summary["patients_evaluated"] == 6  # every method scores every patient
    by_name = {m["name"]: m for m in summary["methods"]}
    for name in (f"{TINY_ARCH} T1", f"{TINY_ARCH} T1+T2", "VBQ (T1)", "Oracle (latent marrow)"):
        auc = by_name[name]["patient_auc"]
        assert auc["low"] <= auc["auc"] <= auc["high"]
        assert 0 <= by_name[name]["youden"]["sensitivity"] <= 1
    assert by_name[f"{TINY_ARCH} T1"]["vertebrae"] == 30
    assert "brier" in by_name[f"{TINY_ARCH} T2"] and "brier" not in by_name["VBQ (T1)"]
    pairs = {(c["a"], c["b"]) for c in summary["comparisons"]}
    assert (f"{TINY_ARCH} T1+T2", f"{TINY_ARCH} T1") in pairs
    assert (f"{TINY_ARCH} T1", "VBQ (T1)") in pairs
    write_report(evaluation, summary, tmp_path, target_checks(summary))
    for name in ("report.md", "metrics.json", "roc_patient.png", "calibration.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "roc_patient.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classifier_training_resumes_from_its_checkpoint(
    held_out: list[PatientSample], tmp_path: Path
) -> None:
    relabelled = held_out
    ids, labels = patient_labels(relabelled)
    train_ids, val_ids = train_validation_split(ids, labels, 0.34, seed=0)
    config = ClassifierTrainConfig(
        architecture=TINY_ARCH, input_size=32, epochs=3, batch_size=8, patience=5,
        device="cpu", time_budget_s=1e-3,
    )  # fmt: skip
    crops = build_crop_set(relabelled, "T2", config.preprocess_spec())
    first = train_classifier(crops.subset(train_ids), crops.subset(val_ids), config,
                             checkpoint_dir=tmp_path)  # fmt: skip
    assert first.stopped == "time_budget" and len(first.history) == 1
    saved = torch.load(tmp_path / "classifier-last.pt", weights_only=False)
    assert saved["state"]["epoch"] == 1
    resumed = train_classifier(
        crops.subset(train_ids), crops.subset(val_ids),
        config.model_copy(update={"time_budget_s": None}), checkpoint_dir=tmp_path,
    )  # fmt: skip
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    assert resumed.history[0] == first.history[0]
    assert resumed.steps == 3 * first.steps


def test_cli_help_lists_the_model_commands() -> None:
    runner = CliRunner()
    for args, expected in (
        (["train", "--help"], ["seg", "cls"]),
        (["train", "cls", "--help"], ["--architecture", "--pretrained", "--imbalance"]),
        (["evaluate", "--help"], ["--cross-validate", "--synthetic", "--site-cohort"]),
        (["models", "--help"], ["build-demo", "list"]),
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        for word in expected:
            assert word in result.output


def test_cli_reports_bad_input_clearly(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["train", "cls", "--sequence", "T1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "exactly one data source" in result.output
    bad = tmp_path / "cohort.csv"
    bad.write_text("patient_id,study_dir,dxa_date\n")
    result = runner.invoke(
        main, ["train", "cls", "--sequence", "T1", "--site-cohort", str(bad), "--out",
               str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 1 and "missing column(s) dxa_t_score or dxa_label" in result.output
    config = tmp_path / "train.yaml"
    config.write_text("classifier:\n  architecure: resnet50\n")
    result = runner.invoke(
        main, ["train", "cls", "--sequence", "T1", "--config", str(config), "--synthetic", "4",
               "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 1 and "classifier.architecure" in result.output
    result = runner.invoke(main, ["evaluate", "--models-dir", str(tmp_path), "--synthetic", "4",
                                  "--out", str(tmp_path / "r")])  # fmt: skip
    assert result.exit_code == 1 and "models build-demo" in result.output


def test_pipeline_analyzes_a_study_with_the_built_models(demo_dir: Path, tmp_path: Path) -> None:
    """The models load in the node's pipeline (``opmri-node analyze``) from DICOM files."""
    from pydicom.uid import ExplicitVRLittleEndian

    from train.phantom.dicomio import write_patient
    from train.phantom.options import CohortOptions
    from train.phantom.simulate import simulate_patient

    patient = simulate_patient(5, 0, CohortOptions(n_patients=1, seed=5, series=("t1", "t2")))
    written = write_patient(patient, tmp_path / "cohort", ExplicitVRLittleEndian)
    out = tmp_path / "out"
    config = tmp_path / "node.yaml"
    config.write_text(f"pipeline:\n  classifier:\n    architecture: {TINY_ARCH}\n")
    result = subprocess.run(
        [sys.executable, "-m", "opmri_node", "analyze",
         str(tmp_path / "cohort" / written.study_dir), "--out", str(out), "--config",
         str(config), "--models-dir", str(demo_dir), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    # A barely trained segmenter may find too few vertebrae (exit 3), never crash (exit 1).
    assert result.returncode in (0, 3), result.stdout + result.stderr
    summary = json.loads((out / "result.json").read_text())
    models = {m["name"]: m for m in summary["models"]}
    assert models[CLASSIFIER_T1]["synthetic"] is True
    assert load_model(demo_dir, CLASSIFIER_T1).manifest.input_size == 32


def test_cross_validation_compares_architectures(
    held_out: list[PatientSample], tmp_path: Path
) -> None:
    from train.evaluate import cross_validate

    config = ClassifierTrainConfig(
        input_size=32, epochs=1, batch_size=8, patience=1, device="cpu"
    )
    work = tmp_path / "runs"
    evaluation = cross_validate(
        held_out, [TINY_ARCH, "resnet14t"], config, folds=3, seed=1,
        validation_fraction=0.34, work_dir=work,
    )  # fmt: skip
    summary = summarise(evaluation, n_boot=100)
    table = {(m["method"], m["sequence"]) for m in summary["methods"]}
    for arch in (TINY_ARCH, "resnet14t"):
        assert {(arch, "T1"), (arch, "T2"), (arch, "T1+T2")} <= table
    assert ("VBQ", "T1") in table and ("oracle", "-") in table
    # Each patient has exactly one out-of-fold prediction per architecture and sequence.
    cached = sorted(p.name for p in work.glob("fold*.json"))
    assert len(cached) == 3 * 2 * 2
    predicted: dict[str, int] = {}
    for path in work.glob(f"fold*-{TINY_ARCH}-T1.json"):
        for pid in json.loads(path.read_text())["levels"]:
            predicted[pid] = predicted.get(pid, 0) + 1
    assert predicted == {p.patient_id: 1 for p in held_out}
    pairs = {(c["a"], c["b"]) for c in summary["comparisons"]}
    assert (f"{TINY_ARCH} T1", "resnet14t T1") in pairs  # DeLong between architectures
    # A rerun takes the stored fold results instead of training again.
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("fold*.json")}
    again = cross_validate(
        held_out, [TINY_ARCH, "resnet14t"], config, folds=3, seed=1,
        validation_fraction=0.34, work_dir=work,
    )  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in work.glob("fold*.json")} == stamps
    np.testing.assert_allclose(again.methods[0].scores, evaluation.methods[0].scores)
    report = write_report(evaluation, summary, tmp_path / "cv")
    assert f"| {TINY_ARCH} |" in report.read_text()
