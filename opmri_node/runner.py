"""Running the work of a complete study: analysis, result objects, outbox, export.

Two processor functions hold the logic and take only ids, re-reading everything from the
state database, so whatever calls them (a thread of the node, a Celery task) stays thin:

* :func:`run_analysis_job` claims a pending analysis job, analyses the study's current
  instances from the spool, writes the SEG/SR/key image into ``<data_dir>/results`` and
  records them in the outbox for every peer with ``results: true``, then marks the job done.
  A study without usable lumbar series is done with no results (and no error).
* :func:`run_export_job` sends one outbox row (see :mod:`opmri_node.export`).

Both are idempotent: a job or outbox row that is not pending (already done, claimed by
someone else) is skipped.

:class:`InProcessRunner` runs them in two threads of the node (used when no broker is
configured): it is the node's :class:`~opmri_node.assembly.JobDispatcher`, and its export
thread sends whatever the outbox has due, also rows left over from before a restart.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from opmri_node.config import NodeConfig
from opmri_node.export import (
    ExportResult,
    export_entry,
    open_outbox,
    result_peers,
    results_root,
)
from opmri_node.outbox import NewResultFile, Outbox
from opmri_node.service import open_spool, state_db_path
from opmri_node.state import ANALYSIS, StateDB, study_key
from pipeline.config import PipelineSettings
from pipeline.privacy import uid_tag

if TYPE_CHECKING:
    from pipeline.analyze import Analyzer
    from pipeline.result import StudyResult

LOGGER = logging.getLogger(__name__)

IN_PROCESS_WORKER: Final[str] = "in-process"
"""Worker name of the in-process runner (jobs it left running are resumed by the next one)."""

RESULT_JSON_NAME: Final[str] = "result.json"

_ANALYZERS: dict[str, tuple[Analyzer, threading.Lock]] = {}
_ANALYZERS_LOCK = threading.Lock()


def shared_analyzer(settings: PipelineSettings) -> tuple[Analyzer, threading.Lock]:
    """The process's :class:`~pipeline.analyze.Analyzer` for ``settings`` and its lock.

    Models are loaded once per process and settings; the lock serialises analyses on it.

    Raises:
        pipeline.registry.ModelRegistryError: models missing or not matching their manifests.
        pipeline.device.DeviceError: the configured device is unusable.
    """
    key = settings.model_dump_json()
    with _ANALYZERS_LOCK:
        entry = _ANALYZERS.get(key)
        if entry is None:
            from pipeline.analyze import Analyzer

            entry = (Analyzer(settings), threading.Lock())
            _ANALYZERS[key] = entry
        return entry


@dataclass(frozen=True)
class AnalysisOutcome:
    """What one call of :func:`run_analysis_job` did."""

    job_id: int
    status: Literal["done", "failed", "skipped"]
    """``skipped``: the job was not pending (done already, or claimed by another worker)."""
    outcome: Literal["analysed", "not_analysable"] | None = None
    reason: str | None = None
    result_set_id: int | None = None
    outbox_ids: tuple[int, ...] = ()
    objects: int = 0
    seconds: float = 0.0
    """The whole job: reading, analysis, writing the result objects, recording them."""
    write_seconds: float = 0.0
    """Building and writing the result objects and recording them in the outbox."""
    error: str = ""


def _expected_error_types() -> tuple[type[Exception], ...]:
    from pipeline.device import DeviceError
    from pipeline.dicom_out import SourceError
    from pipeline.registry import ModelRegistryError
    from pipeline.volume import VolumeError

    return (ModelRegistryError, DeviceError, SourceError, VolumeError)


def _summary(result: StudyResult, objects: int) -> dict[str, object]:
    patient = result.patient
    return {
        "outcome": result.outcome,
        "probability": None if patient is None else patient.probability,
        "osteoporosis": None if patient is None else patient.osteoporosis,
        "vbq": None if patient is None else patient.vbq,
        "sequences": [] if patient is None else list(patient.sequences),
        "demo_models": result.demo_models,
        "models": [f"{m.name} {m.version}" for m in result.models],
        "objects": objects,
    }


def store_results(
    config: NodeConfig,
    outbox: Outbox,
    result: StudyResult,
    *,
    job_id: int | None = None,
) -> tuple[int | None, list[int], int]:
    """Write the result objects of ``result`` and queue them for the result peers.

    Returns:
        (result set id, outbox ids, number of objects); ``(None, [], 0)`` when the study was
        not analysed (nothing to send).
    """
    from pipeline.dicom_out import build_result_objects, write_dataset

    objects = build_result_objects(result)
    if len(objects) == 0:
        return None, [], 0
    folder = results_root(config) / study_key(result.study_instance_uid) / uuid.uuid4().hex
    files: list[NewResultFile] = []
    for name, dataset in objects.named:
        path = write_dataset(dataset, folder / name)
        files.append(
            NewResultFile(
                path=path,
                sop_class_uid=str(dataset.SOPClassUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
                transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
            )
        )
    (folder / RESULT_JSON_NAME).write_text(result.to_json(include_masks=False), encoding="utf-8")
    set_id, outbox_ids = outbox.record_result_set(
        result.study_instance_uid,
        files,
        result_peers(config),
        job_id=job_id,
        summary=_summary(result, len(files)),
    )
    return set_id, outbox_ids, len(files)


def run_analysis_job(
    config: NodeConfig,
    state: StateDB,
    job_id: int,
    *,
    analyzer: Analyzer | None = None,
    worker: str = IN_PROCESS_WORKER,
    max_attempts: int | None = None,
) -> AnalysisOutcome:
    """Analyse the study of a pending analysis job and queue its results for export.

    The job ends ``done`` (analysed, or not analysable: no results and no error) or ``failed``
    with a message (models missing, source files unreadable, an unexpected error). Never
    raises for a bad study.

    Each claim counts an attempt. An attempt that never finished (its worker was lost) leaves
    the job running; whoever puts it back to pending and claims it again starts the next
    attempt, and beyond ``max_attempts`` the job is failed instead of run (a study that kills
    its worker every time). A job whose result set was recorded before its worker was lost
    is finished without analysing again, so a study never gets two result sets from one job.
    """
    started = time.monotonic()
    job = state.claim_job(job_id, worker)
    if job is None:
        return AnalysisOutcome(job_id, "skipped")
    tag = uid_tag(job.study_uid)
    if job.kind != ANALYSIS:
        message = f"unknown job kind {job.kind!r}"
        state.fail_job(job_id, message)
        return AnalysisOutcome(job_id, "failed", error=message)
    if max_attempts is not None and job.attempts > max_attempts:
        message = (
            f"worker lost in each of {job.attempts - 1} attempt(s); stopped at the limit "
            f"queue.max_attempts = {max_attempts}"
        )
        state.fail_job(job_id, message)
        LOGGER.error("analysis job %d (study %s) failed: %s", job_id, tag, message)
        return AnalysisOutcome(job_id, "failed", error=message)
    if job.attempts > 1:
        with open_outbox(config, state.path) as earlier:
            recorded = earlier.result_set_of_job(job_id)
            recorded_ids = (
                [] if recorded is None else earlier.entries_of_result_set(recorded.id)
            )
            recorded_files = 0 if recorded is None else len(earlier.files(recorded.id))
        if recorded is not None:
            state.finish_job(job_id)
            LOGGER.info("job %d: results were recorded by an earlier attempt", job_id)
            return AnalysisOutcome(
                job_id,
                "done",
                outcome="analysed",
                result_set_id=recorded.id,
                outbox_ids=tuple(recorded_ids),
                objects=recorded_files,
                seconds=time.monotonic() - started,
            )
    outbox: Outbox | None = None
    try:
        spool = open_spool(config)
        paths = [spool.path(record.path) for record in state.instances(job.study_uid)]
        if analyzer is None:
            shared, lock = shared_analyzer(config.pipeline)
            with lock:
                result = shared.analyze_study(paths)
        else:
            result = analyzer.analyze_study(paths)
        outbox = open_outbox(config, state.path)
        writing = time.monotonic()
        set_id, outbox_ids, count = store_results(config, outbox, result, job_id=job_id)
        write_seconds = time.monotonic() - writing
    except _expected_error_types() as exc:
        message = f"{type(exc).__name__}: {exc}"
        state.fail_job(job_id, message)
        LOGGER.error("analysis job %d (study %s) failed: %s", job_id, tag, message)
        return AnalysisOutcome(job_id, "failed", error=message,
                               seconds=time.monotonic() - started)
    except Exception as exc:
        message = f"unexpected {type(exc).__name__} (details in the debug log)"
        state.fail_job(job_id, message)
        LOGGER.error("analysis job %d (study %s) failed: %s", job_id, tag, message)
        LOGGER.debug("analysis job %d failed", job_id, exc_info=exc)
        return AnalysisOutcome(job_id, "failed", error=message,
                               seconds=time.monotonic() - started)
    finally:
        if outbox is not None:
            outbox.close()
    state.finish_job(job_id)
    seconds = time.monotonic() - started
    if result.analysed:
        LOGGER.info(
            "job %d: study %s analysed, %d result object(s) queued for %d peer(s) in %.2f s",
            job_id, tag, count, len(outbox_ids), seconds,
        )
    else:
        LOGGER.info("job %d: study %s not analysable (%s); no results", job_id, tag,
                    result.reason)
    return AnalysisOutcome(
        job_id,
        "done",
        outcome=result.outcome,
        reason=result.reason,
        result_set_id=set_id,
        outbox_ids=tuple(outbox_ids),
        objects=count,
        seconds=seconds,
        write_seconds=write_seconds,
    )


def run_export_job(
    config: NodeConfig,
    state: StateDB,
    outbox_id: int,
    *,
    worker: str = IN_PROCESS_WORKER,
    force: bool = False,
) -> ExportResult:
    """Send one outbox row if it is pending and due (``force``: even if not yet due)."""
    with open_outbox(config, state.path) as outbox:
        return export_entry(config, outbox, outbox_id, worker=worker, force=force)


class InProcessRunner:
    """Analysis and export in threads of the node's own process (no broker configured).

    Use it as the node's dispatcher. :meth:`start` resumes interrupted work and starts the
    threads (it is called on the first dispatch if it was not called before); with ``preload``
    the models are loaded and warmed up at once, so the first study does not wait for them.
    :meth:`stop` ends the threads after the unit of work in progress.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        analyzer: Analyzer | None = None,
        worker: str = IN_PROCESS_WORKER,
        poll_interval: float = 1.0,
        preload: bool = False,
        on_analysis: Callable[[AnalysisOutcome], None] | None = None,
        on_export: Callable[[ExportResult], None] | None = None,
    ) -> None:
        self.config = config
        self.analyzer = analyzer
        self.worker = worker
        self.poll_interval = poll_interval
        self.preload = preload
        self.on_analysis = on_analysis
        self.on_export = on_export
        self._jobs: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._wake_export = threading.Event()
        self._lock = threading.Lock()
        """Guards start and stop."""
        self._busy_lock = threading.Lock()
        self._busy = 0
        self._threads: list[threading.Thread] = []
        self._state: StateDB | None = None
        self._outbox: Outbox | None = None

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        """Open the state database, resume interrupted work and start the threads."""
        with self._lock:
            if self._threads:
                return
            self._stop.clear()
            self._state = StateDB(state_db_path(self.config))
            self._outbox = open_outbox(self.config, self._state.path)
            requeued = self._state.requeue_running(self.worker)
            recovered = self._outbox.recover(self.worker)
            if requeued or recovered:
                LOGGER.info(
                    "resuming %d interrupted analysis job(s) and %d interrupted export(s)",
                    len(requeued), len(recovered),
                )
            for job in self._state.jobs(state="pending"):
                self._jobs.put(job.id)
            if self.preload:
                self._enter()
            self._threads = [
                threading.Thread(target=self._analysis_loop, name="analysis", daemon=True),
                threading.Thread(target=self._export_loop, name="export", daemon=True),
            ]
            for thread in self._threads:
                thread.start()

    def dispatch(self, job_id: int) -> None:
        """Queue a pending job (ids seen before are harmless: claiming is atomic)."""
        if not self._threads:
            self.start()
        self._jobs.put(job_id)

    def wake_export(self) -> None:
        """Look at the outbox now (e.g. after ``outbox retry`` in this process)."""
        self._wake_export.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the work in progress and close the state database."""
        with self._lock:
            threads, self._threads = self._threads, []
            self._stop.set()
            self._jobs.put(None)
            self._wake_export.set()
            deadline = time.monotonic() + timeout
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if self._outbox is not None:
                self._outbox.close()
                self._outbox = None
            if self._state is not None:
                self._state.close()
                self._state = None

    def idle(self) -> bool:
        """No job queued or running and nothing due in the outbox."""
        with self._busy_lock:
            busy = self._busy
        if busy or not self._jobs.empty():
            return False
        outbox = self._outbox
        if outbox is None:
            return True
        try:
            return not outbox.due()
        except sqlite3.ProgrammingError:  # closed by stop() meanwhile
            return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until :meth:`idle` (retries scheduled for later do not count); ``False`` on
        timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return self.idle()

    def _enter(self) -> None:
        with self._busy_lock:
            self._busy += 1

    def _leave(self) -> None:
        with self._busy_lock:
            self._busy -= 1

    def _load_models(self) -> None:
        """Load and warm up the models before the first study arrives (``preload``)."""
        from pipeline.device import DeviceError
        from pipeline.registry import ModelRegistryError

        started = time.monotonic()
        try:
            if self.analyzer is None:
                analyzer, lock = shared_analyzer(self.config.pipeline)
                with lock:
                    analyzer.warmup()
            else:
                self.analyzer.warmup()
        except (ModelRegistryError, DeviceError) as exc:
            LOGGER.error("the analysis cannot run until this is fixed: %s", exc)
            return
        except Exception as exc:
            LOGGER.error("loading the models failed: %s", type(exc).__name__)
            LOGGER.debug("loading the models failed", exc_info=exc)
            return
        LOGGER.info("models ready in %.1f s", time.monotonic() - started)

    def _analysis_loop(self) -> None:
        if self.preload:
            try:
                self._load_models()
            finally:
                self._leave()  # entered in start(), so idle() waits for the models
        while not self._stop.is_set():
            try:
                job_id = self._jobs.get(timeout=self.poll_interval)
            except queue.Empty:
                continue
            if job_id is None or self._stop.is_set():
                continue
            state = self._state
            if state is None:
                continue
            self._enter()
            try:
                outcome = run_analysis_job(
                    self.config,
                    state,
                    job_id,
                    analyzer=self.analyzer,
                    worker=self.worker,
                    max_attempts=self.config.queue.max_attempts,
                )
                if outcome.outbox_ids:
                    self._wake_export.set()
                if self.on_analysis is not None and outcome.status != "skipped":
                    self.on_analysis(outcome)
            except Exception as exc:
                LOGGER.error("analysis job %d could not be run: %s", job_id, type(exc).__name__)
                LOGGER.debug("analysis job %d could not be run", job_id, exc_info=exc)
            finally:
                self._leave()

    def _export_loop(self) -> None:
        while not self._stop.is_set():
            outbox = self._outbox
            if outbox is None:
                return
            wait = self.poll_interval
            self._wake_export.clear()
            self._enter()
            try:
                for outbox_id in outbox.due():
                    if self._stop.is_set():
                        break
                    result = export_entry(self.config, outbox, outbox_id, worker=self.worker)
                    if self.on_export is not None and result.status != "skipped":
                        self.on_export(result)
                upcoming = outbox.next_due_at()
                if upcoming is not None:
                    wait = min(wait, max(0.0, upcoming - time.time()))
            except Exception as exc:
                LOGGER.error("the export loop failed (%s); retrying", type(exc).__name__)
                LOGGER.debug("the export loop failed", exc_info=exc)
            finally:
                self._leave()
            self._wake_export.wait(wait)

