"""Every coded concept the result objects use, in one place, with the code list it comes from.

Code lists (context groups, CID) are those of DICOM PS3.16; values were checked against the
DICOM content mapping resource shipped with pydicom (``pydicom.sr.codedict``). Concepts that no
standard terminology offers (the VBQ score, the numeric flag, the per-sequence classifier
methods) use the private coding scheme :data:`SCHEME_DESIGNATOR`, which every SR that uses it
declares in its Coding Scheme Identification Sequence (PS3.3 C.12.1.1.4).
"""

from __future__ import annotations

from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

# -- private coding scheme -----------------------------------------------------------------------

SCHEME_DESIGNATOR: Final[str] = "99OPMRI"
"""Private coding scheme designator (PS3.16 section 8.2: private schemes start with ``99``)."""
SCHEME_NAME: Final[str] = "opmri-node osteoporosis screening codes"
SCHEME_ORGANIZATION: Final[str] = "opmri-node project"


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """An item of the Coding Scheme Identification Sequence declaring :data:`SCHEME_DESIGNATOR`."""
    return CodingSchemeIdentificationItem(
        designator=SCHEME_DESIGNATOR,
        name=SCHEME_NAME,
        responsible_organization=SCHEME_ORGANIZATION,
    )


# -- segmentation (SEG Segment Sequence) ----------------------------------------------------------

ANATOMICAL_STRUCTURE: Final[Code] = Code("91723000", "SCT", "Anatomical Structure")
"""Segmented Property Category, CID 7150 Segmentation Property Categories."""

VERTEBRA_OF_LEVEL: Final[dict[str, Code]] = {
    "L1": Code("66794005", "SCT", "L1 vertebra"),
    "L2": Code("14293000", "SCT", "L2 vertebra"),
    "L3": Code("36470004", "SCT", "L3 vertebra"),
    "L4": Code("11994002", "SCT", "L4 vertebra"),
    "L5": Code("49668003", "SCT", "L5 vertebra"),
}
"""Segmented Property Type per lumbar level, CID 7151 Segmentation Property Types (the same
codes serve as finding sites in the SR, CID 7151 / CID 4 Anatomic Region)."""

LUMBAR_SPINE: Final[Code] = Code("122496007", "SCT", "Lumbar spine")
"""Anatomic region of every segment and finding site of the patient-level finding
(CID 4031 Common Anatomic Regions)."""

ARTIFICIAL_INTELLIGENCE: Final[Code] = Code("123110", "DCM", "Artificial Intelligence")
"""Algorithm family, CID 7162 Surface Processing Algorithm Families (used by SEG and TID 4019)."""

# -- measurement report (TID 1500) ---------------------------------------------------------------

PROCEDURE_REPORTED: Final[Code] = Code("25056-3", "LN", "MRI unspecified body region")
"""Procedure Reported, CID 100 Quantitative Diagnostic Imaging Procedures (LOINC)."""

OSTEOPOROSIS: Final[Code] = Code("64859006", "SCT", "Osteoporosis")
"""SNOMED CT 64859006 |Osteoporosis (disorder)|: the finding of every measurement group and the
concept name of the qualitative evaluation."""

PRESENT: Final[Code] = Code("52101004", "SCT", "Present")
ABSENT: Final[Code] = Code("272519000", "SCT", "Absent")
"""Values of the qualitative evaluation, CID 240 Present-Absent."""

PROBABILITY: Final[Code] = Code("122157", "DCM", "Probability")
"""Concept name of every probability measurement (DCM 122157)."""

COMMENT: Final[Code] = Code("121106", "DCM", "Comment")
"""Concept name of the free-text notice (research use, synthetic demo models)."""

DEVICE: Final[Code] = Code("121007", "DCM", "Device")
"""Observer Type of the device observer context, CID 270 Observer Type."""

PROCESSING_EQUIPMENT: Final[Code] = Code("109102", "DCM", "Processing Equipment")
"""Purpose of Reference of Contributing Equipment items, CID 7005 Contributing Equipment
Purposes of Reference (IHE AI Results: the AI models that made the result)."""

# -- units (UCUM, CID 7181 Abstract Multi-dimensional Image Model Component Units) ---------------

UNIT_NONE: Final[Code] = Code("1", "UCUM", "no units")
"""Unit of probabilities and of the numeric flag."""
UNIT_RATIO: Final[Code] = Code("{ratio}", "UCUM", "ratio")
"""Unit of the VBQ score (a ratio of two signal intensities)."""

# -- private concepts ----------------------------------------------------------------------------

VBQ_SCORE: Final[Code] = Code("VBQ", SCHEME_DESIGNATOR, "Vertebral bone quality score")
"""Median L1-L4 trabecular T1 signal divided by the CSF signal (Ehresman et al. 2020)."""

OSTEOPOROSIS_FLAG: Final[Code] = Code(
    "OPFLAG", SCHEME_DESIGNATOR, "Osteoporosis flag (1 present, 0 absent)"
)
"""The patient-level verdict as a number, for viewers that show numbers but not codes."""

METHOD_OF_SEQUENCE: Final[dict[str, Code]] = {
    "T1": Code("CNN-T1", SCHEME_DESIGNATOR, "CNN on sagittal T1-weighted MR"),
    "T2": Code("CNN-T2", SCHEME_DESIGNATOR, "CNN on sagittal T2-weighted MR"),
}
"""Measurement method of the per-sequence probabilities."""

METHOD_FUSED: Final[Code] = Code(
    "CNN-FUSED", SCHEME_DESIGNATOR, "Fusion of the per-sequence CNN probabilities"
)
"""Measurement method of the fused patient probability."""

PRIVATE_CODES: Final[tuple[Code, ...]] = (
    VBQ_SCORE,
    OSTEOPOROSIS_FLAG,
    *METHOD_OF_SEQUENCE.values(),
    METHOD_FUSED,
)
