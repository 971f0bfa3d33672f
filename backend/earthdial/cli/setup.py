"""Getting started: `earthdial download` (a published checkpoint), `diagnose` (what this machine can run)
and `make-sample` (a synthetic scene to try a model on)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from earthdial.contract.wire import EarthDialError


def cmd_download(args: argparse.Namespace) -> int:
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
            print(
                f"earthdial download: {event['repo_id']} at commit {event['commit']}: {event['files']} files, "
                f"{event['bytes']} bytes ({event['have']} already here)",
                file=sys.stderr,
                flush=True,
            )
        elif event["event"] == "progress":
            percent = 100.0 * event["all_done"] / max(event["all_size"], 1)
            print(
                f"earthdial download: {percent:5.1f}% {event['file']} {event['done']}/{event['size']} bytes",
                file=sys.stderr,
                flush=True,
            )
        elif event["event"] == "done":
            what = "already downloaded and verified" if event["already"] else "downloaded and verified"
            print(f"earthdial download: {what}: {event['path']}", file=sys.stderr, flush=True)

    try:
        download.download(args.name, directory, revision=args.revision, progress=report)
    except KeyboardInterrupt:
        print(
            "earthdial download: interrupted; what was received is kept: run the same command again to "
            "continue it",
            file=sys.stderr,
        )
        return 130
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from earthdial.install import machine

    report = machine.collect()  # reads the machine only: no model is loaded
    print(json.dumps(report, indent=2) if args.json else "\n".join(report["summary"]))
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The download, diagnose, make-sample subcommands."""
    p = sub.add_parser(
        "download",
        help="fetch a published EarthDial checkpoint from the Hugging Face hub (resumable, verified)",
    )
    p.add_argument("name", nargs="?", help="EarthDial_4B_RGB, EarthDial_4B_MS or EarthDial_4B_Methane_UHI")
    p.add_argument(
        "--dir",
        help="folder to fill (new or empty; default: NAME in the current folder); "
        "run the same command again to continue an interrupted download",
    )
    p.add_argument("--revision", help="a branch or commit of the hub repository (default: the pinned one)")
    p.add_argument("--list", action="store_true", help="the checkpoints it knows, and exit")
    p.add_argument("--json", action="store_true", help="progress as JSON lines on stdout")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "diagnose", help="what this machine can run: GPU, driver, torch, memory plans, a recommendation"
    )
    p.add_argument("--json", action="store_true", help="the report as JSON (its keys are stable: schema 1)")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser(
        "make-sample",
        help="write a synthetic GeoTIFF scene (water, land, a ship, other objects) and its true outlines",
    )
    p.add_argument("path")
    p.add_argument("--crs", default="EPSG:32633", help="EPSG:32633 or EPSG:3857")
    p.add_argument("--index", type=int, default=0, help="which sample scene (default 0)")
    p.set_defaults(func=cmd_make_sample)
