"""The durable outbox and the C-STORE export: real associations on loopback (a pynetdicom
Storage SCP and dcmtk's storescp), real files, the state database on disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from opmri_node.config import NodeConfig, RetryPolicy, parse_config
from opmri_node.dicomnet import enable_nodelay
from opmri_node.export import export_entry, open_outbox, result_peers, results_root
from opmri_node.outbox import NewResultFile, Outbox, retry_delay
from opmri_node.runner import store_results
from pipeline.dicom_out import build_result_objects, write_result_files
from tests.dicom_out_fixtures import PhantomStudy, make_phantom_study
from tests.orthanc import free_port
from tests.pipeline_fixtures import require_tool, tool_env

REPO = Path(__file__).resolve().parent.parent


@dataclass
class StorageSCP:
    """A pynetdicom Storage SCP that records what it receives."""

    port: int
    received: list[Dataset] = field(default_factory=list)
    associations: int = 0
    fail_sop_classes: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def scp() -> Iterator[StorageSCP]:
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    state = StorageSCP(port=0)

    def on_open(event: evt.Event) -> None:
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            enable_nodelay(sock.socket)

    def on_accepted(event: evt.Event) -> None:
        with state.lock:
            state.associations += 1

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with state.lock:
            if str(ds.SOPClassUID) in state.fail_sop_classes:
                return 0xA700
            state.received.append(ds)
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACCEPTED, on_accepted),
                      (evt.EVT_C_STORE, on_store)],
    )
    state.port = int(server.server_address[1])
    try:
        yield state
    finally:
        server.shutdown()


def node_config(folder: Path, pacs_port: int, *, attempts: int = 3,
                initial: float = 0.2, maximum: float = 0.8) -> NodeConfig:
    text = f"""
node:
  ae_title: OPMRI
  bind: 127.0.0.1
  port: 0
  data_dir: data
peers:
  pacs:
    ae_title: PACS
    host: 127.0.0.1
    port: {pacs_port}
    results: true
  modality:
    ae_title: MODALITY
    host: 127.0.0.1
    port: 104
    may_send: true
export:
  retry:
    initial_delay_s: {initial}
    factor: 2
    max_delay_s: {maximum}
    max_attempts: {attempts}
pipeline:
  device: cpu
"""
    path = folder / "node.yaml"
    path.write_text(text, encoding="utf-8")
    return parse_config(text, source=str(path), base_dir=folder)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return make_phantom_study(tmp_path_factory.mktemp("phantom"))


def queue_results(config: NodeConfig, phantom: PhantomStudy) -> tuple[Outbox, int]:
    outbox = open_outbox(config)
    _, ids, count = store_results(config, outbox, phantom.result, job_id=None)
    assert count == 4 and len(ids) == 1
    return outbox, ids[0]


def test_retry_delay_doubles_from_30_s_to_10_min() -> None:
    policy = RetryPolicy()
    delays = [retry_delay(policy, attempt) for attempt in range(1, 9)]
    assert delays == [30, 60, 120, 240, 480, 600, 600, 600]
    assert retry_delay(policy, 10_000) == 600


def test_results_are_recorded_before_sending_and_survive_a_restart(
    tmp_path: Path, phantom: PhantomStudy
) -> None:
    config = node_config(tmp_path, free_port())
    outbox, outbox_id = queue_results(config, phantom)
    claimed = outbox.claim(outbox_id, "in-process")
    assert claimed is not None and claimed.state == "sending" and claimed.attempts == 1
    outbox.close()  # the process dies while sending

    with open_outbox(config) as reopened:
        entry = reopened.entry(outbox_id)
        assert entry is not None and entry.state == "sending"
        assert reopened.recover("in-process") == [outbox_id]
        entry = reopened.entry(outbox_id)
        assert entry is not None
        assert (entry.state, entry.attempts, entry.files) == ("pending", 0, 4)
        assert reopened.due() == [outbox_id]
        for file in reopened.files(entry.result_set_id):
            path = reopened.path(file)
            assert path.is_file() and path.is_relative_to(results_root(config))
            assert pydicom.dcmread(path).SOPInstanceUID == file.sop_instance_uid


def test_a_newer_result_supersedes_a_waiting_one(tmp_path: Path, phantom: PhantomStudy) -> None:
    config = node_config(tmp_path, free_port())
    outbox, first = queue_results(config, phantom)
    _, [second], _ = store_results(config, outbox, phantom.result)
    old, new = outbox.entry(first), outbox.entry(second)
    assert old is not None and new is not None
    assert (old.state, new.state) == ("superseded", "pending")
    assert outbox.due() == [second]
    assert not outbox.reschedule(first)
    outbox.close()


def test_result_set_goes_to_the_peer_over_one_association(
    tmp_path: Path, phantom: PhantomStudy, scp: StorageSCP
) -> None:
    config = node_config(tmp_path, scp.port)
    assert result_peers(config) == ["pacs"]
    outbox, outbox_id = queue_results(config, phantom)
    result = export_entry(config, outbox, outbox_id)
    assert result.status == "done" and result.sent == 4
    assert scp.associations == 1
    entry = outbox.entry(outbox_id)
    assert entry is not None and (entry.state, entry.stored, entry.files) == ("done", 4, 4)
    sent = {f.sop_instance_uid for f in outbox.files(entry.result_set_id)}
    assert {str(ds.SOPInstanceUID) for ds in scp.received} == sent
    assert {str(ds.StudyInstanceUID) for ds in scp.received} == {phantom.study_uid}
    # done is done: a second call does not send again
    assert export_entry(config, outbox, outbox_id, force=True).status == "skipped"
    assert scp.associations == 1
    outbox.close()


def test_peer_down_backs_off_then_fails_for_good(tmp_path: Path, phantom: PhantomStudy) -> None:
    config = node_config(tmp_path, free_port(), attempts=3, initial=0.3, maximum=0.5)
    outbox, outbox_id = queue_results(config, phantom)
    first = export_entry(config, outbox, outbox_id)
    assert first.status == "retry"
    assert first.next_attempt_at is not None
    assert first.next_attempt_at - time.time() == pytest.approx(0.3, abs=0.2)
    assert "4 of 4 file(s) not stored" in first.error
    assert phantom.study_uid not in first.error
    assert export_entry(config, outbox, outbox_id).status == "skipped"  # not due yet
    time.sleep(0.35)
    second = export_entry(config, outbox, outbox_id)
    assert second.status == "retry"
    assert second.next_attempt_at is not None
    assert second.next_attempt_at - time.time() == pytest.approx(0.5, abs=0.2)  # 0.6 capped
    time.sleep(0.55)
    third = export_entry(config, outbox, outbox_id)
    assert third.status == "failed"
    entry = outbox.entry(outbox_id)
    assert entry is not None and (entry.state, entry.attempts) == ("failed", 3)
    assert entry.error and "association" in entry.error
    assert outbox.due() == []
    outbox.close()


def test_a_retry_sends_only_what_the_peer_refused(
    tmp_path: Path, phantom: PhantomStudy, scp: StorageSCP
) -> None:
    config = node_config(tmp_path, scp.port, initial=0.1)
    outbox, outbox_id = queue_results(config, phantom)
    scp.fail_sop_classes = {"1.2.840.10008.5.1.4.1.1.88.34"}  # the SR
    first = export_entry(config, outbox, outbox_id)
    assert (first.status, first.sent, first.failed) == ("retry", 3, 1)
    assert "status 0xA700" in first.error
    entry = outbox.entry(outbox_id)
    assert entry is not None and entry.stored == 3
    scp.fail_sop_classes = set()
    time.sleep(0.15)
    second = export_entry(config, outbox, outbox_id)
    assert (second.status, second.sent) == ("done", 1)
    assert [str(ds.Modality) for ds in scp.received].count("SR") == 1
    assert len(scp.received) == 4 and scp.associations == 2
    outbox.close()


def test_a_peer_removed_from_the_config_fails_the_row(
    tmp_path: Path, phantom: PhantomStudy, scp: StorageSCP
) -> None:
    config = node_config(tmp_path, scp.port)
    outbox, outbox_id = queue_results(config, phantom)
    changed = config.model_copy(update={"peers": {}})
    result = export_entry(changed, outbox, outbox_id)
    assert result.status == "failed"
    assert "no longer configured" in result.error
    assert scp.associations == 0
    outbox.close()


def test_files_outside_the_results_folder_are_refused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "state.sqlite3", tmp_path / "results") as outbox:
        with pytest.raises(ValueError, match="inside the results root"):
            outside = NewResultFile(tmp_path / "x.dcm", "1.2", "1.2.3.4", "1.2.840.10008.1.2.1")
            outbox.record_result_set("1.2.3", [outside], ["pacs"])
        with pytest.raises(ValueError, match="must not be empty"):
            outbox.record_result_set("1.2.3", [], ["pacs"])


def _cli(config: NodeConfig, *args: str) -> subprocess.CompletedProcess[str]:
    config_path = config.node.data_dir.parent / "node.yaml"
    return subprocess.run(
        [sys.executable, "-m", "opmri_node", *args, "--config", str(config_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "COLUMNS": "200"}, check=False,
    )


def test_cli_lists_and_retries_failed_results(
    tmp_path: Path, phantom: PhantomStudy, scp: StorageSCP
) -> None:
    down = free_port()
    config = node_config(tmp_path, down, attempts=1)
    outbox, outbox_id = queue_results(config, phantom)
    assert export_entry(config, outbox, outbox_id).status == "failed"
    outbox.close()

    listed = _cli(config, "outbox", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert document["counts"]["failed"] == 1
    [row] = document["entries"]
    assert (row["id"], row["peer"], row["state"], row["files"]) == (outbox_id, "pacs", "failed", 4)
    assert phantom.study_uid not in listed.stdout

    table = _cli(config, "outbox", "list")
    assert table.returncode == 0 and "failed" in table.stdout and "pacs" in table.stdout

    # the PACS is back (at its configured address): retry delivers
    text = (tmp_path / "node.yaml").read_text().replace(f"port: {down}", f"port: {scp.port}")
    (tmp_path / "node.yaml").write_text(text)
    retried = _cli(config, "outbox", "retry", "--failed")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "done" in retried.stdout
    assert len(scp.received) == 4
    again = _cli(config, "outbox", "retry", str(outbox_id))
    assert again.returncode == 1 and "is done" in again.stderr
    missing = _cli(config, "outbox", "retry")
    assert missing.returncode != 0 and "give outbox ids or --failed" in missing.stderr


def _wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def test_dcmtk_storescp_receives_every_result_object(
    tmp_path: Path, phantom: PhantomStudy
) -> None:
    port = free_port()
    received = tmp_path / "storescp"
    received.mkdir()
    process = subprocess.Popen(
        [require_tool("storescp"), "--aetitle", "PACS", "--output-directory", str(received),
         "+xa", str(port)],
        env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        _wait_listening(port)
        config = node_config(tmp_path, port)
        outbox, outbox_id = queue_results(config, phantom)
        result = export_entry(config, outbox, outbox_id)
        assert result.status == "done", result.error
        outbox.close()
    finally:
        process.terminate()
        process.wait(10)
    files = sorted(received.iterdir())
    assert len(files) == 4
    modalities = sorted(str(pydicom.dcmread(path).Modality) for path in files)
    assert modalities == ["OT", "SEG", "SEG", "SR"]


def test_written_files_match_what_was_built(tmp_path: Path, phantom: PhantomStudy) -> None:
    objects = build_result_objects(phantom.result)
    paths = write_result_files(objects, tmp_path)
    for (name, dataset), path in zip(objects.named, paths, strict=True):
        assert path.name == name
        assert pydicom.dcmread(path).SOPInstanceUID == dataset.SOPInstanceUID
    assert not list(tmp_path.glob(".tmp-*"))
