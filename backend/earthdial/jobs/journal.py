"""A scan's journal: what a whole-scene run has finished so far, written as it goes, so that nothing
finished is lost to Ctrl-C, a crash or a server restart, and `--resume` can skip the tiles already done.

The journal is a JSON-lines file beside the output (`.OUT.gpkg.scan.jsonl`): a first line naming the
request (its op, task, prompt, sources and tiling), then one line per progress event (its finished tiles
and their boxes), each flushed to disk before the next is awaited. The output itself is written only
at the end, from the journal, after which the journal is removed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.outputs.write_errors import write_error


def path_for(output: str, kind: str = "scan") -> str:
    """The journal of a run writing `output`: `.OUT.gpkg.scan.jsonl` (detect), `.many.jsonl` (detect-many)."""
    folder, name = os.path.split(os.path.abspath(output))
    return os.path.join(folder, f".{name}.{kind}.jsonl")


@dataclass
class Journal:
    path: str
    request: dict[str, Any]
    tiles: dict[int, dict[str, Any]] = field(default_factory=dict)  # finished tiles by index
    features: list[dict[str, Any]] = field(default_factory=list)  # raw boxes of the finished tiles
    _file: Any = None

    @classmethod
    def open(cls, path: str, request: dict[str, Any], resume: bool) -> Journal:
        """A fresh journal, or with `resume` the one left by an interrupted run of the same request."""
        journal = cls(path, request)
        if os.path.exists(path):
            if not resume:
                raise EarthDialError(
                    ErrorCode.BAD_REQUEST,
                    f"an interrupted scan left {path}: pass --resume to "
                    "go on from it, or delete it to start again",
                )
            journal._load()
            try:
                journal._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run's length)
            except OSError as exc:
                raise _typed(exc, path, "opening the scan journal") from None
            return journal
        try:
            journal._file = open(path, "x", encoding="utf-8")  # noqa: SIM115
            journal._write({"request": request})
        except EarthDialError:
            journal._discard()  # a journal without its first line resumes nothing: leave none behind
            raise
        except OSError as exc:
            raise _typed(exc, path, "creating the scan journal") from None
        return journal

    def _discard(self) -> None:
        try:
            self.close()
        except OSError:
            pass
        try:
            os.remove(self.path)
        except OSError:
            pass

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        try:
            first = json.loads(lines[0])
        except ValueError:
            raise EarthDialError(ErrorCode.BAD_REQUEST, f"{self.path} is not a scan journal") from None
        if not isinstance(first, dict) or first.get("request") != self.request:
            raise EarthDialError(
                ErrorCode.BAD_REQUEST,
                f"{self.path} was left by another scan (other layer, "
                "prompt or tiling): it cannot be resumed with these arguments",
            )
        good = len(lines[0]) + 1
        for line in lines[1:-1]:  # the part after the last newline was cut short: its tiles run again
            try:
                event = json.loads(line)
            except ValueError:
                break
            self._add(event)
            good += len(line) + 1
        # boxes of a tile whose entry never came (cut off mid-tile) are dropped: that tile runs again
        self.features = [f for f in self.features if f["properties"].get("tile") in self.tiles]
        with open(self.path, "r+b") as out:  # another name: mypy types `f` as the reader above
            out.truncate(good)  # appends go after the last whole line

    def _add(self, event: dict[str, Any]) -> None:
        for tile in event.get("tiles", []):
            self.tiles[int(tile["index"])] = tile
        self.features += event.get("features", [])

    def _write(self, record: dict[str, Any]) -> None:
        """One line, on disk before this returns; a full disk or a folder that turned read-only is a
        typed error (the lines before stay whole: a cut last line is dropped on --resume)."""
        try:
            self._file.write(json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise _typed(exc, self.path, "writing the scan journal") from None

    def record(self, event: dict[str, Any]) -> None:
        """A progress event's finished tiles and boxes, on disk before this returns."""
        entry = {"tiles": event.get("tiles", []), "features": event.get("features", [])}
        self._write(entry)
        self._add(entry)

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:  # its buffer was flushed (and failed) already, and said so
                pass

    def remove(self) -> None:
        self.close()
        os.remove(self.path)


def _typed(exc: OSError, path: str, what: str) -> EarthDialError:
    """`disk_full`, `read_only`, ... as output files report them (output.py's classification)."""
    return write_error(exc, path, f"{what} {path}")
