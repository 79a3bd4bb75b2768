"""Result sets delivered to a real Orthanc (Debian package) on loopback: they join the source
study, replace earlier results of the same models, and arrive after Orthanc was down."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opmri_node.config import NodeConfig, parse_config
from opmri_node.export import export_entry, open_outbox
from opmri_node.runner import InProcessRunner, store_results
from tests.dicom_out_fixtures import PhantomStudy, make_phantom_study
from tests.orthanc import OrthancServer

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MR = "1.2.840.10008.5.1.4.1.1.4"


def node_config(folder: Path, orthanc: OrthancServer) -> NodeConfig:
    text = f"""
node:
  ae_title: OPMRI
  bind: 127.0.0.1
  port: 0
  data_dir: data
peers:
  pacs:
    ae_title: {orthanc.aet}
    host: 127.0.0.1
    port: {orthanc.dicom_port}
    may_send: true
    results: true
export:
  retry:
    initial_delay_s: 0.3
    factor: 2
    max_delay_s: 1.0
    max_attempts: 50
pipeline:
  device: cpu
"""
    (folder / "node.yaml").write_text(text, encoding="utf-8")
    return parse_config(text, source=str(folder / "node.yaml"), base_dir=folder)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return make_phantom_study(tmp_path_factory.mktemp("phantom"))


def upload_study(orthanc: OrthancServer, phantom: PhantomStudy) -> None:
    for paths in phantom.series_paths.values():
        for path in paths:
            orthanc.upload(path)


def classes_in_study(orthanc: OrthancServer, study_uid: str) -> list[str]:
    return sorted(
        str(item["SOPClassUID"])
        for item in orthanc.instances_of_study(study_uid)
    )


def result_classes(orthanc: OrthancServer, study_uid: str) -> list[str]:
    return [c for c in classes_in_study(orthanc, study_uid) if c != MR]


EXPECTED = sorted([SEG, SEG, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE])


def test_results_join_the_source_study_in_orthanc(
    tmp_path: Path, orthanc: OrthancServer, phantom: PhantomStudy
) -> None:
    upload_study(orthanc, phantom)
    study_id = orthanc.study_id(phantom.study_uid)
    before = orthanc.get(f"/studies/{study_id}")
    config = node_config(tmp_path, orthanc)
    with open_outbox(config) as outbox:
        _, [outbox_id], _ = store_results(config, outbox, phantom.result)
        result = export_entry(config, outbox, outbox_id)
    assert result.status == "done", result.error

    assert result_classes(orthanc, phantom.study_uid) == EXPECTED
    assert orthanc.study_id(phantom.study_uid) == study_id
    after = orthanc.get(f"/studies/{study_id}")
    assert len(after["Series"]) == len(before["Series"]) + 4
    assert after["MainDicomTags"]["StudyDescription"] == "MRI LUMBAR SPINE"
    assert after["MainDicomTags"]["AccessionNumber"] == "ACC-77"
    assert after["PatientMainDicomTags"]["PatientID"] == "PID-0042"
    for series_id in after["Series"]:
        series = orthanc.get(f"/series/{series_id}")
        if series["MainDicomTags"].get("Modality") == "SR":
            assert "research use" in series["MainDicomTags"]["SeriesDescription"]


def test_reanalysis_replaces_the_earlier_results(
    tmp_path: Path, orthanc: OrthancServer, phantom: PhantomStudy
) -> None:
    config = node_config(tmp_path, orthanc)
    with open_outbox(config) as outbox:
        for _ in range(2):
            _, [outbox_id], _ = store_results(config, outbox, phantom.result)
            assert export_entry(config, outbox, outbox_id).status == "done"
    assert result_classes(orthanc, phantom.study_uid) == EXPECTED  # 4, not 8


def test_results_wait_for_orthanc_and_survive_a_node_restart(
    tmp_path: Path, orthanc: OrthancServer, phantom: PhantomStudy
) -> None:
    config = node_config(tmp_path, orthanc)
    orthanc.stop()
    runner = InProcessRunner(config, poll_interval=0.2)
    runner.start()
    try:
        with open_outbox(config) as outbox:
            _, [outbox_id], _ = store_results(config, outbox, phantom.result)
            runner.wake_export()

            def attempts_made(n: int) -> bool:
                entry = outbox.entry(outbox_id)
                return entry is not None and entry.attempts >= n and entry.state == "pending"

            orthanc.wait_for(lambda: attempts_made(2), timeout=20)
    finally:
        runner.stop()

    # the node restarts while Orthanc is still down, then Orthanc comes back
    restarted = InProcessRunner(config, poll_interval=0.2)
    restarted.start()
    try:
        time.sleep(0.5)
        orthanc.start()
        with open_outbox(config) as outbox:
            orthanc.wait_for(
                lambda: (e := outbox.entry(outbox_id)) is not None and e.state == "done",
                timeout=30,
            )
            entry = outbox.entry(outbox_id)
            assert entry is not None and entry.attempts >= 3 and entry.stored == 4
    finally:
        restarted.stop()
    assert result_classes(orthanc, phantom.study_uid) == EXPECTED
