"""Comprehensive 3D SR with an Imaging Measurement Report (TID 1500) of one analysed study.

Content (every group is a TID 1501/1410/1411 measurement group whose finding is Osteoporosis,
SCT 64859006):

* a patient-level group (TID 1501) at the lumbar spine: the qualitative evaluation
  Osteoporosis = Present/Absent (CID 240), the probability (DCM 122157) of each sequence and
  the fused probability, the verdict as a number, the VBQ score (private code, unit
  ``{ratio}``) and a free-text notice (research use; synthetic demo models when they are);
* per analysed series and vertebra, a volumetric group (TID 1411) that references the vertebra's
  segment in the series' SEG, with the vertebra's probability;
* per analysed series and vertebra, a planar group (TID 1410) whose region is the vertebra's
  outline (SCOORD polyline) on the series' mid-sagittal slice, with the same probability:
  OHIF v3 draws these outlines with their values, while it draws nothing for SEG references;
* a planar group around L1-L4 on the key slice with the fused probability, the numeric flag and
  the VBQ, so the verdict itself appears next to an outline in such viewers.

The device observer context, TID 4019 algorithm identification per measurement and the
Contributing Equipment (IHE AI Results) name the node and its models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from pipeline.dicom_out import codes
from pipeline.dicom_out.equipment import (
    MANUFACTURER,
    MODEL_NAME,
    contributing_equipment,
    device_serial_number,
)
from pipeline.dicom_out.identity import (
    SERIES_NUMBERS,
    ResultIdentity,
    character_set,
    copy_patient_study,
)
from pipeline.dicom_out.outline import hull_outline, outline
from pipeline.dicom_out.seg import segment_levels
from pipeline.dicom_out.sources import check_headers, highdicom_source, key_slice_index
from pipeline.labels import LABEL_OF, SCORED_LEVELS
from pipeline.result import ModelInfo, SeriesResult, StudyResult

VBQ_ALGORITHM = "Vertebral bone quality score (Ehresman 2020)"


def _algorithm(model: ModelInfo, *, detailed: bool = True) -> hd.sr.AlgorithmIdentification:
    """TID 4019 for a model; ``detailed`` adds its parameters (once per report is enough)."""
    parameters: list[str] | None = None
    if detailed:
        parameters = [f"architecture={model.architecture}", f"input_size={model.input_size}"]
        if model.threshold is not None:
            parameters.append(f"threshold={model.threshold:.4f}")
        if model.synthetic:
            parameters.append("training_data=synthetic")
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64],
        version=model.version[:64],
        parameters=parameters,
        manufacturer=MANUFACTURER,
    )


def _pipeline_algorithm(result: StudyResult) -> hd.sr.AlgorithmIdentification:
    parameters = [f"{m.name}={m.version}" for m in result.models]
    if result.demo_models:
        parameters.append("demo models trained on synthetic data")
    return hd.sr.AlgorithmIdentification(
        name=MODEL_NAME,
        version=result.pipeline_version[:64],
        parameters=parameters,
        manufacturer=MANUFACTURER,
    )


def _probability(
    value: float, method: Code, algorithm: hd.sr.AlgorithmIdentification | None = None
) -> hd.sr.Measurement:
    """A probability measurement; ``algorithm`` only where it differs from its group's."""
    return hd.sr.Measurement(
        name=codes.PROBABILITY,
        value=round(float(value), 4),
        unit=codes.UNIT_NONE,
        method=method,
        algorithm_id=algorithm,
    )


def _notice(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=codes.COMMENT,
        value=text,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _add_notice(group: Sequence[Dataset], text: str) -> None:
    container = group[0]
    container.ContentSequence.append(_notice(text))


def _verdict(result: StudyResult) -> Code:
    assert result.patient is not None
    return codes.PRESENT if result.patient.osteoporosis else codes.ABSENT


def _patient_measurements(result: StudyResult) -> list[hd.sr.Measurement]:
    patient = result.patient
    assert patient is not None
    measurements: list[hd.sr.Measurement] = []
    for sequence, value in (("T1", patient.probability_t1), ("T2", patient.probability_t2)):
        series = result.series_for(sequence)
        if value is not None and series is not None:
            measurements.append(
                _probability(value, codes.METHOD_OF_SEQUENCE[sequence], _algorithm(series.model))
            )
    if patient.probability is not None:
        measurements.append(_probability(patient.probability, codes.METHOD_FUSED))
    return measurements


def _flag_measurement(result: StudyResult) -> hd.sr.Measurement:
    assert result.patient is not None
    return hd.sr.Measurement(
        name=codes.OSTEOPOROSIS_FLAG,
        value=1.0 if result.patient.osteoporosis else 0.0,
        unit=codes.UNIT_NONE,
    )


def _vbq_measurement(result: StudyResult) -> hd.sr.Measurement | None:
    assert result.patient is not None
    if result.patient.vbq is None:
        return None
    return hd.sr.Measurement(
        name=codes.VBQ_SCORE,
        value=round(float(result.patient.vbq), 4),
        unit=codes.UNIT_RATIO,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=VBQ_ALGORITHM, version=result.pipeline_version[:64], manufacturer=MANUFACTURER
        ),
    )


def _patient_group(
    result: StudyResult, identity: ResultIdentity
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = _patient_measurements(result)
    measurements.append(_flag_measurement(result))
    vbq = _vbq_measurement(result)
    if vbq is not None:
        measurements.append(vbq)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.tracking_uid(result.study_instance_uid, "patient"),
            identifier="Osteoporosis, patient level",
        ),
        finding_type=codes.OSTEOPOROSIS,
        finding_sites=[hd.sr.FindingSite(codes.LUMBAR_SPINE)],
        algorithm_id=_pipeline_algorithm(result),
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.OSTEOPOROSIS, value=_verdict(result))
        ],
    )
    _add_notice(group, result.notice)
    return group


def _source_region(
    series: SeriesResult, headers: Sequence[Dataset], k: int, points: np.ndarray
) -> hd.sr.ImageRegion:
    ds = headers[k]
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=series.sop_instance_uids[k],
        ),
    )


def _level_groups(
    result: StudyResult,
    series: SeriesResult,
    headers: Sequence[Dataset],
    seg: Dataset,
    identity: ResultIdentity,
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    algorithm = _algorithm(series.model, detailed=False)
    method = codes.METHOD_OF_SEQUENCE[series.sequence]
    key_k = key_slice_index(series)
    for number, level in enumerate(segment_levels(series), start=1):
        info = series.level(level)
        measurements = (
            [_probability(info.probability, method)]
            if info.probability is not None
            else []
        )
        site = [hd.sr.FindingSite(codes.VERTEBRA_OF_LEVEL[level])]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=identity.tracking_uid(series.series_instance_uid, level),
                    identifier=f"{series.sequence} {level} vertebral body",
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(
                        series.series_instance_uid
                    ),
                ),
                finding_type=codes.OSTEOPOROSIS,
                finding_sites=site,
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )
        mask = series.labelmap == LABEL_OF[level]
        k = key_k
        if not mask[key_k].any() and info.mid_slice is not None:
            k = info.mid_slice
        points = outline(mask[k])
        if points is None:
            continue
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=identity.tracking_uid(series.series_instance_uid, f"{level}-outline"),
                    identifier=f"{series.sequence} {level} outline",
                ),
                referenced_region=_source_region(series, headers, k, points),
                finding_type=codes.OSTEOPOROSIS,
                finding_sites=site,
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )
    return groups


def _verdict_outline_group(
    result: StudyResult,
    series: SeriesResult,
    headers: Sequence[Dataset],
    identity: ResultIdentity,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    k = key_slice_index(series)
    labels = [LABEL_OF[level] for level in SCORED_LEVELS]
    points = hull_outline(np.isin(series.labelmap[k], labels))
    if points is None:
        return None
    patient = result.patient
    assert patient is not None
    measurements: list[hd.sr.Measurement] = []
    if patient.probability is not None:
        measurements.append(_probability(patient.probability, codes.METHOD_FUSED))
    measurements.append(_flag_measurement(result))
    vbq = _vbq_measurement(result)
    if vbq is not None:
        measurements.append(vbq)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.tracking_uid(series.series_instance_uid, "verdict-outline"),
            identifier="Osteoporosis verdict, L1-L4",
        ),
        referenced_region=_source_region(series, headers, k, points),
        finding_type=codes.OSTEOPOROSIS,
        finding_sites=[hd.sr.FindingSite(codes.LUMBAR_SPINE)],
        algorithm_id=_pipeline_algorithm(result),
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.OSTEOPOROSIS, value=_verdict(result))
        ],
    )
    _add_notice(group, result.notice)
    return group


def build_sr(
    result: StudyResult,
    headers: Mapping[str, Sequence[Dataset]],
    segs: Mapping[str, Dataset],
    identity: ResultIdentity | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of an analysed study.

    Args:
        result: the analysed study.
        headers: source datasets per Series Instance UID, in each series' slice order.
        segs: the SEG of each analysed series, by source Series Instance UID (from
            :func:`~pipeline.dicom_out.seg.build_seg`).
        identity: UIDs of the result objects (default: derived from ``result``).

    Raises:
        ValueError: if the study was not analysed or a series lacks its headers or SEG.
    """
    if not result.analysed or result.patient is None:
        raise ValueError('Argument "result" must be an analysed study')
    identity = identity or ResultIdentity.for_result(result.study_instance_uid, result.models)
    ordered: dict[str, list[Dataset]] = {}
    for series in result.series:
        if series.series_instance_uid not in headers:
            raise ValueError(f"no source headers for the {series.sequence} series")
        ordered[series.series_instance_uid] = check_headers(
            series, headers[series.series_instance_uid]
        )

    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = [_patient_group(result, identity)]
    key = result.series_for("T1") or result.series_for("T2")
    if key is not None:
        verdict = _verdict_outline_group(
            result, key, ordered[key.series_instance_uid], identity
        )
        if verdict is not None:
            groups.append(verdict)
    evidence: list[Dataset] = []
    for series in result.series:
        if not segment_levels(series):
            continue
        seg = segs.get(series.series_instance_uid)
        if seg is None:
            raise ValueError(f"no SEG for the {series.sequence} series")
        series_headers = ordered[series.series_instance_uid]
        groups.extend(_level_groups(result, series, series_headers, seg, identity))
        evidence.append(seg)
        evidence.extend(highdicom_source(ds) for ds in series_headers)

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name="opmri-node",
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    first = next(iter(ordered.values()))[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=identity.sr_series_uid,
        series_number=SERIES_NUMBERS["SR"],
        sop_instance_uid=identity.sr_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        contributing_equipment=contributing_equipment(result),
        series_description="Osteoporosis screening report (opmri-node, research use)",
        manufacturer_model_name=MODEL_NAME,
        software_versions=result.pipeline_version[:64],
        device_serial_number=device_serial_number(identity),
        coding_schemes=[codes.coding_scheme_identification()],
        specific_character_set=character_set(first),
    )
    copy_patient_study(first, sr)
    return sr
