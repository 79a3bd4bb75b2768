"""CLI command modules; each exposes ``register(group)``."""

from __future__ import annotations

from types import ModuleType

from opmri_node.commands import analysis, demo, models, node, outbox, synth

COMMAND_MODULES: tuple[ModuleType, ...] = (node, synth, analysis, models, outbox, demo)
