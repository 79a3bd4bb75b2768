#!/usr/bin/env python3
"""Results benchmark: from "study ready" to every result object stored in a real Orthanc.

A synthetic lumbar study (``opmri-node synth``, or ``--study DIR``) is uploaded to Orthanc
(Debian package, loopback, ``TCP_NODELAY=1``), and Orthanc sends it to a running node
(``POST /modalities/{id}/store``). The node records the study as ready once it has been quiet
for ``study_stable_seconds``; from that moment (the job's ``created_at`` in the state database)
to the C-STORE success of the last result object from Orthanc (the outbox row's ``sent_at``)
is the measured figure. Between runs the node starts on a fresh data folder and the result
series are deleted from Orthanc, so every run analyses, writes and sends everything again;
the models are loaded and warmed up once, as in a running node.

Printed per run and as medians: the figure, its parts (queue wait, analysis incl. writing the
SEG/SR/key image, export), the ratio to the 10 s target, and the node's export time against
dcmtk ``storescu`` sending the same result files to the same Orthanc in the same run.

Usage: ``.venv/bin/python bench/bench_results.py [--models-dir models] [--runs 3]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from opmri_node.config import NodeConfig, parse_config  # noqa: E402
from opmri_node.export import ExportResult, open_outbox  # noqa: E402
from opmri_node.runner import AnalysisOutcome, InProcessRunner  # noqa: E402
from opmri_node.service import Node  # noqa: E402
from opmri_node.state import StateDB  # noqa: E402
from pipeline.analyze import Analyzer  # noqa: E402
from pipeline.config import PipelineSettings  # noqa: E402
from pipeline.registry import CLASSIFIER_T1, ModelRegistryError, read_manifest  # noqa: E402
from tests.orthanc import ORTHANC_ENV, OrthancServer  # noqa: E402

TARGET_S = 10.0
console = Console()


@dataclass
class Run:
    ready_to_stored: float
    queue_wait: float
    analysis: float
    writing: float
    export: float
    objects: int


def find_study(folder: Path) -> tuple[str, list[Path]]:
    """The first study (by Study Instance UID) among the DICOM files below ``folder``."""
    studies: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:
            continue
        uid = str(ds.get("StudyInstanceUID", ""))
        if uid:
            studies.setdefault(uid, []).append(path)
    if not studies:
        raise SystemExit(f"no DICOM study found below {folder}")
    uid = next(iter(studies))
    return uid, studies[uid]


def synth_study(work: Path) -> Path:
    out = work / "synth"
    command = [sys.executable, "-m", "opmri_node", "synth", "--out", str(out),
               "--patients", "1", "--seed", "11"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(
            "could not make a synthetic study with `opmri-node synth` "
            f"(exit {done.returncode}): {done.stderr.strip()[-500:]}\n"
            "give a study folder with --study DIR instead"
        )
    return out


def node_config(
    folder: Path, orthanc: OrthancServer, models_dir: Path, architecture: str
) -> NodeConfig:
    text = f"""
node:
  ae_title: OPMRI
  bind: 127.0.0.1
  port: 0
  data_dir: data
  study_stable_seconds: 0.5
peers:
  pacs:
    ae_title: {orthanc.aet}
    host: 127.0.0.1
    port: {orthanc.dicom_port}
    may_send: true
    results: true
export:
  retry:
    initial_delay_s: 1
    max_delay_s: 5
    max_attempts: 5
pipeline:
  device: cpu
  models_dir: {models_dir}
  classifier:
    architecture: {architecture}
"""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node.yaml").write_text(text, encoding="utf-8")
    return parse_config(text, source=str(folder / "node.yaml"), base_dir=folder)


def delete_results(orthanc: OrthancServer, study_id: str) -> None:
    for series_id in orthanc.get(f"/studies/{study_id}")["Series"]:
        series = orthanc.get(f"/series/{series_id}")
        if series["MainDicomTags"].get("Modality") != "MR":
            orthanc.request("DELETE", f"/series/{series_id}")


def one_run(
    work: Path, orthanc: OrthancServer, study_id: str, analyzer: Analyzer
) -> Run | str:
    settings = analyzer.settings
    config = node_config(
        work, orthanc, settings.models_dir, settings.classifier.architecture
    )
    analyses: list[AnalysisOutcome] = []
    exports: list[ExportResult] = []
    finished = threading.Event()

    def on_export(result: ExportResult) -> None:
        exports.append(result)
        if result.status in ("done", "failed"):
            finished.set()

    def on_analysis(outcome: AnalysisOutcome) -> None:
        analyses.append(outcome)
        if not outcome.outbox_ids:
            finished.set()

    runner = InProcessRunner(config, analyzer=analyzer, poll_interval=0.2,
                             on_analysis=on_analysis, on_export=on_export)
    runner.start()
    node = Node(config, dispatcher=runner)
    _, port = node.start()
    try:
        orthanc.request("PUT", "/modalities/opmri",
                        {"AET": "OPMRI", "Host": "127.0.0.1", "Port": port})
        orthanc.send_to_modality("opmri", [study_id])
        if not finished.wait(300):
            return "no result within 300 s"
    finally:
        node.stop()
        runner.stop()
    if not analyses or analyses[0].outcome != "analysed":
        reason = analyses[0].reason or analyses[0].error if analyses else "no analysis"
        return f"study not analysed: {reason}"
    done = [e for e in exports if e.status == "done"]
    if not done:
        return f"results not delivered: {exports[-1].error if exports else 'no export'}"
    with StateDB(config.node.data_dir / "state.sqlite3") as state, open_outbox(config) as outbox:
        job = state.job(analyses[0].job_id)
        entry = outbox.entry(done[-1].outbox_id)
        assert job is not None and entry is not None and entry.sent_at is not None
        assert job.started_at is not None
        return Run(
            ready_to_stored=entry.sent_at - job.created_at,
            queue_wait=job.started_at - job.created_at,
            analysis=analyses[0].seconds - analyses[0].write_seconds,
            writing=analyses[0].write_seconds,
            export=sum(e.seconds for e in exports),
            objects=analyses[0].objects,
        )


def storescu_seconds(orthanc: OrthancServer, files: list[Path]) -> float:
    storescu = shutil.which("storescu")
    if storescu is None:
        raise SystemExit("dcmtk storescu is required (Debian package dcmtk)")
    started = time.perf_counter()
    subprocess.run(
        [storescu, "--required", "-aec", orthanc.aet, "-aet", "OPMRI", "127.0.0.1",
         str(orthanc.dicom_port),
         *map(str, files)],
        env=ORTHANC_ENV, check=True, capture_output=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--study", type=Path, default=None, help="a folder with one study")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    models_dir = args.models_dir.resolve()
    try:
        architecture = read_manifest(models_dir, CLASSIFIER_T1).architecture
        settings = PipelineSettings(device="cpu", models_dir=models_dir)
        settings = settings.model_copy(update={
            "classifier": settings.classifier.model_copy(update={"architecture": architecture})
        })
        analyzer = Analyzer(settings)
    except ModelRegistryError as exc:
        raise SystemExit(f"no usable models in {args.models_dir}: {exc}") from None
    analyzer.warmup()
    console.print(f"models in {args.models_dir}:")
    for model in analyzer.models:
        kind = "synthetic demo" if model.synthetic else "trained"
        console.print(f"  {model.name} {model.version} ({model.architecture}, "
                      f"{model.input_size} px, {kind})")

    work = Path(tempfile.mkdtemp(prefix="bench-results-"))
    orthanc = OrthancServer(work / "orthanc")
    try:
        source = args.study or synth_study(work)
        study_uid, files = find_study(source)
        console.print(f"study: {len(files)} instances")
        orthanc.start()
        for path in files:
            orthanc.upload(path)
        study_id = orthanc.study_id(study_uid)
        assert study_id is not None
        runs: list[Run] = []
        peers: list[float] = []
        exported: list[Path] = []
        for index in range(args.runs):
            delete_results(orthanc, study_id)
            outcome = one_run(work / f"node-{index}", orthanc, study_id, analyzer)
            if isinstance(outcome, str):
                raise SystemExit(f"run {index + 1}: {outcome}")
            runs.append(outcome)
            exported = sorted((work / f"node-{index}" / "data" / "results").rglob("*.dcm"))
            delete_results(orthanc, study_id)
            peers.append(storescu_seconds(orthanc, exported))
            console.print(
                f"run {index + 1}: ready -> stored {outcome.ready_to_stored:.2f} s "
                f"(analysis {outcome.analysis:.2f} s, objects {outcome.writing:.2f} s, "
                f"export {outcome.export:.2f} s, "
                f"storescu {peers[-1]:.2f} s)"
            )
    finally:
        orthanc.stop()
        if args.keep:
            console.print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    def median(values: list[float]) -> float:
        return statistics.median(values)

    table = Table(title=f"Study ready -> {runs[0].objects} result objects stored in Orthanc "
                        f"(median of {len(runs)} runs)")
    table.add_column("measure")
    table.add_column("seconds", justify="right")
    table.add_column("ratio", justify="right")
    figure = median([r.ready_to_stored for r in runs])
    export = median([r.export for r in runs])
    peer = median(peers)
    table.add_row("ready -> all results stored", f"{figure:.2f}",
                  f"{figure / TARGET_S:.2f} of the 10 s target")
    table.add_row("  queue wait", f"{median([r.queue_wait for r in runs]):.2f}", "")
    table.add_row("  analysis (read, segment, classify, VBQ)",
                  f"{median([r.analysis for r in runs]):.2f}", "")
    table.add_row("  SEG + SR + key image: build, write, record",
                  f"{median([r.writing for r in runs]):.2f}", "")
    table.add_row("  export (C-STORE, one association)", f"{export:.2f}",
                  f"{export / peer:.2f} x storescu")
    table.add_row("storescu, same files, same Orthanc", f"{peer:.2f}", "1.00")
    console.print(table)
    verdict = "meets" if figure <= TARGET_S else "misses"
    console.print(f"{verdict} the target: {figure:.2f} s <= {TARGET_S:.0f} s"
                  if figure <= TARGET_S else f"{verdict} the target: {figure:.2f} s > 10 s")


if __name__ == "__main__":
    main()
