"""CLI command modules; each exposes ``register(group)``."""

from __future__ import annotations

from types import ModuleType

from opmri_node.commands import analysis, demo, models, monitoring, node, outbox, synth, worker

COMMAND_MODULES: tuple[ModuleType, ...] = (
    node, worker, monitoring, synth, analysis, models, outbox, demo,
)
