"""Chat history per raster layer, kept in the project file.

Each layer's conversation is a JSON list of turns on the layer itself (a custom property, saved with the
project and dropped with the layer). A follow-up chat turn sends the earlier turns as
``options.history`` ``[[question, answer], ...]``; the backend knows a follow-up by the ``<image>``
marker in the history's first question (the image came with that turn), so the first question is sent
the way EarthDial's chat template wrote it: ``{sensor} <image>\\n {prompt}``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from qgis.core import QgsMapLayer, QgsProject

PROPERTY = "earthdial/history"
IMAGE = "<image>"
MAX_TURNS = 20  # older turns are dropped: the model's context is finite


@dataclass
class Turn:
    question: str  # what the user typed
    answer: str
    sensor: str = ""  # the sensor tag the backend used for the image (reply input.sensor)
    task: str = "chat"


def load(layer: QgsMapLayer | None) -> list[Turn]:
    if layer is None:
        return []
    raw = layer.customProperty(PROPERTY, "")
    if not raw:
        return []
    try:
        items = json.loads(str(raw))
    except ValueError:
        return []
    turns = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("question"), str):
            turns.append(
                Turn(
                    item["question"],
                    str(item.get("answer", "")),
                    str(item.get("sensor", "")),
                    str(item.get("task", "chat")),
                )
            )
    return turns


def save(layer: QgsMapLayer, turns: list[Turn]) -> None:
    layer.setCustomProperty(PROPERTY, json.dumps([asdict(t) for t in turns[-MAX_TURNS:]]))
    QgsProject.instance().setDirty(True)


def append(layer: QgsMapLayer, turn: Turn) -> list[Turn]:
    turns = load(layer) + [turn]
    save(layer, turns)
    return turns[-MAX_TURNS:]


def clear(layer: QgsMapLayer) -> None:
    layer.removeCustomProperty(PROPERTY)
    QgsProject.instance().setDirty(True)


def wire_history(turns: list[Turn]) -> list[list[str]]:
    """``options.history`` for the next turn of a conversation: the first question carries the
    ``<image>`` marker (with the sensor tag the image was sent with), later ones are plain."""
    out: list[list[str]] = []
    for i, turn in enumerate(turns):
        question = turn.question
        if i == 0 and IMAGE not in question:
            question = (
                f"{turn.sensor} {IMAGE}\n {question}".strip() if turn.sensor else f"{IMAGE}\n{question}"
            )
        out.append([question, turn.answer])
    return out


def as_text(turns: list[Turn]) -> str:
    return "\n\n".join(f"Q: {t.question}\nA: {t.answer}" for t in turns)


def to_json(turns: list[Turn]) -> list[dict[str, Any]]:
    return [asdict(t) for t in turns]
