"""The analysis of one study: select series, load, segment, crop, classify, VBQ, verdict.

:class:`Analyzer` loads and verifies its models once; :meth:`Analyzer.analyze_study` may then
be called for many studies. A study that cannot be analysed (no usable series, no vertebra
found) gives a :class:`~pipeline.result.StudyResult` with outcome ``not_analysable`` and the
reason, never an exception.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from pipeline.classify import aggregate, fuse, predict_levels
from pipeline.config import PipelineSettings
from pipeline.device import configure_threads, resolve_device, use_half
from pipeline.labels import LABEL_OF, LUMBAR_LEVELS
from pipeline.preprocess import PreprocessSpec, mid_sagittal_slice, vertebra_crops
from pipeline.privacy import uid_tag
from pipeline.registry import (
    CLASSIFIER_OF,
    SEGMENTER,
    LoadedModel,
    ModelManifest,
    load_model,
)
from pipeline.result import LevelResult, ModelInfo, PatientResult, SeriesResult, StudyResult
from pipeline.segment import SegmentationInputSpec, postprocess_labelmap, predict_labelmaps
from pipeline.selection import (
    SEQUENCES,
    SelectionResult,
    SequenceName,
    SeriesCandidate,
    SkippedSeries,
    read_headers,
    select_series,
)
from pipeline.vbq import VBQResult, vbq_score
from pipeline.volume import Volume, VolumeError, load_series

log = logging.getLogger(__name__)


def model_info(manifest: ModelManifest) -> ModelInfo:
    return ModelInfo(
        name=manifest.name,
        task=manifest.task,
        architecture=manifest.architecture,
        version=manifest.version,
        sequence=manifest.sequence,
        input_size=manifest.input_size,
        weights_sha256=manifest.weights_sha256 or "",
        synthetic=manifest.synthetic,
        training_data=manifest.training_data,
        threshold=manifest.threshold,
    )


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self._start}


@dataclass(frozen=True)
class _Loaded:
    sequence: SequenceName
    candidate: SeriesCandidate
    volume: Volume


class Analyzer:
    """Runs the pipeline; models are loaded and verified once, when it is created.

    Raises :class:`~pipeline.registry.ModelRegistryError` subclasses when a model is missing
    or does not match its manifest, and :class:`~pipeline.device.DeviceError` when the
    configured device is unusable.
    """

    def __init__(self, settings: PipelineSettings | None = None) -> None:
        self.settings = settings or PipelineSettings()
        self.device = resolve_device(self.settings.device)
        self.threads = configure_threads(self.settings.num_threads)
        self.half = use_half(self.device, self.settings.half_precision)
        start = time.perf_counter()
        models_dir = self.settings.models_dir
        self.segmenter: LoadedModel = load_model(models_dir, SEGMENTER, self.device)
        self.classifiers: dict[SequenceName, LoadedModel] = {
            sequence: load_model(
                models_dir,
                CLASSIFIER_OF[sequence],
                self.device,
                architecture=self.settings.classifier.architecture,
            )
            for sequence in SEQUENCES
        }
        # Channels-last convolutions are faster for the classifiers on CPU (oneDNN) and
        # GPU (tensor cores); the UNet's instance norm gains nothing from it.
        for loaded in self.classifiers.values():
            loaded.module.to(memory_format=torch.channels_last)
        self.load_seconds = time.perf_counter() - start
        log.info(
            "models loaded in %.2f s on %s (%d CPU threads%s)",
            self.load_seconds,
            self.device,
            self.threads,
            ", float16" if self.half else "",
        )

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        loaded = (self.segmenter, *self.classifiers.values())
        return tuple(model_info(model.manifest) for model in loaded)

    @property
    def demo_models(self) -> bool:
        return any(info.synthetic for info in self.models)

    @property
    def segmentation_spec(self) -> SegmentationInputSpec:
        spec = self.segmenter.manifest.preprocessing
        assert isinstance(spec, SegmentationInputSpec)
        return spec

    def crop_spec(self, sequence: SequenceName) -> PreprocessSpec:
        spec = self.classifiers[sequence].manifest.preprocessing
        assert isinstance(spec, PreprocessSpec)
        return spec

    def warmup(self) -> None:
        """Run every network once on blank input of the batch shapes a study uses (the
        first calls allocate memory and select kernels)."""
        slices = self.settings.segmentation.batch_size
        blank = np.zeros((slices, 64, 64), dtype=np.float32)
        predict_labelmaps(
            self.segmenter.module, [blank], self.segmentation_spec, self.device,
            half=self.half, batch_size=slices,
        )  # fmt: skip
        for sequence, loaded in self.classifiers.items():
            spec = self.crop_spec(sequence)
            crop = np.zeros((spec.in_chans, spec.input_size, spec.input_size), np.float32)
            predict_levels(
                loaded.module, dict.fromkeys(LUMBAR_LEVELS, crop), self.device, half=self.half
            )

    # -- the analysis ---------------------------------------------------------------------

    def analyze_study(self, paths: Iterable[Path | str]) -> StudyResult:
        """Analyse the DICOM files of one study (any order, any mix of series)."""
        timer = _Timer()
        with timer.stage("read_headers"):
            headers, unreadable = read_headers(paths)
        studies = {str(ds.get("StudyInstanceUID", "")) for ds in headers}
        study_uid = next(iter(studies)) if len(studies) == 1 else ""
        if not headers:
            return self._not_analysable(study_uid, "no readable DICOM files", (), timer)
        if len(studies) > 1:
            return self._not_analysable(
                "", f"the files belong to {len(studies)} studies; analyse one study at a time",
                (), timer,
            )
        with timer.stage("select"):
            selection = select_series(
                headers, self.settings.selection, unreadable_files=unreadable
            )
        tag = uid_tag(study_uid)
        if not selection.analysable:
            log.info("study %s not analysable: %s", tag, selection.reason())
            return self._not_analysable(study_uid, selection.reason(), selection.skipped, timer)
        with timer.stage("load"):
            loaded, skipped = self._load(selection)
        if not loaded:
            reasons = "; ".join(f"series {s.label}: {s.reason}" for s in skipped)
            return self._not_analysable(
                study_uid, f"no selected series could be loaded ({reasons})", tuple(skipped), timer
            )
        missing = [seq for seq in SEQUENCES if seq not in {item.sequence for item in loaded}]
        if self.settings.require_both_sequences and missing:
            return self._not_analysable(
                study_uid,
                f"no usable sagittal {missing[0]} series (both sequences are required)",
                tuple(skipped),
                timer,
            )

        with timer.stage("segment"):
            raw = predict_labelmaps(
                self.segmenter.module,
                [item.volume.array for item in loaded],
                self.segmentation_spec,
                self.device,
                half=self.half,
                batch_size=self.settings.segmentation.batch_size,
            )
        with timer.stage("postprocess"):
            labelmaps = [
                postprocess_labelmap(r, item.volume.geometry, self.settings.segmentation)
                for r, item in zip(raw, loaded, strict=True)
            ]
        series_results = [
            self._series_result(item, labelmap, timer)
            for item, labelmap in zip(loaded, labelmaps, strict=True)
        ]
        patient = self._patient(series_results)
        outcome = "analysed"
        reason: str | None = None
        if patient.probability is None:
            outcome = "not_analysable"
            needed = self.settings.classifier.min_levels
            reason = (
                f"fewer than {needed} of {', '.join(self.settings.classifier.patient_levels)} "
                "were found by the segmenter in every series"
            )
        result = StudyResult(
            study_instance_uid=study_uid,
            outcome=outcome,  # type: ignore[arg-type]
            reason=reason,
            series=tuple(series_results),
            skipped=tuple(skipped),
            patient=patient if outcome == "analysed" else None,
            models=self.models,
            demo_models=self.demo_models,
            timings=timer.total(),
        )
        if result.analysed:
            log.info(
                "study %s analysed in %.2f s: probability %.3f, flag %s%s",
                tag,
                result.timings["total"],
                patient.probability,
                "positive" if patient.osteoporosis else "negative",
                " (synthetic demo models)" if result.demo_models else "",
            )
        else:
            log.info("study %s not analysable: %s", tag, reason)
        return result

    def _not_analysable(
        self,
        study_uid: str,
        reason: str,
        skipped: tuple[SkippedSeries, ...],
        timer: _Timer,
    ) -> StudyResult:
        return StudyResult(
            study_instance_uid=study_uid,
            outcome="not_analysable",
            reason=reason,
            series=(),
            skipped=skipped,
            patient=None,
            models=self.models,
            demo_models=self.demo_models,
            timings=timer.total(),
        )

    def _load(self, selection: SelectionResult) -> tuple[list[_Loaded], list[SkippedSeries]]:
        """Load the best candidate of each sequence, falling back to the next on failure."""
        used: set[str] = set()
        failures: list[SkippedSeries] = []
        loaded: list[_Loaded] = []
        for sequence in SEQUENCES:
            for candidate in selection.candidates(sequence):
                try:
                    volume = load_series(candidate.paths)
                except VolumeError as exc:
                    log.info("series %s rejected: %s", candidate.label, exc)
                    failures.append(
                        SkippedSeries(
                            candidate.series_instance_uid,
                            candidate.series_number,
                            candidate.description,
                            candidate.n_instances,
                            f"inconsistent or undecodable: {exc}",
                        )
                    )
                    continue
                loaded.append(_Loaded(sequence, candidate, volume))
                used.add(candidate.series_instance_uid)
                break
        rejected = {entry.series_instance_uid for entry in failures}
        skipped = [
            entry
            for entry in selection.skipped
            if entry.series_instance_uid not in used and entry.series_instance_uid not in rejected
        ]
        return loaded, skipped + failures

    def _series_result(self, item: _Loaded, labelmap: np.ndarray, timer: _Timer) -> SeriesResult:
        volume, geometry = item.volume, item.volume.geometry
        classifier = self.classifiers[item.sequence]
        with timer.stage("crop"):
            crops = vertebra_crops(volume, labelmap, LUMBAR_LEVELS, self.crop_spec(item.sequence))
        with timer.stage("classify"):
            probabilities = predict_levels(
                classifier.module,
                crops,
                self.device,
                half=self.half,
                batch_size=self.settings.classifier.batch_size,
            )
        vbq: VBQResult | None = None
        if item.sequence == "T1":
            with timer.stage("vbq"):
                vbq = vbq_score(volume.array, labelmap, geometry, self.settings.vbq)

        labels = [LABEL_OF[level] for level in LUMBAR_LEVELS]
        counts = np.bincount(labelmap.ravel(), minlength=max(labels) + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            centres = ndimage.center_of_mass(np.ones(labelmap.shape, np.uint8), labelmap, labels)
        levels: list[LevelResult] = []
        for level, label, centre in zip(LUMBAR_LEVELS, labels, centres, strict=True):
            voxels = int(counts[label])
            found = voxels > 0
            centroid = None
            if found:
                x, y, z = geometry.index_to_lps(np.asarray(centre))
                centroid = (round(float(x), 3), round(float(y), 3), round(float(z), 3))
            levels.append(
                LevelResult(
                    level=level,
                    label=label,
                    found=found,
                    probability=probabilities.get(level),
                    voxels=voxels,
                    volume_ml=round(voxels * geometry.voxel_volume_ml, 3),
                    mid_slice=mid_sagittal_slice(labelmap == label) if found else None,
                    centroid_lps=centroid,
                    trabecular_signal=None if vbq is None else vbq.level_signals.get(level),
                )
            )
        settings = self.settings.classifier
        probability = aggregate(
            probabilities, settings.patient_levels, settings.aggregation, settings.min_levels
        )
        threshold = float(classifier.manifest.threshold or 0.5)
        headers = volume.headers[0]
        return SeriesResult(
            sequence=item.sequence,
            series_instance_uid=volume.series_instance_uid,
            series_number=item.candidate.series_number,
            series_description=item.candidate.description,
            sop_instance_uids=volume.sop_instance_uids,
            source_paths=volume.paths,
            frame_of_reference_uid=str(headers.get("FrameOfReferenceUID", "") or ""),
            geometry=geometry,
            labelmap=labelmap,
            levels=tuple(levels),
            probability=probability,
            threshold=threshold,
            positive=None if probability is None else probability >= threshold,
            model=model_info(classifier.manifest),
            vbq=vbq,
        )

    def _patient(self, series: list[SeriesResult]) -> PatientResult:
        by_sequence = {s.sequence: s for s in series}
        t1, t2 = by_sequence.get("T1"), by_sequence.get("T2")
        contributing = [s for s in series if s.probability is not None]
        probability = fuse((s.probability for s in contributing), self.settings.classifier.fusion)
        threshold = (
            float(np.mean([s.threshold for s in contributing])) if contributing else None
        )
        vbq = t1.vbq.score if t1 is not None and t1.vbq is not None else None
        return PatientResult(
            probability_t1=None if t1 is None else t1.probability,
            probability_t2=None if t2 is None else t2.probability,
            probability=probability,
            threshold=threshold,
            osteoporosis=None
            if probability is None or threshold is None
            else probability >= threshold,
            vbq=vbq,
            sequences=tuple(s.sequence for s in contributing),
        )
