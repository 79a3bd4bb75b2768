"""The training configuration file (``config/train.example.yaml``): one section per trainer.

Every key is validated (unknown keys are errors); command-line options override the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from train.cls_trainer import ClassifierTrainConfig
from train.seg_trainer import SegmenterTrainConfig


class TrainingConfigError(ValueError):
    """The training config file is unreadable or invalid; the message names file and keys."""


class EvaluationSettings(BaseModel):
    """``evaluation:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folds: int = Field(default=5, ge=2)
    architectures: tuple[str, ...] = ("efficientnet_b4", "inception_resnet_v2", "resnet50")
    bootstrap: int = Field(default=2000, ge=100)


class TrainingFile(BaseModel):
    """Top level of the training config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    segmenter: SegmenterTrainConfig = SegmenterTrainConfig()
    classifier: ClassifierTrainConfig = ClassifierTrainConfig()
    evaluation: EvaluationSettings = EvaluationSettings()
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Share of the patients (stratified, by patient) that validate a training run."""


def load_training_config(path: Path | str | None) -> TrainingFile:
    """The validated training config (defaults when ``path`` is ``None``)."""
    if path is None:
        return TrainingFile()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TrainingConfigError(f"{path}: not a readable YAML file ({exc})") from exc
    if not isinstance(data, dict):
        raise TrainingConfigError(f"{path}: the top level must be a mapping")
    base = path.parent
    for section in ("classifier",):
        pretrained = (data.get(section) or {}).get("pretrained")
        if pretrained and not Path(pretrained).is_absolute():
            data[section]["pretrained"] = str(base / pretrained)
    try:
        return TrainingFile.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{path}: " + ".".join(str(p) for p in error["loc"]) + f": {error['msg']}"
            for error in exc.errors()
        ]
        raise TrainingConfigError("\n".join(problems)) from exc
