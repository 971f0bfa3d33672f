"""The EarthDial Processing algorithms: earthdial:ask, earthdial:detect, earthdial:change,
earthdial:detect_changes."""

from __future__ import annotations

from .ask import AskAlgorithm
from .change import ChangeAlgorithm
from .detect import DetectAlgorithm
from .detect_changes import DetectChangesAlgorithm

ALGORITHMS = (AskAlgorithm, DetectAlgorithm, ChangeAlgorithm, DetectChangesAlgorithm)

__all__ = ["ALGORITHMS", "AskAlgorithm", "ChangeAlgorithm", "DetectAlgorithm", "DetectChangesAlgorithm"]
