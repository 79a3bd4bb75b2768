"""CLI command modules; each exposes ``register(group)``."""

from __future__ import annotations

from types import ModuleType

from opmri_node.commands import analysis, models, node, synth

COMMAND_MODULES: tuple[ModuleType, ...] = (node, synth, analysis, models)
