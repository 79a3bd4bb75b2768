"""Model registry: manifests, verified weights, clear errors; classifier constructors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.classify import (
    aggregate,
    build_classifier,
    fuse,
    predict_levels,
    predict_probabilities,
)
from pipeline.config import PipelineSettings
from pipeline.preprocess import PreprocessSpec
from pipeline.registry import (
    CLASSIFIER_T1,
    CLASSIFIER_T2,
    MANIFEST_NAME,
    SEGMENTER,
    ModelIntegrityError,
    ModelManifestError,
    ModelNotFoundError,
    classifier_manifest,
    load_model,
    read_manifest,
    save_model,
    segmenter_manifest,
    sha256_file,
)
from pipeline.segment import SegmentationInputSpec, UNetParams, build_segmenter

SMALL_UNET = UNetParams(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
SMALL_SPEC = PreprocessSpec(input_size=32)
TINY_ARCH = "resnet10t"


def _save_segmenter(models_dir: Path) -> torch.nn.Module:
    spec = SegmentationInputSpec(input_size=32)
    model = build_segmenter(spec.in_chans, SMALL_UNET)
    save_model(
        models_dir / SEGMENTER,
        model,
        segmenter_manifest(
            version="0.0.1", training_data="unit test", synthetic=True, params=SMALL_UNET,
            spec=spec,
        ),
    )
    return model


def _save_classifier(
    models_dir: Path, sequence: str = "T1", arch: str = TINY_ARCH
) -> torch.nn.Module:
    model = build_classifier(arch, SMALL_SPEC.in_chans)
    save_model(
        models_dir / f"cls-{sequence.lower()}",
        model,
        classifier_manifest(
            sequence,  # type: ignore[arg-type]
            architecture=arch,
            threshold=0.4,
            version="1.2.3",
            training_data="synthetic cohort, 4 patients",
            synthetic=True,
            spec=SMALL_SPEC,
            metrics={"auc": 0.5},
        ),
    )
    return model


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    seg = _save_segmenter(tmp_path).eval()
    cls = _save_classifier(tmp_path).eval()
    loaded_seg = load_model(tmp_path, SEGMENTER)
    loaded_cls = load_model(tmp_path, CLASSIFIER_T1, architecture=TINY_ARCH)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded_seg.module(x), seg(x))
        torch.testing.assert_close(loaded_cls.module(x), cls(x))
    manifest = loaded_cls.manifest
    assert manifest.sequence == "T1" and manifest.threshold == 0.4 and manifest.synthetic
    assert manifest.preprocessing == SMALL_SPEC and manifest.input_size == 32
    assert manifest.weights_sha256 == sha256_file(tmp_path / CLASSIFIER_T1 / "weights.pt")
    assert not loaded_cls.module.training


def test_manifest_on_disk_is_plain_json_with_the_documented_fields(tmp_path: Path) -> None:
    _save_classifier(tmp_path)
    data = json.loads((tmp_path / CLASSIFIER_T1 / MANIFEST_NAME).read_text())
    for key in (
        "architecture", "sequence", "input_size", "in_chans", "preprocessing", "training_data",
        "synthetic", "metrics", "threshold", "version", "weights_sha256",
    ):
        assert key in data, key
    assert data["preprocessing"]["version"] == SMALL_SPEC.version


def test_missing_model_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model(tmp_path / "nowhere", CLASSIFIER_T2)
    message = str(info.value)
    assert "opmri-node models build-demo" in message and "opmri-node train" in message
    assert "cls-t2" in message


def test_missing_weights_file(tmp_path: Path) -> None:
    _save_classifier(tmp_path)
    (tmp_path / CLASSIFIER_T1 / "weights.pt").unlink()
    with pytest.raises(ModelNotFoundError, match=r"weights\.pt is missing"):
        load_model(tmp_path, CLASSIFIER_T1)


def test_corrupted_weights_are_refused(tmp_path: Path) -> None:
    _save_classifier(tmp_path)
    weights = tmp_path / CLASSIFIER_T1 / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        load_model(tmp_path, CLASSIFIER_T1)


def _rewrite_manifest(directory: Path, **changes: object) -> None:
    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"unexpected": 1}, "invalid manifest"),
        ({"threshold": None}, "threshold"),
        ({"preprocessing": {"kind": "vertebra-crop", "version": "old/0"}}, "invalid manifest"),
        ({"input_size": 64}, "input_size differs"),
        ({"name": "cls-t2"}, "expected 'cls-t1'"),
        ({"sequence": "T2"}, "must be a T1 classifier"),
        ({"in_chans": 1, "preprocessing": {"kind": "vertebra-crop", "context_slices": 0,
                                          "input_size": 32}}, "do not fit"),
        ({"architecture": "resnet18"}, "do not fit"),
    ],
)
def test_manifest_mismatches_are_clear_errors(
    changes: dict[str, object], message: str, tmp_path: Path
) -> None:
    _save_classifier(tmp_path)
    _rewrite_manifest(tmp_path / CLASSIFIER_T1, **changes)
    with pytest.raises(ModelManifestError, match=message):
        load_model(tmp_path, CLASSIFIER_T1)


def test_unreadable_manifest(tmp_path: Path) -> None:
    _save_classifier(tmp_path)
    (tmp_path / CLASSIFIER_T1 / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelManifestError, match="not a readable JSON manifest"):
        read_manifest(tmp_path, CLASSIFIER_T1)


def test_architecture_must_match_the_settings(tmp_path: Path) -> None:
    _save_classifier(tmp_path)
    with pytest.raises(ModelManifestError, match="settings ask for efficientnet_b4"):
        load_model(tmp_path, CLASSIFIER_T1, architecture="efficientnet_b4")


def test_segmenter_with_other_labels_is_refused(tmp_path: Path) -> None:
    _save_segmenter(tmp_path)
    _rewrite_manifest(tmp_path / SEGMENTER, label_values={"L1": 1})
    with pytest.raises(ModelManifestError, match="labels"):
        load_model(tmp_path, SEGMENTER)


def test_analyzer_without_models_fails_with_the_build_hint(tmp_path: Path) -> None:
    from pipeline.analyze import Analyzer

    with pytest.raises(ModelNotFoundError, match="build-demo"):
        Analyzer(PipelineSettings(models_dir=tmp_path, device="cpu"))


# -- classifiers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["efficientnet_b4", "resnet50", "inception_resnet_v2"])
def test_paper_architectures_build_with_one_logit(architecture: str) -> None:
    model = build_classifier(architecture, in_chans=3).eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 96, 96))
    assert out.shape == (1, 1)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match='"architecture"'):
        build_classifier("efficientnet_b99")
    with pytest.raises(ValueError, match="unknown timm architecture"):
        PipelineSettings.model_validate({"classifier": {"architecture": "nonsense_net"}})


def test_pretrained_weights_from_a_local_file(tmp_path: Path) -> None:
    import timm

    source = timm.create_model(TINY_ARCH, pretrained=False, num_classes=1000, in_chans=3)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = build_classifier(TINY_ARCH, in_chans=3, pretrained_path=path)
    stem = next(iter(model.state_dict()))
    torch.testing.assert_close(model.state_dict()[stem], source.state_dict()[stem])
    with pytest.raises(FileNotFoundError):
        build_classifier(TINY_ARCH, pretrained_path=tmp_path / "missing.pth")


def test_predictions_and_aggregation() -> None:
    torch.manual_seed(0)
    model = build_classifier(TINY_ARCH, 3).eval()
    crops = {level: np.random.default_rng(n).normal(size=(3, 32, 32)).astype(np.float32)
             for n, level in enumerate(["L1", "L2", "L3", "L4", "L5"])}
    probabilities = predict_levels(model, crops, torch.device("cpu"), batch_size=2)
    assert list(probabilities) == ["L1", "L2", "L3", "L4", "L5"]
    assert all(0.0 < p < 1.0 for p in probabilities.values())
    batch = np.stack(list(crops.values()))
    np.testing.assert_allclose(
        predict_probabilities(model, batch, torch.device("cpu"), batch_size=5),
        list(probabilities.values()),
        rtol=1e-5,
    )
    levels = ("L1", "L2", "L3", "L4")
    values = {"L1": 0.2, "L2": 0.4, "L3": 0.9, "L5": 1.0}
    assert aggregate(values, levels, "mean") == pytest.approx(0.5)
    assert aggregate(values, levels, "median") == pytest.approx(0.4)
    assert aggregate(values, levels, "max") == pytest.approx(0.9)
    assert aggregate(values, levels, "mean", min_levels=4) is None
    assert fuse([0.2, None, 0.6]) == pytest.approx(0.4)
    assert fuse([0.2, 0.6], "max") == pytest.approx(0.6)
    assert fuse([None]) is None
