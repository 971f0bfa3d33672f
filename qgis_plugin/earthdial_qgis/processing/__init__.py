"""The EarthDial Processing algorithms: earthdial:ask, earthdial:detect, earthdial:change,
earthdial:detect_changes, earthdial:export_training."""

from __future__ import annotations

from .ask import AskAlgorithm
from .change import ChangeAlgorithm
from .detect import DetectAlgorithm
from .detect_changes import DetectChangesAlgorithm
from .export_training import ExportTrainingAlgorithm

ALGORITHMS = (AskAlgorithm, DetectAlgorithm, ChangeAlgorithm, DetectChangesAlgorithm, ExportTrainingAlgorithm)

__all__ = [
    "ALGORITHMS",
    "AskAlgorithm",
    "ChangeAlgorithm",
    "DetectAlgorithm",
    "DetectChangesAlgorithm",
    "ExportTrainingAlgorithm",
]
