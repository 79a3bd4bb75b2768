"""Settings of the analysis pipeline (the ``pipeline:`` section of the node's YAML config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict


class PipelineSettings(BaseModel):
    """Validated ``pipeline:`` settings. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    models_dir: Path = Path("models")
