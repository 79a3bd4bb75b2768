"""The pipeline on the synthetic cohort: one study per vendor style, written as DICOM.

Covers series selection on every vendor's naming and distractor series, volume loading in
several transfer syntaxes against the simulated pixels and ground-truth masks (NIfTI), crops
made by the pipeline versus the training code, and an end-to-end ``analyze`` run with small
models trained here. The small models are trained on the very patients they analyse: these
tests check the pipeline's geometry and plumbing from DICOM files to result, not how well a
model generalises (that is what ``train/``'s evaluation measures).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.analyze import Analyzer
from pipeline.config import PipelineSettings
from pipeline.labels import LABEL_OF, LUMBAR_LEVELS, SCORED_LEVELS
from pipeline.preprocess import PreprocessSpec, vertebra_crops
from pipeline.result import DEMO_NOTICE, StudyResult
from pipeline.selection import read_headers, select_series
from pipeline.vbq import vbq_score
from pipeline.volume import VolumeError, load_series
from tests.node_fixtures import dciodvfy_errors
from tests.pipeline_fixtures import TINY_CLASSIFIER, build_tiny_models, dice_per_level
from train.phantom import TRANSFER_SYNTAXES, VENDORS, CohortOptions, simulate_patient
from train.phantom.dicomio import WrittenPatient, read_labelmap, write_patient

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
SEED = 7100
SYNTAX_OF = {"siemens": "explicit-le", "ge": "jpeg-ls", "philips": "jpeg2000", "canon": "rle"}
DISTRACTOR_REASONS = {
    "localizer": "different orientations",
    "stir": "inversion recovery",
    "axial_t2": "not sagittal (axial",
}


@dataclass(frozen=True)
class PhantomStudy:
    vendor: str
    patient: object  # train.phantom.SimulatedPatient
    root: Path
    written: WrittenPatient

    @property
    def study_dir(self) -> Path:
        return self.root / self.written.study_dir

    def series_dir(self, kind: str) -> Path:
        return self.root / self.written.series_dirs[kind]

    def mask_path(self, kind: str) -> Path:
        return self.root / self.written.masks[kind]

    def files(self) -> list[Path]:
        return sorted(p for p in self.study_dir.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhantomStudy]:
    assert set(SYNTAX_OF) == set(VENDORS), "a vendor style of the phantom is not covered"
    out: dict[str, PhantomStudy] = {}
    for n, vendor in enumerate(VENDORS):
        options = CohortOptions(
            seed=SEED + n, vendors=(vendor,), transfer_syntax=SYNTAX_OF[vendor]  # type: ignore[arg-type]
        )
        patient = simulate_patient(SEED + n, 0, options)
        root = tmp_path_factory.mktemp(f"phantom-{vendor}")
        written = write_patient(patient, root, TRANSFER_SYNTAXES[SYNTAX_OF[vendor]])  # type: ignore[index]
        out[vendor] = PhantomStudy(vendor, patient, root, written)
    return out


@pytest.fixture(scope="module")
def models_dir(studies: dict[str, PhantomStudy], tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(directory, [study.patient for study in studies.values()])
    return directory


@pytest.fixture(scope="module")
def analyzer(models_dir: Path) -> Analyzer:
    settings = PipelineSettings.model_validate(
        {"device": "cpu", "models_dir": models_dir, "classifier": {"architecture": TINY_CLASSIFIER}}
    )
    return Analyzer(settings)


# -- selection -------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_selection_on_every_vendor_style(vendor: str, studies: dict[str, PhantomStudy]) -> None:
    study = studies[vendor]
    patient = study.patient
    headers, unreadable = read_headers(study.files())
    assert unreadable == 0
    result = select_series(headers)
    assert result.t1 is not None and result.t2 is not None
    assert result.t1.series_instance_uid == patient.get("t1").series_uid  # type: ignore[attr-defined]
    assert result.t2.series_instance_uid == patient.get("t2").series_uid  # type: ignore[attr-defined]
    reasons = {entry.series_instance_uid: entry.reason for entry in result.skipped}
    assert len(reasons) == len(DISTRACTOR_REASONS)
    for kind, reason in DISTRACTOR_REASONS.items():
        assert reason in reasons[patient.get(kind).series_uid], (kind, reasons)  # type: ignore[attr-defined]


def test_selection_of_the_whole_cohort_folder_layout(studies: dict[str, PhantomStudy]) -> None:
    # Non-DICOM files next to the images (the cohort's masks) are ignored, not fatal.
    study = studies["siemens"]
    headers, unreadable = read_headers(sorted(p for p in study.root.rglob("*") if p.is_file()))
    assert unreadable == len(study.written.masks)
    assert select_series(headers).analysable


# -- volumes, orientation, crops -------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_volumes_match_the_simulation_and_its_masks(
    vendor: str, studies: dict[str, PhantomStudy]
) -> None:
    study = studies[vendor]
    for kind in ("t1", "t2"):
        simulated = study.patient.get(kind)  # type: ignore[attr-defined]
        files = sorted(study.series_dir(kind).iterdir())
        volume = load_series(files)
        np.testing.assert_array_equal(volume.array, simulated.pixels)
        np.testing.assert_allclose(volume.geometry.affine, simulated.geometry.affine, atol=1e-3)
        # Reversed file order gives the same volume (order comes from positions).
        np.testing.assert_array_equal(load_series(files[::-1]).array, volume.array)
        labelmap, affine = read_labelmap(study.mask_path(kind))
        np.testing.assert_array_equal(labelmap, simulated.labelmap)
        np.testing.assert_allclose(affine, volume.geometry.nifti_affine, atol=1e-3)


def test_mixed_series_are_rejected(studies: dict[str, PhantomStudy]) -> None:
    study = studies["ge"]
    mixed = [*study.series_dir("t1").iterdir(), *study.series_dir("t2").iterdir()]
    with pytest.raises(VolumeError, match="more than one series"):
        load_series(mixed)


def test_crops_identical_between_pipeline_and_train(studies: dict[str, PhantomStudy]) -> None:
    from train.datasets import build_crop_set
    from train.synthetic import to_patient_sample

    spec = PreprocessSpec()
    for study in studies.values():
        sample = to_patient_sample(study.patient)  # type: ignore[arg-type]
        for sequence, kind in (("T1", "t1"), ("T2", "t2")):
            training = build_crop_set([sample], sequence, spec)  # type: ignore[arg-type]
            volume = load_series(sorted(study.series_dir(kind).iterdir()))
            labelmap, _ = read_labelmap(study.mask_path(kind))
            inference = vertebra_crops(volume, labelmap, LUMBAR_LEVELS, spec)
            assert list(training.levels) == list(inference)
            for image, level in zip(training.images, training.levels, strict=True):
                # The training set stores crops as float16; the definition is the same.
                np.testing.assert_allclose(
                    image.astype(np.float32), inference[level], rtol=2e-3, atol=2e-3
                )


def test_vbq_agrees_with_the_phantom_calibration(studies: dict[str, PhantomStudy]) -> None:
    from train.phantom import vbq

    for study in studies.values():
        t1 = study.patient.get("t1")  # type: ignore[attr-defined]
        ours = vbq_score(t1.pixels.astype(np.float32), t1.labelmap, t1.geometry)
        theirs = vbq(t1.pixels, t1.labelmap, t1.geometry)
        assert ours.score is not None and theirs is not None
        assert ours.score == pytest.approx(theirs.score, rel=1e-6)


# -- analysis --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_analysis_finds_l1_to_l5_in_order(
    vendor: str, studies: dict[str, PhantomStudy], analyzer: Analyzer
) -> None:
    study = studies[vendor]
    result = analyzer.analyze_study(study.files())
    assert result.outcome == "analysed", result.reason
    assert result.demo_models and DEMO_NOTICE in result.notice
    assert {s.sequence for s in result.series} == {"T1", "T2"}
    for series in result.series:
        simulated = study.patient.get(series.sequence.lower())  # type: ignore[attr-defined]
        assert series.series_instance_uid == simulated.series_uid
        assert series.labelmap.shape == simulated.labelmap.shape
        dice = dice_per_level(series.labelmap, simulated.labelmap, LUMBAR_LEVELS)
        assert min(dice.values()) > 0.8, dice
        # Anatomical order: L1 is the most cranial, every next level lies lower.
        heights = [series.level(level).centroid_lps[2] for level in LUMBAR_LEVELS]  # type: ignore[index]
        assert heights == sorted(heights, reverse=True)
        for level in LUMBAR_LEVELS:
            info = series.level(level)
            assert info.found and info.label == LABEL_OF[level]
            assert info.probability is not None and 0.0 <= info.probability <= 1.0
        # Patient probability of the sequence: mean over L1-L4; threshold from the manifest.
        expected = float(np.mean([series.level(level).probability for level in SCORED_LEVELS]))
        assert series.probability == pytest.approx(expected)
        assert series.threshold == 0.42
        assert series.positive == (expected >= 0.42)
    patient = result.patient
    assert patient is not None and patient.sequences == ("T1", "T2")
    fused = np.mean([patient.probability_t1, patient.probability_t2])
    assert patient.probability == pytest.approx(fused)
    assert patient.osteoporosis == (fused >= 0.42)
    t1 = result.series_for("T1")
    assert t1 is not None and t1.vbq is not None and t1.vbq.score is not None
    assert patient.vbq == t1.vbq.score and 1.0 < patient.vbq < 6.0
    assert StudyResult.from_json(result.to_json()).to_json() == result.to_json()


def _config(tmp_path: Path, models_dir: Path) -> Path:
    config = tmp_path / "node.yaml"
    config.write_text(
        "pipeline:\n"
        "  device: cpu\n"
        f"  models_dir: {models_dir}\n"
        f"  classifier:\n    architecture: {TINY_CLASSIFIER}\n",
        encoding="utf-8",
    )
    return config


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "OPMRI_CONFIG"}
    env["COLUMNS"] = "160"
    return subprocess.run(
        [sys.executable, "-m", "opmri_node", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_analyze_command_end_to_end(
    studies: dict[str, PhantomStudy], models_dir: Path, tmp_path: Path
) -> None:
    study = studies["philips"]
    out = tmp_path / "out"
    run = _cli("analyze", str(study.study_dir), "--out", str(out), "--config",
               str(_config(tmp_path, models_dir)))  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    text = run.stdout
    for level in LUMBAR_LEVELS:
        assert f"│ {level}" in text
    assert "Osteoporosis:" in text and "VBQ score" in text and "DEMONSTRATION" in text
    assert "STIR_TSE_SAG" in text and "inversion recovery" in text  # skipped series listed
    result = StudyResult.from_json((out / "result.json").read_text())
    assert result.analysed and result.demo_models
    assert result.study_instance_uid == study.patient.study.study_uid  # type: ignore[attr-defined]
    assert {s.sequence for s in result.series} == {"T1", "T2"}
    assert len(result.skipped) == 3
    for entry in ("read_headers", "select", "load", "segment", "classify", "total"):
        assert entry in result.timings
    # The DICOM result objects, each valid for dciodvfy and in the source study.
    objects = sorted(out.glob("*.dcm"))
    assert [p.name for p in objects] == ["key-image.dcm", "seg-t1.dcm", "seg-t2.dcm", "sr.dcm"]
    for path in objects:
        assert dciodvfy_errors(path) == [], path.name
        assert pydicom.dcmread(path).StudyInstanceUID == result.study_instance_uid
        assert f"Wrote {path}" in " ".join(text.split())
    # Nothing that identifies the patient on the terminal.
    patient_info = study.patient.study  # type: ignore[attr-defined]
    for secret in (patient_info.patient_name, patient_info.patient_id, patient_info.study_uid):
        assert secret not in text and secret not in run.stderr


def test_analyze_command_not_analysable(
    studies: dict[str, PhantomStudy], models_dir: Path, tmp_path: Path
) -> None:
    study = studies["canon"]
    only_distractors = tmp_path / "study"
    for kind in ("stir", "axial_t2", "localizer"):
        shutil.copytree(study.series_dir(kind), only_distractors / kind)
    out = tmp_path / "out"
    run = _cli("analyze", str(only_distractors), "--out", str(out), "--config",
               str(_config(tmp_path, models_dir)))  # fmt: skip
    assert run.returncode == 3, run.stdout + run.stderr
    assert "Not analysable" in run.stdout
    assert [p.name for p in out.iterdir()] == ["result.json"]
    data = json.loads((out / "result.json").read_text())
    assert data["outcome"] == "not_analysable"
    assert "no sagittal T1- or T2-weighted series" in data["reason"]
    assert "inversion recovery" in data["reason"] and "not sagittal" in data["reason"]


def test_analyze_command_without_models(studies: dict[str, PhantomStudy], tmp_path: Path) -> None:
    run = _cli("analyze", str(studies["ge"].study_dir), "--out", str(tmp_path / "out"),
               "--models-dir", str(tmp_path / "none"), "--device", "cpu")  # fmt: skip
    assert run.returncode == 1
    assert "opmri-node models build-demo" in run.stderr
    assert "Traceback" not in run.stderr


def test_undecodable_series_falls_back_to_the_next_candidate(
    studies: dict[str, PhantomStudy], analyzer: Analyzer, tmp_path: Path
) -> None:
    from pydicom.uid import generate_uid

    study = studies["siemens"]
    copy = tmp_path / "study"
    shutil.copytree(study.study_dir, copy)
    t1_dir = copy / Path(study.written.series_dirs["t1"]).relative_to(study.written.study_dir)
    t2_dir = copy / Path(study.written.series_dirs["t2"]).relative_to(study.written.study_dir)
    # A repeat of the T2 series with a lower series number: it ranks second.
    repeat_dir, repeat_uid = copy / "repeat", generate_uid()
    repeat_dir.mkdir()
    for path in sorted(t2_dir.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = repeat_uid, 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(repeat_dir / path.name)
    # The best T2 and the only T1 series lose pixel data of one image each.
    for folder in (t1_dir, t2_dir):
        victim = sorted(folder.iterdir())[0]
        victim.write_bytes(victim.read_bytes()[:-4096])
    files = sorted(p for p in copy.rglob("*") if p.is_file())
    result = analyzer.analyze_study(files)
    assert result.analysed, result.reason
    assert [s.series_instance_uid for s in result.series] == [repeat_uid]
    assert result.patient is not None and result.patient.sequences == ("T2",)
    assert result.patient.vbq is None  # the VBQ needs the T1 series
    failures = {s.series_instance_uid: s.reason for s in result.skipped}
    for kind in ("t1", "t2"):
        assert "undecodable" in failures[study.patient.get(kind).series_uid]  # type: ignore[attr-defined]
    strict = Analyzer(analyzer.settings.model_copy(update={"require_both_sequences": True}))
    refused = strict.analyze_study(files)
    assert not refused.analysed and "both sequences are required" in (refused.reason or "")
