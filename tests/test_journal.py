"""The receive journal: incoming files with durable names, commits, replay after a crash."""

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
    JournalRecord,
    ParallelFlush,
    encode_commit,
    read_commits,
)
from opmri_node.spool import IncomingFile, IncomingPool, Spool

RELATIVE = f"studies/{'a' * 32}/{'b' * 40}-1.dcm"
OTHER = f"studies/{'c' * 32}/{'d' * 40}-1.dcm"


def _receive(journal: Journal, data: bytes, relative: str) -> IncomingFile:
    """Receive ``data`` into an incoming file and commit it, as the listener does, without the
    move into place (a crash before it, or a move the disk did not keep)."""
    segment = journal.open_segment()
    incoming = journal.open_incoming(segment)
    incoming.write(data[:100])
    incoming.write(data[100:])
    record = incoming.ticket
    assert isinstance(record, JournalRecord)
    record.commit(incoming, relative)
    incoming.close()
    record.end()
    segment.close()
    return incoming


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


def test_commit_frame_names_the_incoming_file_and_checks_the_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    journal = Journal(spool)
    data = bytes(range(256)) * 40
    incoming = _receive(journal, data, RELATIVE)
    (segment,) = journal.segments()
    (commit,) = read_commits(segment)
    assert commit.incoming_name == incoming.basename
    assert commit.relative == RELATIVE
    assert commit.size == len(data) and commit.crc == zlib.crc32(data)
    journal.close()


def test_replay_moves_committed_files_into_place_and_stops_at_a_torn_frame(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    journal = Journal(spool)
    first, second = b"first instance" * 500, b"second instance" * 500
    _receive(journal, first, RELATIVE)
    moved = _receive(journal, second, OTHER)
    spool.place(moved.name, OTHER)  # this move reached the disk
    segments = journal.segments()
    with segments[0].open("ab") as fh:  # the unflushed tail of a segment
        fh.write(encode_commit(9, "x.part", OTHER, 1, 2)[:-3])
    journal.close()

    stats = Journal(spool).replay()
    assert (stats.segments, stats.committed, stats.restored) == (2, 2, 1)
    assert stats.unfinished == [] and stats.skipped == []
    assert spool.path(RELATIVE).read_bytes() == first
    assert spool.path(OTHER).read_bytes() == second
    assert list((spool.root / "journal").iterdir()) == []


def test_replay_reports_a_commit_whose_file_is_gone_and_refuses_paths(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    journal = Journal(spool)
    incoming = _receive(journal, b"data" * 100, RELATIVE)
    Path(incoming.name).unlink()
    segment = journal.open_segment()
    with segment.path.open("ab") as fh:
        fh.write(encode_commit(1, "../../escape.part", OTHER, 4, zlib.crc32(b"data")))
        fh.write(encode_commit(2, "fine.part", "../outside.dcm", 4, zlib.crc32(b"data")))
    segment.close()
    (spool.incoming / "fine.part").write_bytes(b"data")
    stats = Journal(spool).replay()
    assert stats.unfinished == [RELATIVE]
    assert stats.skipped == [OTHER, "../outside.dcm"]
    assert not (tmp_path / "outside.dcm").exists() and not spool.path(OTHER).exists()


def test_replay_of_one_owner_removes_only_its_incoming_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    mine, other = Journal(spool, owner="111"), Journal(spool, owner="222")
    _receive(mine, b"mine" * 100, RELATIVE)
    mine_left = mine.pool.take()
    other_left = other.pool.take()
    Path(mine_left).write_bytes(b"partial")
    stats = Journal(spool).replay(owner="111")
    assert stats.restored == 1 and spool.path(RELATIVE).read_bytes() == b"mine" * 100
    assert not Path(mine_left).exists()
    assert Path(other_left).exists()
    assert not any(p.name.startswith("111-") for p in spool.incoming.iterdir())
    mine.close()
    other.close()


def _frame_v1(kind: int, record: int, payload: bytes) -> bytes:
    return struct.pack("<4sB3xIQ", MAGIC_V1, kind, record, len(payload)) + payload


def test_segments_of_the_first_format_are_replayed(tmp_path: Path) -> None:
    """Segments written before commits named incoming files carried the bytes themselves."""
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


def test_a_commit_whose_file_is_incomplete_was_not_acknowledged(tmp_path: Path) -> None:
    """Both flushes run at once; a stop between them leaves a commit of a torn file."""
    spool = Spool(tmp_path / "spool")
    journal = Journal(spool)
    incoming = _receive(journal, b"whole data set" * 100, RELATIVE)
    Path(incoming.name).write_bytes(b"whole data set" * 50)  # what reached the disk
    stats = Journal(spool).replay()
    assert stats.unfinished == [RELATIVE] and stats.restored == 0
    assert not spool.path(RELATIVE).exists() and not Path(incoming.name).exists()


@pytest.mark.skipif(not ParallelFlush.available(), reason="no Linux native AIO here")
def test_parallel_flush_flushes_and_reports_errors(tmp_path: Path) -> None:
    flush = ParallelFlush()
    try:
        with (tmp_path / "file").open("wb") as fh:
            fh.write(b"data")
            assert flush.start(fh.fileno())
            flush.wait()
        with pytest.raises(OSError):
            flush.start(987654)  # not a file descriptor
        assert ParallelFlush.available()
    finally:
        flush.close()


def test_commit_without_parallel_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ParallelFlush, "_disabled", True)
    spool = Spool(tmp_path / "spool")
    journal = Journal(spool)
    _receive(journal, b"serial" * 100, RELATIVE)
    stats = Journal(spool).replay()
    assert stats.restored == 1 and spool.path(RELATIVE).read_bytes() == b"serial" * 100
