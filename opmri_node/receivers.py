"""Receiving processes: concurrent associations on several CPU cores.

With ``node.receive_processes`` above 1 the node's main process only listens: it accepts each
connection, counts the node's associations and hands the connected socket (``SCM_RIGHTS``
over a Unix socket pair) to the receiving process with the fewest connections. Each receiving
process runs the same :class:`~opmri_node.scp.Receiver` as the single-process node, with its
own state database connection and its own incoming files in the shared spool, so
every instance is durable and recorded before its 0x0000 exactly as before; dcmtk's
``storescp --fork`` spreads associations over processes the same way.

* The association limit stays the node's: a connection beyond ``node.max_associations`` is
  handed over marked, and its association request is rejected (transient, local limit
  exceeded) with an audit line.
* A receiving process dies with the node (``PR_SET_PDEATHSIG``), so ``kill -9`` of the node
  leaves what a single process leaves: committed files that the next start replays.
* A receiving process that dies on its own is replaced; its incoming files (named after its
  process id) are replayed into the spool first, and its instances are in the state database.
* Stopping the node closes the socket pairs: each process finishes its associations as the
  single-process receiver does, flushes the spool (its renames) and exits.

Run as ``python -m opmri_node.receivers FD`` by :class:`ReceiverPool` only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from opmri_node.config import NodeConfig

LOGGER = logging.getLogger(__name__)

READY: Final[bytes] = b"R"
CLOSED: Final[bytes] = b"E"
ASSOCIATION: Final[bytes] = b"A"
"""``A<outcome>|<reason>``: an association ended (counted in the node's metrics)."""
HAND_OVER: Final[bytes] = b"C"
HAND_OVER_OVER_LIMIT: Final[bytes] = b"L"
CONFIG_ENV: Final[str] = "OPMRI_RECEIVER_CONFIG"
_PR_SET_PDEATHSIG: Final[int] = 1


@dataclass
class _Child:
    index: int
    channel: socket.socket
    process: subprocess.Popen[bytes]
    connections: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class ReceiverPool:
    """The listening socket of the node and its receiving processes."""

    def __init__(self, config: NodeConfig, processes: int) -> None:
        if processes < 1:
            raise ValueError('Argument "processes" must be at least 1')
        self.config = config
        self.processes = processes
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self.crashed = 0
        """Receiving processes that died on their own (and were replaced)."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> tuple[str, int]:
        """Start the receiving processes, then listen; returns the bound (host, port)."""
        for index in range(self.processes):
            self._children.append(self._spawn(index))
        deadline = time.monotonic() + timeout
        reader = threading.Thread(target=self._read_children, name="receivers", daemon=True)
        reader.start()
        self._threads.append(reader)
        for child in self._children:
            if not child.ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise OSError("a receiving process did not start in time")
        node = self.config.node
        family = socket.AF_INET6 if ":" in node.bind else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((node.bind, node.port))
            listener.listen(64)
        except OSError:
            listener.close()
            self.stop()
            raise
        self._listener = listener
        acceptor = threading.Thread(target=self._accept, name="dicom-listener", daemon=True)
        acceptor.start()
        self._threads.append(acceptor)
        host, port = listener.getsockname()[:2]
        LOGGER.info(
            "listening as %s on %s:%d (max %d associations, %d receiving processes)",
            node.ae_title, host, port, node.max_associations, self.processes,
        )
        return str(host), int(port)

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the listener is not running")
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def listening(self) -> bool:
        listener = self._listener
        return (
            listener is not None
            and listener.fileno() >= 0
            and all(child.process.poll() is None for child in self._children)
        )

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop accepting; let every receiving process finish and exit.

        Returns:
            ``True`` if every process ended cleanly (its associations ended, spool
            flushed) within ``timeout``.
        """
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        deadline = time.monotonic() + timeout
        clean = True
        with self._lock:
            children = list(self._children)
        for child in children:
            with contextlib.suppress(OSError):
                child.channel.shutdown(socket.SHUT_WR)
        for child in children:
            try:
                code = child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                code = child.process.wait(10)
            clean = clean and code == 0
            child.channel.close()
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()
        return clean and self.crashed == 0

    # -- main process ------------------------------------------------------------------------

    def _spawn(self, index: int) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, CONFIG_ENV: self.config.model_dump_json()}
        level = logging.getLogger().getEffectiveLevel()
        env["OPMRI_RECEIVER_LOG_LEVEL"] = str(level)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "opmri_node.receivers", str(theirs.fileno()), str(index)],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        return _Child(index=index, channel=ours, process=process)

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                events = selector.select(timeout=1.0)
                if self._stop.is_set():
                    return
                if not any(key.fileobj is listener for key, _ in events):
                    continue
                try:
                    conn, address = listener.accept()
                except OSError:
                    continue
                with conn:
                    with contextlib.suppress(OSError):
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._hand_over(conn, address)
        finally:
            selector.close()

    def _hand_over(self, conn: socket.socket, address: tuple[str, int]) -> None:
        limit = self.config.node.max_associations
        with self._lock:
            alive = [c for c in self._children if c.process.poll() is None and c.ready.is_set()]
            if not alive:
                LOGGER.error("connection from %s closed: no receiving process", address[0])
                return
            total = sum(c.connections for c in self._children)
            child = min(alive, key=lambda c: (c.connections, c.index))
            child.connections += 1
        tag = HAND_OVER_OVER_LIMIT if total >= limit else HAND_OVER
        message = tag + f"{address[0]}|{address[1]}".encode("ascii", "replace")
        try:
            with child.send_lock:
                socket.send_fds(child.channel, [message], [conn.fileno()])
        except OSError as exc:
            with self._lock:
                child.connections = max(0, child.connections - 1)
            LOGGER.error("connection from %s closed: hand-over failed (%s)", address[0], exc)

    def _read_children(self) -> None:
        selector = selectors.DefaultSelector()
        with self._lock:
            for child in self._children:
                selector.register(child.channel, selectors.EVENT_READ, child)
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while True:
                for key, _ in selector.select(timeout=1.0):
                    child = key.data
                    if child is None:
                        if self._stop.is_set():
                            return
                        continue
                    try:
                        message = child.channel.recv(256)
                    except OSError:
                        message = b""
                    if message == READY:
                        child.ready.set()
                    elif message == CLOSED:
                        with self._lock:
                            child.connections = max(0, child.connections - 1)
                    elif message.startswith(ASSOCIATION):
                        from opmri_node.monitoring import record_association

                        outcome, _, reason = message[1:].decode("utf-8", "replace").partition("|")
                        record_association(outcome, reason)
                    elif not message:
                        selector.unregister(child.channel)
                        if self._stop.is_set():
                            continue
                        replacement = self._replace(child)
                        if replacement is not None:
                            selector.register(replacement.channel, selectors.EVENT_READ,
                                              replacement)
                if self._stop.is_set() and not selector.get_map():
                    return
        finally:
            selector.close()

    def _replace(self, child: _Child) -> _Child | None:
        """A receiving process died: recover its journal and start another one."""
        code = child.process.wait()
        self.crashed += 1
        LOGGER.error("receiving process %d (pid %d) ended with %s; replacing it",
                     child.index, child.process.pid, code)
        child.channel.close()
        from opmri_node.journal import Journal
        from opmri_node.service import UNFINISHED_COMMIT, open_spool

        try:
            stats = Journal(open_spool(self.config)).replay(owner=str(child.process.pid))
            if stats.segments or stats.committed:
                LOGGER.warning("replayed the receive journal of the process: %d committed "
                               "instance(s), %d restored", stats.committed, stats.restored)
            for unfinished in stats.unfinished:
                LOGGER.warning(UNFINISHED_COMMIT, unfinished)
        except OSError as exc:
            LOGGER.error("replaying the journal of the process failed: %s", exc)
        if self._stop.is_set():
            return None
        replacement = self._spawn(child.index)
        with self._lock:
            self._children[self._children.index(child)] = replacement
        return replacement


# -- receiving process -----------------------------------------------------------------------


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def child_main(channel_fd: int, index: int) -> int:
    """Serve the connections handed over on ``channel_fd`` until it is closed."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the node died before PR_SET_PDEATHSIG took effect
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops us by closing the channel
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    level = int(os.environ.get("OPMRI_RECEIVER_LOG_LEVEL", str(logging.WARNING)))
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    channel = socket.socket(fileno=channel_fd)
    config = NodeConfig.model_validate_json(os.environ[CONFIG_ENV])
    import pydicom.config

    # Values are stored as received; checking them while reading headers only costs time
    # (and pydicom's warnings quote the values).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

    from opmri_node.journal import Journal
    from opmri_node.scp import AUDIT, Receiver
    from opmri_node.service import AUDIT_LOG_NAME, open_spool, state_db_path
    from opmri_node.state import StateDB

    for name in ("pynetdicom", "pynetdicom.utils"):
        if level > logging.DEBUG:
            logging.getLogger(name).setLevel(logging.WARNING if name == "pynetdicom"
                                             else logging.ERROR)
    audit = logging.FileHandler(Path(config.node.data_dir) / AUDIT_LOG_NAME, encoding="utf-8")
    audit.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    audit.setLevel(logging.INFO)
    AUDIT.addHandler(audit)
    if AUDIT.getEffectiveLevel() > logging.INFO:
        AUDIT.setLevel(logging.INFO)

    send_lock = threading.Lock()

    def closed() -> None:
        with send_lock, contextlib.suppress(OSError):
            channel.send(CLOSED)

    state = StateDB(state_db_path(config))
    spool = open_spool(config)
    receiver = Receiver(config, state, spool, Journal(spool, owner=str(os.getpid())))
    def recorded(outcome: str, reason: str) -> None:
        with send_lock, contextlib.suppress(OSError):
            channel.send(ASSOCIATION + f"{outcome}|{reason}".encode()[:200])

    receiver.on_association_recorded = recorded
    receiver.start_handoff(closed)
    with send_lock:
        channel.send(READY)
    try:
        while True:
            try:
                message, fds, _flags, _address = socket.recv_fds(channel, 512, 1)
            except InterruptedError:
                continue
            if not message:
                for fd in fds:
                    os.close(fd)
                break
            if not fds:
                continue
            sock = socket.socket(fileno=fds[0])
            host, _, port = message[1:].decode("ascii", "replace").rpartition("|")
            try:
                receiver.serve_connection(
                    sock, (host, int(port or 0)),
                    over_limit=message[:1] == HAND_OVER_OVER_LIMIT,
                )
            except Exception:
                LOGGER.exception("serving a connection failed")
                sock.close()
                closed()
    finally:
        clean = receiver.stop()
        state.close()
        AUDIT.removeHandler(audit)
        audit.close()
        channel.close()
    return 0 if clean else 3


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1]), int(sys.argv[2])))
