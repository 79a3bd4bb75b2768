"""Node commands: ``serve``, ``config check``, ``echo``, ``send`` and ``status``."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from opmri_node.config import NodeConfig
    from opmri_node.runner import InProcessRunner
    from opmri_node.tasks import CeleryDispatcher

CONFIG_HELP = "Config file (YAML). Default: $OPMRI_CONFIG, else the embedded default."

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=CONFIG_HELP,
)


def _load(config_path: Path | None) -> NodeConfig:
    """Load the config or exit with the file, key and reason of every problem."""
    from opmri_node.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        click.echo("invalid configuration:", err=True)
        for issue in exc.issues:
            click.echo(f"  {issue}", err=True)
        sys.exit(1)


def _quiet_pynetdicom() -> None:
    """Keep library chatter, and the received values it quotes, out of the log unless -vv.

    pynetdicom logs every association at INFO; pydicom warns about invalid values by quoting
    them (a UID, a name), both as a log record and as a Python warning.
    """
    import pydicom.config  # noqa: F401  (sets its logger's level when first imported)

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("pynetdicom.utils").setLevel(logging.ERROR)  # quotes bad UIDs
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


@click.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the node: receive studies, record complete studies as analysis jobs.

    Listens on node.bind:node.port as node.ae_title and accepts C-ECHO from every configured
    peer and C-STORE from peers with may_send. Instances are written to node.data_dir/spool
    and recorded in node.data_dir/state.sqlite3 before they are acknowledged; one audit line
    per association goes to the log and to node.data_dir/audit.log. A study with no new
    instance for node.study_stable_seconds gets an analysis job. Without a broker
    (queue.broker: null) the node runs the job itself and sends the SEG, SR and key image to
    every peer with results: true, retrying as export.retry says (see opmri-node outbox).
    With a broker, it sends job ids to Redis for `opmri-node worker` processes sharing
    node.data_dir, and sends pending work again whenever it stayed pending for
    queue.requeue_interval (a broker restarted without its data loses nothing).

    Stops cleanly on SIGTERM or Ctrl-C; after any stop, even kill -9, a restart carries on
    where it left off.
    """
    config = _load(config_path)
    if logging.getLogger("opmri_node").getEffectiveLevel() > logging.INFO:
        logging.getLogger("opmri_node").setLevel(logging.INFO)
    _quiet_pynetdicom()
    from opmri_node.service import Node

    runner: InProcessRunner | CeleryDispatcher
    if config.queue.broker is None:
        from opmri_node.runner import InProcessRunner

        runner = InProcessRunner(config, preload=True)
    else:
        from opmri_node.tasks import CeleryDispatcher

        runner = CeleryDispatcher(config)
    node = Node(config, dispatcher=runner)
    try:
        runner.start()
        node.serve_forever()
    except OSError as exc:
        click.echo(
            f"cannot serve on {config.node.bind}:{config.node.port} "
            f"or use {config.node.data_dir}: {exc}",
            err=True,
        )
        sys.exit(1)
    finally:
        runner.stop()


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@config_option
def config_check(config_path: Path | None) -> None:
    """Validate the config and print the effective configuration.

    Defaults are filled in and relative paths are shown resolved against the config file's
    folder. For an invalid config, prints FILE:LINE: KEY.PATH: REASON for every problem and
    exits with status 1.
    """
    from opmri_node.config import config_source

    config = _load(config_path)
    click.echo(f"# effective configuration (source: {config_source(config_path)})")
    click.echo(config.to_yaml(), nl=False)


@click.command("echo")
@click.argument("peer")
@config_option
def echo_command(peer: str, config_path: Path | None) -> None:
    """Verify a configured PEER with C-ECHO (exits 1 if it does not answer with success)."""
    config = _load(config_path)
    _quiet_pynetdicom()
    from opmri_node.scu import echo

    try:
        target = config.peer(peer)
        result = echo(config, peer)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="PEER") from None
    where = f"{target.ae_title}@{target.host}:{target.port}"
    if result.ok:
        click.echo(f"C-ECHO {peer} ({where}): success in {result.seconds * 1000:.1f} ms")
        return
    detail = result.error or f"status 0x{result.status:04X}"
    click.echo(f"C-ECHO {peer} ({where}) failed: {detail}", err=True)
    sys.exit(1)


@click.command("send")
@click.argument("directory", type=click.Path(exists=True, path_type=Path))
@click.option("--peer", required=True, help="Name of the configured peer to send to.")
@config_option
def send_command(directory: Path, peer: str, config_path: Path | None) -> None:
    """C-STORE every DICOM file below DIRECTORY to a configured peer.

    Files are sent as they are (their own transfer syntax, no re-encoding) over one
    association per batch of up to 128 presentation contexts. Exits 1 if any file failed.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from opmri_node.scu import SendOutcome, find_files, scan_files, send_files

    config = _load(config_path)
    _quiet_pynetdicom()
    try:
        target = config.peer(peer)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="--peer") from None
    console = Console(stderr=True)
    items, skipped = scan_files(find_files(directory))
    for path, reason in skipped:
        console.print(f"[yellow]skipped[/] {path}: {reason}")
    if not items:
        console.print(f"[red]no DICOM files found below {directory}[/]")
        sys.exit(1)

    errors: list[SendOutcome] = []
    with Progress(
        TextColumn(f"C-STORE to {peer}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("send", total=len(items))

        def on_result(outcome: SendOutcome) -> None:
            if not outcome.ok:
                errors.append(outcome)
            progress.advance(task)

        report = send_files(config, peer, items, on_result=on_result)

    for outcome in errors[:20]:
        status = "no status" if outcome.status is None else f"0x{outcome.status:04X}"
        console.print(f"[red]failed[/] {outcome.path}: {status} {outcome.error}")
    if len(errors) > 20:
        console.print(f"[red]... and {len(errors) - 20} more failures[/]")

    table = Table(title=f"sent to {peer} ({target.ae_title}@{target.host}:{target.port})")
    for column in ("files", "sent", "failed", "skipped", "associations", "seconds", "files/s"):
        table.add_column(column, justify="right")
    rate = report.sent / report.seconds if report.seconds > 0 else 0.0
    table.add_row(
        str(len(items)),
        str(report.sent),
        str(report.failed),
        str(len(skipped)),
        str(report.associations),
        f"{report.seconds:.1f}",
        f"{rate:.0f}",
    )
    Console().print(table)
    if report.failed:
        sys.exit(1)


@click.command("status")
@config_option
@click.option("--limit", default=20, show_default=True, help="Studies to list (most recent first).")
@click.option(
    "--failures",
    "failure_limit",
    default=10,
    show_default=True,
    help="Recent failed jobs and failed exports to list (each).",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead.")
def status_command(
    config_path: Path | None, limit: int, failure_limit: int, as_json: bool
) -> None:
    """Show studies and jobs by state, queue depths and recent failures.

    Reads the node's state database and, with a broker configured, the number of messages
    waiting in the analysis and export queues. Studies are shown by a tag (a hash of the Study
    Instance UID; the same tag appears in the log and is the start of the study's spool folder
    name), never by patient data.
    """
    from rich.console import Console
    from rich.table import Table

    from opmri_node.monitoring import (
        FailedExport,
        FailedJob,
        failure_kind,
        read_state_db,
        recent_failures,
    )
    from opmri_node.service import state_db_path
    from opmri_node.state import JOB_STATES, StateDB

    config = _load(config_path)
    path = state_db_path(config)
    queues = _queue_status(config)
    if not path.exists():
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "state_db": str(path),
                        "studies": {},
                        "jobs": {},
                        "recent": [],
                        "queues": queues,
                        "failures": {"jobs": [], "exports": []},
                    }
                )
            )
        else:
            click.echo(f"no state database at {path}: the node has not received anything yet")
            _print_queues(Console(), queues)
        return
    with StateDB(path) as state:
        study_counts = state.study_counts()
        job_counts = state.job_counts()
        recent = state.studies(limit=limit)
        instances = state.instance_count()
    failed_jobs: list[FailedJob] = []
    failed_exports: list[FailedExport] = []
    if failure_limit > 0:
        with read_state_db(path) as conn:
            failed_jobs, failed_exports = recent_failures(conn, failure_limit)

    if as_json:
        payload: dict[str, Any] = {
            "state_db": str(path),
            "instances": instances,
            "studies": study_counts,
            "jobs": job_counts,
            "recent": [
                {
                    "study": s.key[:12],
                    "instances": s.instances,
                    "series": s.series,
                    "last_received": s.last_received,
                    "state": s.state,
                }
                for s in recent
            ],
            "queues": queues,
            "failures": {
                "jobs": [
                    {
                        "id": f.id,
                        "study": f.study,
                        "at": f.at,
                        "attempts": f.attempts,
                        "kind": failure_kind(f.error),
                        "error": f.error,
                    }
                    for f in failed_jobs
                ],
                "exports": [
                    {
                        "id": f.id,
                        "study": f.study,
                        "peer": f.peer,
                        "at": f.at,
                        "attempts": f.attempts,
                        "kind": failure_kind(f.error),
                        "error": f.error,
                    }
                    for f in failed_exports
                ],
            },
        }
        click.echo(json.dumps(payload, indent=2))
        return

    console = Console()
    summary = Table(title=f"opmri-node state ({path})")
    summary.add_column("")
    states = ["receiving", *JOB_STATES]
    for state_name in states:
        summary.add_column(state_name, justify="right")
    summary.add_row("studies", *(str(study_counts.get(s, 0)) for s in states))
    summary.add_row("jobs", "", *(str(job_counts.get(s, 0)) for s in JOB_STATES))
    console.print(summary)
    console.print(f"{instances} instance(s) stored")
    _print_queues(console, queues)
    now = time.time()
    if recent:
        table = Table(title=f"most recent studies (up to {limit})")
        for column, justify in (
            ("study", "left"),
            ("instances", "right"),
            ("series", "right"),
            ("last received", "left"),
            ("state", "left"),
        ):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for s in recent:
            when = datetime.fromtimestamp(s.last_received).strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(
                s.key[:12],
                str(s.instances),
                str(s.series),
                f"{when} ({_age(now - s.last_received)} ago)",
                s.state,
            )
        console.print(table)
    if failed_jobs or failed_exports:
        console.print(
            f"recent failures (newest first; up to {failure_limit} analysis jobs and "
            f"{failure_limit} exports):"
        )
        rows: list[tuple[str, str, float, int, str]] = [
            (f"analysis job {f.id}", f.study, f.at, f.attempts, f.error) for f in failed_jobs
        ]
        rows += [
            (f"export {f.id} to {f.peer}", f.study, f.at, f.attempts, f.error)
            for f in failed_exports
        ]
        for what, study, at, attempts, error in sorted(rows, key=lambda r: r[2], reverse=True):
            when = datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")
            console.print(
                f"  {what}, study {study}, {when} ({_age(now - at)} ago), "
                f"{attempts} attempt(s), {failure_kind(error)}: {error[:300]}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )


def _queue_status(config: NodeConfig) -> dict[str, Any] | None:
    """Queue depths for ``status`` (``None`` without a broker)."""
    if config.queue.broker is None:
        return None
    from opmri_node.monitoring import BrokerUnavailableError, queue_depths

    try:
        depths = queue_depths(config.queue.broker)
    except BrokerUnavailableError as exc:
        return {"reachable": False, "error": str(exc)}
    return {"reachable": True, "waiting": depths.waiting, "unacked": depths.unacked}


def _print_queues(console: Any, queues: dict[str, Any] | None) -> None:
    from rich.table import Table

    if queues is None:
        console.print("no broker configured: jobs run inside the node")
        return
    if not queues["reachable"]:
        console.print(f"[red]broker not reachable[/]: {queues['error']}")
        return
    table = Table(title="broker queues")
    table.add_column("queue")
    table.add_column("waiting", justify="right")
    for queue, count in queues["waiting"].items():
        table.add_row(queue, str(count))
    table.add_row("(delivered, not acknowledged)", str(queues["unacked"]))
    console.print(table)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def register(group: click.Group) -> None:
    """Add this module's commands to the top-level CLI group."""
    group.add_command(serve)
    group.add_command(config_group)
    group.add_command(echo_command)
    group.add_command(send_command)
    group.add_command(status_command)
