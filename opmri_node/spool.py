"""The spool: received instances on disk, byte for byte as they arrived.

Layout under ``<data_dir>/spool``::

    incoming/                      files being received; emptied at start-up once the receive
                                   journal has moved the committed ones into place
    studies/<study key>/<instance key>-<revision>.dcm

Both keys are hashes of UIDs (:func:`study_key`, :func:`instance_key`), so no received text ever
becomes part of a path. A file is the DICOM preamble, a File Meta Information group written by
the node, and the data set exactly as received (no decoding or re-encoding, so compressed
pixel data, deflated data sets and big endian data sets stay as sent).

:meth:`Spool.store` writes a file to ``incoming/``, fsyncs it, renames it into its study folder
and fsyncs the folder, so once it returns the file survives a crash of the process or of the
machine. The listener instead commits each received file in ``incoming/`` (taken from an
:class:`IncomingPool`, so its name is durable already) with one flush, a commit record in its
preamble naming its spool path (:mod:`opmri_node.journal`), and moves it into place with
:meth:`Spool.place`, unflushed: replay finishes a move that did not reach the disk.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import re
import struct
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Final

from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from zlib_ng.zlib_ng import crc32

from opmri_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from opmri_node.state import study_key

LOGGER = logging.getLogger(__name__)

FREE_SPACE_TTL_S: Final[float] = 0.1
FREE_SPACE_SLACK: Final[int] = 256 * 1024 * 1024

PREAMBLE_SIZE: Final[int] = 128
"""Length of a DICOM file's preamble (PS3.10 7.1), before ``DICM``."""
PREAMBLE: Final[bytes] = b"\x00" * PREAMBLE_SIZE + b"DICM"

HEADER_INFLATE_LIMIT: Final[int] = 8 * 1024 * 1024
"""At most this much of a deflated data set is inflated to read its header (deflate bombs)."""

_UID_RE: Final[re.Pattern[str]] = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PATH_RE: Final[re.Pattern[str]] = re.compile(
    r"^studies/[0-9a-f]{32}/[0-9a-f]{40}-[1-9][0-9]{0,8}\.dcm$"
)
_FILE_RE: Final[re.Pattern[str]] = re.compile(r"^([0-9a-f]{40})-([1-9][0-9]{0,8})\.dcm$")

_SOP_CLASS: Final[BaseTag] = Tag(0x0008, 0x0016)
_SOP_INSTANCE: Final[BaseTag] = Tag(0x0008, 0x0018)
_MODALITY: Final[BaseTag] = Tag(0x0008, 0x0060)
_STUDY: Final[BaseTag] = Tag(0x0020, 0x000D)
_SERIES: Final[BaseTag] = Tag(0x0020, 0x000E)
_HEADER_TAGS: Final[list[BaseTag | int]] = [_SOP_CLASS, _SOP_INSTANCE, _MODALITY, _STUDY, _SERIES]
_LAST_HEADER_TAG: Final[int] = 0x0020000E


def is_spool_path(relative: str) -> bool:
    """True for a path of the form :meth:`Spool.relative_path` returns."""
    return bool(_PATH_RE.fullmatch(relative))


def instance_key(sop_instance_uid: str) -> str:
    """The file name stem of an instance: a hash of its SOP Instance UID."""
    return hashlib.sha256(sop_instance_uid.encode("utf-8", "replace")).hexdigest()[:40]


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.fullmatch(value))


class HeaderError(ValueError):
    """A received data set's header cannot be read or lacks a required UID.

    The message never contains received values.
    """


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes the node reads from a received data set."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str


def read_header(
    data: bytes | memoryview, transfer_syntax: str, *, truncated: bool = False
) -> InstanceHeader:
    """Read the identifying UIDs from an encoded data set (no file meta) without its pixels.

    Only the elements up to (0020,000E) Series Instance UID are parsed. A deflated data set is
    inflated only as far as :data:`HEADER_INFLATE_LIMIT`. ``truncated`` says that ``data`` is
    only the beginning of the data set; the header must then end within it.

    Raises:
        HeaderError: if the header is unreadable or a UID is missing or malformed.
    """
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            raw: bytes | memoryview = inflater.decompress(data, HEADER_INFLATE_LIMIT)
        except zlib.error:
            raise HeaderError("the deflated data set cannot be inflated") from None
        truncated = truncated or bool(inflater.unconsumed_tail) or not inflater.eof
    else:
        raw = data
    if len(raw) > _HEADER_PREFIX:
        # The identifying elements come first; try a prefix before parsing everything.
        try:
            return _parse_header(raw[:_HEADER_PREFIX], ts, complete_only=True)
        except HeaderError:
            pass
    return _parse_header(raw, ts, complete_only=truncated)


_HEADER_PREFIX: Final[int] = 16384


def _parse_header(
    raw: bytes | memoryview, ts: UID, *, complete_only: bool = False
) -> InstanceHeader:
    """Parse the header elements; with ``complete_only``, fail unless parsing went past them.

    A prefix of a data set may end inside a value, which pydicom would return truncated; only
    when reading stopped at an element after (0020,000E) are the values known to be whole.
    """
    scanned = _scan_header(raw, ts.is_implicit_VR) if ts.is_little_endian else None
    found: Mapping[int, object]
    if scanned is not None:
        found, reached_end = scanned
    else:
        found, reached_end = _read_header_elements(raw, ts)
    values = {
        "sop_class_uid": raw_text(found.get(int(_SOP_CLASS))),
        "sop_instance_uid": raw_text(found.get(int(_SOP_INSTANCE))),
        "study_uid": raw_text(found.get(int(_STUDY))),
        "series_uid": raw_text(found.get(int(_SERIES))),
    }
    modality = raw_text(found.get(int(_MODALITY)))
    if complete_only and not reached_end:
        raise HeaderError("the header does not end within the prefix")
    names = {
        "sop_class_uid": "SOP Class UID",
        "sop_instance_uid": "SOP Instance UID",
        "study_uid": "Study Instance UID",
        "series_uid": "Series Instance UID",
    }
    for field, value in values.items():
        if not value:
            raise HeaderError(f"the data set has no {names[field]}")
        if not is_valid_uid(value):
            raise HeaderError(f"the data set's {names[field]} is not a valid UID")
    return InstanceHeader(modality=modality[:16], **values)


_LONG_VRS: Final[frozenset[bytes]] = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_SHORT_VRS: Final[frozenset[bytes]] = frozenset(
    (b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
     b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US")
)
_HEADER_TAG_SET: Final[frozenset[int]] = frozenset(int(tag) for tag in _HEADER_TAGS)
_TAG_LE: Final[struct.Struct] = struct.Struct("<HH")
_IMPLICIT_LE: Final[struct.Struct] = struct.Struct("<HHI")
_EXPLICIT_LONG_LENGTH: Final[struct.Struct] = struct.Struct("<I")
_EXPLICIT_SHORT_LENGTH: Final[struct.Struct] = struct.Struct("<H")


def _scan_header(raw: bytes | memoryview, implicit: bool) -> tuple[dict[int, bytes], bool] | None:
    """The header elements of a little endian data set, read element by element without
    pydicom, and whether reading went past them; ``None`` where this simple reader does not
    apply (an undefined length or an unknown VR before the end of the header), for pydicom's
    reader to take over. Values are raw bytes, as pydicom's reader gives them."""
    found: dict[int, bytes] = {}
    size = len(raw)
    position = 0
    while position + 8 <= size:
        group, element = _TAG_LE.unpack_from(raw, position)
        tag = group << 16 | element
        if tag > _LAST_HEADER_TAG:
            return found, True
        if implicit:
            length = _IMPLICIT_LE.unpack_from(raw, position)[2]
            start = position + 8
        else:
            vr = bytes(raw[position + 4 : position + 6])
            if vr in _SHORT_VRS:
                length = _EXPLICIT_SHORT_LENGTH.unpack_from(raw, position + 6)[0]
                start = position + 8
            elif vr in _LONG_VRS:
                if position + 12 > size:
                    break
                length = _EXPLICIT_LONG_LENGTH.unpack_from(raw, position + 8)[0]
                start = position + 12
            else:
                return None
        if length == 0xFFFFFFFF:
            return None
        end = start + length
        if end > size:
            break  # the data ends inside this element
        if tag in _HEADER_TAG_SET:
            found[tag] = bytes(raw[start:end])
        position = end
    return found, False


def _read_header_elements(raw: bytes | memoryview, ts: UID) -> tuple[dict[int, object], bool]:
    """The header elements read by pydicom's element reader, and whether it read past them."""
    reached_end = False

    def after_header(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal reached_end
        reached_end = int(tag) > _LAST_HEADER_TAG
        return reached_end

    found: dict[int, object] = {}
    try:
        # pydicom's element reader, without building a Dataset: only the header elements are
        # read, every other value is skipped
        for element in data_element_generator(
            BytesIO(raw),
            ts.is_implicit_VR,
            ts.is_little_endian,
            stop_when=after_header,
            specific_tags=_HEADER_TAGS,
        ):
            found[int(element.tag)] = element.value
    except EOFError:
        pass  # the data ends inside an element; those before it are whole
    except (RecursionError, MemoryError):
        raise HeaderError("the data set header is nested too deeply or too large") from None
    except Exception:
        raise HeaderError("the data set header cannot be parsed") from None
    return found, reached_end


def raw_text(value: object) -> str:
    """An element's raw text, without pydicom's value conversion.

    Converting would validate the value and log a warning that quotes it; received values must
    not reach the log, and the callers validate what they need themselves.
    """
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ")


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = ""
) -> bytes:
    """Preamble, ``DICM`` and a File Meta Information group (PS3.10 section 7.1).

    The group is small and fixed in form, so it is encoded directly rather than through a
    Dataset; the test suite checks it byte for byte against pydicom's encoder.
    """
    body = b"".join(
        (
            _element_ob(0x0001, b"\x00\x01"),
            _element_short(0x0002, b"UI", _pad(sop_class_uid, b"\x00")),
            _element_short(0x0003, b"UI", _pad(sop_instance_uid, b"\x00")),
            _element_short(0x0010, b"UI", _pad(transfer_syntax_uid, b"\x00")),
            _element_short(0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _element_short(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME, b" ")),
            _element_short(0x0016, b"AE", _pad(source_ae, b" ")) if source_ae else b"",
        )
    )
    group_length = _element_short(0x0000, b"UL", struct.pack("<I", len(body)))
    return PREAMBLE + group_length + body


def _pad(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _element_short(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _element_ob(element: int, value: bytes) -> bytes:
    header = struct.pack("<HH", 0x0002, element) + b"OB\x00\x00"
    return header + struct.pack("<I", len(value)) + value


WRITEBACK_STEP: Final[int] = 256 * 1024
"""An incoming file with a ``checksum`` asks the kernel to write back every this many bytes."""


class IncomingFile:
    """A file being written in ``incoming/``: appended to, then fsynced (or not) and closed.

    :meth:`start_writeback` asks the kernel to begin writing what has been appended so far
    without waiting for it, so the device works while the rest of the data set is still
    arriving and the final flush has little left to do. With ``checksum`` the file keeps the
    CRC-32 of its bytes from offset ``checksum_from`` on (for a receive journal commit) and
    starts write-back by itself every :data:`WRITEBACK_STEP` bytes. ``create=False`` opens a
    file that already exists (empty, from an :class:`IncomingPool`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        checksum: bool = False,
        checksum_from: int = 0,
    ) -> None:
        self.name = os.fspath(path)
        """The file's path as a string."""
        self.size = 0
        self.crc = 0
        """CRC-32 of the bytes appended from ``checksum_from`` on (with ``checksum`` only)."""
        self._flushed = 0
        self._checksum = checksum
        self._checksum_from = checksum_from
        flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0)
        self._fd: int | None = os.open(self.name, flags, 0o640)

    @property
    def path(self) -> Path:
        return Path(self.name)

    @property
    def basename(self) -> str:
        return os.path.basename(self.name)

    def write(self, data: bytes | memoryview) -> None:
        if self._fd is None:
            raise ValueError("the incoming file is already closed")
        with memoryview(data) as raw, raw.cast("B") as view:
            offset = 0
            while offset < len(view):
                offset += os.write(self._fd, view[offset:])
            start = self.size
            self.size += offset
            if self._checksum:
                skip = self._checksum_from - start
                if skip <= 0:
                    self.crc = crc32(view, self.crc)
                elif skip < offset:
                    self.crc = crc32(view[skip:], self.crc)
                if self.size - self._flushed >= WRITEBACK_STEP:
                    self.start_writeback()

    def write_at(self, offset: int, data: bytes) -> None:
        """Replace written bytes at ``offset`` (before ``checksum_from``: the CRC-32 stays)."""
        if self._fd is None:
            raise ValueError("the incoming file is already closed")
        if offset + len(data) > self.size or (
            self._checksum and offset + len(data) > self._checksum_from
        ):
            raise ValueError("only bytes already written, outside the checksum, can be replaced")
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def start_writeback(self) -> None:
        if self._fd is not None and self.size > self._flushed:
            _start_writeback(self._fd, self._flushed, self.size - self._flushed)
            self._flushed = self.size

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("the incoming file is already closed")
        return self._fd

    def sync(self) -> None:
        """Flush the file's bytes and size (``fdatasync``); it stays open."""
        os.fdatasync(self.fileno())

    def drop_cache(self) -> None:
        """Drop the file's pages from the page cache (once flushed, they are clean).

        A node receiving all day would otherwise fill memory with instances it reads again
        at most once, evicting what other programs use, and the kernel would have to reclaim
        those pages before every new write.
        """
        if _FADVISE:
            os.posix_fadvise(self.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def release(self) -> None:
        """Drop a flushed file's pages from the page cache and close it (wherever it is now)."""
        if self._fd is None:
            return
        try:
            self.drop_cache()
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)

    def finish(self) -> Path:
        """fsync and close; returns the path."""
        if self._fd is None:
            raise ValueError("the incoming file is already closed")
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.path

    def close(self) -> str:
        """Close without flushing; returns the path."""
        if self._fd is None:
            raise ValueError("the incoming file is already closed")
        fd, self._fd = self._fd, None
        os.close(fd)
        return self.name

    def discard(self) -> None:
        """Close (if open) and delete the file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name)


class IncomingPool:
    """Empty files in ``incoming/`` whose names are already durable.

    A file created and flushed with ``fdatasync`` is durable, but POSIX makes its *name*
    durable only once its folder is flushed as well. The receive journal commits an instance
    with one flush of its data file (and one of the journal), so it writes into files taken
    from here: a background thread creates them in batches and flushes the folder once per
    batch. Names start with ``prefix`` (the owner of the journal that uses them), so the files
    one owner left behind can be removed without touching another's.
    """

    def __init__(self, folder: str | Path, prefix: str = "", *, batch: int = 32) -> None:
        self.folder = os.fspath(folder)
        self.prefix = prefix
        self.batch = batch
        self._names: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._wanted = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def take(self) -> str:
        """The path of an empty file with a durable name (made now if none is ready)."""
        with self._cond:
            if self._closed:
                raise ValueError("the incoming pool is closed")
            if len(self._names) <= self.batch // 2 and not self._wanted:
                self._wanted = True
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="incoming-pool", daemon=True
                    )
                    self._thread.start()
                self._cond.notify_all()
            if self._names:
                return self._names.popleft()
        return self._make(1)[0]

    def _make(self, count: int) -> list[str]:
        names = []
        try:
            for _ in range(count):
                name = f"{self.folder}/{self.prefix}{uuid.uuid4().hex}.part"
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                names.append(name)
            fsync_dir(Path(self.folder))
        except BaseException:
            for name in names:
                with contextlib.suppress(OSError):
                    os.unlink(name)
            raise
        return names

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted or self._closed)
                if self._closed:
                    return
            try:
                names = self._make(self.batch)
            except OSError as exc:  # take() makes its own file meanwhile
                LOGGER.warning("could not prepare incoming files: %s", exc)
                names = []
                time.sleep(1.0)
            with self._cond:
                if self._closed:
                    _unlink_all(names)
                    return
                self._names.extend(names)
                self._wanted = False

    def close(self) -> None:
        """Stop making files and delete those not taken."""
        with self._cond:
            self._closed = True
            names = list(self._names)
            self._names.clear()
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None:
            thread.join(10.0)
        _unlink_all(names)


def _unlink_all(names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` from libc, where it exists."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        function(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE: start, do not wait

    return start


_SYNC_FILE_RANGE = _load_sync_file_range()
_FADVISE: Final[bool] = hasattr(os, "posix_fadvise") and sys.platform.startswith("linux")


def _start_writeback(fd: int, offset: int, length: int) -> None:
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length)


@dataclass(frozen=True)
class StoredFile:
    """A file written by :meth:`Spool.store`."""

    path: str
    """Relative to the spool root."""
    data_offset: int
    size: int


class SpoolFullError(OSError):
    """Storing would leave less free space than the configured reserve."""


class Spool:
    """Writes received instances durably and reads them back."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.studies = self.root / "studies"
        self.min_free_bytes = min_free_bytes
        self._root_name = os.fspath(self.root)
        self._incoming_name = os.fspath(self.incoming)
        self._free: tuple[float, int] | None = None
        """When free space was last measured, and what it was (see :meth:`check_room`)."""
        for folder in (self.root, self.incoming, self.studies):
            folder.mkdir(parents=True, exist_ok=True)

    def clean_incoming(self, prefix: str = "") -> int:
        """Delete partial writes left by an interrupted run (those whose names start with
        ``prefix``); returns how many were removed."""
        removed = 0
        for entry in self.incoming.iterdir():
            if entry.name.startswith(prefix) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def check_room(self, size: int) -> None:
        """Raise :class:`SpoolFullError` if writing ``size`` bytes would eat into the reserve.

        Free space is measured again unless a measurement of the last
        :data:`FREE_SPACE_TTL_S` left more than :data:`FREE_SPACE_SLACK` beyond the reserve
        and ``size`` (more than the listener writes in that time).
        """
        now = time.monotonic()
        last = self._free
        if (
            last is not None
            and now - last[0] < FREE_SPACE_TTL_S
            and last[1] - size - self.min_free_bytes > FREE_SPACE_SLACK
        ):
            return
        free = self.free_bytes()
        self._free = (now, free)
        if free - size < self.min_free_bytes:
            raise SpoolFullError("free disk space is below the configured reserve")

    @staticmethod
    def relative_path(study_uid: str, sop_instance_uid: str, revision: int) -> str:
        """Where an instance's revision lives, relative to the spool root."""
        return f"studies/{study_key(study_uid)}/{instance_key(sop_instance_uid)}-{revision}.dcm"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def open_incoming(self, *, check_room: bool = True) -> IncomingFile:
        """Start a new file in ``incoming/`` (refused if the free-space reserve is reached)."""
        if check_room:
            self.check_room(0)
        return IncomingFile(f"{self._incoming_name}/{uuid.uuid4().hex}.part")

    def write_incoming(self, parts: Sequence[bytes | memoryview]) -> Path:
        """Write ``parts`` to a new file in ``incoming/`` and fsync it; returns its path."""
        self.check_room(sum(len(part) for part in parts))
        incoming = IncomingFile(self.incoming / f"{uuid.uuid4().hex}.part")
        try:
            for part in parts:
                incoming.write(part)
            return incoming.finish()
        except BaseException:
            incoming.discard()
            raise

    def commit(self, tmp: Path, relative: str) -> None:
        """Move a fsynced incoming file to its place and make the rename durable."""
        target = self.root / relative
        folder = target.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        os.rename(tmp, target)
        fsync_dir(folder)

    def place(self, tmp: str | Path, relative: str) -> None:
        """Move an incoming file to its place without flushing anything.

        Only for files committed by the receive journal (:mod:`opmri_node.journal`), whose
        commit record names the move: replay finishes it if it did not reach the disk.
        """
        target = f"{self._root_name}/{relative}"
        try:
            os.rename(tmp, target)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(tmp, target)

    def discard(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)

    def store(
        self,
        relative: str,
        meta: bytes,
        data: bytes | memoryview,
    ) -> StoredFile:
        """Write ``meta`` + ``data`` durably at ``relative`` (see the module docstring)."""
        tmp = self.write_incoming((meta, data))
        try:
            self.commit(tmp, relative)
        except BaseException:
            self.discard(tmp)
            raise
        return StoredFile(relative, len(meta), len(meta) + len(data))

    def same_data(self, relative: str, data_offset: int, data: bytes | memoryview) -> bool:
        """True if the data set stored at ``relative`` equals ``data`` byte for byte."""
        path = self.root / relative
        view = memoryview(data).cast("B")
        try:
            if path.stat().st_size - data_offset != len(view):
                return False
            with path.open("rb") as fh:
                fh.seek(data_offset)
                position = 0
                while position < len(view):
                    chunk = fh.read(1 << 20)
                    if not chunk or chunk != view[position : position + len(chunk)]:
                        return False
                    position += len(chunk)
        except OSError:
            return False
        return True

    def same_file_data(
        self, relative: str, data_offset: int, other: str | Path, other_offset: int
    ) -> bool:
        """True if the data set stored at ``relative`` equals the one in file ``other``."""
        path = self.root / relative
        try:
            size = path.stat().st_size - data_offset
            if size != os.stat(other).st_size - other_offset:
                return False
            with path.open("rb") as mine, open(other, "rb") as theirs:
                mine.seek(data_offset)
                theirs.seek(other_offset)
                while True:
                    chunk = mine.read(1 << 20)
                    if chunk != theirs.read(1 << 20):
                        return False
                    if not chunk:
                        return True
        except OSError:
            return False

    def iter_files(self) -> Iterator[tuple[str, int]]:
        """Every stored file as (relative path, revision)."""
        for folder in self.studies.iterdir():
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                match = _FILE_RE.fullmatch(entry.name)
                if match:
                    yield f"studies/{folder.name}/{entry.name}", int(match.group(2))


def fsync_dir(folder: Path) -> None:
    """Make renames and new entries in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_stored_header(path: Path) -> tuple[InstanceHeader, str, int]:
    """Header, transfer syntax and data offset of a spool file (used to re-index the spool).

    Raises:
        HeaderError: if the file is not a DICOM file with file meta or its header is unusable.
    """
    with path.open("rb") as fh:
        if fh.read(132)[128:] != b"DICM":
            raise HeaderError("not a DICOM file with a preamble")
        offset, transfer_syntax = _walk_file_meta(fh)
        fh.seek(offset)
        data = fh.read(HEADER_INFLATE_LIMIT)
    if not is_valid_uid(transfer_syntax):
        raise HeaderError("the file meta has no valid transfer syntax")
    return read_header(data, transfer_syntax), transfer_syntax, offset


def file_layout(path: Path) -> tuple[int, str]:
    """Offset of the data set and the transfer syntax of a DICOM file with file meta.

    Raises:
        HeaderError: if the file has no preamble and ``DICM`` prefix.
    """
    with path.open("rb") as fh:
        if fh.read(132)[128:] != b"DICM":
            raise HeaderError("not a DICOM file with a preamble")
        return _walk_file_meta(fh)


def _walk_file_meta(fh: BinaryIO) -> tuple[int, str]:
    """Walk the explicit VR little endian group 0002 from the current position.

    Returns:
        The offset just past the group and the Transfer Syntax UID found in it.
    """
    transfer_syntax = ""
    while True:
        start = fh.tell()
        head = fh.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            return start, transfer_syntax
        element = struct.unpack("<H", head[2:4])[0]
        if head[4:6] in _LONG_VRS:
            length = struct.unpack("<I", fh.read(4))[0]
        else:
            length = struct.unpack("<H", head[6:8])[0]
        value = fh.read(length)
        if element == 0x0010:
            transfer_syntax = value.decode("ascii", "replace").strip("\x00 ")
