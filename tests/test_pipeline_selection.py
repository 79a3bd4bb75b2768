"""Series selection from headers: vendor styles, distractors, ranking, rules from config."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipeline.config import PipelineSettings, SelectionRules
from pipeline.selection import SelectionResult, select_series
from tests.pipeline_fixtures import (
    AXIAL_IOP,
    CORONAL_IOP,
    SAGITTAL_IOP,
    series_headers,
    set_raw,
)


def _vendor_study(vendor: str) -> tuple[list[Dataset], dict[str, int], dict[int, str]]:
    """Headers of a realistic lumbar study in the style of ``vendor``.

    Returns the headers, the expected T1/T2 series numbers and the expected skip reason
    (a substring) of every other series.
    """
    study = generate_uid()
    h: list[Dataset] = []
    expected: dict[int, str] = {}

    def add(number: int, description: str, reason: str | None = None, **kw: object) -> None:
        h.extend(series_headers(study, number, description, vendor=vendor, **kw))  # type: ignore[arg-type]
        if reason is not None:
            expected[number] = reason

    if vendor == "SIEMENS":
        # Siemens localizers are gradient echo in three planes within one series.
        loc = []
        for iop in (SAGITTAL_IOP, CORONAL_IOP, AXIAL_IOP):
            loc += series_headers(study, 1, "localizer", 3, orientation=iop, vendor=vendor,
                                  tr=8.6, te=4.0, scanning_sequence="GR", sequence_variant="SP")
        uid = loc[0].SeriesInstanceUID
        for ds in loc:
            ds.SeriesInstanceUID = uid
        h.extend(loc)
        expected[1] = "different orientations"
        add(2, "t2_tse_sag_384", tr=3500, te=95)
        add(3, "t1_tse_sag", tr=550, te=11)
        add(4, "t2_tirm_sag", "inversion recovery", tr=4000, te=60,
            scanning_sequence=["SE", "IR"], InversionTime=150)
        add(5, "t2_tse_tra", "not sagittal (axial", orientation=AXIAL_IOP, tr=4000, te=100)
        add(6, "t1_tse_sag_fs_post", "fat-saturated", tr=600, te=11, ScanOptions=["FS"],
            ContrastBolusAgent="Gadobutrol")
        add(7, "t1_tse_sag_MPR", "derived", tr=550, te=11,
            ImageType=["DERIVED", "PRIMARY", "MPR"])
        return h, {"T1": 3, "T2": 2}, expected
    if vendor == "GE":
        add(1, "3-PLANE LOC", "localizer", tr=6.0, te=2.0, scanning_sequence="GR",
            ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
        add(2, "Sag T2 FRFSE", tr=3000, te=110, ScanOptions=["FAST_GEMS", "SAT_GEMS"])
        add(3, "SAG T1 FSE", tr=500, te=9, ScanOptions=["FAST_GEMS"])
        add(4, "SAG STIR", "inversion recovery", tr=4500, te=40,
            scanning_sequence=["SE", "IR"], InversionTime=150)
        add(5, "AX T2 FRFSE", "not sagittal", orientation=AXIAL_IOP, tr=3500, te=100)
        add(6, "Sag T1 FLAIR", "inversion recovery", tr=2500, te=10, InversionTime=860)
        add(7, "Sag T1 +C", "contrast-enhanced", tr=520, te=9, ContrastBolusAgent="GADAVIST")
        return h, {"T1": 3, "T2": 2}, expected
    if vendor == "PHILIPS":
        add(101, "Survey", "not a spin-echo", n_slices=5, tr=11, te=4.6, scanning_sequence="GR")
        add(201, "T2W_TSE_SAG", tr=3200, te=100)
        add(301, "T1W_TSE_SAG", tr=450, te=8)
        add(401, "STIR_SAG", "inversion recovery", tr=3800, te=60, scanning_sequence="IR",
            InversionTime=165)
        add(501, "T2W_TSE_TRA", "not sagittal", orientation=AXIAL_IOP, tr=3000, te=100)
        add(601, "sT2W_mDIXON_W", "derived", tr=3000, te=90,
            ImageType=["DERIVED", "PRIMARY", "W", "W", "DERIVED"])
        add(701, "T2W_TSE_COR", "not sagittal (coronal", orientation=CORONAL_IOP, tr=3000,
            te=100)
        return h, {"T1": 301, "T2": 201}, expected
    if vendor == "CANON":
        add(1, "Locator", "localizer", tr=5.0, te=2.0, scanning_sequence="GR",
            ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
        add(2, "Sag T2 FSE", tr=3500, te=96)
        add(3, "Sag T1 FSE", tr=520, te=10)
        add(4, "Sag STIR", "inversion recovery", tr=5000, te=50, InversionTime=160)
        add(5, "Sag DWI b800", "ScanningSequence EP", tr=4000, te=70,
            scanning_sequence=["SE", "EP"])
        add(6, "Ax T2 FSE", "not sagittal", orientation=AXIAL_IOP, tr=3500, te=96)
        return h, {"T1": 3, "T2": 2}, expected
    if vendor == "FUJIFILM":
        add(1, "T1WI_SAG", tr=480, te=12)
        add(2, "T2WI_SAG", tr=3300, te=105)
        add(3, "PDWI_SAG", "proton-density", tr=3000, te=25)
        add(4, "STIR_SAG", "inversion recovery", tr=4200, te=50, InversionTime=150)
        add(5, "T2*WI_SAG", "not a spin-echo", tr=600, te=20, scanning_sequence="GR")
        add(6, "T2WI_AX", "not sagittal", orientation=AXIAL_IOP, tr=3300, te=105)
        return h, {"T1": 1, "T2": 2}, expected
    raise AssertionError(vendor)


@pytest.mark.parametrize("vendor", ["SIEMENS", "GE", "PHILIPS", "CANON", "FUJIFILM"])
def test_vendor_study_selects_sagittal_t1_and_t2(vendor: str) -> None:
    headers, chosen, reasons = _vendor_study(vendor)
    random.Random(7).shuffle(headers)
    result = select_series(headers)
    assert result.analysable
    assert result.t1 is not None and result.t2 is not None
    assert result.t1.series_number == chosen["T1"]
    assert result.t2.series_number == chosen["T2"]
    assert result.t1.n_instances == 15 and len(result.t1.paths) == 15
    skipped = {s.series_number: s.reason for s in result.skipped}
    assert set(skipped) == set(reasons)
    for number, reason in reasons.items():
        assert reason in skipped[number], (number, skipped[number])


def test_distractor_series_of_other_kinds() -> None:
    study = generate_uid()
    t2 = series_headers(study, 2, "t2_tse_sag", tr=3500, te=95)
    ct = series_headers(study, 3, "CT lumbar", 5, Modality="CT")
    sr = series_headers(study, 4, "report", 1, SOPClassUID="1.2.840.10008.5.1.4.1.1.88.33")
    enhanced = series_headers(study, 5, "t1 enhanced", 1, SOPClassUID="1.2.840.10008.5.1.4.1.1.4.1")
    mixed = series_headers(study, 6, "dual echo", 10, tr=3000, te=20)
    for ds in mixed[::2]:
        ds.EchoTime = 100
    no_tr = series_headers(study, 7, "t1 sag", tr=None, te=None)
    few = series_headers(study, 8, "t1_tse_sag", 3, tr=500, te=10)
    gre_t1 = series_headers(study, 9, "t1 vibe sag", tr=6, te=2.5, scanning_sequence="GR")
    mp = series_headers(study, 10, "t1 space sag", tr=700, te=12, sequence_variant=["SK", "MP"])
    secondary = series_headers(study, 11, "screen save", 5,
                               ImageType=["ORIGINAL", "SECONDARY", "OTHER"])
    result = select_series([*t2, *ct, *sr, *enhanced, *mixed, *no_tr, *few, *gre_t1, *mp,
                            *secondary])
    assert result.t1 is None
    assert result.t2 is not None and result.t2.series_number == 2
    reasons = {s.series_number: s.reason for s in result.skipped}
    assert "modality CT" in reasons[3]
    assert "not MR Image Storage" in reasons[4]
    assert "Enhanced MR" in reasons[5]
    assert "mixed series" in reasons[6]
    assert "RepetitionTime/EchoTime missing" in reasons[7]
    assert "too few slices" in reasons[8]
    assert "not a spin-echo" in reasons[9]
    assert "SequenceVariant MP" in reasons[10]
    assert "derived or secondary" in reasons[11]


def test_no_usable_series_is_a_clear_outcome_not_an_exception() -> None:
    study = generate_uid()
    headers = [
        *series_headers(study, 1, "AX T2", orientation=AXIAL_IOP, tr=3000, te=100),
        *series_headers(study, 2, "SAG STIR", tr=4000, te=50, InversionTime=150),
    ]
    result = select_series(headers)
    assert not result.analysable
    assert result.t1 is None and result.t2 is None
    assert result.reason().startswith("no sagittal T1- or T2-weighted series")
    assert "not sagittal" in result.reason() and "inversion recovery" in result.reason()
    assert select_series([]).reason() == "the study holds no image series"


def test_orientation_not_description_decides_the_plane() -> None:
    study = generate_uid()
    # Described as sagittal, acquired axially: not used. Described as axial, acquired
    # sagittally: used.
    wrong = series_headers(study, 1, "t2_tse_sag", orientation=AXIAL_IOP, tr=3500, te=95)
    right = series_headers(study, 2, "t2_tse_ax", tr=3500, te=95)
    result = select_series([*wrong, *right])
    assert result.t2 is not None and result.t2.series_number == 2
    assert "not sagittal" in result.skipped[0].reason


@pytest.mark.parametrize(("angle", "accepted"), [(0, True), (20, True), (29, True), (40, False)])
def test_oblique_sagittal_tolerance(angle: float, accepted: bool) -> None:
    import math

    a = math.radians(angle)
    # Rotate the sagittal plane about the superior-inferior axis.
    iop = (math.sin(a), math.cos(a), 0.0, 0.0, 0.0, -1.0)
    headers = series_headers(generate_uid(), 1, "t1_tse_sag", orientation=iop, tr=500, te=10)
    assert (select_series(headers).t1 is not None) is accepted


def test_weighting_comes_from_tr_te_not_description() -> None:
    study = generate_uid()
    # A series described "T1" with T2 parameters is a T2 series.
    headers = series_headers(study, 4, "sag T1", tr=3500, te=100)
    result = select_series(headers)
    assert result.t1 is None and result.t2 is not None


def test_description_breaks_ties_between_header_equal_series() -> None:
    study = generate_uid()
    post = series_headers(study, 9, "sag t1 post", tr=500, te=10)  # no contrast tag
    plain = series_headers(study, 3, "sag t1 fse", tr=500, te=10)
    result = select_series([*post, *plain])
    assert result.t1 is not None and result.t1.series_number == 3
    assert [c.series_number for c in result.candidates("T1")] == [3, 9]
    assert "another T1 series ranked higher (#3" in result.skipped[0].reason


def test_repeat_series_prefers_latest_and_routine_slice_count() -> None:
    study = generate_uid()
    first = series_headers(study, 3, "t2_tse_sag", tr=3500, te=95)
    repeat = series_headers(study, 8, "t2_tse_sag", tr=3500, te=95)
    assert select_series([*first, *repeat]).t2.series_number == 8  # type: ignore[union-attr]
    rules = SelectionRules(prefer_latest=False)
    assert select_series([*first, *repeat], rules).t2.series_number == 3  # type: ignore[union-attr]
    thick = series_headers(study, 9, "t2_tse_sag", 40, tr=3500, te=95, slice_spacing=1.0)
    assert select_series([*first, *thick]).t2.series_number == 3  # type: ignore[union-attr]


def test_reversed_file_order_selects_the_same_series() -> None:
    study = generate_uid()
    t1 = series_headers(study, 3, "t1_tse_sag", tr=550, te=11, reverse=True)
    result = select_series(list(reversed(t1)))
    assert result.t1 is not None and result.t1.n_instances == 15


def test_rules_live_in_config() -> None:
    settings = PipelineSettings.model_validate(
        {"selection": {"exclude_fat_saturated": False, "t1_max_tr_ms": 400}}
    )
    study = generate_uid()
    fs = series_headers(study, 5, "t2_tse_sag_fs", tr=3500, te=95, ScanOptions=["FS"])
    t1 = series_headers(study, 6, "t1_tse_sag", tr=550, te=11)
    default = select_series([*fs, *t1])
    assert default.t2 is None and default.t1 is not None
    custom = select_series([*fs, *t1], settings.selection)
    assert custom.t2 is not None and custom.t2.series_number == 5
    assert custom.t1 is None  # TR 550 is no longer T1 under these rules
    with pytest.raises(ValueError, match="extra"):
        PipelineSettings.model_validate({"selection": {"exclude_fatsat": False}})


def test_skip_log_has_reasons_but_no_identifiers(caplog: pytest.LogCaptureFixture) -> None:
    study = generate_uid()
    headers = [
        *series_headers(study, 1, "AX T2", orientation=AXIAL_IOP, tr=3000, te=100),
        *series_headers(study, 2, "t2_tse_sag", tr=3500, te=95),
    ]
    with caplog.at_level(logging.INFO, logger="pipeline.selection"):
        result: SelectionResult = select_series(headers)
    text = caplog.text
    assert "not sagittal" in text and "selected as sagittal T2" in text
    for ds in headers:
        assert ds.SeriesInstanceUID not in text
        assert ds.StudyInstanceUID not in text
    assert "Phantom" not in text and "TEST-0001" not in text
    assert result.t2 is not None


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken value
def test_garbage_header_values_skip_the_series_not_the_study() -> None:
    study = generate_uid()
    good = series_headers(study, 2, "t2_tse_sag", tr=3500, te=95)
    bad = series_headers(study, 3, "t1_tse_sag", tr=500, te=10)
    for ds in bad:
        set_raw(ds, "NumberOfFrames", "many")
    result = select_series([*good, *bad])
    assert result.t2 is not None and result.t1 is None
    assert "unreadable header values" in result.skipped[0].reason


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken file
def test_unreadable_files_are_counted_not_fatal(tmp_path: Path) -> None:
    from pipeline.selection import read_headers

    (tmp_path / "text.txt").write_text("hello")
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    (tmp_path / "empty.dcm").write_bytes(b"")
    headers, unreadable = read_headers(sorted(tmp_path.iterdir()))
    result = select_series(headers, unreadable_files=unreadable)
    assert not result.analysable and result.unreadable_files == 3
