"""Choosing the sagittal T1- and T2-weighted series of a lumbar study from headers alone.

Header fields decide: modality and SOP class, image type (localizers and derived images are
out), orientation (ImageOrientationPatient, never the description), contrast and
preparation (ScanningSequence, SequenceVariant, InversionTime, ScanOptions,
ContrastBolusAgent) and weighting (RepetitionTime and EchoTime). The series description only
breaks ties between series the headers accept. Every series that is not used is reported
with its reason.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from pipeline.config import SelectionRules
from pipeline.privacy import uid_tag
from pipeline.volume import VolumeError, orientation_of

log = logging.getLogger(__name__)

SequenceName = Literal["T1", "T2"]
SEQUENCES: Final[tuple[SequenceName, ...]] = ("T1", "T2")
ENHANCED_MR_STORAGE: Final[str] = "1.2.840.10008.5.1.4.1.1.4.1"

@dataclass(frozen=True)
class SeriesCandidate:
    """A series that passed every header rule, with what ranked it."""

    series_instance_uid: str
    series_number: int | None
    description: str
    sequence: SequenceName
    paths: tuple[str, ...]
    n_instances: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    repetition_time: float
    echo_time: float
    manufacturer: str
    description_score: int

    @property
    def label(self) -> str:
        """Series number and UID tag: how a series is named in logs and messages."""
        return _label(self.series_number, self.series_instance_uid)


@dataclass(frozen=True)
class SkippedSeries:
    """A series that is not analysed, and why."""

    series_instance_uid: str
    series_number: int | None
    description: str
    n_instances: int
    reason: str

    @property
    def label(self) -> str:
        return _label(self.series_number, self.series_instance_uid)


@dataclass(frozen=True)
class SelectionResult:
    """The chosen T1 and T2 series, all ranked candidates and the skipped series."""

    t1: SeriesCandidate | None
    t2: SeriesCandidate | None
    candidates_t1: tuple[SeriesCandidate, ...]
    candidates_t2: tuple[SeriesCandidate, ...]
    skipped: tuple[SkippedSeries, ...]
    unreadable_files: int = 0

    @property
    def analysable(self) -> bool:
        return self.t1 is not None or self.t2 is not None

    def candidates(self, sequence: SequenceName) -> tuple[SeriesCandidate, ...]:
        """Candidates for a sequence, best first (the chosen series is the first)."""
        return self.candidates_t1 if sequence == "T1" else self.candidates_t2

    def reason(self) -> str:
        """Why the study is not analysable (empty when it is)."""
        if self.analysable:
            return ""
        if not self.skipped:
            return "the study holds no image series"
        reasons = "; ".join(f"series {s.label}: {s.reason}" for s in self.skipped)
        return f"no sagittal T1- or T2-weighted series ({reasons})"


def _label(series_number: int | None, series_uid: str) -> str:
    number = "?" if series_number is None else str(series_number)
    return f"#{number} [{uid_tag(series_uid)}]"


def read_headers(paths: Iterable[Path | str]) -> tuple[list[Dataset], int]:
    """Read the headers (no pixel data) of DICOM files; returns datasets and the unreadable count.

    Each dataset's ``filename`` is the path it was read from.
    """
    headers: list[Dataset] = []
    unreadable = 0
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # malformed files raise many types (struct, recursion, ...)
            unreadable += 1
            log.info("ignoring a file that is not readable DICOM (%s)", type(exc).__name__)
            continue
        headers.append(ds)
    return headers, unreadable


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(part.strip().upper() for part in value.split("\\") if part.strip())
    return tuple(str(part).strip().upper() for part in value)


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _matches(patterns: Sequence[str], text: str) -> bool:
    return any(re.search(pattern, text, flags=re.IGNORECASE) for pattern in patterns)


def plane_of(normal: np.ndarray) -> str:
    """Name of the acquisition plane closest to a slice normal (LPS)."""
    axis = int(np.argmax(np.abs(normal)))
    return ("sagittal", "coronal", "axial")[axis]


def classify_weighting(
    ds: Dataset, rules: SelectionRules
) -> tuple[SequenceName | None, str]:
    """T1 or T2 from one header's acquisition parameters, or ``None`` with the reason."""
    scanning = _multi(ds, "ScanningSequence")
    variants = _multi(ds, "SequenceVariant")
    options = _multi(ds, "ScanOptions")
    excluded = [s for s in scanning if s in rules.excluded_scanning_sequences]
    if "IR" in excluded:
        return None, "inversion recovery (STIR/FLAIR): ScanningSequence IR"
    inversion_time = _number(ds, "InversionTime")
    if rules.exclude_inversion_time and inversion_time is not None and inversion_time > 0:
        return None, f"inversion recovery (STIR/FLAIR): InversionTime {inversion_time:g} ms"
    if excluded:
        return None, f"excluded ScanningSequence {'/'.join(excluded)}"
    if rules.require_spin_echo and scanning and "SE" not in scanning:
        return None, f"not a spin-echo sequence (ScanningSequence {'/'.join(scanning)})"
    prepared = [v for v in variants if v in rules.excluded_sequence_variants]
    if prepared:
        return None, f"excluded SequenceVariant {'/'.join(prepared)}"
    if rules.exclude_fat_saturated and "FS" in options:
        return None, "fat-saturated (ScanOptions FS)"
    if rules.exclude_contrast and str(ds.get("ContrastBolusAgent", "") or "").strip():
        return None, "contrast-enhanced (ContrastBolusAgent present)"
    tr, te = _number(ds, "RepetitionTime"), _number(ds, "EchoTime")
    if tr is None or te is None or tr <= 0 or te <= 0:
        return None, "RepetitionTime/EchoTime missing"
    if tr <= rules.t1_max_tr_ms and te <= rules.t1_max_te_ms:
        return "T1", ""
    if tr >= rules.t2_min_tr_ms and te >= rules.t2_min_te_ms:
        return "T2", ""
    if tr >= rules.t2_min_tr_ms and te <= rules.t1_max_te_ms:
        return None, f"proton-density weighted (TR {tr:g} ms, TE {te:g} ms)"
    return None, f"neither T1- nor T2-weighted (TR {tr:g} ms, TE {te:g} ms)"


def description_score(description: str, sequence: SequenceName, rules: SelectionRules) -> int:
    """Tie-breaking score of a series description for a header-determined sequence."""
    patterns = rules.descriptions
    score = 0
    own, other = (patterns.t1, patterns.t2) if sequence == "T1" else (patterns.t2, patterns.t1)
    if _matches(own, description):
        score += 2
    elif _matches(other, description):
        score -= 2
    if _matches(patterns.sagittal, description):
        score += 1
    score -= sum(1 for pattern in patterns.unwanted if re.search(pattern, description, re.I))
    return score


def _examine(
    series: list[Dataset], rules: SelectionRules
) -> SeriesCandidate | SkippedSeries:
    first = series[0]
    series_uid = str(first.get("SeriesInstanceUID"))
    number = _int_or_none(first.get("SeriesNumber"))
    description = str(first.get("SeriesDescription", "") or "")

    def skip(reason: str) -> SkippedSeries:
        return SkippedSeries(series_uid, number, description, len(series), reason)

    modality = str(first.get("Modality", "") or "")
    if modality != "MR":
        return skip(f"modality {modality or 'missing'}, not MR")
    sop_classes = {str(ds.get("SOPClassUID", "")) for ds in series}
    if ENHANCED_MR_STORAGE in sop_classes:
        return skip("multi-frame Enhanced MR images are not supported")
    if sop_classes != {MRImageStorage}:
        return skip("not MR Image Storage: " + ", ".join(sorted(sop_classes)))
    image_types = [_multi(ds, "ImageType") for ds in series]
    if any("LOCALIZER" in image_type for image_type in image_types):
        return skip("localizer")
    if rules.exclude_derived and any(
        image_type[:1] == ("DERIVED",) or image_type[1:2] == ("SECONDARY",)
        for image_type in image_types
    ):
        return skip("derived or secondary images (ImageType)")
    if any(int(ds.get("NumberOfFrames", 1) or 1) != 1 for ds in series):
        return skip("multi-frame images are not supported")

    try:
        row, col, normal = orientation_of(first)
        for ds in series[1:]:
            other_row, other_col, _ = orientation_of(ds)
            if np.abs(other_row - row).max() > 1e-3 or np.abs(other_col - col).max() > 1e-3:
                return skip("instances with different orientations (multi-plane series)")
    except VolumeError as exc:
        return skip(str(exc))
    obliquity = math.degrees(math.acos(min(1.0, abs(float(normal[0])))))
    if obliquity > rules.max_obliquity_deg:
        return skip(
            f"not sagittal ({plane_of(normal)} plane, {obliquity:.0f} degrees from sagittal)"
        )

    weightings = {classify_weighting(ds, rules) for ds in series}
    if len(weightings) != 1:
        kinds = sorted(sequence or reason.split(" (")[0] for sequence, reason in weightings)
        return skip("instances with different contrast (mixed series: " + ", ".join(kinds) + ")")
    sequence, reason = weightings.pop()
    if sequence is None:
        return skip(reason)

    if len(series) < rules.min_slices:
        return skip(f"too few slices ({len(series)} < {rules.min_slices})")
    if len(series) > rules.max_slices:
        return skip(f"too many slices ({len(series)} > {rules.max_slices})")
    sizes = {(_int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))) for ds in series}
    if len(sizes) != 1:
        return skip("instances with different Rows/Columns")
    rows, columns = sizes.pop()
    if not rows or not columns:
        return skip("Rows/Columns missing")
    spacing_value = first.get("PixelSpacing")
    try:
        pixel_spacing = (float(spacing_value[0]), float(spacing_value[1]))
    except (TypeError, ValueError, IndexError):
        return skip("PixelSpacing missing")
    paths = tuple(str(ds.filename) for ds in series if isinstance(ds.filename, (str, Path)))
    if len(paths) != len(series):
        return skip("instances without a file path")
    return SeriesCandidate(
        series_instance_uid=series_uid,
        series_number=number,
        description=description,
        sequence=sequence,
        paths=paths,
        n_instances=len(series),
        rows=rows,
        columns=columns,
        pixel_spacing=pixel_spacing,
        repetition_time=float(_number(first, "RepetitionTime") or 0.0),
        echo_time=float(_number(first, "EchoTime") or 0.0),
        manufacturer=str(first.get("Manufacturer", "") or ""),
        description_score=description_score(description, sequence, rules),
    )


def _rank_key(candidate: SeriesCandidate, rules: SelectionRules) -> tuple[float, ...]:
    low, high = rules.preferred_slices
    routine = 1.0 if low <= candidate.n_instances <= high else 0.0
    resolution = -max(candidate.pixel_spacing)
    number = candidate.series_number if candidate.series_number is not None else -1
    latest = float(number) if rules.prefer_latest else -float(number)
    return (float(candidate.description_score), routine, resolution, latest)


def select_series(
    headers: Iterable[Dataset],
    rules: SelectionRules | None = None,
    *,
    unreadable_files: int = 0,
) -> SelectionResult:
    """Pick the sagittal T1 and T2 series from the headers of one study.

    ``headers`` are datasets as read by :func:`read_headers` (pixel data not needed); their
    ``filename`` becomes the candidate's paths. When several series qualify for a sequence,
    the best by description tie-breaker, routine slice count, in-plane resolution and
    series number is chosen; the others stay available as ranked fall-backs and are reported
    as skipped.
    """
    rules = rules or SelectionRules()
    by_series: dict[str, list[Dataset]] = {}
    orphans = 0
    for ds in headers:
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            orphans += 1
            continue
        by_series.setdefault(str(uid), []).append(ds)

    skipped: list[SkippedSeries] = []
    ranked: dict[SequenceName, list[SeriesCandidate]] = {"T1": [], "T2": []}
    for series in by_series.values():
        try:
            outcome = _examine(series, rules)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            first = series[0]
            outcome = SkippedSeries(
                str(first.get("SeriesInstanceUID")),
                None,
                "",
                len(series),
                f"unreadable header values ({type(exc).__name__})",
            )
        if isinstance(outcome, SkippedSeries):
            skipped.append(outcome)
        else:
            ranked[outcome.sequence].append(outcome)
    for sequence in SEQUENCES:
        ranked[sequence].sort(key=lambda c: _rank_key(c, rules), reverse=True)
        chosen = ranked[sequence][0] if ranked[sequence] else None
        for other in ranked[sequence][1:]:
            assert chosen is not None
            skipped.append(
                SkippedSeries(
                    other.series_instance_uid,
                    other.series_number,
                    other.description,
                    other.n_instances,
                    f"another {sequence} series ranked higher ({chosen.label})",
                )
            )
    skipped.sort(key=lambda s: (s.series_number if s.series_number is not None else -1))
    for entry in skipped:
        log.info("series %s skipped: %s", entry.label, entry.reason)
    if orphans:
        log.info("%d instance(s) without SeriesInstanceUID ignored", orphans)
    result = SelectionResult(
        t1=ranked["T1"][0] if ranked["T1"] else None,
        t2=ranked["T2"][0] if ranked["T2"] else None,
        candidates_t1=tuple(ranked["T1"]),
        candidates_t2=tuple(ranked["T2"]),
        skipped=tuple(skipped),
        unreadable_files=unreadable_files + orphans,
    )
    for sequence, chosen in (("T1", result.t1), ("T2", result.t2)):
        if chosen is not None:
            log.info("series %s selected as sagittal %s", chosen.label, sequence)
    return result
