"""The `earthdial` command: serve, ask, georef, status, make-tiny-checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from datetime import datetime, timezone
from typing import Any

from .protocol import DEFAULT_ENDPOINT, Client, EarthDialError, source_by_reference


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


def _source(args: argparse.Namespace) -> dict[str, Any]:
    return source_by_reference(os.path.abspath(args.raster), args.bands, args.bounds, args.bounds_crs)


def _write_output(path: str | None, reply: dict[str, Any]) -> None:
    features = reply["features"]
    n = len(features["features"])
    if not path:
        print(f"{n} grounded box(es); pass -o OUT.gpkg to write them")
        return
    from .output import write_features

    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for feat in features["features"]:
        feat["properties"].setdefault("created", created)
    write_features(path, features)
    print(f"wrote {n} feature(s) to {os.path.abspath(path)} (layer 'earthdial', CRS {features['crs'][:60]})")


def cmd_serve(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .engine import Engine
    from .server import Server, is_loopback

    if not is_loopback(args.endpoint):
        print(
            f"earthdial serve: refusing to bind {args.endpoint}: only loopback endpoints are served "
            "(a network bind would expose the model and files to other machines without authentication)",
            file=sys.stderr,
        )
        return 2
    model = args.model or os.environ.get("EARTHDIAL_MODEL")
    if not model:
        print("earthdial serve: no model; pass --model DIR or set EARTHDIAL_MODEL", file=sys.stderr)
        return 2
    try:
        engine = Engine(model, device=args.device, max_tiles=args.max_tiles)
    except (CheckpointError, OSError, RuntimeError) as exc:
        print(f"earthdial serve: cannot load {model}: {exc}", file=sys.stderr)
        return 3
    server = Server(engine, args.endpoint, queue_size=args.queue_size)
    signal.signal(signal.SIGTERM, lambda *_: server.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: server.stop_event.set())
    d = engine.describe()
    print(
        f"earthdial: serving {d['variant']} ({d['path']}) on {server.bound} [{d['device']}, {d['dtype']}]",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    header = {"op": "ask", "task": args.task, "prompt": args.prompt, "source": _source(args), "options": {}}
    if args.max_new_tokens:
        header["options"]["max_new_tokens"] = args.max_new_tokens
    if args.endpoint:
        with Client(args.endpoint, timeout_s=args.timeout) as client:
            reply = client.request(header).header
    else:
        from . import service
        from .engine import Engine

        model = args.model or os.environ.get("EARTHDIAL_MODEL")
        if not model:
            print("earthdial ask: pass --endpoint URL (a running server) or --model DIR", file=sys.stderr)
            return 2
        reply = service.run(header, [], Engine(model, device=args.device))
    print(reply["answer"])
    _write_output(args.output, reply)
    return 0


def cmd_georef(args: argparse.Namespace) -> int:
    from . import service

    reply = service.run({"op": "georef", "answer": args.answer, "source": _source(args)}, [], None)
    if args.json:
        print(json.dumps(reply["features"]))
    _write_output(args.output, reply)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with Client(args.endpoint, timeout_s=args.timeout) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    model = status.get("model") or {}
    print(f"protocol  {status['protocol']}")
    print(f"model     {model.get('variant')} ({model.get('path')})")
    print(f"device    {model.get('device')} {model.get('dtype')} attention={model.get('attention')}")
    print(
        f"tiles     {model.get('image_size')} px, {model.get('tokens_per_tile')} tokens each, up to {model.get('max_tiles')}"
    )
    print(f"queue     {status['queue']} waiting, {status['running']} running")
    print(f"tasks     {', '.join(t['name'] for t in status['tasks'])}")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(
        args.directory, variant=args.variant, image_size=args.image_size, seed=args.seed
    )
    print(f"wrote a tiny random {args.variant} checkpoint to {path}")
    return 0


def cmd_make_sample(args: argparse.Namespace) -> int:
    from .samples import write_sample_scene

    path = write_sample_scene(args.path, crs=args.crs, seed=args.seed)
    print(f"wrote a sample scene to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earthdial", description="EarthDial remote-sensing VLM backend")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="load a model once and answer requests over ZeroMQ")
    p.add_argument(
        "--model", help="checkpoint directory in EarthDial's published layout (or $EARTHDIAL_MODEL)"
    )
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--max-tiles", type=int, default=None, help="dynamic tiling limit (default: the checkpoint's)"
    )
    p.add_argument("--queue-size", type=int, default=32)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ask", help="ask EarthDial about a raster window; write grounded boxes")
    _add_source_args(p)
    p.add_argument("--prompt", default="", help="the question, or what to find for --task refer")
    p.add_argument("--task", default="chat", help="chat, caption, vqa, classify, grounding, refer, identify")
    p.add_argument(
        "--endpoint", help="a running `earthdial serve`; without it the model runs in this process"
    )
    p.add_argument("--model", help="checkpoint directory when running in-process (or $EARTHDIAL_MODEL)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("-o", "--output", help="GeoPackage (.gpkg) or GeoJSON file for the boxes")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("georef", help="turn an EarthDial answer about a raster window into map features")
    _add_source_args(p)
    p.add_argument(
        "--answer",
        required=True,
        help="the model's answer text, e.g. '<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>'",
    )
    p.add_argument("--json", action="store_true", help="print the features as GeoJSON")
    p.add_argument("-o", "--output", help="GeoPackage (.gpkg) or GeoJSON file")
    p.set_defaults(func=cmd_georef)

    p = sub.add_parser("status", help="what a running server has loaded and how busy it is")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

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
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser(
        "make-sample", help="write a small synthetic GeoTIFF scene (water, land, a ship) to try things on"
    )
    p.add_argument("path")
    p.add_argument("--crs", default="EPSG:32633")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_sample)
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
