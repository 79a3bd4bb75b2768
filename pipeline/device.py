"""Compute device selection (``device: auto | cpu | cuda``), threads and precision."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Literal

import torch

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The configured device cannot be used."""


def resolve_device(setting: Literal["auto", "cpu", "cuda"] | str) -> torch.device:
    """The torch device for a ``pipeline.device`` setting.

    ``auto`` takes the first CUDA device when one is usable and the CPU otherwise; ``cuda``
    without a usable CUDA device is an error rather than a silent fall-back.
    """
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if setting == "cuda" or setting.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                "pipeline.device is 'cuda' but no CUDA device is usable "
                "(set device: auto or cpu, or check the NVIDIA driver)"
            )
        return torch.device(setting)
    raise DeviceError(f"unknown device {setting!r}; use auto, cpu or cuda")


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks set by containers or taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    Without an explicit count the smaller of torch's default (physical cores) and the CPUs this
    process may use is taken, so a process pinned to fewer cores does not oversubscribe them.
    """
    threads = num_threads or min(torch.get_num_threads(), available_cpus())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def use_half(device: torch.device, requested: bool = True) -> bool:
    """Whether inference on ``device`` runs in float16 (CUDA only)."""
    return requested and device.type == "cuda"


@contextlib.contextmanager
def inference_context(device: torch.device, half: bool) -> Iterator[None]:
    """``torch.inference_mode`` plus float16 autocast on CUDA when ``half`` is set."""
    with torch.inference_mode():
        if half and device.type == "cuda":
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                yield
        else:
            yield
