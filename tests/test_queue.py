"""Celery on a real redis-server: end to end, worker crashes, broker and node restarts, poison
jobs; and the embedded mode through the same end-to-end test without Redis."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from opmri_node.config import load_config
from tests.conftest import SyntheticCohort, TinyModels
from tests.node_fixtures import free_port
from tests.orthanc import running_orthanc
from tests.pipeline_fixtures import require_tool, tool_env
from tests.queue_fixtures import (
    OpmriProcess,
    RedisServer,
    jobs,
    start_serve,
    start_worker,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(autouse=True)
def _no_process_left() -> Iterator[None]:
    yield
    stop_all()


def node_yaml(
    *,
    port: int,
    pacs: tuple[str, int] | None,
    broker: str | None,
    models: TinyModels,
    stable: float = 0.5,
    max_attempts: int = 3,
    requeue_interval: float = 2.0,
) -> str:
    peers = """
  modality:
    ae_title: MODALITY
    host: 127.0.0.1
    port: 104
    may_send: true
"""
    if pacs is not None:
        peers += f"""
  pacs:
    ae_title: {pacs[0]}
    host: 127.0.0.1
    port: {pacs[1]}
    results: true
    may_send: true
"""
    return f"""
node:
  ae_title: OPMRI
  bind: 127.0.0.1
  port: {port}
  data_dir: data
  study_stable_seconds: {stable}
  min_free_disk_mb: 64
peers:{peers}
queue:
  broker: {broker or 'null'}
  max_attempts: {max_attempts}
  requeue_interval: {requeue_interval}
  visibility_timeout: 30
pipeline:
  device: cpu
  models_dir: {models.models_dir}
  classifier:
    architecture: {models.architecture}
export:
  retry:
    initial_delay_s: 1
    max_delay_s: 2
"""


def send_study(port: int, files: list[Path]) -> None:
    sent = subprocess.run(
        [require_tool("storescu"), "--required", "-aet", "MODALITY", "-aec", "OPMRI",
         "127.0.0.1", str(port), *map(str, files)],
        env=tool_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr


class StoreSCP:
    """dcmtk storescp as the PACS that receives results."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [require_tool("storescp"), "--aetitle", "PACS", "--output-directory", str(folder),
             "+xa", str(self.port)],
            env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    server = StoreSCP(tmp_path / "pacs")
    try:
        yield server
    finally:
        server.stop()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text, encoding="utf-8")
    load_config(path)
    return path


@pytest.mark.parametrize("mode", ["celery", "embedded"])
def test_study_reaches_orthanc_through_the_queue(
    mode: str, tmp_path: Path, synthetic_cohort: SyntheticCohort, result_models: TinyModels,
    request: pytest.FixtureRequest,
) -> None:
    """SCP -> (Redis -> analysis worker -> export worker | in-process) -> Orthanc, same study."""
    redis = None
    if mode == "celery":
        redis = RedisServer(tmp_path / "redis")
        redis.start()
        request.addfinalizer(redis.stop)
    port = free_port()
    with running_orthanc(tmp_path / "orthanc",
                         modalities={"opmri": ("OPMRI", "127.0.0.1", port)}) as orthanc:
        config = write_config(tmp_path, node_yaml(
            port=port, pacs=("ORTHANC", orthanc.dicom_port),
            broker=None if redis is None else redis.url, models=result_models,
        ))
        processes: list[OpmriProcess] = [start_serve(config, tmp_path / "serve.log")]
        try:
            if redis is not None:
                processes.append(start_worker(config, tmp_path / "analysis.log", "analysis"))
                processes.append(start_worker(config, tmp_path / "export.log", "export"))
            patient = synthetic_cohort.labels[1]
            send_study(port, synthetic_cohort.study_files(patient))
            study = patient.study_instance_uid
            def result_series() -> list[str] | None:
                found = orthanc.post("/tools/find", {
                    "Level": "Series", "Query": {"StudyInstanceUID": study}, "Expand": True,
                }) or []
                modalities = sorted(
                    str(series["MainDicomTags"].get("Modality", ""))
                    for series in found
                    for _ in series.get("Instances", [])
                    if series["MainDicomTags"].get("Modality") != "MR"
                )
                return modalities if len(modalities) >= 4 else None

            results = wait_until(result_series, 240, "results in Orthanc", interval=0.3)
            assert results == ["OT", "SEG", "SEG", "SR"]
            state = jobs(tmp_path / "data" / "state.sqlite3")
            assert [(job["state"], job["attempts"]) for job in state] == [("done", 1)]
            expected_worker = "in-process" if redis is None else "celery:"
            assert str(state[0]["worker"]).startswith(expected_worker)
        finally:
            codes = [process.stop() for process in reversed(processes)]
        logs = "".join(process.log() for process in processes)
        assert codes == [0] * len(codes), logs[-4000:]
        assert patient.study_instance_uid not in logs
        assert str(patient.patient_id) not in logs


def test_messages_carry_only_ids(tmp_path: Path, redis_server: RedisServer,
                                 synthetic_cohort: SyntheticCohort,
                                 result_models: TinyModels) -> None:
    """With no worker, the node's message for a complete study is the job id and nothing else."""
    port = free_port()
    config = write_config(tmp_path, node_yaml(port=port, pacs=None, broker=redis_server.url,
                                              models=result_models))
    node = start_serve(config, tmp_path / "serve.log")
    try:
        patient = synthetic_cohort.labels[0]
        send_study(port, synthetic_cohort.study_files(patient))
        client = redis_server.client()
        wait_until(lambda: client.llen("analysis") >= 1, 60, "a message in the analysis queue")
        raw = client.lrange("analysis", 0, -1)
    finally:
        assert node.stop() == 0
    assert len(raw) == 1
    message = json.loads(raw[0])
    body = json.loads(base64.b64decode(message["body"]))
    assert body[0] == [jobs(tmp_path / "data" / "state.sqlite3")[0]["id"]]
    assert body[1] == {}
    assert message["headers"]["task"] == "opmri.analyze"
    text = raw[0].decode()
    for private in (patient.study_instance_uid, str(patient.patient_id), "PixelData"):
        assert private not in text


def _pool_pid(worker: OpmriProcess) -> int:
    children = worker.pool_children()
    assert children, "the worker has no pool process"
    return int(children[0].pid)


def test_killed_worker_job_is_redelivered_and_results_sent_once(
    tmp_path: Path, redis_server: RedisServer, pacs: StoreSCP,
    synthetic_cohort: SyntheticCohort, result_models: TinyModels,
) -> None:
    port = free_port()
    config = write_config(tmp_path, node_yaml(port=port, pacs=("PACS", pacs.port),
                                              broker=redis_server.url, models=result_models))
    db = tmp_path / "data" / "state.sqlite3"
    node = start_serve(config, tmp_path / "serve.log")
    worker = start_worker(config, tmp_path / "worker.log", "analysis,export")
    try:
        pool = _pool_pid(worker)
        patient = synthetic_cohort.labels[2]
        send_study(port, synthetic_cohort.study_files(patient))
        wait_until(lambda: any(j["state"] == "running" for j in jobs(db)), 120,
                   "the job to start", interval=0.01)
        import os
        import signal

        os.kill(pool, signal.SIGKILL)
        wait_until(lambda: len(pacs.files()) >= 4, 240, "results at the PACS", interval=0.2)
        time.sleep(3)  # a duplicate delivery would have sent more by now
        state = jobs(db)
        assert [(job["state"], job["attempts"]) for job in state] == [("done", 2)]
        files = pacs.files()
        assert len(files) == 4
        uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert len(uids) == 4
    finally:
        worker.stop()
        node.stop()
    assert "earlier delivery was lost" in worker.log()


def test_poison_job_stops_at_its_attempt_limit(
    tmp_path: Path, redis_server: RedisServer,
    synthetic_cohort: SyntheticCohort, result_models: TinyModels,
) -> None:
    """A study that kills its worker every time is failed after queue.max_attempts."""
    import os
    import signal

    port = free_port()
    config = write_config(tmp_path, node_yaml(port=port, pacs=None, broker=redis_server.url,
                                              models=result_models, max_attempts=2))
    db = tmp_path / "data" / "state.sqlite3"
    node = start_serve(config, tmp_path / "serve.log")
    worker = start_worker(config, tmp_path / "worker.log", "analysis", "--no-preload")
    try:
        send_study(port, synthetic_cohort.study_files(synthetic_cohort.labels[3]))
        for attempt in (1, 2):
            wait_until(lambda a=attempt: any(j["state"] == "running" and j["attempts"] == a
                                             for j in jobs(db)),
                       120, f"attempt {attempt}", interval=0.01)
            os.kill(_pool_pid(worker), signal.SIGKILL)
        final = wait_until(lambda: [j for j in jobs(db) if j["state"] == "failed"], 120,
                           "the job to fail")
        assert final[0]["attempts"] == 3
        assert "queue.max_attempts = 2" in final[0]["error"]
        status = subprocess.run(
            [*OpmriProcess.command("status", "--config", str(config))],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert "failed" in status.stdout
    finally:
        worker.stop()
        node.stop()


def test_broker_restart_without_its_data_loses_no_job(
    tmp_path: Path, redis_server: RedisServer, pacs: StoreSCP,
    synthetic_cohort: SyntheticCohort, result_models: TinyModels,
) -> None:
    """Jobs queued, Redis killed and restarted empty: the node sends them again."""
    port = free_port()
    config = write_config(tmp_path, node_yaml(port=port, pacs=("PACS", pacs.port),
                                              broker=redis_server.url, models=result_models))
    db = tmp_path / "data" / "state.sqlite3"
    node = start_serve(config, tmp_path / "serve.log")
    worker = None
    try:
        send_study(port, synthetic_cohort.study_files(synthetic_cohort.labels[0]))
        client = redis_server.client()
        wait_until(lambda: client.llen("analysis") >= 1, 60, "the job in Redis")
        redis_server.kill()
        time.sleep(1.0)
        redis_server.start()
        assert redis_server.client().llen("analysis") == 0  # the queued message is gone
        worker = start_worker(config, tmp_path / "worker.log", "analysis,export")
        wait_until(lambda: len(pacs.files()) >= 4, 240, "results at the PACS", interval=0.2)
        assert [job["state"] for job in jobs(db)] == ["done"]
    finally:
        if worker is not None:
            worker.stop()
        node.stop()


def test_node_restart_during_assembly_still_analyses_the_study(
    tmp_path: Path, redis_server: RedisServer, pacs: StoreSCP,
    synthetic_cohort: SyntheticCohort, result_models: TinyModels,
) -> None:
    port = free_port()
    config = write_config(tmp_path, node_yaml(port=port, pacs=("PACS", pacs.port),
                                              broker=redis_server.url, models=result_models,
                                              stable=4.0))
    db = tmp_path / "data" / "state.sqlite3"
    worker = start_worker(config, tmp_path / "worker.log", "analysis,export")
    node = start_serve(config, tmp_path / "serve.log")
    try:
        send_study(port, synthetic_cohort.study_files(synthetic_cohort.labels[1]))
        node.kill()  # before the study was quiet for 4 s: no job yet
        assert jobs(db) == []
        node = start_serve(config, tmp_path / "serve2.log")
        wait_until(lambda: len(pacs.files()) >= 4, 240, "results at the PACS", interval=0.2)
        assert [job["state"] for job in jobs(db)] == ["done"]
    finally:
        worker.stop()
        node.stop()
