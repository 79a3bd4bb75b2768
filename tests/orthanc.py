"""A real Orthanc (the Debian package) for integration tests and benchmarks.

:class:`OrthancServer` writes a JSON configuration into a temporary folder (storage and index
there too), binds DICOM and HTTP to loopback on free ports chosen by the operating system,
declares the node as a DICOM modality, starts ``Orthanc`` with ``TCP_NODELAY=1`` in its
environment and waits until its REST API answers. :meth:`OrthancServer.stop` terminates it;
:meth:`OrthancServer.start` may be called again on the same storage (a PACS that was down).
A missing Orthanc binary fails the test (it is never skipped).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ORTHANC_ENV = {**os.environ, "TCP_NODELAY": "1"}


def orthanc_binary() -> str:
    """Path of the Orthanc executable; raises AssertionError if it is not installed."""
    path = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/sbin")
    if path is None:
        raise AssertionError("Orthanc is not installed (Debian package 'orthanc'); it is required")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the operating system reports free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OrthancError(AssertionError):
    """Orthanc did not start or a REST call failed."""


class OrthancServer:
    """An Orthanc process on loopback with its own storage folder."""

    def __init__(
        self,
        folder: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "orthanc.log"

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "opmri-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "OverwriteInstances": True,
            "StableAge": 60,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "HttpTimeout": 60,
            "DeidentifyLogs": True,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path

    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc (on the same ports and storage as before) and wait for its API."""
        if self.process is not None:
            raise RuntimeError("Orthanc is already running")
        config = self.write_config()
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                [orthanc_binary(), str(config)],
                env=ORTHANC_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited at start-up:\n{self.log_tail()}")
            try:
                self.get("/system")
                if self._dicom_listening():
                    return
            except (OSError, OrthancError):
                pass
            time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not start within {timeout} s:\n{self.log_tail()}")

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after ``timeout``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- REST --------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                timeout: float = 60.0) -> Any:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if raw is not None:
            request.add_header("Content-Type", "application/dicom")
        elif body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through the REST API (``POST /instances``)."""
        result = self.request("POST", "/instances", raw=Path(path).read_bytes())
        if not isinstance(result, dict) or result.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload of {path.name} failed: {result}")
        return result

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's id of a study, or None."""
        result = self.post(
            "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        )
        return result[0] if result else None

    def send_to_modality(self, modality: str, resources: list[str], timeout: float = 120) -> Any:
        """C-STORE resources to a configured modality (``POST /modalities/{id}/store``)."""
        return self.request(
            "POST",
            f"/modalities/{modality}/store",
            {"Resources": resources, "Synchronous": True},
            timeout=timeout,
        )

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study: Orthanc's expanded description plus ``SOPClassUID``."""
        result = self.post(
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        )
        instances = []
        for item in result or []:
            sop_class = self.request("GET", f"/instances/{item['ID']}/metadata/SopClassUid")
            if isinstance(sop_class, bytes):
                sop_class = sop_class.decode("ascii", "replace")
            instances.append({**item, "SOPClassUID": str(sop_class).strip()})
        return instances

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        data = self.request("GET", f"/instances/{instance_id}/file")
        if not isinstance(data, bytes):
            raise OrthancError("the instance file is not binary")
        return data

    def wait_for(self, predicate: Any, timeout: float, interval: float = 0.1) -> Any:
        """Poll ``predicate()`` until it returns something truthy; raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise OrthancError(f"condition not met within {timeout} s")
            time.sleep(interval)


@contextmanager
def running_orthanc(
    folder: Path, *, modalities: dict[str, tuple[str, str, int]] | None = None
) -> Iterator[OrthancServer]:
    """An :class:`OrthancServer`, started and stopped around the block."""
    server = OrthancServer(folder, modalities=modalities)
    server.start()
    try:
        yield server
    finally:
        server.stop()
