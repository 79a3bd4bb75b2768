"""Volume loading: every transfer syntax, slice order by position, geometry, rejections."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pipeline.volume import DECODABLE_TRANSFER_SYNTAXES, VolumeError, load_series
from tests.pipeline_fixtures import (
    AXIAL_IOP,
    SAGITTAL_IOP,
    dcmtk_convert,
    htj2k_convert,
    set_raw,
    write_series,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def smooth_volume(shape: tuple[int, int, int] = (5, 40, 48), seed: int = 0) -> np.ndarray:
    """12-bit test volume with structure (compresses like an image, unlike noise)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape, dtype=np.float64)
    base = 1500 + 900 * np.sin(j / 6.0 + k) * np.cos(i / 9.0) + 400 * (i / shape[2])
    return np.clip(base + rng.normal(0, 20, shape), 0, 4095).astype(np.uint16)


# -- pydicom's bundled scanner files ---------------------------------------------------------

BUNDLED_LOSSLESS = [
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", BUNDLED_LOSSLESS)
def test_bundled_mr_files_decode_to_the_reference_pixels(name: str, tmp_path: Path) -> None:
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    expected = reference.pixel_array.astype(np.float32) * float(
        reference.get("RescaleSlope", 1)
    ) + float(reference.get("RescaleIntercept", 0))
    volume = load_series([get_testdata_file(name)])
    assert volume.array.shape == (1, 64, 64)
    np.testing.assert_array_equal(volume.array[0], expected)
    assert volume.transfer_syntaxes[0] in DECODABLE_TRANSFER_SYNTAXES


def test_truncated_pixel_data_is_rejected_with_a_reason() -> None:
    with pytest.raises(VolumeError, match="cannot be decoded"):
        load_series([get_testdata_file("MR_truncated.dcm")])


def test_non_dicom_file_is_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(VolumeError, match="not a DICOM file"):
        load_series([junk])


def test_non_image_object_is_rejected() -> None:
    with pytest.raises(VolumeError, match="no pixel data"):
        load_series([get_testdata_file("test-SR.dcm")])


# -- a multi-slice series in every transfer syntax -------------------------------------------

DCMTK_LOSSLESS = [
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
]


@pytest.fixture(scope="module")
def source_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    array = smooth_volume()
    written = write_series(
        tmp_path_factory.mktemp("explicit"), array, order=[3, 0, 4, 1, 2], slope=2.0,
        intercept=-100.0,
    )
    return written.paths, array.astype(np.float32) * 2.0 - 100.0


@pytest.mark.parametrize("syntax", DCMTK_LOSSLESS, ids=lambda uid: uid.name)
def test_dcmtk_converted_lossless_series_load_exactly(
    syntax: str, source_series: tuple[list[Path], np.ndarray], tmp_path: Path
) -> None:
    paths, expected = source_series
    converted = dcmtk_convert(paths, tmp_path, syntax)
    assert pydicom.dcmread(converted[0]).file_meta.TransferSyntaxUID == syntax
    volume = load_series(converted)
    np.testing.assert_array_equal(volume.array, expected)
    assert set(volume.transfer_syntaxes) == {syntax}


@pytest.mark.parametrize(
    ("syntax", "tolerance"),
    [(JPEGExtended12Bit, 60.0), (JPEGLSNearLossless, 2 * 2.0 + 1e-3)],
    ids=["JPEGExtended12Bit", "JPEGLSNearLossless"],
)
def test_dcmtk_converted_lossy_series_load_close(
    syntax: str, tolerance: float, source_series: tuple[list[Path], np.ndarray], tmp_path: Path
) -> None:
    paths, expected = source_series
    volume = load_series(dcmtk_convert(paths, tmp_path, syntax))
    assert volume.array.shape == expected.shape
    # Pixel errors are in stored units; slope 2 doubles them.
    assert np.abs(volume.array - expected).max() <= tolerance
    assert np.abs(volume.array - expected).mean() < tolerance / 1.5


def test_jpeg_baseline_8bit_series(tmp_path: Path) -> None:
    array = (smooth_volume() // 16).astype(np.uint8)
    written = write_series(tmp_path / "src", array, bits_stored=8)
    volume = load_series(dcmtk_convert(written.paths, tmp_path / "jpeg", JPEGBaseline8Bit))
    assert pydicom.dcmread(volume.paths[0]).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert np.abs(volume.array - array).mean() < 3.0


@pytest.mark.parametrize(
    ("syntax", "kwargs", "tolerance"),
    [(JPEG2000Lossless, {}, 0.0), (JPEG2000, {"j2k_psnr": [70]}, 40.0)],
    ids=["JPEG2000Lossless", "JPEG2000"],
)
def test_jpeg2000_series(
    syntax: str, kwargs: dict[str, list[int]], tolerance: float, tmp_path: Path
) -> None:
    array = smooth_volume()
    written = write_series(tmp_path, array, transfer_syntax=syntax, compress_kwargs=kwargs)
    volume = load_series(written.paths)
    assert set(volume.transfer_syntaxes) == {syntax}
    assert np.abs(volume.array - array).max() <= tolerance


@pytest.mark.parametrize(
    ("syntax", "level", "tolerance"),
    [(HTJ2KLossless, None, 0.0), (HTJ2KLosslessRPCL, None, 0.0), (HTJ2K, 0.0002, 60.0)],
    ids=["HTJ2KLossless", "HTJ2KLosslessRPCL", "HTJ2K"],
)
def test_htj2k_series(
    syntax: str,
    level: float | None,
    tolerance: float,
    source_series: tuple[list[Path], np.ndarray],
    tmp_path: Path,
) -> None:
    paths, expected = source_series
    volume = load_series(htj2k_convert(paths, tmp_path, syntax, level))
    assert set(volume.transfer_syntaxes) == {syntax}
    assert np.abs(volume.array - expected).max() <= tolerance


def test_jpeg2000_multicomponent_is_rejected_with_a_reason(
    source_series: tuple[list[Path], np.ndarray], tmp_path: Path
) -> None:
    paths, _ = source_series
    converted = htj2k_convert(paths[:2], tmp_path, pydicom.uid.JPEG2000MCLossless)
    with pytest.raises(VolumeError, match="cannot be decoded"):
        load_series(converted)


def test_every_advertised_transfer_syntax_is_covered_here() -> None:
    covered = {
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        HTJ2K,
        *DCMTK_LOSSLESS,
        JPEGExtended12Bit,
        JPEGLSNearLossless,
        JPEGBaseline8Bit,
        JPEG2000Lossless,
        JPEG2000,
        pydicom.uid.ExplicitVRLittleEndian,
    }
    assert set(DECODABLE_TRANSFER_SYNTAXES) == covered


# -- ordering and geometry ---------------------------------------------------------------------


def test_slices_are_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    array = smooth_volume((6, 20, 24))
    forward = load_series(write_series(tmp_path / "a", array).paths)
    # Files written in reverse: InstanceNumber 1 is now the last slice along the normal.
    reverse = load_series(write_series(tmp_path / "b", array, order=[5, 4, 3, 2, 1, 0]).paths)
    np.testing.assert_array_equal(forward.array, array)
    np.testing.assert_array_equal(reverse.array, array)
    numbers = [int(ds.InstanceNumber) for ds in reverse.headers]
    assert numbers == [6, 5, 4, 3, 2, 1]


def test_geometry_maps_indices_to_image_positions(tmp_path: Path) -> None:
    array = smooth_volume((4, 20, 24))
    written = write_series(
        tmp_path, array, pixel_spacing=(0.8, 0.7), slice_spacing=3.5, order=[2, 0, 3, 1]
    )
    volume = load_series(written.paths)
    geometry = volume.geometry
    assert geometry.shape == (4, 20, 24)
    assert geometry.spacing == pytest.approx((3.5, 0.8, 0.7))
    assert geometry.normal == pytest.approx((-1.0, 0.0, 0.0))  # sagittal: k runs right to left
    for k, ds in enumerate(volume.headers):
        np.testing.assert_allclose(
            geometry.index_to_lps(np.array([k, 0, 0])), [float(v) for v in ds.ImagePositionPatient]
        )
    # Pixel (j, i) = (2, 3) lies 3 columns along the row direction, 2 rows along the column one.
    row, col = np.array(SAGITTAL_IOP[:3]), np.array(SAGITTAL_IOP[3:])
    start = np.array(volume.headers[1].ImagePositionPatient, float)
    expected = start + 3 * 0.7 * row + 2 * 0.8 * col
    np.testing.assert_allclose(geometry.index_to_lps(np.array([1, 2, 3])), expected)
    # The NIfTI affine is the same mapping for (i, j, k) in RAS.
    ras = geometry.nifti_affine @ np.array([3, 2, 1, 1.0])
    np.testing.assert_allclose(ras[:3], expected * np.array([-1, -1, 1]))
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in volume.headers)
    assert not volume.array.flags.writeable


def test_rescale_slope_and_intercept_are_applied_per_slice(tmp_path: Path) -> None:
    array = smooth_volume((3, 10, 12))
    written = write_series(tmp_path, array, slope=0.5, intercept=10.0)
    # One slice with its own rescale.
    ds = pydicom.dcmread(written.paths[1])
    ds.RescaleSlope, ds.RescaleIntercept = 3.0, -7.0
    ds.save_as(written.paths[1])
    volume = load_series(written.paths)
    np.testing.assert_allclose(volume.array[0], array[0] * 0.5 + 10.0)
    np.testing.assert_allclose(volume.array[1], array[1] * 3.0 - 7.0)
    assert volume.array.dtype == np.float32


# -- inconsistent series -------------------------------------------------------------------------


def _edit(path: Path, **changes: object) -> None:
    """Change attributes of a file; strings are stored raw (to write broken values)."""
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if isinstance(value, str):
            set_raw(ds, key, value)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ImageOrientationPatient": list(AXIAL_IOP)}, "different ImageOrientationPatient"),
        ({"PixelSpacing": [0.9, 0.7]}, "different PixelSpacing"),
        ({"ImagePositionPatient": [-35.5, -80.0, 140.0]}, "share the same slice position"),
        ({"ImagePositionPatient": [-32.0, -60.0, 140.0]}, "not stacked along the slice normal"),
        ({"SeriesInstanceUID": "1.2.3.4"}, "more than one series"),
        ({"ImageOrientationPatient": [0, 1, 0, 0, 1, 0]}, "not orthogonal"),
        ({"PhotometricInterpretation": "MONOCHROME1"}, "MONOCHROME1"),
        ({"HighBit": 15}, "HighBit"),
        ({"Rows": 5000}, "outside"),
        ({"RescaleSlope": "steep"}, "RescaleSlope is not a number"),
    ],
    ids=[
        "orientation",
        "spacing",
        "duplicate-position",
        "shifted-slice",
        "mixed-series",
        "bad-orientation",
        "monochrome1",
        "high-bit-lie",
        "huge-matrix",
        "garbage-rescale",
    ],
)
def test_inconsistent_series_are_rejected(
    change: dict[str, object], message: str, tmp_path: Path
) -> None:
    written = write_series(tmp_path, smooth_volume((4, 12, 14)), slice_spacing=3.5)
    _edit(written.paths[2], **change)
    with pytest.raises(VolumeError, match=message):
        load_series(written.paths)


def test_missing_slice_is_rejected(tmp_path: Path) -> None:
    written = write_series(tmp_path, smooth_volume((5, 12, 14)))
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        load_series([p for n, p in enumerate(written.paths) if n != 2])


def test_different_matrix_is_rejected(tmp_path: Path) -> None:
    a = write_series(tmp_path / "a", smooth_volume((3, 12, 14)))
    b = write_series(tmp_path / "b", smooth_volume((1, 12, 16)))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for n, path in enumerate([*a.paths, *b.paths]):
        shutil.copy(path, mixed / f"{n}.dcm")
    last = mixed / "3.dcm"
    ds = pydicom.dcmread(a.paths[0])
    _edit(last, SeriesInstanceUID=ds.SeriesInstanceUID, ImagePositionPatient=[-35.5 - 7, -80, 140])
    with pytest.raises(VolumeError, match="different Rows/Columns"):
        load_series(sorted(mixed.iterdir()))


def test_missing_position_is_rejected(tmp_path: Path) -> None:
    written = write_series(tmp_path, smooth_volume((3, 12, 14)))
    ds = pydicom.dcmread(written.paths[1])
    del ds.ImagePositionPatient
    ds.save_as(written.paths[1])
    with pytest.raises(VolumeError, match="ImagePositionPatient"):
        load_series(written.paths)


def test_empty_series_is_rejected() -> None:
    with pytest.raises(VolumeError, match="no files"):
        load_series([])
