"""Which model a command runs: --model, else $EARTHDIAL_MODEL, else the built-in demo model. One rule
for every command that loads a model (serve, ask, change, detect, detect-changes, detect-many,
finetune; eval-demo skips the environment: it scores demo models)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

ENV = "EARTHDIAL_MODEL"
DEMO = "the built-in demo model"


class Chosen(NamedTuple):
    path: str | None  # None: nothing given and no demo model installed
    origin: str  # where it came from, said to the user: --model, $EARTHDIAL_MODEL or the demo model


def demo_model() -> str | None:
    """The built-in demo checkpoint shipped in the package, when it is there."""
    demo = Path(__file__).resolve().parent.parent / "models" / "demo"
    return str(demo) if (demo / "config.json").exists() and (demo / "model.safetensors").exists() else None


def choose(given: str | None, environment: bool = True) -> Chosen:
    """The model to load: `given` (--model) first, then $EARTHDIAL_MODEL (unless `environment` is
    False), then the demo model shipped in the package."""
    if given:
        return Chosen(given, "--model")
    if environment and os.environ.get(ENV):
        return Chosen(os.environ[ENV], f"${ENV}")
    return Chosen(demo_model(), DEMO)
