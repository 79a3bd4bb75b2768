"""opmri-node: opportunistic osteoporosis screening on routine lumbar spine MRI, as a DICOM node."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
