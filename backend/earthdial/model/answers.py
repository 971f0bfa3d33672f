"""Boxes in EarthDial answer text.

EarthDial (like GeoChat) writes boxes as ``[[x1, y1, x2, y2, angle]]``: numbers on a 0-100 scale of the
image width (x) and height (y), and a rotation in degrees about the box centre. Several objects come
as ``[[..]][[..]]`` or ``[[..], [..]]``, sometimes with an extra bracket level (``[[[81, 22, 100, 42, 0]]]``),
with or without ``<box>...</box>`` tags, often after a ``<ref>label</ref>``. Stock InternVL2 writes
``<ref>x</ref><box>[[x1, y1, x2, y2]]</box>`` with four numbers on a 0-1000 scale; those are read too
(divided by 10, angle 0). EarthDial's own demo only reads the InternVL form, so it misreads EarthDial's
boxes; here both are read.

Parsing never raises: model output may be truncated by the token limit or simply malformed, and a
partial answer should still give the boxes that were completely written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Box", "parse_boxes"]


@dataclass(frozen=True)
class Box:
    """A box on a 0-100 scale of image width (x) and height (y), with x1 <= x2 and y1 <= y2."""

    x1: float
    y1: float
    x2: float
    y2: float
    angle: float  # degrees, rotation about the box centre (0 for the InternVL form)
    label: str | None  # text of the <ref>...</ref> that introduced the box's group, or None


# Tags and brackets, in text order. A label may not contain "<" so that an unterminated <ref>
# cannot swallow the boxes that follow it.
_TOKEN = re.compile(r"<ref>([^<]*)</ref>|<box>|</box>|\[|\]")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_GAP = " \t\r\n,"  # what may separate the lists of one bare (untagged) group


def parse_boxes(text: str) -> list[Box]:
    """Every well-formed box in ``text``, in order of appearance.

    A group is the content of one ``<box>...</box>``, or a run of bracketed lists outside box tags
    separated only by whitespace and commas. Every box of a group takes the label of the nearest
    ``<ref>`` before the group that no earlier group has used. Outside box tags a list counts only
    when nested in another bracket (``[[..]]``), so a stray ``[1, 2, 3, 4]`` in prose is not a box.
    Lists with a count of numbers other than 5 (0-100) or 4 (0-1000), or with anything but plain
    numbers, are skipped.
    """
    if not isinstance(text, str):
        return []
    boxes: list[Box] = []
    pending: str | None = None  # label of the latest <ref> not yet used by a group
    label: str | None = None  # label of the current group
    in_group = in_box = False
    group_found = False  # whether the current group has given a box
    depth = 0
    list_start = -1  # where the content of the latest '[' begins, while no other bracket followed it
    prev_end = 0

    def end_group() -> None:
        nonlocal in_group, in_box, depth, list_start, pending
        if in_group and group_found:
            pending = None
        in_group = in_box = False
        depth, list_start = 0, -1

    for m in _TOKEN.finditer(text):
        token = m.group(0)
        gap = text[prev_end : m.start()]
        prev_end = m.end()
        if in_group and not in_box and depth == 0 and gap.strip(_GAP):
            end_group()  # prose after a bare bracket run closes it
        if token.startswith("<ref>"):
            end_group()
            pending = m.group(1).strip() or None
        elif token == "<box>":
            end_group()
            in_group = in_box = True
            label, group_found = pending, False
        elif token == "</box>":
            end_group()
        elif token == "[":
            if not in_group:
                in_group, in_box = True, False
                label, group_found = pending, False
            depth += 1
            list_start = m.end()
        else:  # "]"
            if depth == 0:
                continue  # stray closing bracket
            if list_start >= 0 and (in_box or depth >= 2):
                box = _box_from_list(text[list_start : m.start()], label)
                if box is not None:
                    boxes.append(box)
                    group_found = True
            list_start = -1
            depth -= 1
    return boxes


def _box_from_list(content: str, label: str | None) -> Box | None:
    parts = content.split(",")
    if len(parts) not in (4, 5) or not all(_NUMBER.fullmatch(p.strip()) for p in parts):
        return None
    values = [float(p) for p in parts]
    if not all(math.isfinite(v) for v in values):
        return None  # e.g. 1e400
    if len(values) == 4:  # InternVL: 0-1000, no angle
        x1, y1, x2, y2 = (v / 10.0 for v in values)
        angle = 0.0
    else:
        x1, y1, x2, y2, angle = values
    x1, x2 = sorted((_clamp(x1), _clamp(x2)))
    y1, y2 = sorted((_clamp(y1), _clamp(y2)))
    return Box(x1, y1, x2, y2, angle, label)


def _clamp(v: float) -> float:
    return min(max(v, 0.0), 100.0) + 0.0  # + 0.0 turns -0.0 into 0.0
