"""The node as a process: kill -9 in the middle of an association, storage errors, SIGTERM."""

from __future__ import annotations

import resource
import signal
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import _config as pynetdicom_config

from opmri_node.journal import decode_record
from opmri_node.service import CLEAN_MARKER_NAME
from opmri_node.spool import PREAMBLE_SIZE
from opmri_node.state import StateDB
from tests.node_fixtures import (
    ServeProcess,
    data_set_of,
    make_mr_series,
    scu_ae,
    write_config,
)


def _store_all(port: int, files: list[Path], on_ack: object = None) -> list[int]:
    """C-STORE files over one association; returns the statuses received (stops at none)."""
    ae = scu_ae()
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.dimse_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="OPMRI")
    assert assoc.is_established
    statuses: list[int] = []
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for path in files:
            if not assoc.is_established:
                break
            try:
                status = assoc.send_c_store(path)
            except (OSError, RuntimeError):
                break
            if not status or "Status" not in status:
                break
            statuses.append(int(status.Status))
            if on_ack is not None:
                on_ack(len(statuses))  # type: ignore[operator]
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()
    return statuses


@pytest.mark.parametrize("processes", [1, 2], ids=["in-process", "receiving-processes"])
def test_kill_9_mid_association_then_restart_loses_nothing_acknowledged(
    tmp_path: Path, processes: int
) -> None:
    config = write_config(tmp_path / "node", stable=1.5,
                          node_extra=f"  receive_processes: {processes}\n")
    series = make_mr_series(tmp_path / "in", 80, size=512)
    serve = ServeProcess(config, log_path=tmp_path / "serve.log")
    killed = threading.Event()

    def kill_after_acks(count: int) -> None:
        if count == 25 and not killed.is_set():
            # let the next instance get under way, then kill without warning
            threading.Timer(0.002, lambda: (serve.kill(), killed.set())).start()

    statuses = _store_all(serve.port, series.files, on_ack=kill_after_acks)
    killed.wait(10)
    assert killed.is_set() and serve.proc.returncode == -signal.SIGKILL
    assert 25 <= len(statuses) < 80 and all(s == 0 for s in statuses)
    acknowledged = series.sop_uids[: len(statuses)]

    restarted = ServeProcess(config, log_path=tmp_path / "serve.log")
    try:
        data_dir = tmp_path / "node" / "data"
        with StateDB(data_dir / "state.sqlite3") as state:
            for path, sop in zip(series.files, acknowledged, strict=False):
                record = state.current_instance(sop)
                assert record is not None, "an acknowledged instance is missing"
                stored = data_dir / "spool" / record.path
                assert data_set_of(stored) == data_set_of(path)
            assert list((data_dir / "spool" / "incoming").iterdir()) == []
            assert state.instance_count() <= len(acknowledged) + 1
            # the study's stability timer resumed: it gets its job after the restart
            deadline = time.monotonic() + 10
            while not state.jobs():
                assert time.monotonic() < deadline, "no job after restart"
                time.sleep(0.1)
            (job,) = state.jobs()
            assert job.state == "pending" and job.study_uid == series.study_uid
        # the rest of the study can be sent again; what arrived before is not duplicated
        statuses = _store_all(restarted.port, series.files)
        assert statuses == [0] * 80
        with StateDB(data_dir / "state.sqlite3") as state:
            assert state.instance_count() == 80
            assert state.instance_count(current_only=False) == 80
    finally:
        assert restarted.terminate() == 0
    assert (tmp_path / "node" / "data" / CLEAN_MARKER_NAME).exists()
    assert "node stopped" in restarted.log()


def test_acknowledged_instances_survive_losing_unflushed_renames_and_database(
    tmp_path: Path,
) -> None:
    """What a power failure may take after kill -9: the moves of committed files into their
    study folders (not flushed), files whose flush was cut short, partial files never
    committed, and the state database's last transactions. The commit records in the files
    left in ``incoming/`` bring every acknowledged instance back."""
    config = write_config(tmp_path / "node", stable=3600)
    series = make_mr_series(tmp_path / "in", 40, size=256)
    serve = ServeProcess(config, log_path=tmp_path / "serve.log")
    killed = threading.Event()

    def kill_after_acks(count: int) -> None:
        if count == 20 and not killed.is_set():
            threading.Timer(0.002, lambda: (serve.kill(), killed.set())).start()

    statuses = _store_all(serve.port, series.files, on_ack=kill_after_acks)
    killed.wait(10)
    assert killed.is_set() and 20 <= len(statuses) < 40 and all(s == 0 for s in statuses)
    acknowledged = series.sop_uids[: len(statuses)]
    spool = tmp_path / "node" / "data" / "spool"
    stored = sorted((spool / "studies").rglob("*.dcm"))
    records = [decode_record(path.read_bytes()[:PREAMBLE_SIZE]) for path in stored]
    assert len(stored) >= len(acknowledged) and all(records)
    for index, (path, record) in enumerate(zip(stored, records, strict=True)):
        assert record is not None and spool / record.relative == path
        if index % 2 == 0:  # renames not flushed: back where they were
            path.rename(spool / "incoming" / f"lost-move-{index}.part")
    torn = bytearray(stored[1].read_bytes())  # a record whose file did not reach the disk
    torn[-500:] = bytes(500)
    (spool / "incoming" / "torn.part").write_bytes(bytes(torn))
    (spool / "incoming" / "never-committed.part").write_bytes(b"\0" * 1000)
    data_dir = tmp_path / "node" / "data"
    for name in ("state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm"):
        (data_dir / name).unlink(missing_ok=True)

    restarted = ServeProcess(config, log_path=tmp_path / "serve.log")
    try:
        with StateDB(data_dir / "state.sqlite3") as state:
            for path, sop in zip(series.files, acknowledged, strict=False):
                record = state.current_instance(sop)
                assert record is not None, "an acknowledged instance is missing"
                assert data_set_of(spool / record.path) == data_set_of(path)
            assert state.instance_count() <= len(acknowledged) + 1
        assert list((spool / "incoming").iterdir()) == []
    finally:
        assert restarted.terminate() == 0
    assert "restored to the spool" in restarted.log()


def _limit_file_size() -> None:
    limit = 256 * 1024  # the state database and logs stay far below this
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_storage_error_answers_out_of_resources(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node")
    small = make_mr_series(tmp_path / "small", 2)
    large = make_mr_series(tmp_path / "large", 1, size=512, study_uid=small.study_uid)
    serve = ServeProcess(config, log_path=tmp_path / "serve.log", preexec_fn=_limit_file_size)
    try:
        assert _store_all(serve.port, small.files[:1]) == [0x0000]
        assert _store_all(serve.port, large.files) == [0xA700]  # file too large: EFBIG
        assert _store_all(serve.port, small.files[1:]) == [0x0000]  # and the node carries on
    finally:
        assert serve.terminate() == 0
    with StateDB(tmp_path / "node" / "data" / "state.sqlite3") as state:
        assert state.instance_count() == 2
        assert state.current_instance(large.sop_uids[0]) is None
    assert list((tmp_path / "node" / "data" / "spool" / "incoming").iterdir()) == []
    log = serve.log()
    assert "storage error" in log and large.sop_uids[0] not in log


def test_a_large_instance_is_not_held_in_memory(tmp_path: Path) -> None:
    import numpy as np
    import psutil
    from pydicom.uid import generate_uid

    from tests.node_fixtures import mr_dataset

    ds = mr_dataset(study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=generate_uid(),
                    frame_uid=generate_uid(), index=0, size=64)
    ds.Rows = ds.Columns = 5792  # 64 MiB of pixel data in one frame
    ds.PixelData = np.zeros((5792, 5792), dtype=np.uint16).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds
    log_path = tmp_path / "serve.log"
    serve = ServeProcess(write_config(tmp_path / "node"), log_path=log_path)
    try:
        process = psutil.Process(serve.proc.pid)
        _wait_for_model_preload(log_path)
        baseline = process.memory_info().rss
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            assert _store_all(serve.port, [big]) == [0x0000]
        finally:
            done.set()
            sampler.join()
        growth = (peak - baseline) / 2**20
        assert growth < 24, f"the node's memory grew by {growth:.0f} MiB for a 64 MiB instance"
        with StateDB(tmp_path / "node" / "data" / "state.sqlite3") as state:
            record = state.current_instance(str(dcmread_uid(big)))
            assert record is not None
            stored = tmp_path / "node" / "data" / "spool" / record.path
        assert data_set_of(stored) == data_set_of(big)
    finally:
        assert serve.terminate() == 0


def _wait_for_model_preload(log_path: Path, timeout: float = 180.0) -> None:
    """Wait until the in-process runner has tried to load the models (its imports take memory)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "the analysis cannot run" in text or "models ready" in text:
            return
        time.sleep(0.2)
    raise AssertionError("the node did not finish loading its models:\n" + log_path.read_text())


def dcmread_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
