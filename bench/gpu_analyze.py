#!/usr/bin/env python
"""GPU benchmark of the analysis pipeline: the study of ``bench_analyze.py`` on a CUDA device.

Same study, same models and same measurements as ``bench/bench_analyze.py`` but with
``device: cuda`` (float16 autocast, channels-last classifiers). The peer measured in the same
run is efficientnet_b4 @ 380 px on 10 crops on the same GPU. Target (issue): <= 0.5 s per
study, excluding model load. Exits with status 2 when no CUDA device is usable.

Usage::

    .venv/bin/python bench/gpu_analyze.py [--runs 10] [--models-dir models] [--work DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_analyze

TARGET_GPU_STUDY_SECONDS = 0.5


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = bench_analyze.build_parser(__doc__.splitlines()[0])
    parser.set_defaults(runs=10)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device is usable: this benchmark needs a machine with an NVIDIA GPU")
        return 2
    analysis = bench_analyze.measure(args, "cuda")
    ok = bench_analyze.report(
        analysis,
        target_study=TARGET_GPU_STUDY_SECONDS,
        target_load=bench_analyze.TARGET_LOAD_SECONDS,
        anchor_peer=None,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(analysis, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
