"""A result feature, defined once: its fields (docs/outputs.md), the properties every op gives its boxes,
and a result layer's name.

The backend fills every field of every feature it answers with (`ask`, `georef`, the boxes and the change
map of a scan); the CLI, the dock and Processing write what arrives and compose no field of their own.
The plugin runs this module as it is (scripts/build_plugin.py copies it in, with wire.py), so it may import
nothing but the standard library.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

# (name, kind): kind "real" or "text". One schema for every task, so layers of different requests merge.
FIELDS: tuple[tuple[str, str], ...] = (
    ("label", "text"),  # the <ref> phrase the box belongs to
    ("angle", "real"),  # the box's rotation, degrees
    ("task", "text"),
    ("prompt", "text"),  # the user's words ("" for tasks that take none)
    ("answer", "text"),  # the model's whole answer (a scan: its tile's answer)
    ("model", "text"),
    ("variant", "text"),
    ("source", "text"),  # the raster(s) asked about, "a.tif | b.tif" for pairs
    ("tile", "text"),  # the scan tile that found the box ("" outside scans)
    ("gsd_data", "real"),  # metres per pixel of the data as stored
    ("gsd_model", "real"),  # metres per pixel of the image the model saw (after resizing to its tiles)
    ("created", "text"),  # UTC, ISO 8601
    ("score", "real"),
    ("change", "text"),  # appeared / disappeared (change boxes)
    ("pair", "text"),  # "before.tif -> after.tif" (change boxes and the change map)
    ("review", "text"),  # the analyst's verdict (wire.REVIEWS); "" not reviewed
    ("request", "text"),  # the request as JSON, with the window read: what export-training rebuilds
)
NAMES = tuple(name for name, _ in FIELDS)
REAL = frozenset(name for name, kind in FIELDS if kind == "real")
BOX = ("label", "angle", "score")  # what each box has of its own; the rest its answer's boxes share


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def properties(
    *,
    task: str,
    prompt: str = "",
    answer: str = "",
    model: str = "",
    variant: str = "",
    source: str = "",
    gsd_data: float | None = None,
    gsd_model: float | None = None,
    created: str | None = None,
    request: str = "",
    pair: str = "",
) -> dict[str, Any]:
    """What every box of one answer shares; the box itself adds label, angle and score (`BOX`)."""
    props = dict.fromkeys(name for name in NAMES if name not in BOX)
    props.update(
        task=task,
        prompt=prompt,
        answer=answer,
        model=model,
        variant=variant,
        source=source,
        gsd_data=gsd_data,
        gsd_model=gsd_model,
        created=created or now(),
        request=request,
        pair=pair,
        review="",
        tile="",
        change="",
    )
    return props


def complete(props: dict[str, Any] | None) -> dict[str, Any]:
    """``props`` with every field of the schema (None where unknown) and nothing else."""
    props = props or {}
    return {name: props.get(name) for name in NAMES}


def change_of(label: str | None) -> str:
    """`appeared` or `disappeared` as a change box's label says (`ship appeared`), else ''."""
    words = (label or "").lower().split()
    return next((w for w in reversed(words) if w in ("appeared", "disappeared")), "")


def said_changed(answer: str) -> bool:
    return answer.strip().lower().startswith("yes")


# --- scans: the events carry a tile's answer and request once, in its entry; its boxes get them back here


def with_tile_fields(
    features: list[dict[str, Any]], tiles: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Copies of ``features`` with the answer and request of the tile that found each."""
    out = []
    for feature in features:
        props = dict(feature.get("properties") or {})
        index = _index(props.get("tile"))
        tile = tiles.get(index) if index is not None else None
        if tile is not None:
            props["answer"] = tile.get("answer") or ""
            props["request"] = tile.get("request") or props.get("request") or ""
        out.append({**feature, "properties": props})
    return out


def change_map(tiles: dict[int, dict[str, Any]], base: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-tile change map of a change scan: each tile pair's footprint, `changed` or `unchanged`,
    with its answer, score and pair; ``base`` is the scan's shared properties (the plan event's)."""
    out = []
    for index, t in sorted(tiles.items()):
        props = complete(base)
        props.update(
            label="changed" if t.get("changed") else "unchanged",
            tile=index,
            answer=t.get("answer") or "",
            score=t.get("score"),
            pair=t.get("pair") or props.get("pair") or "",
            request=t.get("request") or "",
            review="",
        )
        out.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [t["footprint"]]},
                "properties": props,
            }
        )
    return out


def _index(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# --- names


def slug(text: str, limit: int) -> str:
    text = str(text).encode("utf-8", "replace").decode("utf-8")
    return re.sub(r"[\W_]+", "_", text).strip("_")[:limit].strip("_")


def stem(source: str) -> str:
    """A source's short name: a file's name without folder and extension; pairs joined by '-'."""
    parts = [
        str(s).strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] for s in str(source).split(" | ")
    ]
    return "-".join(p.rsplit(".", 1)[0] if "." in p[1:] else p for p in parts if p)


def layer_name(props: dict[str, Any], when: datetime | None = None, scan: bool = False) -> str:
    """A readable layer name for a result whose boxes share ``props``: the task (``scan`` prefixed for
    whole-scene scans), the start of the prompt, the source's name and the UTC time
    (``refer_ships_scene_20261202_021500``); when defaults to the properties' ``created``."""
    if when is None:
        try:
            when = datetime.fromisoformat(str(props.get("created")).replace("Z", "+00:00")).astimezone(
                timezone.utc
            )
        except ValueError:
            when = datetime.now(timezone.utc)
    task = str(props.get("task") or "earthdial")
    parts = [
        ("scan_" if scan else "") + slug(task, 20),
        slug(_user_words(props.get("prompt")), 32),
        slug(stem(str(props.get("source") or "")), 32),
        when.strftime("%Y%m%d_%H%M%S"),
    ]
    return "_".join(p for p in parts if p)


def _user_words(prompt: Any) -> str:
    # a rendered prompt starts with its tags and <image>; a name wants the user's words
    return re.sub(r"\[[^\]]*\]|<image>", " ", str(prompt or "")).strip()


def request_json(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))
