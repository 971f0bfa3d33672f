"""Training commands: `make-tiny-checkpoint`, `train-demo`, `eval-demo`, `export-training`, `finetune`.

The one door of the command line into `earthdial.training`: imported inside the command functions only, so
that serving and the other commands never load it (tests/backend/test_contract.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from earthdial.cli.arguments import DEVICES
from earthdial.cli.model_choice import choose as choose_model

if TYPE_CHECKING:
    from earthdial.training.finetune import FinetuneConfig


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


# train-demo's checkpoint without --out: in the current directory, never inside the installed package
DEFAULT_TRAIN_OUT = "earthdial-demo-model"


def cmd_train_demo(args: argparse.Namespace) -> int:
    import time

    from earthdial import training as train

    if args.init:  # a continuation of a trained checkpoint on the absent-class mixture
        cfg = train.continuation(
            args.init, minutes=args.minutes, seed=args.seed, steps=args.steps or None, threads=args.threads
        )
    else:
        cfg = train.TrainConfig(
            minutes=args.minutes,
            seed=args.seed,
            steps=args.steps or None,
            threads=args.threads,
            freeze_vision=not args.train_vision,
            vision_steps=args.steps // 8 if args.steps else None,
        )
    out = args.out or DEFAULT_TRAIN_OUT
    if not args.out and os.path.isdir(out) and os.listdir(out):
        print(
            f"earthdial train-demo: ./{out} is there already and not empty: pass --out DIR for another "
            "folder (or remove it)",
            file=sys.stderr,
        )
        return 2
    if args.init and os.path.realpath(out) == os.path.realpath(args.init):
        print(
            "earthdial train-demo: --out must not be the --init checkpoint (it is read while training)",
            file=sys.stderr,
        )
        return 2
    start = f"continuing {args.init}" if args.init else "training a demo model from scratch"
    print(
        f"{start} (seed {cfg.seed}, {cfg.steps or 'as many as fit'} steps, "
        f"at most {cfg.minutes:g} min) -> {out}",
        flush=True,
    )
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
    from earthdial import training as train
    from earthdial.model.engine import Engine

    model = choose_model(args.model, environment=False).path  # it scores demo models: no $EARTHDIAL_MODEL
    if not model:
        print("earthdial eval-demo: no demo model is installed; pass --model DIR", file=sys.stderr)
        return 2
    cfg = json.loads((Path(model) / "config.json").read_text())
    trained_on = (cfg.get("training") or {}).get("seed")
    if trained_on is not None and trained_on == args.seed:
        print(f"earthdial eval-demo: seed {args.seed} is the training seed; pick another", file=sys.stderr)
        return 2
    engine = Engine(model, device=args.device)
    print(
        f"evaluating {model} on {args.scenes} held-out scenes (seed {args.seed}) through the server's path",
        flush=True,
    )
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


def add_tuning_args(p: argparse.ArgumentParser, minutes: float) -> None:
    """The LoRA run's knobs, as `finetune` and benchmarks/proof_lora.py both take them (`tuning_config`)."""
    p.add_argument("--minutes", type=float, default=minutes, help=f"wall-clock budget (default {minutes:g})")
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


def tuning_config(args: argparse.Namespace, **more: Any) -> FinetuneConfig:
    """The FinetuneConfig of `add_tuning_args`' arguments, with `more` of its fields."""
    from earthdial.training.finetune import FinetuneConfig

    return FinetuneConfig(
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        rank=args.rank,
        projector=args.projector,
        vision=args.vision,
        look=args.look,
        **more,
    )


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
    cfg = tuning_config(
        args, steps=args.steps or None, seed=args.seed, threads=args.threads, device=args.device
    )
    finetune.finetune(
        args.records,
        model,
        args.output,
        cfg,
        log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True),
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The make-tiny-checkpoint, train-demo, eval-demo, export-training, finetune subcommands."""
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

    p = sub.add_parser("train-demo", help="train the built-in demo model from scratch on synthetic scenes")
    p.add_argument(
        "--out",
        help=f"checkpoint directory to write (default: ./{DEFAULT_TRAIN_OUT}, a new folder "
        "in the current directory; the shipped demo model is replaced only when --out names it)",
    )
    p.add_argument("--minutes", type=float, default=29.0, help="wall-clock budget, both stages (default 29)")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="fixed optimiser steps for stage 2 (default 0: a schedule over --minutes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads at most")
    p.add_argument(
        "--init",
        metavar="DIR",
        help="continue this checkpoint (stage 2 only, on the mixture with absent-class questions)",
    )
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
    add_tuning_args(p, minutes=10.0)
    p.add_argument("--steps", type=int, default=0, help="fixed optimiser steps (default 0: as many as fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.set_defaults(func=cmd_finetune)
