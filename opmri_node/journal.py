"""The receive journal: one flush makes a received instance durable.

Writing a file durably under its final name takes two flushes (fsync the file, rename it, fsync
the folder). The listener instead appends every instance it receives to a *journal segment*
(``spool/journal/<uuid>.seg``, one per association at a time) while it arrives, and when the
instance is accepted appends a commit frame naming its spool path and flushes the segment once
with ``fdatasync``. Only then is the spool file, written alongside without any flush, renamed
into its study folder, recorded in the state database and acknowledged. So:

* an acknowledged instance is in a flushed segment (its bytes and its spool path, with a
  CRC-32 of both), whatever happens afterwards to the unflushed spool file;
* a file in ``spool/studies`` is either flushed (see below) or covered by a committed record
  of a segment that still exists, because the rename happens after the segment's flush.

A segment is *retired* when its association ends or it grows past a size limit. The
:class:`Checkpointer` thread then flushes the file system holding the spool (``syncfs``, one
flush for all the segment's files and folders) and deletes the segment. At start-up,
:meth:`Journal.replay` rewrites from any segment left over (a crash, ``kill -9`` or power
failure before its checkpoint) every committed instance whose spool file is missing or differs,
then deletes the segment; records without a valid commit (never acknowledged) are ignored. The
spool stays the source of truth: after replay it holds every acknowledged instance, and the
state database is re-indexed from it.

Segment format: frames of a 20-byte header (``OPJ1``, kind, 3 zero bytes, record id as uint32,
payload length as uint64, little endian) and a payload. A record is ``BEGIN``, any number of
``DATA`` frames (the spool file's bytes in order) and ``COMMIT`` (file size uint64, CRC-32 of
the file uint32, CRC-32 of the commit payload's other fields uint32, spool path in UTF-8).
Records of one segment may interleave. Replay stops at the first frame that is incomplete or
malformed (the unflushed tail of a segment).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue
import struct
import sys
import threading
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from opmri_node.spool import Spool, fsync_dir, is_spool_path

LOGGER = logging.getLogger(__name__)

MAGIC: Final[bytes] = b"OPJ1"
_FRAME: Final[struct.Struct] = struct.Struct("<4sB3xIQ")
_COMMIT: Final[struct.Struct] = struct.Struct("<QII")
BEGIN: Final[int] = 1
DATA: Final[int] = 2
COMMIT: Final[int] = 3
SEGMENT_SUFFIX: Final[str] = ".seg"
SEGMENT_LIMIT: Final[int] = 256 * 1024 * 1024
"""A segment is retired (and a new one started) once it holds this many bytes."""
_MAX_PATH: Final[int] = 4096


class JournalError(OSError):
    """The journal cannot be written."""


class Segment:
    """An open journal segment. Thread-safe: records of one segment may interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._lock = threading.Lock()
        self._next_id = 1
        self.size = 0
        self._written_back = 0
        self.active = 0
        """Records begun and not yet committed or abandoned."""
        self.committed = 0
        self.retired = False
        self._idle = threading.Condition(self._lock)

    def _append(self, parts: list[bytes | memoryview]) -> None:
        fd = self._fd
        if fd is None:
            raise JournalError("the journal segment is closed")
        total = sum(len(part) for part in parts)
        written = os.writev(fd, parts)
        if written != total:  # a short write: finish it piece by piece
            done = 0
            for part in parts:
                view = memoryview(part).cast("B")
                start = max(0, min(len(view), written - done))
                done += len(view)
                while start < len(view):
                    start += os.write(fd, view[start:])
        self.size += total

    def begin(self) -> int:
        """Start a record; returns its id."""
        with self._lock:
            record = self._next_id
            self._next_id += 1
            self._append([_FRAME.pack(MAGIC, BEGIN, record, 0)])
            self.active += 1
            return record

    def write(self, record: int, data: bytes | memoryview) -> None:
        with memoryview(data) as raw, raw.cast("B") as view, self._lock:
            self._append([_FRAME.pack(MAGIC, DATA, record, len(view)), view])
            if self.size - self._written_back >= 256 * 1024:
                _start_writeback(self._fd, self._written_back, self.size - self._written_back)
                self._written_back = self.size

    def commit(self, record: int, relative: str, size: int, crc: int) -> None:
        """Append the record's commit frame and flush the segment (``fdatasync``)."""
        encoded = relative.encode("utf-8")
        fields = struct.pack("<QI", size, crc)
        payload = _COMMIT.pack(size, crc, zlib.crc32(fields + encoded)) + encoded
        with self._lock:
            self._append([_FRAME.pack(MAGIC, COMMIT, record, len(payload)), payload])
            fd = self._fd
        assert fd is not None
        os.fdatasync(fd)  # outside the lock: other records may append meanwhile
        with self._lock:
            self.committed += 1

    def end(self) -> None:
        """The record begun last by a caller is committed or abandoned."""
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


@dataclass
class JournalRecord:
    """One instance being written: its spool file's bytes go to the segment as well."""

    segment: Segment
    record: int
    crc: int = 0
    size: int = 0
    ended: bool = False

    def write(self, data: bytes | memoryview) -> None:
        self.segment.write(self.record, data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)

    def commit(self, relative: str) -> None:
        """Make the record durable under ``relative`` (a spool path)."""
        try:
            self.segment.commit(self.record, relative, self.size, self.crc)
        finally:
            self.end()

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


class Journal:
    """The segments in ``spool/journal`` and the thread that checkpoints them."""

    def __init__(
        self, spool: Spool, *, segment_limit: int = SEGMENT_LIMIT, owner: str | None = None
    ) -> None:
        self.spool = spool
        self.folder = spool.root / "journal"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.segment_limit = segment_limit
        self.owner = owner
        """Prefix of this journal's segment names (the receiving process, see
        :mod:`opmri_node.receivers`), so that another process can replay them alone."""
        self.checkpointer = Checkpointer(self)

    def open_segment(self) -> Segment:
        """A new segment, its name already durable in the journal folder."""
        prefix = "" if self.owner is None else f"{self.owner}-"
        segment = Segment(self.folder / f"{prefix}{uuid.uuid4().hex}{SEGMENT_SUFFIX}")
        try:
            fsync_dir(self.folder)
        except OSError:
            segment.close()
            segment.path.unlink(missing_ok=True)
            raise
        return segment

    def retire(self, segment: Segment) -> None:
        """No new records go to ``segment``; checkpoint and delete it once its records end."""
        if segment.retired:
            return
        segment.retired = True
        self.checkpointer.submit(segment)

    def segments(self, owner: str | None = None) -> list[Path]:
        """Segment files in the folder (of one owner, or all)."""
        prefix = "" if owner is None else f"{owner}-"
        return sorted(
            p for p in self.folder.iterdir()
            if p.name.endswith(SEGMENT_SUFFIX) and p.name.startswith(prefix)
        )

    def replay(self, owner: str | None = None) -> ReplayStats:
        """Restore committed instances of left-over segments (of one owner, or all) into the
        spool, then delete them."""
        stats = ReplayStats()
        segments = self.segments(owner)
        for path in segments:
            stats.segments += 1
            self._replay_segment(path, stats)
        if stats.segments:
            sync_filesystem(self.spool.root)
            for path in segments:
                path.unlink(missing_ok=True)
            fsync_dir(self.folder)
        return stats

    def _replay_segment(self, path: Path, stats: ReplayStats) -> None:
        extents: dict[int, list[tuple[int, int]]] = {}
        crcs: dict[int, int] = {}
        with path.open("rb") as fh:
            while True:
                head = fh.read(_FRAME.size)
                if len(head) < _FRAME.size:
                    return
                magic, kind, record, length = _FRAME.unpack(head)
                if magic != MAGIC or kind not in (BEGIN, DATA, COMMIT):
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
                    if record not in extents or length > _COMMIT.size + _MAX_PATH:
                        return
                    payload = fh.read(length)
                    if len(payload) < length or length < _COMMIT.size:
                        return
                    size, crc, check = _COMMIT.unpack_from(payload)
                    encoded = payload[_COMMIT.size :]
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
                    if self._restore(path, parts, relative, size, crc):
                        stats.restored += 1
                    fh.seek(start + length)
                fh.seek(start + length)

    def _restore(
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
_SYNC_FILE_RANGE = _load_libc_function("sync_file_range")
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]  # type: ignore[attr-defined]


def _start_writeback(fd: int | None, offset: int, length: int) -> None:
    if fd is not None and _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE: start, do not wait


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
