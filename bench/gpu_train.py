"""Training throughput (images/s) of each classifier architecture on a CUDA GPU.

For every architecture the script times optimiser steps of the project's training step
(float16 autocast, gradient scaling, channels-last, the batched crop augmentation) and, in the
same run, the same network's bare step (no augmentation, no gradient clipping) as the peer, so
the overhead of the trainer shows as a ratio. The segmenter (MONAI UNet) is timed the same way.

    .venv/bin/python bench/gpu_train.py                     # default sizes per architecture
    .venv/bin/python bench/gpu_train.py --batch-size 64 --steps 30 --size 256

Needs a CUDA device; on a machine without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

NATIVE = {"efficientnet_b4": 380, "inception_resnet_v2": 299, "resnet50": 224}


def _time_steps(step, steps: int, warmup: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def classifier_rates(
    architecture: str, size: int, batch: int, steps: int, warmup: int
) -> tuple[float, float]:
    from pipeline.classify import build_classifier
    from train.cls_trainer import CropAugmenter, init_head

    device = torch.device("cuda")
    model = build_classifier(architecture, 3, drop_rate=0.2).to(device)
    model = model.to(memory_format=torch.channels_last)
    init_head(model, 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.8], device=device))
    images = torch.randn(batch, 3, size, size, device=device)
    targets = (torch.rand(batch, device=device) < 0.35).float()
    augment = CropAugmenter(0)

    def step(full: bool) -> None:
        x = augment(images) if full else images
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            logits = model(x).float().reshape(batch, -1)[:, 0]
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if full:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        scaler.step(optimizer)
        scaler.update()

    bare = _time_steps(lambda: step(False), steps, warmup)
    ours = _time_steps(lambda: step(True), steps, warmup)
    return batch * steps / ours, batch * steps / bare


def segmenter_rates(size: int, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    from monai.losses import DiceCELoss

    from pipeline.labels import NUM_CLASSES
    from pipeline.segment import build_segmenter

    device = torch.device("cuda")
    model = build_segmenter(3).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cuda")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch, 1, size, size), device=device)

    def step() -> None:
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            logits = model(images)
        loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    seconds = _time_steps(step, steps, warmup)
    return batch * steps / seconds, math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default="efficientnet_b4,inception_resnet_v2,resnet50")
    parser.add_argument("--size", type=int, default=None, help="input size (default: native)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, AMP float16")
    print(f"{'network':24s} {'input':>6s} {'batch':>6s} {'trainer img/s':>14s} "
          f"{'bare img/s':>11s} {'ratio':>6s}")  # fmt: skip
    for architecture in [a.strip() for a in args.architectures.split(",") if a.strip()]:
        size = args.size or NATIVE.get(architecture, 256)
        ours, bare = classifier_rates(architecture, size, args.batch_size, args.steps, args.warmup)
        print(f"{architecture:24s} {size:6d} {args.batch_size:6d} {ours:14.1f} {bare:11.1f} "
              f"{ours / bare:6.2f}")  # fmt: skip
        torch.cuda.empty_cache()
    rate, _ = segmenter_rates(256, 16, args.steps, args.warmup)
    print(f"{'monai_unet_2d (slices)':24s} {256:6d} {16:6d} {rate:14.1f} {'-':>11s} {'-':>6s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
