"""The receive journal: incoming files with durable names, commit records, replay after a crash."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import pytest

from opmri_node.journal import (
    COMMIT,
    DATA,
    MAGIC_V1,
    Journal,
    JournalError,
    decode_record,
    encode_commit,
    encode_record,
)
from opmri_node.spool import PREAMBLE, PREAMBLE_SIZE, IncomingPool, Spool

RELATIVE = f"studies/{'a' * 32}/{'b' * 40}-1.dcm"
OTHER = f"studies/{'c' * 32}/{'d' * 40}-1.dcm"


def _instance(text: bytes) -> bytes:
    """Bytes shaped like a spool file: a zero preamble, ``DICM`` and a body."""
    return PREAMBLE + text * 200


def _receive(journal: Journal, data: bytes, relative: str) -> Path:
    """Receive ``data`` into an incoming file and commit it, as the listener does, without the
    move into place (a crash before it, or a move the disk did not keep)."""
    incoming = journal.open_incoming()
    incoming.write(data[:100])
    incoming.write(data[100:])
    journal.commit(incoming, relative)
    return Path(incoming.close())


def _body(path: Path) -> bytes:
    return path.read_bytes()[PREAMBLE_SIZE:]


def test_pool_files_exist_empty_with_the_owner_prefix_and_close_removes_the_rest(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    pool = IncomingPool(spool.incoming, "owner-", batch=8)
    taken = [Path(pool.take()) for _ in range(20)]
    assert len(set(taken)) == 20
    for path in taken:
        assert path.parent == spool.incoming and path.name.startswith("owner-")
        assert path.name.endswith(".part") and path.stat().st_size == 0
    deadline = time.monotonic() + 5
    while len(list(spool.incoming.iterdir())) == 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(list(spool.incoming.iterdir())) > 20, "the pool did not prepare more files"
    pool.close()
    assert sorted(spool.incoming.iterdir()) == sorted(taken)
    with pytest.raises(ValueError):
        pool.take()


def test_commit_record_in_the_preamble_names_the_path_and_checks_the_bytes(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    journal = Journal(spool)
    data = _instance(bytes(range(256)))
    path = _receive(journal, data, RELATIVE)
    written = path.read_bytes()
    assert len(written) == len(data) and written[PREAMBLE_SIZE:] == data[PREAMBLE_SIZE:]
    record = decode_record(written[:PREAMBLE_SIZE])
    assert record is not None
    assert record.relative == RELATIVE
    assert record.size == len(data) and record.crc == zlib.crc32(data[PREAMBLE_SIZE:])
    damaged = bytearray(written[:PREAMBLE_SIZE])
    damaged[20] ^= 0x01
    assert decode_record(bytes(damaged)) is None
    assert decode_record(bytes(PREAMBLE_SIZE)) is None
    assert journal.close()


def test_a_commit_record_holds_only_a_spool_path_of_bounded_length(tmp_path: Path) -> None:
    assert len(encode_record(RELATIVE.replace("-1.dcm", "-4294967295.dcm"), 1, 2)) == 128
    with pytest.raises(JournalError):
        encode_record("studies/" + "x" * 200, 1, 2)
    journal = Journal(Spool(tmp_path / "spool"))
    short = journal.open_incoming()
    short.write(b"DICM")
    with pytest.raises(JournalError):
        journal.commit(short, RELATIVE)  # no preamble to hold the record
    short.discard()
    journal.close()


def test_replay_moves_committed_files_into_place_and_removes_the_rest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    journal = Journal(spool)
    first, second = _instance(b"first instance"), _instance(b"second instance")
    left = _receive(journal, first, RELATIVE)
    moved = _receive(journal, second, OTHER)
    spool.place(moved, OTHER)  # this move reached the disk
    partial = journal.open_incoming()  # never committed
    partial.write(_instance(b"partial"))
    partial.close()
    journal.close()

    stats = Journal(spool).replay()
    assert (stats.segments, stats.committed, stats.restored) == (0, 1, 1)
    assert stats.unfinished == [] and stats.skipped == []
    assert not left.exists()
    assert _body(spool.path(RELATIVE)) == first[PREAMBLE_SIZE:]
    assert _body(spool.path(OTHER)) == second[PREAMBLE_SIZE:]
    assert spool.clean_incoming() >= 1
    assert list(spool.incoming.iterdir()) == []
    assert Journal(spool).replay().committed == 0


def test_a_commit_whose_file_is_incomplete_was_not_acknowledged(tmp_path: Path) -> None:
    """A stop during the flush may keep the record but not every byte of the file."""
    spool = Spool(tmp_path / "spool")
    journal = Journal(spool)
    data = _instance(b"whole data set")
    path = _receive(journal, data, RELATIVE)
    torn = bytearray(path.read_bytes())
    torn[-1000:] = bytes(1000)  # blocks that did not reach the disk
    path.write_bytes(bytes(torn))
    stats = Journal(spool).replay()
    assert stats.unfinished == [RELATIVE] and stats.restored == 0
    assert not spool.path(RELATIVE).exists()
    spool.clean_incoming()
    assert not path.exists()


def test_replay_refuses_paths_outside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = _instance(b"data")
    crc = zlib.crc32(data[PREAMBLE_SIZE:])
    (spool.incoming / "evil.part").write_bytes(encode_record("../outside.dcm", len(data), crc)
                                               + data[PREAMBLE_SIZE:])
    stats = Journal(spool).replay()
    assert stats.committed == 1 and stats.skipped == ["../outside.dcm"] and stats.restored == 0
    assert not (tmp_path / "outside.dcm").exists()


def test_replay_of_one_owner_removes_only_its_incoming_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    mine, other = Journal(spool, owner="111"), Journal(spool, owner="222")
    data = _instance(b"mine")
    _receive(mine, data, RELATIVE)
    other_committed = _receive(other, _instance(b"other"), OTHER)
    mine_left = mine.pool.take()
    other_left = other.pool.take()
    Path(mine_left).write_bytes(b"partial")
    stats = Journal(spool).replay(owner="111")
    assert stats.restored == 1 and _body(spool.path(RELATIVE)) == data[PREAMBLE_SIZE:]
    assert not Path(mine_left).exists()
    assert Path(other_left).exists() and other_committed.exists()
    assert not spool.path(OTHER).exists()
    assert not any(p.name.startswith("111-") for p in spool.incoming.iterdir())
    mine.close()
    other.close()


def test_segments_of_the_second_format_are_replayed(tmp_path: Path) -> None:
    """Segments of an earlier version named incoming files and their spool paths."""
    spool = Spool(tmp_path / "spool")
    data = b"an instance" * 300
    (spool.incoming / "kept.part").write_bytes(data)
    segment = spool.root / "journal" / "old.seg"
    segment.parent.mkdir(parents=True)
    segment.write_bytes(
        encode_commit(1, "kept.part", RELATIVE, len(data), zlib.crc32(data))
        + encode_commit(2, "gone.part", OTHER, 5, 6)
        + encode_commit(3, "torn.part", OTHER, 1, 2)[:-3]  # the unflushed tail
    )
    stats = Journal(spool).replay()
    assert (stats.segments, stats.committed, stats.restored) == (1, 2, 1)
    assert stats.unfinished == [OTHER]
    assert spool.path(RELATIVE).read_bytes() == data
    assert not segment.exists()


def _frame_v1(kind: int, record: int, payload: bytes) -> bytes:
    return struct.pack("<4sB3xIQ", MAGIC_V1, kind, record, len(payload)) + payload


def test_segments_of_the_first_format_are_replayed(tmp_path: Path) -> None:
    """Segments of the first format carried the instances' bytes themselves."""
    spool = Spool(tmp_path / "spool")
    data = b"an instance" * 300
    path = RELATIVE.encode()
    fields = struct.pack("<QI", len(data), zlib.crc32(data))
    commit = struct.pack("<QII", len(data), zlib.crc32(data), zlib.crc32(fields + path)) + path
    segment = spool.root / "journal" / "old.seg"
    segment.parent.mkdir(parents=True)
    segment.write_bytes(
        _frame_v1(1, 1, b"")
        + _frame_v1(DATA, 1, data[:1000])
        + _frame_v1(DATA, 1, data[1000:])
        + _frame_v1(COMMIT, 1, commit)
        + _frame_v1(1, 2, b"")
        + _frame_v1(DATA, 2, b"never committed")
    )
    stats = Journal(spool).replay()
    assert (stats.segments, stats.committed, stats.restored) == (1, 1, 1)
    assert spool.path(RELATIVE).read_bytes() == data
    assert not segment.exists()
