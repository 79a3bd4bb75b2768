"""``opmri-node analyze --out DIR`` writes the same DICOM objects the node sends to the PACS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.data import get_testdata_file

from tests.conftest import SyntheticCohort, TinyModels
from tests.node_fixtures import dciodvfy_errors

REPO = Path(__file__).resolve().parent.parent


def analyze(study: Path, out: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opmri_node", "analyze", str(study), "--out", str(out),
         "--config", str(config)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "COLUMNS": "200"}, check=False,
    )


def write_config(folder: Path, models: TinyModels) -> Path:
    path = folder / "node.yaml"
    path.write_text(
        "pipeline:\n"
        "  device: cpu\n"
        f"  models_dir: {models.models_dir}\n"
        "  classifier:\n"
        f"    architecture: {models.architecture}\n",
        encoding="utf-8",
    )
    return path


def test_analyze_writes_seg_sr_and_key_image(
    tmp_path: Path, synthetic_cohort: SyntheticCohort, result_models: TinyModels
) -> None:
    patient = synthetic_cohort.labels[0]
    out = tmp_path / "out"
    done = analyze(patient.study_dir, out, write_config(tmp_path, result_models))
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(path.name for path in out.iterdir())
    assert names == ["key-image.dcm", "result.json", "seg-t1.dcm", "seg-t2.dcm", "sr.dcm"]
    for name in ("seg-t1.dcm", "seg-t2.dcm", "sr.dcm", "key-image.dcm"):
        assert f"Wrote {out / name}" in done.stdout
        assert dciodvfy_errors(out / name) == [], name
        ds = pydicom.dcmread(out / name, stop_before_pixels=True)
        assert ds.StudyInstanceUID == patient.study_instance_uid
    sr = hd.sr.srread(out / "sr.dcm")
    seg_uids = {pydicom.dcmread(out / n).SOPInstanceUID for n in ("seg-t1.dcm", "seg-t2.dcm")}
    referenced = {
        group.referenced_segment.referenced_sop_instance_uid
        for group in sr.content.get_volumetric_roi_measurement_groups()
        if group.referenced_segment is not None
    }
    assert referenced == seg_uids


def test_analyze_of_a_non_lumbar_study_writes_no_objects(
    tmp_path: Path, result_models: TinyModels
) -> None:
    study = tmp_path / "study"
    study.mkdir()
    source = get_testdata_file("MR_small.dcm")
    assert source is not None
    (study / "mr.dcm").write_bytes(Path(source).read_bytes())
    out = tmp_path / "out"
    done = analyze(study, out, write_config(tmp_path, result_models))
    assert done.returncode == 3, done.stdout + done.stderr
    assert sorted(path.name for path in out.iterdir()) == ["result.json"]
