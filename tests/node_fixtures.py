"""Helpers for the node's tests and benchmarks: MR test instances, config files, tools.

The MR instances are complete MR Image IODs (``dciodvfy`` reports no errors), small by default
(64 x 64) or 512 x 512 where size matters. Compressed copies are made with dcmtk's encoders.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from opmri_node.config import NodeConfig, parse_config
from opmri_node.service import Node

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOL_ENV = {**os.environ, "TCP_NODELAY": "1"}
"""Environment for dcmtk tools and Orthanc: without TCP_NODELAY they run ~40x slower."""


def tool(name: str) -> str:
    """Absolute path of an external tool; fails (never skips) when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise AssertionError(
            f"required tool {name!r} is not installed (Debian: dcmtk, dicom3tools, orthanc)"
        )
    return path


def run_tool(
    args: Sequence[str], *, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk/dicom3tools command with TCP_NODELAY set; returns the completed process."""
    result = subprocess.run(
        [tool(args[0]), *args[1:]],
        env=TOOL_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}"
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{output}")
    return result


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy reports for a DICOM file."""
    result = run_tool(["dciodvfy", str(path)])
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@dataclass(frozen=True)
class MRSeries:
    """A generated series: its files and UIDs."""

    files: list[Path]
    study_uid: str
    series_uid: str
    sop_uids: list[str]


def mr_dataset(
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    frame_uid: str,
    index: int,
    size: int = 64,
    seed: int = 0,
) -> Dataset:
    """A complete sagittal T1 MR Image (PS3.3 A.4) with 12-bit noise pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "MR"
    ds.Manufacturer = "opmri-node tests"
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.StudyDescription = "LUMBAR SPINE"
    ds.SeriesDescription = "SAG T1 TSE"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "TEST0001"
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "LSPINE"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = 4.0
    ds.RepetitionTime = 550.0
    ds.EchoTime = 10.0
    ds.EchoTrainLength = 3
    ds.MagneticFieldStrength = 1.5
    ds.ImagedNucleus = "1H"
    ds.SpacingBetweenSlices = 4.4
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [f"{index * 4.4 - 30.0:.2f}", "-120", "120"]
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.PixelSpacing = [240.0 / size, 240.0 / size]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed * 100003 + index)
    ds.PixelData = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
    return ds


def make_mr_series(
    folder: Path,
    count: int,
    *,
    size: int = 64,
    study_uid: str | None = None,
    seed: int = 0,
) -> MRSeries:
    """Write ``count`` MR instances of one series into ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    files, sops = [], []
    for index in range(count):
        sop = generate_uid()
        ds = mr_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop,
            frame_uid=frame_uid,
            index=index,
            size=size,
            seed=seed,
        )
        path = folder / f"mr{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(sop)
    return MRSeries(files, study_uid, series_uid, sops)


def write_config(
    folder: Path,
    *,
    port: int = 0,
    peers: str = "",
    node_extra: str = "",
    stable: float = 10.0,
    min_free_disk_mb: int = 0,
) -> Path:
    """Write a node config (data in ``folder/data``) and return its path."""
    text = (
        "node:\n"
        "  ae_title: OPMRI\n"
        "  bind: 127.0.0.1\n"
        f"  port: {port}\n"
        "  data_dir: data\n"
        f"  study_stable_seconds: {stable}\n"
        f"  min_free_disk_mb: {min_free_disk_mb}\n"
        f"{node_extra}"
        "peers:\n"
        "  modality:\n"
        "    ae_title: STORESCU\n"
        "    host: 127.0.0.1\n"
        "    port: 11113\n"
        "    may_send: true\n"
        "  scanner:\n"
        "    ae_title: SCANNER\n"
        "    host: 127.0.0.1\n"
        "    port: 11114\n"
        "    may_send: true\n"
        "    check_host: true\n"
        "  viewer:\n"
        "    ae_title: VIEWER\n"
        "    host: 127.0.0.1\n"
        "    port: 11115\n"
        "    may_send: false\n"
        f"{peers}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path) -> NodeConfig:
    return parse_config(path.read_text(encoding="utf-8"), source=str(path), base_dir=path.parent)


@contextmanager
def running_node(config: NodeConfig) -> Iterator[Node]:
    """A node listening on an OS-assigned loopback port for the duration of the block."""
    node = Node(config)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def storescu(
    host: str,
    port: int,
    paths: Sequence[Path],
    *,
    calling: str = "STORESCU",
    called: str = "OPMRI",
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk's storescu (verbose, so statuses can be checked)."""
    args = ["storescu", "-v", "-aet", calling, "-aec", called, *extra, host, str(port)]
    args += [str(p) for p in paths]
    return run_tool(args, timeout=timeout)


STATUS_RE = re.compile(r"Received Store Response \(([^)]*)\)")


def store_statuses(output: str) -> list[str]:
    """The status words of storescu's ``Received Store Response (...)`` lines."""
    return STATUS_RE.findall(output)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """``python -m opmri_node serve`` as a child process, for crash and CLI tests."""

    def __init__(self, config_path: Path, *, log_path: Path, preexec_fn: object = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self._log = log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("OPMRI_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opmri_node", "-v", "serve", "--config", str(config_path)],
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=preexec_fn,  # type: ignore[arg-type]
        )
        self.port = self._wait_port()

    def _wait_port(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"ready on [^ ]+:(\d+)")
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = pattern.search(text.split("---restart---")[-1])
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited early ({self.proc.returncode}):\n{text}")
            time.sleep(0.05)
        raise AssertionError("serve did not report its port in time:\n" + self.log_path.read_text())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.write(b"\n---restart---\n")
        self._log.flush()

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def data_set_of(path: Path) -> tuple[str, bytes]:
    """Transfer syntax and the encoded data set (everything after the file meta) of a file."""
    from opmri_node.spool import file_layout

    offset, transfer_syntax = file_layout(path)
    return transfer_syntax, path.read_bytes()[offset:]


def scu_ae(calling: str = "STORESCU") -> Any:
    """A pynetdicom AE for test associations (short timeouts)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    ae.connection_timeout = 5
    return ae


def dcmtk_variants(source: Path, folder: Path) -> dict[str, Path]:
    """Copies of an uncompressed MR file in other transfer syntaxes, made with dcmtk."""
    folder.mkdir(parents=True, exist_ok=True)
    commands = {
        "explicit_le": None,
        "implicit_le": ["dcmconv", "+ti"],
        "explicit_be": ["dcmconv", "+tb"],
        "deflated": ["dcmconv", "+td"],
        "jpeg_lossless_sv1": ["dcmcjpeg", "+e1"],
        "jpeg_lossless_p14": ["dcmcjpeg", "+el"],
        "jpeg_extended": ["dcmcjpeg", "+ee"],
        "jpeg_ls_lossless": ["dcmcjpls", "+el"],
        "jpeg_ls_near": ["dcmcjpls", "+en"],
        "rle": ["dcmcrle"],
    }
    made = {}
    for name, command in commands.items():
        target = folder / f"{name}.dcm"
        if command is None:
            shutil.copyfile(source, target)
        else:
            run_tool([*command, str(source), str(target)], check=True)
        made[name] = target
    return made
