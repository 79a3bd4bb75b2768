"""Training of the vertebral-body segmenter (MONAI 2D UNet on sagittal slices).

* inputs and targets are made by the pipeline's :func:`~pipeline.segment.prepare_slices` and
  :func:`~pipeline.segment.prepare_labels` (see :func:`train.datasets.build_slice_set`);
* loss: Dice + cross-entropy (:class:`monai.losses.DiceCELoss`);
* seeded MONAI augmentations (affine, intensity scale and gamma, bias field, Gaussian noise);
  the segmenter, unlike the classifiers, may see intensity changes;
* validation on whole volumes exactly as the pipeline segments them (scores resized back to
  the source grid, connected-component post-processing with anatomical level order): Dice per
  level and the fraction of vertebrae with the correct level label;
* the best checkpoint (mean Dice over L1-L5) is kept; checkpoints let a restarted run resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandScaleIntensityd,
)
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress

from pipeline.config import SegmentationSettings
from pipeline.device import resolve_device
from pipeline.labels import LABEL_OF, LUMBAR_LEVELS, NUM_CLASSES
from pipeline.segment import (
    SegmentationInputSpec,
    UNetParams,
    build_segmenter,
    postprocess_labelmap,
    predict_labelmaps,
)
from train.datasets import PatientSample, SliceSet
from train.progress import Step

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "segmenter-last.pt"
CORRECT_LEVEL_DICE = 0.5
"""A reference vertebra counts as correctly labelled when the predicted mask carrying its level
label overlaps it with a Dice of at least this (a level shifted by one scores near 0)."""


class SegmenterTrainConfig(BaseModel):
    """Settings of one segmenter training run (recorded in the model manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(default=256, ge=32, le=1024)
    context_slices: int = Field(default=1, ge=0, le=4)
    unet: UNetParams = UNetParams()
    steps: int = Field(default=4000, ge=1)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    eval_every: int = Field(default=250, ge=1)
    labelled_fraction: float = Field(default=0.8, ge=0, le=1)
    """Share of each batch drawn from slices that contain a label (the rest: any slice)."""
    augment: bool = True
    amp: bool = True
    time_budget_s: float | None = Field(default=None, gt=0)
    """Stop at the first validation past this many seconds (best weights are kept)."""
    min_steps: int = Field(default=0, ge=0)
    """The time budget never stops training before this many steps."""
    seed: int = 0
    device: str = "auto"

    def input_spec(self) -> SegmentationInputSpec:
        return SegmentationInputSpec(
            input_size=self.input_size, context_slices=self.context_slices
        )

    def fingerprint(self, extra: str = "") -> str:
        data = self.model_dump(mode="json", exclude={"device", "time_budget_s"})
        text = json.dumps(data, sort_keys=True) + extra
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SegValidation:
    """Validation of a segmenter on whole series (pipeline post-processing)."""

    dice: dict[str, float]
    """Mean Dice per level L1-L5 over the validation series."""
    level_accuracy: float
    """Fraction of reference L1-L5 vertebrae with the correct level label."""
    series: int

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values()))) if self.dice else float("nan")

    def as_dict(self) -> dict[str, float]:
        out = {f"dice_{level}": round(value, 4) for level, value in self.dice.items()}
        out["dice_mean"] = round(self.mean_dice, 4)
        out["level_accuracy"] = round(self.level_accuracy, 4)
        return out


def dice_per_level(
    truth: np.ndarray, predicted: np.ndarray, levels: Sequence[str] = LUMBAR_LEVELS
) -> dict[str, float]:
    """Dice of each level present in ``truth`` (levels absent from the reference are left out;
    a level present in the reference and missing from the prediction scores 0)."""
    out: dict[str, float] = {}
    for level in levels:
        label = LABEL_OF[level]
        ref = truth == label
        ref_count = int(ref.sum())
        if ref_count == 0:
            continue
        pred = predicted == label
        overlap = int((ref & pred).sum())
        out[level] = 2.0 * overlap / (ref_count + int(pred.sum()))
    return out


def validate_segmenter(
    model: torch.nn.Module,
    patients: Sequence[PatientSample],
    spec: SegmentationInputSpec,
    device: torch.device,
    *,
    settings: SegmentationSettings | None = None,
    half: bool = False,
) -> SegValidation:
    """Segment every series of ``patients`` as the pipeline does and compare with the truth."""
    model.eval()
    per_level: dict[str, list[float]] = {level: [] for level in LUMBAR_LEVELS}
    correct = total = count = 0
    for patient in patients:
        series_list = list(patient.series.values())
        raws = predict_labelmaps(
            model, [s.array for s in series_list], spec, device, half=half
        )
        for series, raw in zip(series_list, raws, strict=True):
            labelmap = postprocess_labelmap(raw, series.geometry, settings)
            scores = dice_per_level(series.labelmap, labelmap)
            for level, value in scores.items():
                per_level[level].append(value)
                total += 1
                correct += value >= CORRECT_LEVEL_DICE
            count += 1
    dice = {level: float(np.mean(v)) for level, v in per_level.items() if v}
    return SegValidation(dice, correct / total if total else float("nan"), count)


@dataclass
class SegmenterTrainResult:
    model: torch.nn.Module
    config: SegmenterTrainConfig
    best_step: int
    best: SegValidation
    steps: int
    seconds: float
    slices_per_second: float
    stopped: str
    history: list[dict[str, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {f"val_{key}": value for key, value in self.best.as_dict().items()}
        out.update(
            {
                "best_step": float(self.best_step),
                "steps": float(self.steps),
                "train_seconds": round(self.seconds, 1),
                "train_slices_per_second": round(self.slices_per_second, 2),
            }
        )
        return out


def _augmenter(seed: int) -> Compose:
    keys = ("image", "label")
    transform = Compose(
        [
            RandAffined(
                keys=keys,
                prob=0.7,
                rotate_range=(math.radians(12.0),),
                scale_range=(0.12, 0.12),
                translate_range=(0.06, 0.06),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.15, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.75, 1.35), prob=0.4),
            RandBiasFieldd(keys="image", coeff_range=(0.0, 0.15), prob=0.3),
            RandGaussianNoised(keys="image", std=0.03, prob=0.4),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


def _plain(value: Any) -> torch.Tensor:
    if hasattr(value, "as_tensor"):
        return value.as_tensor()
    return torch.as_tensor(value)


def train_segmenter(
    train: SliceSet,
    validation: Sequence[PatientSample],
    config: SegmenterTrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    progress: Progress | None = None,
    settings: SegmentationSettings | None = None,
) -> SegmenterTrainResult:
    """Train the segmenter on ``train`` slices; validate on whole ``validation`` series."""
    if len(train) == 0:
        raise ValueError("no training slices")
    if not validation:
        raise ValueError("validation needs at least one patient")
    shared = set(train.patient_ids.tolist()) & {p.patient_id for p in validation}
    if shared:
        raise ValueError(f"{len(shared)} patient(s) are in both training and validation")
    spec = config.input_spec()
    if train.spec != spec:
        raise ValueError("the slices were not made with this configuration's input spec")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_segmenter(spec.in_chans, config.unet, NUM_CLASSES).to(device)
    use_amp = config.amp and device.type == "cuda"
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / max(1, config.warmup_steps)
        fraction = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, fraction)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    augment = _augmenter(config.seed) if config.augment else None
    rng = np.random.default_rng(config.seed)
    labelled = np.flatnonzero(train.targets.reshape(len(train), -1).any(axis=1))
    if len(labelled) == 0:
        labelled = np.arange(len(train))

    fingerprint = config.fingerprint(
        ",".join(sorted(set(train.patient_ids.tolist())))
        + "|"
        + ",".join(sorted(p.patient_id for p in validation))
    )
    state: dict[str, Any] = {
        "step": 0,
        "best_score": -1.0,
        "best_step": 0,
        "best": None,
        "best_state": None,
        "history": [],
        "seconds": 0.0,
        "slices": 0,
    }
    checkpoint = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") == fingerprint:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = saved["state"]
            rng.bit_generator.state = saved["rng"]
            torch.set_rng_state(saved["torch_rng"])
            if augment is not None:
                augment.set_random_state(seed=config.seed + 104729 * int(state["step"]))
            log.info("resuming segmenter training at step %d", state["step"])
        else:
            log.warning("checkpoint %s belongs to other settings or data; starting afresh",
                        checkpoint)

    task = Step(progress, "train segmenter", config.steps)
    task.total(config.steps, completed=state["step"])
    start_time = time.perf_counter() - float(state["seconds"])
    stopped = "steps"
    n_labelled = round(config.labelled_fraction * config.batch_size)
    losses: list[float] = []
    while state["step"] < config.steps:
        model.train()
        rows = np.concatenate(
            [
                rng.choice(labelled, size=n_labelled),
                rng.integers(0, len(train), size=config.batch_size - n_labelled),
            ]
        )
        images = torch.from_numpy(train.inputs[rows].astype(np.float32))
        labels = torch.from_numpy(train.targets[rows].astype(np.int64))[:, None]
        if augment is not None:
            pairs = [augment({"image": x, "label": y}) for x, y in zip(images, labels, strict=True)]
            images = torch.stack([_plain(p["image"]) for p in pairs])
            labels = torch.stack([_plain(p["label"]) for p in pairs]).round().long()
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
            logits = model(images)
        loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(float(loss.detach()))
        state["step"] += 1
        state["slices"] += len(rows)
        task.advance()
        last = state["step"] >= config.steps
        if state["step"] % config.eval_every == 0 or last:
            result = validate_segmenter(model, validation, spec, device, settings=settings)
            elapsed = time.perf_counter() - start_time
            record = {
                "step": float(state["step"]),
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "seconds": elapsed,
                **result.as_dict(),
            }
            losses = []
            state["history"].append(record)
            task.status(
                f"loss {record['loss']:.3f} Dice {result.mean_dice:.3f} "
                f"levels {result.level_accuracy:.3f}"
            )
            log.info("step %d: %s", state["step"], record)
            score = result.mean_dice
            if score > state["best_score"]:
                state["best_score"] = score
                state["best_step"] = state["step"]
                state["best"] = result
                state["best_state"] = {
                    k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                }
            state["seconds"] = elapsed
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                temp = checkpoint.with_suffix(".tmp")
                torch.save(
                    {
                        "fingerprint": fingerprint,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "state": state,
                        "rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(),
                    },
                    temp,
                )
                temp.replace(checkpoint)
            if augment is not None:
                augment.set_random_state(seed=config.seed + 104729 * int(state["step"]))
            if (
                config.time_budget_s is not None
                and elapsed >= config.time_budget_s
                and state["step"] >= config.min_steps
            ):
                stopped = "time_budget"
                break
    task.finish()
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    model.eval()
    seconds = float(state["seconds"])
    best = state["best"] or SegValidation({}, float("nan"), 0)
    return SegmenterTrainResult(
        model=model.cpu(),
        config=config,
        best_step=int(state["best_step"]),
        best=best,
        steps=int(state["step"]),
        seconds=seconds,
        slices_per_second=float(state["slices"]) / seconds if seconds > 0 else 0.0,
        stopped=stopped,
        history=list(state["history"]),
    )
