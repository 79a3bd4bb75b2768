"""Public vertebra-segmentation datasets of sagittal lumbar MRI (images + label masks).

Layout (the one of the SPIDER dataset, van der Graaf et al., Sci Data 2024, as distributed)::

    DATASET/
        dataset.yaml            optional: label mapping and options (see below)
        images/<case>_t1.mha    sagittal T1 image
        images/<case>_t2.mha    sagittal T2 image
        masks/<case>_t1.mha     its label mask, same grid
        masks/<case>_t2.mha

Images and masks may be MetaImage (``.mha``/``.mhd``), NIfTI (``.nii``/``.nii.gz``) or NRRD
(``.nrrd``); anything SimpleITK reads. Files whose name does not end in ``_t1`` or ``_t2``
(e.g. SPIDER's ``_t2_SPACE`` series) are ignored. Each image is reoriented to the pipeline's
sagittal convention (``k`` left-right slices, rows ``j`` running feet-ward, columns ``i``
running posterior), so a network trained on it sees the anatomy as the node's DICOM series
present it.

``dataset.yaml``::

    labels: spider            # preset name, or a mapping {mask value: name}
    body_from_canal: true     # cut posterior elements off at the spinal canal

Names are ``T12``, ``L1`` ... ``L5``, ``S1``, ``CSF`` or ``ignore``; values not named become
background. The ``spider`` preset reads SPIDER's convention: vertebrae numbered from the
bottom (1 = L5, 2 = L4, ... 6 = T12), 100 = spinal canal, 101-125 partially visible vertebrae
and 201-225 discs (both background here). SPIDER's vertebra masks cover the whole vertebra;
with ``body_from_canal`` (the preset's default) every voxel of a vertebra behind the anterior
wall of the spinal canal is dropped, slice by slice, leaving the vertebral body that this
project segments. The ``opmri`` preset (default without a ``dataset.yaml``) takes the values of
:mod:`pipeline.labels` as they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from pipeline.labels import CSF_LABEL, LABEL_OF, NAME_OF
from pipeline.volume import Geometry
from train.datasets import PatientSample, SequenceName, SeriesSample

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: Final[tuple[str, ...]] = (".mha", ".mhd", ".nii.gz", ".nii", ".nrrd")
_NAME_RE: Final = re.compile(r"^(?P<case>.+)_(?P<seq>t1|t2)$", re.IGNORECASE)
TARGET_NAMES: Final[tuple[str, ...]] = (*LABEL_OF, "CSF", "ignore")

SPIDER_LABELS: Final[dict[int, str]] = {
    1: "L5",
    2: "L4",
    3: "L3",
    4: "L2",
    5: "L1",
    6: "T12",
    100: "CSF",
}
OPMRI_LABELS: Final[dict[int, str]] = {**NAME_OF, CSF_LABEL: "CSF"}
PRESETS: Final[dict[str, dict[int, str]]] = {"spider": SPIDER_LABELS, "opmri": OPMRI_LABELS}
CANAL_NAME: Final[str] = "CSF"


class PublicDatasetError(ValueError):
    """The folder does not follow the layout; the message says what is wrong."""


class LayoutOptions(BaseModel):
    """``dataset.yaml`` of a public dataset folder (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: str | dict[int, str] = "opmri"
    body_from_canal: bool | None = None
    """Default: on for the ``spider`` preset, off otherwise."""

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: str | dict[int, str]) -> str | dict[int, str]:
        if isinstance(value, str):
            if value not in PRESETS:
                raise ValueError(f"unknown preset {value!r}; use {', '.join(PRESETS)} or a mapping")
            return value
        bad = [name for name in value.values() if name not in TARGET_NAMES]
        if bad:
            raise ValueError(f"unknown names {bad}; use {', '.join(TARGET_NAMES)}")
        return value

    @property
    def mapping(self) -> dict[int, str]:
        return dict(PRESETS[self.labels]) if isinstance(self.labels, str) else dict(self.labels)

    @property
    def cut_at_canal(self) -> bool:
        if self.body_from_canal is not None:
            return self.body_from_canal
        return self.labels == "spider"


@dataclass(frozen=True)
class PublicCase:
    """The files of one case: image and mask per sequence."""

    case: str
    images: Mapping[SequenceName, Path]
    masks: Mapping[SequenceName, Path]


def _stem(path: Path) -> str | None:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def read_layout_options(root: Path) -> LayoutOptions:
    """The folder's ``dataset.yaml`` (defaults when absent)."""
    path = root / "dataset.yaml"
    if not path.is_file():
        return LayoutOptions()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PublicDatasetError(f"{path}: not readable YAML ({exc})") from exc
    try:
        return LayoutOptions.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(p) for p in error["loc"]) + f": {error['msg']}" for error in exc.errors()
        )
        raise PublicDatasetError(f"{path}: {problems}") from exc


def scan_public_dataset(root: Path | str) -> list[PublicCase]:
    """Cases of a dataset folder; each image needs a mask of the same name."""
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise PublicDatasetError(
                f"{root} has no {folder.name}/ folder (expected images/ and masks/)"
            )
    cases: dict[str, dict[str, dict[SequenceName, Path]]] = {}
    missing: list[str] = []
    for image in sorted(images_dir.iterdir()):
        stem = _stem(image)
        match = _NAME_RE.match(stem) if stem else None
        if match is None or stem is None:
            continue
        sequence: SequenceName = "T1" if match["seq"].lower() == "t1" else "T2"
        masks = [masks_dir / (stem + suffix) for suffix in IMAGE_SUFFIXES]
        mask = next((m for m in masks if m.is_file()), None)
        if mask is None:
            missing.append(image.name)
            continue
        entry = cases.setdefault(match["case"], {"images": {}, "masks": {}})
        entry["images"][sequence] = image
        entry["masks"][sequence] = mask
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise PublicDatasetError(
            f"{len(missing)} image(s) in {images_dir} have no mask of the same name in "
            f"{masks_dir}: {shown}"
        )
    if not cases:
        raise PublicDatasetError(
            f"no <case>_t1 / <case>_t2 images with masks found in {images_dir}"
        )
    return [
        PublicCase(case, entry["images"], entry["masks"])
        for case, entry in sorted(cases.items(), key=lambda kv: _natural_key(kv[0]))
    ]


def _natural_key(text: str) -> tuple[object, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


# -- reading and reorienting ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class OrientedImage:
    """An image as a ``(k, j, i)`` array with the pipeline's :class:`Geometry`."""

    array: np.ndarray
    geometry: Geometry


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Array ``(x, y, z)``, direction (columns = axis directions, LPS), spacing, origin."""
    import SimpleITK as sitk  # noqa: N813

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise PublicDatasetError(f"{path.name} cannot be read: {first}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PublicDatasetError(f"{path.name} is not a 3-D greyscale image")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    return array, direction, spacing, origin


def orient_sagittal(
    array_xyz: np.ndarray, direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray
) -> OrientedImage:
    """Reorient an ITK-style image (LPS) to the pipeline's sagittal ``(k, j, i)`` convention.

    The axis closest to left-right becomes ``k`` (increasing towards the patient's right), the
    one closest to head-feet becomes ``j`` (increasing towards the feet) and the remaining one
    ``i`` (increasing towards posterior): the orientation of a standard sagittal DICOM series.
    """
    axes = np.abs(direction)  # row = LPS component, column = image axis
    k_axis = int(np.argmax(axes[0]))
    rest = [a for a in range(3) if a != k_axis]
    j_axis = max(rest, key=lambda a: axes[2, a])
    i_axis = next(a for a in rest if a != j_axis)
    data = array_xyz
    origin = origin.astype(np.float64).copy()
    vectors = direction.copy()
    # Flip axes so i runs posterior (+y), j to the feet (-z) and k along row x col, i.e.
    # towards the patient's right (-x), as in a standard sagittal DICOM series.
    wanted = {k_axis: (0, -1.0), j_axis: (2, -1.0), i_axis: (1, 1.0)}
    for axis, (component, sign) in wanted.items():
        if vectors[component, axis] * sign < 0:
            n = data.shape[axis]
            origin = origin + vectors[:, axis] * spacing[axis] * (n - 1)
            vectors[:, axis] = -vectors[:, axis]
            data = np.flip(data, axis=axis)
    array = np.ascontiguousarray(np.transpose(data, (k_axis, j_axis, i_axis)))
    row = vectors[:, i_axis]  # direction of increasing column index i
    col = vectors[:, j_axis]  # direction of increasing row index j
    normal = vectors[:, k_axis]
    geometry = Geometry(
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        row_cosines=(float(row[0]), float(row[1]), float(row[2])),
        col_cosines=(float(col[0]), float(col[1]), float(col[2])),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        spacing=(float(spacing[k_axis]), float(spacing[j_axis]), float(spacing[i_axis])),
        shape=(int(array.shape[0]), int(array.shape[1]), int(array.shape[2])),
    )
    return OrientedImage(array, geometry)


def remap_labels(
    mask: np.ndarray,
    mapping: Mapping[int, str],
    *,
    cut_at_canal: bool = False,
    margin_voxels: int = 3,
) -> np.ndarray:
    """Map a dataset's mask values to :mod:`pipeline.labels` (unnamed values -> 0).

    With ``cut_at_canal`` (mask in ``(k, j, i)`` with ``i`` running posterior), vertebra voxels
    more than ``margin_voxels`` behind the anterior wall of the spinal canal are removed on
    every slice, leaving the vertebral body. The wall of a row is the canal's most anterior
    voxel on that row over all slices (rows without canal take the nearest row's), so the
    pedicles on lateral slices, where the canal itself is absent, are cut as well.
    """
    out = np.zeros(mask.shape, dtype=np.uint8)
    for value, name in mapping.items():
        if name == "ignore":
            continue
        target = CSF_LABEL if name == CANAL_NAME else LABEL_OF[name]
        out[mask == value] = target
    canal = out == CSF_LABEL
    if cut_at_canal and canal.any():
        columns = np.arange(mask.shape[2])
        on_row = canal.any(axis=0)  # (j, i)
        big = mask.shape[2] + 1
        wall = np.where(on_row, columns[None, :], big).min(axis=1).astype(np.float64)
        has = wall < big
        rows = np.arange(len(wall))
        wall[~has] = np.interp(rows[~has], rows[has], wall[has])
        posterior = columns[None, None, :] > (wall[None, :, None] + margin_voxels)
        bodies = (out >= 1) & (out < CSF_LABEL)
        out[bodies & posterior] = 0
    return out


def load_public_case(case: PublicCase, options: LayoutOptions) -> PatientSample:
    """A case as a :class:`PatientSample` (no DXA: the segmenter needs none)."""
    series: dict[SequenceName, SeriesSample] = {}
    for sequence, image_path in case.images.items():
        image = orient_sagittal(*_read_itk(image_path))
        mask = orient_sagittal(*_read_itk(case.masks[sequence]))
        if mask.array.shape != image.array.shape or not np.allclose(
            mask.geometry.affine, image.geometry.affine, atol=1e-2
        ):
            raise PublicDatasetError(
                f"{case.masks[sequence].name} does not lie on the grid of {image_path.name}"
            )
        labelmap = remap_labels(mask.array, options.mapping, cut_at_canal=options.cut_at_canal)
        series[sequence] = SeriesSample(
            sequence=sequence,
            array=image.array.astype(np.float32),
            labelmap=labelmap,
            geometry=image.geometry,
            label_source="truth",
        )
    return PatientSample(
        patient_id=case.case, osteoporosis=False, t_score=None, series=series,
        info={"source": "public"},
    )


def iter_public_dataset(root: Path | str) -> Iterator[PatientSample]:
    """Every case of a dataset folder, loaded and mapped to the pipeline's labels."""
    root = Path(root)
    options = read_layout_options(root)
    for case in scan_public_dataset(root):
        yield load_public_case(case, options)


def write_itk(path: Path, array_kji: np.ndarray, geometry: Geometry) -> None:
    """Write a ``(k, j, i)`` array with its geometry as an ITK image (e.g. ``.mha``).

    The inverse of reading: ITK axes ``(x, y, z)`` are ``(i, j, k)``; used to export label maps
    and to build test replicas of public datasets.
    """
    import SimpleITK as sitk  # noqa: N813

    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))  # numpy (z, y, x)
    image.SetSpacing((geometry.spacing[2], geometry.spacing[1], geometry.spacing[0]))
    image.SetOrigin(geometry.origin)
    direction = np.column_stack([geometry.row_cosines, geometry.col_cosines, geometry.normal])
    image.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
