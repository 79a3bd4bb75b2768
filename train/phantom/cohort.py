"""Write a synthetic cohort to a folder (:func:`generate_cohort`).

Layout of ``OUT``::

    labels.csv                       one row per patient (see train.phantom.labels)
    cohort.json                      generator, version, seed and options
    calibration.json                 VBQ and oracle AUC (see train.phantom.calibration)
    calibration_roc.png              their ROC curves
    studies/<patient_id>/S<nnnn>/I<nnnn>.dcm   one folder per patient, one per series
    masks/<patient_id>/<t1|t2|stir>.nii.gz     label maps on each sagittal series' grid
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.phantom.calibration import (
    CalibrationRecord,
    build_report,
    record_from_truth,
    vbq,
    write_report,
)
from train.phantom.dicomio import write_patient
from train.phantom.labels import label_row, write_labels
from train.phantom.latent import prevalence_offset
from train.phantom.options import PHANTOM_VERSION, CohortOptions
from train.phantom.simulate import simulate_patient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _PatientResult:
    index: int
    row: dict[str, str]
    record: CalibrationRecord
    n_files: int


def _generate_one(root: str, options: CohortOptions, index: int) -> _PatientResult:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        patient = simulate_patient(options.seed, index, options)
        written = write_patient(patient, Path(root), options.transfer_syntax_uid)
        value = None
        if "t1" in patient.sagittal:
            t1 = patient.sagittal["t1"]
            assert t1.labelmap is not None and t1.geometry is not None
            value = vbq(t1.pixels, t1.labelmap, t1.geometry)
        record = record_from_truth(
            patient.patient_id, patient.truth, patient.study.field_strength, value
        )
        return _PatientResult(index, label_row(patient, written), record, written.n_files)


def cohort_metadata(options: CohortOptions) -> dict[str, Any]:
    """Contents of ``cohort.json``."""
    from opmri_node import __version__

    return {
        "generator": "opmri-node synthetic lumbar MRI cohort",
        "package_version": __version__,
        "phantom_version": PHANTOM_VERSION,
        "seed": options.seed,
        "n_patients": options.n_patients,
        "transfer_syntax": options.transfer_syntax,
        "transfer_syntax_uid": str(options.transfer_syntax_uid),
        "latent_t_offset": prevalence_offset(options.prevalence, options.female_fraction),
        "options": options.model_dump(mode="json"),
    }


def generate_cohort(
    out_dir: Path,
    options: CohortOptions,
    progress: bool = False,
    *,
    workers: int | None = None,
    on_patient: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the cohort ``options`` into ``out_dir``; returns the path of ``labels.csv``.

    Patients are simulated and written by a pool of ``workers`` processes (default: two, or
    one on a single-CPU machine). ``progress`` shows a progress bar with ETA;
    ``on_patient(done, total)`` is called after each patient. Existing files of the same
    names are replaced; the result is byte-identical for the same options.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = max(1, min(2, os.cpu_count() or 1))
    if workers < 1:
        raise ValueError(f'Argument "workers" must be at least 1, got {workers}')
    (out_dir / "cohort.json").write_text(
        json.dumps(cohort_metadata(options), indent=2) + "\n", encoding="utf-8"
    )
    total = options.n_patients
    results: list[_PatientResult] = []

    bar: Any = None
    task: Any = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[bold]synthetic cohort"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("patients"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )

    def done(result: _PatientResult) -> None:
        results.append(result)
        if bar is not None:
            bar.update(task, advance=1)
        if on_patient is not None:
            on_patient(len(results), total)

    root = str(out_dir)
    if workers == 1:
        if bar is not None:
            bar.start()
            task = bar.add_task("patients", total=total)
        try:
            for index in range(total):
                done(_generate_one(root, options, index))
        finally:
            if bar is not None:
                bar.stop()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: set[Future[_PatientResult]] = set()
            next_index = 0
            # Keep a few patients in flight per worker: bounded memory, no idle workers.
            while next_index < min(total, 2 * workers):
                pending.add(pool.submit(_generate_one, root, options, next_index))
                next_index += 1
            if bar is not None:
                bar.start()
                task = bar.add_task("patients", total=total)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        done(future.result())
                        if next_index < total:
                            pending.add(pool.submit(_generate_one, root, options, next_index))
                            next_index += 1
            finally:
                if bar is not None:
                    bar.stop()

    results.sort(key=lambda r: r.index)
    labels_path = out_dir / "labels.csv"
    write_labels([r.row for r in results], labels_path)
    records = [r.record for r in results]
    report = build_report(records, options.model_dump(mode="json"))
    write_report(report, out_dir, records)
    log.info("synthetic cohort: %d patients, %d files", total, sum(r.n_files for r in results))
    return labels_path
