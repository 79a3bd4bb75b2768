"""Training of one per-sequence osteoporosis classifier (timm) on vertebral-body crops.

* architectures: any timm model, the paper's ``efficientnet_b4`` (default),
  ``inception_resnet_v2`` and ``resnet50``; from scratch or from a local weights file;
* one logit per crop, logistic loss; class imbalance handled by a positive-class weight
  (``weighted_loss``), by a balanced sampler, or not at all;
* seeded, batched augmentation (:class:`CropAugmenter`): small rotations, zoom and shifts,
  Gaussian noise and a left-right mirror of the context slices. Never intensity scaling: the
  marrow's brightness relative to the series window *is* the signal;
* mixed precision (float16 autocast + gradient scaling) on CUDA;
* after every epoch the patient-level validation AUC (mean of the L1-L4 probabilities, as in
  the pipeline) decides the best weights and early stopping;
* checkpoints after every epoch; a run restarted with the same settings and checkpoint folder
  resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.progress import Progress

from pipeline.classify import aggregate, build_classifier
from pipeline.config import PAPER_ARCHITECTURES
from pipeline.device import resolve_device
from pipeline.labels import SCORED_LEVELS
from pipeline.preprocess import PreprocessSpec
from train.datasets import CropSet
from train.metrics import roc_auc, youden_threshold
from train.progress import Step
from train.splits import check_disjoint

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "classifier-last.pt"


class ClassifierTrainConfig(BaseModel):
    """Settings of one classifier training run (recorded in the model manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str = "efficientnet_b4"
    input_size: int = Field(default=256, ge=16, le=1024)
    context_slices: int = Field(default=1, ge=0, le=4)
    margin: float = Field(default=0.15, ge=0.0, le=1.0)
    """Crop margin around the body (fraction of its larger extent; see PreprocessSpec)."""
    mask_outside: bool = False
    """Blank everything outside the body in the crops (see PreprocessSpec)."""
    epochs: int = Field(default=40, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimiser steps (whatever the epoch)."""
    batch_size: int = Field(default=16, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    drop_rate: float = Field(default=0.2, ge=0, lt=1)
    grad_clip: float | None = Field(default=2.0, gt=0)
    """Clip the gradient norm to this (None: no clipping)."""
    imbalance: Literal["weighted_loss", "balanced_sampler", "none"] = "weighted_loss"
    augment: bool = True
    amp: bool = True
    """float16 autocast on CUDA (ignored on CPU)."""
    patience: int = Field(default=8, ge=1)
    """Stop after this many epochs without a better validation AUC."""
    min_epochs: int = Field(default=1, ge=1)
    time_budget_s: float | None = Field(default=None, gt=0)
    """Stop after the first epoch that ends past this many seconds (best weights are kept)."""
    pretrained: Path | None = None
    """Local timm/torchvision weights file to start from (none: random initialisation)."""
    patient_levels: tuple[str, ...] = SCORED_LEVELS
    seed: int = 0
    device: str = "auto"
    num_workers: int = Field(default=0, ge=0)

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        import timm

        if not timm.is_model(value):
            raise ValueError(
                f"unknown timm architecture {value!r}; the paper's are "
                + ", ".join(PAPER_ARCHITECTURES)
            )
        return value

    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec(
            input_size=self.input_size,
            context_slices=self.context_slices,
            margin=self.margin,
            mask_outside=self.mask_outside,
        )

    def fingerprint(self, extra: str = "") -> str:
        """Hash of the settings that define a run (for safe resuming)."""
        data = self.model_dump(mode="json", exclude={"device", "num_workers", "time_budget_s"})
        text = json.dumps(data, sort_keys=True) + extra
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class EpochRecord:
    epoch: int
    step: int
    loss: float
    val_auc: float
    val_vertebra_auc: float
    seconds: float


@dataclass
class ClassifierTrainResult:
    """The best network (weights loaded, eval mode) and how it was found."""

    model: torch.nn.Module
    config: ClassifierTrainConfig
    best_epoch: int
    best_val_auc: float
    best_val_vertebra_auc: float
    threshold: float
    """Youden threshold of the patient probability on the validation patients."""
    steps: int
    seconds: float
    images_per_second: float
    stopped: str
    history: list[EpochRecord] = field(default_factory=list)
    val_patient_ids: tuple[str, ...] = ()
    val_probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def metrics(self) -> dict[str, float]:
        return {
            "val_patient_auc": round(self.best_val_auc, 4),
            "val_vertebra_auc": round(self.best_val_vertebra_auc, 4),
            "threshold": round(self.threshold, 4),
            "best_epoch": float(self.best_epoch),
            "steps": float(self.steps),
            "train_seconds": round(self.seconds, 1),
            "train_images_per_second": round(self.images_per_second, 2),
        }


class CropAugmenter:
    """Seeded geometric augmentation of a batch of crops (one random draw per image).

    Small rotations (+-8 degrees), zoom (+-8 %) and shifts (+-5 %) resampled with border
    padding, Gaussian noise (sd 0.05 in normalised units) and, with context slices, a
    left-right mirror of the slice order. Intensities are never rescaled: the marrow's
    brightness relative to the series window is what the classifier reads. Batched on the
    tensor's device; the generator's state can be saved and restored for resuming.
    """

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        g = self.generator
        angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(8.0)
        scale = 1.0 + (torch.rand(n, generator=g) * 2 - 1) * 0.08
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.10  # fraction of half-width
        mirror = torch.rand(n, generator=g) < 0.5
        noise = torch.randn(images.shape, generator=g) * 0.05
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        ).to(images.device, images.dtype)
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        out = torch.nn.functional.grid_sample(
            images, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        if images.shape[1] > 1:
            flipped = torch.flip(out, dims=(1,))
            out = torch.where(mirror.to(out.device)[:, None, None, None], flipped, out)
        return out + noise.to(out.device, out.dtype)


def init_head(model: torch.nn.Module, prior: float) -> None:
    """Start the one-logit head near zero with the bias at the prior's log-odds.

    timm initialises heads for 1000 classes (EfficientNet: uniform with range 1/sqrt(outputs));
    with a single output that gives logits of +-10 on the first batch, a huge loss and
    saturated sigmoids. The backbone keeps its (or the pretrained) initialisation.
    """
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=0.01)
        if head.bias is not None:
            p = min(max(prior, 1e-3), 1 - 1e-3)
            torch.nn.init.constant_(head.bias, math.log(p / (1 - p)))


def predict_crops(
    model: torch.nn.Module,
    crops: CropSet,
    device: torch.device,
    *,
    batch_size: int = 64,
    amp: bool = True,
) -> np.ndarray:
    """Probabilities ``(N,)`` of a crop set (eval mode, no augmentation)."""
    model.eval()
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            batch = crops.tensor(slice(start, start + batch_size)).to(device)
            with torch.autocast(
                device_type="cuda", dtype=torch.float16, enabled=amp and device.type == "cuda"
            ):
                logits = model(batch).float().reshape(len(batch), -1)[:, 0]
            out.append(torch.sigmoid(logits).cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def patient_probabilities(
    crops: CropSet,
    probabilities: np.ndarray,
    levels: tuple[str, ...] = SCORED_LEVELS,
    min_levels: int = 1,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Patient ids, labels and patient probabilities (pipeline aggregation of the levels)."""
    ids: list[str] = []
    labels: list[bool] = []
    values: list[float] = []
    for pid in dict.fromkeys(crops.patient_ids.tolist()):
        rows = np.flatnonzero(crops.patient_ids == pid)
        per_level = {str(crops.levels[r]): float(probabilities[r]) for r in rows}
        value = aggregate(per_level, levels, "mean", min_levels)
        if value is None:
            continue
        ids.append(str(pid))
        labels.append(bool(crops.labels[rows[0]]))
        values.append(value)
    return ids, np.array(labels, dtype=bool), np.array(values)


def _set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def train_classifier(
    train: CropSet,
    validation: CropSet,
    config: ClassifierTrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    progress: Progress | None = None,
    description: str | None = None,
) -> ClassifierTrainResult:
    """Train a classifier on ``train`` crops; pick the epoch with the best patient-level AUC on
    ``validation`` (which must hold other patients and both classes)."""
    check_disjoint(train=train.patient_ids.tolist(), validation=validation.patient_ids.tolist())
    if len(train) == 0 or len(validation) == 0:
        raise ValueError("training and validation need at least one vertebra image each")
    for name, crops in (("training", train), ("validation", validation)):
        if crops.labels.all() or not crops.labels.any():
            raise ValueError(f"the {name} set needs patients of both classes")
    if train.spec != config.preprocess_spec() or validation.spec != config.preprocess_spec():
        raise ValueError("the crops were not made with this configuration's preprocessing")
    device = resolve_device(config.device)
    _set_seed(config.seed)
    in_chans = config.preprocess_spec().in_chans
    model = build_classifier(
        config.architecture, in_chans, config.pretrained, drop_rate=config.drop_rate
    ).to(device)
    use_amp = config.amp and device.type == "cuda"
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    positives = int(train.labels.sum())
    negatives = len(train) - positives
    balanced = config.imbalance != "none"
    init_head(model, 0.5 if balanced else positives / len(train))
    pos_weight = None
    if config.imbalance == "weighted_loss":
        pos_weight = torch.tensor([negatives / max(positives, 1)], device=device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    steps_per_epoch = max(1, len(train) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = max(1, int(config.warmup_fraction * total_steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_fraction)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    augment = CropAugmenter(config.seed) if config.augment else None
    sampler_rng = np.random.default_rng(config.seed)

    fingerprint = config.fingerprint(
        ",".join(sorted(set(train.patient_ids.tolist())))
        + "|"
        + ",".join(sorted(set(validation.patient_ids.tolist())))
    )
    state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "best_auc": -1.0,
        "best_vertebra_auc": float("nan"),
        "best_epoch": 0,
        "best_state": None,
        "history": [],
        "stale": 0,
        "seconds": 0.0,
        "images": 0,
    }
    checkpoint = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") == fingerprint:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = saved["state"]
            sampler_rng.bit_generator.state = saved["sampler_rng"]
            torch.set_rng_state(saved["torch_rng"])
            if augment is not None and saved.get("augment_rng") is not None:
                augment.generator.set_state(saved["augment_rng"])
            log.info("resuming classifier training at epoch %d", state["epoch"])
        else:
            log.warning("checkpoint %s belongs to other settings or data; starting afresh",
                        checkpoint)

    task = Step(progress, description or f"train {config.architecture}", total_steps)
    task.total(total_steps, completed=state["step"])
    start_time = time.perf_counter() - float(state["seconds"])
    stopped = "epochs"
    weights = None
    if config.imbalance == "balanced_sampler":
        weights = np.where(train.labels, 0.5 / max(positives, 1), 0.5 / max(negatives, 1))
        weights = weights / weights.sum()

    while state["epoch"] < config.epochs:
        if state["step"] >= total_steps:
            stopped = "max_steps"
            break
        if state["epoch"] >= config.min_epochs and state["stale"] >= config.patience:
            stopped = "early_stopping"  # a resumed run that had already stopped
            break
        model.train()
        if weights is not None:
            order = sampler_rng.choice(len(train), size=len(train), replace=True, p=weights)
        else:
            order = sampler_rng.permutation(len(train))
        losses: list[float] = []
        for batch_index in range(steps_per_epoch):
            if state["step"] >= total_steps:
                break
            rows = order[batch_index * config.batch_size : (batch_index + 1) * config.batch_size]
            images = train.tensor(np.sort(rows))
            targets = torch.from_numpy(train.labels[np.sort(rows)].astype(np.float32))
            images = images.to(device, non_blocking=True)
            if augment is not None:
                images = augment(images)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                logits = model(images).float().reshape(len(images), -1)[:, 0]
                loss = loss_fn(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
            state["step"] += 1
            state["images"] += len(images)
            task.advance()
        state["epoch"] += 1

        probabilities = predict_crops(model, validation, device, amp=config.amp)
        _, labels, patient_p = patient_probabilities(
            validation, probabilities, config.patient_levels
        )
        val_auc = _safe_auc(labels, patient_p)
        vertebra_auc = _safe_auc(validation.labels, probabilities)
        elapsed = time.perf_counter() - start_time
        record = EpochRecord(
            state["epoch"], state["step"], float(np.mean(losses)) if losses else float("nan"),
            val_auc, vertebra_auc, elapsed,
        )
        state["history"].append(record.__dict__)
        task.status(f"loss {record.loss:.3f} val AUC {val_auc:.3f}")
        log.info(
            "epoch %d: loss %.4f, validation AUC %.4f (vertebra %.4f)",
            record.epoch, record.loss, val_auc, vertebra_auc,
        )
        if val_auc > state["best_auc"]:
            state["best_auc"] = val_auc
            state["best_vertebra_auc"] = vertebra_auc
            state["best_epoch"] = state["epoch"]
            state["best_state"] = {
                k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            }
            state["stale"] = 0
        else:
            state["stale"] += 1
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
                    "sampler_rng": sampler_rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "augment_rng": augment.generator.get_state() if augment else None,
                },
                temp,
            )
            temp.replace(checkpoint)
        if state["epoch"] >= config.min_epochs:
            if state["stale"] >= config.patience:
                stopped = "early_stopping"
                break
            if config.time_budget_s is not None and elapsed >= config.time_budget_s:
                stopped = "time_budget"
                break
    task.finish()

    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    model.eval()
    probabilities = predict_crops(model, validation, device, amp=config.amp)
    ids, labels, patient_p = patient_probabilities(
        validation, probabilities, config.patient_levels
    )
    threshold = youden_threshold(labels, patient_p) if 0 < labels.sum() < len(labels) else 0.5
    seconds = float(state["seconds"])
    return ClassifierTrainResult(
        model=model.cpu(),
        config=config,
        best_epoch=int(state["best_epoch"]),
        best_val_auc=float(state["best_auc"]),
        best_val_vertebra_auc=float(state["best_vertebra_auc"]),
        threshold=float(min(max(threshold, 0.0), 1.0)),
        steps=int(state["step"]),
        seconds=seconds,
        images_per_second=float(state["images"]) / seconds if seconds > 0 else 0.0,
        stopped=stopped,
        history=[EpochRecord(**record) for record in state["history"]],
        val_patient_ids=tuple(ids),
        val_probabilities=patient_p,
        val_labels=labels,
    )


def _safe_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(labels) == 0 or labels.all() or not labels.any():
        return float("nan")
    return roc_auc(labels, scores)
