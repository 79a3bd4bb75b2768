"""Spool files, header reading, the state database and the job table."""

from __future__ import annotations

import sqlite3
import threading
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from opmri_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from opmri_node.dicomnet import c_store_rq_primitive, encode_c_store_rsp, parse_c_store_rq
from opmri_node.service import reindex_spool
from opmri_node.spool import (
    HEADER_INFLATE_LIMIT,
    HeaderError,
    Spool,
    SpoolFullError,
    _read_header_elements,
    _scan_header,
    encode_file_meta,
    instance_key,
    is_valid_uid,
    raw_text,
    read_header,
    read_stored_header,
)
from opmri_node.state import SCHEMA_VERSION, NewInstance, StateDB, StateError, study_key
from pipeline.privacy import uid_tag
from tests.node_fixtures import dciodvfy_errors, make_mr_series, mr_dataset


def dataset_bytes(path: Path) -> tuple[bytes, str]:
    """The encoded data set (after file meta) of a DICOM file and its transfer syntax."""
    ds = dcmread(path, stop_before_pixels=False)
    raw = path.read_bytes()
    meta = BytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=False)
    offset = 132 + len(meta.getvalue())
    return raw[offset:], str(ds.file_meta.TransferSyntaxUID)


# -- file meta -------------------------------------------------------------------------------


@pytest.mark.parametrize("source_ae", ["", "STORESCU", "ODD"])
@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.80"]
)
def test_file_meta_matches_pydicom_byte_for_byte(source_ae: str, ts: str) -> None:
    sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    expected = BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, meta)
    assert encode_file_meta(sop_class, sop_instance, ts, source_ae) == expected.getvalue()


def test_stored_file_is_the_received_data_set_behind_our_meta(tmp_path: Path) -> None:
    series = make_mr_series(tmp_path / "in", 1)
    data, ts = dataset_bytes(series.files[0])
    spool = Spool(tmp_path / "spool")
    meta = encode_file_meta("1.2.840.10008.5.1.4.1.1.4", series.sop_uids[0], ts, "STORESCU")
    relative = spool.relative_path(series.study_uid, series.sop_uids[0], 1)
    stored = spool.store(relative, meta, data)
    path = spool.path(relative)
    assert path.read_bytes()[stored.data_offset :] == data
    assert stored.size == path.stat().st_size
    ds = dcmread(path)
    assert ds.file_meta.SourceApplicationEntityTitle == "STORESCU"
    assert ds.SOPInstanceUID == series.sop_uids[0]
    assert dciodvfy_errors(path) == []
    header, stored_ts, offset = read_stored_header(path)
    assert (header.sop_instance_uid, stored_ts, offset) == (series.sop_uids[0], ts, len(meta))


# -- names -----------------------------------------------------------------------------------


def test_paths_are_hashes_never_received_text(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    evil = "../../../../etc/passwd"
    relative = spool.relative_path(evil, evil + "/x", 3)
    assert ".." not in relative and "etc" not in relative and "passwd" not in relative
    assert relative == f"studies/{study_key(evil)}/{instance_key(evil + '/x')}-3.dcm"
    assert spool.path(relative).resolve().is_relative_to(spool.root.resolve())
    assert study_key("1.2.3")[:12] == uid_tag("1.2.3")


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", True),
        ("1", True),
        ("1." + "2" * 62, True),
        ("1." + "2" * 63, False),
        ("", False),
        ("1..2", False),
        ("1.2.", False),
        ("../1.2", False),
        ("1.2\n", False),
        ("1.2 ", False),
        (None, False),
    ],
)
def test_uid_syntax(value: object, valid: bool) -> None:
    assert is_valid_uid(value) is valid


# -- header ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG-lossy.dcm",
        "image_dfl.dcm",  # deflated
    ],
)
def test_header_of_pydicom_test_files(name: str) -> None:
    path = Path(get_testdata_file(name))
    data, ts = dataset_bytes(path)
    header = read_header(data, ts)
    reference = dcmread(path, stop_before_pixels=True)
    assert header.sop_instance_uid == reference.SOPInstanceUID
    assert header.sop_class_uid == reference.SOPClassUID
    assert header.study_uid == reference.StudyInstanceUID
    assert header.series_uid == reference.SeriesInstanceUID


@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "MR_small_implicit.dcm", "JPEG-lossy.dcm", "CT_small.dcm"]
)
def test_simple_header_reader_agrees_with_pydicoms_at_every_cut(name: str) -> None:
    """The node's own element reader gives pydicom's values and end-of-header verdict for
    every prefix of a data set, whole or cut inside an element or between elements."""
    data, ts = dataset_bytes(Path(get_testdata_file(name)))
    uid = UID(ts)
    for cut in range(0, min(len(data), 4096)):
        prefix = data[:cut]
        scanned = _scan_header(prefix, uid.is_implicit_VR)
        if scanned is None:  # an undefined length: pydicom's reader reads this one
            assert name == "JPEG-lossy.dcm"
            continue
        found, reached = scanned
        try:
            reference, reference_reached = _read_header_elements(prefix, uid)
        except HeaderError:  # pydicom fails inside a cut sequence: the header is not whole
            assert not reached, cut
            continue
        assert reached == reference_reached, cut
        ours = {k: raw_text(v) for k, v in found.items()}
        theirs = {k: raw_text(v) for k, v in reference.items() if k != 0x00080005}
        if reached:
            assert ours == theirs, cut
        else:  # pydicom also returns the cut value of the last element, the node drops it
            assert ours.items() <= theirs.items(), cut
            assert len(theirs) - len(ours) <= 1, cut


def test_header_with_an_undefined_length_sequence_is_read_by_pydicom() -> None:
    ds = mr_dataset(
        study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=generate_uid(),
        frame_uid=generate_uid(), index=0,
    )
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = [item]  # (0008,1140): before the UIDs of group 0020
    ds["ReferencedImageSequence"].is_undefined_length = True
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    raw = buffer.getvalue()
    data = raw[raw.index(b"\x08\x00\x05\x00"):]
    sequence = data.index(b"\x08\x00\x40\x11SQ")
    assert data[sequence + 8 : sequence + 12] == b"\xff\xff\xff\xff"  # undefined length
    assert _scan_header(data, implicit=False) is None
    header = read_header(data, ExplicitVRLittleEndian)
    assert header.study_uid == ds.StudyInstanceUID
    assert header.sop_instance_uid == ds.SOPInstanceUID


def test_header_prefix_never_returns_a_truncated_uid(tmp_path: Path) -> None:
    """A long element before the UIDs pushes them across the 16 KiB prefix boundary."""
    ds = mr_dataset(
        study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=generate_uid(),
        frame_uid=generate_uid(), index=0,
    )
    for pad in range(16300, 16420, 7):
        ds.add_new(0x00091010, "LO", "x")  # private, sorts before group 0020
        ds.add_new(0x00090010, "LO", "PRIVATE")
        ds[0x00091010].value = "y" * pad
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path = tmp_path / "p.dcm"
        path.write_bytes(buffer.getvalue())
        data, ts = dataset_bytes(path)
        header = read_header(data, ts)
        assert header.study_uid == ds.StudyInstanceUID
        assert header.series_uid == ds.SeriesInstanceUID


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), "no Study Instance UID"),
        (lambda ds: delattr(ds, "SeriesInstanceUID"), "no Series Instance UID"),
        (lambda ds: delattr(ds, "SOPInstanceUID"), "no SOP Instance UID"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "../../etc"), "not a valid UID"),
        (lambda ds: setattr(ds, "SOPClassUID", "1.2.x"), "not a valid UID"),
    ],
)
def test_header_errors_name_the_problem_not_the_value(change: object, message: str) -> None:
    ds = mr_dataset(
        study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=generate_uid(),
        frame_uid=generate_uid(), index=0,
    )
    change(ds)  # type: ignore[operator]
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    meta_end = raw.index(b"\x08\x00\x05\x00")  # first data set element (0008,0005)
    with pytest.raises(HeaderError, match=message) as info:
        read_header(raw[meta_end:], ExplicitVRLittleEndian)
    assert "../" not in str(info.value) and "1.2.x" not in str(info.value)


def test_garbage_and_truncated_data_sets_are_refused() -> None:
    with pytest.raises(HeaderError):
        read_header(b"\x08\x00\x18\x00UI\xff\xff" + b"1" * 10, ExplicitVRLittleEndian)
    with pytest.raises(HeaderError):
        read_header(b"not dicom at all", ExplicitVRLittleEndian)
    with pytest.raises(HeaderError, match="cannot be inflated"):
        read_header(b"\xff" * 64, DeflatedExplicitVRLittleEndian)
    truncated = Path(get_testdata_file("MR_small.dcm")).read_bytes()[:400]
    with pytest.raises(HeaderError):
        read_header(truncated[300:], ExplicitVRLittleEndian)


def test_deflate_bomb_is_only_inflated_up_to_the_limit() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(b"\x00" * (HEADER_INFLATE_LIMIT * 8)) + compressor.flush()
    assert len(bomb) < HEADER_INFLATE_LIMIT // 100
    with pytest.raises(HeaderError):
        read_header(bomb, DeflatedExplicitVRLittleEndian)


def test_big_endian_header() -> None:
    data, ts = dataset_bytes(Path(get_testdata_file("MR_small_bigendian.dcm")))
    assert ts == ExplicitVRBigEndian
    assert is_valid_uid(read_header(data, ts).study_uid)


# -- C-STORE response encoding -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "comment"), [(0x0000, None), (0xA700, "insufficient disk"), (0xC000, "odd")]
)
def test_c_store_response_matches_pynetdicom(status: int, comment: str | None) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    rsp.AffectedSOPInstanceUID = "1.2.3.4.5"
    rsp.Status = status
    rsp.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert encode_c_store_rsp(rsp) == encode(message.command_set, True, True)


def test_c_store_response_fast_path_only_for_plain_responses() -> None:
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = "1.2.3"
    request.AffectedSOPInstanceUID = "1.2.3.4"
    assert encode_c_store_rsp(request) is None
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = "1.2.3"
    rsp.AffectedSOPInstanceUID = "1.2.3.4"
    rsp.Status = 0xA900
    rsp.OffendingElement = [0x00080018]
    assert encode_c_store_rsp(rsp) is None


# -- spool -----------------------------------------------------------------------------------


def test_free_space_reserve(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.check_room(1024)
    huge = Spool(tmp_path / "spool", min_free_bytes=spool.free_bytes() + 2**40)
    with pytest.raises(SpoolFullError):
        huge.check_room(0)
    with pytest.raises(SpoolFullError):
        huge.write_incoming((b"x",))
    assert list(huge.incoming.iterdir()) == []


def test_incoming_leftovers_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    incoming = spool.open_incoming()
    incoming.write(b"partial")
    assert spool.clean_incoming() == 1
    assert list(spool.incoming.iterdir()) == []
    incoming.discard()
    with pytest.raises(ValueError, match="already closed"):
        incoming.finish()


def test_same_data(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stored = spool.store("studies/a/b-1.dcm", b"META", b"payload" * 1000)
    assert spool.same_data(stored.path, 4, b"payload" * 1000)
    assert not spool.same_data(stored.path, 4, b"payload" * 999 + b"paylOad")
    assert not spool.same_data(stored.path, 4, b"payload")
    assert not spool.same_data("studies/a/missing-1.dcm", 4, b"payload")


# -- state database ----------------------------------------------------------------------------


def new_instance(study: str, sop: str, revision: int = 1, series: str = "1.2.3") -> NewInstance:
    return NewInstance(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        modality="MR",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        path=f"studies/{study_key(study)}/{instance_key(sop)}-{revision}.dcm",
        data_offset=300,
        size=1000,
        revision=revision,
        calling_ae="STORESCU",
    )


@pytest.fixture
def state(tmp_path: Path) -> StateDB:
    db = StateDB(tmp_path / "state.sqlite3")
    yield db  # type: ignore[misc]
    db.close()


def test_schema_is_versioned(tmp_path: Path, state: StateDB) -> None:
    assert state.schema_version() == SCHEMA_VERSION
    conn = sqlite3.connect(tmp_path / "state.sqlite3")
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="schema version 999"):
        StateDB(tmp_path / "state.sqlite3")


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "junk.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a usable state database"):
        StateDB(tmp_path / "junk.sqlite3")


def test_revisions_keep_history_and_one_current(state: StateDB) -> None:
    state.record_instance(new_instance("1.1", "1.1.1"), received_at=100)
    state.record_instance(new_instance("1.1", "1.1.1", revision=2), received_at=101)
    current = state.current_instance("1.1.1")
    assert current is not None and current.revision == 2
    assert [i.revision for i in state.instances("1.1", current_only=False)] == [1, 2]
    assert len(state.instances("1.1")) == 1
    # an older revision recorded late (re-indexing) does not become current
    state.record_instance(new_instance("1.1", "1.1.9", revision=2), received_at=102)
    state.record_instance(new_instance("1.1", "1.1.9", revision=1), received_at=103)
    assert state.current_instance("1.1.9").revision == 2  # type: ignore[union-attr]


def test_study_becomes_ready_exactly_once_per_batch(state: StateDB) -> None:
    state.record_instance(new_instance("1.5", "1.5.1"), received_at=1000)
    state.record_instance(new_instance("1.5", "1.5.2"), received_at=1004)
    assert state.create_ready_jobs(10, now=1013) == []  # 9 s quiet: not yet
    (job_id,) = state.create_ready_jobs(10, now=1014)
    assert state.create_ready_jobs(10, now=1100) == []
    job = state.job(job_id)
    assert job is not None and job.state == "pending" and job.kind == "analysis"
    assert state.study("1.5").state == "pending"  # type: ignore[union-attr]
    # more instances while the job is still pending: the same job covers them
    state.record_instance(new_instance("1.5", "1.5.3"), received_at=1200)
    assert state.study("1.5").state == "receiving"  # type: ignore[union-attr]
    assert state.create_ready_jobs(10, now=1210) == []
    assert state.job(job_id).study_seq == 3  # type: ignore[union-attr]
    assert len(state.jobs()) == 1
    # once the job ran, new instances make a new job
    assert state.claim_job(job_id, "w1") is not None
    assert state.finish_job(job_id)
    state.record_instance(new_instance("1.5", "1.5.4"), received_at=1300)
    (second,) = state.create_ready_jobs(10, now=1310)
    assert second != job_id
    assert [j.state for j in state.jobs()] == ["done", "pending"]


def test_claim_is_atomic_across_threads_and_connections(tmp_path: Path, state: StateDB) -> None:
    state.record_instance(new_instance("1.6", "1.6.1"), received_at=0)
    (job_id,) = state.create_ready_jobs(1, now=10)
    others = [StateDB(tmp_path / "state.sqlite3") for _ in range(4)]
    winners: list[str] = []
    barrier = threading.Barrier(8)

    def claim(db: StateDB, name: str) -> None:
        barrier.wait()
        if db.claim_job(job_id, name) is not None:
            winners.append(name)

    threads = [
        threading.Thread(target=claim, args=(db, f"w{i}"))
        for i, db in enumerate([state, state, state, state, *others])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for db in others:
        db.close()
    assert len(winners) == 1
    job = state.job(job_id)
    assert job is not None and job.state == "running" and job.attempts == 1
    assert job.worker == winners[0]


def test_job_transitions(state: StateDB) -> None:
    state.record_instance(new_instance("1.7", "1.7.1"), received_at=0)
    (job_id,) = state.create_ready_jobs(1, now=10)
    assert not state.finish_job(job_id)  # not running yet
    assert state.claim_job(job_id) is not None
    assert state.claim_job(job_id) is None
    assert state.fail_job(job_id, "segmentation failed")
    job = state.job(job_id)
    assert job is not None and job.state == "failed" and job.error == "segmentation failed"
    assert state.requeue(job_id)
    assert state.job(job_id).state == "pending"  # type: ignore[union-attr]
    assert state.claim_job(job_id).attempts == 2  # type: ignore[union-attr]
    assert state.requeue_running() == [job_id]
    assert state.job_counts()["pending"] == 1
    assert not state.requeue(job_id)  # already pending


def test_one_pending_job_per_study(state: StateDB) -> None:
    state.record_instance(new_instance("1.8", "1.8.1"), received_at=0)
    (first,) = state.create_ready_jobs(1, now=10)
    state.claim_job(first)
    state.record_instance(new_instance("1.8", "1.8.2"), received_at=20)
    (second,) = state.create_ready_jobs(1, now=30)
    assert not state.requeue(first)  # the pending second job already covers the study
    with pytest.raises(sqlite3.IntegrityError), state._write() as conn:
        conn.execute(
            "INSERT INTO jobs (study_id, kind, state, study_seq, created_at, updated_at) "
            "VALUES (?, 'analysis', 'pending', 1, 0, 0)",
            (state.job(second).study_id,),  # type: ignore[union-attr]
        )


def test_state_survives_reopen(tmp_path: Path) -> None:
    with StateDB(tmp_path / "s.sqlite3") as db:
        db.record_instance(new_instance("1.9", "1.9.1"), received_at=5)
    with StateDB(tmp_path / "s.sqlite3") as db:
        assert db.instance_count() == 1
        assert db.next_stability_deadline(10) == 15
        assert db.study_counts() == {"receiving": 1}


def test_reindex_adds_files_the_database_lacks(tmp_path: Path, state: StateDB) -> None:
    series = make_mr_series(tmp_path / "in", 3)
    spool = Spool(tmp_path / "spool")
    for index, (path, sop) in enumerate(zip(series.files, series.sop_uids, strict=True)):
        data, ts = dataset_bytes(path)
        meta = encode_file_meta("1.2.840.10008.5.1.4.1.1.4", sop, ts)
        relative = spool.relative_path(series.study_uid, sop, 1)
        spool.store(relative, meta, data)
        if index == 0:
            state.record_instance(
                NewInstance(series.study_uid, series.series_uid, sop, "1.2.840.10008.5.1.4.1.1.4",
                            "MR", ts, relative, len(meta), len(meta) + len(data), 1, "")
            )
    # a file whose name does not match its content is not indexed
    (spool.studies / "deadbeef").mkdir()
    (spool.studies / "deadbeef" / f"{'0' * 40}-1.dcm").write_bytes(series.files[0].read_bytes())
    assert reindex_spool(state, spool) == 2
    assert reindex_spool(state, spool) == 0
    assert {i.sop_instance_uid for i in state.instances(series.study_uid)} == set(series.sop_uids)


# -- C-STORE request decoding -------------------------------------------------------------------


def _received(request: C_STORE) -> Any:
    """A C-STORE-RQ as the SCP's DIMSE layer holds it once all its P-DATA arrived."""
    sent = C_STORE_RQ()
    sent.primitive_to_message(request)
    received = DIMSEMessage()
    complete = False
    for pdata in sent.encode_msg(1, 16384):
        complete = received.decode_msg(pdata)
    assert complete
    return received


@pytest.mark.parametrize("converted", [False, True])
@pytest.mark.parametrize("priority", [0, 1, 2])
def test_c_store_request_fast_path_matches_pynetdicom(priority: int, converted: bool) -> None:
    request = C_STORE()
    request.MessageID = 4242
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    request.Priority = priority
    request.DataSet = BytesIO(b"\x08\x00\x18\x00\x04\x00\x00\x00" + b"1.23")
    message = _received(request)
    if converted:  # pynetdicom may have read (and converted) some elements already
        for keyword in ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID"):
            getattr(message.command_set, keyword)
    ours = c_store_rq_primitive(message)
    theirs = _received(request).message_to_primitive()
    assert ours is not None
    for name in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                 "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours._context_id == theirs._context_id == 1
    assert ours.DataSet.getvalue() == theirs.DataSet.getvalue()


def test_c_store_request_fast_path_leaves_the_unusual_to_pynetdicom() -> None:
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    request.AffectedSOPInstanceUID = "1.2.3.4"
    request.MoveOriginatorApplicationEntityTitle = "MOVER"
    request.MoveOriginatorMessageID = 3
    assert c_store_rq_primitive(_received(request)) is None
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    request.AffectedSOPInstanceUID = "1.2..4"  # not a valid UID: pynetdicom decides
    assert c_store_rq_primitive(_received(request)) is None


def _command_bytes(request: C_STORE) -> bytes:
    """The encoded command set of a C-STORE-RQ as pynetdicom sends it."""
    sent = C_STORE_RQ()
    sent.primitive_to_message(request)
    fragments = [
        bytes(data[1:])
        for pdata in sent.encode_msg(1, 16384)
        for _, data in pdata.presentation_data_value_list
        if data[0] & 0x01
    ]
    return b"".join(fragments)


@pytest.mark.parametrize("priority", [0, 1, 2])
def test_direct_command_reader_matches_pynetdicom(priority: int) -> None:
    request = C_STORE()
    request.MessageID = 65535
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345"  # even length
    request.Priority = priority
    request.DataSet = BytesIO(b"\x08\x00\x18\x00\x04\x00\x00\x00" + b"1.23")
    theirs = _received(request).message_to_primitive()
    assert parse_c_store_rq(_command_bytes(request)) == (
        theirs.MessageID, theirs.AffectedSOPClassUID, theirs.AffectedSOPInstanceUID, priority,
    )
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # odd: padded with NUL
    assert parse_c_store_rq(_command_bytes(request)) == (
        65535, "1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1", priority,
    )


def test_direct_command_reader_leaves_everything_else_to_pynetdicom() -> None:
    def request(**values: object) -> C_STORE:
        primitive = C_STORE()
        primitive.MessageID = 7
        primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        primitive.AffectedSOPInstanceUID = "1.2.3.4"
        primitive.DataSet = BytesIO(b"\x08\x00\x18\x00\x04\x00\x00\x00" + b"1.23")
        for name, value in values.items():
            setattr(primitive, name, value)
        return primitive

    plain = _command_bytes(request())
    assert parse_c_store_rq(plain) == (7, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", 2)
    moved = request(MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=3)
    assert parse_c_store_rq(_command_bytes(moved)) is None
    assert parse_c_store_rq(_command_bytes(request(AffectedSOPInstanceUID="1.2..4"))) is None
    assert parse_c_store_rq(plain[:-1]) is None  # cut inside the last element
    assert parse_c_store_rq(plain + plain[8:20]) is None  # an element repeated
    echo = plain.replace(b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x00", b"\x00\x00\x00\x01\x02"
                         b"\x00\x00\x00\x30\x00")
    assert echo != plain
    assert parse_c_store_rq(echo) is None  # Command Field C-ECHO-RQ
    no_data = plain.replace(b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x00",
                            b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01")
    assert no_data != plain
    assert parse_c_store_rq(no_data) is None  # Command Data Set Type: no data set
