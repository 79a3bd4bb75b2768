"""Monitoring commands: ``health``."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import click

from opmri_node.commands.node import _load, config_option

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_NOT_CONFIGURED = 2


def _local_host(bind: str) -> str:
    """The address to reach a listener bound to ``bind`` from this host, as a URL host."""
    if bind in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bind == "::":
        return "[::1]"
    return f"[{bind}]" if ":" in bind else bind


@click.command("health")
@config_option
@click.option(
    "--worker", is_flag=True, help="Ask the worker's endpoint (monitoring.worker_port) instead."
)
@click.option(
    "--timeout", default=5.0, show_default=True, type=float, help="Seconds to wait for the answer."
)
def health_command(config_path: Path | None, worker: bool, timeout: float) -> None:
    """Ask the running node (or worker) for its health checks and print them.

    GETs /healthz on this host at monitoring.port (monitoring.worker_port with --worker) and
    prints the JSON checks: state database readable, DICOM listener accepting (node), broker
    answering (when configured), free disk space above node.min_free_disk_mb.

    Exits 0 when healthy, 1 when unhealthy or not answering, 2 when no port is configured.
    Meant for container health checks.
    """
    config = _load(config_path)
    key = "worker_port" if worker else "port"
    port = config.monitoring.worker_port if worker else config.monitoring.port
    if not port:
        reason = "not set" if port is None else "0 (chosen at start, unknown here)"
        click.echo(f"monitoring.{key} is {reason}: no health endpoint to ask", err=True)
        sys.exit(EXIT_NOT_CONFIGURED)
    url = f"http://{_local_host(config.monitoring.bind)}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, body = int(exc.code), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        click.echo(f"{url}: no answer ({why})", err=True)
        sys.exit(EXIT_UNHEALTHY)
    try:
        payload = json.loads(body)
    except ValueError:
        click.echo(f"{url}: HTTP {status}, not a health report", err=True)
        sys.exit(EXIT_UNHEALTHY)
    click.echo(json.dumps(payload, indent=2))
    healthy = status == 200 and isinstance(payload, dict) and payload.get("healthy") is True
    sys.exit(EXIT_HEALTHY if healthy else EXIT_UNHEALTHY)


def register(group: click.Group) -> None:
    """Add this module's commands to the top-level CLI group."""
    group.add_command(health_command)
