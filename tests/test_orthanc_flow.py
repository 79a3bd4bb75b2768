"""The whole path against a real Orthanc: Orthanc sends a synthetic lumbar study to the node,
the node analyses it with small trained models and the SEG, SR and key image appear in the
same study in Orthanc; a study that is not a lumbar spine MRI gives no results and no error."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from opmri_node.config import NodeConfig, parse_config
from opmri_node.export import open_outbox
from opmri_node.runner import AnalysisOutcome, InProcessRunner
from opmri_node.service import Node, state_db_path
from opmri_node.state import StateDB
from pipeline.analyze import Analyzer
from tests.conftest import SyntheticCohort, TinyModels
from tests.orthanc import OrthancServer
from tests.pipeline_fixtures import require_tool, tool_env

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class Study:
    uid: str
    files: list[Path]


@pytest.fixture(scope="module")
def lumbar_study(synthetic_cohort: SyntheticCohort) -> Study:
    """A synthetic patient's whole MR study (localizer, sagittal T1/T2/STIR, axial T2)."""
    patient = synthetic_cohort.labels[0]
    files = synthetic_cohort.study_files(patient)
    assert files
    return Study(patient.study_instance_uid, files)


@dataclass
class Deployment:
    orthanc: OrthancServer
    node: Node
    runner: InProcessRunner
    config: NodeConfig
    analyses: list[AnalysisOutcome]


@pytest.fixture
def deployment(tmp_path: Path, result_models: TinyModels) -> Iterator[Deployment]:
    orthanc = OrthancServer(tmp_path / "orthanc")
    text = f"""
node:
  ae_title: OPMRI
  bind: 127.0.0.1
  port: 0
  data_dir: data
  study_stable_seconds: 0.5
peers:
  pacs:
    ae_title: {orthanc.aet}
    host: 127.0.0.1
    port: {orthanc.dicom_port}
    may_send: true
    results: true
export:
  retry:
    initial_delay_s: 0.5
    max_delay_s: 2
pipeline:
  device: cpu
  models_dir: {result_models.models_dir}
  classifier:
    architecture: {result_models.architecture}
"""
    (tmp_path / "node.yaml").write_text(text, encoding="utf-8")
    config = parse_config(text, source=str(tmp_path / "node.yaml"), base_dir=tmp_path)
    analyses: list[AnalysisOutcome] = []
    runner = InProcessRunner(config, analyzer=Analyzer(config.pipeline), poll_interval=0.2,
                             on_analysis=analyses.append)
    runner.start()
    node = Node(config, dispatcher=runner)
    _, port = node.start()
    orthanc.modalities["opmri"] = ("OPMRI", "127.0.0.1", port)
    try:
        orthanc.start()
        yield Deployment(orthanc, node, runner, config, analyses)
    finally:
        orthanc.stop()
        node.stop()
        runner.stop()


def result_classes(orthanc: OrthancServer, study_uid: str) -> list[str]:
    classes = [str(item["SOPClassUID"]) for item in orthanc.instances_of_study(study_uid)]
    return sorted(c for c in classes if c in (SEG, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE))


def test_orthanc_study_comes_back_with_seg_sr_and_key_image(
    deployment: Deployment, lumbar_study: Study, tmp_path: Path
) -> None:
    orthanc = deployment.orthanc
    for path in lumbar_study.files:
        orthanc.upload(path)
    study_id = orthanc.study_id(lumbar_study.uid)
    assert study_id is not None
    before = orthanc.get(f"/studies/{study_id}")
    orthanc.send_to_modality("opmri", [study_id])

    expected = sorted([SEG, SEG, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE])
    orthanc.wait_for(lambda: result_classes(orthanc, lumbar_study.uid) == expected, timeout=180)

    [analysis] = deployment.analyses
    assert (analysis.status, analysis.outcome, analysis.objects) == ("done", "analysed", 4)
    after = orthanc.get(f"/studies/{study_id}")
    assert orthanc.study_id(lumbar_study.uid) == study_id
    assert len(after["Series"]) == len(before["Series"]) + 4
    assert after["MainDicomTags"] == before["MainDicomTags"]
    assert after["PatientMainDicomTags"] == before["PatientMainDicomTags"]

    # what Orthanc stored is what a validator and a viewer read
    for item in orthanc.instances_of_study(lumbar_study.uid):
        if item["SOPClassUID"] not in (SEG, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE):
            continue
        path = tmp_path / f"{item['ID']}.dcm"
        path.write_bytes(orthanc.instance_file(item["ID"]))
        check = pydicom.dcmread(path)
        assert check.StudyInstanceUID == lumbar_study.uid
        report = subprocess.run(
            [require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
            env=tool_env(), timeout=60, check=False,
        )
        errors = [line for line in (report.stdout + report.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], item["SOPClassUID"]

    with open_outbox(deployment.config) as outbox:
        [entry] = outbox.entries()
        assert (entry.state, entry.stored, entry.files, entry.attempts) == ("done", 4, 4, 1)


def test_a_non_lumbar_study_gives_no_results_and_no_error(deployment: Deployment) -> None:
    orthanc = deployment.orthanc
    names = ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm")
    uids = set()
    for name in names:
        path = get_testdata_file(name)
        assert path is not None, name
        orthanc.upload(Path(path))
        uids.add(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
    [study_uid] = uids
    study_id = orthanc.study_id(study_uid)
    assert study_id is not None
    series_before = orthanc.get(f"/studies/{study_id}")["Series"]
    orthanc.send_to_modality("opmri", [study_id])

    orthanc.wait_for(lambda: deployment.analyses, timeout=60)
    [analysis] = deployment.analyses
    assert analysis.status == "done" and analysis.error == ""
    assert analysis.outcome == "not_analysable" and analysis.reason
    assert analysis.outbox_ids == () and analysis.objects == 0
    assert deployment.runner.wait_idle(10)
    with StateDB(state_db_path(deployment.config)) as state:
        [job] = state.jobs()
        assert (job.state, job.error) == ("done", None)
    with open_outbox(deployment.config) as outbox:
        assert outbox.entries() == []
    assert orthanc.get(f"/studies/{study_id}")["Series"] == series_before
