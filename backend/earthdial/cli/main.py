"""The `earthdial` command. Its subcommands, one module per group:

- serve.py: `serve` (load a model once, answer requests over ZeroMQ), `keygen` (CURVE keys)
- ask.py: `ask` (a question about a raster window), `change` (about two or more), `georef` (an answer into
  map features), `status` (what a running server has loaded and how busy it is)
- scan.py: `detect` (a whole raster, tile by tile), `detect-changes` (whole layers, before and after),
  `detect-many` (many scenes on Ray workers)
- setup.py: `download` (a published checkpoint), `diagnose` (what this machine can run), `make-sample`
  (a synthetic scene and its true outlines)
- training.py: `make-tiny-checkpoint`, `train-demo`, `eval-demo`, `export-training`, `finetune`

This module holds the top-level parser and `main` (the console entry point). Each command imports what it
runs inside its own function, so the command line itself loads no torch, rasterio, pyzmq or serving code,
and only the training commands load earthdial.training (tests/backend/test_contract.py). None of these
local imports dodges a cycle (tests/backend/test_import_graph.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from earthdial.cli import ask, scan, serve, setup, training
from earthdial.contract.wire import EarthDialError

GROUPS = (serve, ask, scan, setup, training)  # the order `earthdial --help` lists them in


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earthdial", description="EarthDial remote-sensing VLM backend")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
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
