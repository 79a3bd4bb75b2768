"""Segmenter: input preparation, masks on the exact source grid, post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.labels import CSF_LABEL, LABEL_OF, NUM_CLASSES, VERTEBRAE
from pipeline.segment import (
    SegmentationInputSpec,
    UNetParams,
    build_segmenter,
    postprocess_labelmap,
    predict_labelmaps,
    prepare_labels,
    prepare_slices,
    scores_to_source_grid,
)
from tests.pipeline_fixtures import toy_spine


class ThresholdOracle(torch.nn.Module):
    """Class 1 where the centre channel is above 0.5, class 0 elsewhere.

    Stands in for a perfectly trained network on a binary image, so that the test sees only
    the geometry of the pipeline (padding, resizing, back to the source grid).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        scores = torch.full((x.shape[0], NUM_CLASSES, *x.shape[2:]), -10.0)
        scores[:, 0:1] = 0.5 - centre
        scores[:, 1:2] = centre - 0.5
        return scores


def test_build_segmenter_outputs_all_classes() -> None:
    model = build_segmenter(3, UNetParams(channels=(8, 16, 32), strides=(2, 2), num_res_units=1))
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, NUM_CLASSES, 64, 64)


def test_prepare_slices_stacks_neighbours_and_resizes() -> None:
    spine = toy_spine((5, 60, 40))
    spec = SegmentationInputSpec(input_size=32, context_slices=1)
    x = prepare_slices(spine.array, spec)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    # Channel 0 of slice 0 repeats slice 0 (edge); channel 2 of slice 1 is slice 2.
    torch.testing.assert_close(x[0, 0], x[0, 1])
    torch.testing.assert_close(x[1, 2], x[2, 1])
    y = prepare_labels(spine.labelmap, spec)
    assert y.shape == (5, 32, 32) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= set(range(NUM_CLASSES))


@pytest.mark.parametrize("shape", [(9, 200, 120), (9, 145, 200), (9, 160, 160)])
def test_masks_come_back_on_the_exact_source_grid(shape: tuple[int, int, int]) -> None:
    from scipy import ndimage

    spine = toy_spine((shape[0], 200, 120))
    truth = np.zeros(shape, dtype=bool)
    rows, cols = min(shape[1], 200), min(shape[2], 120)
    bodies = (spine.labelmap >= 1) & (spine.labelmap <= 7)
    truth[:, :rows, :cols] = bodies[:, :rows, :cols]
    image = np.where(truth, 1000.0, 0.0).astype(np.float32)
    spec = SegmentationInputSpec(input_size=96, context_slices=1)
    (raw,) = predict_labelmaps(
        ThresholdOracle(), [image], spec, torch.device("cpu"), batch_size=4
    )
    assert raw.shape == shape and raw.dtype == np.uint8
    found = raw == 1
    dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
    assert dice > 0.95, dice
    # No shift: every body's centroid agrees within half a pixel.
    truth_parts, n = ndimage.label(truth)
    found_parts, m = ndimage.label(found)
    assert n == m
    for a, b in zip(
        ndimage.center_of_mass(truth, truth_parts, range(1, n + 1)),
        ndimage.center_of_mass(found, found_parts, range(1, m + 1)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=0.5)


def test_scores_to_source_grid_undoes_padding() -> None:
    rows, cols = 90, 150
    labels = np.zeros((1, rows, cols), np.uint8)
    labels[0, 10:40, 100:140] = 3
    spec = SegmentationInputSpec(input_size=64, context_slices=0)
    small = prepare_labels(labels, spec)
    onehot = torch.nn.functional.one_hot(small, NUM_CLASSES).permute(0, 3, 1, 2).float()
    back = scores_to_source_grid(onehot, (rows, cols)).argmax(1)[0].numpy()
    assert back.shape == (rows, cols)
    truth = labels[0] == 3
    dice = 2 * (truth & (back == 3)).sum() / (truth.sum() + (back == 3).sum())
    assert dice > 0.9


# -- post-processing ---------------------------------------------------------------------------


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_clean_prediction_is_kept() -> None:
    spine = toy_spine()
    out = postprocess_labelmap(spine.labelmap, spine.geometry)
    np.testing.assert_array_equal(out, spine.labelmap)


def test_speckle_and_small_islands_are_removed() -> None:
    spine = toy_spine()
    raw = spine.labelmap.copy()
    rng = np.random.default_rng(1)
    noise = rng.random(raw.shape) < 0.002
    raw[noise & (raw == 0)] = rng.integers(1, 8, size=int((noise & (raw == 0)).sum()))
    raw[4, 190:195, 100:105] = LABEL_OF["L3"]  # a small blob far from the spine
    out = postprocess_labelmap(raw, spine.geometry)
    for name in VERTEBRAE:
        label = LABEL_OF[name]
        assert _dice(out == label, spine.labelmap == label) > 0.98, name


def test_mixed_votes_inside_a_body_take_the_majority_and_holes_fill() -> None:
    spine = toy_spine()
    raw = spine.labelmap.copy()
    l2 = raw == LABEL_OF["L2"]
    raw[l2 & (np.indices(raw.shape)[2] < 30)] = LABEL_OF["L3"]  # a quarter of L2 voted L3
    raw[4, 70:74, 35:40] = 0  # a hole inside L2
    out = postprocess_labelmap(raw, spine.geometry)
    assert _dice(out == LABEL_OF["L2"], l2) > 0.99
    assert _dice(out == LABEL_OF["L3"], spine.labelmap == LABEL_OF["L3"]) > 0.99


def test_swapped_levels_are_put_back_in_anatomical_order() -> None:
    spine = toy_spine()
    raw = spine.labelmap.copy()
    l2, l3 = raw == LABEL_OF["L2"], raw == LABEL_OF["L3"]
    raw[l2], raw[l3] = LABEL_OF["L3"], LABEL_OF["L2"]
    out = postprocess_labelmap(raw, spine.geometry)
    for name in VERTEBRAE:
        label = LABEL_OF[name]
        assert _dice(out == label, spine.labelmap == label) > 0.99, name


def test_repeated_level_is_relabelled_by_position() -> None:
    spine = toy_spine()
    raw = spine.labelmap.copy()
    raw[raw == LABEL_OF["L3"]] = LABEL_OF["L2"]  # the network called L3 "L2" too
    out = postprocess_labelmap(raw, spine.geometry)
    for name in VERTEBRAE:
        label = LABEL_OF[name]
        assert _dice(out == label, spine.labelmap == label) > 0.99, name


def test_missed_level_leaves_a_gap_instead_of_shifting_labels() -> None:
    spine = toy_spine()
    raw = spine.labelmap.copy()
    raw[raw == LABEL_OF["L2"]] = 0
    out = postprocess_labelmap(raw, spine.geometry)
    assert not (out == LABEL_OF["L2"]).any()
    for name in ("T12", "L1", "L3", "L4", "L5", "S1"):
        label = LABEL_OF[name]
        assert _dice(out == label, spine.labelmap == label) > 0.99, name


def test_bodies_joined_through_a_missed_disc_are_split() -> None:
    spine = toy_spine()
    raw = spine.labelmap.copy()
    # Fill the L3/L4 disc with L3 votes: the two bodies form one component.
    j_l3 = np.flatnonzero((raw == LABEL_OF["L3"]).any(axis=(0, 2)))
    j_l4 = np.flatnonzero((raw == LABEL_OF["L4"]).any(axis=(0, 2)))
    raw[2:7, j_l3[-1] + 1 : j_l4[0], 20:56] = LABEL_OF["L3"]
    out = postprocess_labelmap(raw, spine.geometry)
    assert _dice(out == LABEL_OF["L4"], spine.labelmap == LABEL_OF["L4"]) > 0.97
    # L3 keeps the disc voxels that were voted L3 (20 body rows + 6 disc rows).
    assert _dice(out == LABEL_OF["L3"], spine.labelmap == LABEL_OF["L3"]) > 0.8
    # Order holds: every L3 voxel lies above every L4 voxel.
    assert np.argwhere(out == LABEL_OF["L3"])[:, 1].max() < np.argwhere(
        out == LABEL_OF["L4"]
    )[:, 1].min()


def test_one_connected_body_per_level_and_largest_csf() -> None:
    spine = toy_spine()
    raw = spine.labelmap.copy()
    # A second, detached L1 fragment on a lateral slice, and detached CSF.
    raw[0, 45:60, 25:50] = LABEL_OF["L1"]
    raw[8, 10:30, 90:100] = CSF_LABEL
    out = postprocess_labelmap(raw, spine.geometry)
    from scipy import ndimage

    for label in range(1, 8):
        assert ndimage.label(out == label)[1] == 1
    assert ndimage.label(out == CSF_LABEL)[1] == 1
    assert _dice(out == CSF_LABEL, spine.labelmap == CSF_LABEL) > 0.99


def test_empty_prediction_gives_an_empty_map() -> None:
    spine = toy_spine()
    out = postprocess_labelmap(np.zeros_like(spine.labelmap), spine.geometry)
    assert not out.any()
