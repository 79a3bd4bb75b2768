"""Helpers that keep patient-identifying text out of logs, messages and errors."""

from __future__ import annotations

import hashlib


def uid_tag(uid: object) -> str:
    """A short, stable, non-reversible tag for a DICOM UID (or any identifier) for logs.

    The same UID always gives the same tag, so log lines about one study can be correlated
    without the UID itself (which can carry a site's root and a timestamp) being written.
    """
    digest = hashlib.sha256(str(uid).encode("utf-8", "replace")).hexdigest()
    return digest[:12]
