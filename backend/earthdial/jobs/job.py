"""One scan job: a run's finished work is journalled before anything is written, merged and written at
its end, and resumed from the journal after a stop. Plain functions over plain data (the journal's
entries are JSON), shared by the two commands that run whole scenes:

- `earthdial detect` / `detect-changes` (cli): the units are the tiles of a scan, as the `detect` op's
  progress events bring them (each tile's raw boxes); at the end the boxes are merged across the tile
  seams and written as one output. Without -o the tiles are kept in memory only.
- `earthdial detect-many` (jobs.many): the units are whole scenes, each merged by its worker (through
  the same `Progress` as a tile scan); each is journalled and then written as a layer of its own, and at
  the end every scene's boxes go into one merged layer, whose name is journalled first too.

The steps, always in this order: `ScanJob.open` (a fresh journal, or with --resume the one an
interrupted run of the same request left), `record` (on disk before it is written anywhere),
`write_layer` (the layer the journal names; on a resume one that reached the file is left as it is),
then `finish` (the journal removed once the output is whole). A stop `close`s the journal and keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from earthdial.contract.result_features import with_tile_fields
from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.jobs import journal
from earthdial.outputs import files as output

# how a run goes, not what it finds: a resume may change them, so the journal's request leaves them out
UNJOURNALLED_OPTIONS = ("batch", "merge", "skip")
MERGED_INDEX = -1  # the journal entry of a layer written at the end, beside the units' 0, 1, 2 ...


def journalled_options(options: dict[str, Any]) -> dict[str, Any]:
    """A request's options as its journal records them (and compares them on --resume)."""
    return {k: v for k, v in options.items() if k not in UNJOURNALLED_OPTIONS}


def merge(features: list[dict[str, Any]], tiles: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """A scan's raw boxes merged across tile seams, each with the answer and request of its tile: what
    `earthdial detect` writes for a scene."""
    from earthdial.scenes import runner  # rasterio and the merge: only where a scan ends

    return with_tile_fields(runner.finished(features, tiles), tiles)


@dataclass
class Progress:
    """The finished tiles and raw boxes of a scan's progress events, in memory."""

    tiles: dict[int, dict[str, Any]] = field(default_factory=dict)
    features: list[dict[str, Any]] = field(default_factory=list)

    def add(self, event: dict[str, Any]) -> None:
        self.features.extend(event.get("features", []))
        self.tiles.update({t["index"]: t for t in event.get("tiles", [])})

    def merged(self) -> list[dict[str, Any]]:
        return merge(self.features, self.tiles)


@dataclass
class ScanJob:
    """A run's finished units: in its journal beside the output, or in memory when it has no output."""

    log: journal.Journal | None = None
    memory: Progress = field(default_factory=Progress)

    @classmethod
    def open(cls, output: str | None, request: dict[str, Any], resume: bool, kind: str = "scan") -> ScanJob:
        """The job of a run writing `output` (`journal.path_for(output, kind)`); without an output, one
        in memory. Refuses a journal left by an interrupted run unless `resume`."""
        if not output:
            return cls()
        return cls(journal.Journal.open(journal.path_for(output, kind), request, resume))

    @property
    def tiles(self) -> dict[int, dict[str, Any]]:
        """Every finished entry by index (a tile, or a scene's entry; `MERGED_INDEX` included)."""
        return self.log.tiles if self.log is not None else self.memory.tiles

    @property
    def features(self) -> list[dict[str, Any]]:
        return self.log.features if self.log is not None else self.memory.features

    def done(self) -> dict[int, dict[str, Any]]:
        """The finished units, without the entry of the layer written at the end."""
        return {k: e for k, e in self.tiles.items() if k != MERGED_INDEX}

    def record(self, event: dict[str, Any]) -> None:
        """A progress event's finished entries and boxes: on disk (when journalled) before this returns."""
        if self.log is not None:
            self.log.record(event)
        else:
            self.memory.add(event)

    def record_entry(self, entry: dict[str, Any]) -> None:
        """One entry (`index` and what it holds) as its own journal line."""
        self.record({"tiles": [entry], "features": []})

    def merged(self) -> list[dict[str, Any]]:
        """The finished tiles' boxes merged across their seams."""
        return merge(self.features, self.tiles)

    def layer_name(self, index: int, fresh: Callable[[], str]) -> tuple[str, bool]:
        """The name of the layer of entry `index`: the journalled one after a resume (True), else
        `fresh()`, journalled before the layer is written, so that a resume writes it once (False)."""
        recorded = self.tiles.get(index)
        if recorded is not None:
            return str(recorded["layer"]), True
        name = fresh()
        self.record_entry({"index": index, "layer": name})
        return name, False

    def finish(self) -> None:
        """The output is whole: the journal goes."""
        if self.log is not None:
            self.log.remove()

    def close(self) -> None:
        """A stop: the journal is kept, for --resume."""
        if self.log is not None:
            self.log.close()

    def discard(self) -> None:
        """A stop with nothing finished: no journal is left, so the same command runs afresh."""
        if self.log is not None:
            self.log.remove()


def collection(entry: dict[str, Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "crs": entry["crs"], "features": entry["features"]}


def write_layer(path: str, entry: dict[str, Any], resumed: bool = False) -> None:
    """An entry's boxes as the GeoPackage layer its journal entry names (a new layer only). On a resume
    the layer may be there already (the kill came after it was written): then it is left as it is."""
    try:
        output.write_features(path, collection(entry), entry["layer"])
    except EarthDialError as exc:
        if not (resumed and exc.code == ErrorCode.OUTPUT_EXISTS):
            raise
