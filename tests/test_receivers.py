"""``node.receive_processes``: associations served by several processes of one node."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from opmri_node.state import StateDB
from tests.node_fixtures import (
    ServeProcess,
    make_mr_series,
    scu_ae,
    store_statuses,
    storescu,
    write_config,
)


def _children(serve: ServeProcess) -> list[psutil.Process]:
    return psutil.Process(serve.proc.pid).children()


def _send(port: int, files: list[Path]) -> list[str]:
    sent = storescu("127.0.0.1", port, files)
    return store_statuses(sent.stdout + sent.stderr)


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_concurrent_associations_spread_over_processes(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node", stable=3600,
                          node_extra="  receive_processes: 2\n")
    serve = ServeProcess(config, log_path=tmp_path / "serve.log")
    try:
        assert len(_children(serve)) == 2
        series = [make_mr_series(tmp_path / f"in{i}", 30, size=128) for i in range(4)]
        results: list[list[str]] = []
        senders = [
            threading.Thread(target=lambda s=s: results.append(_send(serve.port, s.files)))
            for s in series
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)
        assert [len(r) for r in results] == [30] * 4
        assert all(status == "Success" for r in results for status in r)
        with StateDB(tmp_path / "node" / "data" / "state.sqlite3") as state:
            assert state.instance_count() == 120
            for s in series:
                for sop in s.sop_uids:
                    assert state.current_instance(sop) is not None
        audit_log = tmp_path / "node" / "data" / "audit.log"
        # the audit line follows the release response
        _wait(lambda: audit_log.read_text().count("outcome=released stored=30 ") == 4, 10,
              "four audit lines")
    finally:
        assert serve.terminate() == 0
    assert "node stopped" in serve.log()


def test_the_association_limit_is_the_nodes_across_processes(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node", stable=3600,
                          node_extra="  receive_processes: 2\n  max_associations: 1\n")
    serve = ServeProcess(config, log_path=tmp_path / "serve.log")
    try:
        first_ae = scu_ae()
        first_ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        first = first_ae.associate("127.0.0.1", serve.port, ae_title="OPMRI")
        assert first.is_established
        second_ae = scu_ae()
        second_ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        second = second_ae.associate("127.0.0.1", serve.port, ae_title="OPMRI")
        assert second.is_rejected
        assert (second.acceptor.primitive.result, second.acceptor.primitive.result_source,
                second.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)
        first.release()
        # once the first association ended, a new one is accepted
        _wait(lambda: "outcome=released" in
              (tmp_path / "node" / "data" / "audit.log").read_text(), 10, "the release")
        time.sleep(0.3)
        third = first_ae.associate("127.0.0.1", serve.port, ae_title="OPMRI")
        assert third.is_established
        third.release()
        audit = (tmp_path / "node" / "data" / "audit.log").read_text()
        assert "association limit reached" in audit
    finally:
        assert serve.terminate() == 0


def test_a_receiving_process_that_dies_is_replaced_and_loses_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node", stable=3600,
                          node_extra="  receive_processes: 2\n")
    serve = ServeProcess(config, log_path=tmp_path / "serve.log")
    try:
        before = {p.pid for p in _children(serve)}
        first = make_mr_series(tmp_path / "a", 20, size=128)
        sent = storescu("127.0.0.1", serve.port, first.files)
        assert store_statuses(sent.stdout + sent.stderr) == ["Success"] * 20
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: len({p.pid for p in _children(serve)} - before) == 1, 60,
              "a replacement process")
        _wait(lambda: "replacing it" in serve.log(), 10, "the log line")
        second = make_mr_series(tmp_path / "b", 20, size=128)
        for _ in range(2):  # the second time, the least busy process may be the other one
            sent = storescu("127.0.0.1", serve.port, second.files)
            assert store_statuses(sent.stdout + sent.stderr) == ["Success"] * 20
        with StateDB(tmp_path / "node" / "data" / "state.sqlite3") as state:
            for sop in [*first.sop_uids, *second.sop_uids]:
                assert state.current_instance(sop) is not None
            assert state.instance_count() == 40
    finally:
        code = serve.terminate()
    assert code == 0


def test_receiving_process_binds_no_port(tmp_path: Path) -> None:
    """A receiving process serves handed-over connections only: it must not bind or listen
    (the node's port is taken by the node's own listener)."""
    import socket

    from opmri_node.journal import Journal
    from opmri_node.scp import Receiver
    from opmri_node.spool import Spool
    from tests.node_fixtures import load

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = load(write_config(tmp_path / "node", port=port))
        spool = Spool(config.node.data_dir / "spool")
        state = StateDB(config.node.data_dir / "state.sqlite3")
        receiver = Receiver(config, state, spool, Journal(spool, owner="test"))
        try:
            receiver.start_handoff(lambda: None)
            assert not receiver.listening
            assert listener.getsockname()[1] == port
        finally:
            receiver.stop()
            state.close()
