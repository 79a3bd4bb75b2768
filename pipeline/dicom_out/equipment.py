"""Who made the result objects: the node as equipment and its models as contributing equipment.

Each result object names the node (Manufacturer, Manufacturer's Model Name, Software Versions)
and, following IHE AI Results (AIR), lists every model that contributed in its Contributing
Equipment Sequence: model name, model version and a Device UID derived from the model's
identity, with Purpose of Reference *Processing Equipment* (DCM 109102).
"""

from __future__ import annotations

from typing import Final

import highdicom as hd

from pipeline.dicom_out import codes
from pipeline.dicom_out.identity import ResultIdentity, model_device_uid
from pipeline.result import ModelInfo, StudyResult

MANUFACTURER: Final[str] = "opmri-node"
MODEL_NAME: Final[str] = "opmri-node osteoporosis screening"


def software_versions(result: StudyResult) -> str:
    """Software Versions of the node (the pipeline version; at most 64 characters)."""
    return result.pipeline_version[:64]


def device_serial_number(identity: ResultIdentity) -> str:
    """A Device Serial Number that names the model set (the node has no hardware serial)."""
    return identity.device_uid.removeprefix("2.25.")[:16]


def _model_item(model: ModelInfo) -> hd.ContributingEquipment:
    description = f"{model.task} model {model.name}"
    if model.sequence:
        description += f" (sagittal {model.sequence})"
    if model.synthetic:
        description += "; trained on synthetic data only"
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        contribution_description=description[:64],
    )
    item.DeviceUID = model_device_uid(model)
    return item


def contributing_equipment(result: StudyResult) -> list[hd.ContributingEquipment]:
    """One Contributing Equipment item per model that produced ``result``."""
    return [_model_item(model) for model in result.models]
