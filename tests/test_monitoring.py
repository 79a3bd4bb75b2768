"""Monitoring: /metrics and /healthz of a running node and worker, queue depths from a real
redis-server, ``opmri-node health`` and the queue/failure part of ``opmri-node status``."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from opmri_node.cli import main
from opmri_node.config import NodeConfig
from opmri_node.monitoring import failure_kind, start_monitoring
from opmri_node.outbox import NewResultFile, Outbox
from opmri_node.service import Node, state_db_path
from opmri_node.state import StateDB
from tests.node_fixtures import (
    free_port,
    load,
    make_mr_series,
    running_node,
    store_statuses,
    storescu,
    write_config,
)

REDIS_SERVER = "/usr/bin/redis-server"
KOMBU_PRIORITY_SEP = "\x06\x16"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def monitored_config(
    folder: Path,
    *,
    port: int | None = 0,
    worker_port: int | None = None,
    broker: str | None = None,
    stable: float = 60.0,
) -> Path:
    """A node config (see write_config) with a monitoring section and optionally a broker."""
    path = write_config(folder, stable=stable)
    text = path.read_text(encoding="utf-8")
    text += "monitoring:\n  bind: 127.0.0.1\n"
    if port is not None:
        text += f"  port: {port}\n"
    if worker_port is not None:
        text += f"  worker_port: {worker_port}\n"
    if broker is not None:
        text += f"queue:\n  broker: {broker}\n"
    path.write_text(text, encoding="utf-8")
    return path


def http_get(port: int, path: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET on loopback."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept is not None:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(port: int) -> Samples:
    """The node's /metrics parsed with prometheus_client's parser, sample by sample."""
    status, content_type, body = http_get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def health(port: int) -> tuple[int, dict[str, object]]:
    status, content_type, body = http_get(port, "/healthz")
    assert content_type == "application/json"
    return status, json.loads(body)


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@contextmanager
def redis_server(folder: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A throw-away redis-server on a free loopback port (no persistence)."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "redis.log").open("wb") as log:
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("redis-server did not start: " +
                                     (folder / "redis.log").read_text(errors="replace"))
            time.sleep(0.05)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=20)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("VolumeError: slices are not evenly spaced", "volume"),
        ("ModelRegistryError: no segmenter in models/", "model_registry"),
        ("DeviceError: CUDA requested but not available", "device"),
        ("SourceError: a source file cannot be read", "source"),
        ("worker lost in each of 3 attempt(s); stopped at the limit", "worker_lost"),
        ("unexpected KeyError (details in the debug log)", "unexpected"),
        ("unknown job kind 'x'", "unknown_job_kind"),
        ("peer 'pacs' is no longer configured to receive results", "peer_removed"),
        ("a result file is missing from the results folder", "file_missing"),
        ("3 of 3 file(s) not stored: 3 x no association (connection refused, host "
         "unreachable or no answer in time)", "no_association"),
        ("3 of 3 file(s) not stored: 3 x association rejected (rejected-permanent, ...)",
         "association_rejected"),
        ("1 of 3 file(s) not stored: 1 x status 0xA700", "status"),
        ("2 of 3 file(s) not stored: 2 x no response (timeout or association aborted)",
         "no_response"),
        ("3 of 3 file(s) not stored: 3 x internal error: RuntimeError", "internal"),
        ("Doe^Jane went wrong", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_failure_kind(error: str | None, kind: str) -> None:
    assert failure_kind(error) == kind


def _store(node: Node, files: list[Path], *, calling: str = "STORESCU") -> list[str]:
    host, port = node.address
    result = storescu(host, port, files, calling=calling)
    return store_statuses(result.stdout + result.stderr)


def test_metrics_health_and_status_of_a_running_node(tmp_path: Path) -> None:
    config = load(monitored_config(tmp_path / "node"))
    first = make_mr_series(tmp_path / "in" / "a", 3)
    second = make_mr_series(tmp_path / "in" / "b", 2)
    with running_node(config) as node:
        assert node.monitoring is not None and node.monitoring.port > 0
        port = node.monitoring.port
        before = scrape(port)
        assert _store(node, first.files + second.files) == ["Success"] * 5
        assert _store(node, first.files[:1], calling="NOBODY") == []  # rejected

        samples = scrape(port)
        deadline = time.monotonic() + 10  # association threads end just after the release
        while (
            value(samples, "opmri_scp_associations_total", outcome="rejected")
            == value(before, "opmri_scp_associations_total", outcome="rejected")
            or value(samples, "opmri_scp_associations_total", outcome="released")
            == value(before, "opmri_scp_associations_total", outcome="released")
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
            samples = scrape(port)
        assert value(samples, "opmri_state_db_up") == 1
        assert value(samples, "opmri_info", version=samples_version(samples), role="node") == 1
        assert value(samples, "opmri_instances_received_total") == 5
        assert value(samples, "opmri_studies", state="receiving") == 2
        assert value(samples, "opmri_analysis_jobs", state="pending") == 0
        assert value(samples, "opmri_outbox_entries", state="done") == 0  # no outbox tables yet
        assert value(samples, "opmri_study_latency_seconds_count") == 0

        def delta(name: str, **labels: str) -> float:
            return value(samples, name, **labels) - value(before, name, **labels)

        assert delta("opmri_scp_associations_total", outcome="released") == 1
        assert delta("opmri_scp_associations_total", outcome="rejected") == 1
        assert delta("opmri_scp_associations_rejected_total", reason="calling_ae") == 1

        status, report = health(port)
        assert status == 200 and report["healthy"] is True and report["role"] == "node"
        checks = report["checks"]
        assert isinstance(checks, dict)
        assert set(checks) == {"state_db", "listener", "disk"}  # no broker configured
        assert all(check["ok"] for check in checks.values())

        # one failed and one done analysis job, one export done 12.5 s after its job was
        # recorded and one export failed
        state = node.state
        assert state is not None
        t0 = time.time()
        job_a, job_b = sorted(state.create_ready_jobs(0.0, now=t0))
        study_of = {job.id: job.study_uid for job in state.jobs()}
        assert state.claim_job(job_a) is not None
        state.fail_job(job_a, "VolumeError: slices are not evenly spaced")
        assert state.claim_job(job_b) is not None and state.finish_job(job_b)
        results = config.node.data_dir / "results"
        with Outbox(state_db_path(config), results) as outbox:
            item = NewResultFile(results / "b" / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34",
                                 "1.2.3.4", "1.2.840.10008.1.2.1")
            _, (done_row,) = outbox.record_result_set(study_of[job_b], [item], ["pacs"],
                                                      job_id=job_b, now=t0 + 1)
            assert outbox.claim(done_row, now=t0 + 2) is not None
            assert outbox.mark_done(done_row, now=t0 + 12.5)
            other = NewResultFile(results / "a" / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.34",
                                  "1.2.3.5", "1.2.840.10008.1.2.1")
            _, (failed_row,) = outbox.record_result_set(study_of[job_a], [other], ["archive"],
                                                        now=t0 + 3)
            outbox.mark_failed(
                failed_row,
                "1 of 1 file(s) not stored: 1 x no association (connection refused, host "
                "unreachable or no answer in time)",
            )

        samples = scrape(port)
        assert value(samples, "opmri_analysis_jobs", state="failed") == 1
        assert value(samples, "opmri_analysis_jobs", state="done") == 1
        assert value(samples, "opmri_analysis_jobs_finished_total", result="failed") == 1
        assert value(samples, "opmri_analysis_jobs_finished_total", result="done") == 1
        assert value(samples, "opmri_failures_total", stage="analysis", kind="volume") == 1
        assert value(samples, "opmri_failures_total", stage="export",
                     kind="no_association") == 1
        assert value(samples, "opmri_studies", state="failed") == 1
        assert value(samples, "opmri_studies", state="done") == 1
        assert value(samples, "opmri_studies", state="receiving") == 0
        assert value(samples, "opmri_studies_analysed_total") == 1
        assert value(samples, "opmri_outbox_entries", state="done") == 1
        assert value(samples, "opmri_outbox_entries", state="failed") == 1
        assert value(samples, "opmri_analysis_job_duration_seconds_count") == 1
        assert value(samples, "opmri_analysis_job_duration_seconds_bucket", le="0.5") == 1
        assert value(samples, "opmri_study_latency_seconds_count") == 1
        assert value(samples, "opmri_study_latency_seconds_sum") == pytest.approx(12.5)
        assert value(samples, "opmri_study_latency_seconds_bucket", le="10.0") == 0
        assert value(samples, "opmri_study_latency_seconds_bucket", le="15.0") == 1
        assert value(samples, "opmri_study_latency_seconds_bucket", le="+Inf") == 1
        for key in samples:
            for label, text in key[1]:
                assert first.study_uid not in text and "VolumeError" not in text, label

        status, content_type, body = http_get(port, "/metrics",
                                              accept="application/openmetrics-text")
        assert status == 200 and content_type.startswith("application/openmetrics-text")
        names = {family.name for family in openmetrics_families(body)}
        assert {"opmri_failures", "opmri_study_latency_seconds"} <= names

        node_config = config.node.data_dir.parent / "node.yaml"
        code, out, _ = invoke("status", "--config", str(node_config))
        assert code == 0, out
        assert "5 instance(s) stored" in out and "no broker configured" in out
        text = " ".join(out.split())
        assert f"analysis job {job_a}" in text and "VolumeError: slices are not" in text
        assert f"export {failed_row} to archive" in text and "no_association" in text
        assert first.study_uid not in out and second.study_uid not in out
        code, out, _ = invoke("status", "--config", str(node_config), "--json")
        payload = json.loads(out)
        assert payload["queues"] is None
        (failed_job,) = payload["failures"]["jobs"]
        assert failed_job["id"] == job_a and failed_job["kind"] == "volume"
        assert failed_job["attempts"] == 1 and len(failed_job["study"]) == 12
        (failed_export,) = payload["failures"]["exports"]
        assert failed_export["id"] == failed_row and failed_export["peer"] == "archive"
        assert failed_export["kind"] == "no_association"
        assert payload["jobs"] == {"pending": 0, "running": 0, "done": 1, "failed": 1}
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the HTTP listener is closed with the node


def samples_version(samples: Samples) -> str:
    (version,) = {
        dict(labels)["version"] for name, labels in samples if name == "opmri_info"
    }
    return version


def test_queue_depths_broker_health_and_the_health_command(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as (redis_port, proc):
        broker = f"redis://127.0.0.1:{redis_port}/0"
        config_path = monitored_config(tmp_path / "node", port=free_port(), broker=broker)
        config = load(config_path)
        with running_node(config) as node:
            assert node.monitoring is not None
            port = node.monitoring.port
            assert port == config.monitoring.port
            samples = scrape(port)
            assert value(samples, "opmri_broker_up") == 1
            assert value(samples, "opmri_queue_messages", queue="analysis") == 0
            assert value(samples, "opmri_queue_messages", queue="export") == 0

            import redis

            client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5)
            client.lpush("analysis", "m1", "m2", "m3")
            client.lpush(f"analysis{KOMBU_PRIORITY_SEP}3", "m4")  # kombu's priority list
            client.lpush("export", "e1")
            client.hset("unacked", "tag1", "x")
            samples = scrape(port)
            assert value(samples, "opmri_queue_messages", queue="analysis") == 4
            assert value(samples, "opmri_queue_messages", queue="export") == 1
            assert value(samples, "opmri_queue_unacked_messages") == 1
            client.rpop("analysis")
            client.rpop("export")
            samples = scrape(port)
            assert value(samples, "opmri_queue_messages", queue="analysis") == 3
            assert value(samples, "opmri_queue_messages", queue="export") == 0

            status, report = health(port)
            assert status == 200 and report["checks"]["broker"]["ok"] is True  # type: ignore[index]
            code, out, _ = invoke("health", "--config", str(config_path))
            assert code == 0 and json.loads(out)["healthy"] is True

            code, out, _ = invoke("status", "--config", str(config_path))
            assert code == 0 and "broker queues" in out
            assert any(line.split("│")[1:3] and "analysis" in line and "3" in line
                       for line in out.splitlines())
            code, out, _ = invoke("status", "--config", str(config_path), "--json")
            queues = json.loads(out)["queues"]
            assert queues == {"reachable": True, "waiting": {"analysis": 3, "export": 0},
                              "unacked": 1}
            client.close()

            stop_redis(proc)
            started = time.monotonic()
            status, report = health(port)
            assert time.monotonic() - started < 5
            assert status == 503 and report["healthy"] is False
            checks = report["checks"]
            assert isinstance(checks, dict)
            assert checks["broker"]["ok"] is False and "onnection" in checks["broker"]["detail"]
            assert checks["state_db"]["ok"] and checks["listener"]["ok"] and checks["disk"]["ok"]
            samples = scrape(port)  # still served, saying the broker is down
            assert value(samples, "opmri_broker_up") == 0
            assert value(samples, "opmri_instances_received_total") == 0
            assert not any(name == "opmri_queue_messages" for name, _ in samples)
            code, out, _ = invoke("health", "--config", str(config_path))
            assert code == 1 and json.loads(out)["checks"]["broker"]["ok"] is False
            code, out, _ = invoke("status", "--config", str(config_path), "--json")
            assert json.loads(out)["queues"]["reachable"] is False
            code, out, _ = invoke("status", "--config", str(config_path))
            assert code == 0 and "broker not reachable" in out
        code, _, err = invoke("health", "--config", str(config_path))
        assert code == 1 and "no answer" in err  # the node is down
    code, _, err = invoke("health", "--config", str(config_path), "--worker")
    assert code == 2 and "monitoring.worker_port is not set" in err
    code, _, err = invoke("health", "--config", str(write_config(tmp_path / "plain")))
    assert code == 2 and "monitoring.port is not set" in err


def test_worker_role(tmp_path: Path) -> None:
    config: NodeConfig = load(monitored_config(tmp_path / "w", port=None, worker_port=0))
    assert start_monitoring(config, "node") is None  # no node port configured
    config.node.data_dir.mkdir(parents=True)
    server = start_monitoring(config, "worker")
    assert server is not None
    with server:
        status, report = health(server.port)
        assert status == 503  # the node never ran: no state database yet
        checks = report["checks"]
        assert isinstance(checks, dict) and set(checks) == {"state_db", "disk"}
        assert checks["state_db"]["ok"] is False and checks["disk"]["ok"] is True
        StateDB(state_db_path(config)).close()
        status, report = health(server.port)
        assert status == 200 and report["role"] == "worker"
        samples = scrape(server.port)
        assert value(samples, "opmri_info", version=samples_version(samples), role="worker") == 1
        assert value(samples, "opmri_data_free_bytes") > 0
        # the database-derived figures come from the node only (no double counting)
        assert not any(name.startswith("opmri_instances") for name, _ in samples)
        assert http_get(server.port, "/nothing")[0] == 404


def test_a_busy_monitoring_port_stops_the_node_cleanly(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = load(monitored_config(tmp_path / "node", port=busy.getsockname()[1]))
        node = Node(config)
        with pytest.raises(OSError):
            node.start()
        assert node.receiver is None and node.state is None and node.monitoring is None
