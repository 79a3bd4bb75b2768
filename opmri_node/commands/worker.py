"""``opmri-node worker``: a Celery worker for the analysis or export queue."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import click

from opmri_node.commands.node import _load, _quiet_pynetdicom, config_option

LOGGER = logging.getLogger(__name__)


def _queues(value: str) -> list[str]:
    from opmri_node.tasks import QUEUES

    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise click.BadParameter(
            f"expected a comma-separated list of {', '.join(QUEUES)}; got {value!r}"
        )
    return list(dict.fromkeys(names))


@click.command("worker")
@config_option
@click.option(
    "--queues",
    "queues_text",
    default="analysis,export",
    show_default=True,
    help="Queues to take tasks from: analysis (models; one worker per GPU), export (CPU), "
    "or both.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=None,
    help="Pool processes. Default: 1 when the analysis queue is served (each process loads "
    "the models once), else 2.",
)
@click.option(
    "--gpu",
    type=click.IntRange(0, 63),
    default=None,
    help="Use only this CUDA device (sets CUDA_VISIBLE_DEVICES for the worker's processes).",
)
@click.option(
    "--name",
    default=None,
    help="Worker node name (default: opmri-<queues>-<pid>@<host>).",
)
@click.option(
    "--no-preload",
    is_flag=True,
    help="Load the models on the first analysis instead of when a pool process starts.",
)
def worker(
    config_path: Path | None,
    queues_text: str,
    concurrency: int | None,
    gpu: int | None,
    name: str | None,
    no_preload: bool,
) -> None:
    """Run a Celery worker on the broker of queue.broker.

    The worker must see the node's data_dir (spool, state database, results) at the path the
    config gives, on the same host as the node (the state database is SQLite in WAL mode).
    Analysis workers load the models once per pool process, after it is forked, so CUDA is
    initialised only there; run one analysis worker per GPU (--gpu). Tasks carry only job or
    outbox ids. A task whose pool process dies is delivered again; a job that loses its worker
    queue.max_attempts times is failed. Stops cleanly on SIGTERM (warm shutdown: the task in
    progress finishes) or Ctrl-C.
    """
    queues = _queues(queues_text)
    config = _load(config_path)
    if config.queue.broker is None:
        click.echo(
            "queue.broker is null: the node runs analysis and export itself "
            "(set queue.broker to a redis:// URL to use workers)",
            err=True,
        )
        sys.exit(2)
    if logging.getLogger("opmri_node").getEffectiveLevel() > logging.INFO:
        logging.getLogger("opmri_node").setLevel(logging.INFO)
    _quiet_pynetdicom()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    from celery import signals

    from opmri_node import tasks

    app = tasks.configure_worker(config)
    analysis = tasks.ANALYSIS_QUEUE in queues
    if analysis and not no_preload:

        @signals.worker_process_init.connect(weak=False)
        def _preload(**_: object) -> None:
            tasks.preload_models()

    @signals.setup_logging.connect(weak=False)
    def _keep_logging(**_: object) -> None:
        """Keep the CLI's logging (levels, no identifiers) instead of Celery's set-up."""

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        LOGGER.info("worker ready: taking tasks from %s", ",".join(queues))

    monitor = None
    if config.monitoring.worker_port is not None:
        from opmri_node.monitoring import start_monitoring

        monitor = start_monitoring(config, "worker")
    pool_size = concurrency or (1 if analysis else 2)
    hostname = name or f"opmri-{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}"
    LOGGER.info(
        "worker %s: queues %s, %d pool process(es)%s",
        hostname, ",".join(queues), pool_size,
        "" if gpu is None else f", GPU {gpu}",
    )
    celery_worker = app.Worker(
        hostname=hostname,
        queues=queues,
        concurrency=pool_size,
        pool="prefork",
        prefetch_multiplier=1,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=False,
        optimization="fair",
        loglevel="WARNING",
        quiet=True,
    )
    try:
        celery_worker.start()
    finally:
        if monitor is not None:
            monitor.close()
    sys.exit(celery_worker.exitcode or 0)


def register(group: click.Group) -> None:
    group.add_command(worker)
