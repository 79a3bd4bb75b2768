"""Observability: Prometheus metrics and a health endpoint over HTTP.

The metrics that describe the node's work (instances received, studies and jobs by state,
failures by kind, outbox entries, latency histograms) are computed from the state database at
scrape time by :class:`StateCollector`: the database is the source of truth, so the figures are
right whichever process (the node, ``opmri-node outbox``, Celery workers) did the work and stay
right across restarts. Queue depths are read from Redis (``LLEN`` of the queue lists) when a
broker is configured. A few counters only the listening process can know (associations accepted
and rejected) live in this process (:func:`record_association`).

:func:`start_monitoring` serves ``/metrics`` (Prometheus text or OpenMetrics, by the scraper's
``Accept`` header) and ``/healthz`` (JSON: 200 when every check passes, 503 otherwise) from a
daemon thread. The node role exports the database-derived and queue metrics; the worker role
serves its health checks and process metrics only, so that summing over scrape targets never
counts a job twice.

No metric carries patient data: labels are states, queue names, peer-independent failure
kinds (:func:`failure_kind`) and association outcomes.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Final, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from opmri_node import __version__

if TYPE_CHECKING:
    from opmri_node.config import NodeConfig

LOGGER = logging.getLogger(__name__)

Role = Literal["node", "worker"]

QUEUES: Final[tuple[str, ...]] = ("analysis", "export")
"""The Celery queues; with kombu's Redis transport each is a Redis list named like the queue."""

_KOMBU_PRIORITY_SEP: Final[str] = "\x06\x16"
_KOMBU_PRIORITY_STEPS: Final[tuple[int, ...]] = (3, 6, 9)
"""kombu keeps messages sent with a priority in lists ``<queue>\\x06\\x16<step>``."""

_KOMBU_UNACKED: Final[str] = "unacked"
"""kombu's hash of delivered, not yet acknowledged messages (``acks_late`` tasks running)."""

BROKER_TIMEOUT_S: Final[float] = 1.0
"""Socket timeout for the broker in a scrape or a health check."""

DB_TIMEOUT_S: Final[float] = 2.0
"""Busy timeout of the state database connection opened by a scrape or a health check."""

JOB_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)
"""Seconds from claiming an analysis job to finishing it (GPU: about 1 s; CPU: several)."""

STUDY_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1800.0, 3600.0,
)
"""Seconds from a study's job being recorded to its results stored on every peer."""

# -- process-local counters (the listening process) ------------------------------------------

ASSOCIATION_OUTCOMES: Final[tuple[str, ...]] = ("released", "aborted", "rejected", "closed")
REJECT_REASONS: Final[tuple[str, ...]] = ("called_ae", "calling_ae", "host", "limit", "other")

SCP_ASSOCIATIONS = Counter(
    "opmri_scp_associations",
    "DICOM associations handled by this process's listener, by how they ended.",
    ["outcome"],
)
SCP_REJECTED = Counter(
    "opmri_scp_associations_rejected",
    "Associations this process's listener rejected, by reason.",
    ["reason"],
)
for _outcome in ASSOCIATION_OUTCOMES:
    SCP_ASSOCIATIONS.labels(outcome=_outcome)
for _reason in REJECT_REASONS:
    SCP_REJECTED.labels(reason=_reason)

_REJECT_REASON_PATTERNS: Final[tuple[tuple[str, str], ...]] = (
    ("called AE title", "called_ae"),
    ("not allowed from this host", "host"),
    ("calling AE title", "calling_ae"),
    ("association limit", "limit"),
)


def reject_reason(reason: str) -> str:
    """The label for the reason text of a rejected association (one of REJECT_REASONS)."""
    for needle, label in _REJECT_REASON_PATTERNS:
        if needle in reason:
            return label
    return "other"


def record_association(outcome: str, reason: str = "") -> None:
    """Count an association that ended (called where its audit line is written)."""
    label = outcome if outcome in ASSOCIATION_OUTCOMES else "closed"
    SCP_ASSOCIATIONS.labels(outcome=label).inc()
    if label == "rejected":
        SCP_REJECTED.labels(reason=reject_reason(reason)).inc()


# -- failure kinds ---------------------------------------------------------------------------

_KIND_PATTERNS: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(pattern, re.IGNORECASE), kind)
    for pattern, kind in (
        (r"^worker lost", "worker_lost"),
        (r"^unexpected\b", "unexpected"),
        (r"^unknown job kind", "unknown_job_kind"),
        (r"no longer configured", "peer_removed"),
        (r"result file is missing", "file_missing"),
        (r"association rejected", "association_rejected"),
        (r"no association", "no_association"),
        (r"no response|association ended|aborted", "no_response"),
        (r"internal error", "internal"),
        (r"status 0x[0-9a-f]{4}", "status"),
        (r"cannot send", "cannot_send"),
    )
)
_EXCEPTION_PREFIX: Final[re.Pattern[str]] = re.compile(
    r"^([A-Z][A-Za-z0-9]{0,60}(?:Error|Exception|Timeout|Exit))\b"
)
MAX_KIND_LENGTH: Final[int] = 40


def failure_kind(error: str | None) -> str:
    """A short, bounded category for a job's or outbox row's error text (never the text).

    ``"VolumeError: ..."`` -> ``volume``; ``"ModelRegistryError: ..."`` -> ``model_registry``;
    ``"worker lost in each of 3 attempt(s) ..."`` -> ``worker_lost``; ``"unexpected KeyError
    ..."`` -> ``unexpected``; export errors by what went wrong (``no_association``,
    ``association_rejected``, ``status``, ``no_response``, ...); anything else ``other``.
    """
    text = (error or "").strip()
    if not text:
        return "other"
    match = _EXCEPTION_PREFIX.match(text)
    if match:
        name = match.group(1)
        if name.endswith("Error") and len(name) > len("Error"):
            name = name[: -len("Error")]
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
        return snake[:MAX_KIND_LENGTH]
    for pattern, kind in _KIND_PATTERNS:
        if pattern.search(text):
            return kind
    return "other"


# -- reading the state database --------------------------------------------------------------


def state_db_path(config: NodeConfig) -> Path:
    """Where the node keeps its state database (see :func:`opmri_node.service.state_db_path`)."""
    from opmri_node.service import state_db_path as path_of

    return path_of(config)


@contextmanager
def read_state_db(path: Path, timeout: float = DB_TIMEOUT_S) -> Iterator[sqlite3.Connection]:
    """A short-lived, query-only connection to an existing state database.

    Raises:
        sqlite3.Error: if the file does not exist or is not a readable database.
    """
    uri = Path(path).resolve().as_uri() + "?mode=rw"
    with closing(
        sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    ) as conn:
        conn.execute("PRAGMA query_only = ON")
        yield conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts, count and sum of a set of durations."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    total: float

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        bucket_samples: list[tuple[str, float]] = [
            (floatToGoString(bound), float(count)) for bound, count in self.buckets
        ]
        bucket_samples.append(("+Inf", float(self.count)))
        return HistogramMetricFamily(
            name, documentation, buckets=bucket_samples, sum_value=self.total
        )


def _histogram(conn: sqlite3.Connection, durations_sql: str, bounds: Sequence[float]) -> Histogram:
    """One pass over ``durations_sql`` (a SELECT of one column ``d``) into histogram buckets."""
    columns = ", ".join(f"TOTAL(d <= {float(bound)!r})" for bound in bounds)
    row = conn.execute(f"SELECT COUNT(d), TOTAL(d), {columns} FROM ({durations_sql})").fetchone()
    count = int(row[0])
    return Histogram(
        buckets=tuple((bound, int(value)) for bound, value in zip(bounds, row[2:], strict=True)),
        count=count,
        total=float(row[1]),
    )


_STUDY_STATE_SQL: Final[str] = """
SELECT CASE WHEN s.received_seq > s.queued_seq THEN 'receiving'
            ELSE COALESCE((SELECT j.state FROM jobs j WHERE j.study_id = s.id
                           ORDER BY j.id DESC LIMIT 1), 'receiving') END AS st,
       COUNT(*)
FROM studies s GROUP BY st
"""

_JOB_DURATION_SQL: Final[str] = (
    "SELECT MAX(finished_at - started_at, 0) AS d FROM jobs WHERE state = 'done' "
    "AND kind = 'analysis' AND started_at IS NOT NULL AND finished_at IS NOT NULL"
)

_STUDY_LATENCY_SQL: Final[str] = """
SELECT MAX(o.last_sent - j.created_at, 0) AS d
FROM (SELECT result_set_id, MAX(sent_at) AS last_sent FROM outbox GROUP BY result_set_id
      HAVING TOTAL(state = 'done') > 0
         AND TOTAL(state NOT IN ('done', 'superseded')) = 0) o
JOIN result_sets r ON r.id = o.result_set_id
JOIN jobs j ON j.id = r.job_id
"""

STUDY_STATES: Final[tuple[str, ...]] = ("receiving", "pending", "running", "done", "failed")
JOB_STATES: Final[tuple[str, ...]] = ("pending", "running", "done", "failed")
OUTBOX_STATES: Final[tuple[str, ...]] = ("pending", "sending", "done", "failed", "superseded")


@dataclass
class StateFigures:
    """Everything the metrics report from the state database, read in one go."""

    instances: int = 0
    studies: dict[str, int] = field(default_factory=dict)
    studies_analysed: int = 0
    jobs: dict[str, int] = field(default_factory=dict)
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    """(stage, kind) -> count, stage ``analysis`` (failed jobs) or ``export`` (outbox rows)."""
    outbox: dict[str, int] | None = None
    """Outbox rows by state (all 0 while the outbox tables do not exist yet)."""
    job_duration: Histogram | None = None
    study_latency: Histogram | None = None


def read_figures(conn: sqlite3.Connection) -> StateFigures:
    """Read :class:`StateFigures` (a handful of aggregate queries, no per-row work in Python
    except for grouping the failed rows' error prefixes)."""
    figures = StateFigures()
    conn.execute("BEGIN")  # one consistent snapshot for all queries
    try:
        tables = _tables(conn)
        figures.instances = int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
        figures.studies = dict.fromkeys(STUDY_STATES, 0)
        for state, count in conn.execute(_STUDY_STATE_SQL):
            figures.studies[str(state)] = int(count)
        figures.jobs = dict.fromkeys(JOB_STATES, 0)
        for state, count in conn.execute(
            "SELECT state, COUNT(*) FROM jobs WHERE kind = 'analysis' GROUP BY state"
        ):
            figures.jobs[str(state)] = int(count)
        figures.studies_analysed = int(
            conn.execute(
                "SELECT COUNT(DISTINCT study_id) FROM jobs WHERE state = 'done' "
                "AND kind = 'analysis'"
            ).fetchone()[0]
        )
        _add_failures(
            figures.failures,
            "analysis",
            conn.execute(
                "SELECT substr(error, 1, 160), COUNT(*) FROM jobs WHERE state = 'failed' "
                "AND kind = 'analysis' GROUP BY 1"
            ),
        )
        figures.job_duration = _histogram(conn, _JOB_DURATION_SQL, JOB_DURATION_BUCKETS)
        figures.outbox = dict.fromkeys(OUTBOX_STATES, 0)
        figures.study_latency = Histogram(
            tuple((bound, 0) for bound in STUDY_LATENCY_BUCKETS), 0, 0.0
        )
        if {"outbox", "result_sets"} <= tables:  # created when results are first recorded
            for state, count in conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
                figures.outbox[str(state)] = int(count)
            _add_failures(
                figures.failures,
                "export",
                conn.execute(
                    "SELECT substr(error, 1, 160), COUNT(*) FROM outbox WHERE state = 'failed' "
                    "GROUP BY 1"
                ),
            )
            figures.study_latency = _histogram(conn, _STUDY_LATENCY_SQL, STUDY_LATENCY_BUCKETS)
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")
    return figures


def _add_failures(
    into: dict[tuple[str, str], int], stage: str, rows: Iterable[tuple[str | None, int]]
) -> None:
    for error, count in rows:
        key = (stage, failure_kind(error))
        into[key] = into.get(key, 0) + int(count)


@dataclass(frozen=True)
class FailedJob:
    """A failed analysis job, for ``opmri-node status`` (no patient data)."""

    id: int
    study: str
    """The study's tag (see :func:`opmri_node.state.study_key`)."""
    at: float
    attempts: int
    error: str


@dataclass(frozen=True)
class FailedExport:
    """A failed outbox row, for ``opmri-node status``."""

    id: int
    study: str
    peer: str
    at: float
    attempts: int
    error: str


def recent_failures(
    conn: sqlite3.Connection, limit: int
) -> tuple[list[FailedJob], list[FailedExport]]:
    """The most recent failed analysis jobs and failed outbox rows, newest first."""
    jobs = [
        FailedJob(int(row[0]), str(row[1])[:12], float(row[2]), int(row[3]), str(row[4] or ""))
        for row in conn.execute(
            "SELECT j.id, s.study_key, COALESCE(j.finished_at, j.updated_at), j.attempts, "
            "j.error FROM jobs j JOIN studies s ON s.id = j.study_id "
            "WHERE j.state = 'failed' ORDER BY j.id DESC LIMIT ?",
            (limit,),
        )
    ]
    exports: list[FailedExport] = []
    if {"outbox", "result_sets"} <= _tables(conn):
        from opmri_node.state import study_key

        exports = [
            FailedExport(
                int(row[0]),
                study_key(str(row[1]))[:12],
                str(row[2]),
                float(row[3]),
                int(row[4]),
                str(row[5] or ""),
            )
            for row in conn.execute(
                "SELECT o.id, r.study_uid, o.peer, o.updated_at, o.attempts, o.error "
                "FROM outbox o JOIN result_sets r ON r.id = o.result_set_id "
                "WHERE o.state = 'failed' ORDER BY o.id DESC LIMIT ?",
                (limit,),
            )
        ]
    return jobs, exports


# -- the broker ------------------------------------------------------------------------------


class BrokerUnavailableError(Exception):
    """The broker did not answer (message without credentials)."""


@dataclass(frozen=True)
class QueueDepths:
    """Messages waiting per queue and delivered-but-unacknowledged messages."""

    waiting: dict[str, int]
    unacked: int


def _redis_client(url: str, timeout: float) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _broker_error(exc: Exception) -> BrokerUnavailableError:
    # redis-py's messages name host and port, never the password of the URL
    return BrokerUnavailableError(f"{type(exc).__name__}: {exc}"[:300])


def queue_depths(
    url: str, queues: Sequence[str] = QUEUES, timeout: float = BROKER_TIMEOUT_S
) -> QueueDepths:
    """Waiting messages per queue (``LLEN`` of the queue's lists) and the unacked count.

    Raises:
        BrokerUnavailableError: if the broker does not answer within ``timeout``.
    """
    import redis

    client = _redis_client(url, timeout)
    try:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
            for step in _KOMBU_PRIORITY_STEPS:
                pipe.llen(f"{queue}{_KOMBU_PRIORITY_SEP}{step}")
        pipe.hlen(_KOMBU_UNACKED)
        values = [int(value) for value in pipe.execute()]
    except (redis.RedisError, OSError) as exc:
        raise _broker_error(exc) from None
    finally:
        client.close()
    per_queue = 1 + len(_KOMBU_PRIORITY_STEPS)
    waiting = {
        queue: sum(values[index * per_queue : (index + 1) * per_queue])
        for index, queue in enumerate(queues)
    }
    return QueueDepths(waiting=waiting, unacked=values[-1])


def ping_broker(url: str, timeout: float = BROKER_TIMEOUT_S) -> None:
    """Raises :class:`BrokerUnavailableError` unless the broker answers PING within ``timeout``."""
    import redis

    client = _redis_client(url, timeout)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise _broker_error(exc) from None
    finally:
        client.close()


# -- the collector ---------------------------------------------------------------------------


class StateCollector:
    """Metrics read from the state database and the broker at each scrape.

    Never raises: an unreadable database gives ``opmri_state_db_up 0``, a broker that does not
    answer ``opmri_broker_up 0``; the other metrics are still served.
    """

    def __init__(self, config: NodeConfig, *, role: Role = "node", database: bool = True) -> None:
        self.config = config
        self.role = role
        self.database = database
        self.db_path = state_db_path(config)

    def describe(self) -> list[Metric]:
        return []  # names are not registered in advance: collect() touches the database

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("opmri", "The opmri-node process serving these metrics.")
        info.add_metric([], {"version": __version__, "role": self.role})
        yield info
        free = GaugeMetricFamily(
            "opmri_data_free_bytes", "Free space on the volume of node.data_dir."
        )
        try:
            free.add_metric([], float(shutil.disk_usage(self.config.node.data_dir).free))
            yield free
        except OSError:
            pass
        if self.database:
            yield from self._database_metrics()
            if self.config.queue.broker is not None:
                yield from self._queue_metrics(self.config.queue.broker)

    def _database_metrics(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "opmri_state_db_up", "1 if the state database could be read at this scrape."
        )
        try:
            with read_state_db(self.db_path) as conn:
                figures = read_figures(conn)
        except sqlite3.Error as exc:
            LOGGER.warning("metrics: the state database cannot be read (%s)", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from figures_metrics(figures)

    def _queue_metrics(self, url: str) -> Iterator[Metric]:
        up = GaugeMetricFamily("opmri_broker_up", "1 if the broker answered at this scrape.")
        try:
            depths = queue_depths(url)
        except BrokerUnavailableError as exc:
            LOGGER.warning("metrics: the broker does not answer (%s)", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        waiting = GaugeMetricFamily(
            "opmri_queue_messages", "Messages waiting in a broker queue.", labels=["queue"]
        )
        for queue, count in depths.waiting.items():
            waiting.add_metric([queue], float(count))
        yield waiting
        unacked = GaugeMetricFamily(
            "opmri_queue_unacked_messages",
            "Messages delivered to a worker and not yet acknowledged (tasks running).",
        )
        unacked.add_metric([], float(depths.unacked))
        yield unacked


def figures_metrics(figures: StateFigures) -> Iterator[Metric]:
    """The metric families of :class:`StateFigures`."""
    instances = CounterMetricFamily(
        "opmri_instances_received", "Instances received and stored (every revision)."
    )
    instances.add_metric([], float(figures.instances))
    yield instances

    studies = GaugeMetricFamily(
        "opmri_studies",
        "Studies by state: receiving, or the state of the study's latest analysis job.",
        labels=["state"],
    )
    for state, count in figures.studies.items():
        studies.add_metric([state], float(count))
    yield studies

    analysed = CounterMetricFamily(
        "opmri_studies_analysed", "Studies with at least one analysis job done."
    )
    analysed.add_metric([], float(figures.studies_analysed))
    yield analysed

    jobs = GaugeMetricFamily("opmri_analysis_jobs", "Analysis jobs by state.", labels=["state"])
    for state, count in figures.jobs.items():
        jobs.add_metric([state], float(count))
    yield jobs

    finished = CounterMetricFamily(
        "opmri_analysis_jobs_finished", "Analysis jobs that ended, by result.", labels=["result"]
    )
    for result in ("done", "failed"):
        finished.add_metric([result], float(figures.jobs.get(result, 0)))
    yield finished

    failures = CounterMetricFamily(
        "opmri_failures",
        "Failed analysis jobs (stage analysis) and outbox entries (stage export), by kind.",
        labels=["stage", "kind"],
    )
    for (stage, kind), count in sorted(figures.failures.items()):
        failures.add_metric([stage, kind], float(count))
    yield failures

    if figures.outbox is not None:
        outbox = GaugeMetricFamily(
            "opmri_outbox_entries", "Outbox entries (result set x peer) by state.", labels=["state"]
        )
        for state, count in figures.outbox.items():
            outbox.add_metric([state], float(count))
        yield outbox

    if figures.job_duration is not None:
        yield figures.job_duration.family(
            "opmri_analysis_job_duration_seconds",
            "Run time of analysis jobs that ended done (started to finished).",
        )
    if figures.study_latency is not None:
        yield figures.study_latency.family(
            "opmri_study_latency_seconds",
            "From a study's analysis job being recorded to its results stored on every peer.",
        )


class _ForwardCollector:
    """Collects another registry (the process-wide one) into a server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


# -- health ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    """The outcome of the health checks."""

    role: Role
    checks: dict[str, Check]

    @property
    def healthy(self) -> bool:
        return all(check.ok for check in self.checks.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "role": self.role,
            "checks": {
                name: {"ok": check.ok, "detail": check.detail}
                for name, check in self.checks.items()
            },
        }


def check_health(
    config: NodeConfig, role: Role, listener_ok: Callable[[], bool] | None = None
) -> Health:
    """Run the health checks: state database readable, DICOM listener accepting (when
    ``listener_ok`` is given), broker answering (when configured), free disk space above
    ``node.min_free_disk_mb``."""
    checks: dict[str, Check] = {"state_db": _check_state_db(state_db_path(config))}
    if listener_ok is not None:
        try:
            accepting = bool(listener_ok())
        except Exception as exc:
            checks["listener"] = Check(False, f"check failed: {type(exc).__name__}")
        else:
            checks["listener"] = Check(
                accepting, "accepting associations" if accepting else "not listening"
            )
    if config.queue.broker is not None:
        try:
            ping_broker(config.queue.broker)
        except BrokerUnavailableError as exc:
            checks["broker"] = Check(False, str(exc))
        else:
            checks["broker"] = Check(True, "answers PING")
    checks["disk"] = _check_disk(config.node.data_dir, config.node.min_free_disk_mb)
    return Health(role, checks)


def _check_state_db(path: Path) -> Check:
    if not path.is_file():
        return Check(False, "no state database yet")
    try:
        with read_state_db(path) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.Error as exc:
        return Check(False, f"cannot be read: {exc}")
    if row is None:
        return Check(False, "no schema version recorded")
    return Check(True, f"schema version {row[0]}")


def _check_disk(data_dir: Path, min_free_mb: int) -> Check:
    try:
        free_mb = shutil.disk_usage(data_dir).free // (1024 * 1024)
    except OSError as exc:
        return Check(False, f"cannot stat the data directory: {type(exc).__name__}")
    return Check(free_mb >= min_free_mb, f"{free_mb} MiB free, minimum {min_free_mb} MiB")


# -- the HTTP server -------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        LOGGER.debug("monitoring %s - %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MonitoringServer:
    """``/metrics`` and ``/healthz`` on a daemon thread; see :func:`start_monitoring`."""

    def __init__(
        self,
        config: NodeConfig,
        role: Role,
        port: int,
        listener_ok: Callable[[], bool] | None = None,
        *,
        database_metrics: bool | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.listener_ok = listener_ok
        self.registry = CollectorRegistry()
        self.registry.register(
            StateCollector(
                config,
                role=role,
                database=(role == "node") if database_metrics is None else database_metrics,
            )
        )
        self.registry.register(_ForwardCollector(REGISTRY))
        self._metrics_app = make_wsgi_app(self.registry)
        bind = config.monitoring.bind
        server_class = _Server6 if ":" in bind else _Server
        try:
            self._server = server_class((bind, port), _QuietHandler)
        except OSError as exc:
            raise OSError(
                exc.errno, f"monitoring cannot listen on {bind}:{port}: {exc.strerror}"
            ) from None
        self._server.set_app(self._app)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"monitoring-{role}",
            daemon=True,
        )
        self._thread.start()
        LOGGER.info("monitoring (%s) on http://%s:%d/metrics and /healthz", role, bind, self.port)

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when the configured port is 0)."""
        return int(self._server.server_address[1])

    @property
    def address(self) -> tuple[str, int]:
        return str(self._server.server_address[0]), self.port

    def health(self) -> Health:
        return check_health(self.config, self.role, self.listener_ok)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MonitoringServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return list(self._metrics_app(environ, start_response))
        if path == "/healthz":
            health = self.health()
            body = json.dumps(health.to_json(), indent=2).encode() + b"\n"
            status = "200 OK" if health.healthy else "503 Service Unavailable"
            start_response(
                status,
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        body = b"opmri-node: /metrics (Prometheus), /healthz (JSON health checks)\n"
        start_response(
            "200 OK" if path == "/" else "404 Not Found",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]


def start_monitoring(
    config: NodeConfig,
    role: Role,
    listener_ok: Callable[[], bool] | None = None,
    *,
    database_metrics: bool | None = None,
) -> MonitoringServer | None:
    """Serve ``/metrics`` and ``/healthz`` on ``monitoring.bind`` and the role's port.

    Args:
        config: the node's configuration; the port is ``monitoring.port`` for the node role and
            ``monitoring.worker_port`` for the worker role (0: chosen by the OS, see ``.port``).
        role: ``node`` (exports the database-derived and queue metrics) or ``worker``.
        listener_ok: a callable saying whether the DICOM listener accepts associations
            (the node role's ``listener`` health check); none: no such check.
        database_metrics: export the database-derived and queue metrics (default: node role).

    Returns:
        The running server, or ``None`` when the role's port is not configured.

    Raises:
        OSError: if the address cannot be bound.
    """
    port = config.monitoring.port if role == "node" else config.monitoring.worker_port
    if port is None:
        return None
    return MonitoringServer(
        config, role, port, listener_ok, database_metrics=database_metrics
    )
