"""Study assembly: decide when a study is complete and record its analysis job.

A study is complete once no instance has arrived for ``study_stable_seconds``. The decision is
made in the state database (:meth:`opmri_node.state.StateDB.create_ready_jobs`), in the same
transaction that records the job, so a study becomes ready exactly once per batch of
instances, also across restarts: the stability timer of a study is its ``last_received``
time, which the database keeps.

Recorded jobs are handed to a :class:`JobDispatcher`. The dispatcher decides where a job runs;
the state database stays the source of truth, so a dispatcher only ever passes job ids on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from opmri_node.state import StateDB
from pipeline.privacy import uid_tag

LOGGER = logging.getLogger(__name__)


@runtime_checkable
class JobDispatcher(Protocol):
    """Hands recorded jobs to whatever runs them (in-process runner, Celery, ...)."""

    def dispatch(self, job_id: int) -> None:
        """Make sure job ``job_id`` (pending in the state database) will be run.

        Called once when the job is recorded and again for every pending job when the node
        starts, so implementations must tolerate a job id they have seen before.
        """


class PendingJobs:
    """The dispatcher used when no job runner is configured: jobs stay pending in the state DB.

    They are visible with ``opmri-node status`` and are picked up by a runner later.
    """

    def dispatch(self, job_id: int) -> None:
        LOGGER.info("job %d recorded as pending", job_id)


class StudyAssembler:
    """Turns quiet studies into pending jobs and hands them to a dispatcher."""

    def __init__(
        self,
        state: StateDB,
        stable_seconds: float,
        dispatcher: JobDispatcher,
        *,
        clock: Callable[[], float] = time.time,
        max_wait: float = 1.0,
    ) -> None:
        self.state = state
        self.stable_seconds = stable_seconds
        self.dispatcher = dispatcher
        self.clock = clock
        self.max_wait = max_wait
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[int]:
        """Record jobs for the studies that are complete now and dispatch them."""
        created = self.state.create_ready_jobs(self.stable_seconds, now=self.clock())
        for job_id in created:
            job = self.state.job(job_id)
            if job is not None:
                LOGGER.info(
                    "study %s complete: %s job %d recorded",
                    uid_tag(job.study_uid),
                    job.kind,
                    job_id,
                )
            self._dispatch(job_id)
        return created

    def resume(self) -> list[int]:
        """Dispatch every pending job again (after a restart)."""
        pending = [job.id for job in self.state.jobs(state="pending")]
        for job_id in pending:
            self._dispatch(job_id)
        if pending:
            LOGGER.info("%d pending job(s) dispatched again after start", len(pending))
        return pending

    def _dispatch(self, job_id: int) -> None:
        try:
            self.dispatcher.dispatch(job_id)
        except Exception:
            LOGGER.exception("dispatching job %d failed; it stays pending", job_id)

    def next_wait(self) -> float:
        """Seconds until the next study can become complete (at most ``max_wait``)."""
        deadline = self.state.next_stability_deadline(self.stable_seconds)
        if deadline is None:
            return self.max_wait
        return min(self.max_wait, max(0.01, deadline - self.clock()))

    def run(self) -> None:
        """Poll until :meth:`stop` is called."""
        while not self._stop.is_set():
            try:
                self.poll()
                wait = self.next_wait()
            except Exception:
                LOGGER.exception("study assembly failed; retrying")
                wait = self.max_wait
            self._wake.wait(wait)
            self._wake.clear()

    def notify(self) -> None:
        """Wake the loop early (e.g. after a configuration change)."""
        self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the study assembler is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="study-assembly", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
