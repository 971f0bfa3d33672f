"""The EarthDial Processing algorithms: earthdial:ask, earthdial:detect, earthdial:change."""

from __future__ import annotations

from .ask import AskAlgorithm
from .change import ChangeAlgorithm
from .detect import DetectAlgorithm

ALGORITHMS = (AskAlgorithm, DetectAlgorithm, ChangeAlgorithm)

__all__ = ["ALGORITHMS", "AskAlgorithm", "ChangeAlgorithm", "DetectAlgorithm"]
