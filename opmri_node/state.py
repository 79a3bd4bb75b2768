"""The node's state database (SQLite in WAL mode): the source of truth for what it holds.

Tables
------
``studies``
    One row per Study Instance UID. ``received_seq`` counts instances (and new revisions)
    recorded for the study; ``queued_seq`` is the value of ``received_seq`` that the study's
    latest analysis job covers. A study whose ``received_seq`` is ahead of ``queued_seq`` is
    still *receiving*; once it has been quiet for the stability period it gets a job.
``instances``
    One row per stored file. A re-sent identical instance adds nothing; an instance that
    arrives again with the same SOP Instance UID but different content is stored as a new
    revision, which becomes the *current* one (the one analysed) while older revisions stay
    on disk and in this table.
``jobs``
    Work for a study (``kind`` ``analysis``): ``pending`` -> ``running`` -> ``done`` or
    ``failed``. :meth:`StateDB.claim_job` moves a job from pending to running atomically, so an
    in-process runner and Celery workers in other processes can share the table. At most one
    job per study and kind is pending at a time (a partial unique index).

The schema is created in :func:`_create_schema`, the one place that defines it, and is
stamped with :data:`SCHEMA_VERSION`.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A committed
transaction survives a crash of the process (``kill -9``); after a power failure the last
transactions may be missing, which is why the spool, not this database, is what makes a
received instance durable: the node flushes each instance's file with its commit record
before answering (:mod:`opmri_node.journal`), completes the spool from the committed files
left in ``incoming/`` and re-indexes spool files the database does not know after any
unclean stop (:func:`opmri_node.service.reindex_spool`).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Self, cast

SCHEMA_VERSION: Final[int] = 1

JobState = Literal["pending", "running", "done", "failed"]
JOB_STATES: Final[tuple[JobState, ...]] = ("pending", "running", "done", "failed")
ANALYSIS: Final[str] = "analysis"


def study_key(study_uid: str) -> str:
    """The study's spool folder name: a hash of its UID (never the UID itself).

    Its first 12 characters equal :func:`pipeline.privacy.uid_tag` of the UID, so log lines and
    folders can be matched up.
    """
    return hashlib.sha256(study_uid.encode("utf-8", "replace")).hexdigest()[:32]


class StateError(Exception):
    """The state database is unusable (wrong schema version, not a database)."""


@dataclass(frozen=True)
class InstanceRecord:
    """A stored file as recorded in the state database."""

    id: int
    study_id: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax_uid: str
    path: str
    """Path relative to the spool root."""
    data_offset: int
    """Byte offset of the data set in the file (after preamble and file meta)."""
    size: int
    revision: int
    current: bool
    received_at: float
    calling_ae: str


@dataclass(frozen=True)
class NewInstance:
    """What the receiver records about one stored file."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax_uid: str
    path: str
    data_offset: int
    size: int
    revision: int
    calling_ae: str


@dataclass(frozen=True)
class Study:
    """A study and a summary of what the node holds for it."""

    id: int
    study_uid: str
    key: str
    first_received: float
    last_received: float
    received_seq: int
    queued_seq: int
    instances: int
    series: int
    job_state: JobState | None
    """State of the study's latest job, or ``None`` if it never had one."""

    @property
    def state(self) -> str:
        """``receiving`` while instances are not yet covered by a job, else the job's state."""
        if self.received_seq > self.queued_seq:
            return "receiving"
        return self.job_state or "receiving"


@dataclass(frozen=True)
class Job:
    """A unit of work for one study."""

    id: int
    study_id: int
    study_uid: str
    kind: str
    state: JobState
    study_seq: int
    """The study's ``received_seq`` this job covers."""
    attempts: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    worker: str | None
    error: str | None


def connect_database(
    path: Path,
    busy_timeout_s: float,
    synchronous: str,
    create_schema: Callable[[sqlite3.Connection], None],
) -> sqlite3.Connection:
    """A connection to the state database file in WAL mode, its schema created if missing.

    Several processes (the node, workers, ``status``) open the file at the same moments;
    setting WAL mode and creating the schema then meets "database is locked" at once (SQLite
    does not wait for these), so opening is retried until ``busy_timeout_s``.

    Raises:
        sqlite3.DatabaseError: not a usable database.
    """
    deadline = time.monotonic() + busy_timeout_s
    while True:
        conn = sqlite3.connect(
            str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            create_schema(conn)
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        except BaseException:
            conn.close()
            raise


class SQLiteStore:
    """A lock-guarded connection to the state database file, shared by a process's threads.

    Other processes (the ``status`` command, Celery workers, receiving processes) open their
    own connections; SQLite's locking with a busy timeout orders their writes.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float,
        synchronous: str,
        create_schema: Callable[[sqlite3.Connection], None],
        error: type[Exception],
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._conn = connect_database(path, busy_timeout_s, synchronous, create_schema)
        except error:
            raise
        except sqlite3.DatabaseError as exc:
            raise error(f"{path}: not a usable state database ({exc})") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def _select(
        self,
        select: str,
        filters: Sequence[tuple[str, object | None]],
        order: str,
        limit: int | None,
    ) -> list[sqlite3.Row]:
        """``select`` with ``column = ?`` for every filter whose value is not ``None``."""
        clauses = [f"{column} = ?" for column, value in filters if value is not None]
        params: list[object] = [value for _, value in filters if value is not None]
        sql = select
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self._read(sql, params)

    def _counts(self, table: str, states: Sequence[str]) -> dict[str, int]:
        """Rows of ``table`` per ``state``, every state of ``states`` present."""
        counts = dict.fromkeys(states, 0)
        for state, count in self._read(f"SELECT state, COUNT(*) FROM {table} GROUP BY state"):
            counts[state] = int(count)
        return counts


class StateDB(SQLiteStore):
    """Thread-safe access to the state database: instances, studies and jobs."""

    def __init__(
        self, path: Path, *, busy_timeout_s: float = 30.0, synchronous: str = "NORMAL"
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError('Argument "synchronous" should be "NORMAL" or "FULL"')
        self.path = Path(path)
        super().__init__(
            self.path,
            busy_timeout_s=busy_timeout_s,
            synchronous=synchronous,
            create_schema=_create_schema,
            error=StateError,
        )

    # -- instances -------------------------------------------------------------------------

    def current_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The current revision stored under a SOP Instance UID, if any."""
        rows = self._read(
            _INSTANCE_SELECT + " WHERE i.sop_instance_uid = ? AND i.current = 1",
            (sop_instance_uid,),
        )
        return _instance(rows[0]) if rows else None

    def next_revision(self, sop_instance_uid: str) -> int:
        """The revision number a new file for this SOP Instance UID gets."""
        rows = self._read(
            "SELECT COALESCE(MAX(revision), 0) FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        return int(rows[0][0]) + 1

    def record_instance(self, new: NewInstance, received_at: float | None = None) -> int:
        """Record a stored file and restart its study's stability timer.

        The file becomes the current revision of its SOP Instance UID unless a higher revision
        is already recorded (which only happens when the spool is re-indexed).

        Returns:
            The instance row id.
        """
        now = time.time() if received_at is None else received_at
        with self._write() as conn:
            conn.execute(
                "INSERT INTO studies (study_uid, study_key, first_received, last_received, "
                "received_seq, queued_seq) VALUES (?, ?, ?, ?, 1, 0) "
                "ON CONFLICT(study_uid) DO UPDATE SET last_received = MAX(last_received, "
                "excluded.last_received), received_seq = received_seq + 1",
                (new.study_uid, study_key(new.study_uid), now, now),
            )
            study_id = conn.execute(
                "SELECT id FROM studies WHERE study_uid = ?", (new.study_uid,)
            ).fetchone()[0]
            latest = conn.execute(
                "SELECT COALESCE(MAX(revision), 0) FROM instances WHERE sop_instance_uid = ?",
                (new.sop_instance_uid,),
            ).fetchone()[0]
            current = new.revision > latest
            if current:
                conn.execute(
                    "UPDATE instances SET current = 0 WHERE sop_instance_uid = ? AND current = 1",
                    (new.sop_instance_uid,),
                )
            cur = conn.execute(
                "INSERT INTO instances (study_id, series_uid, sop_instance_uid, sop_class_uid, "
                "modality, transfer_syntax_uid, path, data_offset, size, revision, current, "
                "received_at, calling_ae) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    study_id,
                    new.series_uid,
                    new.sop_instance_uid,
                    new.sop_class_uid,
                    new.modality,
                    new.transfer_syntax_uid,
                    new.path,
                    new.data_offset,
                    new.size,
                    new.revision,
                    int(current),
                    now,
                    new.calling_ae,
                ),
            )
            return int(cur.lastrowid or 0)

    def known_paths(self) -> set[str]:
        """Every spool path (relative) the database knows."""
        return {row[0] for row in self._read("SELECT path FROM instances")}

    def instances(self, study_uid: str, *, current_only: bool = True) -> list[InstanceRecord]:
        """The instances of a study, ordered by series and arrival."""
        sql = _INSTANCE_SELECT + " WHERE s.study_uid = ?"
        if current_only:
            sql += " AND i.current = 1"
        sql += " ORDER BY i.series_uid, i.id"
        return [_instance(row) for row in self._read(sql, (study_uid,))]

    def instance_count(self, *, current_only: bool = True) -> int:
        sql = "SELECT COUNT(*) FROM instances" + (" WHERE current = 1" if current_only else "")
        return int(self._read(sql)[0][0])

    # -- studies ---------------------------------------------------------------------------

    def study(self, study_uid: str) -> Study | None:
        rows = self._read(_STUDY_SELECT + " WHERE s.study_uid = ?", (study_uid,))
        return _study(rows[0]) if rows else None

    def study_by_id(self, study_id: int) -> Study | None:
        rows = self._read(_STUDY_SELECT + " WHERE s.id = ?", (study_id,))
        return _study(rows[0]) if rows else None

    def studies(self, *, limit: int | None = None) -> list[Study]:
        """Studies, most recently received first."""
        sql = _STUDY_SELECT + " ORDER BY s.last_received DESC, s.id DESC"
        params: tuple[object, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        return [_study(row) for row in self._read(sql, params)]

    def study_counts(self) -> dict[str, int]:
        """Number of studies per state (``receiving`` and the job states)."""
        counts: dict[str, int] = {}
        for study in self.studies():
            counts[study.state] = counts.get(study.state, 0) + 1
        return counts

    def next_stability_deadline(self, stable_seconds: float) -> float | None:
        """When the earliest receiving study becomes complete (epoch seconds), if any."""
        rows = self._read(
            "SELECT MIN(last_received) FROM studies WHERE received_seq > queued_seq"
        )
        value = rows[0][0]
        return None if value is None else float(value) + stable_seconds

    def create_ready_jobs(
        self, stable_seconds: float, now: float | None = None, kind: str = ANALYSIS
    ) -> list[int]:
        """Record a job for every study that has been quiet for ``stable_seconds``.

        A study becomes ready once per batch of instances: its ``queued_seq`` catches up with
        ``received_seq`` in the same transaction that records the job. If the study already has
        a pending job (not yet picked up), that job is widened to cover the new instances
        instead of adding a second one.

        Returns:
            Ids of newly created jobs (widened pending jobs are not repeated).
        """
        now = time.time() if now is None else now
        created: list[int] = []
        with self._write() as conn:
            ready = conn.execute(
                "SELECT id, received_seq FROM studies "
                "WHERE received_seq > queued_seq AND last_received <= ? ORDER BY last_received",
                (now - stable_seconds,),
            ).fetchall()
            for study_id, seq in ready:
                pending = conn.execute(
                    "SELECT id FROM jobs WHERE study_id = ? AND kind = ? AND state = 'pending'",
                    (study_id, kind),
                ).fetchone()
                if pending is not None:
                    conn.execute(
                        "UPDATE jobs SET study_seq = ?, updated_at = ? WHERE id = ?",
                        (seq, now, pending[0]),
                    )
                else:
                    cur = conn.execute(
                        "INSERT INTO jobs (study_id, kind, state, study_seq, attempts, "
                        "created_at, updated_at) VALUES (?, ?, 'pending', ?, 0, ?, ?)",
                        (study_id, kind, seq, now, now),
                    )
                    created.append(int(cur.lastrowid or 0))
                conn.execute("UPDATE studies SET queued_seq = ? WHERE id = ?", (seq, study_id))
        return created

    # -- jobs ------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job | None:
        rows = self._read(_JOB_SELECT + " WHERE j.id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(
        self,
        *,
        state: JobState | None = None,
        study_uid: str | None = None,
        limit: int | None = None,
    ) -> list[Job]:
        """Jobs, oldest first, optionally filtered by state and study."""
        rows = self._select(
            _JOB_SELECT, [("j.state", state), ("s.study_uid", study_uid)], "j.id", limit
        )
        return [_job(row) for row in rows]

    def job_counts(self) -> dict[JobState, int]:
        return cast(dict[JobState, int], self._counts("jobs", JOB_STATES))

    def claim_job(self, job_id: int, worker: str = "") -> Job | None:
        """Move a job from pending to running; ``None`` if it was not pending.

        Exactly one of several concurrent callers gets the job.
        """
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, "
                "updated_at = ?, finished_at = NULL, worker = ?, error = NULL "
                "WHERE id = ? AND state = 'pending'",
                (now, now, worker, job_id),
            )
            claimed = cur.rowcount == 1
        return self.job(job_id) if claimed else None

    def finish_job(self, job_id: int) -> bool:
        """Mark a running job done; ``False`` if it was not running."""
        return self._end_job(job_id, "done", None)

    def fail_job(self, job_id: int, error: str) -> bool:
        """Mark a running job failed with a message (no patient data); ``False`` if not running."""
        return self._end_job(job_id, "failed", error[:2000])

    def _end_job(self, job_id: int, state: JobState, error: str | None) -> bool:
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ? "
                "WHERE id = ? AND state = 'running'",
                (state, error, now, now, job_id),
            )
            return cur.rowcount == 1

    def requeue(self, job_id: int) -> bool:
        """Put a running or failed job back to pending (to retry it).

        Returns ``False`` if the job is neither running nor failed, or if its study already has
        another pending job of the same kind (which will cover the study instead).
        """
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT study_id, kind, state FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None or row["state"] not in ("running", "failed"):
                return False
            other = conn.execute(
                "SELECT 1 FROM jobs WHERE study_id = ? AND kind = ? AND state = 'pending'",
                (row["study_id"], row["kind"]),
            ).fetchone()
            if other is not None:
                return False
            conn.execute(
                "UPDATE jobs SET state = 'pending', updated_at = ?, worker = NULL WHERE id = ?",
                (now, job_id),
            )
            return True

    def requeue_running(self, worker: str | None = None) -> list[int]:
        """Return running jobs (of one worker, or all) to pending, e.g. after a crash.

        Returns:
            The ids of the jobs that are pending again.
        """
        sql = "SELECT id FROM jobs WHERE state = 'running'"
        params: tuple[object, ...] = ()
        if worker is not None:
            sql += " AND worker = ?"
            params = (worker,)
        return [job_id for (job_id,) in self._read(sql, params) if self.requeue(job_id)]

    def schema_version(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE key = 'schema_version'")[0][0])


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create the schema if the database is new; refuse a database of another version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and int(row[0]) != SCHEMA_VERSION:
            raise StateError(
                f"state database has schema version {row[0]}, this node uses {SCHEMA_VERSION}"
            )
        if row is None:
            for statement in _SCHEMA_SQL.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_SCHEMA_SQL: Final[str] = """
CREATE TABLE studies (
    id              INTEGER PRIMARY KEY,
    study_uid       TEXT NOT NULL UNIQUE,
    study_key       TEXT NOT NULL UNIQUE,
    first_received  REAL NOT NULL,
    last_received   REAL NOT NULL,
    received_seq    INTEGER NOT NULL DEFAULT 0,
    queued_seq      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX studies_waiting ON studies (last_received) WHERE received_seq > queued_seq;

CREATE TABLE instances (
    id                  INTEGER PRIMARY KEY,
    study_id            INTEGER NOT NULL REFERENCES studies (id),
    series_uid          TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    modality            TEXT NOT NULL DEFAULT '',
    transfer_syntax_uid TEXT NOT NULL,
    path                TEXT NOT NULL UNIQUE,
    data_offset         INTEGER NOT NULL,
    size                INTEGER NOT NULL,
    revision            INTEGER NOT NULL,
    current             INTEGER NOT NULL CHECK (current IN (0, 1)),
    received_at         REAL NOT NULL,
    calling_ae          TEXT NOT NULL DEFAULT '',
    UNIQUE (sop_instance_uid, revision)
);
CREATE UNIQUE INDEX instances_current ON instances (sop_instance_uid) WHERE current = 1;
CREATE INDEX instances_study ON instances (study_id, series_uid);

CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY,
    study_id    INTEGER NOT NULL REFERENCES studies (id),
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    study_seq   INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    worker      TEXT,
    error       TEXT
);
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_study ON jobs (study_id, id);
CREATE UNIQUE INDEX jobs_one_pending ON jobs (study_id, kind) WHERE state = 'pending';
"""

_INSTANCE_SELECT: Final[str] = (
    "SELECT i.*, s.study_uid AS study_uid FROM instances i JOIN studies s ON s.id = i.study_id"
)

_STUDY_SELECT: Final[str] = """
SELECT s.*,
    (SELECT COUNT(*) FROM instances i WHERE i.study_id = s.id AND i.current = 1) AS n_instances,
    (SELECT COUNT(DISTINCT series_uid) FROM instances i
        WHERE i.study_id = s.id AND i.current = 1) AS n_series,
    (SELECT state FROM jobs j WHERE j.study_id = s.id ORDER BY j.id DESC LIMIT 1) AS job_state
FROM studies s
"""

_JOB_SELECT: Final[str] = (
    "SELECT j.*, s.study_uid AS study_uid FROM jobs j JOIN studies s ON s.id = j.study_id"
)


def _instance(row: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(
        id=row["id"],
        study_id=row["study_id"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        sop_instance_uid=row["sop_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        modality=row["modality"],
        transfer_syntax_uid=row["transfer_syntax_uid"],
        path=row["path"],
        data_offset=row["data_offset"],
        size=row["size"],
        revision=row["revision"],
        current=bool(row["current"]),
        received_at=row["received_at"],
        calling_ae=row["calling_ae"],
    )


def _study(row: sqlite3.Row) -> Study:
    return Study(
        id=row["id"],
        study_uid=row["study_uid"],
        key=row["study_key"],
        first_received=row["first_received"],
        last_received=row["last_received"],
        received_seq=row["received_seq"],
        queued_seq=row["queued_seq"],
        instances=row["n_instances"],
        series=row["n_series"],
        job_state=row["job_state"],
    )


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        study_id=row["study_id"],
        study_uid=row["study_uid"],
        kind=row["kind"],
        state=row["state"],
        study_seq=row["study_seq"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        worker=row["worker"],
        error=row["error"],
    )
