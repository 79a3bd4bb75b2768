#!/usr/bin/env python
"""Benchmark of the analysis pipeline on one synthetic study (sagittal T1 + T2, 512x512).

Measures, in a fresh process so that load time and memory are those of a worker:

* model load (``Analyzer`` construction: manifests, SHA-256, weights) and warm-up;
* wall time of ``Analyzer.analyze_study`` on the study (all files of the study folder, five
  series of which two are analysed), excluding model load;
* peak resident memory of the analysing process;
* the peer workload of ANCHORS.md, "efficientnet_b4 @ 380 px, forward, 10 crops" (3.2 s on
  the 2-core reference machine), run alternately with the study in the same process: the
  median ratio study / peer does not depend on how fast or how busy this machine is, and
  ratio x 3.2 s is the study time on the reference machine.

Targets (issue): study <= 5 s and model load <= 3 s on 2 CPU cores with the default
EfficientNet-b4 classifiers, peak RSS <= 2.5 GB.

Without ``--models-dir`` the benchmark builds its own model set: randomly initialised
EfficientNet-b4 classifiers at the default input size (timing is independent of the weights)
and the default segmenter trained briefly on the benchmark patient itself (so that it finds
the vertebrae and the classifiers see all ten bodies; a random segmenter would find none and
flatter the figure).

Usage::

    .venv/bin/python bench/bench_analyze.py [--runs 5] [--models-dir models] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ANCHOR_PEER_SECONDS = 3.2  # ANCHORS.md: efficientnet_b4 @ 380 px, forward, 10 crops
TARGET_STUDY_SECONDS = 5.0
TARGET_LOAD_SECONDS = 3.0
TARGET_RSS_GB = 2.5
STUDY_SEED, STUDY_INDEX = 0, 6
"""Phantom patient whose sagittal T1 and T2 have 15 slices each at the 512 matrix."""
SEG_STEPS = 150


# -- preparation ------------------------------------------------------------------------------


def bench_patient() -> Any:
    from train.phantom.options import CohortOptions
    from train.phantom.simulate import simulate_patient

    options = CohortOptions(seed=STUDY_SEED, matrix=(512,))
    return simulate_patient(STUDY_SEED, STUDY_INDEX, options)


def make_study(work: Path, patient: Any) -> Path:
    """The patient's study (all series kinds, explicit VR little endian) as DICOM files."""
    from pydicom.uid import ExplicitVRLittleEndian

    from train.phantom.dicomio import write_patient

    marker = work / "study.txt"
    if not marker.exists():
        written = write_patient(patient, work / "cohort", ExplicitVRLittleEndian)
        marker.write_text(str(work / "cohort" / written.study_dir))
    return Path(marker.read_text())


def make_models(work: Path, patient: Any, steps: int, input_size: int) -> Path:
    """Random-init EfficientNet-b4 classifiers and the default segmenter trained on the
    benchmark patient itself (enough to find its vertebrae; timing does not depend on how
    well the weights generalise)."""
    import numpy as np

    from pipeline.classify import build_classifier
    from pipeline.preprocess import PreprocessSpec
    from pipeline.registry import (
        SEGMENTER,
        classifier_manifest,
        save_model,
        segmenter_manifest,
    )
    from pipeline.segment import SegmentationInputSpec, UNetParams
    from tests.pipeline_fixtures import train_segmenter

    models = work / f"models-{input_size}"
    if (models / "cls-t2" / "manifest.json").exists():
        return models
    spec = SegmentationInputSpec()
    params = UNetParams()
    volumes = [
        (patient.get(kind).pixels.astype(np.float32), patient.get(kind).labelmap)
        for kind in ("t1", "t2")
    ]
    model = train_segmenter(volumes, params=params, spec=spec, steps=steps)
    save_model(
        models / SEGMENTER,
        model,
        segmenter_manifest(
            version="bench",
            training_data=f"the benchmark's phantom patient only ({steps} steps)",
            synthetic=True,
            params=params,
            spec=spec,
            notes="benchmark model (timing only)",
        ),
    )
    crop_spec = PreprocessSpec(input_size=input_size)
    for sequence in ("T1", "T2"):
        save_model(
            models / f"cls-{sequence.lower()}",
            build_classifier("efficientnet_b4", crop_spec.in_chans),
            classifier_manifest(
                sequence,  # type: ignore[arg-type]
                architecture="efficientnet_b4",
                threshold=0.5,
                version="bench-random",
                training_data="none: random initialisation (timing only)",
                synthetic=True,
                spec=crop_spec,
                notes="benchmark model (timing only)",
            ),
        )
    return models


# -- measurement (child processes) -------------------------------------------------------------


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peer(device: str) -> Any:
    """ANCHORS.md peer: efficientnet_b4 @ 380 px forward on 10 crops (one batch); returns a
    callable that runs it once."""
    import torch

    from pipeline.classify import build_classifier
    from pipeline.device import inference_context, resolve_device

    dev = resolve_device(device)
    half = dev.type == "cuda"
    model = build_classifier("efficientnet_b4", 3).eval().to(dev)
    x = torch.randn(10, 3, 380, 380, device=dev)

    def run() -> None:
        with inference_context(dev, half):
            model(x)
        _sync(device)

    run()
    return run


def child_analyze(study: Path, models: Path, device: str, runs: int) -> dict[str, Any]:
    """Load, warm up, analyse ``runs`` times (absolute figures, peak RSS); then build the
    peer and alternate study and peer ``runs`` times (the ratio, robust to a busy machine)."""
    start = time.perf_counter()
    import torch  # noqa: F401  (import cost is reported separately from model load)

    from pipeline.analyze import Analyzer
    from pipeline.config import PipelineSettings

    imported = time.perf_counter() - start
    files = sorted(p for p in study.rglob("*") if p.is_file())
    settings = PipelineSettings(models_dir=models, device=device)  # type: ignore[arg-type]
    start = time.perf_counter()
    analyzer = Analyzer(settings)
    _sync(device)
    load = time.perf_counter() - start
    start = time.perf_counter()
    analyzer.warmup()
    _sync(device)
    warmup = time.perf_counter() - start

    def analyse() -> tuple[float, Any]:
        start = time.perf_counter()
        result = analyzer.analyze_study(files)
        _sync(device)
        return time.perf_counter() - start, result

    times: list[float] = []
    result = None
    for _ in range(runs):
        seconds, result = analyse()
        times.append(seconds)
    assert result is not None
    peak_rss = _peak_rss_bytes()

    peer = _peer(device)
    pairs: list[tuple[float, float]] = []
    for _ in range(runs):
        study_seconds, _ = analyse()
        start = time.perf_counter()
        peer()
        pairs.append((study_seconds, time.perf_counter() - start))

    crops = sum(1 for s in result.series for lv in s.levels if lv.probability is not None)
    found = {s.sequence: [lv.level for lv in s.levels if lv.found] for s in result.series}
    series = {
        s.sequence: {"slices": s.geometry.shape[0], "matrix": list(s.geometry.shape[1:])}
        for s in result.series
    }
    return {
        "import_s": imported,
        "load_s": load,
        "warmup_s": warmup,
        "first_s": times[0],
        "median_s": statistics.median(times[1:] or times),
        "times_s": times,
        "pairs_s": pairs,
        "ratio": statistics.median(study / peer for study, peer in pairs),
        "peer_median_s": statistics.median(peer for _, peer in pairs),
        "stages_s": dict(result.timings),
        "peak_rss_bytes": peak_rss,
        "outcome": result.outcome,
        "reason": result.reason,
        "crops_classified": crops,
        "levels_found": found,
        "series": series,
        "input_size": analyzer.crop_spec("T1").input_size,
        "architecture": analyzer.classifiers["T1"].manifest.architecture,
        "threads": analyzer.threads,
        "half": analyzer.half,
        "device": str(analyzer.device),
        "gpu": torch_cuda_name(device),
    }


def torch_cuda_name(device: str) -> str | None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return None


def _run_child(payload: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`child_analyze` in a fresh interpreter (clean load time and peak RSS)."""
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(payload)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"measurement failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- report -------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, device: str) -> dict[str, Any]:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}")
    start = time.perf_counter()
    patient = bench_patient()
    study = make_study(work, patient)
    print(f"synthetic study ready ({time.perf_counter() - start:.1f} s)")
    if args.models_dir:
        models = Path(args.models_dir).resolve()
        print(f"models: {models}")
    else:
        start = time.perf_counter()
        models = make_models(work, patient, args.seg_steps, args.input_size)
        print(
            f"benchmark models ready ({time.perf_counter() - start:.1f} s): EfficientNet-b4 "
            "classifiers with RANDOM weights (timing only); default segmenter trained "
            f"{args.seg_steps} steps on the benchmark patient"
        )
    return _run_child(
        {"study": str(study), "models": str(models), "device": device, "runs": args.runs},
    )


def report(
    analysis: dict[str, Any],
    *,
    target_study: float,
    target_load: float,
    anchor_peer: float | None,
) -> bool:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    seq = ", ".join(
        f"{name}: {info['slices']} slices of {info['matrix'][0]}x{info['matrix'][1]}"
        for name, info in analysis["series"].items()
    )
    console.print(
        f"device {analysis['device']}"
        + (f" ({analysis['gpu']})" if analysis["gpu"] else f", {analysis['threads']} threads")
        + f"; classifiers {analysis['architecture']} @ {analysis['input_size']} px"
        + (", float16" if analysis["half"] else ", float32")
    )
    console.print(f"study: {seq}; outcome {analysis['outcome']}")
    console.print(
        f"levels found: {analysis['levels_found']}; crops classified: "
        f"{analysis['crops_classified']}"
    )
    ratio = analysis["ratio"]
    table = Table(title="Analysis of one study")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("ok")
    ok = True

    def row(name: str, value: float, target: float | None, unit: str = "s") -> None:
        nonlocal ok
        passed = target is None or value <= target
        ok = ok and passed
        table.add_row(
            name,
            f"{value:.3f} {unit}",
            "" if target is None else f"<= {target:g} {unit}",
            "" if target is None else ("yes" if passed else "NO"),
        )

    absolute = None if anchor_peer is not None else target_study
    row("study wall time, median (excl. model load)", analysis["median_s"], absolute)
    row("study wall time, first call after warm-up", analysis["first_s"], None)
    row("model load", analysis["load_s"], None if anchor_peer is not None else target_load)
    row("warm-up (one forward per network)", analysis["warmup_s"], None)
    row("import torch + pipeline", analysis["import_s"], None)
    row("peak RSS", analysis["peak_rss_bytes"] / 1e9, TARGET_RSS_GB, "GB")
    row("peer: efficientnet_b4 @ 380 px, 10 crops (median)", analysis["peer_median_s"], None)
    table.add_row("ratio study / peer (median of alternating pairs)", f"{ratio:.3f}", "", "")
    if anchor_peer is not None:
        row(
            f"study on the reference machine (ratio x {anchor_peer} s)",
            ratio * anchor_peer,
            target_study,
        )
        load_ratio = analysis["load_s"] / analysis["peer_median_s"]
        row(
            f"model load on the reference machine (load / peer x {anchor_peer} s)",
            load_ratio * anchor_peer,
            target_load,
        )
    console.print(table)
    stages = ", ".join(f"{k} {v:.3f}" for k, v in analysis["stages_s"].items())
    console.print(f"stages of the last run (s): {stages}")
    if analysis["crops_classified"] < 10:
        console.print(
            "[yellow]fewer than 10 vertebral bodies were classified: the classifier share "
            "of the time is under-represented[/]"
        )
        ok = False
    return ok


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=5, help="analyses of the study (>= 2)")
    parser.add_argument("--models-dir", help="use these models instead of building some")
    parser.add_argument("--work", help="folder for the study and models (kept; reused)")
    parser.add_argument("--input-size", type=int, default=256, help="classifier input size")
    parser.add_argument(
        "--seg-steps", type=int, default=SEG_STEPS, help="training steps of the segmenter"
    )
    parser.add_argument("--json", help="also write the measurements to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        payload = json.loads(argv[1])
        out = child_analyze(
            Path(payload["study"]), Path(payload["models"]), payload["device"], payload["runs"]
        )
        print(json.dumps(out))
        return 0
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    analysis = measure(args, "cpu")
    ok = report(
        analysis,
        target_study=TARGET_STUDY_SECONDS,
        target_load=TARGET_LOAD_SECONDS,
        anchor_peer=ANCHOR_PEER_SECONDS,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(analysis, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
