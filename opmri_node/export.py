"""Sending result sets from the outbox to the peers (C-STORE SCU with retries and back-off).

One outbox row is one result set for one peer; :func:`export_entry` sends its files that the
peer has not acknowledged yet over one association (``TCP_NODELAY`` on the socket, see
:mod:`opmri_node.scu`) and records the outcome:

* every file stored (success or a warning status): the row is ``done``;
* anything else (peer down, association rejected, a failure status): the attempt counts, and
  the row is due again after ``export.retry`` back-off (30 s doubling to 10 min by default),
  until ``export.retry.max_attempts`` attempts have failed: then it is ``failed`` and stays
  visible in ``opmri-node outbox list`` until ``opmri-node outbox retry`` schedules it again.

Messages name peers, counts and DICOM statuses, never patient data or UIDs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from opmri_node.config import NodeConfig
from opmri_node.outbox import RESULTS_DIR_NAME, Outbox, OutboxEntry
from opmri_node.scu import SendItem, SendOutcome, send_files
from opmri_node.service import state_db_path
from pipeline.privacy import uid_tag

LOGGER = logging.getLogger(__name__)

ExportStatus = Literal["done", "retry", "failed", "skipped"]


def results_root(config: NodeConfig) -> Path:
    """Where result sets are written: ``<data_dir>/results``."""
    return config.node.data_dir / RESULTS_DIR_NAME


def open_outbox(config: NodeConfig, db_path: Path | None = None) -> Outbox:
    """The outbox in the node's state database (``<data_dir>/state.sqlite3`` by default)."""
    return Outbox(db_path or state_db_path(config), results_root(config))


def result_peers(config: NodeConfig) -> list[str]:
    """Names of the peers that receive results (``results: true``), in config order."""
    return [name for name, peer in config.peers.items() if peer.results]


@dataclass(frozen=True)
class ExportResult:
    """What one call of :func:`export_entry` did."""

    outbox_id: int
    status: ExportStatus
    """``done``; ``retry`` (attempt failed, due again later); ``failed`` (no more attempts);
    ``skipped`` (not pending, not due, or claimed by another sender)."""
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    error: str = ""
    next_attempt_at: float | None = None


def _describe(outcomes: list[SendOutcome]) -> str:
    bad = [o for o in outcomes if not o.ok]
    if not bad:
        return ""
    reasons: dict[str, int] = {}
    for outcome in bad:
        if outcome.status is None:
            reason = outcome.error or "not sent"
        else:
            reason = f"status 0x{outcome.status:04X}"
        reasons[reason] = reasons.get(reason, 0) + 1
    parts = [f"{count} x {reason}" for reason, count in reasons.items()]
    return f"{len(bad)} of {len(outcomes)} file(s) not stored: " + "; ".join(parts)


def export_entry(
    config: NodeConfig,
    outbox: Outbox,
    outbox_id: int,
    *,
    worker: str = "",
    force: bool = False,
) -> ExportResult:
    """Send one outbox row if it is pending and due (``force``: due or not).

    Never raises for network or peer problems: they are recorded as a failed attempt.
    """
    started = time.monotonic()
    entry = outbox.claim(outbox_id, worker, force=force)
    if entry is None:
        return ExportResult(outbox_id, "skipped")
    tag = uid_tag(entry.study_uid)
    peer = config.peers.get(entry.peer)
    if peer is None or not peer.results:
        reason = f"peer {entry.peer!r} is no longer configured to receive results"
        outbox.mark_failed(outbox_id, reason)
        LOGGER.warning("results of study %s for %s: %s", tag, entry.peer, reason)
        return ExportResult(outbox_id, "failed", error=reason)

    files = outbox.unsent_files(outbox_id)
    items: list[SendItem] = []
    positions: dict[Path, int] = {}
    for file in files:
        path = outbox.path(file)
        if not path.is_file():
            reason = "a result file is missing from the results folder"
            outbox.mark_failed(outbox_id, reason)
            LOGGER.error("results of study %s for %s: %s", tag, entry.peer, reason)
            return ExportResult(outbox_id, "failed", error=reason)
        items.append(SendItem(path, file.sop_class_uid, file.sop_instance_uid,
                              file.transfer_syntax_uid))
        positions[path] = file.position

    outcomes: list[SendOutcome] = []
    if items:
        try:
            report = send_files(config, entry.peer, items)
            outcomes = list(report.outcomes)
        except Exception as exc:  # a defect or an unexpected library error: retry later
            LOGGER.error("sending results of study %s to %s failed: %s", tag, entry.peer,
                         type(exc).__name__)
            LOGGER.debug("sending results failed", exc_info=exc)
            outcomes = [SendOutcome(item.path, None, f"internal error: {type(exc).__name__}")
                        for item in items]
        outbox.record_statuses(
            outbox_id, {positions[o.path]: o.status for o in outcomes if o.path in positions}
        )
    sent = sum(1 for o in outcomes if o.ok)
    error = _describe(outcomes)
    seconds = time.monotonic() - started
    if not error and sent == len(items):
        outbox.mark_done(outbox_id)
        LOGGER.info(
            "results of study %s stored on %s: %d object(s) in %.2f s (attempt %d)",
            tag, entry.peer, sent, seconds, entry.attempts,
        )
        return ExportResult(outbox_id, "done", sent=sent, seconds=seconds)

    state = outbox.mark_attempt_failed(outbox_id, error, config.export.retry)
    after = outbox.entry(outbox_id)
    next_at = after.next_attempt_at if after is not None and state == "pending" else None
    if state == "failed":
        LOGGER.error(
            "results of study %s for %s failed after %d attempt(s): %s",
            tag, entry.peer, entry.attempts, error,
        )
        status: ExportStatus = "failed"
    else:
        LOGGER.warning(
            "results of study %s for %s: attempt %d failed (%s); next attempt in %.1f s",
            tag, entry.peer, entry.attempts, error,
            max(0.0, (next_at or time.time()) - time.time()),
        )
        status = "retry"
    return ExportResult(
        outbox_id, status, sent=sent, failed=len(outcomes) - sent, seconds=seconds,
        error=error, next_attempt_at=next_at,
    )


def describe_entry(entry: OutboxEntry) -> str:
    """A one-line description of an outbox row without patient data."""
    return (
        f"#{entry.id} study {uid_tag(entry.study_uid)} -> {entry.peer}: {entry.state}, "
        f"{entry.stored}/{entry.files} stored, {entry.attempts} attempt(s)"
    )
