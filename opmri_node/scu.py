"""The node as an SCU: C-ECHO and C-STORE to configured peers.

:func:`send_files` sends DICOM files as they are on disk: the data set bytes go out without
decoding, in the file's own transfer syntax, over one association per batch of at most 128
presentation contexts (one context per SOP class and transfer syntax found in the files).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydicom.filereader import read_preamble
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from opmri_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from opmri_node.config import NodeConfig, PeerConfig
from opmri_node.dicomnet import enable_nodelay
from opmri_node.scp import VERIFICATION
from opmri_node.spool import is_valid_uid

LOGGER = logging.getLogger(__name__)

MAX_CONTEXTS: Final[int] = 128
"""Presentation contexts one A-ASSOCIATE-RQ may propose (PS3.8: odd context ids 1..255)."""


def make_ae(config: NodeConfig) -> AE:
    """An AE that calls peers with the node's AE title and timeouts."""
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = node.timeouts.acse
    ae.dimse_timeout = node.timeouts.dimse
    ae.network_timeout = node.timeouts.network
    ae.connection_timeout = node.timeouts.connect
    ae.maximum_pdu_size = node.max_pdu_length
    return ae


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        enable_nodelay(sock.socket)


def _associate(ae: AE, peer: PeerConfig) -> Association:
    return ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
    )


def describe_failure(assoc: Association) -> str:
    """Why an association was not established, in words."""
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = getattr(primitive, "result_str", "")
        source = getattr(primitive, "source_str", "")
        reason = getattr(primitive, "reason_str", "")
        return f"association rejected ({result}, {source}: {reason})"
    if assoc.acceptor.primitive is None:
        return "no association (connection refused, host unreachable or no answer in time)"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "no association"


@dataclass(frozen=True)
class EchoResult:
    """The outcome of a C-ECHO."""

    peer: str
    ok: bool
    seconds: float
    status: int | None = None
    error: str = ""


def echo(config: NodeConfig, peer_name: str) -> EchoResult:
    """C-ECHO a configured peer.

    Raises:
        KeyError: if no peer has that name.
    """
    peer = config.peer(peer_name)
    ae = make_ae(config)
    ae.add_requested_context(VERIFICATION)
    started = time.monotonic()
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        elapsed = time.monotonic() - started
        return EchoResult(peer_name, False, elapsed, error=describe_failure(assoc))
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    elapsed = time.monotonic() - started
    code = int(status.Status) if status and "Status" in status else None
    if code is None:
        return EchoResult(peer_name, False, elapsed, error="no response to C-ECHO")
    return EchoResult(peer_name, code == 0x0000, elapsed, status=code)


@dataclass(frozen=True)
class SendItem:
    """A DICOM file to send, with what its file meta says about it."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one file."""

    path: Path
    status: int | None
    """The peer's C-STORE status, or ``None`` when the request could not be made."""
    error: str = ""

    @property
    def ok(self) -> bool:
        """Success or a warning status (0xB000, 0xB006, 0xB007, 0x0001)."""
        if self.status is None:
            return False
        return self.status in (0x0000, 0x0001) or self.status & 0xF000 == 0xB000


@dataclass
class SendReport:
    """Summary of :func:`send_files`."""

    peer: str
    outcomes: list[SendOutcome] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    associations: int = 0
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.ok)


def scan_files(paths: Iterable[Path]) -> tuple[list[SendItem], list[tuple[Path, str]]]:
    """Read the file meta of candidate files.

    Returns:
        The DICOM files that can be sent, and (path, reason) for the others.
    """
    from pydicom.filereader import read_file_meta_info

    items: list[SendItem] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        try:
            with path.open("rb") as fh:
                read_preamble(fh, force=False)
            meta = read_file_meta_info(path)
        except Exception:
            skipped.append((path, "not a DICOM file with file meta information"))
            continue
        values = (
            str(meta.get("MediaStorageSOPClassUID", "")),
            str(meta.get("MediaStorageSOPInstanceUID", "")),
            str(meta.get("TransferSyntaxUID", "")),
        )
        if not all(is_valid_uid(value) for value in values):
            skipped.append((path, "file meta lacks a valid SOP class, instance or transfer syntax"))
            continue
        items.append(SendItem(path, *values))
    return items, skipped


def find_files(folder: Path) -> list[Path]:
    """Every regular file below ``folder``, sorted (DICOM or not; see :func:`scan_files`)."""
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def batches(items: Sequence[SendItem]) -> list[list[SendItem]]:
    """Group files so that each group needs at most :data:`MAX_CONTEXTS` contexts."""
    groups: list[list[SendItem]] = []
    contexts: list[set[tuple[str, str]]] = []
    for item in items:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        for group, keys in zip(groups, contexts, strict=True):
            if key in keys or len(keys) < MAX_CONTEXTS:
                group.append(item)
                keys.add(key)
                break
        else:
            groups.append([item])
            contexts.append({key})
    return groups


def send_files(
    config: NodeConfig,
    peer_name: str,
    items: Sequence[SendItem],
    *,
    on_result: Callable[[SendOutcome], None] | None = None,
) -> SendReport:
    """C-STORE files to a configured peer, byte for byte, one association per batch.

    Raises:
        KeyError: if no peer has that name.
    """
    peer = config.peer(peer_name)
    report = SendReport(peer=peer_name)
    started = time.monotonic()
    # pynetdicom then sends a file's data set bytes as they are, without decoding them. The
    # switch is process-wide and left on: concurrent senders would race restoring it, and the
    # node never wants files decoded for sending.
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for group in batches(items):
            report.associations += 1
            for outcome in _send_batch(config, peer, group):
                report.outcomes.append(outcome)
                if on_result is not None:
                    on_result(outcome)
    finally:
        report.seconds = time.monotonic() - started
    return report


def _send_batch(
    config: NodeConfig, peer: PeerConfig, group: Sequence[SendItem]
) -> Iterable[SendOutcome]:
    ae = make_ae(config)
    for sop_class, ts in dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in group):
        ae.add_requested_context(sop_class, [ts])
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        reason = describe_failure(assoc)
        for item in group:
            yield SendOutcome(item.path, None, reason)
        return
    accepted = {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
    }
    try:
        for item in group:
            if not assoc.is_established:
                yield SendOutcome(item.path, None, "the association ended before this file")
                continue
            if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                reason = "the peer did not accept this SOP class in this transfer syntax"
                yield SendOutcome(item.path, None, reason)
                continue
            yield _store_one(assoc, item)
    finally:
        if assoc.is_established:
            assoc.release()


def _store_one(assoc: Association, item: SendItem) -> SendOutcome:
    try:
        status: Any = assoc.send_c_store(item.path)
    except (OSError, ValueError, AttributeError) as exc:
        return SendOutcome(item.path, None, f"cannot send: {exc}")
    if status is None or "Status" not in status:
        return SendOutcome(item.path, None, "no response (timeout or association aborted)")
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "")) if code != 0 else ""
    return SendOutcome(item.path, code, comment)
