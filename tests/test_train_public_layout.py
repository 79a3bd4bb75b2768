"""The public-dataset layout, tested on a synthetic replica of SPIDER (MHA images and masks
with SPIDER's label values, stored in another axis order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from pipeline.labels import CSF_LABEL, LABEL_OF
from pipeline.volume import Geometry
from train.phantom.options import CohortOptions
from train.phantom.simulate import simulate_patient
from train.public_layout import (
    PublicDatasetError,
    iter_public_dataset,
    remap_labels,
    scan_public_dataset,
    write_itk,
)

SPIDER_VALUE = {"L5": 1, "L4": 2, "L3": 3, "L2": 4, "L1": 5, "T12": 6}


def _write_permuted(path: Path, array_kji: np.ndarray, geometry: Geometry) -> None:
    """Store with ITK axes (x, y, z) = (k, i, reversed j), as some converters do."""
    rows = array_kji.shape[1]
    data_zyx = np.ascontiguousarray(np.transpose(array_kji, (1, 2, 0))[::-1])
    image = sitk.GetImageFromArray(data_zyx)
    normal, row, col = (np.asarray(v) for v in (geometry.normal, geometry.row_cosines,
                                                geometry.col_cosines))  # fmt: skip
    direction = np.column_stack([normal, row, -col])
    image.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
    image.SetSpacing((geometry.spacing[0], geometry.spacing[2], geometry.spacing[1]))
    origin = np.asarray(geometry.origin) + col * geometry.spacing[1] * (rows - 1)
    image.SetOrigin(tuple(float(v) for v in origin))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def _spider_mask(labelmap: np.ndarray) -> np.ndarray:
    """SPIDER-style values, plus posterior elements behind the canal labelled as L3 and a
    disc label (both must not survive as vertebral body)."""
    mask = np.zeros(labelmap.shape, dtype=np.uint16)
    for level, value in SPIDER_VALUE.items():
        mask[labelmap == LABEL_OF[level]] = value
    canal = labelmap == CSF_LABEL
    mask[canal] = 100
    columns = np.arange(labelmap.shape[2])
    rows_l3 = np.unique(np.nonzero(labelmap == LABEL_OF["L3"])[1])
    for kk in np.unique(np.nonzero(canal)[0]):
        for jj in rows_l3:
            on_row = np.flatnonzero(canal[kk, jj])
            if on_row.size:
                behind = (columns > on_row.max() + 2) & (columns < on_row.max() + 12)
                mask[kk, jj, behind & (labelmap[kk, jj] == 0)] = SPIDER_VALUE["L3"]
    mask[(labelmap == 0) & (np.roll(labelmap, 3, axis=1) == LABEL_OF["L4"])] = 202
    return mask


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("spider")
    options = CohortOptions(n_patients=2, seed=5, series=("t1", "t2"))
    truths: dict[str, object] = {}
    for index in range(2):
        patient = simulate_patient(5, index, options)
        case = str(index + 1)
        for kind in ("t1", "t2"):
            series = patient.get(kind)
            assert series.labelmap is not None and series.geometry is not None
            if index == 0:
                _write_permuted(root / "images" / f"{case}_{kind}.mha",
                                series.pixels.astype(np.int16), series.geometry)  # fmt: skip
                _write_permuted(root / "masks" / f"{case}_{kind}.mha",
                                _spider_mask(series.labelmap), series.geometry)  # fmt: skip
            else:
                write_itk(root / "images" / f"{case}_{kind}.mha",
                          series.pixels.astype(np.int16), series.geometry)  # fmt: skip
                write_itk(root / "masks" / f"{case}_{kind}.mha",
                          _spider_mask(series.labelmap), series.geometry)  # fmt: skip
        truths[case] = patient
    # SPIDER ships a third series per study that the layout ignores.
    (root / "images" / "1_t2_SPACE.mha").write_bytes(b"not read")
    (root / "dataset.yaml").write_text("labels: spider\n")
    return root, truths


def test_replica_reads_back_as_pipeline_arrays(replica: tuple[Path, dict[str, object]]) -> None:
    root, truths = replica
    cases = scan_public_dataset(root)
    assert [c.case for c in cases] == ["1", "2"]
    samples = list(iter_public_dataset(root))
    for sample in samples:
        patient = truths[sample.patient_id]
        for sequence, kind in (("T1", "t1"), ("T2", "t2")):
            truth = patient.get(kind)  # type: ignore[attr-defined]
            series = sample.series[sequence]
            np.testing.assert_array_equal(series.array, truth.pixels.astype(np.float32))
            np.testing.assert_allclose(series.geometry.affine, truth.geometry.affine, atol=1e-3)
            expected = truth.labelmap.copy()
            expected[expected == LABEL_OF["S1"]] = 0  # SPIDER labels no sacrum
            np.testing.assert_array_equal(series.labelmap, expected)


def test_label_mapping_and_canal_cut() -> None:
    mask = np.zeros((1, 3, 8), dtype=np.int64)
    mask[0, :, 0:4] = 3  # L3 body (anterior, small i)
    mask[0, :, 4:5] = 100  # canal
    mask[0, :, 5:8] = 3  # posterior elements of L3
    mask[0, 2, 0:2] = 203
    out = remap_labels(mask, {3: "L3", 100: "CSF"}, cut_at_canal=True, margin_voxels=0)
    assert (out[0, :2, 0:4] == LABEL_OF["L3"]).all()
    assert (out[0, :, 4] == CSF_LABEL).all()
    assert (out[0, :, 5:] == 0).all()
    assert (out[0, 2, 0:2] == 0).all()  # unnamed values become background
    kept = remap_labels(mask, {3: "L3", 100: "CSF"}, cut_at_canal=False)
    assert (kept[0, :, 5:] == LABEL_OF["L3"]).all()


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(PublicDatasetError, match="no images/ folder"):
        scan_public_dataset(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(PublicDatasetError, match="no <case>_t1"):
        scan_public_dataset(tmp_path)
    (tmp_path / "images" / "7_t1.mha").write_bytes(b"x")
    with pytest.raises(PublicDatasetError, match="have no mask of the same name"):
        scan_public_dataset(tmp_path)
    (tmp_path / "masks" / "7_t1.mha").write_bytes(b"x")
    with pytest.raises(PublicDatasetError, match=r"7_t1\.mha cannot be read"):
        list(iter_public_dataset(tmp_path))
    (tmp_path / "dataset.yaml").write_text("labels: {1: L9}\n")
    with pytest.raises(PublicDatasetError, match="unknown names"):
        list(iter_public_dataset(tmp_path))
    (tmp_path / "dataset.yaml").write_text("labels: spider\nbody_only: true\n")
    with pytest.raises(PublicDatasetError, match="body_only"):
        list(iter_public_dataset(tmp_path))


def test_train_seg_on_the_replica_through_the_cli(
    replica: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from opmri_node.cli import main
    from pipeline.registry import SEGMENTER, load_model

    root, _ = replica
    config = tmp_path / "train.yaml"
    config.write_text(
        "validation_fraction: 0.5\n"
        "segmenter:\n  unet: {channels: [4, 8, 16], strides: [2, 2], num_res_units: 1}\n"
    )
    out = tmp_path / "models"
    args = ["train", "seg", "--config", str(config), "--public-dataset", str(root), "--out",
            str(out), "--steps", "2", "--eval-every", "2", "--input-size", "64", "--batch-size",
            "2", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    loaded = load_model(out, SEGMENTER)
    assert loaded.manifest.training_data == f"public dataset {root.name}, 2 cases"
    assert loaded.manifest.synthetic is False
    assert loaded.manifest.input_size == 64
    assert "val_dice_mean" in loaded.manifest.metrics
    assert (out / ".checkpoints" / "segmenter" / "segmenter-last.pt").is_file()
