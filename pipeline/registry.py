"""Model registry: one folder per model with a ``manifest.json`` and a verified weights file.

Layout of ``models_dir``::

    models_dir/
        segmenter/   manifest.json  weights.pt    vertebral-body segmenter (T1 and T2)
        cls-t1/      manifest.json  weights.pt    osteoporosis classifier, sagittal T1
        cls-t2/      manifest.json  weights.pt    osteoporosis classifier, sagittal T2

The manifest records what the weights are (architecture, input, preprocessing, training data,
metrics, decision threshold, version) and their SHA-256; :func:`load_model` refuses weights
whose hash, architecture or preprocessing do not match.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.files import atomic_write
from pipeline.labels import CSF_LABEL, NAME_OF, NUM_CLASSES
from pipeline.preprocess import PreprocessSpec
from pipeline.segment import (
    SEGMENTER_ARCHITECTURE,
    SegmentationInputSpec,
    UNetParams,
    build_segmenter,
)

log = logging.getLogger(__name__)

MANIFEST_NAME: Final[str] = "manifest.json"
WEIGHTS_NAME: Final[str] = "weights.pt"
SEGMENTER: Final[str] = "segmenter"
CLASSIFIER_T1: Final[str] = "cls-t1"
CLASSIFIER_T2: Final[str] = "cls-t2"
CLASSIFIER_OF: Final[dict[str, str]] = {"T1": CLASSIFIER_T1, "T2": CLASSIFIER_T2}
MODEL_NAMES: Final[tuple[str, ...]] = (SEGMENTER, CLASSIFIER_T1, CLASSIFIER_T2)
BUILD_HINT: Final[str] = (
    "build the synthetic demo models with `opmri-node models build-demo` or train one with "
    "`opmri-node train ...`, then point pipeline.models_dir at that folder"
)


class ModelRegistryError(RuntimeError):
    """Base class of the registry's errors."""


class ModelNotFoundError(ModelRegistryError):
    """No model (manifest or weights) where one is expected; the message says how to get one."""


class ModelManifestError(ModelRegistryError):
    """A manifest is invalid or does not fit the weights, the pipeline or the settings."""


class ModelIntegrityError(ModelRegistryError):
    """The weights file does not have the SHA-256 recorded in its manifest."""


Preprocessing = Annotated[
    PreprocessSpec | SegmentationInputSpec, Field(discriminator="kind")
]


class ModelManifest(BaseModel):
    """What a weights file is and how it was made (``manifest.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: Literal[1] = 1
    name: str
    task: Literal["segmentation", "classification"]
    architecture: str
    architecture_params: dict[str, Any] = Field(default_factory=dict)
    sequence: Literal["T1", "T2"] | None = None
    """Sequence a classifier reads; ``None`` for the segmenter (it serves T1 and T2)."""
    input_size: int = Field(ge=16)
    in_chans: int = Field(ge=1)
    num_outputs: int = Field(ge=1)
    preprocessing: Preprocessing
    label_values: dict[str, int] = Field(default_factory=dict)
    """Segmenter output labels by name (must equal :mod:`pipeline.labels`)."""
    training_data: str
    """Description of the training data; demo models say it is synthetic."""
    synthetic: bool
    """Trained on synthetic images only: results are demonstrations, not findings."""
    metrics: dict[str, float] = Field(default_factory=dict)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Decision threshold on the patient probability (classifiers)."""
    version: str = Field(min_length=1)
    weights_file: str = WEIGHTS_NAME
    weights_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    created: str = Field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )
    notes: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        if self.input_size != self.preprocessing.input_size:
            raise ValueError("input_size differs from preprocessing.input_size")
        if self.in_chans != self.preprocessing.in_chans:
            raise ValueError("in_chans differs from the preprocessing's channel count")
        if self.task == "classification":
            if self.sequence is None:
                raise ValueError("a classifier manifest needs a sequence (T1 or T2)")
            if self.threshold is None:
                raise ValueError("a classifier manifest needs a decision threshold")
            if not isinstance(self.preprocessing, PreprocessSpec):
                raise ValueError("a classifier needs vertebra-crop preprocessing")
        else:
            if not isinstance(self.preprocessing, SegmentationInputSpec):
                raise ValueError("a segmenter needs sagittal-slices preprocessing")
            if self.architecture != SEGMENTER_ARCHITECTURE:
                raise ValueError(f"segmenter architecture must be {SEGMENTER_ARCHITECTURE}")
        if Path(self.weights_file).name != self.weights_file:
            raise ValueError("weights_file must be a plain file name")
        return self


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A network ready for inference with the manifest it was verified against."""

    manifest: ModelManifest
    module: torch.nn.Module
    path: Path


def build_network(manifest: ModelManifest) -> torch.nn.Module:
    """An untrained network of the architecture a manifest describes."""
    if manifest.task == "segmentation":
        try:
            params = UNetParams.model_validate(manifest.architecture_params)
        except ValidationError as exc:
            raise ModelManifestError(
                f"{manifest.name}: invalid architecture_params: {exc}"
            ) from exc
        return build_segmenter(manifest.in_chans, params, manifest.num_outputs)
    from pipeline.classify import build_classifier

    try:
        return build_classifier(manifest.architecture, manifest.in_chans)
    except ValueError as exc:
        raise ModelManifestError(f"{manifest.name}: {exc}") from exc


def _network_with_weights(
    manifest: ModelManifest, state: dict[str, torch.Tensor], weights: Path
) -> torch.nn.Module:
    """The manifest's network holding ``state``.

    The network is built on the meta device and takes the loaded tensors as they are, which
    skips random initialisation and a copy of every weight (seconds for EfficientNet-b4).
    """
    with torch.device("meta"):
        module = build_network(manifest)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0]
        raise ModelManifestError(
            f"{weights}: weights do not fit a {manifest.architecture} with "
            f"{manifest.in_chans} input channels ({first})"
        ) from exc
    tensors = [*module.parameters(), *module.buffers()]
    if any(tensor.is_meta for tensor in tensors):
        # A buffer outside the state dict (not persistent): build normally and copy.
        module = build_network(manifest)
        module.load_state_dict(state, strict=True)
    return module


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(
    directory: Path | str, model: torch.nn.Module, manifest: ModelManifest
) -> ModelManifest:
    """Write ``model``'s weights and its manifest (with the weights' SHA-256) to ``directory``.

    Returns the manifest as written. The folder's name should be the manifest's ``name``
    (``segmenter``, ``cls-t1`` or ``cls-t2`` inside a ``models_dir``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    written = manifest.model_copy(update={"weights_sha256": hashlib.sha256(data).hexdigest()})
    # Validate the copy (model_copy skips validation).
    written = ModelManifest.model_validate(written.model_dump())
    atomic_write(directory / written.weights_file, data)
    atomic_write(
        directory / MANIFEST_NAME, (written.model_dump_json(indent=2) + "\n").encode("utf-8")
    )
    return written


def read_manifest(models_dir: Path | str, name: str) -> ModelManifest:
    """The manifest of model ``name`` in ``models_dir`` (validated)."""
    directory = Path(models_dir) / name
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ModelNotFoundError(
            f"no model '{name}' in {Path(models_dir)} ({path} missing): {BUILD_HINT}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelManifestError(f"{path}: not a readable JSON manifest ({exc})") from exc
    try:
        manifest = ModelManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(p) for p in error["loc"]) + f": {error['msg']}" for error in exc.errors()
        )
        raise ModelManifestError(f"{path}: invalid manifest: {problems}") from exc
    if manifest.name != name:
        raise ModelManifestError(f"{path}: manifest is for '{manifest.name}', expected '{name}'")
    return manifest


def load_model(
    models_dir: Path | str,
    name: str,
    device: torch.device | str = "cpu",
    *,
    architecture: str | None = None,
) -> LoadedModel:
    """Load and verify model ``name`` (``segmenter``, ``cls-t1``, ``cls-t2``) for inference.

    Checks the manifest against the pipeline (label values, preprocessing version, sequence
    of the folder), the weights' SHA-256 and that the weights fit the architecture. With
    ``architecture`` the manifest must name that architecture (``pipeline.classifier``).
    """
    manifest = read_manifest(models_dir, name)
    directory = Path(models_dir) / name
    if name == SEGMENTER:
        if manifest.task != "segmentation":
            raise ModelManifestError(f"{directory}: '{name}' must be a segmentation model")
        expected = segmenter_label_values()
        if manifest.label_values != expected or manifest.num_outputs != NUM_CLASSES:
            raise ModelManifestError(
                f"{directory}: the segmenter's labels {manifest.label_values} differ from this "
                f"pipeline's {expected}; retrain it"
            )
    elif name in (CLASSIFIER_T1, CLASSIFIER_T2):
        sequence = "T1" if name == CLASSIFIER_T1 else "T2"
        if manifest.task != "classification" or manifest.sequence != sequence:
            raise ModelManifestError(f"{directory}: '{name}' must be a {sequence} classifier")
    if architecture is not None and manifest.architecture != architecture:
        raise ModelManifestError(
            f"{directory}: holds a {manifest.architecture} model but the settings ask for "
            f"{architecture} (pipeline.classifier.architecture)"
        )
    weights = directory / manifest.weights_file
    if not weights.is_file():
        raise ModelNotFoundError(f"{weights} is missing: {BUILD_HINT}")
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.weights_sha256:
        raise ModelIntegrityError(
            f"{weights}: SHA-256 {digest[:16]}... does not match the manifest's "
            f"{(manifest.weights_sha256 or 'none')[:16]}...; the file is corrupt or was replaced"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable checkpoints
        raise ModelManifestError(f"{weights}: not a readable weights file ({exc})") from exc
    module = _network_with_weights(manifest, state, weights)
    module.eval().to(torch.device(device))
    log.info(
        "loaded model %s: %s v%s%s",
        name,
        manifest.architecture,
        manifest.version,
        " (synthetic demo)" if manifest.synthetic else "",
    )
    return LoadedModel(manifest, module, directory)


def segmenter_label_values() -> dict[str, int]:
    """The ``label_values`` a segmenter manifest must record."""
    return {label: value for value, label in NAME_OF.items()} | {"CSF": CSF_LABEL}


def segmenter_manifest(
    *,
    version: str,
    training_data: str,
    synthetic: bool,
    params: UNetParams | None = None,
    spec: SegmentationInputSpec | None = None,
    metrics: dict[str, float] | None = None,
    notes: str = "",
) -> ModelManifest:
    """Manifest of a segmenter built by :func:`pipeline.segment.build_segmenter`."""
    spec = spec or SegmentationInputSpec()
    return ModelManifest(
        name=SEGMENTER,
        task="segmentation",
        architecture=SEGMENTER_ARCHITECTURE,
        architecture_params=(params or UNetParams()).model_dump(mode="json"),
        input_size=spec.input_size,
        in_chans=spec.in_chans,
        num_outputs=NUM_CLASSES,
        preprocessing=spec,
        label_values=segmenter_label_values(),
        training_data=training_data,
        synthetic=synthetic,
        metrics=metrics or {},
        version=version,
        notes=notes,
    )


def classifier_manifest(
    sequence: Literal["T1", "T2"],
    *,
    architecture: str,
    threshold: float,
    version: str,
    training_data: str,
    synthetic: bool,
    spec: PreprocessSpec | None = None,
    metrics: dict[str, float] | None = None,
    notes: str = "",
) -> ModelManifest:
    """Manifest of a classifier built by :func:`pipeline.classify.build_classifier`."""
    from pipeline.classify import NUM_OUTPUTS

    spec = spec or PreprocessSpec()
    return ModelManifest(
        name=CLASSIFIER_OF[sequence],
        task="classification",
        architecture=architecture,
        sequence=sequence,
        input_size=spec.input_size,
        in_chans=spec.in_chans,
        num_outputs=NUM_OUTPUTS,
        preprocessing=spec,
        training_data=training_data,
        synthetic=synthetic,
        metrics=metrics or {},
        threshold=threshold,
        version=version,
        notes=notes,
    )
