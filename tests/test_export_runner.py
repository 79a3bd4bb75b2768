"""The processors that run a complete study: analysis job -> result objects -> outbox, tested
without a broker on a node that received the study over a real association (dcmtk storescu)."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from opmri_node.config import NodeConfig, parse_config
from opmri_node.export import open_outbox
from opmri_node.runner import InProcessRunner, run_analysis_job, run_export_job
from opmri_node.service import Node, state_db_path
from opmri_node.state import NewInstance, StateDB
from pipeline.analyze import Analyzer
from tests.conftest import SyntheticCohort, TinyModels
from tests.orthanc import free_port
from tests.pipeline_fixtures import require_tool, tool_env


def make_config(
    folder: Path, models_dir: Path, architecture: str = "efficientnet_b4"
) -> NodeConfig:
    text = f"""
node:
  ae_title: OPMRI
  bind: 127.0.0.1
  port: 0
  data_dir: data
  study_stable_seconds: 0.3
peers:
  modality:
    ae_title: MODALITY
    host: 127.0.0.1
    port: 104
    may_send: true
  pacs:
    ae_title: PACS
    host: 127.0.0.1
    port: {free_port()}
    results: true
  archive:
    ae_title: ARCHIVE
    host: 127.0.0.1
    port: {free_port()}
    results: true
export:
  retry:
    initial_delay_s: 30
pipeline:
  device: cpu
  models_dir: {models_dir}
  classifier:
    architecture: {architecture}
"""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node.yaml").write_text(text, encoding="utf-8")
    return parse_config(text, source=str(folder / "node.yaml"), base_dir=folder)


def receive(config: NodeConfig, files: list[Path]) -> int:
    """Start the node (jobs stay pending), storescu the files to it; returns the job id."""
    with Node(config) as node:
        _, port = node.address
        done = subprocess.run(
            [require_tool("storescu"), "--required", "-aet", "MODALITY", "-aec", "OPMRI",
             "127.0.0.1", str(port), *map(str, files)],
            env=tool_env(), capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert node.state is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            jobs = node.state.jobs(state="pending")
            if jobs:
                return jobs[0].id
            time.sleep(0.05)
    raise AssertionError("the node recorded no job")


def record_quiet_instance(state: StateDB) -> None:
    """One instance of a study that has been quiet for a minute (no file behind it)."""
    state.record_instance(
        NewInstance(
            study_uid="1.2.3", series_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4", modality="MR",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path="studies/x/y-1.dcm",
            data_offset=0, size=0, revision=1, calling_ae="MODALITY",
        ),
        received_at=time.time() - 60,
    )


def test_missing_models_fail_the_job_with_the_way_to_get_them(
    tmp_path: Path, synthetic_cohort: SyntheticCohort
) -> None:
    config = make_config(tmp_path, tmp_path / "no-models")
    patient = synthetic_cohort.labels[0]
    job_id = receive(config, synthetic_cohort.study_files(patient)[:3])
    with StateDB(state_db_path(config)) as state:
        outcome = run_analysis_job(config, state, job_id)
        assert outcome.status == "failed"
        assert "ModelNotFoundError" in outcome.error and "build-demo" in outcome.error
        job = state.job(job_id)
        assert job is not None and job.state == "failed" and job.error == outcome.error
        assert patient.study_instance_uid not in outcome.error
        # a job that is not pending is not run again
        assert run_analysis_job(config, state, job_id).status == "skipped"


def test_a_job_of_unknown_kind_fails(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "no-models")
    with StateDB(state_db_path(config)) as state:
        record_quiet_instance(state)
        [job_id] = state.create_ready_jobs(1.0, kind="reindex")
        outcome = run_analysis_job(config, state, job_id)
        assert (outcome.status, outcome.error) == ("failed", "unknown job kind 'reindex'")
        job = state.job(job_id)
        assert job is not None and job.state == "failed"


def test_analysis_job_writes_results_and_queues_them_for_every_result_peer(
    tmp_path: Path, synthetic_cohort: SyntheticCohort, result_models: TinyModels
) -> None:
    config = make_config(tmp_path, result_models.models_dir, result_models.architecture)
    patient = synthetic_cohort.labels[2]
    job_id = receive(config, synthetic_cohort.study_files(patient))
    analyzer = Analyzer(config.pipeline)
    with StateDB(state_db_path(config)) as state:
        outcome = run_analysis_job(config, state, job_id, analyzer=analyzer)
        assert (outcome.status, outcome.outcome, outcome.objects) == ("done", "analysed", 4)
        assert len(outcome.outbox_ids) == 2
        assert 0 < outcome.write_seconds < outcome.seconds
        job = state.job(job_id)
        assert job is not None and (job.state, job.error) == ("done", None)
        assert run_analysis_job(config, state, job_id, analyzer=analyzer).status == "skipped"

    with open_outbox(config) as outbox:
        entries = {e.peer: e for e in outbox.entries()}
        assert set(entries) == {"pacs", "archive"}
        assert {e.state for e in entries.values()} == {"pending"}
        record = outbox.result_set(entries["pacs"].result_set_id)
        assert record is not None and record.job_id == job_id
        assert record.summary["outcome"] == "analysed"
        assert record.summary["demo_models"] is True
        assert patient.study_instance_uid not in json.dumps(record.summary)
        files = outbox.files(record.id)
        names = [Path(f.path).name for f in files]
        assert names == ["seg-t1.dcm", "seg-t2.dcm", "sr.dcm", "key-image.dcm"]
        folder = outbox.results_root / record.folder
        for file in files:
            ds = pydicom.dcmread(outbox.path(file), stop_before_pixels=True)
            assert ds.StudyInstanceUID == patient.study_instance_uid
            assert ds.SOPInstanceUID == file.sop_instance_uid
        summary = json.loads((folder / "result.json").read_text())
        assert summary["outcome"] == "analysed"
        assert all(series["labelmap"] is None for series in summary["series"])
        assert patient.study_instance_uid not in record.folder

    # nobody listens on the result peers' ports: the export is a failed attempt, retried later
    with StateDB(state_db_path(config)) as state:
        result = run_export_job(config, state, entries["pacs"].id)
    assert result.status == "retry"
    assert result.next_attempt_at is not None and result.next_attempt_at > time.time() + 25


def test_in_process_runner_reports_missing_models_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, tmp_path / "no-models")
    runner = InProcessRunner(config, preload=True, poll_interval=0.1)
    with caplog.at_level(logging.ERROR, logger="opmri_node.runner"):
        runner.start()
        assert runner.wait_idle(30)
        runner.stop()
    assert any("build-demo" in record.getMessage() for record in caplog.records)
    assert not runner.running


def test_an_attempt_lost_after_recording_results_is_finished_without_a_second_set(
    tmp_path: Path, synthetic_cohort: SyntheticCohort, result_models: TinyModels
) -> None:
    """A worker lost between recording the result set and marking the job done: the next
    attempt finishes the job with the recorded set instead of analysing again."""
    config = make_config(tmp_path, result_models.models_dir, result_models.architecture)
    job_id = receive(config, synthetic_cohort.study_files(synthetic_cohort.labels[1]))
    analyzer = Analyzer(config.pipeline)
    with StateDB(state_db_path(config)) as state:
        first = run_analysis_job(config, state, job_id, analyzer=analyzer, worker="celery:a")
        assert first.status == "done"
        # as the job stood when its worker died: results recorded, job still running
        with sqlite3.connect(state.path) as conn:
            conn.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (job_id,))
        assert state.requeue_running("celery:a") == [job_id]
        again = run_analysis_job(config, state, job_id, analyzer=analyzer, worker="celery:a",
                                 max_attempts=3)
        assert (again.status, again.result_set_id) == ("done", first.result_set_id)
        assert sorted(again.outbox_ids) == sorted(first.outbox_ids)
        assert again.objects == 4
        job = state.job(job_id)
        assert job is not None and (job.state, job.attempts) == ("done", 2)
    with open_outbox(config) as outbox:
        assert len({e.result_set_id for e in outbox.entries()}) == 1


def test_a_job_beyond_its_attempt_limit_is_failed_not_run(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "no-models")
    with StateDB(state_db_path(config)) as state:
        record_quiet_instance(state)
        [job_id] = state.create_ready_jobs(1.0)
        for _ in range(2):  # two deliveries whose worker was lost
            assert state.claim_job(job_id, "celery:x") is not None
            assert state.requeue_running("celery:x") == [job_id]
        outcome = run_analysis_job(config, state, job_id, worker="celery:x", max_attempts=2)
        assert outcome.status == "failed"
        assert "queue.max_attempts = 2" in outcome.error
        job = state.job(job_id)
        assert job is not None and (job.state, job.attempts) == ("failed", 3)
