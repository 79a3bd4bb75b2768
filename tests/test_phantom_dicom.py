"""The synthetic cohort on disk: DICOM validity, vendor styles, transfer syntaxes, masks on
the exact grid of their series, labels.csv, determinism and the command line."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from opmri_node.cli import main
from pipeline.labels import CSF_LABEL, LABEL_OF
from tests.conftest import SyntheticCohort
from train.phantom import (
    TRANSFER_SYNTAXES,
    CohortOptions,
    LabelsError,
    generate_cohort,
    read_labels,
    simulate_patient,
)
from train.phantom.calibration import read_series_volume, report_for_cohort
from train.phantom.dicomio import read_labelmap, write_patient, write_series

VENDOR_DESCRIPTIONS = {
    "siemens": ("SIEMENS", "t1_tse_sag", "t2_tse_sag", "t2_tirm_sag", "t2_tse_tra", "localizer"),
    "ge": ("GE MEDICAL SYSTEMS", "Sag T1 FSE", "Sag T2 FRFSE", "Sag STIR", "Ax T2 FRFSE",
           "3-Plane Loc"),
    "philips": ("Philips Medical Systems", "T1W_TSE_SAG", "T2W_TSE_SAG", "STIR_TSE_SAG",
                "T2W_TSE_TRA", "Survey"),
    "canon": ("CANON_MEC", "T1_FSE_SAG", "T2_FSE_SAG", "STIR_SAG", "T2_FSE_AX", "Locator"),
}  # fmt: skip


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed; see `make system-deps`")
    return path


def dciodvfy(paths: list[Path]) -> dict[Path, list[str]]:
    """Run dciodvfy on each file; returns the error lines per file (empty when valid).

    dicom3tools cannot read Deflated Explicit VR Little Endian: such a file is first inflated
    by dcmtk's ``dcmconv`` (which proves the deflate stream decodes) and the inflated dataset
    is verified.
    """
    tool = _tool("dciodvfy")
    env = {**os.environ, "TCP_NODELAY": "1"}
    errors = {}
    for path in paths:
        target = path
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        if meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian:
            target = path.with_suffix(".inflated")
            subprocess.run(
                [_tool("dcmconv"), "+te", str(path), str(target)], check=True, timeout=60, env=env
            )
        run = subprocess.run(
            [tool, str(target)], capture_output=True, text=True, timeout=60, env=env
        )
        output = run.stdout + run.stderr
        assert "MRImage" in output, f"dciodvfy did not recognise {path}: {output}"
        errors[path] = [line for line in output.splitlines() if line.startswith("Error")]
    return errors


def test_every_file_of_the_cohort_is_valid(synthetic_cohort: SyntheticCohort) -> None:
    files = [f for p in synthetic_cohort.labels for f in synthetic_cohort.study_files(p)]
    assert len(files) >= 4 * (9 + 3 * 11 + 20)
    errors = {path: lines for path, lines in dciodvfy(files).items() if lines}
    assert not errors, errors


def test_labels_csv_describes_the_written_cohort(synthetic_cohort: SyntheticCohort) -> None:
    labels = synthetic_cohort.labels
    assert [label.index for label in labels] == [0, 1, 2, 3]
    assert {label.vendor for label in labels} == {"siemens", "ge", "philips", "canon"}
    assert {label.dxa_class for label in labels} == {"osteoporosis", "osteopenia", "normal"}
    for label in labels:
        assert label.study_dir.is_dir()
        assert label.study_dir == synthetic_cohort.root / "studies" / label.patient_id
        assert label.osteoporosis == (label.t_score <= -2.5)
        # DXA reports the lowest level, leaving out fractured vertebrae (if two remain).
        valid = [v for level, v in label.dxa.items() if not label.fracture[level]]
        assert label.t_score == min(valid if len(valid) >= 2 else label.dxa.values())
        assert set(label.bmd_t) == set(LABEL_OF) and set(label.fat_fraction) == set(LABEL_OF)
        for kind in ("t1", "t2", "stir"):
            series_dir, mask = label.series_dir(kind), label.mask(kind)
            assert series_dir is not None and series_dir.is_dir()
            assert mask is not None and mask.is_file()
            ds = pydicom.dcmread(next(series_dir.glob("*.dcm")), stop_before_pixels=True)
            assert ds.SeriesInstanceUID == label.series_uid(kind)
            assert ds.StudyInstanceUID == label.study_instance_uid
            assert ds.PatientID == label.patient_id
            assert ds.Manufacturer == label.manufacturer
            assert float(ds.MagneticFieldStrength) == label.field_strength
            assert int(ds.Rows) == label.matrix


def test_masks_lie_on_the_exact_grid_of_their_series(synthetic_cohort: SyntheticCohort) -> None:
    """Geometry round trip: the NIfTI affine maps each mask voxel onto the DICOM pixel it
    labels, and the labelled pixels carry the expected signal."""
    for label in synthetic_cohort.labels:
        for kind in ("t1", "t2", "stir"):
            series_dir, mask_path = label.series_dir(kind), label.mask(kind)
            assert series_dir is not None and mask_path is not None
            pixels, geometry = read_series_volume(series_dir)
            labelmap, affine = read_labelmap(mask_path)
            assert labelmap.shape == pixels.shape
            files = sorted(series_dir.glob("*.dcm"))
            datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            for ds in datasets[:: max(1, len(datasets) // 4)]:
                # NIfTI voxel (i, j, k) -> RAS -> LPS must be the DICOM pixel position.
                ipp = np.array([float(v) for v in ds.ImagePositionPatient])
                iop = np.array([float(v) for v in ds.ImageOrientationPatient])
                spacing = [float(v) for v in ds.PixelSpacing]
                along = (ipp - np.array(geometry.origin)) @ np.array(geometry.normal)
                k = round(along / geometry.spacing[0])
                assert abs(along - k * geometry.spacing[0]) < 1e-3
                for j, i in ((0, 0), (17, 203), (pixels.shape[1] - 1, 5)):
                    ras = affine @ np.array([i, j, k, 1.0])
                    lps = ras[:3] * np.array([-1.0, -1.0, 1.0])
                    expected = ipp + i * spacing[1] * iop[:3] + j * spacing[0] * iop[3:]
                    assert np.allclose(lps, expected, atol=1e-3)
            nifti = nib.load(mask_path)
            assert int(nifti.header["sform_code"]) == 1 and int(nifti.header["intent_code"]) == 1002
            # The labels sit on structures of the expected brightness.
            body = np.isin(labelmap, [LABEL_OF[lv] for lv in ("L1", "L2", "L3", "L4")])
            csf = labelmap == CSF_LABEL
            ring = body ^ _dilate(body)
            if kind == "t2":
                assert np.median(pixels[csf]) > 1.5 * np.median(pixels[body])
            if kind == "t1":
                assert np.median(pixels[body]) > 1.5 * np.median(pixels[csf])
            # The mask edge is an intensity edge: its outer ring differs from its inside.
            assert abs(np.median(pixels[ring]) - np.median(pixels[body])) > 0.05 * np.median(
                pixels[body]
            )


def _dilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=np.ones((1, 5, 5), bool))


def test_stored_pixels_equal_the_simulation(synthetic_cohort: SyntheticCohort) -> None:
    options = synthetic_cohort.options
    label = synthetic_cohort.labels[1]
    patient = simulate_patient(options.seed, label.index, options)
    for kind in ("t1", "t2", "stir"):
        pixels, _ = read_series_volume(label.series_dir(kind))  # type: ignore[arg-type]
        labelmap, _ = read_labelmap(label.mask(kind))  # type: ignore[arg-type]
        assert np.array_equal(pixels, patient.get(kind).pixels)
        assert np.array_equal(labelmap, patient.get(kind).labelmap)


def test_instance_numbers_run_both_ways(synthetic_cohort: SyntheticCohort) -> None:
    directions = set()
    for label in synthetic_cohort.labels:
        for kind in ("t1", "t2", "stir"):
            datasets = [
                pydicom.dcmread(f, stop_before_pixels=True)
                for f in label.series_dir(kind).glob("*.dcm")  # type: ignore[union-attr]
            ]
            iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
            normal = np.cross(iop[:3], iop[3:])
            datasets.sort(key=lambda ds: np.array(ds.ImagePositionPatient, float) @ normal)
            numbers = [int(ds.InstanceNumber) for ds in datasets]
            assert numbers in (list(range(1, len(numbers) + 1)), list(range(len(numbers), 0, -1)))
            directions.add(numbers[0] == 1)
    assert directions == {True, False}


@pytest.mark.parametrize("vendor", sorted(VENDOR_DESCRIPTIONS))
def test_vendor_styles(vendor: str, tmp_path: Path) -> None:
    options = CohortOptions(seed=21, vendors=(vendor,))
    patient = simulate_patient(21, 0, options)
    written = write_patient(patient, tmp_path, options.transfer_syntax_uid)
    manufacturer, t1, t2, stir, axial, localizer = VENDOR_DESCRIPTIONS[vendor]
    expected = {"t1": t1, "t2": t2, "stir": stir, "axial_t2": axial, "localizer": localizer}
    first_files = []
    for kind, description in expected.items():
        files = sorted((tmp_path / written.series_dirs[kind]).glob("*.dcm"))
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.Manufacturer == manufacturer
        assert ds.SeriesDescription == description
        assert ds.ProtocolName == description
        assert ds.Modality == "MR" and ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.PatientName == f"SYNTH^PATIENT{patient.index + 1:05d}"
        if kind == "stir":
            assert "IR" in ds.ScanningSequence and 140 <= float(ds.InversionTime) <= 190
        else:
            assert "InversionTime" not in ds
        if vendor == "philips":
            assert int(ds.SeriesNumber) % 100 == 1
        first_files.append(files[0])
    errors = {path: lines for path, lines in dciodvfy(first_files).items() if lines}
    assert not errors, errors


@pytest.mark.parametrize("name", sorted(TRANSFER_SYNTAXES))
def test_transfer_syntaxes_decode_identically(name: str, tmp_path: Path) -> None:
    options = CohortOptions(seed=4, series=("t1",), transfer_syntax=name)  # type: ignore[arg-type]
    patient = simulate_patient(4, 0, options)
    t1 = patient.get("t1")
    write_series(patient, t1, tmp_path, options.transfer_syntax_uid)
    files = sorted(tmp_path.glob("*.dcm"))
    assert len(files) == len(t1.planes)
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[name]  # type: ignore[index]
        k = t1.sop_instance_uids.index(ds.SOPInstanceUID)
        assert np.array_equal(ds.pixel_array, t1.pixels[k]), path.name
    errors = {path: lines for path, lines in dciodvfy(files[:3]).items() if lines}
    assert not errors, errors


def test_generation_is_byte_identical(tmp_path: Path) -> None:
    options = CohortOptions(n_patients=2, seed=33, series=("localizer", "t1"))
    first = tmp_path / "first"
    second = tmp_path / "second"
    generate_cohort(first, options, workers=2)
    generate_cohort(second, options, workers=1)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert any(f.suffix == ".dcm" for f in files) and any(f.name.endswith(".nii.gz") for f in files)
    _, mismatch, errors = filecmp.cmpfiles(first, second, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors


def test_report_from_files_equals_the_generated_report(synthetic_cohort: SyntheticCohort) -> None:
    written = json.loads((synthetic_cohort.root / "calibration.json").read_text())
    report, _ = report_for_cohort(synthetic_cohort.root)
    assert [p["vbq"] for p in report["patients"]] == [p["vbq"] for p in written["patients"]]
    assert all(p["vbq"] is not None and 1.0 < p["vbq"] < 6.0 for p in written["patients"])
    assert report["oracle"] == written["oracle"]
    assert report["vbq"] == written["vbq"]
    assert (synthetic_cohort.root / "calibration_roc.png").stat().st_size > 1000
    meta = json.loads((synthetic_cohort.root / "cohort.json").read_text())
    assert meta["seed"] == synthetic_cohort.options.seed
    assert CohortOptions.model_validate(meta["options"]) == synthetic_cohort.options


def test_read_labels_rejects_malformed_files(
    synthetic_cohort: SyntheticCohort, tmp_path: Path
) -> None:
    with pytest.raises(LabelsError, match="cannot read"):
        read_labels(tmp_path / "missing.csv")
    header, first = synthetic_cohort.labels_csv.read_text().splitlines()[:2]
    broken = tmp_path / "labels.csv"
    for bad in (first.replace(",-", ",x", 1), first.replace("osteop", "brittle", 1)):
        broken.write_text(f"{header}\n{bad}\n")
        with pytest.raises(LabelsError, match=r"labels.csv:2"):
            read_labels(broken)
    header_only = tmp_path / "header.csv"
    header_only.write_text("patient_id,index\n")
    with pytest.raises(LabelsError, match="missing columns"):
        read_labels(header_only)


def test_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cohort"
    result = runner.invoke(
        main,
        ["synth", "--out", str(out), "--patients", "2", "--seed", "8", "--vendor", "ge",
         "--field-strength", "3", "--matrix", "320", "--transfer-syntax", "rle",
         "--series", "t1", "--series", "localizer", "--workers", "1", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "VBQ" in result.output and "oracle" in result.output
    labels = read_labels(out / "labels.csv")
    assert [label.vendor for label in labels] == ["ge", "ge"]
    assert {label.field_strength for label in labels} == {3.0}
    assert labels[0].t2_series_uid is None and labels[0].t2_mask is None
    ds = pydicom.dcmread(next(labels[0].t1_series_dir.glob("*.dcm")))  # type: ignore[union-attr]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless

    report = runner.invoke(main, ["synth-report", str(out), "--json", "--no-write"])
    assert report.exit_code == 0, report.output
    summary = json.loads(report.output)
    written = json.loads((out / "calibration.json").read_text())
    assert summary["vbq"] == written["vbq"] and summary["n_patients"] == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["synth", "--patients", "0", "--out", "x"], "--patients"),
        (["synth", "--patients", "2"], "--out"),
        (["synth", "--patients", "1", "--out", "x", "--matrix", "256"], "--matrix"),
        (["synth", "--patients", "1", "--out", "x", "--vendor", "agfa"], "--vendor"),
        (["synth", "--patients", "1", "--out", "x", "--transfer-syntax", "jpeg"],
         "--transfer-syntax"),
    ],
)  # fmt: skip
def test_command_line_rejects_bad_options(arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2
    assert message in result.output


def test_report_of_a_folder_without_labels_fails_cleanly(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["synth-report", str(tmp_path)])
    assert result.exit_code == 1
    assert "labels" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name", ["explicit-le", "implicit-le", "deflated-le", "explicit-be"])
def test_native_writer_writes_what_pydicom_writes(name: str, tmp_path: Path) -> None:
    """The series writer encodes shared attributes once; its files are byte-identical to
    pydicom's own ``save_as`` of the complete datasets."""
    from train.phantom.dicomio import encode, image_datasets, instance_file

    options = CohortOptions(seed=6, series=("localizer",))
    patient = simulate_patient(6, 0, options)
    series = patient.get("localizer")
    syntax = TRANSFER_SYNTAXES[name]  # type: ignore[index]
    write_series(patient, series, tmp_path / "ours", syntax)
    reference = tmp_path / "pydicom"
    reference.mkdir()
    for k, ds in enumerate(image_datasets(patient, series)):
        encode(ds, series.pixels[k], syntax)
        ds.save_as(reference / instance_file(int(ds.InstanceNumber)), enforce_file_format=True)
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ours").iterdir())
    _, mismatch, errors = filecmp.cmpfiles(reference, tmp_path / "ours", names, shallow=False)
    assert not mismatch and not errors


def test_report_names_a_damaged_cohort_cleanly(
    synthetic_cohort: SyntheticCohort, tmp_path: Path
) -> None:
    copy = tmp_path / "damaged"
    shutil.copytree(synthetic_cohort.root, copy)
    victim = read_labels(copy / "labels.csv")[2]
    first = sorted(victim.t1_series_dir.glob("*.dcm"))[0]  # type: ignore[union-attr]
    first.write_bytes(first.read_bytes()[:3000])  # truncated in the pixel data
    result = CliRunner().invoke(main, ["synth-report", str(copy), "--no-write"])
    assert result.exit_code == 1
    assert "patient at index 2" in result.output and "Traceback" not in result.output
