"""Study assembly on a running node: a quiet study gets exactly one job, timers survive restarts."""

from __future__ import annotations

import time
from pathlib import Path

from opmri_node.assembly import JobDispatcher, PendingJobs, StudyAssembler
from opmri_node.service import Node
from opmri_node.state import NewInstance, StateDB
from tests.node_fixtures import load, make_mr_series, store_statuses, storescu, write_config


class RecordingDispatcher:
    """A dispatcher that remembers what it was handed (the job runner comes later)."""

    def __init__(self) -> None:
        self.dispatched: list[int] = []

    def dispatch(self, job_id: int) -> None:
        self.dispatched.append(job_id)


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_protocol() -> None:
    assert isinstance(PendingJobs(), JobDispatcher)
    assert isinstance(RecordingDispatcher(), JobDispatcher)


def test_study_becomes_ready_exactly_once(tmp_path: Path) -> None:
    config = load(write_config(tmp_path, stable=0.8))
    dispatcher = RecordingDispatcher()
    series = make_mr_series(tmp_path / "in", 4)
    node = Node(config, dispatcher)
    host, port = node.start()
    try:
        state = node.state
        assert state is not None
        sent_at = time.monotonic()
        result = storescu(host, port, series.files[:2])
        assert store_statuses(result.stdout + result.stderr) == ["Success"] * 2
        time.sleep(0.3)
        result = storescu(host, port, series.files[2:])  # restarts the quiet period
        assert store_statuses(result.stdout + result.stderr) == ["Success"] * 2
        assert state.jobs() == []
        wait_until(lambda: len(state.jobs()) == 1)
        assert time.monotonic() - sent_at >= 0.8 + 0.3
        time.sleep(2.0)  # several assembly rounds later: still one job
        (job,) = state.jobs()
        assert job.state == "pending" and job.kind == "analysis"
        assert job.study_uid == series.study_uid
        assert dispatcher.dispatched == [job.id]
        study = state.study(series.study_uid)
        assert study is not None and study.instances == 4 and study.state == "pending"

        # more instances while the job is still pending: the pending job covers them
        extra = make_mr_series(tmp_path / "more", 1, study_uid=series.study_uid)
        storescu(host, port, extra.files)
        wait_until(lambda: state.study(series.study_uid).state == "pending")  # type: ignore[union-attr]
        assert len(state.jobs()) == 1 and state.jobs()[0].study_seq == 5

        # after the job ran, new instances give the study a new job
        assert state.claim_job(job.id, "test") is not None
        assert state.finish_job(job.id)
        late = make_mr_series(tmp_path / "late", 1, study_uid=series.study_uid)
        storescu(host, port, late.files)
        wait_until(lambda: len(state.jobs()) == 2)
        assert [j.state for j in state.jobs()] == ["done", "pending"]
        assert dispatcher.dispatched == [job.id, state.jobs()[1].id]
    finally:
        node.stop()


def test_restart_resumes_timers_and_redispatches_pending_jobs(tmp_path: Path) -> None:
    config = load(write_config(tmp_path, stable=3.0))
    config.node.data_dir.mkdir(parents=True)
    now = time.time()
    with StateDB(config.node.data_dir / "state.sqlite3") as state:
        # study A went quiet 2 s ago (1 s of its 3 s left); study B already has a pending job
        studies = (("1.2.10", "1.2.10.1", now - 2.0), ("1.2.20", "1.2.20.1", now - 60))
        for study, sop, when in studies:
            state.record_instance(
                NewInstance(study, "1.2.99", sop, "1.2.840.10008.5.1.4.1.1.4", "MR",
                            "1.2.840.10008.1.2.1", f"studies/x/{sop}-1.dcm", 0, 1, 1, ""),
                received_at=when,
            )
        (pending_b,) = state.create_ready_jobs(3.0, now=now)
    dispatcher = RecordingDispatcher()
    node = Node(config, dispatcher)
    started = time.monotonic()
    node.start()
    try:
        state = node.state
        assert state is not None
        assert dispatcher.dispatched[:1] == [pending_b]  # re-dispatched on start
        wait_until(lambda: len(state.jobs()) == 2, timeout=6)
        waited = time.monotonic() - started
        assert 0.5 <= waited <= 3.0, waited  # the remaining ~1 s, not a fresh 3 s
        assert {j.study_uid for j in state.jobs()} == {"1.2.10", "1.2.20"}
    finally:
        node.stop()


def test_assembler_poll_is_idempotent(tmp_path: Path) -> None:
    with StateDB(tmp_path / "s.sqlite3") as state:
        state.record_instance(
            NewInstance("1.3", "1.3.1", "1.3.1.1", "1.2.840.10008.5.1.4.1.1.4", "MR",
                        "1.2.840.10008.1.2.1", "studies/y/a-1.dcm", 0, 1, 1, ""),
            received_at=100.0,
        )
        clock = [105.0]
        dispatcher = RecordingDispatcher()
        assembler = StudyAssembler(state, 10.0, dispatcher, clock=lambda: clock[0])
        assert assembler.poll() == []
        assert abs(assembler.next_wait() - 1.0) < 1e-6  # capped at max_wait
        clock[0] = 109.5
        assert abs(assembler.next_wait() - 0.5) < 1e-6
        clock[0] = 110.0
        created = assembler.poll()
        assert len(created) == 1 and assembler.poll() == [] and assembler.poll() == []
        assert dispatcher.dispatched == created
        assert assembler.resume() == created


class FailingDispatcher:
    def dispatch(self, job_id: int) -> None:
        raise RuntimeError("broker unreachable")


def test_a_failing_dispatcher_leaves_the_job_pending(tmp_path: Path) -> None:
    with StateDB(tmp_path / "s.sqlite3") as state:
        state.record_instance(
            NewInstance("1.4", "1.4.1", "1.4.1.1", "1.2.840.10008.5.1.4.1.1.4", "MR",
                        "1.2.840.10008.1.2.1", "studies/z/a-1.dcm", 0, 1, 1, ""),
            received_at=0.0,
        )
        assembler = StudyAssembler(state, 1.0, FailingDispatcher(), clock=lambda: 10.0)
        (job_id,) = assembler.poll()
        assert state.job(job_id).state == "pending"  # type: ignore[union-attr]
