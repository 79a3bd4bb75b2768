"""The durable outbox: result sets written to disk and recorded before they are sent.

Tables (in the node's state database, next to ``studies`` and ``jobs``; created here, stamped
with ``outbox_schema_version`` in ``meta``)
-------------------------------------------------------------------------------------------------
``result_sets``
    One row per analysis that produced result objects: the study, the job, the folder under
    ``<data_dir>/results`` holding the files and a small JSON summary (no patient data).
``result_files``
    The DICOM files of a result set, in send order, with their SOP class and instance UIDs.
``outbox``
    One row per result set and peer: ``pending`` -> ``sending`` -> ``done``; a failed attempt
    goes back to ``pending`` with ``next_attempt_at`` moved by the back-off, and after the last
    allowed attempt to ``failed``. A newer result set of the same study replaces the older
    one's pending or failed rows (``superseded``). :meth:`Outbox.claim` moves a row from
    ``pending`` to ``sending`` atomically, so concurrent senders (the node, ``opmri-node outbox
    retry``, Celery workers) never send one row twice at the same time.
``outbox_files``
    Per outbox row and file, the last C-STORE status: a retry sends only what was not stored.

Files are written (temporary file, fsync, rename) before the transaction that records them
commits, so every recorded result set is complete on disk; a restart finds ``pending`` rows
and rows left ``sending`` by a crash (:meth:`Outbox.recover`) and sends them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

from opmri_node.config import RetryPolicy
from opmri_node.state import SQLiteStore

OUTBOX_SCHEMA_VERSION: Final[int] = 1

OutboxState = Literal["pending", "sending", "done", "failed", "superseded"]
OUTBOX_STATES: Final[tuple[OutboxState, ...]] = (
    "pending",
    "sending",
    "done",
    "failed",
    "superseded",
)
RESULTS_DIR_NAME: Final[str] = "results"


class OutboxError(Exception):
    """The outbox tables are unusable (another schema version, not a database)."""


def retry_delay(policy: RetryPolicy, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based).

    ``initial_delay_s * factor ** (attempts - 1)``, at most ``max_delay_s``: with the defaults
    30 s, 60 s, 120 s, ... 480 s, then 600 s.
    """
    exponent = max(0, attempts - 1)
    try:
        delay = policy.initial_delay_s * policy.factor**exponent
    except OverflowError:
        return policy.max_delay_s
    return min(delay, policy.max_delay_s)


@dataclass(frozen=True)
class ResultFile:
    """One DICOM file of a result set."""

    result_set_id: int
    position: int
    path: str
    """Relative to the results root."""
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class NewResultFile:
    """A written file to record (see :meth:`Outbox.record_result_set`)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class ResultSet:
    """A recorded set of result objects of one study."""

    id: int
    study_uid: str
    job_id: int | None
    folder: str
    created_at: float
    summary: Mapping[str, Any]


@dataclass(frozen=True)
class OutboxEntry:
    """One result set on its way to one peer."""

    id: int
    result_set_id: int
    study_uid: str
    peer: str
    state: OutboxState
    attempts: int
    next_attempt_at: float
    created_at: float
    updated_at: float
    sent_at: float | None
    worker: str | None
    error: str | None
    files: int
    stored: int
    """Files the peer has acknowledged with success or a warning."""


class Outbox(SQLiteStore):
    """Thread-safe access to the outbox tables of a state database.

    Opens its own connection to the database file (WAL mode, ``synchronous=FULL``), so it can
    be used beside :class:`opmri_node.state.StateDB` in the same process or in another one.
    """

    def __init__(
        self, db_path: Path | str, results_root: Path | str, *, busy_timeout_s: float = 30.0
    ) -> None:
        self.db_path = Path(db_path)
        self.results_root = Path(results_root)
        super().__init__(
            self.db_path,
            busy_timeout_s=busy_timeout_s,
            synchronous="FULL",
            create_schema=_create_schema,
            error=OutboxError,
        )

    # -- recording -------------------------------------------------------------------------

    def record_result_set(
        self,
        study_uid: str,
        files: Sequence[NewResultFile],
        peers: Sequence[str],
        *,
        job_id: int | None = None,
        summary: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> tuple[int, list[int]]:
        """Record written result files and queue them for every peer in ``peers``.

        Older pending or failed outbox rows of the same study and peer are superseded: the
        newer result replaces them (rows being sent finish their attempt).

        Returns:
            The result set id and the new outbox ids (one per peer).

        Raises:
            ValueError: if a file lies outside the results root or there are no files.
        """
        if not files:
            raise ValueError('Argument "files" must not be empty')
        now = time.time() if now is None else now
        relative = [self._relative(item.path) for item in files]
        folder = str(Path(relative[0]).parent)
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO result_sets (study_uid, job_id, folder, created_at, summary) "
                "VALUES (?, ?, ?, ?, ?)",
                (study_uid, job_id, folder, now, json.dumps(dict(summary or {}), sort_keys=True)),
            )
            set_id = int(cur.lastrowid or 0)
            for position, (item, path) in enumerate(zip(files, relative, strict=True)):
                conn.execute(
                    "INSERT INTO result_files (result_set_id, position, path, sop_class_uid, "
                    "sop_instance_uid, transfer_syntax_uid) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        set_id,
                        position,
                        path,
                        item.sop_class_uid,
                        item.sop_instance_uid,
                        item.transfer_syntax_uid,
                    ),
                )
            outbox_ids: list[int] = []
            for peer in dict.fromkeys(peers):
                conn.execute(
                    "UPDATE outbox SET state = 'superseded', updated_at = ? "
                    "WHERE peer = ? AND state IN ('pending', 'failed') AND result_set_id IN "
                    "(SELECT id FROM result_sets WHERE study_uid = ? AND id != ?)",
                    (now, peer, study_uid, set_id),
                )
                cur = conn.execute(
                    "INSERT INTO outbox (result_set_id, peer, state, attempts, next_attempt_at, "
                    "created_at, updated_at) VALUES (?, ?, 'pending', 0, ?, ?, ?)",
                    (set_id, peer, now, now, now),
                )
                entry_id = int(cur.lastrowid or 0)
                conn.execute(
                    "INSERT INTO outbox_files (outbox_id, position, status) "
                    "SELECT ?, position, NULL FROM result_files WHERE result_set_id = ?",
                    (entry_id, set_id),
                )
                outbox_ids.append(entry_id)
        return set_id, outbox_ids

    def result_set_of_job(self, job_id: int) -> ResultSet | None:
        """The result set an analysis job recorded, if any (a job records at most one)."""
        rows = self._read(
            "SELECT id FROM result_sets WHERE job_id = ? ORDER BY id LIMIT 1", (job_id,)
        )
        return self.result_set(int(rows[0][0])) if rows else None

    def entries_of_result_set(self, result_set_id: int) -> list[int]:
        """Ids of the outbox rows of a result set (one per result peer)."""
        rows = self._read(
            "SELECT id FROM outbox WHERE result_set_id = ? ORDER BY id", (result_set_id,)
        )
        return [int(row[0]) for row in rows]

    def _relative(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.results_root.resolve()).as_posix()
        except ValueError:
            raise ValueError("result files must lie inside the results root") from None

    # -- queries ---------------------------------------------------------------------------

    def entry(self, outbox_id: int) -> OutboxEntry | None:
        rows = self._read(_ENTRY_SELECT + " WHERE o.id = ?", (outbox_id,))
        return _entry(rows[0]) if rows else None

    def entries(
        self,
        *,
        state: OutboxState | None = None,
        peer: str | None = None,
        study_uid: str | None = None,
        limit: int | None = None,
    ) -> list[OutboxEntry]:
        """Outbox rows, newest first, optionally filtered."""
        rows = self._select(
            _ENTRY_SELECT,
            [("o.state", state), ("o.peer", peer), ("r.study_uid", study_uid)],
            "o.id DESC",
            limit,
        )
        return [_entry(row) for row in rows]

    def counts(self) -> dict[OutboxState, int]:
        return cast(dict[OutboxState, int], self._counts("outbox", OUTBOX_STATES))

    def result_set(self, result_set_id: int) -> ResultSet | None:
        rows = self._read("SELECT * FROM result_sets WHERE id = ?", (result_set_id,))
        if not rows:
            return None
        row = rows[0]
        return ResultSet(
            id=row["id"],
            study_uid=row["study_uid"],
            job_id=row["job_id"],
            folder=row["folder"],
            created_at=row["created_at"],
            summary=json.loads(row["summary"] or "{}"),
        )

    def files(self, result_set_id: int) -> list[ResultFile]:
        rows = self._read(
            "SELECT * FROM result_files WHERE result_set_id = ? ORDER BY position",
            (result_set_id,),
        )
        return [
            ResultFile(
                result_set_id=row["result_set_id"],
                position=row["position"],
                path=row["path"],
                sop_class_uid=row["sop_class_uid"],
                sop_instance_uid=row["sop_instance_uid"],
                transfer_syntax_uid=row["transfer_syntax_uid"],
            )
            for row in rows
        ]

    def unsent_files(self, outbox_id: int) -> list[ResultFile]:
        """Files of an outbox row the peer has not yet acknowledged, in send order."""
        rows = self._read(
            "SELECT f.* FROM outbox o JOIN result_files f ON f.result_set_id = o.result_set_id "
            "JOIN outbox_files s ON s.outbox_id = o.id AND s.position = f.position "
            "WHERE o.id = ? AND (s.status IS NULL OR NOT (s.status = 0 OR s.status = 1 OR "
            "(s.status >= 45056 AND s.status < 49152))) ORDER BY f.position",
            (outbox_id,),
        )
        return [
            ResultFile(
                result_set_id=row["result_set_id"],
                position=row["position"],
                path=row["path"],
                sop_class_uid=row["sop_class_uid"],
                sop_instance_uid=row["sop_instance_uid"],
                transfer_syntax_uid=row["transfer_syntax_uid"],
            )
            for row in rows
        ]

    def path(self, file: ResultFile) -> Path:
        """Absolute path of a result file."""
        return self.results_root / file.path

    def due(self, now: float | None = None) -> list[int]:
        """Ids of pending rows whose next attempt is due, oldest first."""
        return list(self.due_attempts(now))

    def due_attempts(self, now: float | None = None) -> dict[int, int]:
        """Pending rows whose next attempt is due, oldest first: id -> attempts made so far."""
        now = time.time() if now is None else now
        rows = self._read(
            "SELECT id, attempts FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? "
            "ORDER BY id",
            (now,),
        )
        return {int(row[0]): int(row[1]) for row in rows}

    def next_due_at(self) -> float | None:
        """When the earliest pending row becomes due (epoch seconds), if any."""
        value = self._read("SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending'")[0][0]
        return None if value is None else float(value)

    # -- transitions -----------------------------------------------------------------------

    def claim(
        self, outbox_id: int, worker: str = "", *, now: float | None = None, force: bool = False
    ) -> OutboxEntry | None:
        """Move a due pending row to ``sending`` and count the attempt; ``None`` if it was not
        pending (or, without ``force``, not due yet). Exactly one concurrent caller wins."""
        now = time.time() if now is None else now
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1, worker = ?, "
                "updated_at = ? WHERE id = ? AND state = 'pending' AND (? OR next_attempt_at <= ?)",
                (worker, now, outbox_id, 1 if force else 0, now),
            )
            claimed = cur.rowcount == 1
        return self.entry(outbox_id) if claimed else None

    def record_statuses(self, outbox_id: int, statuses: Mapping[int, int | None]) -> None:
        """Store the C-STORE status per file position (``None``: not sent / no response)."""
        with self._write() as conn:
            for position, status in statuses.items():
                conn.execute(
                    "UPDATE outbox_files SET status = ? WHERE outbox_id = ? AND position = ?",
                    (status, outbox_id, position),
                )

    def mark_done(self, outbox_id: int, *, now: float | None = None) -> bool:
        """``sending`` -> ``done``; ``False`` if the row was not being sent."""
        now = time.time() if now is None else now
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE outbox SET state = 'done', sent_at = ?, updated_at = ?, error = NULL, "
                "worker = NULL WHERE id = ? AND state = 'sending'",
                (now, now, outbox_id),
            )
            return cur.rowcount == 1

    def mark_attempt_failed(
        self, outbox_id: int, error: str, policy: RetryPolicy, *, now: float | None = None
    ) -> OutboxState | None:
        """Record a failed attempt: back to ``pending`` after the back-off delay, or ``failed``
        once ``policy.max_attempts`` attempts were made.

        Returns:
            The new state, or ``None`` if the row was not being sent.
        """
        now = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute(
                "SELECT attempts FROM outbox WHERE id = ? AND state = 'sending'", (outbox_id,)
            ).fetchone()
            if row is None:
                return None
            attempts = int(row[0])
            final = attempts >= policy.max_attempts
            state: OutboxState = "failed" if final else "pending"
            next_at = now if final else now + retry_delay(policy, attempts)
            conn.execute(
                "UPDATE outbox SET state = ?, error = ?, next_attempt_at = ?, updated_at = ?, "
                "worker = NULL WHERE id = ?",
                (state, error[:2000], next_at, now, outbox_id),
            )
            return state

    def mark_failed(self, outbox_id: int, error: str, *, now: float | None = None) -> bool:
        """Give up on a row that cannot succeed (peer removed, files missing)."""
        now = time.time() if now is None else now
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE outbox SET state = 'failed', error = ?, updated_at = ?, worker = NULL "
                "WHERE id = ? AND state IN ('pending', 'sending')",
                (error[:2000], now, outbox_id),
            )
            return cur.rowcount == 1

    def reschedule(self, outbox_id: int, *, now: float | None = None) -> bool:
        """Make a failed or pending row due now with a fresh series of attempts.

        Returns ``False`` for rows being sent, already done or superseded.
        """
        now = time.time() if now is None else now
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                "updated_at = ?, worker = NULL WHERE id = ? AND state IN ('pending', 'failed')",
                (now, now, outbox_id),
            )
            return cur.rowcount == 1

    def recover(self, worker: str | None = None, *, now: float | None = None) -> list[int]:
        """Return rows left ``sending`` (by ``worker``, or by anyone) to ``pending``, due now.

        Used at start-up: a row is only ``sending`` while a process is sending it, so after a
        crash its attempt is treated as not made (the peer may have stored some files; it
        receives them again under the same UIDs).
        """
        now = time.time() if now is None else now
        sql = "SELECT id FROM outbox WHERE state = 'sending'"
        params: tuple[object, ...] = ()
        if worker is not None:
            sql += " AND worker = ?"
            params = (worker,)
        ids = [int(row[0]) for row in self._read(sql, params)]
        with self._write() as conn:
            for outbox_id in ids:
                conn.execute(
                    "UPDATE outbox SET state = 'pending', attempts = MAX(attempts - 1, 0), "
                    "next_attempt_at = ?, updated_at = ?, worker = NULL "
                    "WHERE id = ? AND state = 'sending'",
                    (now, now, outbox_id),
                )
        return ids


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = conn.execute("SELECT value FROM meta WHERE key = 'outbox_schema_version'").fetchone()
        if row is not None and int(row[0]) != OUTBOX_SCHEMA_VERSION:
            raise OutboxError(
                f"the outbox tables have schema version {row[0]}, this node uses "
                f"{OUTBOX_SCHEMA_VERSION}"
            )
        if row is None:
            for statement in _SCHEMA_SQL.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('outbox_schema_version', ?)",
                (str(OUTBOX_SCHEMA_VERSION),),
            )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_SCHEMA_SQL: Final[str] = """
CREATE TABLE result_sets (
    id          INTEGER PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    job_id      INTEGER,
    folder      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    summary     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX result_sets_study ON result_sets (study_uid, id);

CREATE TABLE result_files (
    result_set_id       INTEGER NOT NULL REFERENCES result_sets (id),
    position            INTEGER NOT NULL,
    path                TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    PRIMARY KEY (result_set_id, position)
);

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    result_set_id   INTEGER NOT NULL REFERENCES result_sets (id),
    peer            TEXT NOT NULL,
    state           TEXT NOT NULL
        CHECK (state IN ('pending', 'sending', 'done', 'failed', 'superseded')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    sent_at         REAL,
    worker          TEXT,
    error           TEXT
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX outbox_set ON outbox (result_set_id);

CREATE TABLE outbox_files (
    outbox_id   INTEGER NOT NULL REFERENCES outbox (id),
    position    INTEGER NOT NULL,
    status      INTEGER,
    PRIMARY KEY (outbox_id, position)
);
"""

_ENTRY_SELECT: Final[str] = """
SELECT o.*, r.study_uid AS study_uid,
    (SELECT COUNT(*) FROM outbox_files s WHERE s.outbox_id = o.id) AS n_files,
    (SELECT COUNT(*) FROM outbox_files s WHERE s.outbox_id = o.id AND s.status IS NOT NULL
        AND (s.status = 0 OR s.status = 1 OR (s.status >= 45056 AND s.status < 49152)))
        AS n_stored
FROM outbox o JOIN result_sets r ON r.id = o.result_set_id
"""


def _entry(row: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(
        id=row["id"],
        result_set_id=row["result_set_id"],
        study_uid=row["study_uid"],
        peer=row["peer"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        sent_at=row["sent_at"],
        worker=row["worker"],
        error=row["error"],
        files=row["n_files"],
        stored=row["n_stored"],
    )
