#!/usr/bin/env python
"""Benchmark of model building on the CPU: ``models build-demo`` and the trainers' throughput.

Measures, in one run:

* the peers of ANCHORS.md on this machine, right now: EfficientNet-b4 @ 160 px training,
  batch 16 (reference: about 10 images/s on the 2-core reference machine) and the MONAI UNet
  @ 256 px training, batch 8 (about 20 slices/s). Their ratio to the reference says how fast
  (or how busy) this machine is;
* the trainers' own throughput at the demo sizes (classifier with augmentation, segmenter with
  MONAI augmentation, both including their validation passes), as a ratio to the bare
  network's step measured just before (use enough ``--steps`` that validation is amortised);
* with ``--build``: a full ``build_demo`` into a temporary folder: its wall time against the
  15-minute target, and the steps each trainer completed against its planned schedule (the
  per-model time budgets only cut a schedule short on a machine much slower or busier than
  the reference, which the peer ratio above shows).

Usage::

    .venv/bin/python bench/bench_train.py                 # throughput only (about 2 minutes)
    .venv/bin/python bench/bench_train.py --build         # plus the full demo build
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REFERENCE_B4_160 = 10.0  # images/s, ANCHORS.md
REFERENCE_UNET_256 = 20.0  # slices/s, ANCHORS.md
TARGET_BUILD_S = 15 * 60.0


def _rate(step: Callable[[], None], items: int, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return items * steps / (time.perf_counter() - start)


def b4_bare_rate(size: int, batch: int, steps: int) -> float:
    from pipeline.classify import build_classifier

    model = build_classifier("efficientnet_b4", 3)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    y = (torch.rand(batch) < 0.35).float()

    def step() -> None:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return _rate(step, batch, steps)


def unet_bare_rate(size: int, batch: int, steps: int) -> float:
    from monai.losses import DiceCELoss

    from pipeline.labels import NUM_CLASSES
    from pipeline.segment import build_segmenter

    model = build_segmenter(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch, 1, size, size))

    def step() -> None:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return _rate(step, batch, steps)


def trainer_rates(steps: int) -> dict[str, float]:
    """Images (slices) per second of the project's trainers at the demo's sizes."""
    from train.cls_trainer import train_classifier
    from train.datasets import build_crop_set, build_slice_set
    from train.demo import DemoPlan
    from train.seg_trainer import train_segmenter
    from train.splits import train_validation_split
    from train.synthetic import synthetic_patients

    plan = DemoPlan()
    start = time.perf_counter()
    patients = synthetic_patients(plan.seed, 8)
    simulate = (time.perf_counter() - start) / len(patients)
    ids = [p.patient_id for p in patients]
    labels = np.array([i % 2 == 0 for i in range(len(ids))])
    train_ids, val_ids = train_validation_split(ids, labels, 0.25, 0)
    relabelled = [
        type(p)(p.patient_id, bool(lab), p.t_score, p.series, p.oracle_score, p.info)
        for p, lab in zip(patients, labels, strict=True)
    ]
    cls_config = plan.classifier.model_copy(
        update={"device": "cpu", "max_steps": steps, "epochs": 100, "time_budget_s": None}
    )
    crops = build_crop_set(relabelled, "T1", cls_config.preprocess_spec())
    result = train_classifier(crops.subset(train_ids), crops.subset(val_ids), cls_config)
    seg_config = plan.segmenter.model_copy(
        update={"device": "cpu", "steps": steps, "eval_every": 10 * steps, "time_budget_s": None}
    )
    train_set = [p for p in relabelled if p.patient_id in set(train_ids)]
    val_set = [p for p in relabelled if p.patient_id in set(val_ids)][:1]
    slices = build_slice_set(train_set, seg_config.input_spec())
    seg = train_segmenter(slices, val_set, seg_config)
    return {
        "simulate_s_per_patient": simulate,
        "classifier_images_per_s": result.images_per_second,
        "segmenter_slices_per_s": seg.slices_per_second,
        "classifier_size": float(cls_config.input_size),
        "segmenter_size": float(seg_config.input_size),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--build", action="store_true", help="also run the full demo build")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    from pipeline.device import configure_threads

    threads = configure_threads()
    print(f"torch {torch.__version__}, {threads} CPU threads")
    results: dict[str, float] = {}
    peer_steps = max(3, args.steps // 5)
    results["anchor_b4_160_images_per_s"] = b4_bare_rate(160, 16, peer_steps)
    results["anchor_unet_256_slices_per_s"] = unet_bare_rate(256, 8, peer_steps)
    speed = 0.5 * (
        results["anchor_b4_160_images_per_s"] / REFERENCE_B4_160
        + results["anchor_unet_256_slices_per_s"] / REFERENCE_UNET_256
    )
    results["machine_speed_vs_reference"] = speed
    print(f"peer  b4 @160 train  {results['anchor_b4_160_images_per_s']:7.1f} img/s "
          f"(reference {REFERENCE_B4_160:.0f})")  # fmt: skip
    print(f"peer  UNet @256 train {results['anchor_unet_256_slices_per_s']:6.1f} slices/s "
          f"(reference {REFERENCE_UNET_256:.0f})")  # fmt: skip
    print(f"this machine runs at {speed:.2f}x the reference machine")

    from train.demo import DemoPlan

    plan = DemoPlan()
    cls_size, seg_size = plan.classifier.input_size, plan.segmenter.input_size
    results["bare_b4_demo_images_per_s"] = b4_bare_rate(cls_size, 16, args.steps)
    results["bare_unet_demo_slices_per_s"] = unet_bare_rate(seg_size, 8, args.steps)
    results.update(trainer_rates(args.steps))
    print(f"classifier trainer @{cls_size} (with validation): "
          f"{results['classifier_images_per_s']:.1f} img/s, "
          f"{results['classifier_images_per_s'] / results['bare_b4_demo_images_per_s']:.2f}x "
          "the bare network step")  # fmt: skip
    print(f"segmenter trainer  @{seg_size} (with validation): "
          f"{results['segmenter_slices_per_s']:.1f} slices/s, "
          f"{results['segmenter_slices_per_s'] / results['bare_unet_demo_slices_per_s']:.2f}x "
          "the bare network step")  # fmt: skip
    print(f"simulation: {results['simulate_s_per_patient']:.2f} s per patient")

    if args.build:
        from train.demo import build_demo

        with tempfile.TemporaryDirectory(prefix="opmri-bench-") as tmp:
            start = time.perf_counter()
            result = build_demo(Path(tmp), force=True)
            wall = time.perf_counter() - start
            results["build_wall_s"] = wall
            for name, manifest in result.manifests.items():
                results[f"{name}_steps"] = manifest.metrics.get("steps", float("nan"))
                results[f"{name}_seconds"] = manifest.metrics.get("train_seconds", float("nan"))
        print(f"build-demo: {wall:.0f} s wall = {wall / TARGET_BUILD_S:.2f} of the 15-minute "
              "target")  # fmt: skip
        planned_cls = plan.classifier.epochs
        print(f"  segmenter: {results['segmenter_steps']:.0f} of {plan.segmenter.steps} steps in "
              f"{results['segmenter_seconds']:.0f} s")  # fmt: skip
        for name in ("cls-t1", "cls-t2"):
            epoch = result.manifests[name].metrics.get("best_epoch", float("nan"))
            print(f"  {name}: {results[f'{name}_steps']:.0f} steps in "
                  f"{results[f'{name}_seconds']:.0f} s (schedule {planned_cls} epochs, best "
                  f"epoch {epoch:.0f})")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
