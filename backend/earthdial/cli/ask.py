"""Questions about raster windows: `earthdial ask` (one window), `change` (two or more), `georef` (an answer
into map features) and `status` (what a running server has loaded and how busy it is)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from earthdial.cli.arguments import (
    DEVICES,
    add_input_args,
    add_output_args,
    add_source_args,
    ask_options,
    bands,
    source_of,
)
from earthdial.cli.endpoint import answers, connected, default_endpoint
from earthdial.cli.model_choice import choose as choose_model
from earthdial.cli.results import check_outputs, write_output, write_preview
from earthdial.contract.wire import DEFAULT_ENDPOINT, EarthDialError, source_by_reference


def cmd_ask(args: argparse.Namespace) -> int:
    check_outputs(args)
    if args.task is None:
        from earthdial.model.prompts import default_task

        args.task = default_task(args.prompt)
        why = (
            f"finding {args.prompt.strip()!r} (--task chat asks it as a question)"
            if args.task == "refer"
            else "the prompt is a question (--task refer with a prompt naming objects returns boxes)"
        )
        print(f"earthdial ask: task {args.task}: {why}", file=sys.stderr)
    header = {
        "op": "ask",
        "task": args.task,
        "prompt": args.prompt,
        "source": source_of(args),
        "options": ask_options(args),
    }
    reply = _ask_and_report(header, args)
    if args.preview:
        write_preview(args, reply)
    return 0


def _ask_and_report(header: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run an `ask`, print its answer and input notes, write its boxes where -o says."""
    reply = _run(header, args)
    print(reply["answer"])
    for warning in reply.get("input", {}).get("warnings", []):
        print(f"note: {warning}", file=sys.stderr)
    write_output(args.output, reply, args)
    return reply


def cmd_change(args: argparse.Namespace) -> int:
    check_outputs(args)
    sources = [
        source_by_reference(os.path.abspath(p), args.bands, args.bounds, args.bounds_crs)
        for p in args.rasters
    ]
    header = {
        "op": "ask",
        "task": args.task,
        "prompt": args.prompt,
        "sources": sources,
        "options": ask_options(args),
    }
    _ask_and_report(header, args)
    return 0


def _run(header: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A request through a running server (--endpoint) or in this process (--model). With neither: the
    server at the default endpoint when one answers, else the default model in this process."""
    endpoint, model = args.endpoint, args.model
    if not endpoint and not model:
        endpoint = default_endpoint()
        if answers(endpoint):
            print(f"earthdial {args.command}: using the server at {endpoint}", file=sys.stderr)
        else:
            chosen = choose_model(None)
            model = chosen.path
            if not model:
                raise EarthDialError(
                    "bad_request",
                    f"no server answers at {endpoint} and no model is installed: "
                    "pass --endpoint URL (a running server) or --model DIR",
                )
            print(
                f"earthdial {args.command}: no server answers at {endpoint}; running {chosen.origin} ({model}) in "
                "this process",
                file=sys.stderr,
            )
            endpoint = None
    if endpoint:
        from earthdial.cli import by_value

        with connected(endpoint, args.timeout) as client:  # a file the server may not open goes by value
            return by_value.ask(
                client, header, lambda line: print(f"earthdial {args.command}: {line}", file=sys.stderr)
            )
    from earthdial.model.engine import Engine
    from earthdial.serving import service

    return service.run(header, [], Engine(model, device=args.device))


def cmd_georef(args: argparse.Namespace) -> int:
    from earthdial.serving import service

    check_outputs(args)
    reply = service.run({"op": "georef", "answer": args.answer, "source": source_of(args)}, [], None)
    if args.json:
        print(json.dumps(reply["features"]))
    elif args.output or not args.preview:
        write_output(args.output, reply, args)
    if args.preview:
        write_preview(args, reply)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with connected(args.endpoint, args.timeout) as client:
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
        print(
            f"running   {job['id']} ({job['op']}): {job['stage']}, {job['age_s']:.0f} s since it arrived"
            + (", cancel requested" if job.get("cancel_requested") else "")
        )
    if "connections" in status:
        conns = status["connections"]
        print(f"clients   {conns['open']} connection(s) open, at most {conns['max']}")
    print(f"tasks     {', '.join(t['name'] for t in status['tasks'])}")
    print(f"presets   {', '.join(p['name'] for p in status.get('presets', []))}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ask, change, georef, status subcommands."""
    p = sub.add_parser("ask", help="ask EarthDial about a raster window; write grounded boxes")
    add_source_args(p)
    add_input_args(p)
    p.add_argument("--prompt", default="", help="the question, or what to find for --task refer")
    p.add_argument(
        "--task",
        help="chat, caption, vqa, classify, grounding, refer, identify, ... (default: "
        "refer when the prompt names objects, e.g. 'ships'; chat for a question)",
    )
    p.add_argument(
        "--endpoint",
        help="a running `earthdial serve` (default: the one at $EARTHDIAL_ENDPOINT or "
        f"{DEFAULT_ENDPOINT} when it answers, else the model runs in this process)",
    )
    p.add_argument(
        "--model",
        help="checkpoint directory to run in this process "
        "(default: $EARTHDIAL_MODEL, else the built-in demo model)",
    )
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--preview", help="also write a PNG (.png) of the window with the boxes drawn")
    p.add_argument("--timeout", type=float, default=300.0)
    add_output_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("change", help="compare two (or more) rasters: later ones are aligned to the first")
    p.add_argument("rasters", nargs="+", help="BEFORE AFTER [...]")
    add_input_args(p)
    p.add_argument("--task", default="change", help="change, disaster, damage, post_disaster_refer")
    p.add_argument("--prompt", default="")
    p.add_argument("--bands", type=bands)
    p.add_argument("--bounds", type=float, nargs=4, metavar=("MINX", "MINY", "MAXX", "MAXY"))
    p.add_argument("--bounds-crs")
    p.add_argument("--endpoint")
    p.add_argument("--model")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--timeout", type=float, default=300.0)
    add_output_args(p)
    p.set_defaults(func=cmd_change)

    p = sub.add_parser("georef", help="turn an EarthDial answer about a raster window into map features")
    add_source_args(p)
    p.add_argument(
        "--answer",
        required=True,
        help="the model's answer text, e.g. '<ref>ship</ref><box>[[20, 30, 40, 60, 0]]</box>'",
    )
    p.add_argument("--json", action="store_true", help="print the features as GeoJSON")
    p.add_argument("--preview", help="also write a PNG (.png) of the window with the boxes drawn")
    add_output_args(p, "the features")
    p.set_defaults(func=cmd_georef)

    p = sub.add_parser("status", help="what a running server has loaded and how busy it is")
    p.add_argument("--endpoint", default=default_endpoint())
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
