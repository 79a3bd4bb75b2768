"""The node's command line: serve, config check, echo, send, status, --version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from opmri_node import __version__
from opmri_node.cli import main
from opmri_node.service import CLEAN_MARKER_NAME, Node
from tests.node_fixtures import (
    REPO_ROOT,
    ServeProcess,
    free_port,
    load,
    make_mr_series,
    running_node,
    write_config,
)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with running_node(load(write_config(tmp_path / "node", stable=60))) as running:
        yield running


def client_config(folder: Path, port: int, *, calling: str = "STORESCU") -> Path:
    """A config for the CLI side: it calls as ``calling`` and knows the node as peer ``node``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "client.yaml"
    path.write_text(
        "node:\n"
        f"  ae_title: {calling}\n"
        "  data_dir: client-data\n"
        "  timeouts: {connect: 2, acse: 5, dimse: 10, network: 10}\n"
        "peers:\n"
        "  node:\n"
        "    ae_title: OPMRI\n"
        "    host: 127.0.0.1\n"
        f"    port: {port}\n"
        "  closed:\n"
        "    ae_title: NOBODY\n"
        "    host: 127.0.0.1\n"
        f"    port: {free_port()}\n",
        encoding="utf-8",
    )
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_version_and_help() -> None:
    code, out, _ = invoke("--version")
    assert code == 0 and __version__ in out
    code, out, _ = invoke("--help")
    for command in ("serve", "worker", "config", "echo", "send", "status", "health"):
        assert command in out.split("Commands:")[1].split()
    for args, text in (
        (("serve", "--help"), "study_stable_seconds"),
        (("config", "check", "--help"), "KEY.PATH"),
        (("echo", "--help"), "C-ECHO"),
        (("send", "--help"), "--peer"),
        (("status", "--help"), "--json"),
    ):
        code, out, _ = invoke(*args)
        assert code == 0 and text in out, args


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "opmri_node", "--version"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and __version__ in result.stdout


def test_config_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path)
    code, out, _ = invoke("config", "check", "--config", str(path))
    assert code == 0
    assert out.startswith(f"# effective configuration (source: {path})")
    assert "ae_title: OPMRI" in out and f"data_dir: {tmp_path.resolve() / 'data'}" in out
    assert "may_send: true" in out and "initial_delay_s: 30.0" in out
    # embedded default (no --config, no $OPMRI_CONFIG)
    monkeypatch.delenv("OPMRI_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, _ = invoke("config", "check")
    assert code == 0 and "source: <embedded default>" in out and "port: 11112" in out
    # $OPMRI_CONFIG
    monkeypatch.setenv("OPMRI_CONFIG", str(path))
    code, out, _ = invoke("config", "check")
    assert code == 0 and f"source: {path}" in out


def test_config_check_reports_file_line_key_and_reason(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    text = path.read_text().replace("ae_title: OPMRI", "ae_title: THIS_IS_FAR_TOO_LONG")
    path.write_text(text.replace("port: 11113", "port: http"))
    code, out, err = invoke("config", "check", "--config", str(path))
    assert code == 1 and out == ""
    assert f"{path}:2: node.ae_title: an AE title has at most 16 characters" in err
    assert f"{path}:12: peers.modality.port: Input should be a valid integer" in err
    code, _, err = invoke("config", "check", "--config", str(tmp_path / "absent.yaml"))
    assert code == 1 and "absent.yaml: (top level): file not found" in err


def test_echo(node: Node, tmp_path: Path) -> None:
    config = client_config(tmp_path / "cli", node.address[1])
    code, out, _ = invoke("echo", "node", "--config", str(config))
    assert code == 0 and "C-ECHO node (OPMRI@127.0.0.1:" in out and "success" in out
    code, _, err = invoke("echo", "closed", "--config", str(config))
    assert code == 1 and "failed: no association" in err
    code, _, err = invoke("echo", "nosuch", "--config", str(config))
    assert code == 2 and "no peer named 'nosuch'" in err and "closed, node" in err
    rejected = client_config(tmp_path / "cli2", node.address[1], calling="STRANGER")
    code, _, err = invoke("echo", "node", "--config", str(rejected))
    assert code == 1 and "rejected" in err and "Calling AE title not recognised" in err


def test_send_and_status(node: Node, tmp_path: Path) -> None:
    series = make_mr_series(tmp_path / "study" / "series1", 3)
    other = make_mr_series(tmp_path / "study" / "series2", 2, study_uid=series.study_uid)
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    config = client_config(tmp_path / "cli", node.address[1])
    code, out, err = invoke("send", str(tmp_path / "study"), "--peer", "node", "--config",
                            str(config))
    assert code == 0, err
    assert "notes.txt: not a DICOM file" in " ".join(err.split())
    assert "sent to node (OPMRI@127.0.0.1:" in out
    row = next(line for line in out.splitlines() if line.count("│") >= 7)
    cells = [cell.strip() for cell in row.split("│") if cell.strip()]
    assert cells[:5] == ["5", "5", "0", "1", "1"]  # files, sent, failed, skipped, associations
    assert node.state is not None and node.state.instance_count() == 5
    for path, sop in zip(series.files + other.files, series.sop_uids + other.sop_uids,
                         strict=True):
        record = node.state.current_instance(sop)
        assert record is not None
        assert path.read_bytes()[-4096:] == (node.config.node.data_dir / "spool" /
                                              record.path).read_bytes()[-4096:]

    node_config = node.config.node.data_dir.parent / "node.yaml"
    code, out, _ = invoke("status", "--config", str(node_config))
    assert code == 0
    assert "5 instance(s) stored" in out and "receiving" in out
    study_tag = series.study_uid  # never shown; only its hash tag
    assert study_tag not in out
    code, out, _ = invoke("status", "--config", str(node_config), "--json")
    payload = json.loads(out)
    assert payload["instances"] == 5 and payload["studies"] == {"receiving": 1}
    assert payload["jobs"] == {"pending": 0, "running": 0, "done": 0, "failed": 0}
    (recent,) = payload["recent"]
    assert recent["instances"] == 5 and recent["series"] == 2 and len(recent["study"]) == 12


def test_send_failures_exit_non_zero(node: Node, tmp_path: Path) -> None:
    series = make_mr_series(tmp_path / "in", 2)
    rejected = client_config(tmp_path / "cli", node.address[1], calling="VIEWER")
    code, _, err = invoke("send", str(tmp_path / "in"), "--peer", "node", "--config",
                          str(rejected))
    assert code == 1 and "failed" in err
    assert node.state is not None and node.state.instance_count() == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = invoke("send", str(empty), "--peer", "node", "--config", str(rejected))
    assert code == 1 and "no DICOM files found" in " ".join(err.split())
    code, _, err = invoke("send", str(tmp_path / "in"), "--peer", "ghost", "--config",
                          str(rejected))
    assert code == 2 and "no peer named 'ghost'" in err
    assert series.files


def test_status_before_the_node_ever_ran(tmp_path: Path) -> None:
    code, out, _ = invoke("status", "--config", str(write_config(tmp_path)))
    assert code == 0 and "no state database" in out


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node")
    serve = ServeProcess(config, log_path=tmp_path / "serve.log")
    marker = tmp_path / "node" / "data" / CLEAN_MARKER_NAME
    assert not marker.exists()
    assert serve.terminate() == 0
    log = serve.log()
    assert "ready on 127.0.0.1:" in log and "received SIGTERM" in log and "node stopped" in log
    assert marker.exists()
    again = ServeProcess(config, log_path=tmp_path / "serve2.log")
    try:
        assert not marker.exists()  # a running node has no clean-shutdown marker
    finally:
        assert again.terminate() == 0


def test_serve_log_quotes_no_received_values(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid
    from pynetdicom.presentation import build_context

    from tests.node_fixtures import mr_dataset, scu_ae

    serve = ServeProcess(write_config(tmp_path / "node"), log_path=tmp_path / "serve.log")
    try:
        bad = mr_dataset(study_uid="1.2.3.evil-study-uid", series_uid=generate_uid(),
                         sop_uid="9.9.9.evil/sop", frame_uid=generate_uid(), index=0)
        assoc = scu_ae().associate("127.0.0.1", serve.port, ae_title="OPMRI", contexts=[
            build_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])
        ])
        with pytest.warns(UserWarning):
            status = assoc.send_c_store(bad)
        assoc.release()
        assert status.Status == 0xC000
    finally:
        assert serve.terminate() == 0
    log = serve.log()
    assert "refused" in log and "evil" not in log and "Doe^Jane" not in log


def test_serve_with_bad_config_or_busy_port(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad")
    bad.write_text(bad.read_text().replace("bind: 127.0.0.1", "bind: 127.0.0.1\n  colour: red"))
    env = {k: v for k, v in os.environ.items() if k != "OPMRI_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "opmri_node", "serve", "--config", str(bad)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 1 and "node.colour: unknown key" in result.stderr
    with running_node(load(write_config(tmp_path / "first"))) as first:
        busy = write_config(tmp_path / "second", port=first.address[1])
        result = subprocess.run(
            [sys.executable, "-m", "opmri_node", "serve", "--config", str(busy)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env,
        )
    assert result.returncode == 1 and "cannot serve on 127.0.0.1:" in result.stderr
