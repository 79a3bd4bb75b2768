"""The shared vertebral-body crop: geometry, intensities, spec validation."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.labels import LABEL_OF, LUMBAR_LEVELS
from pipeline.preprocess import (
    PREPROCESS_VERSION,
    PreprocessSpec,
    crop_box,
    intensity_window,
    mid_sagittal_slice,
    normalise,
    vertebra_crops,
)
from tests.pipeline_fixtures import toy_spine


def _to_window(crop: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    return crop * spec.std + spec.mean


def test_crops_per_level_shape_and_content() -> None:
    spine = toy_spine(rim=0)
    spec = PreprocessSpec(input_size=64, margin=0.2)
    crops = vertebra_crops(spine.array, spine.labelmap, LUMBAR_LEVELS, spec)
    assert list(crops) == list(LUMBAR_LEVELS)
    window = intensity_window(spine.array, spec.intensity_percentiles)
    for level, crop in crops.items():
        assert crop.shape == (3, 64, 64) and crop.dtype == np.float32
        # The body sits in the middle; its normalised signal is the body's core signal.
        centre = _to_window(crop, spec)[1, 28:36, 28:36]
        expected = normalise(np.array([spine.body_signal[level]]), window, spec.clip)[0]
        np.testing.assert_allclose(centre, expected, atol=1e-5)
        # The corners hold what surrounds the body (background, discs), not body signal.
        assert _to_window(crop, spec)[1, 0, 0] < expected / 2


def test_margin_and_square_crop_in_millimetres() -> None:
    spine = toy_spine(rim=0)
    mask = spine.labelmap[4] == LABEL_OF["L2"]  # 20 rows x 36 columns
    spec = PreprocessSpec(margin=0.25, square=True)
    j0, j1, i0, i1 = crop_box(mask, spec, (1.0, 1.0))
    assert j1 - j0 == i1 - i0 == 36 + 2 * 9  # square on the larger side plus 25% each side
    # Anisotropic pixels: columns of 0.5 mm need twice as many pixels for the same mm.
    j0, j1, i0, i1 = crop_box(mask, spec, (1.0, 0.5))
    # Now 20 mm high and 18 mm deep: 20 mm plus 25% of 20 mm on each side = 30 mm.
    side_mm = 30.0
    assert (j1 - j0) * 1.0 == pytest.approx(side_mm, abs=1.0)
    assert (i1 - i0) * 0.5 == pytest.approx(side_mm, abs=1.0)
    rect = crop_box(mask, PreprocessSpec(margin=0.0, square=False), (1.0, 1.0))
    assert (rect[1] - rect[0], rect[3] - rect[2]) == (20, 36)


def test_mid_sagittal_slice_is_the_largest_section() -> None:
    mask = np.zeros((7, 10, 10), bool)
    mask[1:6, 2:8, 2:8] = True
    mask[3, 1:9, 1:9] = True
    assert mid_sagittal_slice(mask) == 3
    mask[3] = mask[2]
    assert mid_sagittal_slice(mask) == 3  # equal areas: the one nearest the centre
    assert mid_sagittal_slice(np.zeros((3, 4, 4), bool)) is None


def test_context_channels_are_neighbouring_slices() -> None:
    spine = toy_spine(rim=0)
    array = spine.array.copy()
    array[3] *= 0.5  # the slice before the mid slice (4) is darker
    spec = PreprocessSpec(input_size=32, context_slices=1)
    crop = _to_window(vertebra_crops(array, spine.labelmap, ["L3"], spec)["L3"], spec)
    assert crop[0, 16, 16] < crop[1, 16, 16]
    np.testing.assert_allclose(crop[2], crop[1], atol=1e-6)
    wide = PreprocessSpec(input_size=32, context_slices=2)
    assert vertebra_crops(array, spine.labelmap, ["L3"], wide)["L3"].shape == (5, 32, 32)


def test_missing_level_is_left_out_and_edges_are_padded() -> None:
    spine = toy_spine(rim=0)
    labels = spine.labelmap.copy()
    labels[labels == LABEL_OF["L4"]] = 0
    # Move L5 to the image's first columns: the crop leaves the image.
    l5 = labels == LABEL_OF["L5"]
    labels[l5] = 0
    labels[:, 145:165, 0:10] = LABEL_OF["L5"]
    spec = PreprocessSpec(input_size=32)
    crops = vertebra_crops(spine.array, labels, LUMBAR_LEVELS, spec)
    assert "L4" not in crops and "L5" in crops
    window = intensity_window(spine.array, spec.intensity_percentiles)
    fill = normalise(np.zeros(1), window, spec.clip)[0]
    np.testing.assert_allclose(_to_window(crops["L5"], spec)[1, 16, 0], fill, atol=1e-6)


def test_volume_and_raw_array_give_identical_crops() -> None:
    from pipeline.volume import Volume

    spine = toy_spine()
    volume = Volume(
        array=spine.array.copy(),
        geometry=spine.geometry,
        sop_instance_uids=(),
        headers=(),
        paths=(),
        series_instance_uid="1.2",
        study_instance_uid="1.2",
        transfer_syntaxes=(),
    )
    spec = PreprocessSpec(input_size=48)
    from_volume = vertebra_crops(volume, spine.labelmap, LUMBAR_LEVELS, spec)
    from_array = vertebra_crops(
        spine.array, spine.labelmap, LUMBAR_LEVELS, spec, pixel_spacing=(1.0, 1.0)
    )
    for level in LUMBAR_LEVELS:
        np.testing.assert_array_equal(from_volume[level], from_array[level])


def test_mask_outside_blanks_the_surroundings() -> None:
    spine = toy_spine(rim=0)
    spec = PreprocessSpec(input_size=32, mask_outside=True, margin=0.3)
    crop = _to_window(vertebra_crops(spine.array, spine.labelmap, ["L1"], spec)["L1"], spec)
    window = intensity_window(spine.array, spec.intensity_percentiles)
    fill = normalise(np.zeros(1), window, spec.clip)[0]
    np.testing.assert_allclose(crop[:, 0, 0], fill, atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        {"intensity_percentiles": (99.0, 1.0)},
        {"input_size": 8},
        {"version": "vertebra-crop-2.5d/0"},
        {"clip": (1.0, 0.0)},
        {"unknown": 1},
    ],
)
def test_spec_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PreprocessSpec.model_validate(bad)
    spec = PreprocessSpec()
    assert spec.version == PREPROCESS_VERSION and spec.in_chans == 3 and spec.input_size == 256


def test_shape_mismatch_is_an_error() -> None:
    spine = toy_spine()
    with pytest.raises(ValueError, match="differ in shape"):
        vertebra_crops(spine.array[:, :-1], spine.labelmap)
