"""Whole scenes, tile by tile: `earthdial detect`, `detect-changes` and `detect-many` (many scenes on Ray)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from earthdial.cli.arguments import (
    DEVICES,
    add_output_args,
    add_source_args,
    source_of,
)
from earthdial.cli.endpoint import connected
from earthdial.cli.model_choice import choose as choose_model
from earthdial.cli.results import check_outputs, write_output
from earthdial.contract.wire import EarthDialError, source_by_reference


def _add_tiling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tile-size", type=int, default=448, help="tile size in raster pixels (resized to the model's)"
    )
    p.add_argument(
        "--overlap", type=float, default=0.1, help="share of a tile overlapping its neighbours (0-0.5)"
    )
    p.add_argument("--batch", type=int, default=8, help="tiles decoded together")
    p.add_argument(
        "--min-score", type=float, default=0.0, help="drop boxes scored below this (0-1; docs/outputs.md)"
    )
    p.add_argument("--sensor", help="EarthDial sensor tag (default: from the preset and GSD)")


def _add_scan_args(p: argparse.ArgumentParser) -> None:
    _add_tiling_args(p)
    p.add_argument(
        "--endpoint", help="a running `earthdial serve` (progress and Ctrl-C go over the protocol)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds without progress before giving up")
    p.add_argument(
        "--model",
        help="checkpoint directory when running in-process (default: $EARTHDIAL_MODEL, else the demo model)",
    )
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument(
        "--resume", action="store_true", help="go on from the journal an interrupted run left beside -o"
    )
    add_output_args(p, "the merged boxes")


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    end = "\n" if done >= total else ""
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tiles",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def cmd_detect(args: argparse.Namespace) -> int:
    header = {
        "op": "detect",
        "task": args.task,
        "prompt": args.prompt,
        "source": source_of(args),
        "options": _scan_options(args),
    }
    return _run_scan(args, header)


def cmd_detect_changes(args: argparse.Namespace) -> int:
    sources = [source_by_reference(os.path.abspath(p)) for p in args.rasters]
    header = {"op": "detect_changes", "task": "change", "sources": sources, "options": _scan_options(args)}
    return _run_scan(args, header)


def cmd_detect_many(args: argparse.Namespace) -> int:
    """Many scenes on Ray workers (earthdial.jobs.many): a layer per scene and a merged layer in -o."""
    from earthdial.jobs import archive, many
    from earthdial.model import prompts

    many.require_ray()  # a missing extra is said before anything else is looked at
    spec = prompts.task(args.task)
    if spec.images != 1 or not spec.grounded:
        raise EarthDialError(
            "bad_request", f"detect-many runs a grounded one-image task (refer, grounding), not {args.task!r}"
        )
    many.check_output(args.output)
    if args.workers < 1 or not args.cpus_per_worker > 0 or not args.gpus_per_worker >= 0:
        raise EarthDialError(
            "bad_request",
            "--workers must be 1 or more, --cpus-per-worker above 0 and --gpus-per-worker 0 or more",
        )
    scenes = archive.scenes_of(args.rasters, args.list, args.stac, args.asset)
    if not scenes:
        raise EarthDialError("bad_request", "no scenes: name rasters, --list FILE or --stac FILE")
    model = choose_model(args.model).path
    if not model:
        print("earthdial detect-many: pass --model DIR (or set EARTHDIAL_MODEL)", file=sys.stderr)
        return 2
    from earthdial.serving.scan import options_of

    options = _scan_options(args)
    options_of({"options": options})  # tiling and score checked once, here, not in every worker
    job = many.Run(
        scenes,
        args.task,
        args.prompt,
        options,
        args.output,
        os.path.abspath(model) if os.path.exists(model) else model,
        device=args.device,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        ray_address=args.ray_address,
        resume=args.resume,
    )
    try:
        summary = many.run(job, lambda line: print(line, file=sys.stderr, flush=True))
    except EarthDialError as exc:
        if exc.code == "cancelled":
            print(f"\nearthdial detect-many: {exc.message}", file=sys.stderr)
            return 130
        raise
    print(
        f"{summary.scenes} scene(s): {summary.ran} run now, {summary.before} done before, "
        f"{len(summary.errors)} failed; {summary.boxes} boxes in {summary.seconds:.1f} s"
    )
    if summary.merged:
        print(
            f"wrote {len(summary.layers)} scene layer(s) and the merged layer {summary.merged!r} to "
            f"{os.path.realpath(args.output)}"
        )
    for k, error in sorted(summary.errors.items()):
        print(f"failed: {scenes[k].name} ({scenes[k].origin}): {error.code}: {error.message}")
    return 1 if summary.errors else 0


def _scan_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        "tile_size": args.tile_size,
        "overlap": args.overlap,
        "batch": args.batch,
        "min_score": args.min_score,
        "merge": False,
    }
    for name in ("preset", "sensor"):
        if getattr(args, name, None):
            options[name] = getattr(args, name)
    return options


def _run_scan(args: argparse.Namespace, header: dict[str, Any]) -> int:
    """A whole-scene scan (in-process or over the protocol) whose finished tiles go into a journal as they
    come; the output is written from the journal at the end. Ctrl-C, a lost server or an error leaves the
    journal for `--resume` when some tile had finished, and none when nothing had."""
    from earthdial.jobs.job import ScanJob, journalled_options

    name = f"earthdial {args.command}"
    stop = {"now": False}

    def on_sigint(*_: object) -> None:
        stop["now"] = True  # finish the batch in flight, then stop: what is done stays in the journal

    signal.signal(signal.SIGINT, on_sigint)
    check_outputs(args)
    options = header["options"]
    request = {k: header.get(k) for k in ("op", "task", "prompt", "source", "sources")}
    request["options"] = journalled_options(options)
    job = ScanJob.open(args.output, request, args.resume)  # without -o: results in memory only
    shared: dict[str, Any] = {}  # what every box of the scan shares (the plan event's properties)
    if job.log is not None:
        options["skip"] = sorted(job.tiles)
        if job.tiles:
            print(f"resuming: {len(job.tiles)} tile(s) already done", file=sys.stderr)

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "plan":
            shared.update(event.get("properties") or {})
            print(f"{event['total']} tiles of {event['plan']['tile_size']} px", file=sys.stderr)
        elif kind == "progress":
            job.record(event)
            _progress_bar(event["done"], event["total"])

    try:
        if args.endpoint:
            from earthdial.cli import by_value

            # a file the server may not open is streamed: tiles read here, as the model asks for them
            with connected(args.endpoint, args.timeout) as client:
                reply = by_value.scan(
                    client,
                    header,
                    on_event,
                    lambda: stop["now"],
                    lambda line: print(f"{name}: {line}", file=sys.stderr),
                )
        else:
            from earthdial.model.engine import Engine
            from earthdial.serving import scan

            model = choose_model(args.model).path
            if not model:
                job.discard()
                print(f"{name}: pass --model DIR (or set EARTHDIAL_MODEL)", file=sys.stderr)
                return 2
            engine = Engine(model, device=args.device)
            if engine.device == "cpu":  # the scan's reader thread gets a core of its own, as under serve
                import torch

                from earthdial.model.engine import cpu_threads

                torch.set_num_threads(cpu_threads(None))
            reply = scan.run(
                header, engine, lambda event, **f: on_event({"event": event, **f}), lambda: stop["now"]
            )
    except EarthDialError as exc:
        if job.log is not None and job.tiles:
            job.close()
            print(
                f"\n{name}: {exc.message}\n{len(job.tiles)} finished tile(s) are kept in {job.log.path}; "
                "run the same command with --resume to go on",
                file=sys.stderr,
            )
        else:
            job.discard()  # nothing finished (e.g. the request refused): no journal to trip the next run
            if exc.code == "cancelled":
                print(f"\n{name}: {exc.message}; nothing written", file=sys.stderr)
        return 130 if exc.code == "cancelled" else _fail(name, exc)
    tiles = job.tiles
    merged = job.merged()
    crs = reply.get("crs", "")
    print(
        f"{reply['tiles']} tiles ({reply['tiles_done']} run now, {reply['tiles_skipped']} done before) in "
        f"{reply['timings']['total_s']:.1f} s; {len(job.features)} boxes, {len(merged)} after merging"
    )
    if header["op"] == "detect_changes":
        changed = sum(1 for t in tiles.values() if t.get("changed"))
        print(f"{changed} of {len(tiles)} tile pairs changed")
        if args.output:
            _write_changes(args, merged, tiles, crs, shared)
    else:
        collection = {"type": "FeatureCollection", "crs": crs, "features": merged}
        write_output(args.output, {"features": collection, "properties": shared or None, "scan": True}, args)
    job.finish()
    return 0


def _fail(name: str, exc: EarthDialError) -> int:
    print(f"{name}: {exc.code}: {exc.message}", file=sys.stderr)
    return 1


def _write_changes(
    args: argparse.Namespace,
    merged: list[dict[str, Any]],
    tiles: dict[int, dict[str, Any]],
    crs: str,
    shared: dict[str, Any],
) -> None:
    """Two layers: the change boxes and, beside them, the per-tile change map (its name ends in `_tiles`)."""
    from earthdial.contract.result_features import change_map, layer_name
    from earthdial.outputs.files import write_features

    base = getattr(args, "layer", None) or layer_name(shared, scan=True)
    overwrite = getattr(args, "overwrite", False)
    boxes = write_features(
        args.output, {"type": "FeatureCollection", "crs": crs, "features": merged}, base, overwrite=overwrite
    )
    tile_layer = write_features(
        args.output,
        {"type": "FeatureCollection", "crs": crs, "features": change_map(tiles, shared)},
        f"{boxes}_tiles",
        overwrite=overwrite,
    )
    print(
        f"wrote {len(merged)} change box(es) (layer {boxes!r}) and {len(tiles)} tile pair(s) "
        f"(layer {tile_layer!r}) to {os.path.abspath(args.output)}"
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The detect, detect-changes, detect-many subcommands."""
    p = sub.add_parser("detect", help="find objects over a whole raster or extent, tile by tile")
    add_source_args(p)
    p.add_argument("--prompt", required=True, help="what to find, e.g. ships")
    p.add_argument("--task", default="refer", help="a grounded task: refer (default) or grounding")
    p.add_argument("--preset", help="band preset (default: picked from the raster)")
    _add_scan_args(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser(
        "detect-changes", help="change detection over whole layers: BEFORE AFTER [LATER ...], tile by tile"
    )
    p.add_argument(
        "rasters", nargs="+", help="BEFORE AFTER [LATER ...]: later layers are aligned on the first's grid"
    )
    p.add_argument("--preset", help="band preset (default: picked from the first raster)")
    _add_scan_args(p)
    p.set_defaults(func=cmd_detect_changes)

    p = sub.add_parser(
        "detect-many", help="detect over many scenes (paths, list files, STAC items) on Ray workers"
    )
    p.add_argument("rasters", nargs="*", help="scene rasters")
    p.add_argument(
        "--list",
        action="append",
        default=[],
        metavar="FILE",
        help="a file of raster paths, one a line (relative ones: to the file's folder)",
    )
    p.add_argument(
        "--stac",
        action="append",
        default=[],
        metavar="FILE",
        help="a STAC ItemCollection (or Item) JSON file; its assets must be local files",
    )
    p.add_argument("--asset", help="the STAC asset to read (default: visual, else the item's first GeoTIFF)")
    p.add_argument("--prompt", required=True, help="what to find, e.g. ships")
    p.add_argument("--task", default="refer", help="a grounded task: refer (default) or grounding")
    p.add_argument("--preset", help="band preset (default: picked from each raster)")
    _add_tiling_args(p)
    p.add_argument(
        "--model",
        help="checkpoint directory, the same path on every Ray node (default: $EARTHDIAL_MODEL, else the demo model)",
    )
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--workers", type=int, default=2, help="engines (Ray actors), each with its own model")
    p.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="Ray CPU slots (and torch threads) of a worker"
    )
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray GPUs of a worker (e.g. 1)")
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="an existing Ray cluster, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, "
        "else a local Ray started for this run)",
    )
    p.add_argument(
        "-o", "--output", required=True, help="GeoPackage (.gpkg) for a layer per scene and the merged layer"
    )
    p.add_argument(
        "--resume", action="store_true", help="go on from the journal an interrupted run left beside -o"
    )
    p.set_defaults(func=cmd_detect_many)
