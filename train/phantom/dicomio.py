"""Write a simulated patient as DICOM MR Image Storage files and NIfTI label maps.

Every image is a single-frame MR Image Storage instance with the attributes a scanner sends
(patient, study, series, equipment, acquisition, image plane, MR sequence and VOI LUT), in
the vendor's style, encoded in one of the offered transfer syntaxes. Files are byte-for-byte
deterministic: nothing depends on the clock, the host or the order of work.
"""

from __future__ import annotations

import copy
import heapq
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nibabel as nib
import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from pipeline.volume import Geometry
from train.phantom.options import PHANTOM_VERSION
from train.phantom.simulate import SimulatedPatient, SimulatedSeries, derived_uid

IMPLEMENTATION_CLASS_UID: Final[UID] = UID(derived_uid("implementation", "synthetic MRI writer"))
IMPLEMENTATION_VERSION_NAME: Final[str] = "OPMRI_SYNTH_" + PHANTOM_VERSION.replace(".", "")
UNCOMPRESSED: Final[frozenset[UID]] = frozenset(
    {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
    }
)
_MASK_NAMES: Final[dict[str, str]] = {"t1": "t1", "t2": "t2", "stir": "stir"}


@dataclass(frozen=True)
class WrittenPatient:
    """Where a patient's files went, relative to the cohort folder."""

    study_dir: str
    series_dirs: dict[str, str]  # by series kind
    masks: dict[str, str]  # by sagittal series kind
    n_files: int


def _ds(value: float, digits: int = 6) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _time(base: str, minutes: float) -> str:
    hh, mm, ss = int(base[:2]), int(base[2:4]), int(base[4:6])
    total = hh * 3600 + mm * 60 + ss + round(minutes * 60)
    total %= 24 * 3600
    return f"{total // 3600:02d}{(total // 60) % 60:02d}{total % 60:02d}"


def series_folder(series: SimulatedSeries) -> str:
    """Folder of a series inside its study folder (from the series number)."""
    return f"S{series.protocol.series_number:04d}"


def instance_file(instance_number: int) -> str:
    return f"I{instance_number:04d}.dcm"


def _series_dataset(patient: SimulatedPatient, series: SimulatedSeries) -> Dataset:
    """Attributes shared by every image of a series."""
    study = patient.study
    protocol = series.protocol
    style = protocol.style
    seq = protocol.sequence
    first = protocol.planes[0]
    series_time = _time(study.study_time, protocol.minutes_after_start)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(style.image_type)
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = series_time
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.AcquisitionDate = study.study_date
    ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = series_time
    ds.AcquisitionTime = series_time
    ds.ContentTime = series_time
    ds.AccessionNumber = study.accession
    ds.Modality = "MR"
    ds.Manufacturer = study.manufacturer
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = ""
    ds.StationName = study.station
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = style.description
    ds.ManufacturerModelName = study.model
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.IssuerOfPatientID = "OPMRI-SYNTH"
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = f"{study.age:03d}Y"
    ds.PatientSize = _ds(study.height_m, 2)
    ds.PatientWeight = _ds(study.weight_kg, 1)
    ds.BodyPartExamined = "LSPINE"
    ds.ScanningSequence = list(style.scanning_sequence)
    ds.SequenceVariant = list(style.sequence_variant)
    ds.ScanOptions = list(style.scan_options) if style.scan_options else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = style.sequence_name
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds(first.thickness, 3)
    ds.RepetitionTime = _ds(seq.tr, 2)
    ds.EchoTime = _ds(seq.te, 2)
    if seq.kind == "ir":
        ds.InversionTime = _ds(seq.ti, 1)
    ds.NumberOfAverages = _ds(protocol.averages, 1)
    ds.ImagingFrequency = _ds(study.imaging_frequency, 6)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.MagneticFieldStrength = _ds(study.field_strength, 1)
    if series.geometry is not None:
        ds.SpacingBetweenSlices = _ds(series.geometry.spacing[0], 4)
    rows, cols = first.shape
    phase_steps = round(rows * (0.7 if protocol.kind != "localizer" else 0.6))
    ds.NumberOfPhaseEncodingSteps = phase_steps
    ds.EchoTrainLength = protocol.echo_train_length
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = _ds(protocol.pixel_bandwidth, 1)
    ds.DeviceSerialNumber = study.device_serial
    ds.SoftwareVersions = study.software
    ds.ProtocolName = style.description
    ds.TransmitCoilName = "Body"
    ds.ReceiveCoilName = study.receive_coil if protocol.kind != "localizer" else "Body"
    ds.AcquisitionMatrix = [cols, 0, 0, phase_steps]
    ds.InPlanePhaseEncodingDirection = "ROW" if protocol.kind in ("t1", "t2", "stir") else "COL"
    ds.FlipAngle = _ds(protocol.flip_angle, 1)
    ds.VariableFlipAngleFlag = "N"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = protocol.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(first.spacing[0], 6), _ds(first.spacing[1], 6)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    return ds


def _window(pixels: np.ndarray) -> tuple[str, str]:
    """Window centre and width from the 1st and 99.5th percentile (of every 16th pixel)."""
    low, high = np.percentile(pixels[::4, ::4], (1.0, 99.5))
    high = max(float(high), float(low) + 1.0)
    return _ds((low + high) / 2.0, 1), _ds(high - low, 1)


def _slice_dataset(series: SimulatedSeries, k: int, big_endian: bool = False) -> Dataset:
    """The attributes that differ between the images of a series, with the pixel data."""
    plane = series.planes[k]
    ds = Dataset()
    ds.SOPInstanceUID = series.sop_instance_uids[k]
    ds.InstanceNumber = series.instance_numbers[k]
    ds.ImagePositionPatient = [_ds(v, 4) for v in plane.position]
    ds.ImageOrientationPatient = [_ds(v, 8) for v in plane.orientation]
    ds.SliceLocation = _ds(float(plane.origin @ plane.normal), 4)
    centre, width = _window(series.pixels[k])
    ds.WindowCenter = centre
    ds.WindowWidth = width
    order = ">u2" if big_endian else "<u2"
    ds.PixelData = np.ascontiguousarray(series.pixels[k], dtype=order).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def image_datasets(patient: SimulatedPatient, series: SimulatedSeries) -> list[Dataset]:
    """One dataset per image of ``series``, in slice order ``k`` (pixel data attached as
    native little-endian OW)."""
    base = _series_dataset(patient, series)
    out = []
    for k in range(len(series.planes)):
        ds = Dataset({tag: copy.copy(element) for tag, element in base.items()})
        ds.update(_slice_dataset(series, k))
        out.append(ds)
    return out


def _file_meta(sop_instance_uid: str, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def encode(ds: Dataset, pixels: np.ndarray, transfer_syntax: UID) -> None:
    """Set the file meta and encode the pixel data of ``ds`` in ``transfer_syntax``."""
    ds.file_meta = _file_meta(ds.SOPInstanceUID, transfer_syntax)
    if transfer_syntax == ExplicitVRBigEndian:
        ds.PixelData = np.ascontiguousarray(pixels, dtype=">u2").tobytes()
        ds["PixelData"].VR = "OW"
    elif transfer_syntax not in UNCOMPRESSED:
        ds.compress(transfer_syntax, np.ascontiguousarray(pixels), generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = transfer_syntax


class _NativeEncoder:
    """Writes the files of one series in a native (uncompressed or deflated) transfer syntax.

    The attributes shared by all images are encoded once; each file is the preamble, its file
    meta, and the shared and per-image elements merged in tag order — the bytes pydicom's
    ``save_as(enforce_file_format=True)`` writes, at a fraction of the cost.
    """

    def __init__(self, base: Dataset, transfer_syntax: UID):
        self.transfer_syntax = transfer_syntax
        self.little = transfer_syntax != ExplicitVRBigEndian
        self.implicit = transfer_syntax == ImplicitVRLittleEndian
        self.encodings = convert_encodings(base.get("SpecificCharacterSet", "ISO_IR 6"))
        self.shared = self._elements(base)

    def _elements(self, ds: Dataset) -> list[tuple[int, bytes]]:
        out = []
        for element in ds:
            buffer = DicomBytesIO()
            buffer.is_little_endian = self.little
            buffer.is_implicit_VR = self.implicit
            write_data_element(buffer, element, self.encodings)
            out.append((int(element.tag), buffer.getvalue()))
        return out

    def file_bytes(self, image: Dataset) -> bytes:
        merged = heapq.merge(self.shared, self._elements(image), key=lambda item: item[0])
        body = b"".join(encoded for _, encoded in merged)
        if self.transfer_syntax == DeflatedExplicitVRLittleEndian:
            deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            body = deflater.compress(body) + deflater.flush()
            if len(body) % 2:  # the file keeps an even length
                body += b"\x00"
        meta = _file_meta_bytes(str(image.SOPInstanceUID), self.transfer_syntax)
        return b"\x00" * 128 + b"DICM" + meta + body


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (short-length VRs, and OB)."""
    tag = struct.pack("<HH", group, element)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _file_meta_bytes(sop_instance_uid: str, transfer_syntax: UID) -> bytes:
    """The File Meta Information group, as ``write_file_meta_info`` encodes it."""
    body = b"".join(
        (
            _element(2, 0x0001, b"OB", b"\x00\x01"),
            _element(2, 0x0002, b"UI", _padded(MRImageStorage, b"\x00")),
            _element(2, 0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _element(2, 0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
            _element(2, 0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _element(2, 0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        )
    )
    return _element(2, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def write_series(
    patient: SimulatedPatient, series: SimulatedSeries, folder: Path, transfer_syntax: UID
) -> int:
    """Write the images of one series into ``folder``; returns the number of files."""
    folder.mkdir(parents=True, exist_ok=True)
    if transfer_syntax in UNCOMPRESSED:
        base = _series_dataset(patient, series)
        encoder = _NativeEncoder(base, transfer_syntax)
        big_endian = transfer_syntax == ExplicitVRBigEndian
        for k in range(len(series.planes)):
            image = _slice_dataset(series, k, big_endian)
            (folder / instance_file(series.instance_numbers[k])).write_bytes(
                encoder.file_bytes(image)
            )
        return len(series.planes)
    for k, ds in enumerate(image_datasets(patient, series)):
        encode(ds, series.pixels[k], transfer_syntax)
        ds.save_as(folder / instance_file(int(ds.InstanceNumber)), enforce_file_format=True)
    return len(series.planes)


def write_labelmap(labelmap: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a ``(k, j, i)`` label map as NIfTI with axes ``(i, j, k)`` and a RAS+ affine
    (the convention of :mod:`pipeline.labels`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(np.transpose(labelmap, (2, 1, 0)), dtype=np.uint8)
    image = nib.Nifti1Image(data, geometry.nifti_affine)
    header = image.header
    header.set_xyzt_units("mm")
    header.set_intent("label")
    header["descrip"] = b"opmri synthetic ground truth"
    image.set_qform(geometry.nifti_affine, code=1)
    image.set_sform(geometry.nifti_affine, code=1)
    nib.save(image, str(path))


def write_patient(patient: SimulatedPatient, root: Path, transfer_syntax: UID) -> WrittenPatient:
    """Write all series of ``patient`` under ``root/studies/<patient_id>/`` and its label
    maps under ``root/masks/<patient_id>/``."""
    study_rel = Path("studies") / patient.patient_id
    masks_rel = Path("masks") / patient.patient_id
    series_dirs: dict[str, str] = {}
    masks: dict[str, str] = {}
    n_files = 0
    for series in patient.series:
        rel = study_rel / series_folder(series)
        n_files += write_series(patient, series, root / rel, transfer_syntax)
        series_dirs[series.kind] = rel.as_posix()
        if series.labelmap is not None and series.geometry is not None:
            mask_rel = masks_rel / f"{_MASK_NAMES[series.kind]}.nii.gz"
            write_labelmap(series.labelmap, series.geometry, root / mask_rel)
            masks[series.kind] = mask_rel.as_posix()
    return WrittenPatient(study_rel.as_posix(), series_dirs, masks, n_files)


def read_labelmap(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI label map as a ``(k, j, i)`` uint8 array and its RAS+ affine."""
    image = nib.load(os.fspath(path))
    if not isinstance(image, nib.Nifti1Image):
        raise ValueError(f"{path}: not a NIfTI-1 image")
    data = np.asarray(image.dataobj, dtype=np.uint8)
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), np.asarray(image.affine)
