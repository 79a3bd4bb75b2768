"""The DICOM listener: Verification and Storage SCP with the node's association policy.

Association policy (checked when the A-ASSOCIATE-RQ arrives, before anything is stored):

* the called AE title must be the node's, else A-ASSOCIATE-RJ *rejected-permanent, service
  user, called-AE-title-not-recognized*;
* the calling AE title must belong to a configured peer (and, for peers with ``check_host``,
  come from that peer's host), else *rejected-permanent, service user,
  calling-AE-title-not-recognized*;
* more than ``max_associations`` at once: *rejected-transient, service provider
  (presentation), local-limit-exceeded*;
* a configured peer without ``may_send`` gets Verification only: its storage presentation
  contexts are rejected (abstract syntax not supported).

C-STORE writes the received data set byte for byte (see :mod:`opmri_node.spool`), makes it
durable with a flush of the file and one of a commit in the receive journal
(:mod:`opmri_node.journal`), records it in the state database and only then answers 0x0000.
Every association leaves one audit line (logger ``opmri_node.audit``) with the peer, AE titles,
counts, duration and outcome, and no patient data.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, build_context

from opmri_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from opmri_node.config import NodeConfig, PeerConfig
from opmri_node.dicomnet import DirectStore, NodeAssociation, NodeAssociationServer
from opmri_node.journal import Journal
from opmri_node.monitoring import record_association
from opmri_node.spool import (
    HEADER_INFLATE_LIMIT,
    HeaderError,
    IncomingFile,
    InstanceHeader,
    Spool,
    SpoolFullError,
    encode_file_meta,
    is_valid_uid,
    raw_text,
    read_header,
)
from opmri_node.state import InstanceRecord, NewInstance, StateDB
from pipeline.privacy import uid_tag

LOGGER = logging.getLogger(__name__)
AUDIT = logging.getLogger("opmri_node.audit")

STORAGE_TRANSFER_SYNTAXES: Final[tuple[str, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEG2000MCLossless,
    JPEG2000MC,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)
"""Transfer syntaxes accepted for every storage SOP class; data are stored as received."""

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS: Final[int] = 0x0000
OUT_OF_RESOURCES: Final[int] = 0xA700
DATASET_MISMATCH: Final[int] = 0xA900
CANNOT_UNDERSTAND: Final[int] = 0xC000

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE: Final[tuple[int, int, int]] = (0x01, 0x01, 0x03)
REJECT_CALLED_AE: Final[tuple[int, int, int]] = (0x01, 0x01, 0x07)
REJECT_LIMIT: Final[tuple[int, int, int]] = (0x02, 0x03, 0x02)
"""Rejected (transient) by the presentation layer: local limit exceeded."""

_LOCK_STRIPES: Final[int] = 64
_RELEASE_BEHIND: Final[int] = 4
"""Committed files an association keeps open for release after its response, at most."""
_NEGOTIATED_KEEP: Final[int] = 64
"""Distinct context proposals whose negotiated contexts are kept (then they are forgotten)."""
_HEAD_KEEP: Final[int] = 64 * 1024
"""The first bytes of a streamed data set kept in memory, to read its header from."""
_AFFECTED_SOP_CLASS: Final[int] = 0x00000002
_AFFECTED_SOP_INSTANCE: Final[int] = 0x00001000

VERIFICATION: Final[str] = "1.2.840.10008.1.1"
"""Verification SOP Class UID."""


def storage_contexts() -> list[PresentationContext]:
    """Presentation contexts the listener accepts: every storage SOP class, and Verification."""
    contexts = [
        build_context(str(cx.abstract_syntax), list(STORAGE_TRANSFER_SYNTAXES))
        for cx in AllStoragePresentationContexts
    ]
    contexts.append(build_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return contexts


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


@dataclass
class AssociationAudit:
    """What one association did, for its audit line."""

    address: str
    port: int
    started: float = field(default_factory=time.monotonic)
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""
    reason: str = ""
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    echoes: int = 0
    bytes: int = 0
    studies: set[str] = field(default_factory=set)

    def line(self, outcome: str) -> str:
        duration = time.monotonic() - self.started
        parts = [
            f"association from={self.address}:{self.port}",
            f"calling_ae={self.calling_ae or '-'!r}",
            f"called_ae={self.called_ae or '-'!r}",
            f"peer={self.peer or '-'}",
            f"outcome={outcome}",
        ]
        if self.reason:
            parts.append(f"reason={self.reason!r}")
        parts += [
            f"stored={self.stored}",
            f"duplicates={self.duplicates}",
            f"failed={self.failed}",
            f"echoes={self.echoes}",
            f"studies={len(self.studies)}",
            f"bytes={self.bytes}",
            f"duration_s={duration:.3f}",
        ]
        return " ".join(parts)


@dataclass
class ReceiverStats:
    """Counters since the listener started."""

    associations: int = 0
    rejected: int = 0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0


@dataclass
class _StoreStream:
    """A C-STORE data set being written to ``incoming/`` while its P-DATA arrive.

    What has been written is dropped from pynetdicom's in-memory buffer, so a large instance
    never sits in memory whole; ``lost`` marks a stream that failed after that point (the
    data are gone and the instance cannot be stored).
    """

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    meta_length: int
    file: IncomingFile | None
    streamed: int = 0
    """Data set bytes written to the file (and dropped from memory)."""
    head: bytearray = field(default_factory=bytearray)
    """The first streamed bytes (up to :data:`_HEAD_KEEP`), for reading the header."""
    lost: bool = False
    header: InstanceHeader | None = None
    """The header, when it could be read from :attr:`head` alone (see ``_write_stream``)."""
    message: Any = None
    """The DIMSE message whose P-DATA were last written (identifies the stream cheaply)."""

    def discard(self) -> None:
        if self.file is not None:
            self.file.discard()
            self.file = None


class Receiver:
    """The node's DICOM listener (Verification and Storage SCP).

    A C-STORE data set is appended to a file in ``spool/incoming`` as its P-DATA arrive (the
    file asking the kernel to start writing it out), so that when the last fragment arrives
    little is left to flush. The handler then checks the data set, finishes the file (or writes
    it whole if streaming was not possible), commits it (a record in its preamble, one flush:
    see :mod:`opmri_node.journal`), renames it into place and records it.
    """

    def __init__(
        self, config: NodeConfig, state: StateDB, spool: Spool, journal: Journal | None = None
    ) -> None:
        self.config = config
        self.state = state
        self.spool = spool
        self.journal = journal if journal is not None else Journal(spool)
        self.stats = ReceiverStats()
        self._stats_lock = threading.Lock()
        self._audits: dict[int, AssociationAudit] = {}
        self._audits_lock = threading.Lock()
        self._uid_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._streams: dict[int, _StoreStream] = {}
        self._streams_lock = threading.Lock()
        self._committed: dict[int, list[IncomingFile]] = {}
        """Per association, committed files to release once the response has been sent."""
        self._committed_lock = threading.Lock()
        self._peer_hosts: dict[str, set[str]] = {}
        self._negotiated: dict[tuple[Any, ...], list[PresentationContext]] = {}
        """Contexts offered per proposal: a peer proposes the same ones on every association."""
        self._negotiated_lock = threading.Lock()
        self._accepted: dict[str, frozenset[str]] = {
            str(cx.abstract_syntax): frozenset(str(ts) for ts in cx.transfer_syntax)
            for cx in storage_contexts()
        }
        self._server: NodeAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._over_limit: set[int] = set()
        """Ids of handed-over sockets whose association is to be refused (limit reached)."""
        self._over_limit_lock = threading.Lock()
        self.on_association_recorded: Callable[[str, str], None] = record_association
        """Counts each ended association for the metrics (outcome, reason)."""
        self.ae = self._make_ae()

    # -- lifecycle -------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_length
        ae.acse_timeout = node.timeouts.acse
        ae.dimse_timeout = node.timeouts.dimse
        ae.network_timeout = node.timeouts.network
        ae.connection_timeout = node.timeouts.connect
        ae.require_called_aet = False  # checked in _on_requested, with an audit line
        return ae

    def start(self) -> tuple[str, int]:
        """Start listening; returns the bound (host, port)."""
        server = self._make_server((self.config.node.bind, self.config.node.port))
        node = self.config.node
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dicom-listener"
        )
        self._thread.daemon = True
        self._thread.start()
        host, port = server.server_address[:2]
        LOGGER.info(
            "listening as %s on %s:%d (max %d associations)",
            node.ae_title,
            host,
            port,
            node.max_associations,
        )
        return str(host), int(port)

    def start_handoff(self, on_connection_closed: Callable[[], None]) -> None:
        """Serve connections that another process accepted (:meth:`serve_connection`).

        Used by the receiving processes of :mod:`opmri_node.receivers`: the node's main
        process listens and hands each connection to one of them. ``on_connection_closed``
        is called whenever a handed-over connection has ended.
        """
        server = self._make_server(("127.0.0.1", 0), listen=False)
        if server.socket is not None:
            server.socket.close()  # connections come from serve_connection only
        server.on_connection_closed = on_connection_closed

    def serve_connection(
        self, sock: socket.socket, address: tuple[str, int], *, over_limit: bool = False
    ) -> None:
        """Serve one accepted connection in a new thread (after :meth:`start_handoff`).

        ``over_limit``: the node already has ``max_associations`` associations; the
        association request is rejected (transient, local limit exceeded) with an audit line.
        """
        server = self._server
        if server is None:
            raise RuntimeError("the receiver is not serving")
        if over_limit:
            with self._over_limit_lock:
                self._over_limit.add(id(sock))
        server.process_request(sock, address)

    def _make_server(
        self, address: tuple[str, int], *, listen: bool = True
    ) -> NodeAssociationServer:
        if self._server is not None:
            raise RuntimeError("the listener is already running")
        self._resolve_peer_hosts()
        node = self.config.node
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = self.ae.make_server(
            address,
            contexts=storage_contexts(),
            evt_handlers=handlers,
            server_class=NodeAssociationServer,
            max_pdu_length=node.max_pdu_length,
            max_connections=2 * node.max_associations + 4,
            on_association_end=self._on_end,
            on_pdata=self._on_pdata,
            on_data_fragment=self._on_fragment,
            on_store_command=self._on_store_command,
            on_responded=self._on_responded,
            listen=listen,
        )
        assert isinstance(server, NodeAssociationServer)
        self.ae._servers.append(server)
        self._server = server
        return server

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the listener is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def listening(self) -> bool:
        """Whether the listener thread runs and its socket is open (the health check)."""
        server, thread = self._server, self._thread
        if server is None or thread is None or not thread.is_alive():
            return False
        sock = server.socket
        return sock is not None and sock.fileno() >= 0

    def active_associations(self) -> list[Association]:
        return [] if self._server is None else list(self._server.active_associations)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop accepting, abort open associations and wait for their threads to end.

        A C-STORE whose file is being written finishes writing and recording before its
        association thread ends, so nothing acknowledged or recorded is cut in half.

        Returns:
            ``True`` if every association thread ended within ``timeout``.
        """
        server = self._server
        if server is None:
            return True
        if self._thread is not None:
            server.shutdown()
        else:  # handed-over connections only: no serve_forever loop to end
            server.server_close()
            with contextlib.suppress(ValueError):
                self.ae._servers.remove(server)
        assocs = list(server.active_associations)
        for assoc in assocs:
            try:
                assoc.abort()
            except Exception:  # the association ended meanwhile
                LOGGER.debug("abort on shutdown failed", exc_info=True)
        deadline = time.monotonic() + timeout
        for assoc in assocs:
            assoc.join(max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self._server = None
        self._thread = None
        ended = not any(assoc.is_alive() for assoc in assocs)
        flushed = self.journal.close(max(1.0, deadline - time.monotonic()))
        return ended and flushed

    # -- policy ----------------------------------------------------------------------------

    def _resolve_peer_hosts(self) -> None:
        self._peer_hosts = {}
        for name, peer in self.config.peers.items():
            if not peer.check_host:
                continue
            addresses: set[str] = set()
            try:
                for info in socket.getaddrinfo(peer.host, None, proto=socket.IPPROTO_TCP):
                    addresses.add(_normalise_ip(str(info[4][0])))
            except OSError as exc:
                LOGGER.warning("peer %s: host %s does not resolve (%s)", name, peer.host, exc)
            self._peer_hosts[name] = addresses

    def _match_peer(self, calling_ae: str, address: str) -> tuple[str, PeerConfig] | str:
        """The configured peer for a calling AE title and address, or the refusal reason."""
        candidates = [
            (name, peer) for name, peer in self.config.peers.items() if peer.ae_title == calling_ae
        ]
        if not candidates:
            return "calling AE title is not a configured peer"
        address = _normalise_ip(address)
        for name, peer in candidates:
            if not peer.check_host or address in self._peer_hosts.get(name, set()):
                return name, peer
        return "calling AE title is not allowed from this host"

    def _audit(self, assoc: Association) -> AssociationAudit:
        with self._audits_lock:
            audit = self._audits.get(id(assoc))
            if audit is None:
                address, port = _peer_address(assoc)
                audit = AssociationAudit(address=address, port=port)
                self._audits[id(assoc)] = audit
            return audit

    def _on_conn_open(self, event: evt.Event) -> None:
        self._audit(event.assoc)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        audit = self._audit(assoc)
        request = assoc.requestor.primitive
        if request is None:
            return
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        audit.calling_ae, audit.called_ae = calling, called
        if self._over_limit:
            raw = getattr(assoc.dul.socket, "socket", None)
            with self._over_limit_lock:
                over = id(raw) in self._over_limit
                self._over_limit.discard(id(raw))
            if over:
                self._reject(assoc, REJECT_LIMIT, "association limit reached")
                return
        if called != self.config.node.ae_title:
            self._reject(assoc, REJECT_CALLED_AE, "called AE title is not this node's")
            return
        match = self._match_peer(calling, audit.address)
        if isinstance(match, str):
            self._reject(assoc, REJECT_CALLING_AE, match)
            return
        name, peer = match
        audit.peer = name
        assoc.acceptor.supported_contexts = self._contexts_for(
            request.presentation_context_definition_list, peer.may_send
        )

    def _contexts_for(self, requested: list[Any], may_send: bool) -> list[PresentationContext]:
        """Contexts to negotiate with: the requestor's transfer syntax order, where we accept it.

        pynetdicom picks, per proposed context, the first of the acceptor's transfer syntaxes
        that the requestor offers. Ordering ours like the requestor's proposal means a sender
        that offers its file's own (e.g. compressed) syntax first gets it accepted, and the
        node stores what the sender has, not a conversion. A peer without ``may_send`` is
        offered Verification only.
        """
        key = (may_send, tuple(
            (str(context.abstract_syntax), tuple(str(ts) for ts in context.transfer_syntax))
            for context in requested
        ))
        cached = self._negotiated.get(key)
        if cached is not None:
            return list(cached)  # negotiation only reads the contexts (see copy_contexts)
        ordered: dict[str, list[str]] = {}
        for context in requested:
            abstract = str(context.abstract_syntax)
            allowed = self._accepted.get(abstract)
            if allowed is None or (not may_send and abstract != VERIFICATION):
                continue
            syntaxes = ordered.setdefault(abstract, [])
            for syntax in context.transfer_syntax:
                if str(syntax) in allowed and str(syntax) not in syntaxes:
                    syntaxes.append(str(syntax))
        contexts = [
            build_context(abstract, syntaxes or sorted(self._accepted[abstract]))
            for abstract, syntaxes in ordered.items()
        ]
        with self._negotiated_lock:
            if len(self._negotiated) >= _NEGOTIATED_KEEP:
                self._negotiated.clear()
            self._negotiated[key] = contexts
        return list(contexts)

    def _reject(self, assoc: Association, rsd: tuple[int, int, int], reason: str) -> None:
        self._audit(assoc).reason = reason
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    # -- streaming -------------------------------------------------------------------------

    def _on_pdata(self, assoc: Association) -> None:
        """Move what arrived of a C-STORE data set from memory to its incoming file.

        Runs in the upper layer's thread after each P-DATA primitive, before the next one is
        read; the final fragment is left to the C-STORE handler.
        """
        message = assoc.dimse.message
        if not isinstance(message, C_STORE_RQ) or message.data_set is None:
            return
        key = id(assoc)
        with self._streams_lock:
            stream = self._streams.get(key)
            if stream is None or stream.message is not message:
                message_id = int(message.command_set.MessageID)
                if stream is not None and stream.message_id != message_id:
                    stream.discard()
                    stream = None
                if stream is None:
                    command = message.command_set
                    # the raw values: pydicom's conversion would validate them (and may log)
                    stream = self._open_stream(
                        assoc,
                        message.context_id,
                        message_id,
                        _command_text(command, _AFFECTED_SOP_CLASS),
                        _command_text(command, _AFFECTED_SOP_INSTANCE),
                    )
                    self._streams[key] = stream
                stream.message = message
        if stream.file is None:
            return
        buffer = message.data_set
        view = buffer.getbuffer()
        try:
            written = self._write_stream(stream, view)
        finally:
            view.release()
        if not written:  # what was streamed is gone; without it, all is still in memory
            stream.lost = stream.streamed > 0
            return
        buffer.seek(0)
        buffer.truncate()

    def _on_fragment(
        self, assoc: Association, context_id: int, fragment: memoryview, last: bool
    ) -> bool:
        """Take a data set fragment of the C-STORE being streamed to a file (see
        :attr:`~opmri_node.dicomnet.NodeAssociation.on_data_fragment`); the handler finds the
        last one in the file too."""
        message = cast(NodeAssociation, assoc).message_in_progress
        with self._streams_lock:
            stream = self._streams.get(id(assoc))
        if (
            stream is None
            or message is None
            or stream.message is not message
            or stream.file is None
            or message.context_id != context_id
        ):
            return False
        if not self._write_stream(stream, fragment):
            stream.lost = True  # the fragment is taken: the instance cannot be stored
        return True

    @staticmethod
    def _write_stream(stream: _StoreStream, data: memoryview) -> bool:
        """Append data set bytes to the stream's file; False (and the file discarded) if
        writing failed."""
        incoming = stream.file
        assert incoming is not None
        try:
            incoming.write(data)
        except OSError as exc:
            LOGGER.debug("writing a data set while it arrives failed: %s", exc)
            stream.discard()
            return False
        missing = _HEAD_KEEP - len(stream.head)
        if missing > 0:
            stream.head += data[:missing]
            if len(stream.head) == _HEAD_KEEP:
                # the header is read now, while the rest arrives, if it ends within the head;
                # otherwise (any failure) the handler reads it from the whole data set
                with contextlib.suppress(Exception):
                    stream.header = read_header(
                        bytes(stream.head), stream.transfer_syntax, truncated=True
                    )
        stream.streamed += len(data)
        return True

    def _on_store_command(self, assoc: Association, request: DirectStore) -> None:
        """A C-STORE request received directly: its data set is written as it arrives."""
        stream = self._open_stream(
            assoc,
            request.context_id,
            request.message_id,
            request.sop_class_uid,
            request.sop_instance_uid,
        )
        stream.message = request
        with self._streams_lock:
            previous = self._streams.get(id(assoc))
            self._streams[id(assoc)] = stream
        if previous is not None:
            previous.discard()

    def _open_stream(
        self,
        assoc: Association,
        context_id: int | None,
        message_id: int,
        sop_class: str,
        sop_instance: str,
    ) -> _StoreStream:
        context = assoc._accepted_cx.get(context_id) if context_id is not None else None
        transfer_syntax = str(context.transfer_syntax[0]) if context is not None else ""
        stream = _StoreStream(message_id, sop_class, sop_instance, transfer_syntax, 0, None)
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance) and transfer_syntax):
            return stream  # the handler refuses it; nothing to write ahead
        meta = encode_file_meta(sop_class, sop_instance, transfer_syntax, self._calling_ae(assoc))
        try:
            incoming = self._open_incoming(assoc)
        except OSError:
            return stream  # reserve reached or storage error: the handler answers
        try:
            incoming.write(meta)
        except OSError:
            incoming.discard()
            return stream
        stream.meta_length = len(meta)
        stream.file = incoming
        return stream

    def _open_incoming(self, assoc: Association) -> IncomingFile:
        """A new incoming file, to be committed by the receive journal."""
        self.spool.check_room(0)
        return self.journal.open_incoming()

    def _after_response(self, assoc: Association, committed: IncomingFile) -> None:
        """Release ``committed`` once the response has been sent (:meth:`_on_responded`)."""
        with self._committed_lock:
            waiting = self._committed.setdefault(id(assoc), [])
            waiting.append(committed)
            older = waiting[:-_RELEASE_BEHIND] if len(waiting) > _RELEASE_BEHIND else []
            del waiting[: len(older)]
        for incoming in older:  # responses sent by pynetdicom's own path call no one
            self._release(incoming)

    def _on_responded(self, assoc: Association) -> None:
        """A response went out: release the files committed for it, while the peer reads it."""
        with self._committed_lock:
            waiting = self._committed.pop(id(assoc), None)
        for incoming in waiting or ():
            self._release(incoming)

    @staticmethod
    def _release(incoming: IncomingFile) -> None:
        try:
            incoming.release()
        except OSError as exc:  # the file is flushed: only its cached pages stay
            LOGGER.debug("releasing a committed file failed: %s", exc)

    def _take_stream(self, assoc: Association, message_id: int) -> _StoreStream | None:
        with self._streams_lock:
            stream = self._streams.get(id(assoc))
            if stream is None or stream.message_id != message_id:
                return None
            del self._streams[id(assoc)]
            return stream

    def _calling_ae(self, assoc: Association) -> str:
        with self._audits_lock:
            audit = self._audits.get(id(assoc))
        return audit.calling_ae if audit is not None else ""

    # -- services --------------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        self._audit(event.assoc).echoes += 1
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        audit = self._audit(event.assoc)
        request = cast(C_STORE, event.request)
        stream = request.DataSet
        data = stream.getbuffer() if stream is not None else memoryview(b"")
        try:
            status = self._store(event, audit, data)
        finally:
            data.release()
        code = status if isinstance(status, int) else int(status.Status)
        with self._stats_lock:
            if code == SUCCESS:
                self.stats.stored += 1
            else:
                self.stats.failed += 1
        if code != SUCCESS:
            audit.failed += 1
        return status

    def _store(self, event: evt.Event, audit: AssociationAudit, tail: memoryview) -> int | Dataset:
        request = cast(C_STORE, event.request)
        stream = self._take_stream(event.assoc, int(request.MessageID or 0))
        incoming: IncomingFile | None = None
        try:
            status, incoming = self._store_checked(event, audit, tail, stream)
            return status
        finally:
            if stream is not None:
                stream.discard()
            if incoming is not None:
                incoming.discard()

    def _store_checked(
        self,
        event: evt.Event,
        audit: AssociationAudit,
        tail: memoryview,
        stream: _StoreStream | None,
    ) -> tuple[int | Dataset, IncomingFile | None]:
        """Check, write, commit and record one instance.

        ``tail`` is what pynetdicom still holds of the data set: all of it, or, when the
        beginning was streamed to an incoming file already, the rest. Returns the status and
        an incoming file the caller must discard (``None`` once it was committed).
        """
        request = cast(C_STORE, event.request)
        transfer_syntax = str(event.context.transfer_syntax)
        command_uid = str(request.AffectedSOPInstanceUID or "").strip("\x00 ")
        command_class = str(request.AffectedSOPClassUID or "").strip("\x00 ")
        if not is_valid_uid(command_uid):
            LOGGER.warning("C-STORE refused: the request's Affected SOP Instance UID is invalid")
            return _status(CANNOT_UNDERSTAND, "Affected SOP Instance UID is not a valid UID"), None
        tag = uid_tag(command_uid)
        if stream is not None and stream.lost:
            LOGGER.error("C-STORE of instance %s failed: storage error while receiving", tag)
            return _status(OUT_OF_RESOURCES, "the node could not store the instance"), None

        incoming: IncomingFile | None = None
        head: bytes | memoryview
        try:
            if stream is not None and stream.file is not None and (
                stream.sop_instance_uid == command_uid
                and stream.sop_class_uid == command_class
                and stream.transfer_syntax == transfer_syntax
            ):
                incoming, stream.file = stream.file, None
                meta_length = stream.meta_length
                incoming.write(tail)
                total = stream.streamed + len(tail)
                early = stream.header
                if stream.streamed == len(stream.head):  # all of the streamed part is in memory
                    head = bytes(stream.head) + tail[: HEADER_INFLATE_LIMIT - len(stream.head)]
                else:
                    head = bytes(stream.head)
            else:
                meta_length = 0
                early = None
                head = tail[:HEADER_INFLATE_LIMIT]
                total = len(tail)
            try:
                if early is not None:
                    header = early  # read while the rest of the data set arrived
                else:
                    try:
                        header = read_header(head, transfer_syntax, truncated=total > len(head))
                    except HeaderError:
                        if incoming is None or len(head) >= min(total, HEADER_INFLATE_LIMIT):
                            raise
                        head = self._head_of(incoming.path, meta_length)  # a very long header
                        header = read_header(head, transfer_syntax, truncated=total > len(head))
            except HeaderError as exc:
                LOGGER.warning("C-STORE of instance %s refused: %s", tag, exc)
                return _status(CANNOT_UNDERSTAND, str(exc)), incoming
            if header.sop_instance_uid != command_uid:
                LOGGER.warning(
                    "C-STORE of instance %s refused: the data set has another SOP Instance UID",
                    tag,
                )
                return (
                    _status(DATASET_MISMATCH, "SOP Instance UID differs from the request's"),
                    incoming,
                )
            if header.sop_class_uid != command_class:
                LOGGER.warning(
                    "C-STORE of instance %s refused: the data set has another SOP Class UID", tag
                )
                return (
                    _status(DATASET_MISMATCH, "SOP Class UID differs from the request's"),
                    incoming,
                )
            if incoming is None:
                meta = encode_file_meta(
                    header.sop_class_uid, header.sop_instance_uid, transfer_syntax,
                    audit.calling_ae,
                )
                meta_length = len(meta)
                self.spool.check_room(meta_length + total)
                incoming = self._open_incoming(event.assoc)
                incoming.write(meta)
                incoming.write(tail)
            size = incoming.size
            self.spool.check_room(0)
            with self._uid_locks[hash(command_uid) % _LOCK_STRIPES]:
                existing = self.state.current_instance(header.sop_instance_uid)
                if existing is not None and self._same(
                    existing, transfer_syntax, incoming.name, meta_length
                ):
                    return self._duplicate(audit, tag), incoming
                revision = 1 if existing is None else existing.revision + 1
                relative = self.spool.relative_path(
                    header.study_uid, header.sop_instance_uid, revision
                )
                self.journal.commit(incoming, relative)  # durable from here on
                committed, incoming = incoming, None
                # dropping its pages and closing it wait until the response is on its way
                self._after_response(event.assoc, committed)
                # a failed move leaves the committed file in incoming/: replay moves it
                self.spool.place(committed.name, relative)
                self.state.record_instance(
                    NewInstance(
                        study_uid=header.study_uid,
                        series_uid=header.series_uid,
                        sop_instance_uid=header.sop_instance_uid,
                        sop_class_uid=header.sop_class_uid,
                        modality=header.modality,
                        transfer_syntax_uid=transfer_syntax,
                        path=relative,
                        data_offset=meta_length,
                        size=size,
                        revision=revision,
                        calling_ae=audit.calling_ae,
                    )
                )
        except SpoolFullError:
            LOGGER.warning("C-STORE of instance %s refused: disk free space below reserve", tag)
            return _status(OUT_OF_RESOURCES, "insufficient free disk space on the node"), incoming
        except (OSError, sqlite3.Error) as exc:
            LOGGER.error("C-STORE of instance %s failed: storage error %s", tag, type(exc).__name__)
            LOGGER.debug("storage error", exc_info=exc)
            return _status(OUT_OF_RESOURCES, "the node could not store the instance"), incoming
        except Exception as exc:
            LOGGER.error("C-STORE of instance %s failed: %s", tag, type(exc).__name__)
            LOGGER.debug("unexpected C-STORE error", exc_info=exc)
            return (
                _status(CANNOT_UNDERSTAND, "internal error while storing the instance"),
                incoming,
            )
        if revision > 1:
            LOGGER.info(
                "instance %s of study %s received with different content: kept as revision %d",
                tag,
                uid_tag(header.study_uid),
                revision,
            )
        audit.stored += 1
        audit.bytes += total
        audit.studies.add(header.study_uid)
        return SUCCESS, None

    @staticmethod
    def _head_of(path: Path, offset: int) -> bytes:
        """The first bytes of the data set in an incoming file (enough for its header)."""
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(HEADER_INFLATE_LIMIT)

    def _duplicate(self, audit: AssociationAudit, tag: str) -> int:
        audit.duplicates += 1
        with self._stats_lock:
            self.stats.duplicates += 1
        LOGGER.debug("instance %s received again, identical: not stored twice", tag)
        return SUCCESS

    def _same(
        self, existing: InstanceRecord, transfer_syntax: str, path: str, offset: int
    ) -> bool:
        """True if the stored current revision holds exactly the data set in ``path``."""
        return existing.transfer_syntax_uid == transfer_syntax and self.spool.same_file_data(
            existing.path, existing.data_offset, path, offset
        )

    # -- audit -----------------------------------------------------------------------------

    def _on_end(self, assoc: Association) -> None:
        with self._streams_lock:
            stream = self._streams.pop(id(assoc), None)
        if stream is not None:
            stream.discard()
        self._on_responded(assoc)
        with self._audits_lock:
            audit = self._audits.pop(id(assoc), None)
        if audit is None:
            address, port = _peer_address(assoc)
            audit = AssociationAudit(address=address, port=port)
        if assoc.is_rejected:
            outcome = "rejected"
            if not audit.reason:
                audit.reason = _reject_reason(assoc)
        elif assoc.is_released:
            outcome = "released"
        elif assoc.is_aborted:
            outcome = "aborted"
        else:
            outcome = "closed"
        with self._stats_lock:
            self.stats.associations += 1
            if outcome == "rejected":
                self.stats.rejected += 1
        self.on_association_recorded(outcome, audit.reason or "")
        level = logging.WARNING if outcome in ("rejected", "aborted") else logging.INFO
        AUDIT.log(level, audit.line(outcome))


def _command_text(command: Dataset, tag: int) -> str:
    """A command element's text as received, without pydicom's conversion."""
    element = command.get_item(tag)
    return raw_text(getattr(element, "value", None))


def _reject_reason(assoc: Association) -> str:
    primitive = assoc.acceptor.primitive
    diagnostic = getattr(primitive, "diagnostic", None)
    source = getattr(primitive, "result_source", None)
    if source == 0x03 and diagnostic == 0x02:
        return "association limit reached"
    return f"source={source} diagnostic={diagnostic}"


def _peer_address(assoc: Association) -> tuple[str, int]:
    info = assoc.requestor.address_info
    if info is None:
        return "?", 0
    return str(info.address), int(info.port or 0)


def _normalise_ip(address: str) -> str:
    address = address.split("%", 1)[0]
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address
