"""The receive journal: an instance is durable after two short flushes, its bytes written once.

Writing a file durably under its final name takes a flush of the file and one of its folder
after the rename. The listener instead writes each instance, while it arrives, into an empty
file taken from an :class:`~opmri_node.spool.IncomingPool` (its name in ``spool/incoming`` is
durable already) and, once the instance is accepted:

1. flushes the file (``fdatasync``: its bytes and size) and, at the same time (Linux native
   AIO; one after the other where that is missing), appends a *commit frame* to the
   association's journal segment (``spool/journal/<uuid>.seg``) naming the incoming file, the
   spool path it goes to, its size and CRC-32, and flushes the segment (``fdatasync``);
2. once both flushes have ended, renames the file into its study folder, unflushed, records
   it in the state database and acknowledges it.

So an acknowledged instance is, whatever happens afterwards, in a flushed file named by a
flushed commit frame: at its spool path or, if the rename did not reach the disk, still in
``incoming/``. A stop between the two flushes may leave a commit whose file is not complete;
its size and CRC-32 show that, and it had not been acknowledged.

A segment is *retired* when its association ends or the instances it commits pass a size
limit. The :class:`Checkpointer` thread then flushes the file system holding the spool
(``syncfs``, one flush for all the renames and folders) and deletes the segment. At start-up,
:meth:`Journal.replay` moves back into place every committed instance of a segment left over (a
crash, ``kill -9`` or power failure before its checkpoint) that is not at its spool path, then
deletes the segment; incoming files without a commit (never acknowledged) are removed
afterwards. The spool stays the source of truth: after replay it holds every acknowledged
instance, and the state database is re-indexed from it.

Segment format: frames of a 20-byte header (``OPJ2``, kind, 3 zero bytes, record number as
uint32, payload length as uint64, little endian) and a payload. The only kind is ``COMMIT``:
file size uint64, CRC-32 of the file uint32, CRC-32 of the payload's other fields uint32,
length of the incoming file's name uint16, that name and the spool path, both UTF-8. Replay
stops at the first frame that is incomplete or malformed (the unflushed tail of a segment).
Segments of the first format (``OPJ1``, which carried the instances' bytes as well) are still
replayed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import platform
import queue
import struct
import sys
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from opmri_node.spool import IncomingFile, IncomingPool, Spool, fsync_dir, is_spool_path

LOGGER = logging.getLogger(__name__)

MAGIC: Final[bytes] = b"OPJ2"
MAGIC_V1: Final[bytes] = b"OPJ1"
_FRAME: Final[struct.Struct] = struct.Struct("<4sB3xIQ")
_COMMIT: Final[struct.Struct] = struct.Struct("<QIIH")
_COMMIT_V1: Final[struct.Struct] = struct.Struct("<QII")
BEGIN: Final[int] = 1
DATA: Final[int] = 2
COMMIT: Final[int] = 3
SEGMENT_SUFFIX: Final[str] = ".seg"
SEGMENT_LIMIT: Final[int] = 256 * 1024 * 1024
"""A segment is retired (and a new one started) once it commits instances of this many bytes."""
_MAX_PATH: Final[int] = 4096


class JournalError(OSError):
    """The journal cannot be written."""


def encode_commit(record: int, incoming_name: str, relative: str, size: int, crc: int) -> bytes:
    """A commit frame: the instance in ``incoming/<incoming_name>`` goes to ``relative``."""
    name = incoming_name.encode("utf-8")
    names = name + relative.encode("utf-8")
    check = zlib.crc32(struct.pack("<QIH", size, crc, len(name)) + names)
    payload = _COMMIT.pack(size, crc, check, len(name)) + names
    return _FRAME.pack(MAGIC, COMMIT, record, len(payload)) + payload


@dataclass(frozen=True)
class Commit:
    """A commit frame read back from a segment."""

    incoming_name: str
    relative: str
    size: int
    crc: int


def read_commits(path: Path) -> Iterator[Commit]:
    """The commit frames of a segment (of the current format) up to its first bad frame."""
    with path.open("rb") as fh:
        while True:
            head = fh.read(_FRAME.size)
            if len(head) < _FRAME.size:
                return
            magic, kind, _record, length = _FRAME.unpack(head)
            if magic != MAGIC or kind != COMMIT or not _COMMIT.size <= length <= (
                _COMMIT.size + 2 * _MAX_PATH
            ):
                return
            payload = fh.read(length)
            if len(payload) < length:
                return
            size, crc, check, name_length = _COMMIT.unpack_from(payload)
            names = payload[_COMMIT.size :]
            fields = struct.pack("<QIH", size, crc, name_length)
            if zlib.crc32(fields + names) != check or name_length > len(names):
                return
            yield Commit(
                names[:name_length].decode("utf-8", "replace"),
                names[name_length:].decode("utf-8", "replace"),
                size,
                crc,
            )


def segment_format(path: Path) -> bytes:
    """The magic of a segment's first frame (empty for an empty or unreadable segment)."""
    try:
        with path.open("rb") as fh:
            return fh.read(len(MAGIC))
    except OSError:
        return b""


class Segment:
    """An open journal segment. Thread-safe: commits of several instances may interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._lock = threading.Lock()
        self._next_id = 1
        self.size = 0
        self.covered = 0
        """Bytes of the instances committed here."""
        self.active = 0
        """Instances begun and not yet placed or abandoned."""
        self.committed = 0
        self.retired = False
        self._idle = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._parallel: ParallelFlush | None = None

    def begin(self) -> None:
        """An instance that may be committed here has begun."""
        with self._lock:
            if self._fd is None:
                raise JournalError("the journal segment is closed")
            self.active += 1

    def commit(self, incoming_name: str, relative: str, size: int, crc: int) -> None:
        """Append a commit frame and flush the segment (``fdatasync``).

        The incoming file must be flushed already: replay trusts a committed file whose CRC
        matches.
        """
        with self._lock:
            fd = self._fd
            if fd is None:
                raise JournalError("the journal segment is closed")
            record = self._next_id
            self._next_id += 1
            frame = encode_commit(record, incoming_name, relative, size, crc)
            written = os.write(fd, frame)
            while written < len(frame):
                written += os.write(fd, frame[written:])
            self.size += len(frame)
            self.covered += size
        os.fdatasync(fd)  # outside the lock: other instances may append meanwhile
        with self._lock:
            self.committed += 1

    def commit_file(self, incoming: IncomingFile, relative: str) -> None:
        """Make ``incoming`` durable as the instance at ``relative``: flush the file and a
        commit frame naming it.

        Where the kernel can (Linux native AIO), the file's ``fdatasync`` runs while the
        segment is flushed; both have ended when this returns. A crash between the two may
        leave a flushed commit of a file that is not complete: replay recognises it by its
        size and CRC-32, and it was never acknowledged.
        """
        with self._flush_lock:
            flusher = self._flusher()
            started = flusher is not None and flusher.start(incoming.fileno())
            if not started:
                incoming.sync()
            try:
                self.commit(incoming.basename, relative, incoming.size, incoming.crc)
            finally:
                if started:
                    assert flusher is not None
                    flusher.wait()
        incoming.drop_cache()

    def _flusher(self) -> ParallelFlush | None:
        if self._parallel is None and ParallelFlush.available():
            try:
                self._parallel = ParallelFlush()
            except OSError as exc:
                LOGGER.debug("flushing in parallel is not available: %s", exc)
                ParallelFlush.disable()
        return self._parallel

    def end(self) -> None:
        """An instance begun here was placed or abandoned."""
        with self._lock:
            self.active = max(0, self.active - 1)
            if self.active == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self.active == 0, timeout)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        with self._flush_lock:
            parallel, self._parallel = self._parallel, None
        if parallel is not None:
            parallel.close()


@dataclass
class JournalRecord:
    """One instance being received into an incoming file, to be committed to a segment.

    It holds the segment open (see :meth:`Segment.wait_idle`) until :meth:`end`, which comes
    after the file was moved into place or discarded.
    """

    segment: Segment
    ended: bool = False

    def commit(self, incoming: IncomingFile, relative: str) -> None:
        """Make ``incoming`` durable as the instance at ``relative`` (see
        :meth:`Segment.commit_file`)."""
        self.segment.commit_file(incoming, relative)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.segment.end()


@dataclass
class ReplayStats:
    segments: int = 0
    committed: int = 0
    restored: int = 0
    skipped: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    """Committed spool paths with no complete file, in place or in ``incoming/`` (a stop
    between the file's flush and the commit's, before the instance was acknowledged)."""


class Journal:
    """The segments in ``spool/journal``, the incoming files they commit, and the thread that
    checkpoints them."""

    def __init__(
        self, spool: Spool, *, segment_limit: int = SEGMENT_LIMIT, owner: str | None = None
    ) -> None:
        self.spool = spool
        self.folder = spool.root / "journal"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.segment_limit = segment_limit
        self.owner = owner
        """Prefix of this journal's segment and incoming file names (the receiving process,
        see :mod:`opmri_node.receivers`), so that another process can replay them alone."""
        self.prefix = "" if owner is None else f"{owner}-"
        self.pool = IncomingPool(spool.incoming, self.prefix)
        self.checkpointer = Checkpointer(self)

    def open_segment(self) -> Segment:
        """A new segment, its name already durable in the journal folder."""
        segment = Segment(self.folder / f"{self.prefix}{uuid.uuid4().hex}{SEGMENT_SUFFIX}")
        try:
            fsync_dir(self.folder)
        except OSError:
            segment.close()
            segment.path.unlink(missing_ok=True)
            raise
        return segment

    def open_incoming(self, segment: Segment) -> IncomingFile:
        """An incoming file (with a durable name) for an instance to be committed to
        ``segment``."""
        segment.begin()
        record = JournalRecord(segment)
        try:
            return IncomingFile(self.pool.take(), create=False, checksum=True, ticket=record)
        except BaseException:
            record.end()
            raise

    def retire(self, segment: Segment) -> None:
        """No new records go to ``segment``; checkpoint and delete it once its records end."""
        if segment.retired:
            return
        segment.retired = True
        self.checkpointer.submit(segment)

    def close(self, timeout: float = 30.0) -> bool:
        """Checkpoint the retired segments and delete the unused incoming files."""
        self.pool.close()
        return self.checkpointer.stop(timeout)

    def segments(self, owner: str | None = None) -> list[Path]:
        """Segment files in the folder (of one owner, or all)."""
        prefix = "" if owner is None else f"{owner}-"
        return sorted(
            p for p in self.folder.iterdir()
            if p.name.endswith(SEGMENT_SUFFIX) and p.name.startswith(prefix)
        )

    def replay(self, owner: str | None = None) -> ReplayStats:
        """Move committed instances of left-over segments (of one owner, or all) into place,
        then delete the segments and, for one owner, its incoming files."""
        stats = ReplayStats()
        segments = self.segments(owner)
        for path in segments:
            stats.segments += 1
            if segment_format(path) == MAGIC_V1:
                self._replay_v1(path, stats)
            else:
                self._replay_segment(path, stats)
        if stats.segments:
            sync_filesystem(self.spool.root)
            for path in segments:
                path.unlink(missing_ok=True)
            fsync_dir(self.folder)
        if owner is not None:
            self.spool.clean_incoming(f"{owner}-")
        return stats

    def _replay_segment(self, path: Path, stats: ReplayStats) -> None:
        for commit in read_commits(path):
            stats.committed += 1
            relative = commit.relative
            if not is_spool_path(relative) or not _is_incoming_name(commit.incoming_name):
                stats.skipped.append(relative)
                continue
            target = self.spool.path(relative)
            if _file_crc(target, commit.size) == commit.crc:
                continue
            source = self.spool.incoming / commit.incoming_name
            if _file_crc(source, commit.size) != commit.crc:
                stats.unfinished.append(relative)
                source.unlink(missing_ok=True)
                continue
            folder = target.parent
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(folder.parent)
            os.replace(source, target)
            stats.restored += 1
            LOGGER.info("moved committed spool file %s into place", relative)

    def _replay_v1(self, path: Path, stats: ReplayStats) -> None:
        """Replay a segment of the first format (the instances' bytes in ``DATA`` frames)."""
        extents: dict[int, list[tuple[int, int]]] = {}
        crcs: dict[int, int] = {}
        with path.open("rb") as fh:
            while True:
                head = fh.read(_FRAME.size)
                if len(head) < _FRAME.size:
                    return
                magic, kind, record, length = _FRAME.unpack(head)
                if magic != MAGIC_V1 or kind not in (BEGIN, DATA, COMMIT):
                    return
                start = fh.tell()
                if kind == BEGIN:
                    extents[record] = []
                    crcs[record] = 0
                elif kind == DATA:
                    if record not in extents:
                        return
                    crc = crcs[record]
                    remaining = length
                    while remaining:
                        chunk = fh.read(min(remaining, 1 << 20))
                        if not chunk:
                            return
                        crc = zlib.crc32(chunk, crc)
                        remaining -= len(chunk)
                    crcs[record] = crc
                    extents[record].append((start, length))
                else:
                    if record not in extents or length > _COMMIT_V1.size + _MAX_PATH:
                        return
                    payload = fh.read(length)
                    if len(payload) < length or length < _COMMIT_V1.size:
                        return
                    size, crc, check = _COMMIT_V1.unpack_from(payload)
                    encoded = payload[_COMMIT_V1.size :]
                    if zlib.crc32(struct.pack("<QI", size, crc) + encoded) != check:
                        return
                    parts = extents.pop(record)
                    if crcs.pop(record) != crc or sum(n for _, n in parts) != size:
                        continue  # torn data under a whole commit frame: never acknowledged
                    stats.committed += 1
                    relative = encoded.decode("utf-8", "replace")
                    if not is_spool_path(relative):
                        stats.skipped.append(relative)
                        continue
                    if self._restore_v1(path, parts, relative, size, crc):
                        stats.restored += 1
                    fh.seek(start + length)
                fh.seek(start + length)

    def _restore_v1(
        self, segment: Path, parts: list[tuple[int, int]], relative: str, size: int, crc: int
    ) -> bool:
        """Write the record to its spool path unless an identical file is there already."""
        target = self.spool.path(relative)
        if _file_crc(target, size) == crc:
            return False
        folder = target.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        incoming = self.spool.open_incoming(check_room=False)
        try:
            with segment.open("rb") as fh:
                for offset, length in parts:
                    fh.seek(offset)
                    remaining = length
                    while remaining:
                        chunk = fh.read(min(remaining, 1 << 20))
                        if not chunk:
                            raise JournalError("the journal segment ended inside a record")
                        incoming.write(chunk)
                        remaining -= len(chunk)
            tmp = incoming.finish()
            os.replace(tmp, target)
            fsync_dir(folder)
        except BaseException:
            incoming.discard()
            raise
        LOGGER.info("restored spool file %s from the receive journal", relative)
        return True


def _is_incoming_name(name: str) -> bool:
    """A plain file name in ``incoming/`` (never a path)."""
    return name.endswith(".part") and os.path.basename(name) == name and name not in (".", "..")


def _file_crc(path: Path, size: int) -> int | None:
    try:
        if path.stat().st_size != size:
            return None
        crc = 0
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
        return crc
    except OSError:
        return None


class Checkpointer:
    """Flushes the spool for retired segments, then deletes them (one thread)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._queue: queue.Queue[Segment | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="journal-checkpoint", daemon=True
                )
                self._thread.start()

    def submit(self, segment: Segment) -> None:
        self._queue.put(segment)
        self.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Checkpoint every retired segment, then end the thread; True if all were done."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._queue.put(None)
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        while True:
            segment = self._queue.get()
            if segment is None:
                return
            batch = [segment]
            stop = False
            with contextlib.suppress(queue.Empty):
                while True:
                    more = self._queue.get_nowait()
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
            self._checkpoint(batch)
            if stop:
                return

    def _checkpoint(self, batch: list[Segment]) -> None:
        for segment in batch:
            segment.wait_idle()
            segment.close()
        try:
            sync_filesystem(self.journal.spool.root)
            for segment in batch:
                segment.path.unlink(missing_ok=True)
        except OSError as exc:
            # the segments stay; start-up replays them
            LOGGER.error("journal checkpoint failed: %s", exc)


class _IOCB(ctypes.Structure):
    """``struct iocb`` of Linux native AIO (little endian 64-bit layout)."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IOEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


_IOCB_CMD_FDSYNC: Final[int] = 3
_AIO_SYSCALLS: Final[dict[str, tuple[int, int, int, int]]] = {
    # io_setup, io_destroy, io_submit, io_getevents
    "x86_64": (206, 207, 209, 208),
    "aarch64": (0, 1, 2, 4),
}


class ParallelFlush:
    """One ``fdatasync`` run by the kernel in the background (Linux native AIO,
    ``IOCB_CMD_FDSYNC``) while the caller does something else, such as another flush.

    Not thread-safe: one flush in flight per instance.
    """

    _disabled = False

    @classmethod
    def available(cls) -> bool:
        return not cls._disabled and _SYSCALL is not None and _AIO is not None

    @classmethod
    def disable(cls) -> None:
        """The kernel or file system refused: flush one after the other from now on."""
        cls._disabled = True

    def __init__(self) -> None:
        if _SYSCALL is None or _AIO is None:
            raise OSError(errno.ENOSYS, "native AIO is not available")
        self._numbers = _AIO
        context = ctypes.c_ulong(0)
        if _SYSCALL(self._numbers[0], 1, ctypes.byref(context)) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        self._context: ctypes.c_ulong | None = context
        self._iocb = _IOCB()
        self._iocbs = (ctypes.POINTER(_IOCB) * 1)(ctypes.pointer(self._iocb))
        self._events = (_IOEvent * 1)()

    def start(self, fd: int) -> bool:
        """Start flushing ``fd``; False (nothing started) if the kernel or the file system
        does not offer it (from then on, :meth:`available` is False).

        Raises:
            OSError: for any other error (a bad file descriptor, no resources).
        """
        if self._context is None:
            return False
        ctypes.memset(ctypes.byref(self._iocb), 0, ctypes.sizeof(self._iocb))
        self._iocb.aio_lio_opcode = _IOCB_CMD_FDSYNC
        self._iocb.aio_fildes = fd
        if _SYSCALL(self._numbers[2], self._context, 1, self._iocbs) == 1:  # type: ignore[misc]
            return True
        error = ctypes.get_errno()
        if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            LOGGER.debug("AIO fdatasync refused (errno %d): flushing in turn", error)
            ParallelFlush.disable()
            return False
        raise OSError(error, os.strerror(error))

    def wait(self) -> None:
        """Wait for the flush started last; raises its error."""
        assert self._context is not None
        while True:
            done = _SYSCALL(  # type: ignore[misc]
                self._numbers[3], self._context, 1, 1, self._events, None
            )
            if done == 1:
                break
            error = ctypes.get_errno()
            if done < 0 and error == errno.EINTR:
                continue
            raise OSError(error, os.strerror(error))
        result = int(self._events[0].res)
        if result < 0:
            raise OSError(-result, os.strerror(-result))

    def close(self) -> None:
        """Release the AIO context (waits for a flush still in flight)."""
        context, self._context = self._context, None
        if context is not None and _SYSCALL is not None:
            _SYSCALL(self._numbers[1], context)


def _load_libc_function(name: str) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function: Callable[..., int] = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    return function


_SYNCFS = _load_libc_function("syncfs")
_SYSCALL = _load_libc_function("syscall")
if _SYSCALL is not None:
    _SYSCALL.restype = ctypes.c_long  # type: ignore[attr-defined]
_AIO: Final[tuple[int, int, int, int] | None] = _AIO_SYSCALLS.get(platform.machine())


def sync_filesystem(folder: Path) -> None:
    """Flush every file and folder of the file system holding ``folder`` (``syncfs``)."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    finally:
        os.close(fd)
