"""Settings of the analysis pipeline (the ``pipeline:`` section of the node's YAML config).

Every model here forbids unknown keys, so a typo in the config is an error rather than a
silently ignored setting. Defaults are the values the pipeline is designed and benchmarked with.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.labels import CSF_LABEL, LUMBAR_LEVELS, SCORED_LEVELS

PAPER_ARCHITECTURES: tuple[str, ...] = ("efficientnet_b4", "resnet50", "inception_resnet_v2")
"""Classifier architectures compared in the reference paper (EfficientNet-b4 performed best)."""


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
    return patterns


class DescriptionPatterns(_Settings):
    """Series-description regular expressions (case-insensitive), used only to break ties.

    Header fields decide whether a series is usable and which sequence it is; descriptions are
    free text and only rank otherwise equal candidates. The defaults cover the naming styles
    of the major vendors, e.g. Siemens ``t1_tse_sag`` / ``t2_tirm_sag``, GE ``SAG T1 FSE`` /
    ``Sag T2 FRFSE``, Philips ``T1W_TSE_SAG`` / ``sT2W_TSE``, Canon ``Sag T2 FSE`` and
    Fujifilm/Hitachi ``T1WI_SAG``.
    """

    sagittal: tuple[str, ...] = (r"sag",)
    t1: tuple[str, ...] = (r"(?<![0-9])t1(?![0-9])",)
    t2: tuple[str, ...] = (r"(?<![0-9])t2(?![0-9*])",)
    unwanted: tuple[str, ...] = (
        r"stir",
        r"tirm",
        r"flair",
        r"(?<![a-z])ir(?![a-z])",
        r"loc",
        r"scout",
        r"survey",
        r"dixon",
        r"fat.?sat",
        r"(?<![a-z])fs(?![a-z])",
        r"spair",
        r"spir",
        r"post",
        r"(?<![a-z])gd(?![a-z])",
        r"\+c",
        r"contrast",
        r"mpr",
        r"reform",
        r"(?<![a-z])(ax|tra|axial|cor|coronal)(?![a-z])",
    )

    check_patterns = field_validator("sagittal", "t1", "t2", "unwanted")(_check_patterns)


class SelectionRules(_Settings):
    """Header rules that pick the sagittal T1- and T2-weighted series of a lumbar study."""

    max_obliquity_deg: float = Field(default=30.0, ge=0.0, le=60.0)
    """Largest angle between the slice normal and the patient's left-right axis."""
    t1_max_tr_ms: float = Field(default=1000.0, gt=0)
    t1_max_te_ms: float = Field(default=30.0, gt=0)
    t2_min_tr_ms: float = Field(default=1800.0, gt=0)
    t2_min_te_ms: float = Field(default=60.0, gt=0)
    require_spin_echo: bool = True
    """Require ``SE`` in ScanningSequence (fast/turbo spin echo is ``SE`` too)."""
    excluded_scanning_sequences: tuple[str, ...] = ("IR", "EP")
    """Inversion recovery (STIR, FLAIR) and echo planar (diffusion) sequences."""
    excluded_sequence_variants: tuple[str, ...] = ("MP",)
    """Magnetisation-prepared sequences (inversion-prepared gradient echo and the like)."""
    exclude_inversion_time: bool = True
    """Exclude any series with a positive InversionTime (STIR, TIRM, FLAIR, T1-FLAIR)."""
    exclude_fat_saturated: bool = True
    """Exclude fat-saturated series (``FS`` in ScanOptions): the classifiers read marrow fat."""
    exclude_contrast: bool = True
    """Exclude contrast-enhanced series (ContrastBolusAgent present)."""
    exclude_derived: bool = True
    """Exclude DERIVED or SECONDARY images (reformats, Dixon maps, screenshots)."""
    min_slices: int = Field(default=5, ge=1)
    max_slices: int = Field(default=80, ge=1)
    preferred_slices: tuple[int, int] = (11, 24)
    """Slice counts of a routine sagittal lumbar series; candidates inside rank higher."""
    prefer_latest: bool = True
    """Among equal candidates prefer the higher SeriesNumber (a repeat after motion)."""
    descriptions: DescriptionPatterns = DescriptionPatterns()

    @model_validator(mode="after")
    def _check_ranges(self) -> SelectionRules:
        if self.min_slices > self.max_slices:
            raise ValueError("min_slices must not exceed max_slices")
        if self.t1_max_tr_ms >= self.t2_min_tr_ms:
            raise ValueError("t1_max_tr_ms must be below t2_min_tr_ms")
        low, high = self.preferred_slices
        if low > high:
            raise ValueError("preferred_slices must be (low, high) with low <= high")
        return self


class SegmentationSettings(_Settings):
    """Inference and post-processing of the vertebral-body segmenter."""

    batch_size: int = Field(default=8, ge=1)
    min_body_ml: float = Field(default=1.0, gt=0)
    """Connected components smaller than this (in millilitres) are not vertebral bodies."""
    split_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    """A component whose second most frequent label holds at least this fraction of its voxels
    is split into one body per label (two bodies that touch through a missed disc)."""
    min_csf_ml: float = Field(default=0.05, ge=0)


class ClassifierSettings(_Settings):
    """Per-sequence osteoporosis classifiers and how their outputs become a patient verdict."""

    architecture: str = "efficientnet_b4"
    """timm architecture the classifiers in ``models_dir`` must have; the paper compared
    ``efficientnet_b4`` (default), ``resnet50`` and ``inception_resnet_v2``."""
    aggregation: Literal["mean", "median", "max"] = "mean"
    patient_levels: tuple[str, ...] = SCORED_LEVELS
    """Levels whose probabilities form the patient probability of a sequence."""
    min_levels: int = Field(default=2, ge=1)
    """A sequence with fewer found patient levels gives no patient probability."""
    fusion: Literal["mean", "max"] = "mean"
    """How the T1 and T2 patient probabilities are fused."""
    batch_size: int = Field(default=16, ge=1)

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value in PAPER_ARCHITECTURES:
            return value
        import timm

        if not timm.is_model(value):
            raise ValueError(
                f"unknown timm architecture {value!r}; the paper's are "
                + ", ".join(PAPER_ARCHITECTURES)
            )
        return value

    @field_validator("patient_levels")
    @classmethod
    def _lumbar_levels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [level for level in value if level not in LUMBAR_LEVELS]
        if unknown or not value:
            raise ValueError(f"patient_levels must be a non-empty subset of {LUMBAR_LEVELS}")
        if len(set(value)) != len(value):
            raise ValueError("patient_levels must not repeat a level")
        return value


class VBQSettings(_Settings):
    """Vertebral Bone Quality score (Ehresman 2020) from the T1 series."""

    levels: tuple[str, ...] = SCORED_LEVELS
    csf_levels: tuple[str, ...] = ("L3", "L2")
    """Levels whose CSF is the reference, first one that has CSF wins (L2 when L3 is stenotic)."""
    erosion_mm: float = Field(default=2.0, ge=0)
    """In-plane erosion of the body mask: the trabecular ROI excludes cortex and endplates."""
    csf_label: int = CSF_LABEL

    @field_validator("levels", "csf_levels")
    @classmethod
    def _lumbar_levels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(level not in LUMBAR_LEVELS for level in value):
            raise ValueError(f"levels must be a non-empty subset of {LUMBAR_LEVELS}")
        return value


class PipelineSettings(BaseModel):
    """Validated ``pipeline:`` settings. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    models_dir: Path = Path("models")
    half_precision: bool = True
    """Run the networks in float16 autocast on CUDA (CPU always runs float32)."""
    num_threads: int | None = Field(default=None, ge=1)
    """CPU threads for inference; default: the CPUs this process may run on."""
    require_both_sequences: bool = False
    """Without it a study with only a T1 or only a T2 series is analysed from that sequence."""
    selection: SelectionRules = SelectionRules()
    segmentation: SegmentationSettings = SegmentationSettings()
    classifier: ClassifierSettings = ClassifierSettings()
    vbq: VBQSettings = VBQSettings()
