"""The running node: listener, study assembly and job dispatch around one state database.

``opmri-node serve`` builds a :class:`Node` and calls :meth:`Node.serve_forever`. Tests and
embedding code use :meth:`Node.start` / :meth:`Node.stop` (also as a context manager).

Start-up order makes a restart after a crash (even ``kill -9``) safe:

1. the receive journal is replayed: every committed instance (which includes every
   acknowledged one) still in ``spool/incoming`` is moved into its study folder, the move not
   having reached the disk (see :mod:`opmri_node.journal`);
2. what else is in ``spool/incoming`` is deleted (partial writes, never acknowledged, and
   empty files prepared for instances);
3. after an unclean stop (no ``clean-shutdown`` marker, or committed instances were left), spool
   files missing from the state database (a crash between rename and commit, or transactions a
   power failure took) are indexed again;
4. the listener starts;
5. pending jobs are dispatched again and the study assembler resumes the stability timers
   of studies still receiving (their ``last_received`` time is in the database);
6. with ``monitoring.port`` set, ``/metrics`` and ``/healthz`` are served
   (:mod:`opmri_node.monitoring`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Final

from opmri_node.assembly import JobDispatcher, PendingJobs, StudyAssembler
from opmri_node.config import NodeConfig
from opmri_node.journal import Journal
from opmri_node.monitoring import MonitoringServer, start_monitoring
from opmri_node.scp import Receiver
from opmri_node.spool import HeaderError, Spool, fsync_dir, read_stored_header
from opmri_node.state import NewInstance, StateDB

if TYPE_CHECKING:
    from opmri_node.receivers import ReceiverPool

LOGGER = logging.getLogger(__name__)

UNFINISHED_COMMIT: Final[str] = (
    "receive journal commits %s but no complete file of it exists: the node stopped before "
    "the file was flushed, so the instance was not acknowledged"
)
AUDIT = logging.getLogger("opmri_node.audit")

STATE_DB_NAME = "state.sqlite3"
AUDIT_LOG_NAME = "audit.log"
CLEAN_MARKER_NAME = "clean-shutdown"
"""Written when the node stopped with every association finished and the database closed."""


def state_db_path(config: NodeConfig) -> Path:
    """Where the node keeps its state database."""
    return config.node.data_dir / STATE_DB_NAME


def open_spool(config: NodeConfig) -> Spool:
    return Spool(
        config.node.data_dir / "spool", min_free_bytes=config.node.min_free_disk_mb * 1024 * 1024
    )


def reindex_spool(state: StateDB, spool: Spool) -> int:
    """Record spool files the state database does not know; returns how many were added."""
    known = state.known_paths()
    added = 0
    for relative, revision in spool.iter_files():
        if relative in known:
            continue
        path = spool.path(relative)
        try:
            header, transfer_syntax, offset = read_stored_header(path)
        except (HeaderError, OSError) as exc:
            LOGGER.warning("spool file %s cannot be indexed: %s", relative, exc)
            continue
        if spool.relative_path(header.study_uid, header.sop_instance_uid, revision) != relative:
            LOGGER.warning("spool file %s does not match its own UIDs; not indexed", relative)
            continue
        stat = path.stat()
        state.record_instance(
            NewInstance(
                study_uid=header.study_uid,
                series_uid=header.series_uid,
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                modality=header.modality,
                transfer_syntax_uid=transfer_syntax,
                path=relative,
                data_offset=offset,
                size=stat.st_size,
                revision=revision,
                calling_ae="",
            ),
            received_at=stat.st_mtime,
        )
        added += 1
    return added


class Node:
    """Listener + study assembler + dispatcher sharing one state database and spool."""

    def __init__(self, config: NodeConfig, dispatcher: JobDispatcher | None = None) -> None:
        self.config = config
        self.dispatcher: JobDispatcher = dispatcher or PendingJobs()
        self.state: StateDB | None = None
        self.spool: Spool | None = None
        self.receiver: Receiver | None = None
        """The receiver when associations are served in this process."""
        self.receivers: ReceiverPool | None = None
        """The receiving processes when ``node.receive_processes`` is above 1."""
        self.assembler: StudyAssembler | None = None
        self.monitoring: MonitoringServer | None = None
        self._audit_handler: logging.Handler | None = None
        self._stop = threading.Event()

    def start(self) -> tuple[str, int]:
        """Open state and spool, recover, start listening; returns the bound (host, port)."""
        data_dir = self.config.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._open_audit_log(data_dir / AUDIT_LOG_NAME)
        self.state = StateDB(state_db_path(self.config))
        self.spool = open_spool(self.config)
        journal = Journal(self.spool)
        replayed = journal.replay()
        if replayed.segments or replayed.committed:
            LOGGER.warning(
                "replayed the receive journal (%d segment(s) of an earlier version): %d "
                "committed instance(s), %d restored to the spool",
                replayed.segments,
                replayed.committed,
                replayed.restored,
            )
        for skipped in replayed.skipped:
            LOGGER.error("receive journal names an invalid spool path; not restored: %r", skipped)
        for unfinished in replayed.unfinished:
            LOGGER.warning(UNFINISHED_COMMIT, unfinished)
        removed = self.spool.clean_incoming()
        if removed:
            LOGGER.info("removed %d partial write(s) left by an interrupted run", removed)
        marker = data_dir / CLEAN_MARKER_NAME
        if marker.exists() and not (replayed.segments or replayed.committed):
            marker.unlink()
            fsync_dir(data_dir)
        else:
            marker.unlink(missing_ok=True)
            added = reindex_spool(self.state, self.spool)
            if added:
                LOGGER.warning("indexed %d spool file(s) missing from the state database", added)
        if self.config.node.receive_processes > 1:
            from opmri_node.receivers import ReceiverPool

            self.receivers = ReceiverPool(self.config, self.config.node.receive_processes)
            address = self.receivers.start()
        else:
            self.receiver = Receiver(self.config, self.state, self.spool, journal)
            address = self.receiver.start()
        self.assembler = StudyAssembler(
            self.state, self.config.node.study_stable_seconds, self.dispatcher
        )
        self.assembler.resume()
        self.assembler.start()
        try:
            self.monitoring = start_monitoring(self.config, "node", self._listener_ok)
        except BaseException:
            self.stop()
            raise
        return address

    def _listener_ok(self) -> bool:
        if self.receivers is not None:
            return self.receivers.listening
        receiver = self.receiver
        return receiver is not None and receiver.listening

    @property
    def address(self) -> tuple[str, int]:
        if self.receivers is not None:
            return self.receivers.address
        if self.receiver is None:
            raise RuntimeError("the node is not running")
        return self.receiver.address

    def stop(self) -> None:
        """Stop listening and assembling, then close the state database."""
        clean = True
        if self.monitoring is not None:
            self.monitoring.close()
            self.monitoring = None
        if self.receivers is not None:
            clean = self.receivers.stop()
            self.receivers = None
        if self.receiver is not None:
            clean = self.receiver.stop()
            self.receiver = None
        if self.assembler is not None:
            self.assembler.stop()
            self.assembler = None
        if self.state is not None:
            self.state.close()
            self.state = None
            if clean:
                data_dir = self.config.node.data_dir
                (data_dir / CLEAN_MARKER_NAME).write_bytes(b"")
                fsync_dir(data_dir)
        if self._audit_handler is not None:
            AUDIT.removeHandler(self._audit_handler)
            self._audit_handler.close()
            self._audit_handler = None

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (safe from signal handlers and other threads)."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down cleanly."""

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            LOGGER.info("received %s, shutting down", signal.Signals(signum).name)
            self._stop.set()

        previous = {
            sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            host, port = self.start()
            LOGGER.info(
                "node %s ready on %s:%d (pid %d, data in %s)",
                self.config.node.ae_title,
                host,
                port,
                os.getpid(),
                self.config.node.data_dir,
            )
            while not self._stop.wait(0.5):
                pass
        finally:
            started = time.monotonic()
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            LOGGER.info("node stopped in %.1f s", time.monotonic() - started)

    def _open_audit_log(self, path: Path) -> None:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        AUDIT.addHandler(handler)
        if AUDIT.getEffectiveLevel() > logging.INFO:
            AUDIT.setLevel(logging.INFO)
        self._audit_handler = handler
