#!/usr/bin/env python3
"""End-to-end benchmark: synthetic studies in by C-STORE, results stored in Orthanc.

For every mode (``embedded``: the node alone, no broker; ``celery-1`` / ``celery-2``: the
node, a redis-server, one or two analysis worker processes and one export worker), started
fresh with the same models:

* **latency**: the studies are sent one after the other by dcmtk ``storescu``
  (``TCP_NODELAY=1``), each after the previous one's results arrived; a study's latency runs
  from the last C-STORE response (``storescu`` has returned) until Orthanc holds all four
  result objects (two SEG, the SR and the key image) in that study, minus
  ``node.study_stable_seconds`` (the quiet period that tells the node the study is complete);
* **throughput**: all studies sent at once, back to back, over separate associations; studies
  per hour from the first C-STORE to the last result in Orthanc.

The peer is the analysis itself: the median per-study analysis time the node or worker
records in its state database is printed beside the latency (latency / analysis shows what
the queueing, the result objects and the export add).

Targets (issue): median latency <= 8 s on a 2-core CPU with demo models, embedded and Celery.

Usage::

    .venv/bin/python bench/e2e.py [--studies 6] [--modes embedded,celery-1,celery-2]
        [--models-dir models] [--stable 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.node_fixtures import TOOL_ENV, free_port, tool  # noqa: E402
from tests.orthanc import OrthancServer  # noqa: E402
from tests.queue_fixtures import OpmriProcess, RedisServer  # noqa: E402

console = Console()
RESULT_OBJECTS = 4


@dataclass
class Study:
    uid: str
    files: list[Path]


@dataclass
class ModeResult:
    mode: str
    latencies: list[float] = field(default_factory=list)
    analysis_seconds: list[float] = field(default_factory=list)
    burst_seconds: float = 0.0
    burst_studies: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def per_hour(self) -> float:
        return 3600.0 * self.burst_studies / self.burst_seconds if self.burst_seconds else 0.0


def make_studies(folder: Path, count: int, seed: int) -> list[Study]:
    from train.phantom import CohortOptions, generate_cohort, read_labels

    options = CohortOptions(n_patients=count, seed=seed, matrix=(512,))
    labels = read_labels(generate_cohort(folder, options, progress=True))
    return [Study(p.study_instance_uid, sorted(p.study_dir.rglob("*.dcm"))) for p in labels]


def node_yaml(port: int, orthanc: OrthancServer, broker: str | None, models: Path,
              stable: float) -> str:
    return f"""
node:
  ae_title: OPMRI
  bind: 127.0.0.1
  port: {port}
  data_dir: data
  study_stable_seconds: {stable}
  min_free_disk_mb: 256
peers:
  modality:
    ae_title: BENCH
    host: 127.0.0.1
    port: 104
    may_send: true
  pacs:
    ae_title: {orthanc.aet}
    host: 127.0.0.1
    port: {orthanc.dicom_port}
    results: true
queue:
  broker: {broker or 'null'}
  requeue_interval: 30
pipeline:
  device: auto
  models_dir: {models}
"""


def send(port: int, study: Study) -> None:
    done = subprocess.run(
        [tool("storescu"), "--required", "-aet", "BENCH", "-aec", "OPMRI", "127.0.0.1",
         str(port), *map(str, study.files)],
        env=TOOL_ENV, capture_output=True, text=True, timeout=300, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-500:]}")


def result_count(orthanc: OrthancServer, study_uid: str) -> int:
    found = orthanc.post("/tools/find", {"Level": "Study", "Query": {
        "StudyInstanceUID": study_uid}}) or []
    if not found:
        return 0
    statistics_ = orthanc.get(f"/studies/{found[0]}/statistics")
    return int(statistics_.get("CountInstances", 0))


def wait_results(orthanc: OrthancServer, study_uid: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result_count(orthanc, study_uid) >= RESULT_OBJECTS:
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError("results did not arrive in Orthanc in time")


def analysis_times(db: Path) -> list[float]:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT finished_at - started_at FROM jobs WHERE state = 'done' ORDER BY id"
        ).fetchall()
    return [float(r[0]) for r in rows]


@contextlib.contextmanager
def running_mode(mode: str, work: Path, orthanc: OrthancServer, models: Path,
                 stable: float) -> Iterator[tuple[int, Path]]:
    folder = work / mode
    folder.mkdir(parents=True)
    port = free_port()
    processes: list[OpmriProcess] = []
    redis: RedisServer | None = None
    try:
        if mode != "embedded":
            redis = RedisServer(folder / "redis")
            redis.start()
        config = folder / "node.yaml"
        config.write_text(node_yaml(port, orthanc, redis.url if redis else None, models,
                                    stable), encoding="utf-8")
        node = OpmriProcess(["serve", "--config", str(config)], folder / "serve.log")
        processes.append(node)
        node.wait_log("ready on ", timeout=120)
        if mode == "embedded":
            node.wait_log("models ready", timeout=300)
        else:
            analysis_workers = int(mode.split("-")[1])
            for index in range(analysis_workers):
                worker = OpmriProcess(
                    ["-v", "worker", "--config", str(config), "--queues", "analysis"],
                    folder / f"analysis-{index}.log",
                )
                processes.append(worker)
            export = OpmriProcess(["worker", "--config", str(config), "--queues", "export"],
                                  folder / "export.log")
            processes.append(export)
            for worker in processes[1:]:
                worker.wait_log("worker ready", timeout=300)
            for worker in processes[1:-1]:
                worker.wait_log("models loaded", timeout=300)
        yield port, folder / "data" / "state.sqlite3"
    finally:
        for process in reversed(processes):
            process.stop()
        if redis is not None:
            redis.stop()


def run_mode(mode: str, work: Path, orthanc: OrthancServer, models: Path, stable: float,
             latency_studies: Sequence[Study], burst_studies: Sequence[Study]) -> ModeResult:
    result = ModeResult(mode)
    with running_mode(mode, work, orthanc, models, stable) as (port, db):
        for study in latency_studies:
            send(port, study)
            sent = time.monotonic()
            arrived = wait_results(orthanc, study.uid, 300)
            result.latencies.append(arrived - sent - stable)
            console.print(f"{mode}: study latency {result.latencies[-1]:.2f} s")
        started = time.monotonic()
        senders = [
            subprocess.Popen(
                [tool("storescu"), "--required", "-aet", "BENCH", "-aec", "OPMRI",
                 "127.0.0.1", str(port), *map(str, study.files)],
                env=TOOL_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for study in burst_studies
        ]
        for sender in senders:
            if sender.wait(300) != 0:
                result.errors.append("a storescu of the burst failed")
        last = max(wait_results(orthanc, study.uid, 600) for study in burst_studies)
        result.burst_seconds = last - started
        result.burst_studies = len(burst_studies)
        console.print(f"{mode}: {len(burst_studies)} studies at once: "
                      f"{result.burst_seconds:.1f} s ({result.per_hour:.0f} studies/hour)")
        result.analysis_seconds = analysis_times(db)
    return result


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6,
                        help="studies for the latency runs (as many again for the burst)")
    parser.add_argument("--modes", default="embedded,celery-1,celery-2")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--stable", type=float, default=2.0,
                        help="node.study_stable_seconds (subtracted from the latency)")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode != "embedded" and not (mode.startswith("celery-") and mode[7:].isdigit()):
            parser.error(f"unknown mode {mode!r} (embedded, celery-N)")
    models = args.models_dir.resolve()
    if not (models / "segmenter").is_dir():
        parser.error(f"no models in {models} (opmri-node models build-demo)")

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    results: list[ModeResult] = []
    try:
        console.print(f"CPUs: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
        studies = make_studies(work / "cohort", 2 * args.studies * len(modes), args.seed)
        orthanc = OrthancServer(work / "orthanc")
        orthanc.start()
        try:
            for index, mode in enumerate(modes):
                chunk = studies[2 * args.studies * index: 2 * args.studies * (index + 1)]
                results.append(run_mode(mode, work, orthanc, models, args.stable,
                                        chunk[: args.studies], chunk[args.studies:]))
        finally:
            orthanc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"End to end: last C-STORE response -> 4 results in Orthanc, minus "
                        f"the {args.stable:g} s stability wait ({args.studies} studies each)")
    for column in ("mode", "median s", "p95 s", "analysis median s", "latency / analysis",
                   "burst studies/hour", "target", "ok"):
        table.add_column(column, justify="right")
    all_ok = True
    for result in results:
        median = statistics.median(result.latencies)
        analysis = statistics.median(result.analysis_seconds) if result.analysis_seconds else 0
        ok = median <= 8.0 and not result.errors
        all_ok &= ok
        table.add_row(
            result.mode, f"{median:.2f}", f"{percentile(result.latencies, 0.95):.2f}",
            f"{analysis:.2f}", f"{median / analysis:.2f}" if analysis else "-",
            f"{result.per_hour:.0f}", "<= 8 s", "yes" if ok else "NO",
        )
    console.print(table)
    console.print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps([
            {"mode": r.mode, "latencies": r.latencies, "analysis_seconds": r.analysis_seconds,
             "burst_seconds": r.burst_seconds, "burst_studies": r.burst_studies,
             "per_hour": r.per_hour, "errors": r.errors} for r in results
        ], indent=2), encoding="utf-8")
    console.print("targets met" if all_ok else "targets NOT met")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
