"""opmri-node: opportunistic osteoporosis screening on routine lumbar spine MRI, as a DICOM node."""

import logging

__version__ = "0.1.0"

IMPLEMENTATION_CLASS_UID = "2.25.163316065326591617739126658839502666894"
"""Implementation Class UID the node writes into file meta and association negotiation."""

IMPLEMENTATION_VERSION_NAME = "OPMRI_" + __version__.replace(".", "")
"""Implementation Version Name (at most 16 characters)."""

logging.getLogger(__name__).addHandler(logging.NullHandler())
