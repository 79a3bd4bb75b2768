"""Label values shared by the synthetic cohort's masks, the segmenter and every consumer.

Label maps hold one integer per voxel:

====  ==================================================
0     background
1..7  vertebral bodies T12, L1, L2, L3, L4, L5, S1 (in anatomical order, cranial to caudal)
8     cerebrospinal fluid in the spinal canal (the VBQ score's reference signal)
====  ==================================================

Array convention for volumes and label maps in memory: ``array[k, j, i]`` where ``k`` is the
slice index sorted by ascending position along the slice normal ``n = row_cosines x
column_cosines`` (from ImageOrientationPatient), ``j`` the row and ``i`` the column of the DICOM
pixel matrix. On disk (NIfTI) the same data are stored with axes ``(i, j, k)`` and an affine in
RAS+ world coordinates derived from the DICOM (LPS+) geometry, the convention of dcm2niix.
"""

from __future__ import annotations

from typing import Final

VERTEBRAE: Final[tuple[str, ...]] = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
LABEL_OF: Final[dict[str, int]] = {name: index + 1 for index, name in enumerate(VERTEBRAE)}
NAME_OF: Final[dict[int, str]] = {value: name for name, value in LABEL_OF.items()}
CSF_LABEL: Final[int] = 8
NUM_CLASSES: Final[int] = 9  # background + 7 vertebral bodies + CSF

LUMBAR_LEVELS: Final[tuple[str, ...]] = ("L1", "L2", "L3", "L4", "L5")
"""Levels the node reports (one SEG segment and one SR group each)."""

SCORED_LEVELS: Final[tuple[str, ...]] = ("L1", "L2", "L3", "L4")
"""Levels whose values form the patient-level score (DXA's L1-L4; also the VBQ's)."""
