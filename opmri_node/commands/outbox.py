"""Outbox commands: ``outbox list`` and ``outbox retry``."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from opmri_node.config import NodeConfig
    from opmri_node.outbox import OutboxEntry

STATES = ("pending", "sending", "done", "failed", "superseded")


def _load(config_path: Path | None) -> NodeConfig:
    from opmri_node.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        click.echo("invalid configuration:", err=True)
        for issue in exc.issues:
            click.echo(f"  {issue}", err=True)
        sys.exit(1)


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (YAML). Default: $OPMRI_CONFIG, else the embedded default.",
)


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    delta = timestamp - now
    if abs(delta) < 1:
        return "now"
    if delta > 0:
        return f"in {delta:.0f} s" if delta < 120 else f"in {delta / 60:.0f} min"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _entry_dict(entry: OutboxEntry) -> dict[str, object]:
    from pipeline.privacy import uid_tag

    return {
        "id": entry.id,
        "study": uid_tag(entry.study_uid),
        "peer": entry.peer,
        "state": entry.state,
        "files": entry.files,
        "stored": entry.stored,
        "attempts": entry.attempts,
        "next_attempt_at": entry.next_attempt_at if entry.state == "pending" else None,
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
        "sent_at": entry.sent_at,
        "error": entry.error,
    }


def _print_entries(entries: list[OutboxEntry], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from pipeline.privacy import uid_tag

    now = time.time()
    table = Table(title=title)
    for column in ("ID", "Study", "Peer", "State", "Stored", "Attempts", "Next attempt",
                   "Updated", "Last error"):
        table.add_column(column, overflow="fold")
    styles = {"done": "green", "failed": "bold red", "pending": "yellow", "sending": "cyan"}
    for entry in entries:
        table.add_row(
            str(entry.id),
            uid_tag(entry.study_uid),
            entry.peer,
            f"[{styles.get(entry.state, 'dim')}]{entry.state}[/]",
            f"{entry.stored}/{entry.files}",
            str(entry.attempts),
            _when(entry.next_attempt_at, now) if entry.state == "pending" else "-",
            datetime.fromtimestamp(entry.updated_at).strftime("%Y-%m-%d %H:%M:%S"),
            (entry.error or "")[:120],
        )
    Console().print(table)


@click.group("outbox")
def outbox_group() -> None:
    """Result sets waiting for, or done with, delivery to the result peers."""


@outbox_group.command("list")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only rows in this state.")
@click.option("--peer", default=None, help="Only rows for this peer.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Newest rows to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@config_option
def list_command(
    state: str | None, peer: str | None, limit: int, as_json: bool, config_path: Path | None
) -> None:
    """Show the outbox: per result set and peer, its state, attempts and last error.

    Studies are shown by a tag (a hash of the Study Instance UID), never by patient data.
    """
    from opmri_node.export import open_outbox
    from opmri_node.outbox import OutboxError

    config = _load(config_path)
    try:
        with open_outbox(config) as outbox:
            entries = outbox.entries(state=state, peer=peer, limit=limit)  # type: ignore[arg-type]
            counts = outbox.counts()
    except OutboxError as exc:
        click.echo(f"cannot read the outbox: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"counts": counts, "entries": [_entry_dict(e) for e in entries]},
                              indent=2))
        return
    summary = ", ".join(f"{count} {name}" for name, count in counts.items() if count)
    _print_entries(entries, f"Outbox ({summary or 'empty'})")


@outbox_group.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--failed", "all_failed", is_flag=True, help="Retry every failed row.")
@click.option("--no-send", is_flag=True,
              help="Only schedule the rows; the running node sends them within a second.")
@config_option
def retry_command(
    ids: tuple[int, ...], all_failed: bool, no_send: bool, config_path: Path | None
) -> None:
    """Schedule outbox rows IDS (or --failed) again with a fresh series of attempts and send
    them now.

    Only failed or pending rows can be retried; done and superseded rows are reported and left
    alone. Exits 1 if a row could not be scheduled or was not delivered.
    """
    import logging

    from opmri_node.export import ExportResult, export_entry, open_outbox
    from opmri_node.outbox import OutboxError

    if not ids and not all_failed:
        raise click.UsageError("give outbox ids or --failed")
    config = _load(config_path)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    problems = 0
    try:
        with open_outbox(config) as outbox:
            targets = list(ids)
            if all_failed:
                targets += [e.id for e in outbox.entries(state="failed")]
            targets = list(dict.fromkeys(targets))
            scheduled: list[int] = []
            for outbox_id in targets:
                entry = outbox.entry(outbox_id)
                if entry is None:
                    click.echo(f"#{outbox_id}: no such outbox row", err=True)
                    problems += 1
                elif outbox.reschedule(outbox_id):
                    scheduled.append(outbox_id)
                else:
                    click.echo(f"#{outbox_id}: is {entry.state}; not retried", err=True)
                    problems += 1
            results: list[ExportResult] = []
            if not no_send:
                for outbox_id in scheduled:
                    results.append(export_entry(config, outbox, outbox_id, force=True))
            shown = [e for e in (outbox.entry(i) for i in scheduled) if e is not None]
    except OutboxError as exc:
        click.echo(f"cannot read the outbox: {exc}", err=True)
        sys.exit(1)
    if not scheduled:
        click.echo("nothing to retry")
        sys.exit(1 if problems else 0)
    problems += sum(1 for r in results if r.status in ("retry", "failed"))
    title = "Scheduled for the running node" if no_send else "Retried"
    _print_entries(shown, title)
    sys.exit(1 if problems else 0)


def register(group: click.Group) -> None:
    """Add this module's commands to the top-level CLI group."""
    group.add_command(outbox_group)
