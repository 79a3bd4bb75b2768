"""The receive journal: an instance is durable and committed by one flush of its own file.

The listener writes each instance, while it arrives, into an empty file taken from an
:class:`~opmri_node.spool.IncomingPool` (its name in ``spool/incoming`` is durable already).
Once the instance is accepted, :meth:`Journal.commit`

1. writes a *commit record* into the file's 128-byte preamble, which PS3.10 leaves to the
   implementation writing the file: the spool path the instance goes to, the file's size and
   the CRC-32 of its bytes after the preamble;
2. flushes the file (``fdatasync``): its bytes, its size and the record reach the disk
   together, with one flush.

The listener then renames the file into its study folder, unflushed, records it in the state
database and acknowledges it. So an acknowledged instance is, whatever happens afterwards, in
a flushed file holding its commit record: at its spool path or, if the rename did not reach
the disk, still in ``incoming/``. A stop during the flush may leave a record whose file is not
complete; its size and CRC-32 show that, and it had not been acknowledged.

At start-up, :meth:`Journal.replay` moves every committed file still in ``incoming/`` into
place and flushes the file system once; the files left there (never acknowledged: partial
writes, refused or duplicate instances, empty prepared files) are removed afterwards. The
spool stays the source of truth: after replay it holds every acknowledged instance, and the
state database is re-indexed from it. A clean stop flushes the file system as well, so that
the renames of the run are durable.

Commit record (little endian): ``OPJ3``, file size uint64, CRC-32 uint32, length of the spool
path uint16, the path (UTF-8), zero padding, and at bytes 124-127 the CRC-32 of bytes 0-123.
A spool file keeps its record; readers of DICOM files ignore the preamble.

Earlier versions committed instances in journal segments (``spool/journal/<uuid>.seg``),
which replay still reads: frames of a 20-byte header (``OPJ2``, kind, 3 zero bytes, record
number as uint32, payload length as uint64) and a payload naming the incoming file, the spool
path, the size and the CRC-32; segments of the first format (``OPJ1``) carried the instances'
bytes as well.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from zlib_ng.zlib_ng import crc32

from opmri_node.spool import (
    PREAMBLE_SIZE,
    IncomingFile,
    IncomingPool,
    Spool,
    fsync_dir,
    is_spool_path,
)

LOGGER = logging.getLogger(__name__)

RECORD_MAGIC: Final[bytes] = b"OPJ3"
_RECORD: Final[struct.Struct] = struct.Struct("<4sQIH")
_RECORD_CHECK: Final[struct.Struct] = struct.Struct("<I")
_RECORD_PATH_MAX: Final[int] = PREAMBLE_SIZE - _RECORD.size - _RECORD_CHECK.size
MAGIC: Final[bytes] = b"OPJ2"
MAGIC_V1: Final[bytes] = b"OPJ1"
_FRAME: Final[struct.Struct] = struct.Struct("<4sB3xIQ")
_COMMIT: Final[struct.Struct] = struct.Struct("<QIIH")
_COMMIT_V1: Final[struct.Struct] = struct.Struct("<QII")
BEGIN: Final[int] = 1
DATA: Final[int] = 2
COMMIT: Final[int] = 3
SEGMENT_SUFFIX: Final[str] = ".seg"
_MAX_PATH: Final[int] = 4096


def encode_record(relative: str, size: int, crc: int) -> bytes:
    """The commit record of a file of ``size`` bytes whose bytes after the preamble have CRC-32
    ``crc``, going to the spool path ``relative`` (128 bytes, see above)."""
    path = relative.encode("utf-8")
    if len(path) > _RECORD_PATH_MAX:
        raise JournalError("the spool path does not fit in a commit record")
    body = (_RECORD.pack(RECORD_MAGIC, size, crc, len(path)) + path).ljust(
        PREAMBLE_SIZE - _RECORD_CHECK.size, b"\0"
    )
    return body + _RECORD_CHECK.pack(zlib.crc32(body))


def decode_record(preamble: bytes) -> Commit | None:
    """The commit record in a file's preamble, or ``None`` (none there, or damaged)."""
    if len(preamble) < PREAMBLE_SIZE or preamble[:4] != RECORD_MAGIC:
        return None
    body = preamble[: PREAMBLE_SIZE - _RECORD_CHECK.size]
    if _RECORD_CHECK.unpack_from(preamble, len(body))[0] != zlib.crc32(body):
        return None
    _magic, size, crc, length = _RECORD.unpack_from(body)
    if length > _RECORD_PATH_MAX:
        return None
    relative = body[_RECORD.size : _RECORD.size + length].decode("utf-8", "replace")
    return Commit("", relative, size, crc)


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


@dataclass
class ReplayStats:
    segments: int = 0
    committed: int = 0
    restored: int = 0
    skipped: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    """Committed spool paths with no complete file, in place or in ``incoming/`` (a stop
    during the flush, before the instance was acknowledged)."""


class Journal:
    """Commits of instances received into ``spool/incoming``, and their replay."""

    def __init__(self, spool: Spool, *, owner: str | None = None) -> None:
        self.spool = spool
        self.folder = spool.root / "journal"
        """Where earlier versions kept journal segments (only read, by :meth:`replay`)."""
        self.owner = owner
        """Prefix of this journal's incoming file names (the receiving process, see
        :mod:`opmri_node.receivers`), so that another process can replay them alone."""
        self.prefix = "" if owner is None else f"{owner}-"
        self.pool = IncomingPool(spool.incoming, self.prefix)
        self._committed = False

    def open_incoming(self) -> IncomingFile:
        """An incoming file (with a durable name) for an instance to be committed."""
        return IncomingFile(
            self.pool.take(), create=False, checksum=True, checksum_from=PREAMBLE_SIZE
        )

    def commit(self, incoming: IncomingFile, relative: str) -> None:
        """Make ``incoming`` durable as the instance at ``relative``: write its commit record
        and flush the file (which stays open: see :meth:`IncomingFile.release`).

        Raises:
            OSError: the record could not be written or the flush failed (the instance is not
                committed; the caller discards the file).
        """
        if incoming.size < PREAMBLE_SIZE:
            raise JournalError("an incoming file without a preamble cannot be committed")
        incoming.write_at(0, encode_record(relative, incoming.size, incoming.crc))
        incoming.sync()
        self._committed = True

    def close(self, timeout: float = 30.0) -> bool:
        """Delete the unused incoming files and, after commits, flush the file system (the
        renames into place); True if that succeeded."""
        self.pool.close()
        if not self._committed:
            return True
        try:
            sync_filesystem(self.spool.root)
        except OSError as exc:
            LOGGER.error("flushing the spool failed: %s", exc)
            return False
        return True

    def segments(self, owner: str | None = None) -> list[Path]:
        """Segment files left by earlier versions (of one owner, or all)."""
        prefix = "" if owner is None else f"{owner}-"
        if not self.folder.is_dir():
            return []
        return sorted(
            p for p in self.folder.iterdir()
            if p.name.endswith(SEGMENT_SUFFIX) and p.name.startswith(prefix)
        )

    def replay(self, owner: str | None = None) -> ReplayStats:
        """Move the committed instances left in ``incoming/`` (of one owner, or all) and in
        segments of earlier versions into place, then delete the segments and, for one owner,
        its incoming files."""
        stats = ReplayStats()
        segments = self.segments(owner)
        for path in segments:
            stats.segments += 1
            if segment_format(path) == MAGIC_V1:
                self._replay_v1(path, stats)
            else:
                self._replay_segment(path, stats)
        self._replay_incoming("" if owner is None else f"{owner}-", stats)
        if stats.segments or stats.restored:
            sync_filesystem(self.spool.root)
        if stats.segments:
            for path in segments:
                path.unlink(missing_ok=True)
            fsync_dir(self.folder)
        if owner is not None:
            self.spool.clean_incoming(f"{owner}-")
        return stats

    def _replay_incoming(self, prefix: str, stats: ReplayStats) -> None:
        """Move each incoming file holding a valid commit record into place."""
        for path in sorted(self.spool.incoming.iterdir()):
            name = path.name
            if not name.startswith(prefix) or not _is_incoming_name(name):
                continue
            try:
                with path.open("rb") as fh:
                    record = decode_record(fh.read(PREAMBLE_SIZE))
            except OSError:
                continue
            if record is None:
                continue  # never committed: removed with the other incoming files
            stats.committed += 1
            relative = record.relative
            if not is_spool_path(relative):
                stats.skipped.append(relative)
                continue
            if _file_crc(path, record.size, PREAMBLE_SIZE) != record.crc:
                stats.unfinished.append(relative)
                continue
            target = self.spool.path(relative)
            if _file_crc(target, record.size, PREAMBLE_SIZE) == record.crc:
                continue
            folder = target.parent
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(folder.parent)
            os.replace(path, target)
            stats.restored += 1
            LOGGER.info("moved committed spool file %s into place", relative)

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


def _file_crc(path: Path, size: int, skip: int = 0) -> int | None:
    """CRC-32 of a file's bytes after the first ``skip``, if it has ``size`` bytes."""
    try:
        if path.stat().st_size != size:
            return None
        crc = 0
        with path.open("rb") as fh:
            fh.seek(skip)
            while chunk := fh.read(1 << 20):
                crc = crc32(chunk, crc)
        return crc
    except OSError:
        return None


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
