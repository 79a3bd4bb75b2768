"""SEG, TID 1500 SR and key image: valid for dciodvfy, readable by highdicom and dcmtk, and
carrying what the radiologist and the PACS need."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import SegmentationStorage

from pipeline.dicom_out import (
    ResultObjects,
    SourceError,
    build_result_objects,
    build_seg,
    codes,
    load_sources,
    write_result_files,
)
from pipeline.dicom_out.identity import COPIED_KEYWORDS, SERIES_NUMBERS
from pipeline.dicom_out.keyimage import banner_lines, render_key_image
from pipeline.dicom_out.sources import key_slice_index
from pipeline.labels import LABEL_OF
from pipeline.result import StudyResult
from tests.dicom_out_fixtures import MODELS, PhantomStudy, make_phantom_study
from tests.pipeline_fixtures import require_tool, tool_env


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)],
        capture_output=True, text=True, env=tool_env(), timeout=60, check=False,
    )
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return make_phantom_study(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def written(study: PhantomStudy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    objects = build_result_objects(study.result)
    paths = write_result_files(objects, tmp_path_factory.mktemp("results"))
    return {path.name: path for path in paths}


def test_every_object_is_written_and_valid_for_dciodvfy(written: dict[str, Path]) -> None:
    assert sorted(written) == ["key-image.dcm", "seg-t1.dcm", "seg-t2.dcm", "sr.dcm"]
    for path in written.values():
        assert dciodvfy_errors(path) == [], path.name


def test_objects_join_the_source_study_in_new_series(
    study: PhantomStudy, written: dict[str, Path]
) -> None:
    source = pydicom.dcmread(study.series_paths["T1"][0])
    source_series = {s.series_instance_uid for s in study.result.series}
    series_seen = set()
    for path in written.values():
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study.study_uid
        assert ds.SeriesInstanceUID not in source_series
        series_seen.add(ds.SeriesInstanceUID)
        for keyword in COPIED_KEYWORDS:
            if keyword in source:
                assert ds[keyword].value == source[keyword].value, (path.name, keyword)
        assert ds.StudyDescription == "MRI LUMBAR SPINE"
        assert ds.AccessionNumber == "ACC-77"
    assert len(series_seen) == 4


def test_seg_has_one_segment_per_lumbar_body_on_the_source_grid(
    study: PhantomStudy, written: dict[str, Path]
) -> None:
    seg = hd.seg.segread(written["seg-t1.dcm"])
    t1 = study.result.series_for("T1")
    assert t1 is not None
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == 5 * len(t1.sop_instance_uids)  # empty frames kept
    assert (int(seg.Rows), int(seg.Columns)) == t1.labelmap.shape[1:]
    for number, level in enumerate(("L1", "L2", "L3", "L4", "L5"), start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == f"{level} vertebral body"
        assert description.segmented_property_category == codes.ANATOMICAL_STRUCTURE
        assert description.segmented_property_type == codes.VERTEBRA_OF_LEVEL[level]
        assert description.tracking_id == f"T1 {level} vertebral body"
        assert description.tracking_uid.startswith("2.25.")
        algorithm = description.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "segmenter"
        assert algorithm.AlgorithmVersion == "demo-1"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(t1.sop_instance_uids),
            segment_numbers=[number],
        )[..., 0]
        np.testing.assert_array_equal(mask.astype(bool), t1.labelmap == LABEL_OF[level])
    devices = {item.get("ManufacturerModelName"): item
               for item in seg.ContributingEquipmentSequence}
    assert {"segmenter", "cls-t1", "cls-t2"} <= set(devices)
    assert devices["cls-t1"].SoftwareVersions == "demo-1"
    assert devices["cls-t1"].DeviceUID.startswith("2.25.")


def _groups(sr: hd.sr.Comprehensive3DSR) -> list[pydicom.Dataset]:
    report = sr.ContentSequence
    measurements = next(item for item in report
                        if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(measurements.ContentSequence)


def _items(group: pydicom.Dataset, meaning: str) -> list[pydicom.Dataset]:
    return [item for item in group.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _num(item: pydicom.Dataset) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def _method(item: pydicom.Dataset) -> str | None:
    for child in item.get("ContentSequence", []):
        if child.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Method":
            return str(child.ConceptCodeSequence[0].CodeValue)
    return None


def test_sr_holds_the_patient_verdict_probabilities_and_vbq(
    study: PhantomStudy, written: dict[str, Path]
) -> None:
    sr = hd.sr.srread(written["sr.dcm"])
    patient = study.result.patient
    assert patient is not None
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    groups = _groups(sr)
    first = groups[0]
    assert _items(first, "Finding")[0].ConceptCodeSequence[0].CodeValue == "64859006"
    verdict = _items(first, "Osteoporosis")[0]
    assert verdict.ConceptCodeSequence[0].CodeValue == codes.PRESENT.value
    probabilities = {_method(item): _num(item) for item in _items(first, "Probability")}
    assert probabilities == pytest.approx(
        {"CNN-T1": patient.probability_t1, "CNN-T2": patient.probability_t2,
         "CNN-FUSED": patient.probability}, abs=1e-4,
    )
    vbq = _items(first, "Vertebral bone quality score")[0]
    assert _num(vbq) == pytest.approx(3.12)
    unit = vbq.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("{ratio}", "UCUM")
    assert vbq.ConceptNameCodeSequence[0].CodingSchemeDesignator == codes.SCHEME_DESIGNATOR
    assert _num(_items(first, "Osteoporosis flag (1 present, 0 absent)")[0]) == 1.0
    notice = _items(first, "Comment")[0].TextValue
    assert "research use" in notice and "synthetic" in notice
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert codes.SCHEME_DESIGNATOR in schemes


def test_sr_observer_procedure_and_equipment(written: dict[str, Path]) -> None:
    sr = hd.sr.srread(written["sr.dcm"])
    meanings = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
    assert meanings["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"
    assert meanings["Device Observer UID"].UID.startswith("2.25.")
    assert meanings["Procedure reported"].ConceptCodeSequence[0].CodeValue == "25056-3"
    models = {item.get("ManufacturerModelName"): item
              for item in sr.ContributingEquipmentSequence}
    for model in MODELS:
        item = models[model.name]
        assert item.Manufacturer == "opmri-node"
        assert item.SoftwareVersions == model.version
        assert item.DeviceUID.startswith("2.25.")
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert len({models[m.name].DeviceUID for m in MODELS}) == len(MODELS)


def test_sr_per_vertebra_groups_reference_seg_segments_and_outlines(
    study: PhantomStudy, written: dict[str, Path]
) -> None:
    sr = hd.sr.srread(written["sr.dcm"])
    segs = {pydicom.dcmread(written[name]).SOPInstanceUID: name
            for name in ("seg-t1.dcm", "seg-t2.dcm")}
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    planar = sr.content.get_planar_roi_measurement_groups()
    assert len(volumetric) == 10  # 5 levels x 2 series
    referenced = set()
    for group in volumetric:
        segment = group.referenced_segment
        assert segment is not None
        numbers = segment.referenced_segment_numbers
        assert numbers is not None
        referenced.add((segs[segment.referenced_sop_instance_uid], numbers[0]))
        probabilities = [m for m in group.get_measurements() if m.name == codes.PROBABILITY]
        assert len(probabilities) == 1
    assert referenced == {(name, n) for name in segs.values() for n in range(1, 6)}
    t1 = study.result.series_for("T1")
    assert t1 is not None
    key_uid = t1.sop_instance_uids[key_slice_index(t1)]
    outlines = [g for g in planar if g.tracking_identifier and "outline" in g.tracking_identifier]
    assert len(outlines) == 10
    t1_l2 = next(g for g in outlines if g.tracking_identifier == "T1 L2 outline")
    region = t1_l2.roi
    assert region is not None
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    source = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == key_uid
    points = region.value
    assert np.array_equal(points[0], points[-1])
    mask = t1.labelmap[key_slice_index(t1)] == LABEL_OF["L2"]
    rows, cols = np.nonzero(mask)
    assert points[:, 0].min() == pytest.approx(cols.min(), abs=1.0)
    assert points[:, 0].max() == pytest.approx(cols.max() + 1, abs=1.0)
    assert points[:, 1].min() == pytest.approx(rows.min(), abs=1.0)
    [probability] = [m for m in t1_l2.get_measurements() if m.name == codes.PROBABILITY]
    assert probability.value == pytest.approx(0.74)
    verdict = next(g for g in planar if g.tracking_identifier == "Osteoporosis verdict, L1-L4")
    flags = [m for m in verdict.get_measurements() if m.name == codes.OSTEOPOROSIS_FLAG]
    assert flags[0].value == 1.0


def test_dsrdump_prints_the_report_tree(written: dict[str, Path]) -> None:
    result = subprocess.run(
        [require_tool("dsrdump"), str(written["sr.dcm"])],
        capture_output=True, text=True, env=tool_env(), timeout=60, check=True,
    )
    tree = result.stdout
    assert '"Imaging Measurement Report"' in tree
    assert '(64859006,SCT,"Osteoporosis")' in tree
    assert '(52101004,SCT,"Present")' in tree
    assert 'NUM:(,,"Probability")' in tree
    assert "SCOORD" in tree and "POLYLINE" in tree


def test_key_image_is_an_rgb_capture_with_burned_in_banner(
    study: PhantomStudy, written: dict[str, Path]
) -> None:
    image = hd.imread(written["key-image.dcm"])
    ds = pydicom.dcmread(written["key-image.dcm"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.BurnedInAnnotation == "YES"
    assert list(ds.PatientOrientation) == ["P", "F"]
    assert "synthetic" in ds.ImageComments
    t1 = study.result.series_for("T1")
    assert t1 is not None
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == t1.sop_instance_uids[
        key_slice_index(t1)
    ]
    pixels = image.get_frame(1)
    assert pixels.shape == (ds.Rows, ds.Columns, 3)
    # the positive verdict line is drawn in red at the top; the L1 outline in its colour
    banner = pixels[: pixels.shape[0] // 8]
    reddish = (banner[..., 0] > 200) & (banner[..., 1] < 120) & (banner[..., 2] < 120)
    assert reddish.sum() > 50
    l1 = np.all(pixels == (230, 25, 75), axis=-1)
    assert l1.sum() > 50


def test_banner_text_follows_the_result(study: PhantomStudy) -> None:
    lines = [line.text for line in banner_lines(study.result)]
    assert lines[0].startswith("OSTEOPOROSIS SUSPECTED")
    assert "VBQ 3.12" in lines[1]
    assert any("NOT FOR DIAGNOSTIC USE" in line for line in lines)
    assert any("synthetic" in line for line in lines)
    clinical = dataclasses.replace(study.result, demo_models=False)
    assert not any("synthetic" in line.text for line in banner_lines(clinical))


def test_reanalysis_with_the_same_models_gives_the_same_uids(study: PhantomStudy) -> None:
    first = build_result_objects(study.result)
    second = build_result_objects(study.result)
    uids = [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in first.datasets]
    assert uids == [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in second.datasets]
    assert len({uid for pair in uids for uid in pair}) == 2 * len(uids)
    retrained = tuple(dataclasses.replace(m, version="demo-2") if m.name == "cls-t1" else m
                      for m in study.result.models)
    third = build_result_objects(dataclasses.replace(study.result, models=retrained))
    assert not {d.SOPInstanceUID for d in third.datasets} & {d.SOPInstanceUID
                                                            for d in first.datasets}


def test_negative_result_says_absent(tmp_path: Path) -> None:
    low = {"T1": dict.fromkeys(("L1", "L2", "L3", "L4", "L5"), 0.2),
           "T2": dict.fromkeys(("L1", "L2", "L3", "L4", "L5"), 0.3)}
    study = make_phantom_study(tmp_path, probabilities=low)
    objects = build_result_objects(study.result)
    assert objects.sr is not None
    first = _groups(objects.sr)[0]
    verdict = _items(first, "Osteoporosis")[0]
    assert verdict.ConceptCodeSequence[0].CodeValue == codes.ABSENT.value
    assert _num(_items(first, "Osteoporosis flag (1 present, 0 absent)")[0]) == 0.0
    assert banner_lines(study.result)[0].text.startswith("Osteoporosis not suspected")


def test_t1_only_study_has_one_seg_and_no_t2_probability(tmp_path: Path) -> None:
    study = make_phantom_study(tmp_path, sequences=("T1",))
    objects = build_result_objects(study.result)
    assert [name for name, _ in objects.named] == ["seg-t1.dcm", "sr.dcm", "key-image.dcm"]
    assert objects.sr is not None
    methods = {_method(item) for item in _items(_groups(objects.sr)[0], "Probability")}
    assert methods == {"CNN-T1", "CNN-FUSED"}
    for path in write_result_files(objects, tmp_path / "out"):
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.parametrize(
    ("charset", "name", "expected"),
    [
        (None, "Doe^Jane", None),
        ("ISO_IR 192", "Müller^Zoë", "ISO_IR 192"),
        ("ISO_IR 100", "Müller^Zoë", "ISO_IR 100"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        ("ISO_IR 999", "Doe^Jane", "ISO_IR 192"),  # not a defined term: UTF-8
    ],
)
@pytest.mark.filterwarnings("ignore:Unknown encoding:UserWarning")
def test_names_keep_their_character_set(
    tmp_path: Path, charset: str | list[str] | None, name: str, expected: str | list[str] | None
) -> None:
    overrides: dict[str, object] = {"PatientName": name}
    if charset is not None:
        overrides["SpecificCharacterSet"] = charset
    study = make_phantom_study(tmp_path, sequences=("T1",), header_overrides=overrides)
    objects = build_result_objects(study.result)
    for path in write_result_files(objects, tmp_path / "out"):
        ds = pydicom.dcmread(path)
        value = ds.get("SpecificCharacterSet")
        assert (list(value) if isinstance(value, pydicom.multival.MultiValue) else value) == (
            expected
        )
        assert str(ds.PatientName) == name
        assert dciodvfy_errors(path) == [], path.name


def test_not_analysed_study_gives_no_objects(study: PhantomStudy) -> None:
    nothing = StudyResult(
        study_instance_uid=study.study_uid, outcome="not_analysable",
        reason="no sagittal T1- or T2-weighted series", series=(), skipped=(), patient=None,
        models=MODELS, demo_models=True, timings={},
    )
    objects = build_result_objects(nothing)
    assert isinstance(objects, ResultObjects)
    assert len(objects) == 0 and objects.datasets == []


def test_headers_of_another_series_are_refused(study: PhantomStudy) -> None:
    sources = load_sources(study.result)
    t1, t2 = study.result.series_for("T1"), study.result.series_for("T2")
    assert t1 is not None and t2 is not None
    with pytest.raises(SourceError, match="not the instances of the series"):
        build_seg(study.result, t1, sources.headers[t2.series_instance_uid])
    with pytest.raises(SourceError, match="source headers given"):
        build_seg(study.result, t1, sources.headers[t1.series_instance_uid][:-1])


def test_missing_source_file_is_a_clear_error(tmp_path: Path) -> None:
    study = make_phantom_study(tmp_path, sequences=("T1",))
    study.series_paths["T1"][0].unlink()
    with pytest.raises(SourceError, match="cannot be read"):
        build_result_objects(study.result)


def test_key_image_refuses_pixels_of_the_wrong_size(study: PhantomStudy) -> None:
    sources = load_sources(study.result)
    key = sources.key_slice
    assert key is not None
    t1 = study.result.series_for("T1")
    assert t1 is not None
    wrong = dataclasses.replace(key, pixels=key.pixels[:-1])
    with pytest.raises(SourceError, match="do not match"):
        render_key_image(study.result, t1, wrong)


def test_series_numbers_are_fixed_per_role(written: dict[str, Path]) -> None:
    numbers = {name: int(pydicom.dcmread(path).SeriesNumber) for name, path in written.items()}
    assert numbers == {
        "seg-t1.dcm": SERIES_NUMBERS["SEG-T1"], "seg-t2.dcm": SERIES_NUMBERS["SEG-T2"],
        "sr.dcm": SERIES_NUMBERS["SR"], "key-image.dcm": SERIES_NUMBERS["SC"],
    }
