"""pynetdicom's association server, hardened and made event-driven for the node's listener.

pynetdicom 3.0 is used as is for negotiation, the state machine, DIMSE and the service
classes. The classes here change what happens around them:

* :class:`BoundedSocket` refuses a PDU whose header claims more than the node's limit before
  reading its body (pynetdicom itself would keep reading whatever length a header claims),
  gives every PDU a deadline (a client trickling bytes cannot hold a thread forever) and reads
  ahead into one buffer, a system call per read taking whatever has arrived (often several
  PDUs), instead of pynetdicom's 4 KiB pieces and a poll before each.
* :class:`NodeDUL` and :class:`NodeAssociation` wait for the socket or a queue instead of
  polling with 1 ms sleeps (a C-STORE round trip no longer pays several milliseconds of
  sleeps), and an acceptor whose connection failed before association stops waiting at once.
* A C-STORE request is served in the DUL thread as soon as its last fragment has arrived
  (:class:`_InlineStoreQueue`), when nothing else is queued or being served: reading the
  request, storing the instance and sending the response then need no hand-off between
  threads, each of which costs a scheduler wake-up (several milliseconds on a busy machine).
* A plain C-STORE-RQ whose command arrives in one P-DATA-TF is received by the DUL thread
  itself (:class:`DirectStore`, :meth:`NodeDUL._read_pdu_data`): the command is read without
  pydicom (:func:`parse_c_store_rq`), :attr:`NodeAssociation.on_store_command` opens the
  listener's file, each data set fragment goes from the read buffer to
  :attr:`NodeAssociation.on_data_fragment`, and the complete request is queued as pynetdicom
  would queue it: no PDU decoding, state machine events, DIMSE decoding or copies for a
  C-STORE. Anything unusual, also midway, is left (or handed) to pynetdicom, where
  :attr:`NodeAssociation.on_pdata` lets the listener take each P-DATA's share of a data set
  out of memory while the message is still arriving.
* A complete C-STORE request of pynetdicom's path becomes its primitive without pydicom's
  conversion of each command element (:func:`c_store_rq_primitive`).
* A plain C-STORE request is served without pynetdicom's per-request service class machinery
  (:meth:`NodeAssociation._serve_plain_store`; the handler and the response are the same).
* C-STORE responses are encoded directly (:func:`encode_c_store_rsp`), a fixed group of
  seven elements, instead of through a pydicom Dataset, and sent by the DUL thread at once
  when nothing else is queued for the peer.
* An A-ASSOCIATE-RQ byte for byte identical to one received before (a peer proposing the
  same contexts again) is not decoded again: its primitive is a copy of the one made then
  (:class:`_KnownAssociateRQ`); a proposal of all storage classes costs pynetdicom several
  milliseconds of CPU to decode and convert.
* :class:`NodeAssociationServer` sets ``TCP_NODELAY`` on every accepted connection, closes
  connections beyond a hard cap at once, and skips pynetdicom's per-message logging handlers
  (which are slow and write identifiers into the log).

The overridden loops mirror pynetdicom 3.0.4's own (``DULServiceProvider.run_reactor``,
``Association.run_reactor`` and ``Association._run_reactor``); ``pyproject.toml`` pins
pynetdicom below 3.1 accordingly and the test suite exercises them through real associations.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Final, cast

from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from opmri_node.spool import is_valid_uid, raw_text

LOGGER = logging.getLogger(__name__)

ASSOCIATE_PDU_LIMIT: Final[int] = 1024 * 1024
"""Largest non-P-DATA PDU accepted (an A-ASSOCIATE-RQ with every context is ~100 KiB)."""

_EMPTY_PDATA_HEADER: Final[bytes] = b"\x04\x00" + (6).to_bytes(4, "big")
"""A P-DATA-TF PDU header for one PDV with no data: 4 length bytes, context ID, control."""
_EMPTY_PDV_LENGTH: Final[bytes] = (2).to_bytes(4, "big")

_READ_AHEAD: Final[int] = 256 * 1024
"""Initial size of an association's read buffer (grown for longer PDUs, up to the bound)."""
_NO_DEADLINE_S: Final[float] = 7 * 24 * 3600.0
"""Socket timeout where the node sets none (the socket must have one to be non-blocking)."""

_WAIT_S: Final[float] = 0.05
"""Longest a reactor sleeps without news (bounds timer checks and shutdown latency)."""


class PDUTooLongError(OSError):
    """A PDU header claimed more bytes than the node accepts."""


def enable_nodelay(sock: socket.socket) -> None:
    """Turn off Nagle's algorithm: each DIMSE message goes out without a 40 ms delay."""
    with contextlib.suppress(OSError):  # not a TCP socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class BoundedSocket(AssociationSocket):
    """An :class:`AssociationSocket` with a bound on PDU length, a deadline per read and a
    read-ahead buffer.

    Reads go into one buffer (grown up to the PDU bound when a PDU needs it) with one system
    call per read and take whatever the connection holds, so consecutive PDUs usually arrive
    with a single read; :meth:`peek` and :meth:`consume` let the DUL hand a PDU's bytes on
    without copying them.
    """

    def __init__(
        self,
        assoc: Association,
        client_socket: socket.socket,
        *,
        max_pdu_length: int,
        read_timeout: float | None,
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        # pynetdicom asks for 6 header bytes, then for the body length the header claims.
        self.max_read = max(max_pdu_length, ASSOCIATE_PDU_LIMIT) + 6
        self.read_timeout = read_timeout
        self.failed = False
        """Set once a read failed: the connection is unusable."""
        self._buffer = bytearray(min(_READ_AHEAD, self.max_read))
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._closed = False
        """The peer closed its side (or reading failed): nothing more will be read."""
        self._tls = isinstance(client_socket, ssl.SSLSocket)
        self._timeout = read_timeout if read_timeout else _NO_DEADLINE_S
        # a socket with a timeout is non-blocking underneath: a read returns at once, and
        # waiting is done here (sends keep Python's own wait, bounded by this timeout)
        client_socket.settimeout(self._timeout)

    @property
    def buffered(self) -> int:
        """Bytes read from the connection and not yet taken."""
        return self._end - self._start

    @property
    def ready(self) -> bool:
        """True if bytes are buffered or arrived (or the connection ended: reading tells)."""
        if self._end > self._start:
            return True
        if self.socket is None or self._is_connected is False:
            return False
        return self._closed or self._read_some(0.0)

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed the connection).

        Raises:
            PDUTooLongError: ``nr_bytes`` exceeds the limit; nothing is read.
            TimeoutError: the bytes did not arrive within the read timeout.
        """
        if nr_bytes > self.max_read:
            self.failed = True
            LOGGER.warning(
                "aborting association: a PDU header claims %d bytes, more than the %d accepted",
                nr_bytes,
                self.max_read,
            )
            raise PDUTooLongError(f"PDU of {nr_bytes} bytes exceeds the limit of {self.max_read}")
        self._fill(nr_bytes)
        start = self._start
        taken = min(nr_bytes, self._end - start)
        self._start = start + taken
        return self._buffer[start : start + taken]

    def peek(self, nr_bytes: int) -> memoryview:
        """The next ``nr_bytes`` (fewer only if the peer closed the connection), left in the
        buffer; valid until the next read. ``nr_bytes`` must be within :attr:`max_read`."""
        self._fill(nr_bytes)
        start = self._start
        return self._view[start : min(start + nr_bytes, self._end)]

    def consume(self, nr_bytes: int) -> None:
        """Drop ``nr_bytes`` of the buffered bytes (as many as :meth:`peek` returned)."""
        self._start = min(self._start + nr_bytes, self._end)

    def overwrite(self, offset: int, data: bytes) -> None:
        """Replace buffered bytes at ``offset`` from the next unread one."""
        position = self._start + offset
        if position < self._start or position + len(data) > self._end:
            raise ValueError("only buffered bytes can be replaced")
        self._view[position : position + len(data)] = data

    def _fill(self, nr_bytes: int) -> None:
        """Read until ``nr_bytes`` are buffered or the connection ends."""
        if self._end - self._start >= nr_bytes:
            return
        self._make_room(nr_bytes)
        deadline = None if self.read_timeout is None else time.monotonic() + self.read_timeout
        while self._end - self._start < nr_bytes and not self._closed:
            if deadline is None:
                self._read_some(None)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read_some(remaining):
                self.failed = True
                raise TimeoutError("the peer did not send a complete PDU in time")

    def _make_room(self, nr_bytes: int) -> None:
        """Make the free space after the buffered bytes hold ``nr_bytes`` in all."""
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = start = end = 0
        if start + nr_bytes <= len(self._buffer):
            return
        held = end - start
        if nr_bytes <= len(self._buffer):
            self._view[:held] = self._view[start:end]  # memmove: the ranges may overlap
        else:
            grown = bytearray(min(max(nr_bytes, 2 * len(self._buffer)), self.max_read))
            grown[:held] = self._view[start:end]
            self._buffer = grown
            self._view = memoryview(grown)
        self._start, self._end = 0, held

    def _read_some(self, timeout: float | None) -> bool:
        """One read into the free space; False if nothing arrived within ``timeout`` (0: do
        not wait, None: no limit). The end of the connection counts as an arrival."""
        sock = self.socket
        if sock is None:
            self._closed = self.failed = True
            return True
        if self._end == len(self._buffer):
            self._make_room(self._end - self._start + 1)
        free = self._view[self._end :]
        try:
            while True:
                try:
                    if self._tls:
                        sock.settimeout(timeout)
                        try:
                            count = sock.recv_into(free)
                        finally:
                            sock.settimeout(self._timeout)
                    else:
                        count = os.readv(sock.fileno(), [free])
                    break
                except (BlockingIOError, ssl.SSLWantReadError):
                    if timeout == 0.0:
                        return False
                    if self._tls:
                        raise TimeoutError from None
                    ready, _, _ = select.select([sock], [], [], timeout)
                    if not ready:
                        return False
                except InterruptedError:
                    continue
        except TimeoutError:
            return False
        except (OSError, ValueError):
            self._closed = self.failed = True
            return True
        finally:
            free.release()
        if count == 0:
            self._closed = self.failed = True
        self._end += count
        return True


_KNOWN_RQ_KEEP: Final[int] = 16
"""Distinct A-ASSOCIATE-RQ PDUs whose decoded form is kept (then they are forgotten)."""

_KNOWN_RQ_MAX_BYTES: Final[int] = 64 * 1024
"""Longer A-ASSOCIATE-RQ PDUs are decoded every time (and not kept)."""

_KNOWN_RQ: dict[bytes, _KnownAssociateRQ] = {}


class _KnownAssociateRQ(A_ASSOCIATE_RQ):
    """A decoded A-ASSOCIATE-RQ PDU kept for later PDUs identical to it byte for byte.

    Its primitive is made once; :meth:`to_primitive` returns a copy of it whose lists are
    new (the presentation contexts and user information items in them are shared: pynetdicom
    only reads those of a request).
    """

    _primitive: A_ASSOCIATE | None = None

    def keep_primitive(self) -> bool:
        """Make the primitive to copy from; False if pynetdicom cannot convert this PDU."""
        try:
            self._primitive = super().to_primitive()
        except Exception:
            return False
        return True

    def to_primitive(self) -> A_ASSOCIATE:
        primitive = self._primitive
        if primitive is None:
            return super().to_primitive()
        duplicate = copy.copy(primitive)
        for name, value in list(vars(duplicate).items()):
            if isinstance(value, list):
                setattr(duplicate, name, list(value))
        return duplicate


class NodeDUL(DULServiceProvider):
    """The DUL reactor of pynetdicom, woken by socket data or queued primitives, not a timer."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # buffer full (already awake) or reactor done
            self._wake_w.send(b"\0")

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        if threading.current_thread() is not self:  # the reactor itself sees the queue
            self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        stopped = super().stop_dul()
        if stopped:
            self._wake()
        return stopped

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """pynetdicom's PDU decoding, except for an A-ASSOCIATE-RQ decoded before (the same
        events are triggered with the PDU kept then)."""
        if bytestream[:1] != b"\x01" or len(bytestream) > _KNOWN_RQ_MAX_BYTES:
            return cast(tuple[Any, str], super()._decode_pdu(bytestream))
        raw = bytes(bytestream)
        evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": raw})
        pdu = _KNOWN_RQ.get(raw)
        if pdu is None:
            pdu = _KnownAssociateRQ()
            pdu.decode(raw)
            if pdu.keep_primitive():
                if len(_KNOWN_RQ) >= _KNOWN_RQ_KEEP:
                    _KNOWN_RQ.clear()
                _KNOWN_RQ[raw] = pdu
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt6"  # A-ASSOCIATE-RQ PDU received

    def _wait_for_work(self) -> None:
        if not self.to_provider_queue.empty():
            return
        readers: list[Any] = [self._wake_r]
        assoc_sock = self.socket
        raw = assoc_sock.socket if assoc_sock is not None else None
        if raw is not None and getattr(assoc_sock, "_is_connected", False):
            if isinstance(assoc_sock, BoundedSocket) and assoc_sock.buffered:
                return
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return
            readers.append(raw)
        try:
            ready, _, _ = select.select(readers, [], [], _WAIT_S)
        except (OSError, ValueError):  # the socket was closed under us
            time.sleep(0.001)
            ready = [self._wake_r]
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop with :meth:`_wait_for_work` in place of ``time.sleep``."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    self._abort_on_error(exc)
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait_for_work()
                    continue
                self.state_machine.do_action(event)
        finally:
            self._wake_r.close()
            self._wake_w.close()

    def _read_pdu_data(self) -> None:
        """Read one PDU, or take P-DATA-TF PDUs straight from the socket's read buffer.

        A plain C-STORE-RQ whose command arrives in one fragment is received here without
        pynetdicom's PDU decoding, state machine and DIMSE decoding (a :class:`DirectStore`):
        :attr:`NodeAssociation.on_store_command` is told of it, each data set fragment is
        offered to :attr:`NodeAssociation.on_data_fragment` (kept in memory if declined), and
        the complete request goes to the association's message queue as pynetdicom would put
        it. A fragment of another message may go to ``on_data_fragment`` as well (a last
        fragment taken is replaced by an empty one, which pynetdicom reads to complete the
        message). PDUs are taken one after the other as long as the next has arrived.

        Anything else (other PDU types, several PDVs in a PDU, other commands, a command in
        several fragments, other states, bound PDU or DIMSE events, a short read) is left in
        the buffer for pynetdicom's own method, a direct request in progress being handed to
        pynetdicom first, so it behaves exactly as without this path.
        """
        sock = self.socket
        assoc = self.assoc
        if (
            not isinstance(assoc, NodeAssociation)
            or not isinstance(sock, BoundedSocket)
            or self.state_machine.current_state != "Sta6"
            or assoc.needs_every_pdu()
        ):
            if isinstance(assoc, NodeAssociation):
                assoc.hand_back_direct()
            super()._read_pdu_data()
            return
        hook = assoc.on_data_fragment
        while True:
            try:
                with sock.peek(6) as header:
                    if len(header) < 6:
                        break
                    pdu_type = header[0]
                    length = int.from_bytes(header[2:6], "big")
                if pdu_type != 0x04 or length < 6 or length + 6 > sock.max_read:
                    break
                pdu = sock.peek(length + 6)
            except (OSError, TimeoutError) as exc:
                self._transport_closed(exc)
                return
            with pdu:
                if len(pdu) < length + 6 or int.from_bytes(pdu[6:10], "big") != length - 4:
                    break  # a short read, or several PDVs
                context_id, control = pdu[10], pdu[11]
                direct = assoc._direct
                if control & 0x01:  # a command fragment
                    if direct is not None or not control & 0x02:
                        break
                    with pdu[12:] as command:
                        if not self._start_direct(assoc, context_id, command):
                            break
                    sock.consume(length + 6)
                elif direct is not None:
                    last = bool(control & 0x02)
                    with pdu[12:] as fragment:
                        if hook is None or not hook(assoc, context_id, fragment, last):
                            direct.data.write(fragment)
                    sock.consume(length + 6)
                    if last:
                        assoc._direct = None
                        assoc.complete_direct(direct)
                        return
                else:
                    if hook is None:
                        break
                    last = bool(control & 0x02)
                    with pdu[12:] as fragment:
                        taken = hook(assoc, context_id, fragment, last)
                    if not taken:
                        break
                    if last:  # pynetdicom completes the message with an empty last fragment
                        sock.consume(length - 6)
                        sock.overwrite(
                            0,
                            _EMPTY_PDATA_HEADER + _EMPTY_PDV_LENGTH + bytes((context_id, control)),
                        )
                        break
                    sock.consume(length + 6)
            if self._kill_thread or not self.to_provider_queue.empty() or not sock.ready:
                return  # back to the reactor: the next PDU has not arrived, or work waits
        assoc.hand_back_direct()
        super()._read_pdu_data()

    def _start_direct(self, assoc: NodeAssociation, context_id: int, command: memoryview) -> bool:
        """Begin a :class:`DirectStore` if ``command`` is a plain C-STORE-RQ that nothing else
        waits for; False (nothing done) otherwise."""
        callback = assoc.on_store_command
        requests = assoc.dimse.msg_queue
        if (
            callback is None
            or assoc.dimse.message is not None
            or pynetdicom_config.STORE_RECV_CHUNKED_DATASET
            or not assoc.is_established
            or context_id not in assoc._accepted_cx
        ):
            return False
        with requests.mutex:
            if requests.unfinished_tasks:  # requests wait: this one queues behind them
                return False
        parsed = parse_c_store_rq(command)
        if parsed is None:
            return False
        message_id, sop_class, sop_instance, priority = parsed
        direct = DirectStore(
            context_id, message_id, sop_class, sop_instance, priority, bytes(command)
        )
        assoc._direct = direct
        try:
            callback(assoc, direct)
        except Exception:
            LOGGER.exception("C-STORE command callback failed")
        return True

    def _transport_closed(self, exc: BaseException) -> None:
        """What pynetdicom does when a PDU cannot be read: Evt17."""
        LOGGER.error("connection closed before the entire PDU was received: %s", exc)
        self.event_queue.put("Evt17")

    def _abort_on_error(self, exc: Exception) -> None:
        if isinstance(exc, PDUTooLongError):
            LOGGER.warning("association aborted: %s", exc)
        else:
            LOGGER.error("association aborted after an error in the upper layer: %s", exc)
            LOGGER.debug("upper layer error", exc_info=exc)
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        sock = self.socket
        try:
            if sock is not None:
                sock.send(abort_pdu.encode())
        except OSError:
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


@dataclass(eq=False)
class DirectStore:
    """A C-STORE request whose data set the DUL thread receives itself (see
    :meth:`NodeDUL._read_pdu_data`): its command, read without pydicom, and the data set
    fragments no callback took."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    command: bytes
    """The encoded command set, as received."""
    data: BytesIO = field(default_factory=BytesIO)


_US: Final[struct.Struct] = struct.Struct("<H")
_ELEMENT_HEAD: Final[struct.Struct] = struct.Struct("<HHI")


def parse_c_store_rq(command: bytes | memoryview) -> tuple[int, str, str, int] | None:
    """Message ID, SOP Class UID, SOP Instance UID and priority of a plain C-STORE-RQ command
    set (Implicit VR Little Endian, exactly the seven elements of :data:`_C_STORE_RQ_TAGS`,
    values of the expected lengths, valid UIDs); ``None`` for anything else."""
    values: dict[int, bytes] = {}
    position = 0
    size = len(command)
    previous = -1
    while position < size:
        if position + 8 > size:
            return None
        group, element, length = _ELEMENT_HEAD.unpack_from(command, position)
        tag = group << 16 | element
        position += 8
        if tag <= previous or tag not in _C_STORE_RQ_TAGS or position + length > size:
            return None
        values[tag] = bytes(command[position : position + length])
        position += length
        previous = tag
    if len(values) != len(_C_STORE_RQ_TAGS):
        return None
    if len(values[0x00000000]) != 4 or any(
        len(values[tag]) != 2 for tag in (0x00000100, 0x00000110, 0x00000700, 0x00000800)
    ):
        return None
    (command_field,) = _US.unpack(values[0x00000100])
    (data_set_type,) = _US.unpack(values[0x00000800])
    (message_id,) = _US.unpack(values[0x00000110])
    (priority,) = _US.unpack(values[0x00000700])
    if command_field != 0x0001 or data_set_type == 0x0101 or priority not in (0, 1, 2):
        return None
    sop_class = raw_text(values[0x00000002])
    sop_instance = raw_text(values[0x00001000])
    if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
        return None
    return message_id, sop_class, sop_instance, priority


_DIRECT_BLOCKERS: Final[tuple[Any, ...]] = (
    evt.EVT_DATA_RECV,
    evt.EVT_DATA_SENT,
    evt.EVT_PDU_RECV,
    evt.EVT_PDU_SENT,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_FSM_TRANSITION,
)
"""Events whose handlers need pynetdicom's own handling of every PDU and message."""


class _InlineStoreQueue(queue.Queue[Any]):
    """pynetdicom's queue of received DIMSE requests, serving C-STORE requests at once.

    pynetdicom puts each complete request here from the DUL thread, for the association's
    thread to serve. A C-STORE request that finds the queue empty and nothing being served
    (``unfinished_tasks`` is 0: the association's reactor calls ``task_done`` only after
    serving) is served right away in the DUL thread instead; the C-STORE service waits on
    nothing the DUL thread would have to deliver, so this cannot deadlock, and requests are
    still served in the order they arrived.
    """

    def __init__(self, assoc: NodeAssociation) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, primitive = item
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is None
            and self._assoc.is_established
        ):
            with self.mutex:
                idle = self.unfinished_tasks == 0
            if idle:
                self._assoc._serve_request(primitive, context_id)
                return
        super().put(item, block, timeout)


class NodeAssociation(Association):
    """An acceptor association with an event-driven reactor and an end-of-life callback."""

    on_end: Callable[[Association], None] | None = None
    """Called once when the association's thread ends, whatever the outcome."""
    on_pdata: Callable[[Association], None] | None = None
    """Called after each P-DATA primitive has been added to the DIMSE message in progress
    (in the upper layer's thread), e.g. to write a C-STORE data set while it arrives."""
    on_data_fragment: Callable[[Association, int, memoryview, bool], bool] | None = None
    """Offered each P-DATA-TF PDU holding one data set fragment (the presentation context ID,
    the fragment without its message control header, valid only during the call, and whether
    it is the message's last), in the DUL thread before pynetdicom sees it. Returning ``True``
    takes the fragment: it never reaches the DIMSE message in progress (a last fragment taken
    reaches it empty, completing the message)."""
    on_responded: Callable[[Association], None] | None = None
    """Called (in the thread that served it) after the response to a C-STORE served by
    :meth:`_serve_plain_store` was handed on for sending, for work that need not delay it."""
    on_store_command: Callable[[Association, DirectStore], None] | None = None
    """Told (in the DUL thread) of a C-STORE request received directly (see
    :meth:`NodeDUL._read_pdu_data`) as soon as its command has arrived; without it, every
    request goes through pynetdicom."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._storage_service: StorageServiceClass | None = None
        self._direct: DirectStore | None = None
        self.dul = NodeDUL(self)
        self.dul.artim_timer.timeout = self.acse_timeout
        self.dul._idle_timer.timeout = self.network_timeout
        dimse = self.dimse
        receive = dimse.receive_primitive

        def receive_primitive(primitive: Any) -> None:
            if dimse.message is None:
                dimse.message = _new_message()
            receive(primitive)
            hook = self.on_pdata
            if hook is not None:
                try:
                    hook(self)
                except Exception:
                    LOGGER.exception("P-DATA callback failed")

        self.dimse.receive_primitive = receive_primitive  # type: ignore[method-assign]
        self.dimse.msg_queue = _InlineStoreQueue(self)
        send_msg = self.dimse.send_msg

        def send_message(primitive: Any, context_id: int) -> None:
            encoded = encode_c_store_rsp(primitive)
            peer_max = self.dimse.maximum_pdu_size
            if (
                encoded is None
                or (peer_max and len(encoded) + 7 > peer_max)
                or self._handlers.get(evt.EVT_DIMSE_SENT)
            ):
                send_msg(primitive, context_id)
                return
            dul = self.dul
            sock = dul.socket
            if (
                threading.current_thread() is dul
                and sock is not None
                and dul.to_provider_queue.empty()
                and dul.state_machine.current_state == "Sta6"
                and not self.needs_every_pdu()
            ):
                # what pynetdicom's DT-1 would send for this P-DATA, without the round
                # through the reactor's queue and state machine (Sta6 stays Sta6)
                sock.send(
                    b"\x04\x00"
                    + struct.pack(">IIB", len(encoded) + 6, len(encoded) + 2, context_id)
                    + b"\x03"
                    + encoded
                )
                return
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
            dul.send_pdu(pdata)

        self.dimse.send_msg = send_message  # type: ignore[method-assign]

    def _bind_defaults(self) -> None:
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))

    def needs_every_pdu(self) -> bool:
        """True if handlers are bound to events that pynetdicom raises per PDU or message."""
        handlers = self._handlers
        return any(handlers.get(event) for event in _DIRECT_BLOCKERS)

    @property
    def message_in_progress(self) -> Any:
        """The C-STORE received directly, else pynetdicom's DIMSE message in progress."""
        direct = self._direct
        return direct if direct is not None else self.dimse.message

    def complete_direct(self, direct: DirectStore) -> None:
        """Queue the request of a complete :class:`DirectStore`, as pynetdicom queues a
        decoded message (a C-STORE is served at once when nothing else waits)."""
        primitive = PlainCStore()
        primitive.MessageID = direct.message_id
        # validated by parse_c_store_rq: pynetdicom's setters would validate them again
        primitive._affected_sop_class_uid = UID(direct.sop_class_uid)
        primitive._affected_sop_instance_uid = UID(direct.sop_instance_uid)
        primitive.Priority = direct.priority
        primitive.DataSet = direct.data
        primitive._context_id = direct.context_id
        self.dimse.msg_queue.put((direct.context_id, primitive))

    def hand_back_direct(self) -> None:
        """Give a :class:`DirectStore` in progress to pynetdicom as its DIMSE message in
        progress (its command and the fragments kept in memory), to be completed there."""
        direct, self._direct = self._direct, None
        if direct is None:
            return
        message = _new_message()
        command = P_DATA()
        command.presentation_data_value_list.append((direct.context_id, b"\x03" + direct.command))
        message.decode_msg(command, self)
        cast(BytesIO, message.data_set).write(direct.data.getbuffer())
        self.dimse.message = message

    def _serve_request(self, msg: Any, context_id: int) -> None:
        if isinstance(msg, PlainCStore) and self._serve_plain_store(msg, context_id):
            return
        super()._serve_request(msg, context_id)

    def _serve_plain_store(self, request: PlainCStore, context_id: int) -> bool:
        """Serve a plain C-STORE request as pynetdicom's Storage SCP does, without its
        per-request machinery (service class lookup and instance, UID setters validating the
        UIDs again, event dispatch): the ``EVT_C_STORE`` handler, then the response.

        Returns False, having done nothing, for anything pynetdicom would treat otherwise.
        """
        class_uid = request.AffectedSOPClassUID
        context = self._accepted_cx.get(context_id)
        handler, args = cast(
            tuple[Callable[..., Any] | None, list[Any] | None],
            self.get_handlers(evt.EVT_C_STORE),
        )
        if (
            self._sent_release
            or context is None
            or handler is None
            or class_uid is None
            or request._dataset_file is not None
            or pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE
            or class_uid in self.acceptor.accepted_common_extended
            or uid_to_service_class(class_uid) is not StorageServiceClass
        ):
            return False
        response = C_STORE()
        response.MessageID = request.MessageID
        response.MessageIDBeingRespondedTo = request.MessageID
        response._affected_sop_instance_uid = request.AffectedSOPInstanceUID
        response._affected_sop_class_uid = class_uid
        event = evt.Event(self, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        self.dimse.cancel_req = {}
        self._is_paused = True
        try:
            status = handler(event, *args) if args is not None else handler(event)
        except Exception as exc:
            LOGGER.error("exception in the C-STORE handler: %s", type(exc).__name__)
            LOGGER.debug("C-STORE handler error", exc_info=exc)
            status = 0xC211
        finally:
            self._is_paused = False
            self.dimse.cancel_req = {}
        if not self.is_established:  # the handler aborted or released
            return True
        service = self._storage_service
        if service is None:
            service = self._storage_service = StorageServiceClass(self)
        response = service.validate_status(status, response)
        self.dimse.send_msg(response, context_id)
        callback = self.on_responded
        if callback is not None:
            try:
                callback(self)
            except Exception:
                LOGGER.exception("response callback failed")
        return True

    def run(self) -> None:
        try:
            super().run()
        finally:
            server = self._server
            if isinstance(server, NodeAssociationServer):
                server.connection_ended()
            callback = self.on_end
            if callback is not None:
                try:
                    callback(self)
                except Exception:
                    LOGGER.exception("association end callback failed")

    def run_reactor(self) -> None:
        """pynetdicom's acceptor start-up, but giving up as soon as the connection fails.

        pynetdicom waits the whole ACSE timeout for an A-ASSOCIATE-RQ even when the peer has
        already gone or was cut off (a PDU over the limit, a stalled read); meanwhile the
        connection counts against the association limit.
        """
        if not self.is_acceptor:
            super().run_reactor()
            return
        if not self._started_dul:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()
        primitive = self._wait_for_request()
        sock = cast(AssociationSocket, self.dul.socket)
        if primitive is None:
            self.kill()
            if self._server and sock.socket:
                self._server.shutdown_request(sock.socket)
            return
        self.requestor.primitive = primitive
        evt.trigger(self, evt.EVT_REQUESTED, {})
        if not self.is_aborted and not self.is_rejected:
            self.acse.negotiate_association()
        if self.is_established:
            self._run_reactor()
        if self._server and sock.socket:
            self._server.shutdown_request(sock.socket)

    def _wait_for_request(self) -> Any:
        deadline = None if self.acse_timeout is None else time.monotonic() + self.acse_timeout
        sock = self.dul.socket
        while True:
            primitive = self.dul.receive_pdu(wait=True, timeout=0.1)
            if primitive is not None:
                return primitive
            if isinstance(sock, BoundedSocket) and sock.failed:
                return None
            if not self.dul.is_alive() or (deadline is not None and time.monotonic() > deadline):
                return None

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, waiting on the message queue instead of sleeping."""
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            requests = self.dimse.msg_queue
            try:
                context_id, msg = requests.get(timeout=0.005)
            except queue.Empty:
                msg = None
            else:
                try:
                    if msg:
                        self._serve_request(msg, cast(int, context_id))
                finally:
                    requests.task_done()

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.warning("association aborted: network timeout (no traffic)")
                self.abort()
                self.kill()
                return


_C_STORE_RQ_TAGS: Final[frozenset[int]] = frozenset(
    (0x00000000, 0x00000002, 0x00000100, 0x00000110, 0x00000700, 0x00000800, 0x00001000)
)
"""Command elements of a plain C-STORE-RQ (no C-MOVE originator)."""


def _message_to_primitive(message: DIMSEMessage) -> Any:
    """The DIMSE primitive of a complete message; C-STORE requests without pydicom.

    pynetdicom converts every command element through pydicom (value conversion and
    validation of each element, once per received instance). A plain C-STORE-RQ has seven
    elements of known form, read here from the raw command set; anything else, or any value
    out of the ordinary, takes pynetdicom's own conversion.
    """
    primitive = c_store_rq_primitive(message)
    if primitive is not None:
        return primitive
    return type(message).message_to_primitive(message)


def _new_message() -> DIMSEMessage:
    """An empty DIMSE message that becomes its primitive by :func:`_message_to_primitive`."""
    message = DIMSEMessage()
    # an instance attribute: it stays when decoding sets the message's class
    message.message_to_primitive = functools.partial(  # type: ignore[method-assign]
        _message_to_primitive, message
    )
    return message


class PlainCStore(C_STORE):
    """A C-STORE request built by :func:`c_store_rq_primitive` (served by
    :meth:`NodeAssociation._serve_plain_store`)."""


def c_store_rq_primitive(message: DIMSEMessage) -> C_STORE | None:
    """The C-STORE primitive of a complete C-STORE-RQ message, or ``None`` (see above)."""
    if not isinstance(message, C_STORE_RQ):
        return None
    command = message.command_set
    tags = {int(tag) for tag in command.keys()}  # noqa: SIM118 (iterating converts values)
    if tags != _C_STORE_RQ_TAGS:
        return None
    message_id = _us_value(command.get_item(0x00000110))
    priority = _us_value(command.get_item(0x00000700))
    if message_id is None or priority not in (0, 1, 2):
        return None
    sop_class = raw_text(getattr(command.get_item(0x00000002), "value", None))
    sop_instance = raw_text(getattr(command.get_item(0x00001000), "value", None))
    if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
        return None
    primitive = PlainCStore()
    primitive.MessageID = message_id
    # checked above: pynetdicom's setters would validate them again with pydicom
    primitive._affected_sop_class_uid = UID(sop_class)
    primitive._affected_sop_instance_uid = UID(sop_instance)
    primitive.Priority = priority
    primitive.DataSet = message.data_set
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    return primitive


def _us_value(element: Any) -> int | None:
    """An unsigned short command value, raw (2 bytes) or already converted by pynetdicom."""
    value = getattr(element, "value", None)
    if isinstance(value, bytes):
        return int.from_bytes(value, "little") if len(value) == 2 else None
    return value if isinstance(value, int) and 0 <= value <= 0xFFFF else None


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_c_store_rsp(primitive: Any) -> bytes | None:
    """The command set of a C-STORE-RSP, Implicit VR Little Endian (PS3.7 9.3.1.2).

    The response is sent once per stored instance, so it is encoded directly instead of via
    a pydicom Dataset; the test suite checks the bytes against pynetdicom's own encoding.
    Returns ``None`` for anything but a plain C-STORE response (with at most an Error
    Comment), which then takes pynetdicom's general path.
    """
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.OffendingElement is not None or primitive.Status is None:
        return None
    sop_class = primitive.AffectedSOPClassUID
    sop_instance = primitive.AffectedSOPInstanceUID
    if not sop_class or not sop_instance:
        return None
    try:
        parts = [
            _implicit(0x0002, _even(str(sop_class), b"\x00")),
            _implicit(0x0100, struct.pack("<H", 0x8001)),
            _implicit(0x0120, struct.pack("<H", int(primitive.MessageIDBeingRespondedTo))),
            _implicit(0x0800, struct.pack("<H", 0x0101)),
            _implicit(0x0900, struct.pack("<H", int(primitive.Status))),
        ]
        if primitive.ErrorComment:
            parts.append(_implicit(0x0902, _even(str(primitive.ErrorComment), b" ")))
        parts.append(_implicit(0x1000, _even(str(sop_instance), b"\x00")))
    except (UnicodeEncodeError, struct.error):
        return None
    body = b"".join(parts)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


class NodeRequestHandler(RequestHandler):
    """Creates :class:`NodeAssociation` instances with a :class:`BoundedSocket`."""

    server: NodeAssociationServer

    def _create_association(self) -> Association:
        server = self.server
        request = cast(socket.socket, self.request)
        enable_nodelay(request)
        assoc = NodeAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        assoc.daemon = True
        assoc.on_end = server.on_association_end
        assoc.on_pdata = server.on_pdata
        assoc.on_data_fragment = server.on_data_fragment
        assoc.on_store_command = server.on_store_command
        assoc.on_responded = server.on_responded
        sock = BoundedSocket(
            assoc,
            request,
            max_pdu_length=server.max_pdu_length,
            read_timeout=self.ae.network_timeout,
        )
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = server.copy_contexts()
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                handler, args = cast(tuple[Callable[..., Any], Any], handlers)
                assoc.bind(event, handler, args)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Callable[..., Any], Any]], handlers):
                    assoc.bind(event, handler, args)
        return assoc


class NodeAssociationServer(ThreadedAssociationServer):
    """A threaded association server with a connection cap and no per-message log handlers."""

    daemon_threads = True

    def __init__(
        self,
        *args: Any,
        max_pdu_length: int,
        max_connections: int,
        on_association_end: Callable[[Association], None] | None = None,
        on_pdata: Callable[[Association], None] | None = None,
        on_data_fragment: Callable[[Association, int, memoryview, bool], bool] | None = None,
        on_store_command: Callable[[Association, DirectStore], None] | None = None,
        on_responded: Callable[[Association], None] | None = None,
        listen: bool = True,
        **kwargs: Any,
    ) -> None:
        self.listen = listen
        """False: the server neither binds nor listens; it serves connections accepted
        elsewhere (:meth:`process_request`)."""
        self.max_pdu_length = max_pdu_length
        self.max_connections = max_connections
        self.on_association_end = on_association_end
        self.on_pdata = on_pdata
        self.on_data_fragment = on_data_fragment
        self.on_store_command = on_store_command
        self.on_responded = on_responded
        self.on_connection_closed: Callable[[], None] | None = None
        """Called once for every connection this server took that has ended."""
        self._connections = 0
        self._connections_lock = threading.Lock()
        kwargs.setdefault("request_handler", NodeRequestHandler)
        super().__init__(*args, **kwargs)

    def _bind_defaults(self) -> None:
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))

    def server_bind(self) -> None:
        if self.listen:
            super().server_bind()

    def server_activate(self) -> None:
        if self.listen:
            super().server_activate()

    def copy_contexts(self) -> list[Any]:
        """The supported presentation contexts for one association.

        Negotiation only reads them (pynetdicom builds new contexts for its answer), so the
        list is copied but the contexts are shared; pynetdicom's own deep copy of ~170
        contexts with 18 transfer syntaxes each would cost ~0.1 s per association.
        """
        return list(self.contexts)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            over = self._connections >= self.max_connections
            if not over:
                self._connections += 1
        if over:
            LOGGER.warning(
                "connection from %s closed: %d connections open (the limit)",
                client_address[0],
                self.max_connections,
            )
            self.shutdown_request(request)
            if self.on_connection_closed is not None:
                self.on_connection_closed()
            return
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOGGER.exception("setting up the connection from %s failed", client_address[0])

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        started = False
        try:
            self.finish_request(request, client_address)
            started = True
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        finally:
            if not started:
                self.connection_ended()

    def connection_ended(self) -> None:
        with self._connections_lock:
            self._connections = max(0, self._connections - 1)
        if self.on_connection_closed is not None:
            self.on_connection_closed()

    @property
    def open_connections(self) -> int:
        with self._connections_lock:
            return self._connections
