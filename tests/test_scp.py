"""The DICOM listener over real loopback associations (dcmtk tools and pynetdicom)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA

from opmri_node import dicomnet
from opmri_node.dicomnet import (
    ASSOCIATE_PDU_LIMIT,
    BoundedSocket,
    DirectStore,
    NodeAssociation,
    NodeAssociationServer,
    PDUTooLongError,
)
from opmri_node.service import Node
from opmri_node.spool import file_layout
from opmri_node.state import StateDB
from tests.node_fixtures import (
    data_set_of,
    dciodvfy_errors,
    dcmtk_variants,
    load,
    make_mr_series,
    mr_dataset,
    run_tool,
    running_node,
    scu_ae,
    store_statuses,
    storescu,
    write_config,
)

MR = MRImageStorage
VERIFICATION = "1.2.840.10008.1.1"

STORESCU_PROPOSE = {
    ExplicitVRLittleEndian: "-xe",
    DeflatedExplicitVRLittleEndian: "-xd",
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRBigEndian: "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE
}
"""storescu option that proposes a file's transfer syntax (JPEG process 14 has none)."""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with running_node(load(write_config(tmp_path / "node"))) as running:
        yield running


def state_of(node: Node) -> StateDB:
    assert node.state is not None
    return node.state


def stored_path(node: Node, sop_uid: str) -> Path:
    record = state_of(node).current_instance(sop_uid)
    assert record is not None, "instance not recorded"
    assert node.spool is not None
    return node.spool.path(record.path)


def test_echoscu_and_storescu(node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host, port = node.address
    caplog.set_level(logging.INFO, logger="opmri_node.audit")
    echo = run_tool(["echoscu", "-aet", "STORESCU", "-aec", "OPMRI", host, str(port)])
    assert echo.returncode == 0, echo.stderr
    series = make_mr_series(tmp_path / "in", 5)
    result = storescu(host, port, series.files)
    assert result.returncode == 0, result.stderr
    assert store_statuses(result.stdout + result.stderr) == ["Success"] * 5
    for path, sop in zip(series.files, series.sop_uids, strict=True):
        stored = stored_path(node, sop)
        assert data_set_of(stored) == data_set_of(path)  # byte for byte as received
        assert dciodvfy_errors(stored) == []
        ds = dcmread(stored)
        assert ds.file_meta.SourceApplicationEntityTitle == "STORESCU"
        assert ds.file_meta.MediaStorageSOPInstanceUID == sop
    study = state_of(node).study(series.study_uid)
    assert study is not None and study.instances == 5 and study.series == 1
    deadline = time.monotonic() + 5
    while not any("stored=5" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "no audit line"
        time.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "stored=5" in r.getMessage())
    for part in ("calling_ae='STORESCU'", "called_ae='OPMRI'", "peer=modality",
                 "outcome=released", "duration_s=", "studies=1"):
        assert part in line


def test_transfer_syntaxes_are_stored_as_received(node: Node, tmp_path: Path) -> None:
    series = make_mr_series(tmp_path / "in", 1)
    files = list(dcmtk_variants(series.files[0], tmp_path / "variants").values())
    for name in ("MR_small_jp2klossless.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                 "MR_small_RLE.dcm"):
        files.append(Path(get_testdata_file(name)))
    host, port = node.address
    # byte for byte: pynetdicom sends each file's data set unchanged in its own syntax
    for path in files:
        ts, data = data_set_of(path)
        assert _send_raw(host, port, path) == 0x0000, path.name
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        stored = stored_path(node, sop)
        assert data_set_of(stored) == (ts, data), path.name
        record = state_of(node).current_instance(sop)
        assert record is not None and record.transfer_syntax_uid == ts
        if path.is_relative_to(tmp_path):  # our own MR: the node adds no IOD errors
            assert dciodvfy_errors(stored) == dciodvfy_errors(path), path.name
    assert len({data_set_of(p)[0] for p in files}) >= 12
    # dcmtk's storescu proposing each syntax (it re-encodes the header, so compare content)
    for path in files:
        ts, _ = data_set_of(path)
        option = STORESCU_PROPOSE.get(ts)
        if option is None:
            continue
        copy = dcmread(path)
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = tmp_path / "dcmtk" / path.name
        target.parent.mkdir(exist_ok=True)
        copy.save_as(target)
        result = storescu(host, port, [target], extra=["-R", option])
        assert store_statuses(result.stdout + result.stderr) == ["Success"], (path, result.stderr)
        stored = dcmread(stored_path(node, copy.SOPInstanceUID))
        assert stored.file_meta.TransferSyntaxUID == ts, path.name
        assert stored.PixelData == copy.PixelData, path.name


def test_unknown_calling_ae_is_rejected(node: Node, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opmri_node.audit")
    host, port = node.address
    series = make_mr_series(tmp_path / "in", 1)
    result = storescu(host, port, series.files, calling="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assoc = scu_ae("INTRUDER").associate(host, port, ae_title="OPMRI",
                                         contexts=_contexts())
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert state_of(node).instance_count() == 0
    _wait_for_audit(caplog, "reason='calling AE title is not a configured peer'")


def test_wrong_called_ae_is_rejected(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opmri_node.audit")
    host, port = node.address
    echo = run_tool(["echoscu", "-aet", "STORESCU", "-aec", "SOMEONE", host, str(port)])
    assert echo.returncode != 0
    assert "Called AE Title Not Recognized" in echo.stdout + echo.stderr
    assoc = scu_ae("STORESCU").associate(host, port, ae_title="NOTOPMRI", contexts=_contexts())
    rj = assoc.acceptor.primitive
    assert assoc.is_rejected and (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 7)
    _wait_for_audit(caplog, "called_ae='NOTOPMRI'")


def test_host_check(node: Node) -> None:
    host, port = node.address
    # SCANNER is configured with host 127.0.0.1 and check_host: true
    ok = scu_ae("SCANNER").associate(host, port, ae_title="OPMRI", contexts=_contexts())
    assert ok.is_established
    ok.release()
    wrong = scu_ae("SCANNER").associate(
        host, port, ae_title="OPMRI", contexts=_contexts(), bind_address=("127.0.0.2", 0)
    )
    rj = wrong.acceptor.primitive
    assert wrong.is_rejected and (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)
    # STORESCU has no host check: any address is fine
    other = scu_ae("STORESCU").associate(
        host, port, ae_title="OPMRI", contexts=_contexts(), bind_address=("127.0.0.2", 0)
    )
    assert other.is_established
    other.release()


def test_peer_without_may_send_can_only_verify(node: Node, tmp_path: Path) -> None:
    host, port = node.address
    assoc = scu_ae("VIEWER").associate(host, port, ae_title="OPMRI", contexts=_contexts())
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assert accepted == {VERIFICATION}
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    series = make_mr_series(tmp_path / "in", 1)
    result = storescu(host, port, series.files, calling="VIEWER")
    assert result.returncode != 0
    assert state_of(node).instance_count() == 0


def test_unsupported_contexts_are_rejected_per_context(node: Node) -> None:
    from pynetdicom.presentation import build_context

    host, port = node.address
    find = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
    mpeg2 = "1.2.840.10008.1.2.4.100"
    contexts = [
        build_context(MR, [mpeg2]),
        build_context(find, [ExplicitVRLittleEndian]),
        build_context(MR, ["1.2.840.10008.1.2.4.70", ExplicitVRLittleEndian]),
    ]
    assoc = scu_ae().associate(host, port, ae_title="OPMRI", contexts=contexts)
    assert assoc.is_established
    results = {cx.context_id: cx.result for cx in assoc.rejected_contexts}
    assert results == {1: 0x04, 3: 0x03}  # transfer syntax / abstract syntax not supported
    (accepted,) = assoc.accepted_contexts
    assert accepted.transfer_syntax[0] == "1.2.840.10008.1.2.4.70"  # the requestor's first
    assoc.release()


def test_a_repeated_association_request_is_not_decoded_again(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom.presentation import build_context

    decoded: list[int] = []
    original = dicomnet._KnownAssociateRQ.decode

    def counting_decode(self: Any, bytestream: bytes) -> None:
        decoded.append(len(bytestream))
        original(self, bytestream)

    monkeypatch.setattr(dicomnet._KnownAssociateRQ, "decode", counting_decode)
    monkeypatch.setattr(dicomnet, "_KNOWN_RQ", {})
    host, port = node.address
    mpeg2 = "1.2.840.10008.1.2.4.100"

    def proposal() -> list[Any]:
        return [build_context(MR, [mpeg2]), *_contexts()]

    outcomes = []
    for calling in ("STORESCU", "STORESCU", "STORESCU", "VIEWER"):
        assoc = scu_ae(calling).associate(host, port, ae_title="OPMRI", contexts=proposal())
        assert assoc.is_established
        outcomes.append((
            sorted((cx.context_id, str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                   for cx in assoc.accepted_contexts),
            sorted((cx.context_id, cx.result) for cx in assoc.rejected_contexts),
        ))
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    # the same request thrice is decoded once and negotiated the same every time; another
    # calling AE title is another request, under its own peer's policy
    assert len(decoded) == 2
    assert outcomes[0] == outcomes[1] == outcomes[2]
    verification_syntax = str(build_context(VERIFICATION).transfer_syntax[0])
    assert outcomes[0][0] == [(3, VERIFICATION, verification_syntax),
                              (5, MR, ExplicitVRLittleEndian)]
    assert outcomes[0][1] == [(1, 0x04)]
    assert [cx[1] for cx in outcomes[3][0]] == [VERIFICATION]
    series = make_mr_series(tmp_path / "in", 2)
    for _ in range(2):
        assert storescu(host, port, series.files).returncode == 0
    assert state_of(node).instance_count() == 2


def test_a_kept_association_request_hands_out_independent_copies() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = "STORESCU"
    request.called_ae_title = "OPMRI"
    request.presentation_context_definition_list = _contexts()
    for context_id, context in zip((1, 3), request.presentation_context_definition_list,
                                   strict=True):
        context.context_id = context_id
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    request.user_information = [length]
    raw = A_ASSOCIATE_RQ(request).encode()
    kept = dicomnet._KnownAssociateRQ()
    kept.decode(raw)
    assert kept.keep_primitive()
    first, second = kept.to_primitive(), kept.to_primitive()
    assert first is not second
    first.presentation_context_definition_list.clear()
    first.user_information.clear()
    first.result = 0x01
    assert [str(cx.abstract_syntax) for cx in second.presentation_context_definition_list] == [
        VERIFICATION, MR]
    assert second.user_information[0].maximum_length_received == 16384
    assert second.result is None
    assert str(second.calling_ae_title).strip() == "STORESCU"


def test_association_limit(tmp_path: Path) -> None:
    config = load(write_config(tmp_path, node_extra="  max_associations: 2\n"))
    with running_node(config) as node:
        host, port = node.address
        held = [scu_ae().associate(host, port, ae_title="OPMRI", contexts=_contexts())
                for _ in range(2)]
        assert all(a.is_established for a in held)
        third = scu_ae().associate(host, port, ae_title="OPMRI", contexts=_contexts())
        rj = third.acceptor.primitive
        assert third.is_rejected and (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
        for assoc in held:
            assoc.release()
        time.sleep(0.3)
        again = scu_ae().associate(host, port, ae_title="OPMRI", contexts=_contexts())
        assert again.is_established
        again.release()


def test_pdu_header_claiming_4_gib_is_refused_without_buffering(node: Node) -> None:
    host, port = node.address
    process = psutil.Process()
    before = process.memory_info().rss
    sent = 0
    closed_early = False
    with socket.create_connection((host, port)) as sock:
        sock.settimeout(10)
        sock.sendall(bytes([0x01, 0x00]) + (0xFFFFFFFF).to_bytes(4, "big"))
        chunk = b"\0" * (1 << 20)
        try:
            for _ in range(64):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            closed_early = True
        if not closed_early:
            closed_early = sock.recv(16) == b""  # the node closed its side
    growth = process.memory_info().rss - before
    assert closed_early
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert sent < 64 * 2**20
    # the connection's slot is freed at once, not after the ACSE timeout
    receiver = node.receiver
    assert receiver is not None and receiver._server is not None
    deadline = time.monotonic() + 2
    while receiver._server.open_connections:
        assert time.monotonic() < deadline, "the refused connection still holds a slot"
        time.sleep(0.02)
    # and the node still serves others
    assoc = scu_ae().associate(host, port, ae_title="OPMRI", contexts=_contexts())
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_data_set_fragments_in_any_packing_are_stored_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain C-STORE is received directly, its data set fragments (one per P-DATA-TF) going
    from the socket to the file; PDUs packing several PDVs (a command's end with data, two data
    fragments) take pynetdicom's path, also when they come in the middle of a data set received
    directly. Either way the file holds exactly the data set sent."""
    completed: list[int] = []
    complete = NodeAssociation.complete_direct

    def counted(self: NodeAssociation, direct: DirectStore) -> None:
        completed.append(direct.message_id)
        complete(self, direct)

    monkeypatch.setattr(NodeAssociation, "complete_direct", counted)
    config = load(write_config(tmp_path / "node", node_extra="  max_pdu_length: 4096\n"))
    series = make_mr_series(tmp_path / "in", 4, size=256)  # ~32 fragments each
    with running_node(config) as node:
        host, port = node.address
        ae = scu_ae()
        ae.add_requested_context(MR, ExplicitVRLittleEndian)
        assoc = ae.associate(host, port, ae_title="OPMRI")
        assert assoc.is_established
        send_pdu = assoc.dul.send_pdu
        held: list[tuple[int, bytes]] = []
        packing = {"from": -1, "sent": 0}

        def packed(primitive: object) -> None:
            if not isinstance(primitive, P_DATA):
                send_pdu(primitive)
                return
            packing["sent"] += 1
            if packing["from"] < 0 or packing["sent"] <= packing["from"]:
                send_pdu(primitive)
                return
            held.extend(primitive.presentation_data_value_list)
            last = held[-1][1][0] & 0x03 == 0x02
            if len(held) >= 2 or last:
                merged = P_DATA()
                merged.presentation_data_value_list = [[i, bytes(v)] for i, v in held]  # type: ignore[misc]
                held.clear()
                send_pdu(merged)

        assoc.dul.send_pdu = packed  # type: ignore[method-assign]
        previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        # 0: one PDV per PDU; 1: all packed; 2: packed from the 4th PDU on; 3: one per PDU
        packed_from = [-1, 0, 3, -1]
        try:
            statuses = []
            for index, path in enumerate(series.files):
                packing["from"], packing["sent"] = packed_from[index], 0
                statuses.append(int(assoc.send_c_store(path, msg_id=index + 1).Status))
        finally:
            pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous
            assoc.release()
        assert statuses == [0, 0, 0, 0]
        for path, sop in zip(series.files, series.sop_uids, strict=True):
            assert data_set_of(stored_path(node, sop)) == data_set_of(path)
        assert _partial_writes(node.spool.incoming) == []  # type: ignore[union-attr]
    assert completed == [1, 4]  # the third was handed to pynetdicom midway


def test_bounded_socket_buffers_reads_and_hands_out_views() -> None:
    """Reads go through one buffer: peeked bytes stay until consumed, replaced bytes are read,
    the buffer moves what is left to its start and grows for a PDU longer than it, and the
    bytes always come out in the order they were sent."""
    left, right = socket.socketpair()
    with left, right:
        sock = BoundedSocket(Association(AE(), "acceptor"), left,
                             max_pdu_length=2 * 1024 * 1024, read_timeout=5)
        assert not sock.ready
        right.sendall(b"abcdef")
        assert sock.ready
        assert sock.recv(2) == b"ab"
        assert sock.buffered == 4
        with sock.peek(3) as view:
            assert bytes(view) == b"cde"
        sock.overwrite(1, b"X")
        assert sock.recv(3) == b"cXe"
        sock.consume(1)
        assert sock.buffered == 0
        sent = bytes(range(256)) * 4096 * 3  # 3 MiB, longer than the first buffer
        received = bytearray()
        writer = threading.Thread(target=right.sendall, args=(sent,))
        writer.start()
        sizes = [5, 300_000, 1, 2 * 1024 * 1024, 7]
        for size in sizes:
            with sock.peek(size) as view:
                assert len(view) == size
                received += view
            sock.consume(size)
        received += sock.recv(len(sent) - len(received))
        writer.join()
        assert bytes(received) == sent
        right.sendall(b"gh")
        right.shutdown(socket.SHUT_WR)
        assert sock.recv(4) == b"gh"  # fewer: the peer closed the connection
        assert sock.failed


def test_bounded_socket_limits_pdu_length_and_read_time() -> None:
    left, right = socket.socketpair()
    with left, right:
        sock = BoundedSocket(Association(AE(), "acceptor"), left, max_pdu_length=4096,
                             read_timeout=0.3)
        with pytest.raises(PDUTooLongError):
            sock.recv(ASSOCIATE_PDU_LIMIT + 7)
        right.sendall(b"abc")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            sock.recv(4)
        assert 0.25 < time.monotonic() - started < 3
        assert sock.failed


def test_plain_store_handler_errors_and_statuses_reach_the_peer() -> None:
    """The node's own C-STORE service path gives pynetdicom's answers: a handler that raises is
    0xC211 and the association goes on; a Dataset status keeps its error comment."""
    calls: list[str] = []

    def on_store(event: evt.Event) -> int | Dataset:
        calls.append(str(event.request.AffectedSOPInstanceUID))
        if len(calls) == 1:
            raise RuntimeError("handler failure")
        if len(calls) == 2:
            status = Dataset()
            status.Status = 0xA900
            status.ErrorComment = "kept"
            return status
        return 0x0000

    scp = AE(ae_title="NODE")
    scp.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    server = scp.make_server(
        ("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store)],
        server_class=NodeAssociationServer, max_pdu_length=16384, max_connections=4,
    )
    scp._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="NODE")
        assert assoc.is_established
        source = dcmread(get_testdata_file("MR_small.dcm"))
        source.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        answers = []
        for index in range(3):
            source.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{index + 1}"
            answers.append(assoc.send_c_store(source))
        assert assoc.is_established
        assoc.release()
    finally:
        server.shutdown()
        server.server_close()
    assert [answer.Status for answer in answers] == [0xC211, 0xA900, 0x0000]
    assert answers[1].ErrorComment == "kept"
    assert calls == [f"1.2.826.0.1.3680043.8.498.{i}" for i in (1, 2, 3)]


def test_idle_and_slow_clients_do_not_block_others(tmp_path: Path) -> None:
    extra = "  timeouts:\n    acse: 1\n    network: 1\n"
    with running_node(load(write_config(tmp_path, node_extra=extra))) as node:
        host, port = node.address
        idle = socket.create_connection((host, port))
        slow = socket.create_connection((host, port))
        slow.sendall(bytes([0x01, 0x00]) + (200).to_bytes(4, "big"))  # then trickle
        started = time.monotonic()
        echo = run_tool(["echoscu", "-aet", "STORESCU", "-aec", "OPMRI", host, str(port)])
        assert echo.returncode == 0 and time.monotonic() - started < 5
        for sock, trickle in ((idle, False), (slow, True)):
            sock.settimeout(0.4)
            deadline = time.monotonic() + 8
            while True:
                assert time.monotonic() < deadline, "connection was not closed by the node"
                try:
                    if trickle:
                        sock.sendall(b"\x00")
                    if sock.recv(64) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            sock.close()


def test_path_traversal_uids_write_nothing_outside_the_spool(node: Node, tmp_path: Path) -> None:
    host, port = node.address
    before = {p for p in tmp_path.rglob("*")}
    assoc = scu_ae().associate(host, port, ae_title="OPMRI", contexts=_contexts())
    assert assoc.is_established
    evil_sop = mr_dataset(
        study_uid=generate_uid(), series_uid=generate_uid(), frame_uid=generate_uid(),
        sop_uid=f"../../../../{tmp_path.name}/evil-sop", index=0,
    )
    evil_study = mr_dataset(
        study_uid="../../../../../tmp/evil-study", series_uid=generate_uid(),
        frame_uid=generate_uid(), sop_uid=generate_uid(), index=0,
    )
    with pytest.warns(UserWarning):
        status_sop = assoc.send_c_store(evil_sop)
        status_study = assoc.send_c_store(evil_study)
    assoc.release()
    assert status_sop.Status == 0xC000 and "not a valid UID" in status_sop.ErrorComment
    assert status_study.Status == 0xC000 and "Study Instance UID" in status_study.ErrorComment
    assert state_of(node).instance_count() == 0
    after = {p for p in tmp_path.rglob("*")}
    assert not any("evil" in str(p) for p in after)
    assert not any(p.name.startswith("evil-") for p in Path("/tmp").iterdir())
    assert node.spool is not None
    assert all(p.is_relative_to(node.spool.root) or p.is_relative_to(tmp_path / "node" / "data")
               for p in after - before if p.is_file())


@pytest.fixture
def small_pdu_node(tmp_path: Path) -> Iterator[Node]:
    """A node accepting PDUs of 16 KiB: data sets arrive in many fragments."""
    config = load(write_config(tmp_path / "node", node_extra="  max_pdu_length: 16384\n"))
    with running_node(config) as running:
        yield running


@pytest.mark.parametrize("size", [64, 256], ids=["header-at-the-end", "header-read-early"])
def test_uid_mismatch_and_missing_uids_are_refused(
    small_pdu_node: Node, tmp_path: Path, size: int
) -> None:
    node = small_pdu_node
    host, port = node.address
    study, series = generate_uid(), generate_uid()
    cases = {}
    # file meta (which the SCU copies into the C-STORE request) differs from the data set
    for name, meta_sop, meta_class in (
        ("instance", generate_uid(), MR),
        ("class", None, "1.2.840.10008.5.1.4.1.1.7"),
    ):
        ds = mr_dataset(study_uid=study, series_uid=series, sop_uid=generate_uid(),
                        frame_uid=generate_uid(), index=0, size=size)
        ds.file_meta.MediaStorageSOPInstanceUID = meta_sop or ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = meta_class
        path = tmp_path / f"{name}.dcm"
        ds.preamble = b"\x00" * 128
        ds.file_meta.FileMetaInformationVersion = b"\x00\x01"
        ds.file_meta.ImplementationClassUID = "1.2.3.4"
        ds.save_as(path, enforce_file_format=False)
        cases[name] = path
    missing = mr_dataset(study_uid=study, series_uid=series, sop_uid=generate_uid(),
                         frame_uid=generate_uid(), index=1, size=size)
    del missing.StudyInstanceUID
    ae = scu_ae()
    ae.add_requested_context(MR, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title="OPMRI")
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        instance_status = assoc.send_c_store(cases["instance"])
        class_status = assoc.send_c_store(cases["class"])
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous
    missing_status = assoc.send_c_store(missing)
    assoc.release()
    assert instance_status.Status == 0xA900
    assert "SOP Instance UID differs" in instance_status.ErrorComment
    assert class_status.Status == 0xA900
    assert missing_status.Status == 0xC000
    assert "no Study Instance UID" in missing_status.ErrorComment
    assert state_of(node).instance_count() == 0
    assert node.spool is not None and _partial_writes(node.spool.incoming) == []


def test_duplicates_and_changed_instances(node: Node, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    host, port = node.address
    series = make_mr_series(tmp_path / "in", 2)
    for _ in range(2):
        result = storescu(host, port, series.files)
        assert store_statuses(result.stdout + result.stderr) == ["Success"] * 2
    state = state_of(node)
    assert state.instance_count(current_only=False) == 2
    assert node.spool is not None
    assert len(list(node.spool.studies.rglob("*.dcm"))) == 2
    _wait_for_audit(caplog, "duplicates=2")
    # same SOP Instance UID, different pixel data: kept as a new revision
    changed = dcmread(series.files[0])
    changed.PixelData = bytes(len(changed.PixelData))
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path, enforce_file_format=True)
    result = storescu(host, port, [changed_path])
    assert store_statuses(result.stdout + result.stderr) == ["Success"]
    revisions = state.instances(series.study_uid, current_only=False)
    assert sorted((r.revision, r.current) for r in revisions if r.sop_instance_uid ==
                  series.sop_uids[0]) == [(1, False), (2, True)]
    assert data_set_of(stored_path(node, series.sop_uids[0])) == data_set_of(changed_path)
    assert len(list(node.spool.studies.rglob("*.dcm"))) == 3


def test_disk_reserve_refuses_with_out_of_resources(tmp_path: Path) -> None:
    free_mb = psutil.disk_usage(str(tmp_path)).free // 2**20
    config = load(write_config(tmp_path, min_free_disk_mb=free_mb + 10**6))
    series = make_mr_series(tmp_path / "in", 2)
    with running_node(config) as node:
        host, port = node.address
        result = storescu(host, port, series.files)
        statuses = store_statuses(result.stdout + result.stderr)
        assert statuses and all("OutOfResources" in s for s in statuses), statuses
        assoc = scu_ae().associate(host, port, ae_title="OPMRI", contexts=_contexts())
        status = assoc.send_c_store(dcmread(series.files[0]))
        assoc.release()
        assert status.Status == 0xA700
        assert "disk space" in status.ErrorComment
        assert state_of(node).instance_count() == 0
        assert node.spool is not None
        assert list(node.spool.studies.rglob("*.dcm")) == []
        assert _partial_writes(node.spool.incoming) == []


def test_concurrent_associations(node: Node, tmp_path: Path) -> None:
    host, port = node.address
    batches = [make_mr_series(tmp_path / f"in{i}", 6) for i in range(4)]
    results: list[list[str]] = []

    def send(files: list[Path]) -> None:
        out = storescu(host, port, files)
        results.append(store_statuses(out.stdout + out.stderr))

    threads = [threading.Thread(target=send, args=(b.files,)) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [len(r) for r in results] == [6] * 4
    assert all(s == "Success" for r in results for s in r)
    assert state_of(node).instance_count() == 24
    for batch in batches:
        for path, sop in zip(batch.files, batch.sop_uids, strict=True):
            assert data_set_of(stored_path(node, sop)) == data_set_of(path)


def test_logs_above_debug_carry_no_patient_data(node: Node, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    host, port = node.address
    series = make_mr_series(tmp_path / "in", 2)
    storescu(host, port, series.files)
    storescu(host, port, series.files)  # duplicates
    storescu(host, port, series.files, calling="INTRUDER")
    bad = mr_dataset(study_uid=series.study_uid, series_uid=series.series_uid,
                     sop_uid=generate_uid(), frame_uid=generate_uid(), index=3)
    del bad.SeriesInstanceUID
    assoc = scu_ae().associate(host, port, ae_title="OPMRI", contexts=_contexts())
    assoc.send_c_store(bad)
    assoc.release()
    time.sleep(0.3)
    forbidden = ["Doe^Jane", "Doe", "TEST0001", "19500101", "ACC0001", series.study_uid,
                 series.series_uid, bad.SOPInstanceUID, *series.sop_uids]
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG)
    assert "association from=" in text
    for value in forbidden:
        assert value not in text


def test_file_layout_of_stored_files_matches_the_state(node: Node, tmp_path: Path) -> None:
    host, port = node.address
    series = make_mr_series(tmp_path / "in", 1)
    storescu(host, port, series.files)
    record = state_of(node).current_instance(series.sop_uids[0])
    assert record is not None and node.spool is not None
    path = node.spool.path(record.path)
    offset, ts = file_layout(path)
    assert (offset, ts, path.stat().st_size) == (
        record.data_offset, record.transfer_syntax_uid, record.size
    )
    assert series.study_uid not in record.path and series.sop_uids[0] not in record.path


def _open_spool_files(node: Node) -> list[str]:
    assert node.spool is not None
    root = str(node.spool.root)
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(root) and target.endswith(".dcm"):
                targets.append(target)
    return targets


def test_committed_files_are_released_after_their_responses(node: Node, tmp_path: Path) -> None:
    """A committed file is closed (and dropped from the page cache) once its response went
    out; an association keeps none open past its end."""
    host, port = node.address
    series = make_mr_series(tmp_path / "in", 6)
    ae = scu_ae()
    ae.add_requested_context(MR, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title="OPMRI")
    assert assoc.is_established
    try:
        for path in series.files:
            assert assoc.send_c_store(path).Status == 0x0000
            assert len(_open_spool_files(node)) <= 1
    finally:
        assoc.release()
    deadline = time.monotonic() + 5
    while _open_spool_files(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_spool_files(node) == []
    assert state_of(node).instance_count() == len(series.files)


def _send_raw(host: str, port: int, path: Path) -> int:
    """C-STORE a file's data set as it is, proposing only its own transfer syntax."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    ae = scu_ae()
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate(host, port, ae_title="OPMRI")
    assert assoc.is_established
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return int(status.Status)


def _contexts() -> list:
    from pynetdicom.presentation import build_context

    return [
        build_context(VERIFICATION),
        build_context(MR, [ExplicitVRLittleEndian]),
    ]


def _wait_for_audit(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in r.getMessage() for r in caplog.records if r.name == "opmri_node.audit"):
        assert time.monotonic() < deadline, f"no audit line with {text!r}"
        time.sleep(0.05)


def _partial_writes(incoming: Path) -> list[Path]:
    """Files in ``incoming/`` holding data (the empty ones are prepared for later instances)."""
    return [path for path in incoming.iterdir() if path.stat().st_size]
