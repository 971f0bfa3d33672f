"""Archive scale (`earthdial detect-many`): one scene engine per worker through Ray Data, many scenes.

Each worker is a Ray actor holding one `engine.Engine` (its GPU or CPU slots are the actor's Ray
resources); a scene goes to a free worker, which runs the one-scene `detect` op (`scan.run`) on it in
process and returns the scene's merged boxes, exactly what `earthdial detect` writes for that scene. The
driver (this process) takes the scenes as they finish, in any order, and for each one

1. records it in a journal beside the output (`.OUT.gpkg.many.jsonl`, the scan job of `job.ScanJob`: one
   fsynced line per scene, holding its boxes and the name of its layer), then
2. adds its layer to the GeoPackage (`output.write_features`: one SQLite transaction, a new layer only;
   nothing there is ever replaced).

When every scene is done, the merged layer (all scenes' boxes, in their common CRS or else EPSG:4326) is
added the same way and the journal removed. A kill at any moment loses only the scenes in flight:
`--resume` writes the layers of journalled scenes that did not reach the file, runs the scenes not yet
journalled, and writes the merged layer. A scene that cannot be run (unreadable, no CRS, remote) gets its
typed error in the summary; the other scenes' layers and the merged layer are written all the same.

Ray is an optional extra (`pip install 'earthdial-qgis[cluster]'`), imported only here, only when a run
starts: on a local Ray started for the run (the default, shut down at its end) or an existing cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from earthdial.contract.wire import EarthDialError, ErrorCode, source_by_reference
from earthdial.jobs import job as scan_job
from earthdial.jobs.archive import Scene
from earthdial.outputs import files as output
from earthdial.serving import scan

if TYPE_CHECKING:  # torch only where the model runs
    from earthdial.model.engine import Engine

RAY_HINT = (
    "pip install 'earthdial-qgis[cluster]' (or pip install 'ray[data]>=2.40' into the backend's environment)"
)
MERGED_INDEX = scan_job.MERGED_INDEX  # the journal entry of the merged layer, beside the scenes' 0, 1, 2 ...
MERGED_CRS = "EPSG:4326"  # the merged layer's CRS when the scenes do not share one
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # results are small JSON; a local Ray needs no 30 % of the RAM

Say = Callable[[str], None]


def require_ray() -> Any:
    """The `ray` module with Ray Data, or `missing_dependency` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EarthDialError(
            ErrorCode.MISSING_DEPENDENCY, f"detect-many runs on Ray, which is not installed: {RAY_HINT}"
        ) from None
    return ray


@dataclass
class Run:
    """One detect-many run: what to ask, of which scenes, into which GeoPackage, on which workers."""

    scenes: list[Scene]
    task: str
    prompt: str
    options: dict[str, Any]  # a detect request's options (cli.scan): tiling, batch, score, preset
    output: str
    model: str
    device: str = "auto"
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    ray_address: str | None = None
    resume: bool = False


@dataclass
class Summary:
    scenes: int
    ran: int = 0  # scenes run by workers in this invocation
    before: int = 0  # scenes already done by an earlier, interrupted invocation
    errors: dict[int, EarthDialError] = field(default_factory=dict)  # scene index -> its typed error
    layers: dict[int, str] = field(default_factory=dict)  # scene index -> its layer
    merged: str | None = None  # the merged layer's name
    boxes: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# The worker side: one engine, one scene at a time
# --------------------------------------------------------------------------------------------------


def scene_header(path: str, task: str, prompt: str, options: dict[str, Any]) -> dict[str, Any]:
    """The `detect` request `earthdial detect PATH` sends for one scene."""
    return {
        "op": "detect",
        "task": task,
        "prompt": prompt,
        "source": source_by_reference(path),
        "options": {**options, "merge": False},
    }


def detect_scene(header: dict[str, Any], engine: Engine | None) -> dict[str, Any]:
    """One scene through the streaming detect op; the boxes merged and answered as `earthdial detect`
    writes them. Returns plain JSON data: `ok` with features and CRS, or `ok` false with a typed error."""
    started = time.perf_counter()
    progress = scan_job.Progress()  # a scene's tiles, merged as `earthdial detect` merges them

    def emit(event: str, **fields: Any) -> None:
        if event == "progress":
            progress.add(fields)

    try:
        reply = scan.run(header, engine, emit)
    except EarthDialError as exc:
        return {"ok": False, "code": exc.code, "message": exc.message}
    except Exception as exc:  # a bug or a library failure on this scene: reported, the run goes on
        return {"ok": False, "code": ErrorCode.INTERNAL, "message": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "features": progress.merged(), "crs": reply["crs"], "tiles": reply["tiles"],
            "raw_boxes": len(progress.features), "seconds": time.perf_counter() - started,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip


class SceneWorker:
    """A Ray Data actor: loads the engine once, then runs the scenes of each batch it is handed."""

    def __init__(self, model: str, device: str, threads: int) -> None:
        self.engine: Engine | None = None
        self.failure: dict[str, Any] | None = None
        try:
            import torch

            torch.set_num_threads(max(1, threads))  # the actor's CPU slots, not every core of the node
            from earthdial.model.engine import Engine  # torch only in the actor, after its thread count

            self.engine = Engine(model, device=device)
        except EarthDialError as exc:
            self.failure = {"ok": False, "fatal": True, "code": exc.code, "message": exc.message}
        except Exception as exc:  # a model that cannot load stops the run (it is kept for --resume)
            self.failure = {
                "ok": False,
                "fatal": True,
                "code": ErrorCode.MODEL_ERROR,
                "message": f"cannot load {model} on {socket.gethostname()}: {type(exc).__name__}: {exc}",
            }

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        results = []
        for header in batch["header"]:
            result = self.failure or detect_scene(json.loads(str(header)), self.engine)
            results.append(json.dumps(result, allow_nan=False))
        return {"index": [int(i) for i in batch["index"]], "result": results}


# --------------------------------------------------------------------------------------------------
# The driver side: Ray, the journal, the GeoPackage
# --------------------------------------------------------------------------------------------------


def check_output(path: str) -> str:
    """detect-many writes many layers: a GeoPackage only. The refusals of output.check_target come first
    (a file that is not ours, a missing folder), before any worker starts."""
    if os.path.splitext(str(path))[1].lower() != ".gpkg":
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"detect-many writes a layer per scene and a merged "
            f"layer into a GeoPackage: -o must end in .gpkg, got {path!r:.200}",
        )
    output.check_target(path)
    return os.path.realpath(path)


def run(job: Run, say: Say) -> Summary:
    """Carry out a detect-many run (module docstring). Ctrl-C stops it once the scene being written is
    written: raises `cancelled`, with every finished scene kept for `--resume`."""
    started = time.perf_counter()
    path = check_output(job.output)
    request = {
        "op": "detect-many",
        "task": job.task,
        "prompt": job.prompt,
        "model": job.model,
        "options": scan_job.journalled_options(job.options),
        "scenes": [s.path for s in job.scenes],
    }
    log = scan_job.ScanJob.open(path, request, job.resume, "many")
    summary = Summary(len(job.scenes))
    when = datetime.now(timezone.utc)
    stop = {"asked": False, "writing": False}

    def on_sigint(*_: object) -> None:
        stop["asked"] = True
        if not stop["writing"]:  # else the scene being journalled and written is finished first
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        done = log.done()
        summary.before = len(done)
        if done:
            say(f"resuming: {len(done)} of {len(job.scenes)} scene(s) already done")
        for k, entry in sorted(done.items()):
            scan_job.write_layer(path, entry, resumed=True)  # a kill between journal and GeoPackage: now
            summary.layers[k] = entry["layer"]
        for k, scene in enumerate(job.scenes):
            if scene.error is not None and k not in done:
                summary.errors[k] = scene.error
                say(f"scene {scene.name}: {scene.error.code}: {scene.error.message}")
        todo = [k for k, s in enumerate(job.scenes) if k not in done and s.error is None]
        if todo and MERGED_INDEX not in log.tiles:  # (a merged entry: the kill came after every scene)
            items = [
                {
                    "index": k,
                    "header": json.dumps(scene_header(job.scenes[k].path, job.task, job.prompt, job.options)),
                }
                for k in todo
            ]
            with contextlib.closing(_stream(job, items, say)) as rows:  # Ray shut down however this ends
                for row in rows:
                    stop["writing"] = True
                    _take(job, path, log, int(row["index"]), json.loads(row["result"]), when, summary, say)
                    stop["writing"] = False
                    if stop["asked"]:
                        raise KeyboardInterrupt
        done = log.done()
        if done:
            summary.merged = _write_merged(path, log, done, job, when)
        summary.boxes = sum(len(e["features"]) for e in done.values())
        log.finish()
    except KeyboardInterrupt:
        log.close()
        raise EarthDialError(ErrorCode.CANCELLED, "interrupted" + _kept(log, path)) from None
    except EarthDialError as exc:
        log.close()
        raise EarthDialError(exc.code, exc.message + _kept(log, path)) from None
    except Exception as exc:  # Ray's own failures (a worker lost for good, the cluster gone ...)
        log.close()
        raise EarthDialError(
            ErrorCode.INTERNAL, f"the run failed: {type(exc).__name__}: {str(exc)[:2000]}" + _kept(log, path)
        ) from exc
    except BaseException:
        log.close()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    summary.seconds = time.perf_counter() - started
    return summary


def _kept(log: scan_job.ScanJob, path: str) -> str:
    """What a stopped run leaves: its finished scenes and the journal to resume from; no journal when
    nothing was finished (so the same command runs afresh without --resume)."""
    kept = len(log.done())
    if not kept:
        log.discard()
        return "; no scene was finished"
    where = log.log.path if log.log is not None else ""
    return (
        f"; the {kept} finished scene(s) are kept in {path} and {where}: run the same command with "
        "--resume to go on"
    )


def _take(
    job: Run,
    path: str,
    log: scan_job.ScanJob,
    k: int,
    result: dict[str, Any],
    when: datetime,
    summary: Summary,
    say: Say,
) -> None:
    """A worker's result for scene `k`: journalled, then written as its layer; or its typed error."""
    scene = job.scenes[k]
    if result.get("fatal"):  # the worker has no engine: nothing will run, the run stops resumable
        raise EarthDialError(result["code"], result["message"])
    if not result["ok"]:
        summary.errors[k] = EarthDialError(result["code"], result["message"])
        say(f"scene {scene.name}: {result['code']}: {result['message']}")
        return
    layer = output.free_layer_name(path, output.layer_name(job.task, job.prompt, [scene.name], when))
    entry = {
        "index": k,
        "scene": scene.path,
        "name": scene.name,
        "crs": result["crs"],
        "layer": layer,
        "tiles": result["tiles"],
        "features": result["features"],
    }
    log.record_entry(entry)  # on disk before its layer is written
    scan_job.write_layer(path, entry)
    summary.layers[k] = layer
    summary.ran += 1
    say(
        f"scene {len(summary.layers)}/{len(job.scenes)} {scene.name}: {result['tiles']} tiles, "
        f"{len(result['features'])} boxes in {result['seconds']:.1f} s on {result['worker']} "
        f"-> layer {layer!r}"
    )


def _stream(job: Run, items: list[dict[str, Any]], say: Say) -> Generator[dict[str, Any], None, None]:
    """The workers' results, one row per scene as it finishes: Ray Data's streaming executor over an
    actor pool of engines. Starts a local Ray unless one is running or --ray-address names a cluster."""
    ray = require_ray()
    started = not ray.is_initialized()  # a Ray this run connects to (or starts) is let go at its end
    try:
        if started:  # inside the try: a Ctrl-C while Ray starts still shuts down what was started
            quiet = {"logging_level": logging.WARNING, "log_to_driver": False, "configure_logging": False}
            if job.ray_address:
                ray.init(address=job.ray_address, **quiet)
            else:
                cpus = max(1, math.ceil(job.workers * job.cpus_per_worker))
                ray.init(
                    address="local",
                    num_cpus=cpus,
                    include_dashboard=False,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    **quiet,
                )
        size = _pool_size(ray.cluster_resources(), job, len(items), say)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress lines would bury ours
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        dataset = ray.data.from_items(items, override_num_blocks=len(items))  # a block per scene
        results = dataset.map_batches(
            SceneWorker,
            fn_constructor_kwargs={
                "model": job.model,
                "device": job.device,
                "threads": max(1, int(job.cpus_per_worker)),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
            num_cpus=job.cpus_per_worker,
            num_gpus=job.gpus_per_worker or None,
        )
        say(f"{len(items)} scene(s) on {size} worker(s) ({_slots(job)} each)")
        yield from results.iter_rows()
    finally:
        if started:
            with contextlib.suppress(Exception):
                ray.shutdown()


def _slots(job: Run) -> str:
    gpus = f", {job.gpus_per_worker:g} GPU" if job.gpus_per_worker else ""
    return f"{job.cpus_per_worker:g} CPU{gpus}"


def _pool_size(resources: dict[str, float], job: Run, scenes: int, say: Say) -> int:
    """Workers that fit the cluster's resources (an actor that never fits would wait for ever)."""
    fits = [int(resources.get("CPU", 0) // job.cpus_per_worker)] if job.cpus_per_worker else []
    if job.gpus_per_worker:
        fits.append(int(resources.get("GPU", 0) // job.gpus_per_worker))
    fit = min(fits) if fits else job.workers
    if fit < 1:
        have = f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"a worker needs {_slots(job)} but the Ray cluster has "
            f"{have}: lower --cpus-per-worker/--gpus-per-worker or add nodes",
        )
    size = max(1, min(job.workers, fit, scenes))
    if size < min(job.workers, scenes):
        say(f"the Ray cluster fits {fit} worker(s) of {_slots(job)}: running {size}, not {job.workers}")
    return size


def _write_merged(
    path: str, log: scan_job.ScanJob, done: dict[int, dict[str, Any]], job: Run, when: datetime
) -> str:
    """Every finished scene's boxes in one layer: in the scenes' CRS when they share one, else in
    EPSG:4326. Its name is journalled first, so a resume after a kill here writes it once."""
    entries = [done[k] for k in sorted(done)]
    crss = {e["crs"] for e in entries}
    crs = crss.pop() if len(crss) == 1 else MERGED_CRS
    features = [
        f
        for e in entries
        for f in (e["features"] if e["crs"] == crs else _to_crs(e["features"], e["crs"], crs))
    ]
    name, resumed = log.layer_name(
        MERGED_INDEX,
        lambda: output.free_layer_name(path, output.layer_name(job.task, job.prompt, ["all"], when)),
    )
    scan_job.write_layer(path, {"crs": crs, "features": features, "layer": name}, resumed=resumed)
    return name


def _to_crs(features: list[dict[str, Any]], src: str, dst: str) -> list[dict[str, Any]]:
    """Features' polygons carried from CRS `src` into `dst` (corners only: boxes stay four-sided)."""
    from pyproj import Transformer

    move = Transformer.from_crs(src, dst, always_xy=True)
    moved = []
    for f in features:
        geometry = f.get("geometry")
        if geometry and geometry.get("type") == "Polygon":
            rings = [[list(move.transform(x, y)) for x, y, *_ in ring] for ring in geometry["coordinates"]]
            f = {**f, "geometry": {"type": "Polygon", "coordinates": rings}}
        moved.append(f)
    return moved
