"""Command-line interface: ``opmri-node`` (also ``python -m opmri_node``).

Each group of commands lives in its own module under :mod:`opmri_node.commands` and registers
itself on the top-level group; heavy imports (torch, pynetdicom) happen inside the commands so
that ``opmri-node --help`` stays fast.
"""

from __future__ import annotations

import logging
import os

import click

from opmri_node import __version__
from opmri_node.commands import COMMAND_MODULES


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="opmri-node")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """opmri-node: a DICOM node that screens routine lumbar spine MRI for osteoporosis.

    It receives studies from configured PACS/modality peers (C-STORE), analyses the sagittal
    T1 and T2 series (vertebra segmentation, CNN per sequence, VBQ score) and sends a DICOM
    SEG, a TID 1500 Structured Report and a key image back into the same study.

    The config file is taken from --config or, when absent, from $OPMRI_CONFIG.
    """
    env_verbose = int(os.environ.get("OPMRI_VERBOSE", "0") or 0)
    _setup_logging(max(verbose, env_verbose))
    ctx.ensure_object(dict)


for _module in COMMAND_MODULES:
    _module.register(main)
