"""Per-sequence osteoporosis classifiers (timm) and patient-level aggregation.

A classifier sees one vertebral-body image (see :mod:`pipeline.preprocess`) and returns one
logit; its sigmoid is the probability that the patient has osteoporosis (DXA T-score <= -2.5)
as read from that vertebra.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final, Literal

import numpy as np
import timm
import torch

from pipeline.config import PAPER_ARCHITECTURES
from pipeline.device import inference_context

NUM_OUTPUTS: Final[int] = 1
"""One logit per image (binary task, trained with a logistic loss)."""

__all__ = [
    "NUM_OUTPUTS",
    "PAPER_ARCHITECTURES",
    "aggregate",
    "build_classifier",
    "fuse",
    "predict_levels",
    "predict_probabilities",
]


def build_classifier(
    architecture: str,
    in_chans: int = 3,
    pretrained_path: Path | str | None = None,
    *,
    drop_rate: float = 0.0,
) -> torch.nn.Module:
    """A timm classifier with one output logit.

    ``pretrained_path`` names a local timm/torchvision checkpoint (e.g. ImageNet weights) to
    start training from; its first convolution is adapted to ``in_chans`` and its head is
    replaced. Without it the network is randomly initialised (nothing is downloaded).
    """
    if not timm.is_model(architecture):
        raise ValueError(
            f'Argument "architecture" should be a timm model name such as '
            f"{', '.join(PAPER_ARCHITECTURES)}; got {architecture!r}"
        )
    if in_chans < 1:
        raise ValueError('Argument "in_chans" should be a positive integer')
    if pretrained_path is not None:
        path = Path(pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights {path} do not exist")
        return timm.create_model(
            architecture,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=NUM_OUTPUTS,
            in_chans=in_chans,
            drop_rate=drop_rate,
        )
    return timm.create_model(
        architecture,
        pretrained=False,
        num_classes=NUM_OUTPUTS,
        in_chans=in_chans,
        drop_rate=drop_rate,
    )


def predict_probabilities(
    model: torch.nn.Module,
    images: np.ndarray,
    device: torch.device,
    *,
    half: bool = False,
    batch_size: int = 16,
) -> np.ndarray:
    """Probabilities ``(N,)`` float64 for a batch of images ``(N, C, S, S)``."""
    if len(images) == 0:
        return np.zeros(0)
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    results: list[np.ndarray] = []
    with inference_context(device, half):
        for start in range(0, len(tensor), batch_size):
            batch = tensor[start : start + batch_size].to(device, non_blocking=True)
            batch = batch.contiguous(memory_format=torch.channels_last)
            logits = model(batch).float().reshape(len(batch), -1)[:, 0]
            results.append(torch.sigmoid(logits).cpu().numpy().astype(np.float64))
    return np.concatenate(results)


def predict_levels(
    model: torch.nn.Module,
    crops: Mapping[str, np.ndarray],
    device: torch.device,
    *,
    half: bool = False,
    batch_size: int = 16,
) -> dict[str, float]:
    """Probability per vertebral level for the crops of one series."""
    levels = list(crops)
    if not levels:
        return {}
    probabilities = predict_probabilities(
        model, np.stack([crops[level] for level in levels]), device, half=half,
        batch_size=batch_size,
    )
    return {level: float(p) for level, p in zip(levels, probabilities, strict=True)}


def aggregate(
    probabilities: Mapping[str, float],
    levels: Iterable[str],
    method: Literal["mean", "median", "max"] = "mean",
    min_levels: int = 1,
) -> float | None:
    """Patient probability of one sequence from its per-level probabilities.

    Only ``levels`` count (L1-L4 by default, as in DXA); ``None`` when fewer than
    ``min_levels`` of them were found.
    """
    values = [probabilities[level] for level in levels if level in probabilities]
    if len(values) < max(1, min_levels):
        return None
    if method == "mean":
        return float(np.mean(values))
    if method == "median":
        return float(np.median(values))
    return float(np.max(values))


def fuse(values: Iterable[float | None], method: Literal["mean", "max"] = "mean") -> float | None:
    """Fused probability of the available sequences (``None`` when none is available)."""
    present = [value for value in values if value is not None]
    if not present:
        return None
    return float(np.mean(present)) if method == "mean" else float(np.max(present))
