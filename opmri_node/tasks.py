"""Celery on Redis: thin tasks that carry ids, and the node's side that sends them.

With ``queue.broker`` set, the node (``opmri-node serve``) records jobs in its state database
and sends their ids to Redis; workers (``opmri-node worker``) on the same host, sharing the
node's ``data_dir``, take them from two queues:

* ``analysis`` (:data:`ANALYSIS_TASK`): one worker process per GPU; the models are loaded once
  per process, after the fork (CUDA is initialised only in the process that uses it);
* ``export`` (:data:`EXPORT_TASK`): CPU only, sends result sets to the PACS.

A message holds one integer and nothing else: no pixel data, no patient data. Each task
re-reads the job or outbox row from the state database, skips it if it is no longer pending and
calls the same processor functions the embedded mode uses
(:func:`opmri_node.runner.run_analysis_job`, :func:`opmri_node.runner.run_export_job`).

Delivery: ``acks_late`` (a message is acknowledged when its task has finished),
``reject_on_worker_lost`` (a pool process killed mid-task puts the message back at once),
prefetch 1, and a visibility timeout (``queue.visibility_timeout``) after which Redis hands a
message whose whole worker vanished to another worker. A claimed job records the delivering
task's id as its worker; a redelivered message (same task id) finds its job still running under
that id, puts it back to pending and claims it again, counting the attempt. Beyond
``queue.max_attempts`` the job is failed (a study that kills its worker every time).

The state database stays the source of truth: :class:`CeleryDispatcher` sends pending jobs and
due exports on start and again every ``queue.requeue_interval`` seconds while they stay
pending, so a broker that lost its data (restarted without persistence) loses nothing. Sending
a message twice is harmless: only one task can claim a job or an outbox row.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from celery import Celery, Task

from opmri_node.config import NodeConfig

if TYPE_CHECKING:
    from opmri_node.outbox import Outbox
    from opmri_node.state import StateDB

LOGGER = logging.getLogger(__name__)

ANALYSIS_QUEUE: Final[str] = "analysis"
EXPORT_QUEUE: Final[str] = "export"
QUEUES: Final[tuple[str, ...]] = (ANALYSIS_QUEUE, EXPORT_QUEUE)
ANALYSIS_TASK: Final[str] = "opmri.analyze"
EXPORT_TASK: Final[str] = "opmri.export"
WORKER_PREFIX: Final[str] = "celery:"
"""Prefix of the ``worker`` recorded for jobs and outbox rows claimed by a Celery task."""


def worker_name(task_id: str) -> str:
    """The worker recorded for a claim made by the delivery of task ``task_id``."""
    return f"{WORKER_PREFIX}{task_id}"


def make_celery(config: NodeConfig) -> Celery:
    """The Celery app for ``config.queue.broker`` (tasks registered, no result backend).

    Raises:
        ValueError: no broker is configured.
    """
    broker = config.queue.broker
    if broker is None:
        raise ValueError("queue.broker is null: analysis runs in the node, not on Celery")
    visibility = config.queue.visibility_timeout
    app = Celery("opmri_node", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=ANALYSIS_QUEUE,
        task_routes={
            ANALYSIS_TASK: {"queue": ANALYSIS_QUEUE},
            EXPORT_TASK: {"queue": EXPORT_QUEUE},
        },
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": visibility,
            "unacked_restore_interval": max(1, min(10, int(visibility / 10))),
            "unacked_restore_throttle": 1,
            "socket_timeout": 10.0,
            "socket_connect_timeout": 5.0,
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_enable_remote_control=True,
        task_track_started=False,
    )
    _register_tasks(app)
    return app


# -- worker side ---------------------------------------------------------------------------


@dataclass
class _WorkerContext:
    """What a worker process needs: its config and its own state database connection."""

    config: NodeConfig
    app: Celery
    state: StateDB | None = None
    pid: int = 0

    def state_db(self) -> StateDB:
        """This process's connection (opened after the fork, never inherited)."""
        if self.state is None or self.pid != os.getpid():
            from opmri_node.service import state_db_path
            from opmri_node.state import StateDB

            self.state = StateDB(state_db_path(self.config))
            self.pid = os.getpid()
        return self.state


_CONTEXT: _WorkerContext | None = None


def configure_worker(config: NodeConfig) -> Celery:
    """Make ``config`` the config of this worker's tasks and return the app to run."""
    global _CONTEXT
    app = make_celery(config)
    _CONTEXT = _WorkerContext(config=config, app=app)
    return app


def _context() -> _WorkerContext:
    if _CONTEXT is None:
        raise RuntimeError("the worker was not configured (opmri_node.tasks.configure_worker)")
    return _CONTEXT


def preload_models() -> None:
    """Load the analysis models in this process (after the fork) so no job waits for them."""
    context = _context()
    from opmri_node.runner import shared_analyzer

    started = time.monotonic()
    try:
        analyzer, _lock = shared_analyzer(context.config.pipeline)
    except Exception as exc:  # reported per job again; the worker keeps serving
        LOGGER.error("models could not be loaded: %s: %s", type(exc).__name__, exc)
        return
    LOGGER.info(
        "models loaded in %.1f s on %s", time.monotonic() - started, analyzer.device
    )


def analyze_job(task: Task, job_id: int) -> dict[str, Any]:
    """Body of :data:`ANALYSIS_TASK`: run analysis job ``job_id`` and send its exports."""
    from opmri_node.runner import run_analysis_job

    context = _context()
    state = context.state_db()
    worker = worker_name(str(task.request.id))
    if state.requeue_running(worker):
        LOGGER.warning("job %d: its earlier delivery was lost; starting another attempt", job_id)
    outcome = run_analysis_job(
        context.config, state, int(job_id), worker=worker,
        max_attempts=context.config.queue.max_attempts,
    )
    for outbox_id in outcome.outbox_ids:
        try:
            task.app.send_task(EXPORT_TASK, args=[outbox_id], queue=EXPORT_QUEUE)
        except Exception as exc:  # the node sends due exports again
            LOGGER.warning("export %d not queued (%s); the node will queue it",
                           outbox_id, type(exc).__name__)
    return {"job": outcome.job_id, "status": outcome.status, "objects": outcome.objects}


def export_result(task: Task, outbox_id: int) -> dict[str, Any]:
    """Body of :data:`EXPORT_TASK`: send outbox row ``outbox_id`` if it is pending and due."""
    from opmri_node.export import open_outbox

    context = _context()
    state = context.state_db()
    worker = worker_name(str(task.request.id))
    with open_outbox(context.config, state.path) as outbox:
        if outbox.recover(worker):
            LOGGER.warning("export %d: its earlier delivery was lost; sending again", outbox_id)
        from opmri_node.export import export_entry

        result = export_entry(context.config, outbox, int(outbox_id), worker=worker)
    return {"outbox": result.outbox_id, "status": result.status, "sent": result.sent}


def _register_tasks(app: Celery) -> None:
    @app.task(name=ANALYSIS_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def _analyze(self: Task, job_id: int) -> dict[str, Any]:
        return analyze_job(self, job_id)

    @app.task(name=EXPORT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def _export(self: Task, outbox_id: int) -> dict[str, Any]:
        return export_result(self, outbox_id)


# -- node side -----------------------------------------------------------------------------


class CeleryDispatcher:
    """The node's :class:`~opmri_node.assembly.JobDispatcher` when a broker is configured.

    :meth:`dispatch` only queues the id in memory; one thread of the node sends messages, so
    a broker that is down never blocks receiving or study assembly. The same thread looks at
    the state database: pending jobs and due exports that were not sent, or were sent longer
    than ``queue.requeue_interval`` ago and are still pending, are sent (again).
    """

    def __init__(self, config: NodeConfig, *, tick: float = 1.0) -> None:
        self.config = config
        self.app = make_celery(config)
        self.tick = tick
        self._ids: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent_jobs: dict[int, float] = {}
        self._sent_exports: dict[int, tuple[float, int]] = {}
        """Outbox id -> (when sent, its attempt count then): a failed attempt makes it due anew."""
        self._broker_ok = True
        self._next_scan = 0.0

    def start(self) -> None:
        """Start the sending thread (pending jobs and due exports are sent at once)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="celery-dispatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._ids.put(None)
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
        self.app.close()

    def dispatch(self, job_id: int) -> None:
        if self._thread is None:
            self.start()
        self._ids.put(job_id)

    @property
    def broker_ok(self) -> bool:
        """Whether the last message went out (``False`` while the broker is unreachable)."""
        return self._broker_ok

    def _send(self, name: str, queue_name: str, item: int) -> bool:
        try:
            self.app.send_task(
                name,
                args=[item],
                queue=queue_name,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:
            if self._broker_ok:
                LOGGER.warning(
                    "broker unreachable (%s); job ids stay pending in the state database and "
                    "are sent when it is back", type(exc).__name__,
                )
            self._broker_ok = False
            return False
        if not self._broker_ok:
            LOGGER.info("broker reachable again; sending pending work")
        self._broker_ok = True
        return True

    def _send_job(self, job_id: int) -> None:
        if self._send(ANALYSIS_TASK, ANALYSIS_QUEUE, job_id):
            self._sent_jobs[job_id] = time.monotonic()
            LOGGER.info("job %d sent to the %s queue", job_id, ANALYSIS_QUEUE)

    def _scan(self, state: StateDB, outbox: Outbox) -> None:
        """Send what the state database has pending and was not sent recently."""
        now = time.monotonic()
        interval = self.config.queue.requeue_interval
        pending = [job.id for job in state.jobs(state="pending")]
        for job_id in pending:
            sent = self._sent_jobs.get(job_id)
            if sent is None or now - sent >= interval:
                self._send_job(job_id)
        keep = set(pending)
        self._sent_jobs = {k: v for k, v in self._sent_jobs.items() if k in keep}
        stale_before = time.time() - 1.5 * self.config.queue.visibility_timeout
        for job in state.jobs(state="running"):
            started = job.started_at or job.updated_at
            # Its message is gone (a broker that lost its data, then the worker): the
            # visibility timeout would have brought it back long ago otherwise.
            if (
                (job.worker or "").startswith(WORKER_PREFIX)
                and started < stale_before
                and state.requeue(job.id)
            ):
                LOGGER.warning("job %d ran far past queue.visibility_timeout; "
                               "sending it again", job.id)
                self._send_job(job.id)
        due = outbox.due_attempts()
        for outbox_id, attempts in due.items():
            last = self._sent_exports.get(outbox_id)
            again = last is None or last[1] != attempts or now - last[0] >= interval
            if again and self._send(EXPORT_TASK, EXPORT_QUEUE, outbox_id):
                self._sent_exports[outbox_id] = (now, attempts)
        self._sent_exports = {k: v for k, v in self._sent_exports.items() if k in due}

    def _run(self) -> None:
        from opmri_node.export import open_outbox
        from opmri_node.service import state_db_path
        from opmri_node.state import StateDB

        state = StateDB(state_db_path(self.config))
        outbox = open_outbox(self.config, state.path)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= self._next_scan:
                    try:
                        self._scan(state, outbox)
                    except Exception as exc:
                        LOGGER.error("looking for pending work failed: %s", type(exc).__name__)
                        LOGGER.debug("pending-work scan failed", exc_info=exc)
                    self._next_scan = time.monotonic() + (
                        self.tick if self._broker_ok else min(5.0, self.tick * 5)
                    )
                try:
                    job_id = self._ids.get(timeout=max(0.05, self._next_scan - time.monotonic()))
                except queue.Empty:
                    continue
                if job_id is not None and job_id not in self._sent_jobs:
                    self._send_job(job_id)
        finally:
            outbox.close()
            state.close()
