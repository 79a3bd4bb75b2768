"""``opmri-node demo``: the quick start, end to end on this machine.

It builds the demo models when they are missing, starts the node with its embedded default
configuration (no broker: analysis and export run in the node's process) and a small receiving
PACS on loopback ports, writes one synthetic lumbar spine MRI study, sends it to the node by
C-STORE, waits for the result objects to arrive at the PACS, and shows the result.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from opmri_node.export import ExportResult
    from opmri_node.runner import AnalysisOutcome
    from pipeline.result import StudyResult

RESULT_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture (key image)",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}
MODALITY_AE = "DEMO_MR"
PACS_AE = "DEMO_PACS"
NODE_AE = "OPMRI"


def register(group: click.Group) -> None:
    group.add_command(demo)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoPacs:
    """A minimal receiving PACS (C-ECHO and C-STORE of the result objects) on loopback."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.received: list[tuple[str, Path]] = []
        self._lock = threading.Lock()
        self.port = 0
        self._server: object | None = None

    def start(self) -> int:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(Verification)
        for uid in RESULT_SOP_CLASSES:
            ae.add_supported_context(uid)
        self.port = _free_port()

        def on_store(event: evt.Event) -> int:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            with self._lock:
                path = self.folder / f"{len(self.received) + 1:03d}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                self.received.append((str(dataset.SOPClassUID), path))
            return 0x0000

        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        return self.port

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None


def _node_yaml(node_port: int, pacs_port: int, data_dir: Path, models_dir: Path) -> str:
    return f"""\
node:
  ae_title: {NODE_AE}
  bind: 127.0.0.1
  port: {node_port}
  data_dir: {data_dir}
  study_stable_seconds: 2
peers:
  modality:
    ae_title: {MODALITY_AE}
    host: 127.0.0.1
    port: 104
    may_send: true
    results: false
  pacs:
    ae_title: {PACS_AE}
    host: 127.0.0.1
    port: {pacs_port}
    may_send: false
    results: true
queue:
  broker: null
pipeline:
  device: auto
  models_dir: {models_dir}
"""


def _modality_yaml(node_port: int) -> str:
    return f"""\
node:
  ae_title: {MODALITY_AE}
  bind: 127.0.0.1
  port: 1
peers:
  opmri:
    ae_title: {NODE_AE}
    host: 127.0.0.1
    port: {node_port}
"""


@contextmanager
def _workspace(work: Path | None) -> Iterator[Path]:
    if work is not None:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix="opmri-demo-") as tmp:
        yield Path(tmp)


@click.command()
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Models to use; demo models are built there if missing. [default: models/ in the "
    "repository]",
)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Folder for the demo's node data, study and received results (emptied first).",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Synthetic patient seed.")
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds to wait for the results to reach the PACS.",
)
def demo(models_dir: Path | None, work: Path, seed: int, timeout: float) -> None:
    """Run the node end to end on one synthetic lumbar spine MRI study.

    Builds demo models if missing (about 15 minutes on a 2-core CPU, once), starts the node
    and a small receiving PACS on loopback ports, writes one synthetic study, sends it to the
    node by C-STORE and shows the result once the SEG, SR and key image have reached the PACS.
    Everything it writes stays in --work.
    """
    from opmri_node.commands.analysis import print_result
    from opmri_node.config import parse_config
    from opmri_node.runner import RESULT_JSON_NAME, InProcessRunner
    from opmri_node.scu import find_files, scan_files, send_files
    from opmri_node.service import Node
    from train.demo import build_demo, default_models_dir
    from train.phantom import CohortOptions, generate_cohort

    console = Console()
    models = (models_dir or default_models_dir()).resolve()
    console.rule("[bold]1. demo models")
    built = build_demo(models, console=console)
    console.print(f"models: {models} ({'built' if built.built else 'already there'})")

    with _workspace(work.resolve() if work else None) as root:
        console.rule("[bold]2. node and PACS up")
        pacs = DemoPacs(root / "pacs")
        pacs_port = pacs.start()
        node_port = _free_port()
        node_config = parse_config(
            _node_yaml(node_port, pacs_port, root / "node", models),
            source="<demo>",
            base_dir=root,
        )
        modality_config = parse_config(
            _modality_yaml(node_port), source="<demo modality>", base_dir=root
        )
        watcher = _Watcher()
        runner = InProcessRunner(
            node_config,
            preload=True,
            poll_interval=0.2,
            on_analysis=watcher.on_analysis,
            on_export=watcher.on_export,
        )
        node = Node(node_config, dispatcher=runner)
        try:
            runner.start()
            node.start()
            console.print(
                f"node {NODE_AE} on 127.0.0.1:{node_port}, PACS {PACS_AE} on "
                f"127.0.0.1:{pacs_port}, data in {root}"
            )

            console.rule("[bold]3. a synthetic lumbar MRI study")
            study_root = root / "study"
            options = CohortOptions.model_validate({"n_patients": 1, "seed": seed})
            generate_cohort(study_root, options, progress=False)
            files = find_files(study_root / "studies")
            items, unreadable = scan_files(files)
            if unreadable:
                raise click.ClickException(f"{len(unreadable)} generated file(s) unreadable")
            sent_at = time.monotonic()
            report = send_files(modality_config, "opmri", items)
            if report.failed:
                raise click.ClickException(f"{report.failed} instance(s) were not accepted")
            console.print(
                f"sent {len(items)} instances ({len(report.outcomes)} acknowledged) "
                f"in {report.seconds:.1f} s"
            )

            console.rule("[bold]4. analysis and results")
            deadline = time.monotonic() + timeout
            with console.status("waiting for the study to settle, be analysed and exported"):
                while time.monotonic() < deadline and not watcher.finished(pacs.count()):
                    time.sleep(0.2)
            elapsed = time.monotonic() - sent_at
        finally:
            node.stop()
            runner.stop()
            pacs.stop()

        if watcher.analysis is None:
            raise click.ClickException(
                f"no analysis within {timeout:.0f} s; inspect {root / 'node'} with "
                "`opmri-node status`"
            )
        if watcher.analysis.status == "failed":
            raise click.ClickException(f"the analysis failed: {watcher.analysis.error}")
        result_json = next(iter(sorted((root / "node").rglob(RESULT_JSON_NAME))), None)
        if result_json is not None:
            print_result(_result_for_display(result_json), console)
        elif watcher.analysis.outcome == "not_analysable":
            console.print(f"not analysable: {watcher.analysis.reason}")
        table = Table(title=f"Received by the PACS ({PACS_AE}) {elapsed:.1f} s after sending")
        table.add_column("#")
        table.add_column("object")
        table.add_column("file")
        for index, (sop_class, path) in enumerate(pacs.received, 1):
            table.add_row(str(index), RESULT_SOP_CLASSES.get(sop_class, sop_class), str(path))
        console.print(table)
        console.print(f"result JSON: {result_json}")
        console.print(f"key image, SEG and SR as the PACS received them: {root / 'pacs'}")
        for sop_class, path in pacs.received:
            if RESULT_SOP_CLASSES.get(sop_class, "").startswith("Secondary Capture"):
                png = _key_image_png(path, root / "key-image.png")
                console.print(f"key image as PNG (what every PACS viewer shows): {png}")
        if not pacs.received:
            raise click.ClickException("the PACS received no result objects")


class _Watcher:
    """Collects what the in-process runner reports, to know when the demo is complete."""

    def __init__(self) -> None:
        self.analysis: AnalysisOutcome | None = None
        self.exports: list[ExportResult] = []

    def on_analysis(self, outcome: AnalysisOutcome) -> None:
        self.analysis = outcome

    def on_export(self, result: ExportResult) -> None:
        self.exports.append(result)

    def finished(self, received: int) -> bool:
        if self.analysis is None:
            return False
        if self.analysis.status == "failed" or self.analysis.objects == 0:
            return True
        if any(export.status == "failed" for export in self.exports):
            return True
        return received >= self.analysis.objects


def _key_image_png(dicom_path: Path, png_path: Path) -> Path:
    """Save the received key image's pixels as a PNG for a look without a DICOM viewer."""
    import pydicom
    from PIL import Image

    Image.fromarray(pydicom.dcmread(dicom_path).pixel_array).save(png_path)
    return png_path


def _result_for_display(path: Path) -> StudyResult:
    """Read a result.json written without label maps (the table does not need them)."""
    import json

    import numpy as np

    from pipeline.result import StudyResult, encode_labelmap

    data = json.loads(path.read_text(encoding="utf-8"))
    for series in data.get("series", []):
        if series.get("labelmap") is None:
            shape = tuple(int(n) for n in series["geometry"]["shape"])
            series["labelmap"] = encode_labelmap(np.zeros(shape, dtype=np.uint8))
    return StudyResult.from_dict(data)
