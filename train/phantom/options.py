"""Generation options of the synthetic cohort (:class:`CohortOptions`) and their vocabularies."""

from __future__ import annotations

from typing import Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

PHANTOM_VERSION: Final[str] = "1.0"
"""Version of the phantom's models; recorded in ``cohort.json``. Any change that alters pixel
data, labels or UIDs for a given seed bumps it."""

VendorName = Literal["siemens", "ge", "philips", "canon"]
SeriesKind = Literal["localizer", "t1", "t2", "stir", "axial_t2"]
TransferSyntaxName = Literal[
    "explicit-le", "implicit-le", "deflated-le", "explicit-be", "rle", "jpeg-ls", "jpeg2000"
]

VENDORS: Final[tuple[VendorName, ...]] = get_args(VendorName)
SERIES_KINDS: Final[tuple[SeriesKind, ...]] = get_args(SeriesKind)
"""Series of a study in acquisition order."""
SAGITTAL_KINDS: Final[tuple[SeriesKind, ...]] = ("t1", "t2", "stir")
"""Series with ground-truth label maps."""
FIELD_STRENGTHS: Final[tuple[float, ...]] = (1.5, 3.0)
MATRICES: Final[tuple[int, ...]] = (320, 512)

TRANSFER_SYNTAXES: Final[dict[TransferSyntaxName, UID]] = {
    "explicit-le": ExplicitVRLittleEndian,
    "implicit-le": ImplicitVRLittleEndian,
    "deflated-le": DeflatedExplicitVRLittleEndian,
    "explicit-be": ExplicitVRBigEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
"""Transfer syntaxes the writer offers, by command-line name (all lossless)."""


class CohortOptions(BaseModel):
    """What to generate. Patients are drawn independently: patient ``index`` of a cohort depends
    only on ``seed``, ``index`` and the options that shape a patient (prevalence, vendors,
    field strengths, matrices, female fraction), never on ``n_patients`` — a larger cohort
    extends a smaller one with the same seed. ``series`` and ``transfer_syntax`` do not change
    the simulated pixel values of the series that are written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_patients: int = Field(100, ge=1, le=100_000)
    seed: int = Field(0, ge=0, lt=2**63)
    prevalence: float = Field(0.35, ge=0.05, le=0.9)
    """Target fraction of patients whose DXA T-score is -2.5 or lower."""
    vendors: tuple[VendorName, ...] = VENDORS
    """Vendor header styles to draw from (uniformly)."""
    field_strengths: tuple[float, ...] = FIELD_STRENGTHS
    """Field strengths in tesla to draw from: 1.5 (60 % when both) and/or 3.0."""
    matrix: tuple[int, ...] = (320,)
    """Acquisition matrices of the sagittal and axial series, drawn per study: 320 and/or 512."""
    transfer_syntax: TransferSyntaxName = "explicit-le"
    series: tuple[SeriesKind, ...] = SERIES_KINDS
    """Series to simulate and write (acquisition order is kept whatever the order given)."""
    female_fraction: float = Field(0.75, ge=0.0, le=1.0)

    @field_validator("vendors")
    @classmethod
    def _vendors(cls, value: tuple[VendorName, ...]) -> tuple[VendorName, ...]:
        if not value:
            raise ValueError("at least one vendor is required")
        return tuple(dict.fromkeys(value))

    @field_validator("field_strengths")
    @classmethod
    def _fields(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("at least one field strength is required")
        bad = [v for v in value if v not in FIELD_STRENGTHS]
        if bad:
            raise ValueError(f"field strengths must be among {FIELD_STRENGTHS} tesla, got {bad}")
        return tuple(sorted(set(value)))

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("at least one matrix size is required")
        bad = [v for v in value if v not in MATRICES]
        if bad:
            raise ValueError(f"matrix must be among {MATRICES}, got {bad}")
        return tuple(sorted(set(value)))

    @field_validator("series")
    @classmethod
    def _series(cls, value: tuple[SeriesKind, ...]) -> tuple[SeriesKind, ...]:
        if not value:
            raise ValueError("at least one series is required")
        return tuple(kind for kind in SERIES_KINDS if kind in value)

    @property
    def transfer_syntax_uid(self) -> UID:
        return TRANSFER_SYNTAXES[self.transfer_syntax]
