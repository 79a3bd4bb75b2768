"""``opmri-node serve`` without a broker: a study sent by dcmtk storescu is analysed in the
node's process and its SEG, SR and key image arrive at the result peer (dcmtk storescp)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from tests.conftest import SyntheticCohort, TinyModels
from tests.orthanc import free_port
from tests.pipeline_fixtures import require_tool, tool_env

REPO = Path(__file__).resolve().parent.parent


def wait_listening(port: int, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"process exited early:\n{output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


def test_serve_analyses_in_process_and_sends_results(
    tmp_path: Path, synthetic_cohort: SyntheticCohort, result_models: TinyModels
) -> None:
    node_port, pacs_port = free_port(), free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    config = tmp_path / "node.yaml"
    config.write_text(
        f"""
node:
  ae_title: OPMRI
  bind: 127.0.0.1
  port: {node_port}
  data_dir: data
  study_stable_seconds: 0.5
peers:
  modality:
    ae_title: MODALITY
    host: 127.0.0.1
    port: 104
    may_send: true
  pacs:
    ae_title: PACS
    host: 127.0.0.1
    port: {pacs_port}
    results: true
queue:
  broker: null
pipeline:
  device: cpu
  models_dir: {result_models.models_dir}
  classifier:
    architecture: {result_models.architecture}
""",
        encoding="utf-8",
    )
    pacs = subprocess.Popen(
        [require_tool("storescp"), "--aetitle", "PACS", "--output-directory", str(received),
         "+xa", str(pacs_port)],
        env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )
    node = subprocess.Popen(
        [sys.executable, "-m", "opmri_node", "serve", "--config", str(config)],
        cwd=REPO, env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_listening(pacs_port, pacs)
        wait_listening(node_port, node)
        patient = synthetic_cohort.labels[0]
        sent = subprocess.run(
            [require_tool("storescu"), "--required", "-aet", "MODALITY", "-aec", "OPMRI",
             "127.0.0.1", str(node_port), *map(str, synthetic_cohort.study_files(patient))],
            env=tool_env(), capture_output=True, text=True, timeout=120, check=False,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(list(received.iterdir())) < 4:
            time.sleep(0.2)
        files = sorted(received.iterdir())
        assert len(files) == 4
        modalities = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).Modality)
                            for f in files)
        assert modalities == ["OT", "SEG", "SEG", "SR"]
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.StudyInstanceUID == patient.study_instance_uid
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            output, _ = node.communicate(timeout=60)
        finally:
            pacs.terminate()
            pacs.wait(10)
    assert node.returncode == 0, output
    assert "models ready" in output
    assert patient.study_instance_uid not in output
    assert str(patient.patient_id) not in output
