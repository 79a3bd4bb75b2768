"""Identity of the result objects: deterministic UIDs and the patient/study attributes they copy.

Every result object belongs to the source study (same patient, same Study Instance UID) and
lives in a new series of its own. Its UIDs are derived from the source Study Instance UID and
the identity (name, version, weights hash) of the models that produced it, so analysing the
same study again with the same models gives the same UIDs: a PACS replaces the earlier objects
instead of showing two copies. New models give new UIDs, so their results stand beside the old.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from highdicom.enum import SpecificCharacterSetValues
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pipeline.result import ModelInfo

PATIENT_KEYWORDS: Final[tuple[str, ...]] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)
"""Patient Module (PS3.3 C.7.1.1) attributes copied from the source."""

STUDY_KEYWORDS: Final[tuple[str, ...]] = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
"""General Study and Patient Study Module (PS3.3 C.7.2.1, C.7.2.2) attributes copied from the
source. A PACS may take a study's description from whichever instance it receives first, so
every result object carries the source's values."""

COPIED_KEYWORDS: Final[tuple[str, ...]] = PATIENT_KEYWORDS + STUDY_KEYWORDS

SERIES_NUMBERS: Final[dict[str, int]] = {"SEG-T1": 9901, "SEG-T2": 9902, "SR": 9910, "SC": 9920}
"""Series Number of each result series (high, so the results sort after the source series)."""


UTF8: Final[str] = "ISO_IR 192"
_KNOWN_CHARACTER_SETS: Final[frozenset[str]] = frozenset(
    member.value for member in SpecificCharacterSetValues
)


def character_set(source: Dataset) -> str | list[str] | None:
    """The Specific Character Set for objects that copy text from ``source``.

    The source's own value when it is a defined term (so names are encoded as in the source),
    UTF-8 (``ISO_IR 192``, which encodes every character) when the source's value is not one,
    and ``None`` (default repertoire) when the source has none. An empty first value of a
    multi-valued set (code extensions on the default repertoire) is written as its defined
    term ``ISO 2022 IR 6``.
    """
    value = source.get("SpecificCharacterSet")
    if value is None or value == "":
        return None
    values = [str(v).strip() for v in value] if isinstance(value, MultiValue | list) else [
        str(value).strip()
    ]
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    if all(v in _KNOWN_CHARACTER_SETS for v in values):
        return values if len(values) > 1 else values[0]
    return UTF8


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the patient and study attributes of ``source`` into ``target``.

    Attributes absent from the source are left as the target has them (highdicom fills the
    type 2 ones with empty values). ``target`` must have been built with
    :func:`character_set` of ``source``, so the copied text can be encoded.
    """
    for keyword in COPIED_KEYWORDS:
        if keyword in source:
            element = source[keyword]
            target[element.tag] = element.__class__(element.tag, element.VR, element.value)


def models_key(models: Iterable[ModelInfo]) -> str:
    """A canonical text naming the models of a result (order-independent)."""
    parts = sorted(f"{m.name}|{m.version}|{m.weights_sha256}" for m in models)
    return ";".join(parts)


UID_NAMESPACE: Final[uuid.UUID] = uuid.uuid5(uuid.NAMESPACE_URL, "urn:opmri-node:result-uids")
"""Namespace of the name-based UUIDs behind the derived UIDs."""


def derived_uid(*parts: str) -> str:
    """A UID derived from ``parts``: the same parts always give the same UID.

    It is the ``2.25`` form (PS3.5 B.2) of a name-based (SHA-1, version 5) UUID of the parts.
    """
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


@dataclass(frozen=True)
class ResultIdentity:
    """UIDs of the result objects of one study analysed with one set of models."""

    study_instance_uid: str
    models: str
    """:func:`models_key` of the models that produced the result."""

    @classmethod
    def for_result(cls, study_instance_uid: str, models: Sequence[ModelInfo]) -> ResultIdentity:
        if not study_instance_uid:
            raise ValueError('Argument "study_instance_uid" must not be empty')
        return cls(study_instance_uid, models_key(models))

    def uid(self, role: str, *qualifiers: str) -> str:
        """The UID of one role (``"sr-instance"``, ``"seg-series"`` ...) in this result."""
        return derived_uid(self.study_instance_uid, self.models, role, *qualifiers)

    def seg_series_uid(self, source_series_uid: str) -> str:
        return self.uid("seg-series", source_series_uid)

    def seg_instance_uid(self, source_series_uid: str) -> str:
        return self.uid("seg-instance", source_series_uid)

    def tracking_uid(self, source_series_uid: str, name: str) -> str:
        """Tracking UID of a segment or measurement group (shared by SEG and SR)."""
        return self.uid("tracking", source_series_uid, name)

    @property
    def sr_series_uid(self) -> str:
        return self.uid("sr-series")

    @property
    def sr_instance_uid(self) -> str:
        return self.uid("sr-instance")

    @property
    def sc_series_uid(self) -> str:
        return self.uid("sc-series")

    @property
    def sc_instance_uid(self) -> str:
        return self.uid("sc-instance")

    @property
    def device_uid(self) -> str:
        """Device UID of the node's analysis (observer context of the SR)."""
        return derived_uid("device", self.models)


def model_device_uid(model: ModelInfo) -> str:
    """Device UID of one model (Contributing Equipment, IHE AI Results)."""
    return derived_uid("model", model.name, model.version, model.weights_sha256)
