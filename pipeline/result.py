"""Frozen, typed result of analysing one study, with a lossless JSON form.

A :class:`StudyResult` holds, per analysed series, the label map on the source grid, the
per-level probabilities and the VBQ; at patient level, the per-sequence and fused
probabilities, the flag and the models used. ``demo_models`` is set whenever any model was
trained on synthetic data; every rendering of the result must then say so (see
:attr:`StudyResult.notice`).
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from types import MappingProxyType
from typing import Any, Final, Literal

import numpy as np

from pipeline.selection import SkippedSeries
from pipeline.vbq import VBQResult
from pipeline.volume import Geometry

RESULT_FORMAT: Final[str] = "opmri-study-result/1"
RESEARCH_NOTICE: Final[str] = "For research use only; not for diagnostic use."
DEMO_NOTICE: Final[str] = (
    "DEMONSTRATION: models trained on synthetic images only; the values are not findings."
)


def _pipeline_version() -> str:
    try:
        return metadata.version("opmri-node")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a model that contributed to a result (from its manifest)."""

    name: str
    task: str
    architecture: str
    version: str
    sequence: str | None
    input_size: int
    weights_sha256: str
    synthetic: bool
    training_data: str
    threshold: float | None = None


@dataclass(frozen=True)
class LevelResult:
    """One vertebral level of one series."""

    level: str
    label: int
    found: bool
    probability: float | None = None
    voxels: int = 0
    volume_ml: float = 0.0
    mid_slice: int | None = None
    centroid_lps: tuple[float, float, float] | None = None
    trabecular_signal: float | None = None
    """Median trabecular signal on the mid-sagittal slice (the VBQ's numerator part; T1)."""


@dataclass(frozen=True, eq=False)
class SeriesResult:
    """Analysis of one sagittal series.

    ``labelmap`` is a read-only ``uint8`` array ``(k, j, i)`` on the grid described by
    ``geometry`` with the label values of :mod:`pipeline.labels`; ``sop_instance_uids`` and
    ``source_paths`` list the source images in the same slice order.
    """

    sequence: Literal["T1", "T2"]
    series_instance_uid: str
    series_number: int | None
    series_description: str
    sop_instance_uids: tuple[str, ...]
    source_paths: tuple[str, ...]
    frame_of_reference_uid: str
    geometry: Geometry
    labelmap: np.ndarray = field(repr=False)
    levels: tuple[LevelResult, ...]
    probability: float | None
    threshold: float
    positive: bool | None
    model: ModelInfo
    vbq: VBQResult | None = None

    def __post_init__(self) -> None:
        if self.labelmap.dtype != np.uint8 or self.labelmap.shape != self.geometry.shape:
            raise ValueError("labelmap must be uint8 with the geometry's shape")
        self.labelmap.setflags(write=False)

    def level(self, name: str) -> LevelResult:
        for result in self.levels:
            if result.level == name:
                return result
        raise KeyError(name)

    @property
    def probabilities(self) -> dict[str, float]:
        return {lv.level: lv.probability for lv in self.levels if lv.probability is not None}


@dataclass(frozen=True)
class PatientResult:
    """Patient-level verdict from the available sequences."""

    probability_t1: float | None
    probability_t2: float | None
    probability: float | None
    """Fused probability of the available sequences."""
    threshold: float | None
    """Threshold the fused probability is compared with (mean of the models' thresholds)."""
    osteoporosis: bool | None
    vbq: float | None
    sequences: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class StudyResult:
    """Everything the pipeline found about one study."""

    study_instance_uid: str
    outcome: Literal["analysed", "not_analysable"]
    reason: str | None
    series: tuple[SeriesResult, ...]
    skipped: tuple[SkippedSeries, ...]
    patient: PatientResult | None
    models: tuple[ModelInfo, ...]
    demo_models: bool
    timings: Mapping[str, float]
    pipeline_version: str = field(default_factory=_pipeline_version)
    created: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "timings", _frozen_mapping(self.timings))
        if self.outcome == "not_analysable" and not self.reason:
            raise ValueError("a not_analysable result needs a reason")

    @property
    def analysed(self) -> bool:
        return self.outcome == "analysed"

    @property
    def notice(self) -> str:
        """Text every rendering of this result must carry."""
        return f"{DEMO_NOTICE} {RESEARCH_NOTICE}" if self.demo_models else RESEARCH_NOTICE

    def series_for(self, sequence: str) -> SeriesResult | None:
        for series in self.series:
            if series.sequence == sequence:
                return series
        return None

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self, *, include_masks: bool = True) -> dict[str, Any]:
        """Plain JSON-compatible form (label maps zlib-compressed, base64-encoded)."""
        return {
            "format": RESULT_FORMAT,
            "study_instance_uid": self.study_instance_uid,
            "outcome": self.outcome,
            "reason": self.reason,
            "notice": self.notice,
            "demo_models": self.demo_models,
            "patient": None if self.patient is None else _plain(self.patient),
            "series": [_series_dict(s, include_masks) for s in self.series],
            "skipped": [_plain(s) for s in self.skipped],
            "models": [_plain(m) for m in self.models],
            "timings": dict(self.timings),
            "pipeline_version": self.pipeline_version,
            "created": self.created,
        }

    def to_json(self, *, include_masks: bool = True, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(include_masks=include_masks), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyResult:
        if data.get("format") != RESULT_FORMAT:
            raise ValueError(f"not a {RESULT_FORMAT} document")
        patient = data["patient"]
        return cls(
            study_instance_uid=data["study_instance_uid"],
            outcome=data["outcome"],
            reason=data["reason"],
            series=tuple(_series_from(s) for s in data["series"]),
            skipped=tuple(SkippedSeries(**s) for s in data["skipped"]),
            patient=None
            if patient is None
            else PatientResult(**{**patient, "sequences": tuple(patient["sequences"])}),
            models=tuple(ModelInfo(**m) for m in data["models"]),
            demo_models=bool(data["demo_models"]),
            timings=dict(data["timings"]),
            pipeline_version=data["pipeline_version"],
            created=data["created"],
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> StudyResult:
        """Read :meth:`to_json` output (it must include the masks)."""
        return cls.from_dict(json.loads(text))


def _plain(obj: Any) -> Any:
    """Dataclass -> JSON-compatible value (tuples become lists, mappings dicts)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {name: _plain(getattr(obj, name)) for name in obj.__dataclass_fields__}
    if isinstance(obj, Mapping):
        return {str(key): _plain(value) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_plain(value) for value in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def encode_labelmap(labelmap: np.ndarray) -> dict[str, Any]:
    data = zlib.compress(np.ascontiguousarray(labelmap, dtype=np.uint8).tobytes(), 6)
    return {
        "encoding": "zlib+base64",
        "dtype": "uint8",
        "shape": list(labelmap.shape),
        "data": base64.b64encode(data).decode("ascii"),
    }


def decode_labelmap(encoded: Mapping[str, Any]) -> np.ndarray:
    if encoded.get("encoding") != "zlib+base64" or encoded.get("dtype") != "uint8":
        raise ValueError("unsupported label map encoding")
    shape = tuple(int(n) for n in encoded["shape"])
    raw = zlib.decompress(base64.b64decode(encoded["data"]))
    if len(raw) != int(np.prod(shape)):
        raise ValueError("label map data does not match its shape")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()


def _series_dict(series: SeriesResult, include_masks: bool) -> dict[str, Any]:
    data = {name: _plain(getattr(series, name)) for name in series.__dataclass_fields__}
    data["labelmap"] = encode_labelmap(series.labelmap) if include_masks else None
    data["geometry"]["affine"] = series.geometry.affine.round(6).tolist()
    return data


def _tuple3(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    a, b, c = (float(v) for v in value)
    return (a, b, c)


def _series_from(data: Mapping[str, Any]) -> SeriesResult:
    if data.get("labelmap") is None:
        raise ValueError("the JSON was written without masks; it cannot be read back")
    g = data["geometry"]
    geometry = Geometry(
        origin=_tuple3(g["origin"]),  # type: ignore[arg-type]
        row_cosines=_tuple3(g["row_cosines"]),  # type: ignore[arg-type]
        col_cosines=_tuple3(g["col_cosines"]),  # type: ignore[arg-type]
        normal=_tuple3(g["normal"]),  # type: ignore[arg-type]
        spacing=_tuple3(g["spacing"]),  # type: ignore[arg-type]
        shape=tuple(int(n) for n in g["shape"]),  # type: ignore[arg-type]
    )
    levels = tuple(
        LevelResult(**{**lv, "centroid_lps": _tuple3(lv["centroid_lps"])}) for lv in data["levels"]
    )
    vbq = data.get("vbq")
    return SeriesResult(
        sequence=data["sequence"],
        series_instance_uid=data["series_instance_uid"],
        series_number=data["series_number"],
        series_description=data["series_description"],
        sop_instance_uids=tuple(data["sop_instance_uids"]),
        source_paths=tuple(data["source_paths"]),
        frame_of_reference_uid=data["frame_of_reference_uid"],
        geometry=geometry,
        labelmap=decode_labelmap(data["labelmap"]),
        levels=levels,
        probability=data["probability"],
        threshold=data["threshold"],
        positive=data["positive"],
        model=ModelInfo(**data["model"]),
        vbq=None if vbq is None else VBQResult(**vbq),
    )
