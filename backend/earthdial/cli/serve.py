"""`earthdial serve` (a model behind ZeroMQ) and `earthdial keygen` (its CURVE keys)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from earthdial.cli.arguments import DEVICES
from earthdial.cli.endpoint import default_endpoint
from earthdial.cli.model_choice import choose as choose_model
from earthdial.contract.wire import DEFAULT_ENDPOINT

if TYPE_CHECKING:  # torch and zmq only once serve runs
    from earthdial.limits import Limits
    from earthdial.model.engine import Engine
    from earthdial.serving.server import Server


class DeprecatedFlag(argparse.Action):
    """A flag's former name: it still sets the flag's value, and says on stderr which name replaces it."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"earthdial: warning: {option_string} is deprecated, use {self.new} (the same values)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


class Refused(Exception):
    """`serve` stops before it serves: the message goes to stderr, `code` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def cmd_serve(args: argparse.Namespace) -> int:
    import zmq

    from earthdial.geo import file_access
    from earthdial.serving import auth
    from earthdial.serving.connections import raise_open_file_limit
    from earthdial.serving.server import Server

    try:
        secret, clients = _curve_keys(args)
        refusal = auth.bind_refusal(args.endpoint, curve=secret is not None)
        if refusal:
            raise Refused(refusal)
        dirs = list(args.allow_dir or [])  # what the user asked for; never the working directory by itself
        bad = [d for d in dirs if not os.path.isdir(d)]
        if bad:
            raise Refused(f"--allow-dir must name directories: {', '.join(bad)}")
        engine = None if args.no_model else _load_engine(args)
        file_access.harden_process()  # PROJ network and GDAL HTTP off, GDAL reads only the named file
        raise_open_file_limit()
        try:
            server = Server(
                engine,
                args.endpoint,
                queue_size=args.queue_size,
                max_batch=args.max_batch,
                client_queue=args.client_queue,
                curve_secret_key=secret,
                curve_clients=clients,
                allowed_dirs=dirs,
                budgets=_limits(args),
                max_connections=args.max_connections,
                idle_timeout_s=args.idle_timeout,
                reader_processes=args.readers,
            )
        except zmq.ZMQError as exc:
            raise Refused(f"cannot bind {args.endpoint}: {exc}") from None
    except Refused as exc:
        print(f"earthdial serve: {exc}", file=sys.stderr)
        return exc.code
    signal.signal(signal.SIGTERM, lambda *_: server.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: server.stop_event.set())
    _announce(args, server, engine, secret, clients)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def _curve_keys(args: argparse.Namespace) -> tuple[Any, Any]:
    """The server's CURVE secret key and the admitted client keys (None, None: CURVE off)."""
    from earthdial.serving import auth

    secret = clients = None
    try:
        if args.curve_secret_key:
            secret = auth.read_key(args.curve_secret_key, secret=True)
        if args.curve_clients:
            if not secret:
                raise Refused("--curve-clients needs --curve-secret-key")
            clients = auth.read_client_keys(args.curve_clients)
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot read CURVE keys: {exc}") from None
    return secret, clients


def _load_engine(args: argparse.Namespace) -> Engine:
    """The model, in the precision and with the batch the machine allows (its memory plan); refused (exit 2
    to 4) when there is none, it does not fit or it does not load."""
    model = choose_model(args.model).path
    if not model:
        raise Refused("no model; pass --model DIR, set EARTHDIAL_MODEL, or pass --no-model (georef only)")
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
            raise Refused(plan.message, 4)
        engine = Engine(
            model,
            device=args.device,
            max_tiles=args.max_tiles,
            quantize=args.quantize,
            cache_mode=args.cache_mode,
            adapter=args.adapter,
            dtype=chosen,
        )
        if args.decoding != "auto":
            engine.decoding = args.decoding
    except (CheckpointError, OSError, RuntimeError, ValueError) as exc:
        adapter = f" with adapter {args.adapter}" if args.adapter else ""
        raise Refused(f"cannot load {model}{adapter}: {exc}", 3) from None
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
    return engine


def _limits(args: argparse.Namespace) -> Limits:
    from earthdial.limits import MIB, Limits

    return Limits(
        max_pixels=args.max_pixels,
        max_value_pixels=args.max_value_pixels,
        max_bands=args.max_bands,
        max_scan_tiles=args.max_scan_tiles,
        max_reply_bytes=int(args.max_reply_mb * MIB),
        max_queue_bytes=int(args.max_queue_mb * MIB),
        deadline_s=args.deadline,
        scan_deadline_s=args.scan_deadline,
        stream_timeout_s=args.stream_timeout,
        read_timeout_s=args.read_timeout,
    )


def _announce(
    args: argparse.Namespace, server: Server, engine: Engine | None, secret: Any, clients: Any
) -> None:
    """What the server reads, who may connect, and which model it serves (the plugin waits for the
    `earthdial: serving` line)."""
    from earthdial.geo import file_access
    from earthdial.serving import auth

    reads = ", ".join(file_access.allowed_dirs() or ()) or "no directory (pass --allow-dir DIR)"
    print(
        f"earthdial: access: {auth.describe(secret, clients)}; reads files under {reads}; "
        f"at most {server.connections.cap} connections",
        flush=True,
    )
    if secret is not None and clients is None and not auth.is_loopback(args.endpoint):
        print(
            "earthdial serve: warning: any client that knows the server's public key can connect; "
            "pass --curve-clients DIR to admit only listed client keys",
            file=sys.stderr,
        )
    if engine is None:
        print(f"earthdial: serving no model (georef only) on {server.bound}", flush=True)
        return
    d = engine.describe()
    if d.get("demo"):
        print(
            "earthdial: this is the built-in demo model (a 3 M-parameter micro EarthDial trained on "
            "synthetic scenes only; see docs/demo-model.md)",
            flush=True,
        )
    if d.get("adapter"):
        print(f"earthdial: with the LoRA adapter {d['adapter']['path']} (merged)", flush=True)
    print(
        f"earthdial: serving {d['variant']} ({d['path']}) on {server.bound} [{d['device']}, {d['dtype']}]",
        flush=True,
    )


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
        shapes,
        device,
        free,
        dtype_bytes,
        args.quantize,
        tiles=tiles,
        want_batch=args.max_batch,
        cpu_bf16=native_bf16(cpu_flags()) is not None,
    )


def cmd_keygen(args: argparse.Namespace) -> int:
    from earthdial.serving import auth

    try:
        paths = auth.keygen(args.directory)
    except (OSError, ValueError) as exc:
        print(f"earthdial keygen: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"wrote {path}{'  (mode 0600: keep it private)' if name.endswith('secret') else ''}")
    server_key = auth.read_key(paths["server.public"]).decode()
    print(f"server public key (give it to clients, e.g. the QGIS plugin's settings): {server_key}")
    print(
        f"serve with: earthdial serve --curve-secret-key {paths['server.secret']} --curve-clients {args.directory}"
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The serve, keygen subcommands."""
    p = sub.add_parser("serve", help="load a model once and answer requests over ZeroMQ")
    p.add_argument(
        "--model", help="checkpoint directory in EarthDial's published layout (or $EARTHDIAL_MODEL)"
    )
    p.add_argument(
        "--endpoint", default=default_endpoint(), help=f"default: $EARTHDIAL_ENDPOINT or {DEFAULT_ENDPOINT}"
    )
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on a CPU (default: one fewer than the cores; 0: torch's default)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "fp32", "bf16"],
        help="what the model computes in (default auto: bf16 on CUDA; on a CPU bf16 where it has "
        "native bf16 and a start-up probe finds it faster, else fp32; status says why)",
    )
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
    p.add_argument(
        "--kv-cache",
        dest="cache_mode",
        default="auto",
        choices=cache_modes,
        help="greedy decoding's KV cache: auto = static + compiled decode step on CUDA, dynamic on "
        "CPU (the search itself is --decoding)",
    )
    p.add_argument(
        "--decode",
        dest="cache_mode",
        choices=cache_modes,
        action=DeprecatedFlag,
        new="--kv-cache",
        help="the former name of --kv-cache (still works, with a warning)",
    )
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
    budgets.add_argument(
        "--stream-timeout",
        type=float,
        default=60,
        help="seconds a streamed detect may wait for its client's next tile (0: forever)",
    )
    budgets.add_argument(
        "--read-timeout",
        type=float,
        default=60,
        help="seconds one open or read of a file may take in a reader process; past it the "
        "reader is killed and replaced, and the request gets `timeout`",
    )
    budgets.add_argument(
        "--readers",
        type=int,
        default=2,
        help="reader processes that open and read the files of by-reference requests",
    )
    budgets.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections; past it the longest idle are ended",
    )
    budgets.add_argument(
        "--idle-timeout",
        type=float,
        default=300,
        help="seconds a connection with no request in flight may stay silent (0: forever)",
    )
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
