"""Benchmark: how fast the synthetic cohort is written, against a 60 s target and a peer.

Writes ``--patients`` patients (all five series, default options) with ``--workers`` processes
and prints wall time, patients per second and the ratio to the target (100 patients in 60 s on
a 2-core machine). As a peer measured in the same run it times pydicom merely writing the same
number of files of the same size (datasets prepared in advance, same number of processes): the
floor that any generator writing these files with pydicom has to pay. Optionally also times
the in-memory path training uses (``simulate_patient`` for sagittal T1 and T2 only).

    .venv/bin/python bench/bench_synth.py [--patients 100] [--workers 2] [--in-memory 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.phantom import CohortOptions, generate_cohort, simulate_patient
from train.phantom.dicomio import encode, image_datasets

TARGET_SECONDS_PER_100 = 60.0


def _write_only(job: tuple[str, int, int]) -> int:
    """Write ``count`` copies of one patient's prepared datasets (the pydicom write floor)."""
    folder, seed, count = job
    options = CohortOptions(seed=seed)
    patient = simulate_patient(seed, 0, options)
    prepared = []
    for series in patient.series:
        for k, ds in enumerate(image_datasets(patient, series)):
            encode(ds, series.pixels[k], options.transfer_syntax_uid)
            prepared.append(ds)
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for n in range(count):
        prepared[n % len(prepared)].save_as(target / f"F{n:06d}.dcm", enforce_file_format=True)
    return int((time.perf_counter() - start) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-memory", type=int, default=0, metavar="N",
                        help="also time simulate_patient (T1+T2) for N patients")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="keep the cohort here")
    args = parser.parse_args()

    print(f"CPUs: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    out = args.out or scratch / "cohort"
    try:
        options = CohortOptions(n_patients=args.patients, seed=args.seed)
        start = time.perf_counter()
        cpu_start = os.times()
        generate_cohort(out, options, workers=args.workers)
        wall = time.perf_counter() - start
        cpu = os.times()
        used = (cpu.children_user + cpu.children_system + cpu.user + cpu.system) - (
            cpu_start.children_user + cpu_start.children_system + cpu_start.user
            + cpu_start.system
        )  # fmt: skip
        files = sum(1 for _ in (out / "studies").rglob("*.dcm"))
        size = sum(f.stat().st_size for f in (out / "studies").rglob("*.dcm"))
        target = TARGET_SECONDS_PER_100 * args.patients / 100.0
        print(f"synth: {args.patients} patients, {files} files, {size / 1e6:.0f} MB, "
              f"{args.workers} workers")  # fmt: skip
        print(f"synth: wall {wall:.1f} s, {args.patients / wall:.2f} patients/s, "
              f"CPU {used:.1f} s ({used / args.patients:.2f} s per patient)")  # fmt: skip
        print(f"synth: wall / target ({target:.0f} s) = {wall / target:.2f} "
              f"({'meets' if wall <= target else 'misses'} the target)")  # fmt: skip
        # On a shared machine the wall time also measures the other load; the CPU time does
        # not. CPU / workers is the wall time the same work takes on idle cores.
        idle = used / args.workers
        print(f"synth: CPU / {args.workers} workers = {idle:.1f} s; / target = {idle / target:.2f}")

        # Peer: pydicom writing the same number of files, same processes.
        share, extra = divmod(files, args.workers)
        per_worker = [share + (i < extra) for i in range(args.workers)]
        jobs = [(str(scratch / f"peer{i}"), args.seed, n) for i, n in enumerate(per_worker)]
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            peer = max(pool.map(_write_only, jobs)) / 1e6
        print(f"peer (pydicom save_as of {files} prepared files): wall {peer:.1f} s; "
              f"synth / peer = {wall / peer:.1f}")  # fmt: skip

        if args.in_memory:
            t2 = CohortOptions(seed=args.seed, series=("t1", "t2"))
            start = time.perf_counter()
            for index in range(args.in_memory):
                simulate_patient(args.seed, index, t2)
            elapsed = time.perf_counter() - start
            print(f"in memory (T1 + T2, one process): {args.in_memory / elapsed:.2f} patients/s")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
