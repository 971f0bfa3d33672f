"""The `earthdial` command: serve, ask, georef, status, make-tiny-checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from earthdial.cli.model_choice import choose as choose_model
from earthdial.contract.protocol import DEFAULT_ENDPOINT, Client, EarthDialError, source_by_reference

DEVICES = ["auto", "cpu", "cuda", "mps"]  # engine.pick_device; mps: Apple silicon's GPU


class DeprecatedFlag(argparse.Action):
    """A flag's former name: it still sets the flag's value, and says on stderr which name replaces it."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        print(f"earthdial: warning: {option_string} is deprecated, use {self.new} (the same values)",
              file=sys.stderr)  # fmt: skip
        setattr(namespace, self.dest, values)


def _bands(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bands must be comma-separated 1-based integers, got {text!r}"
        ) from None


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("raster", help="raster file (anything GDAL reads)")
    p.add_argument("--bands", type=_bands, help="1-based band indexes, e.g. 1,2,3 (default: the first three)")
    p.add_argument(
        "--bounds", type=float, nargs=4, metavar=("MINX", "MINY", "MAXX", "MAXY"), help="window to read"
    )
    p.add_argument("--bounds-crs", help="CRS of --bounds (default: the raster's CRS), e.g. EPSG:4326")


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", help="band preset, e.g. rgb8, rgb16, s2_l2a, s2_rgb, landsat8, s1_vh_linear, rgbn"
    )
    p.add_argument("--gsd", type=float, help="read at this many ground metres per pixel (default: native)")
    p.add_argument(
        "--sensor", help="EarthDial sensor tag, e.g. [s2_rgb_10] (default: from the preset and GSD)"
    )


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
    p.add_argument("--model", help="checkpoint directory when running in-process (default: $EARTHDIAL_MODEL, else the demo model)")  # fmt: skip
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument(
        "--resume", action="store_true", help="go on from the journal an interrupted run left beside -o"
    )
    _add_output_args(p, "the merged boxes")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("preset", "gsd", "sensor", "max_new_tokens")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _source(args: argparse.Namespace) -> dict[str, Any]:
    return source_by_reference(os.path.abspath(args.raster), args.bands, args.bounds, args.bounds_crs)


PING_TIMEOUT_S = 3.0  # an endpoint named on the command line that does not answer: an error this soon
PROBE_TIMEOUT_S = 1.5  # the default endpoint, tried when neither --endpoint nor --model is given


def _default_endpoint() -> str:
    return os.environ.get("EARTHDIAL_ENDPOINT") or DEFAULT_ENDPOINT


@contextlib.contextmanager
def _connected(endpoint: str, timeout_s: float) -> Iterator[Client]:
    """A Client whose server answered a ping: a server that is not there fails in seconds, not after
    the whole request timeout."""
    with Client(endpoint, timeout_s=timeout_s) as client:
        client.ping(timeout_s=min(PING_TIMEOUT_S, timeout_s))
        yield client


def _answers(endpoint: str) -> bool:
    try:
        with Client(endpoint, timeout_s=PROBE_TIMEOUT_S) as client:
            client.ping(timeout_s=PROBE_TIMEOUT_S)
        return True
    except EarthDialError:
        return False


def _add_output_args(p: argparse.ArgumentParser, what: str = "the boxes") -> None:
    p.add_argument("-o", "--output", help=f"GeoPackage (.gpkg: adds a layer) or GeoJSON file for {what}")
    p.add_argument("--layer", help="layer name in the GeoPackage (default: task, prompt, source and time)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier EarthDial layer (or GeoJSON file) of that name; never another's")  # fmt: skip


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable outputs before any model runs (write_features and write_png check again)."""
    if getattr(args, "output", None):
        from earthdial.outputs.files import check_target

        check_target(args.output, getattr(args, "layer", None), getattr(args, "overwrite", False))
    elif getattr(args, "layer", None):
        raise EarthDialError(
            "bad_request", "--layer names a layer of the -o GeoPackage: pass -o FILE.gpkg too"
        )
    if getattr(args, "preview", None):
        from earthdial.outputs.preview import check_target as check_preview

        check_preview(args.preview)


def _write_output(path: str | None, reply: dict[str, Any], args: argparse.Namespace | None = None) -> None:
    """Write the reply's boxes where -o says: a new layer of a GeoPackage, or a GeoJSON file."""
    features = reply["features"]
    n = len(features["features"])
    if not path:
        print(f"{n} grounded box(es); pass -o OUT.gpkg to write them")
        return
    from earthdial.contract.result_features import layer_name as result_layer_name
    from earthdial.outputs.files import layer_name, write_features

    # named from what the backend recorded (task, the prompt it kept, source, time; scans say so)
    shared = reply.get("properties") or (features["features"][0]["properties"] if n else None)
    base = result_layer_name(shared, scan=bool(reply.get("scan"))) if shared else None
    if base is None and args is not None:
        rasters = getattr(args, "rasters", None) or [getattr(args, "raster", None)]
        task = getattr(args, "task", None) or getattr(args, "command", None)
        base = layer_name(task, getattr(args, "prompt", None), rasters, datetime.now(timezone.utc))
    layer = write_features(path, features, getattr(args, "layer", None),
                           overwrite=getattr(args, "overwrite", False), base_name=base)  # fmt: skip
    print(
        f"wrote {n} feature(s) to {os.path.realpath(path)} (layer {layer!r}, CRS {str(features['crs'])[:60]})"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import zmq

    from earthdial.serving import access
    from earthdial.serving.server import Server

    def refuse(message: str, code: int = 2) -> int:
        print(f"earthdial serve: {message}", file=sys.stderr)
        return code

    secret = clients = None
    try:
        if args.curve_secret_key:
            secret = access.read_key(args.curve_secret_key, secret=True)
        if args.curve_clients:
            if not secret:
                return refuse("--curve-clients needs --curve-secret-key")
            clients = access.read_client_keys(args.curve_clients)
    except (OSError, ValueError) as exc:
        return refuse(f"cannot read CURVE keys: {exc}")
    refusal = access.bind_refusal(args.endpoint, curve=secret is not None)
    if refusal:
        return refuse(refusal)
    dirs = list(args.allow_dir or [])  # what the user asked for; never the working directory by itself
    bad = [d for d in dirs if not os.path.isdir(d)]
    if bad:
        return refuse(f"--allow-dir must name directories: {', '.join(bad)}")
    engine = None
    if not args.no_model:
        model = choose_model(args.model).path
        if not model:
            return refuse("no model; pass --model DIR, set EARTHDIAL_MODEL, or pass --no-model (georef only)")
        from earthdial.install import machine
        from earthdial.model.checkpoint import CheckpointError
        from earthdial.model.engine import Engine, pick_device
        from earthdial.model.precision import choose, llm_width

        machine_report = machine.at_start_up()
        try:
            chosen = choose(pick_device(args.device), args.dtype, llm_width(model))
            print(f"earthdial: computing in {chosen.reason}", file=sys.stderr, flush=True)
            plan = _memory_plan(model, args, chosen.bytes)
            if plan is not None and plan.batch == 0:
                return refuse(plan.message, 4)
            engine = Engine(model, device=args.device, max_tiles=args.max_tiles, quantize=args.quantize,
                            cache_mode=args.cache_mode, adapter=args.adapter, dtype=chosen)  # fmt: skip
            if args.decoding != "auto":
                engine.decoding = args.decoding
        except (CheckpointError, OSError, RuntimeError, ValueError) as exc:
            return refuse(
                f"cannot load {model}{' with adapter ' + args.adapter if args.adapter else ''}: {exc}", 3
            )
        engine.machine = machine_report
        if plan is not None:
            engine.plan = plan.as_dict()
            args.max_batch = plan.batch
        if engine.device == "cpu":
            import torch

            from earthdial.model.engine import cpu_threads

            threads = cpu_threads(args.threads)
            if threads:
                torch.set_num_threads(threads)
            print(f"earthdial: {torch.get_num_threads()} torch thread(s) on the CPU", file=sys.stderr)
    from earthdial.serving.connections import raise_open_file_limit
    from earthdial.serving.limits import MIB, Limits

    access.harden_process()  # PROJ network and GDAL HTTP off, GDAL reads only the named file
    raise_open_file_limit()
    budgets = Limits(max_pixels=args.max_pixels, max_value_pixels=args.max_value_pixels, max_bands=args.max_bands,
                     max_scan_tiles=args.max_scan_tiles, max_reply_bytes=int(args.max_reply_mb * MIB),
                     max_queue_bytes=int(args.max_queue_mb * MIB), deadline_s=args.deadline,
                     scan_deadline_s=args.scan_deadline, stream_timeout_s=args.stream_timeout,
                     read_timeout_s=args.read_timeout)  # fmt: skip
    try:
        server = Server(engine, args.endpoint, queue_size=args.queue_size, max_batch=args.max_batch,
                        client_queue=args.client_queue,
                        curve_secret_key=secret, curve_clients=clients, allowed_dirs=dirs, budgets=budgets,
                        max_connections=args.max_connections, idle_timeout_s=args.idle_timeout,
                        reader_processes=args.readers)  # fmt: skip
    except zmq.ZMQError as exc:
        return refuse(f"cannot bind {args.endpoint}: {exc}")
    signal.signal(signal.SIGTERM, lambda *_: server.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: server.stop_event.set())
    reads = ", ".join(access.allowed_dirs() or ()) or "no directory (pass --allow-dir DIR)"
    print(f"earthdial: access: {access.describe(secret, clients)}; reads files under {reads}; "
          f"at most {server.connections.cap} connections", flush=True)  # fmt: skip
    if secret is not None and clients is None and not access.is_loopback(args.endpoint):
        print("earthdial serve: warning: any client that knows the server's public key can connect; "
              "pass --curve-clients DIR to admit only listed client keys", file=sys.stderr)  # fmt: skip
    if engine is None:
        print(f"earthdial: serving no model (georef only) on {server.bound}", flush=True)
    else:
        d = engine.describe()
        if d.get("demo"):
            print("earthdial: this is the built-in demo model (a 3 M-parameter micro EarthDial trained on "
                  "synthetic scenes only; see docs/demo-model.md)", flush=True)  # fmt: skip
        if d.get("adapter"):
            print(f"earthdial: with the LoRA adapter {d['adapter']['path']} (merged)", flush=True)
        print(f"earthdial: serving {d['variant']} ({d['path']}) on {server.bound} [{d['device']}, {d['dtype']}]",
              flush=True)  # fmt: skip
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def _memory_plan(model: str, args: argparse.Namespace, dtype_bytes: int) -> Any:
    """The start-up memory plan for a checkpoint (from its config alone, before any weight is read)."""
    from earthdial.model import memory
    from earthdial.model.engine import pick_device
    from earthdial.model.precision import cpu_flags, native_bf16
    from earthdial.model.quantize import device_memory

    try:
        shapes = memory.shapes_of_checkpoint(model)
    except Exception:  # an unreadable config is reported by the loader, with its reasons
        return None
    device = pick_device(args.device)
    cfg = json.loads((Path(model) / "config.json").read_text())
    tiles = (args.max_tiles or int(cfg.get("max_dynamic_patch", 6))) + 1  # + the thumbnail
    free, _ = device_memory(device)
    return memory.plan(
        shapes, device, free, dtype_bytes, args.quantize, tiles=tiles, want_batch=args.max_batch,
        cpu_bf16=native_bf16(cpu_flags()) is not None,
    )  # fmt: skip


def cmd_keygen(args: argparse.Namespace) -> int:
    from earthdial.serving import access

    try:
        paths = access.keygen(args.directory)
    except (OSError, ValueError) as exc:
        print(f"earthdial keygen: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"wrote {path}{'  (mode 0600: keep it private)' if name.endswith('secret') else ''}")
    server_key = access.read_key(paths["server.public"]).decode()
    print(f"server public key (give it to clients, e.g. the QGIS plugin's settings): {server_key}")
    print(
        f"serve with: earthdial serve --curve-secret-key {paths['server.secret']} --curve-clients {args.directory}"
    )
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    _check_outputs(args)
    if args.task is None:
        from earthdial.model.prompts import default_task

        args.task = default_task(args.prompt)
        why = (f"finding {args.prompt.strip()!r} (--task chat asks it as a question)" if args.task == "refer"
               else "the prompt is a question (--task refer with a prompt naming objects returns boxes)")  # fmt: skip
        print(f"earthdial ask: task {args.task}: {why}", file=sys.stderr)
    header = {
        "op": "ask",
        "task": args.task,
        "prompt": args.prompt,
        "source": _source(args),
        "options": _options(args),
    }
    reply = _ask_and_report(header, args)
    if args.preview:
        _write_preview(args, reply)
    return 0


def _ask_and_report(header: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run an `ask`, print its answer and input notes, write its boxes where -o says."""
    reply = _run(header, args)
    print(reply["answer"])
    for warning in reply.get("input", {}).get("warnings", []):
        print(f"note: {warning}", file=sys.stderr)
    _write_output(args.output, reply, args)
    return reply


def _write_preview(args: argparse.Namespace, reply: dict[str, Any]) -> None:
    """The window that was asked about, as the server read it, with the returned boxes drawn on it."""
    from earthdial.geo.imagery import read_chip
    from earthdial.outputs import preview

    chip = read_chip(os.path.abspath(args.raster), bands=reply["chip"]["bands"], bounds=args.bounds,
                     bounds_crs=args.bounds_crs)  # fmt: skip
    path = preview.write_png(args.preview, preview.draw(chip, reply["features"]))
    print(f"wrote a preview with the boxes drawn to {path.resolve()}")


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
    header = {"op": "detect", "task": args.task, "prompt": args.prompt, "source": _source(args),
              "options": _scan_options(args)}  # fmt: skip
    return _run_scan(args, header)


def cmd_detect_changes(args: argparse.Namespace) -> int:
    sources = [source_by_reference(os.path.abspath(p)) for p in args.rasters]
    header = {"op": "detect_changes", "task": "change", "sources": sources, "options": _scan_options(args)}
    return _run_scan(args, header)


def cmd_detect_many(args: argparse.Namespace) -> int:
    """Many scenes on Ray workers (earthdial.scenes.many): a layer per scene and a merged layer in -o."""
    from earthdial.model import prompts
    from earthdial.scenes import archive, many

    many.require_ray()  # a missing extra is said before anything else is looked at
    spec = prompts.task(args.task)
    if spec.images != 1 or not spec.grounded:
        raise EarthDialError("bad_request", f"detect-many runs a grounded one-image task (refer, grounding), not {args.task!r}")  # fmt: skip
    many.check_output(args.output)
    if args.workers < 1 or not args.cpus_per_worker > 0 or not args.gpus_per_worker >= 0:
        raise EarthDialError("bad_request", "--workers must be 1 or more, --cpus-per-worker above 0 and --gpus-per-worker 0 or more")  # fmt: skip
    scenes = archive.scenes_of(args.rasters, args.list, args.stac, args.asset)
    if not scenes:
        raise EarthDialError("bad_request", "no scenes: name rasters, --list FILE or --stac FILE")
    model = choose_model(args.model).path
    if not model:
        print("earthdial detect-many: pass --model DIR (or set EARTHDIAL_MODEL)", file=sys.stderr)
        return 2
    from earthdial.scenes.scan import options_of

    options = _scan_options(args)
    options_of({"options": options})  # tiling and score checked once, here, not in every worker
    job = many.Run(scenes, args.task, args.prompt, options, args.output,
                   os.path.abspath(model) if os.path.exists(model) else model, device=args.device,
                   workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                   gpus_per_worker=args.gpus_per_worker, ray_address=args.ray_address, resume=args.resume)  # fmt: skip
    try:
        summary = many.run(job, lambda line: print(line, file=sys.stderr, flush=True))
    except EarthDialError as exc:
        if exc.code == "cancelled":
            print(f"\nearthdial detect-many: {exc.message}", file=sys.stderr)
            return 130
        raise
    print(f"{summary.scenes} scene(s): {summary.ran} run now, {summary.before} done before, "
          f"{len(summary.errors)} failed; {summary.boxes} boxes in {summary.seconds:.1f} s")  # fmt: skip
    if summary.merged:
        print(f"wrote {len(summary.layers)} scene layer(s) and the merged layer {summary.merged!r} to "
              f"{os.path.realpath(args.output)}")  # fmt: skip
    for k, error in sorted(summary.errors.items()):
        print(f"failed: {scenes[k].name} ({scenes[k].origin}): {error.code}: {error.message}")
    return 1 if summary.errors else 0


def _scan_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"tile_size": args.tile_size, "overlap": args.overlap, "batch": args.batch,
               "min_score": args.min_score, "merge": False}  # fmt: skip
    for name in ("preset", "sensor"):
        if getattr(args, name, None):
            options[name] = getattr(args, name)
    return options


def _run_scan(args: argparse.Namespace, header: dict[str, Any]) -> int:
    """A whole-scene scan (in-process or over the protocol) whose finished tiles go into a journal as they
    come; the output is written from the journal at the end. Ctrl-C, a lost server or an error leaves the
    journal for `--resume`."""
    from earthdial.scenes.job import ScanJob, journalled_options

    name = f"earthdial {args.command}"
    stop = {"now": False}

    def on_sigint(*_: object) -> None:
        stop["now"] = True  # finish the batch in flight, then stop: what is done stays in the journal

    signal.signal(signal.SIGINT, on_sigint)
    _check_outputs(args)
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
            with _connected(args.endpoint, args.timeout) as client:
                reply = by_value.scan(client, header, on_event, lambda: stop["now"],
                                      lambda line: print(f"{name}: {line}", file=sys.stderr))  # fmt: skip
        else:
            from earthdial.model.engine import Engine
            from earthdial.scenes import scan

            model = choose_model(args.model).path
            if not model:
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
        if job.log is not None:
            job.close()
            if exc.code in ("cancelled", "disconnected", "timeout") or job.tiles:
                print(f"\n{name}: {exc.message}\n{len(job.tiles)} finished tile(s) are kept in {job.log.path}; "
                      "run the same command with --resume to go on", file=sys.stderr)  # fmt: skip
        elif exc.code == "cancelled":
            print(f"\n{name}: {exc.message}; nothing written", file=sys.stderr)
        return 130 if exc.code == "cancelled" else _fail(name, exc)
    tiles = job.tiles
    merged = job.merged()
    crs = reply.get("crs", "")
    print(f"{reply['tiles']} tiles ({reply['tiles_done']} run now, {reply['tiles_skipped']} done before) in "
          f"{reply['timings']['total_s']:.1f} s; {len(job.features)} boxes, {len(merged)} after merging")  # fmt: skip
    if header["op"] == "detect_changes":
        changed = sum(1 for t in tiles.values() if t.get("changed"))
        print(f"{changed} of {len(tiles)} tile pairs changed")
        if args.output:
            _write_changes(args, merged, tiles, crs, shared)
    else:
        collection = {"type": "FeatureCollection", "crs": crs, "features": merged}
        _write_output(args.output, {"features": collection, "properties": shared or None, "scan": True}, args)
    job.finish()
    return 0


def _fail(name: str, exc: EarthDialError) -> int:
    print(f"{name}: {exc.code}: {exc.message}", file=sys.stderr)
    return 1


def _write_changes(args: argparse.Namespace, merged: list[dict[str, Any]], tiles: dict[int, dict[str, Any]],
                   crs: str, shared: dict[str, Any]) -> None:  # fmt: skip
    """Two layers: the change boxes and, beside them, the per-tile change map (its name ends in `_tiles`)."""
    from earthdial.contract.result_features import change_map, layer_name
    from earthdial.outputs.files import write_features

    base = getattr(args, "layer", None) or layer_name(shared, scan=True)
    overwrite = getattr(args, "overwrite", False)
    boxes = write_features(args.output, {"type": "FeatureCollection", "crs": crs, "features": merged}, base,
                           overwrite=overwrite)  # fmt: skip
    tile_layer = write_features(args.output, {"type": "FeatureCollection", "crs": crs,
                                              "features": change_map(tiles, shared)}, f"{boxes}_tiles",
                                overwrite=overwrite)  # fmt: skip
    print(f"wrote {len(merged)} change box(es) (layer {boxes!r}) and {len(tiles)} tile pair(s) "
          f"(layer {tile_layer!r}) to {os.path.abspath(args.output)}")  # fmt: skip


def cmd_change(args: argparse.Namespace) -> int:
    _check_outputs(args)
    sources = [
        source_by_reference(os.path.abspath(p), args.bands, args.bounds, args.bounds_crs)
        for p in args.rasters
    ]
    header = {
        "op": "ask",
        "task": args.task,
        "prompt": args.prompt,
        "sources": sources,
        "options": _options(args),
    }
    _ask_and_report(header, args)
    return 0


def _run(header: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A request through a running server (--endpoint) or in this process (--model). With neither: the
    server at the default endpoint when one answers, else the default model in this process."""
    endpoint, model = args.endpoint, args.model
    if not endpoint and not model:
        endpoint = _default_endpoint()
        if _answers(endpoint):
            print(f"earthdial {args.command}: using the server at {endpoint}", file=sys.stderr)
        else:
            chosen = choose_model(None)
            model = chosen.path
            if not model:
                raise EarthDialError(
                    "bad_request", f"no server answers at {endpoint} and no model is installed: "
                    "pass --endpoint URL (a running server) or --model DIR"
                )  # fmt: skip
            print(f"earthdial {args.command}: no server answers at {endpoint}; running {chosen.origin} ({model}) in "
                  "this process", file=sys.stderr)  # fmt: skip
            endpoint = None
    if endpoint:
        from earthdial.cli import by_value

        with _connected(endpoint, args.timeout) as client:  # a file the server may not open goes by value
            return by_value.ask(client, header, lambda line: print(f"earthdial {args.command}: {line}",
                                                                   file=sys.stderr))  # fmt: skip
    from earthdial.model.engine import Engine
    from earthdial.serving import service

    return service.run(header, [], Engine(model, device=args.device))


def cmd_georef(args: argparse.Namespace) -> int:
    from earthdial.serving import service

    _check_outputs(args)
    reply = service.run({"op": "georef", "answer": args.answer, "source": _source(args)}, [], None)
    if args.json:
        print(json.dumps(reply["features"]))
    elif args.output or not args.preview:
        _write_output(args.output, reply, args)
    if args.preview:
        _write_preview(args, reply)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _connected(args.endpoint, args.timeout) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    model = status.get("model") or {}
    print(f"protocol  {status['protocol']}")
    print(f"model     {model.get('variant')} ({model.get('path')})")
    if model.get("demo"):
        print("          the built-in DEMO model: trained on synthetic scenes only (docs/demo-model.md)")
    adapter = model.get("adapter")
    print(f"adapter   {adapter['path'] + ' (LoRA, merged)' if adapter else 'none'}")
    print(f"device    {model.get('device')} {model.get('dtype')} attention={model.get('attention')}")
    if model.get("dtype_reason"):
        print(f"dtype     {model['dtype_reason']}")
    print(
        f"tiles     {model.get('image_size')} px, {model.get('tokens_per_tile')} tokens each, up to {model.get('max_tiles')}"
    )
    mem = model.get("memory") or {}
    plan = model.get("plan") or {}
    kernel = f" ({model['quantize_kernel']})" if model.get("quantize_kernel") else ""
    print(f"weights   {model.get('weights_gb')} GiB, quantize={model.get('quantize')}{kernel}")
    print(f"memory    {mem.get('used_gb')} GiB used, {mem.get('free_gb')} GiB free of {mem.get('total_gb')}")
    if plan:
        print(f"plan      batch {plan.get('batch')}: {plan.get('message')}")
    print(f"queue     {status['queue']} waiting, {status['running']} running")
    for job in status.get("jobs", []):  # what a running request is doing, and for how long
        print(f"running   {job['id']} ({job['op']}): {job['stage']}, {job['age_s']:.0f} s since it arrived"
              + (", cancel requested" if job.get("cancel_requested") else ""))  # fmt: skip
    if "connections" in status:
        conns = status["connections"]
        print(f"clients   {conns['open']} connection(s) open, at most {conns['max']}")
    print(f"tasks     {', '.join(t['name'] for t in status['tasks'])}")
    print(f"presets   {', '.join(p['name'] for p in status.get('presets', []))}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from earthdial.install import machine

    report = machine.collect()  # reads the machine only: no model is loaded
    print(json.dumps(report, indent=2) if args.json else "\n".join(report["summary"]))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from earthdial.training.tiny import make_full_size_checkpoint, make_tiny_checkpoint

    if args.full_size:
        path = make_full_size_checkpoint(args.directory, seed=args.seed)
        print(f"wrote a random checkpoint with EarthDial-4B's shapes (bf16) to {path}")
        return 0
    path = make_tiny_checkpoint(
        args.directory, variant=args.variant, image_size=args.image_size, seed=args.seed
    )
    print(f"wrote a tiny random {args.variant} checkpoint to {path}")
    return 0


def cmd_make_sample(args: argparse.Namespace) -> int:
    from earthdial.demo.samples import truth_path, write_sample_scene

    try:
        path = write_sample_scene(args.path, crs=args.crs, index=args.index)
    except ValueError as exc:
        print(f"earthdial make-sample: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a sample scene to {path} and its objects' true outlines to {truth_path(path)}")
    return 0


# train-demo's checkpoint without --out: in the current directory, never inside the installed package
DEFAULT_TRAIN_OUT = "earthdial-demo-model"


def cmd_train_demo(args: argparse.Namespace) -> int:
    import time

    from earthdial import training as train

    if args.init:  # a continuation of a trained checkpoint on the absent-class mixture
        cfg = train.continuation(args.init, minutes=args.minutes, seed=args.seed, steps=args.steps or None,
                                 threads=args.threads)  # fmt: skip
    else:
        cfg = train.TrainConfig(minutes=args.minutes, seed=args.seed, steps=args.steps or None,
                                threads=args.threads, freeze_vision=not args.train_vision,
                                vision_steps=args.steps // 8 if args.steps else None)  # fmt: skip
    out = args.out or DEFAULT_TRAIN_OUT
    if not args.out and os.path.isdir(out) and os.listdir(out):
        print(f"earthdial train-demo: ./{out} is there already and not empty: pass --out DIR for another "
              "folder (or remove it)", file=sys.stderr)  # fmt: skip
        return 2
    if args.init and os.path.realpath(out) == os.path.realpath(args.init):
        print("earthdial train-demo: --out must not be the --init checkpoint (it is read while training)",
              file=sys.stderr)  # fmt: skip
        return 2
    start = f"continuing {args.init}" if args.init else "training a demo model from scratch"
    print(f"{start} (seed {cfg.seed}, {cfg.steps or 'as many as fit'} steps, "
          f"at most {cfg.minutes:g} min) -> {out}", flush=True)  # fmt: skip
    _, _, _, summary = train.train(
        cfg, out, log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True)
    )
    print(f"done: {summary['steps']} steps in {summary['minutes']:.1f} min; wrote {out}")
    if summary["stopped_early"]:
        print(
            "warning: the time cap ended training before its schedule did; the model is undertrained",
            file=sys.stderr,
        )
    return 0


def cmd_eval_demo(args: argparse.Namespace) -> int:
    import json as json_
    from pathlib import Path

    from earthdial import training as train
    from earthdial.model.engine import Engine

    model = choose_model(args.model, environment=False).path  # it scores demo models: no $EARTHDIAL_MODEL
    if not model:
        print("earthdial eval-demo: no demo model is installed; pass --model DIR", file=sys.stderr)
        return 2
    cfg = json_.loads((Path(model) / "config.json").read_text())
    trained_on = (cfg.get("training") or {}).get("seed")
    if trained_on is not None and trained_on == args.seed:
        print(f"earthdial eval-demo: seed {args.seed} is the training seed; pick another", file=sys.stderr)
        return 2
    engine = Engine(model, device=args.device)
    print(f"evaluating {model} on {args.scenes} held-out scenes (seed {args.seed}) through the server's path",
          flush=True)  # fmt: skip
    result = train.evaluate(engine, scenes=args.scenes, seed=args.seed)
    for line in result.lines():
        print(line)
    return 0


def cmd_export_training(args: argparse.Namespace) -> int:
    from earthdial.training import export as training_data

    result = training_data.export(args.gpkg, args.output, args.layer or None)
    for line in result.lines():
        print(line)
    if not result.records:
        print("nothing to export: no file written")
        return 1
    print(f"wrote {os.path.join(os.path.abspath(args.output), training_data.RECORDS_FILE)}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import time

    from earthdial.training import finetune

    model = choose_model(args.model).path
    if not model:
        print("earthdial finetune: no model; pass --model DIR", file=sys.stderr)
        return 2
    try:
        import peft  # noqa: F401
    except ImportError:
        print("earthdial finetune: needs peft: pip install 'earthdial-qgis[finetune]'", file=sys.stderr)
        return 2
    cfg = finetune.FinetuneConfig(minutes=args.minutes, steps=args.steps or None, batch_size=args.batch_size,
                                  lr=args.lr, rank=args.rank, projector=args.projector, vision=args.vision,
                                  look=args.look, seed=args.seed,
                                  threads=args.threads, device=args.device)  # fmt: skip
    finetune.finetune(args.records, model, args.output, cfg,
                      log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True))  # fmt: skip
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import json

    from earthdial.install import download

    if args.list:
        if args.json:
            print(json.dumps(download.checkpoints()))
        else:
            for c in download.checkpoints():
                print(f"{c['name']:<26} {c['repo_id']}@{c['revision']}  {c['use']}")
        return 0
    if not args.name:
        raise EarthDialError("bad_request", f"name a checkpoint: {', '.join(download.CHECKPOINTS)} (--list)")
    directory = args.dir or args.name
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request: the progress says enough

    def report(event: dict[str, Any]) -> None:
        if args.json:  # one JSON object a line on stdout: what the plugin reads
            print(json.dumps(event), flush=True)
        if event["event"] == "start":
            print(f"earthdial download: {event['repo_id']} at commit {event['commit']}: {event['files']} files, "
                  f"{event['bytes']} bytes ({event['have']} already here)", file=sys.stderr, flush=True)  # fmt: skip
        elif event["event"] == "progress":
            percent = 100.0 * event["all_done"] / max(event["all_size"], 1)
            print(f"earthdial download: {percent:5.1f}% {event['file']} {event['done']}/{event['size']} bytes",
                  file=sys.stderr, flush=True)  # fmt: skip
        elif event["event"] == "done":
            what = "already downloaded and verified" if event["already"] else "downloaded and verified"
            print(f"earthdial download: {what}: {event['path']}", file=sys.stderr, flush=True)

    try:
        download.download(args.name, directory, revision=args.revision, progress=report)
    except KeyboardInterrupt:
        print("earthdial download: interrupted; what was received is kept: run the same command again to "
              "continue it", file=sys.stderr)  # fmt: skip
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earthdial", description="EarthDial remote-sensing VLM backend")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="load a model once and answer requests over ZeroMQ")
    p.add_argument(
        "--model", help="checkpoint directory in EarthDial's published layout (or $EARTHDIAL_MODEL)"
    )
    p.add_argument(
        "--endpoint", default=_default_endpoint(), help=f"default: $EARTHDIAL_ENDPOINT or {DEFAULT_ENDPOINT}"
    )
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on a CPU (default: one fewer than the cores; 0: torch's default)")  # fmt: skip
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "fp32", "bf16"],
                   help="what the model computes in (default auto: bf16 on CUDA; on a CPU bf16 where it has "
                   "native bf16 and a start-up probe finds it faster, else fp32; status says why)")  # fmt: skip
    p.add_argument(
        "--max-tiles", type=int, default=None, help="dynamic tiling limit (default: the checkpoint's)"
    )
    p.add_argument("--adapter", help="a LoRA adapter folder (earthdial finetune) to load onto the model")
    p.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "nf4"],
        help="8- or 4-bit language-model weights",
    )
    cache_modes = ["auto", "dynamic", "static", "compiled"]
    p.add_argument("--kv-cache", dest="cache_mode", default="auto", choices=cache_modes,
                   help="greedy decoding's KV cache: auto = static + compiled decode step on CUDA, dynamic on "
                   "CPU (the search itself is --decoding)")  # fmt: skip
    p.add_argument("--decode", dest="cache_mode", choices=cache_modes, action=DeprecatedFlag, new="--kv-cache",
                   help="the former name of --kv-cache (still works, with a warning)")  # fmt: skip
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests decoded together at most (the memory plan may lower it)",
    )
    p.add_argument(
        "--decoding",
        default="auto",
        choices=["auto", "greedy", "beams", "upstream_demo"],
        help="greedy (min 1 new token), as EarthDial's evaluation decodes; beams: its scripts' --num-beams "
        "defaults (5 or 2 per task); upstream_demo: sampled as its demo chats (default auto = greedy; a "
        "request's options.decoding wins)",
    )
    p.add_argument("--no-model", action="store_true", help="serve without a model: georef, status, ping only")
    p.add_argument(
        "--queue-size", type=int, default=64, help="requests waiting at most, all clients together"
    )
    p.add_argument(
        "--client-queue", type=int, help="requests one client may have waiting (default: half the queue)"
    )
    p.add_argument(
        "--allow-dir",
        action="append",
        metavar="DIR",
        help="a directory by-reference requests may read under (repeatable; without it no file is read "
        "by reference: clients send pixels by value)",
    )
    budgets = p.add_argument_group("limits (docs/security.md)")
    budgets.add_argument(
        "--max-pixels",
        type=int,
        default=500_000_000,
        help="source pixels decoded for one image of a request (window x bands, after overviews)",
    )
    budgets.add_argument(
        "--max-value-pixels",
        type=int,
        default=64 * 1024 * 1024,
        help="pixels (rows x cols x bands) of one array sent by value",
    )
    budgets.add_argument("--max-bands", type=int, default=32, help="bands one source may name")
    budgets.add_argument("--max-scan-tiles", type=int, default=20_000, help="tiles of one detect scan")
    budgets.add_argument("--max-reply-mb", type=float, default=64, help="size of one reply, MiB")
    budgets.add_argument(
        "--max-queue-mb",
        type=float,
        default=1024,
        help="MiB of queued and running requests together (their arrays and headers)",
    )
    budgets.add_argument(
        "--deadline",
        type=float,
        default=600,
        help="seconds an ask/georef request may take from its arrival (0: none)",
    )
    budgets.add_argument(
        "--scan-deadline",
        type=float,
        default=0,
        help="seconds a detect scan may take from its arrival (0: none)",
    )
    budgets.add_argument("--stream-timeout", type=float, default=60,
                         help="seconds a streamed detect may wait for its client's next tile (0: forever)")  # fmt: skip
    budgets.add_argument("--read-timeout", type=float, default=60,
                         help="seconds one open or read of a file may take in a reader process; past it the "
                         "reader is killed and replaced, and the request gets `timeout`")  # fmt: skip
    budgets.add_argument("--readers", type=int, default=2,
                         help="reader processes that open and read the files of by-reference requests")  # fmt: skip
    budgets.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections; past it the longest idle are ended",
    )
    budgets.add_argument("--idle-timeout", type=float, default=300,
                         help="seconds a connection with no request in flight may stay silent (0: forever)")  # fmt: skip
    p.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        help="enable CURVE with this server secret key (earthdial keygen)",
    )
    p.add_argument("--curve-clients", metavar="DIR", help="admit only the CURVE client keys in DIR/*.public")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keygen", help="write CURVE key pairs for a server and a client into DIR")
    p.add_argument("directory")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("ask", help="ask EarthDial about a raster window; write grounded boxes")
    _add_source_args(p)
    _add_input_args(p)
    p.add_argument("--prompt", default="", help="the question, or what to find for --task refer")
    p.add_argument("--task", help="chat, caption, vqa, classify, grounding, refer, identify, ... (default: "
                   "refer when the prompt names objects, e.g. 'ships'; chat for a question)")  # fmt: skip
    p.add_argument(
        "--endpoint",
        help="a running `earthdial serve` (default: the one at $EARTHDIAL_ENDPOINT or "
        f"{DEFAULT_ENDPOINT} when it answers, else the model runs in this process)",
    )
    p.add_argument("--model", help="checkpoint directory to run in this process "
                   "(default: $EARTHDIAL_MODEL, else the built-in demo model)")  # fmt: skip
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--preview", help="also write a PNG (.png) of the window with the boxes drawn")
    p.add_argument("--timeout", type=float, default=300.0)
    _add_output_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("detect", help="find objects over a whole raster or extent, tile by tile")
    _add_source_args(p)
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
    p.add_argument("--list", action="append", default=[], metavar="FILE",
                   help="a file of raster paths, one a line (relative ones: to the file's folder)")  # fmt: skip
    p.add_argument("--stac", action="append", default=[], metavar="FILE",
                   help="a STAC ItemCollection (or Item) JSON file; its assets must be local files")  # fmt: skip
    p.add_argument("--asset", help="the STAC asset to read (default: visual, else the item's first GeoTIFF)")
    p.add_argument("--prompt", required=True, help="what to find, e.g. ships")
    p.add_argument("--task", default="refer", help="a grounded task: refer (default) or grounding")
    p.add_argument("--preset", help="band preset (default: picked from each raster)")
    _add_tiling_args(p)
    p.add_argument("--model", help="checkpoint directory, the same path on every Ray node (default: $EARTHDIAL_MODEL, else the demo model)")  # fmt: skip
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--workers", type=int, default=2, help="engines (Ray actors), each with its own model")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPU slots (and torch threads) of a worker")  # fmt: skip
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray GPUs of a worker (e.g. 1)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
                   help="an existing Ray cluster, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, "
                   "else a local Ray started for this run)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="GeoPackage (.gpkg) for a layer per scene and the merged layer")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="go on from the journal an interrupted run left beside -o")  # fmt: skip
    p.set_defaults(func=cmd_detect_many)

    p = sub.add_parser("change", help="compare two (or more) rasters: later ones are aligned to the first")
    p.add_argument("rasters", nargs="+", help="BEFORE AFTER [...]")
    _add_input_args(p)
    p.add_argument("--task", default="change", help="change, disaster, damage, post_disaster_refer")
    p.add_argument("--prompt", default="")
    p.add_argument("--bands", type=_bands)
    p.add_argument("--bounds", type=float, nargs=4, metavar=("MINX", "MINY", "MAXX", "MAXY"))
    p.add_argument("--bounds-crs")
    p.add_argument("--endpoint")
    p.add_argument("--model")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--timeout", type=float, default=300.0)
    _add_output_args(p)
    p.set_defaults(func=cmd_change)

    p = sub.add_parser("georef", help="turn an EarthDial answer about a raster window into map features")
    _add_source_args(p)
    p.add_argument(
        "--answer",
        required=True,
        help="the model's answer text, e.g. '<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>'",
    )
    p.add_argument("--json", action="store_true", help="print the features as GeoJSON")
    p.add_argument("--preview", help="also write a PNG (.png) of the window with the boxes drawn")
    _add_output_args(p, "the features")
    p.set_defaults(func=cmd_georef)

    p = sub.add_parser("status", help="what a running server has loaded and how busy it is")
    p.add_argument("--endpoint", default=_default_endpoint())
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "diagnose", help="what this machine can run: GPU, driver, torch, memory plans, a recommendation"
    )
    p.add_argument("--json", action="store_true", help="the report as JSON (its keys are stable: schema 1)")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser(
        "make-tiny-checkpoint", help="write a tiny random checkpoint in EarthDial's published layout"
    )
    p.add_argument("directory")
    p.add_argument(
        "--variant",
        default="EarthDial_4B_RGB",
        choices=["EarthDial_4B_RGB", "EarthDial_4B_MS", "EarthDial_4B_Methane_UHI"],
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--full-size",
        action="store_true",
        help="the published 4B shapes in bf16 (about 8.3 GB, written one tensor at a time), for load benchmarks",
    )
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser(
        "download",
        help="fetch a published EarthDial checkpoint from the Hugging Face hub (resumable, verified)",
    )
    p.add_argument("name", nargs="?", help="EarthDial_4B_RGB, EarthDial_4B_MS or EarthDial_4B_Methane_UHI")
    p.add_argument("--dir", help="folder to fill (new or empty; default: NAME in the current folder); "
                   "run the same command again to continue an interrupted download")  # fmt: skip
    p.add_argument("--revision", help="a branch or commit of the hub repository (default: the pinned one)")
    p.add_argument("--list", action="store_true", help="the checkpoints it knows, and exit")
    p.add_argument("--json", action="store_true", help="progress as JSON lines on stdout")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "make-sample",
        help="write a synthetic GeoTIFF scene (water, land, a ship, other objects) and its true outlines",
    )
    p.add_argument("path")
    p.add_argument("--crs", default="EPSG:32633", help="EPSG:32633 or EPSG:3857")
    p.add_argument("--index", type=int, default=0, help="which sample scene (default 0)")
    p.set_defaults(func=cmd_make_sample)

    p = sub.add_parser("train-demo", help="train the built-in demo model from scratch on synthetic scenes")
    p.add_argument("--out", help=f"checkpoint directory to write (default: ./{DEFAULT_TRAIN_OUT}, a new folder "
                   "in the current directory; the shipped demo model is replaced only when --out names it)")  # fmt: skip
    p.add_argument("--minutes", type=float, default=29.0, help="wall-clock budget, both stages (default 29)")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="fixed optimiser steps for stage 2 (default 0: a schedule over --minutes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads at most")
    p.add_argument("--init", metavar="DIR",
                   help="continue this checkpoint (stage 2 only, on the mixture with absent-class questions)")  # fmt: skip
    p.add_argument(
        "--train-vision",
        action="store_true",
        help="keep training the vision tower in stage 2 (default: frozen)",
    )
    p.set_defaults(func=cmd_train_demo)

    p = sub.add_parser("eval-demo", help="score a demo model on held-out synthetic scenes (GeoTIFFs)")
    p.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--seed", type=int, default=20261127, help="held-out scene stream (not the training seed)")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.set_defaults(func=cmd_eval_demo)

    p = sub.add_parser("export-training", help="reviewed result layers of a GeoPackage -> training records")
    p.add_argument("gpkg", help="GeoPackage with EarthDial result layers (review field set in QGIS)")
    p.add_argument(
        "--layer", action="append", help="a layer to export (repeatable; default: all result layers)"
    )
    p.add_argument("-o", "--output", required=True, help="new folder for records.jsonl and chips/")
    p.set_defaults(func=cmd_export_training)

    p = sub.add_parser("finetune", help="train a LoRA adapter on exported training records")
    p.add_argument("records", help="folder written by export-training")
    p.add_argument(
        "--model", help="base checkpoint (default: $EARTHDIAL_MODEL, else the built-in demo model)"
    )
    p.add_argument("-o", "--output", required=True, help="new folder for the adapter")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget (default 10)")
    p.add_argument("--steps", type=int, default=0, help="fixed optimiser steps (default 0: as many as fit)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--projector", action="store_true", help="also train the vision-language projector")
    p.add_argument(
        "--vision", action="store_true", help="also adapt the vision tower (LoRA on its attention/MLP)"
    )
    p.add_argument(
        "--look",
        type=float,
        default=0.0,
        help="weight of the demo trainer's look aid (attention on each box's object; demo model only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pyogrio").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EarthDialError as exc:
        print(f"earthdial {args.command}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
