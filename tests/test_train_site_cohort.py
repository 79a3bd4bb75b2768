"""The site-cohort CSV: clear errors for missing files and bad values; loading real DICOM
studies with mask files through the pipeline's loaders."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from train.phantom.dicomio import write_labelmap, write_patient
from train.phantom.options import CohortOptions
from train.phantom.simulate import simulate_patient
from train.site_cohort import (
    SiteCohortError,
    load_site_patient,
    read_mask,
    read_site_cohort,
)

HEADER = "patient_id,study_dir,dxa_t_score,dxa_label,dxa_date,mri_date,t1_mask,t2_mask\n"


def _study(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "image.dcm").write_bytes(b"placeholder")
    return folder


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_rows_are_read(tmp_path: Path) -> None:
    _study(tmp_path, "s1")
    _study(tmp_path, "s2")
    (tmp_path / "m1.nii.gz").write_bytes(b"x")
    csv = _write(
        tmp_path / "cohort.csv",
        HEADER
        + "A1,s1,-2.7,,2023-04-18,2023-05-02,m1.nii.gz,\n"
        + "A2,s2,,normal,20230109,,,\n",
    )
    cohort = read_site_cohort(csv)
    first, second = cohort.rows
    assert first.osteoporosis and first.t_score == pytest.approx(-2.7)
    assert first.masks == {"T1": tmp_path / "m1.nii.gz"}
    assert not second.osteoporosis and second.t_score is None
    assert second.dxa_date.isoformat() == "2023-01-09"
    assert cohort.positives == 1


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("P,missing,-2.7,,2023-01-01,,,", ":2: study_dir: folder"),
        ("P,s1,abc,,2023-01-01,,,", ":2: dxa_t_score: 'abc' is not a number"),
        ("P,s1,-9.5,,2023-01-01,,,", ":2: dxa_t_score: -9.5 is outside -7.0 to 5.0"),
        ("P,s1,,,2023-01-01,,,", ":2: dxa_t_score: neither a T-score nor a dxa_label"),
        ("P,s1,,weak,2023-01-01,,,", ":2: dxa_label: 'weak' is not one of"),
        ("P,s1,-1.0,osteoporosis,2023-01-01,,,", ":2: dxa_label: 'osteoporosis' contradicts"),
        ("P,s1,-3.0,,2023-02-30,,,", ":2: dxa_date: '2023-02-30' is not a date"),
        ("P,s1,-3.0,,,,,", ":2: dxa_date: empty"),
        ("P,s1,-3.0,,2020-01-01,2023-01-01,,", ":2: mri_date: MRI and DXA are 1096 days apart"),
        ("P,s1,-3.0,,2023-01-01,,nothere.nii.gz,", ":2: t1_mask: mask file"),
        ("P,s1,-3.0,,2023-01-01,,,mask.png", ":2: t2_mask: mask.png is not a NIfTI file"),
        (",s1,-3.0,,2023-01-01,,,", ":2: patient_id: empty"),
        ("P,s1,-3.0,,2023-01-01,,,,extra", ":2: more values than columns"),
    ],
)
def test_row_errors_name_line_and_column(tmp_path: Path, row: str, expected: str) -> None:
    _study(tmp_path, "s1")
    (tmp_path / "mask.png").write_bytes(b"x")
    csv = _write(tmp_path / "cohort.csv", HEADER + row + "\n")
    with pytest.raises(SiteCohortError) as info:
        read_site_cohort(csv)
    message = str(info.value)
    assert expected in message, message
    assert str(csv) in message


def test_all_problems_are_listed_and_ids_never_shown(tmp_path: Path) -> None:
    _study(tmp_path, "s1")
    csv = _write(
        tmp_path / "cohort.csv",
        HEADER
        + "MRN-123456,s1,-3.0,,2023-01-01,,,\n"
        + "MRN-123456,s1,-1.0,,2023-01-01,,,\n"
        + "MRN-777777,s1,x,,2023-01-01,,,\n",
    )
    with pytest.raises(SiteCohortError) as info:
        read_site_cohort(csv)
    assert len(info.value.issues) == 2
    assert ":3: patient_id: repeats the patient of line 2" in str(info.value)
    assert ":4: dxa_t_score" in str(info.value)
    assert "MRN-" not in str(info.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("patient_id,study_dir,dxa_date\n", "missing column(s) dxa_t_score or dxa_label"),
        ("patient_id,study,dxa_t_score,dxa_date\n", "unknown column(s) study"),
        ("", "the file is empty"),
    ],
)
def test_header_errors(tmp_path: Path, header: str, expected: str) -> None:
    csv = _write(tmp_path / "cohort.csv", header)
    with pytest.raises(SiteCohortError, match=r"(?s)" + expected.replace("(", r"\(")
                       .replace(")", r"\)")):  # fmt: skip
        read_site_cohort(csv)


def test_missing_csv_and_empty_cohort(tmp_path: Path) -> None:
    with pytest.raises(SiteCohortError, match="no such file"):
        read_site_cohort(tmp_path / "absent.csv")
    csv = _write(tmp_path / "cohort.csv", HEADER)
    with pytest.raises(SiteCohortError, match="no patient rows"):
        read_site_cohort(csv)


@pytest.fixture(scope="module")
def written_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    root = tmp_path_factory.mktemp("site")
    options = CohortOptions(n_patients=1, seed=41, series=("t1", "t2"))
    patient = simulate_patient(41, 0, options)
    written = write_patient(patient, root, ExplicitVRLittleEndian)
    return root, patient, written


def test_site_patient_loads_dicom_and_masks(written_study: tuple[Path, object, object]) -> None:
    root, patient, written = written_study
    csv = _write(
        root / "cohort.csv",
        HEADER
        + f"X1,{written.study_dir},-2.9,,2018-01-01,,{written.masks['t1']},"  # type: ignore[attr-defined]
        + f"{written.masks['t2']}\n",  # type: ignore[attr-defined]
    )
    row = read_site_cohort(csv, max_gap_days=100_000).rows[0]
    sample = load_site_patient(row, max_gap_days=100_000)
    assert sample.osteoporosis and set(sample.series) == {"T1", "T2"}
    for sequence, kind in (("T1", "t1"), ("T2", "t2")):
        series = sample.series[sequence]
        truth = patient.get(kind)  # type: ignore[attr-defined]
        assert series.label_source == "file"
        np.testing.assert_array_equal(series.array, truth.pixels.astype(np.float32))
        np.testing.assert_array_equal(series.labelmap, truth.labelmap)


def test_site_patient_without_mask_needs_a_segmenter(
    written_study: tuple[Path, object, object],
) -> None:
    root, _, written = written_study
    csv = _write(
        root / "nomask.csv",
        HEADER + f"X1,{written.study_dir},-2.9,,2018-01-01,,,\n",  # type: ignore[attr-defined]
    )
    row = read_site_cohort(csv, max_gap_days=100_000).rows[0]
    with pytest.raises(SiteCohortError, match="line 2: t1_mask: no mask file and no segmenter"):
        load_site_patient(row, max_gap_days=100_000)
    with pytest.raises(SiteCohortError, match="line 2: mri_date: MRI and DXA are"):
        load_site_patient(row, max_gap_days=10)


def test_mask_on_flipped_axes_is_accepted_and_foreign_grid_rejected(
    written_study: tuple[Path, object, object], tmp_path: Path
) -> None:
    from pipeline.volume import load_series

    root, patient, written = written_study
    t1_folder = root / written.series_dirs["t1"]  # type: ignore[attr-defined]
    volume = load_series(sorted(t1_folder.iterdir()))
    truth = patient.get("t1")  # type: ignore[attr-defined]
    # The same label map stored with its j axis reversed (affine adjusted): same voxels.
    path = tmp_path / "flipped.nii.gz"
    data = np.transpose(truth.labelmap, (2, 1, 0))[:, ::-1, :]
    affine = volume.geometry.nifti_affine.copy()
    affine[:3, 3] += affine[:3, 1] * (data.shape[1] - 1)
    affine[:3, 1] *= -1
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    np.testing.assert_array_equal(read_mask(path, volume), truth.labelmap)
    # A mask whose grid is shifted by half a voxel does not belong to this series.
    shifted = tmp_path / "shifted.nii.gz"
    geometry = volume.geometry
    moved = type(geometry)(
        origin=(geometry.origin[0], geometry.origin[1] + 0.5 * geometry.spacing[2],
                geometry.origin[2]),
        row_cosines=geometry.row_cosines, col_cosines=geometry.col_cosines,
        normal=geometry.normal, spacing=geometry.spacing, shape=geometry.shape,
    )  # fmt: skip
    write_labelmap(truth.labelmap, moved, shifted)
    with pytest.raises(ValueError, match="does not lie on the grid"):
        read_mask(shifted, volume)
    bad_values = tmp_path / "values.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 42, np.uint8), np.eye(4)), str(bad_values))
    with pytest.raises(ValueError, match=r"outside 0\.\.8"):
        read_mask(bad_values, volume)
