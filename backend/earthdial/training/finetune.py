"""Fine-tune a LoRA adapter on exported training records (`training_data`): the analyst's corrections.

The records go through the demo trainer's own collation (`train.collate`: the engine's chat template,
image-token expansion and pixel path, the loss on assistant tokens and each answer's closing <|end|>) and
its optimiser step (`train.train_step`, with no training-only aids), so fine-tuning sees exactly what
inference sees. LoRA (peft) adapts Phi-3's ``qkv_proj, o_proj, gate_up_proj, down_proj`` in the language
model; ``projector=True`` also trains the vision-language projector in full. Square chips are also seen
in their eight flips and quarter turns (the boxes turned with them), which an overhead view allows.

On a CPU this is for the demo model (seconds per step); on a GPU the same code fine-tunes the real
checkpoint. A few timed steps give an estimate of the whole run before it goes on.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from earthdial import training as train
from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.geo.georef import box_pixel_corners
from earthdial.model import adapters, checkpoint
from earthdial.model.answers import parse_boxes
from earthdial.model.engine import Engine, attention_for, pick_device
from earthdial.training import export as training_data

_BOX = re.compile(
    r"\[\[(\d+(?:\.\d+)?), (\d+(?:\.\d+)?), (\d+(?:\.\d+)?), (\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)\]\]"
)
TIMING_STEPS = 5  # steps timed for the estimate (the first, which warms up, is left out of it)


@dataclass
class FinetuneConfig:
    minutes: float = 10.0  # wall-clock cap of the optimisation loop
    steps: int | None = None  # a fixed number of steps (None: as many as `minutes` allows)
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 10
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    projector: bool = False  # also train the vision-language projector (in full)
    vision: bool = False  # also adapt the vision tower's attention and MLP (LoRA)
    augment: bool = True  # the eight flips / quarter turns of square chips
    look: float = (
        0.0  # weight of the demo trainer's look aid (0: off): the layers below attend to a box's object
    )
    look_layers: tuple[int, ...] = (2, 3)
    seed: int = 0
    threads: int = 2
    device: str = "auto"


# ------------------------------------------------------------------------------------------------
# Records -> examples
# ------------------------------------------------------------------------------------------------


def read_examples(records: list[dict[str, Any]]) -> list[train.Example]:
    import rasterio

    chips: dict[str, np.ndarray] = {}
    out = []
    for rec in records:
        path = rec["image"]
        if path not in chips:
            try:
                with rasterio.open(path) as src:
                    chips[path] = src.read()
            except Exception as exc:  # rasterio's own errors: a missing or broken chip
                raise EarthDialError(ErrorCode.FILE_NOT_FOUND, f"cannot read chip {path}: {exc}") from None
        sensor = rec.get("sensor") or "[hr_rgb_0.5]"
        out.append(train.Example(rec["conversations"], [chips[path]], sensor, rec.get("task") or "refer"))
    return out


def _turn_box(x1: float, y1: float, x2: float, y2: float, angle: float, quarter: int, flip: bool) -> str:
    """A 0-100 box on a square image after a left-right flip (first) and `quarter` clockwise turns."""
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    if flip:
        cx, angle = 100 - cx, -angle
    for _ in range(quarter):
        cx, cy, w, h = 100 - cy, cx, h, w  # a clockwise turn: a box at angle a keeps a with its sides swapped
    angle %= 180
    if angle >= 90:
        angle, w, h = angle - 90, h, w

    def v(t: float) -> str:
        return f"{min(max(round(t), 0), 100)}"

    return f"[[{v(cx - w / 2)}, {v(cy - h / 2)}, {v(cx + w / 2)}, {v(cy + h / 2)}, {round(angle)}]]"


def turned(example: train.Example, quarter: int, flip: bool) -> train.Example:
    """The example seen flipped and turned (its image and every box of its answers)."""
    if quarter == 0 and not flip:
        return example
    image = example.images[0]
    if flip:
        image = image[:, :, ::-1]
    image = np.ascontiguousarray(np.rot90(image, k=-quarter, axes=(1, 2)))

    def turn(m: re.Match[str]) -> str:
        x1, y1, x2, y2, angle = (float(g) for g in m.groups())
        return _turn_box(x1, y1, x2, y2, angle, quarter, flip)

    def fix(text: str) -> str:
        return _BOX.sub(turn, text)

    conv = [
        dict(turn, value=fix(turn["value"])) if turn["from"] == "gpt" else turn
        for turn in example.conversation
    ]
    return replace(example, conversation=conv, images=[image])


@dataclass(frozen=True)
class Region:
    """A box of an answer where the look aid wants a `SceneObject`: its bounds on 0-1."""

    x1: float
    y1: float
    x2: float
    y2: float

    def bounds(self) -> tuple[float, float, float, float]:
        return self.x1, self.y1, self.x2, self.y2


def with_focus(example: train.Example) -> train.Example:
    """The example with, per answer turn, the regions of the boxes it writes (for the look aid)."""
    from shapely.geometry import Polygon

    focus = []
    for turn in example.conversation[1::2]:
        regions = []
        for box in parse_boxes(turn["value"]):
            x1, y1, x2, y2 = Polygon(box_pixel_corners(box, 1.0, 1.0)).bounds
            regions.append((0, Region(max(x1, 0.0), max(y1, 0.0), min(x2, 1.0), min(y2, 1.0))))
        focus.append(regions)
    return replace(example, focus=focus)  # type: ignore[arg-type]  # only the focus' bounds are read


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _loss_fn(tokenizer: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The demo trainer's soft number loss where every integer 0-100 is one token (the demo vocabulary);
    plain cross-entropy otherwise."""
    vocab = tokenizer.get_vocab()
    if all(n in vocab for n in train.NUMBERS):
        return train.SoftNumberLoss([vocab[n] for n in train.NUMBERS], len(tokenizer))

    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100
        )

    return cross_entropy


def _to(batch: train.Batch, device: str) -> train.Batch:
    if device == "cpu":
        return batch
    return replace(
        batch,
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        labels=batch.labels.to(device),
        pixel_values=batch.pixel_values.to(device),
    )


class Sampler:
    """Batches drawn epoch by epoch from the examples, each in one of its orientations."""

    def __init__(self, examples: list[train.Example], cfg: FinetuneConfig) -> None:
        self.examples, self.cfg = examples, cfg
        self.rng = np.random.default_rng([cfg.seed, 0x10A])
        self.order: list[int] = []

    def next(self) -> list[train.Example]:
        out = []
        for _ in range(min(self.cfg.batch_size, len(self.examples))):
            if not self.order:
                self.order = list(self.rng.permutation(len(self.examples)))
            ex = self.examples[self.order.pop()]
            square = ex.images[0].shape[1] == ex.images[0].shape[2] and len(ex.images) == 1
            if self.cfg.augment and square:
                k = int(self.rng.integers(0, 8))
                ex = turned(ex, k % 4, k >= 4)
            out.append(with_focus(ex) if self.cfg.look > 0 else ex)
        return out


def load_base(model_dir: str, device: str) -> tuple[Any, Any, Any]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return checkpoint.load(model_dir, device, dtype, attention_for(device))
    except checkpoint.CheckpointError as exc:
        raise EarthDialError(ErrorCode.MODEL_ERROR, f"cannot load {model_dir}: {exc}") from None


def finetune(
    records_dir: str | Path,
    model_dir: str,
    out_dir: str | Path,
    cfg: FinetuneConfig | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Train an adapter on the records of ``records_dir`` for the checkpoint ``model_dir``; write it to
    ``out_dir``. Returns a summary (steps, seconds, the loss at the start and the end, the engine)."""
    cfg = cfg or FinetuneConfig()
    records = training_data.load_records(records_dir)
    if not records:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{records_dir} holds no records")
    out_dir = Path(out_dir)
    if (out_dir / "adapter_config.json").exists():
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"{out_dir} already holds an adapter; name a new folder")
    torch.manual_seed(cfg.seed)
    # on a shared CPU a second thread can make a step several times slower: the demo trainer's tuner
    # measures both and keeps the faster
    tuner = train.ThreadTuner(max(1, cfg.threads) if cfg.device != "cuda" else 1)
    device = pick_device(cfg.device)
    model, tokenizer, info = load_base(model_dir, device)
    base = adapters.base_identity(model, info)
    peft_model = adapters.wrap(
        model, adapters.lora_config(cfg.rank, cfg.alpha, cfg.dropout, cfg.projector, cfg.vision)
    )
    engine = Engine.from_model(model, tokenizer, info)  # `model` now runs with the adapter's modules
    examples = read_examples(records)
    sampler = Sampler(examples, cfg)
    loss_fn = _loss_fn(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    step_cfg = train.TrainConfig(
        bf16=False, dense_weight=0.0, look_weight=cfg.look, look_layers=cfg.look_layers, clip=1.0
    )
    if cfg.look > 0:
        train.attend_eagerly(model)
    trainable = sum(p.numel() for p in params)
    log(
        f"{len(records)} records, {trainable:,} trainable parameters "
        f"(LoRA r={cfg.rank}{', projector' if cfg.projector else ''}{', vision tower' if cfg.vision else ''}) "
        f"on {device}"
    )

    def lr_at(step: int, total: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return cfg.lr * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    losses: list[float] = []
    cpu_started = time.process_time()  # this process's CPU time, all threads
    started = time.perf_counter()
    budget = cfg.minutes * 60.0
    total = cfg.steps or 10**9
    step = 0
    bar = None
    first = 0.0  # the first step's time
    durations: list[float] = []
    while step < total:
        step_started = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total)
        batch = _to(train.collate(sampler.next(), engine), device)
        threads = tuner.choose()
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        losses.append(train.train_step(model, batch, loss_fn, opt, step_cfg))
        tuner.record(threads, time.perf_counter() - t0, batch.input_ids.numel())
        durations.append(time.perf_counter() - step_started)
        step += 1
        elapsed = time.perf_counter() - started
        if step == 1:
            first = elapsed
        if step == TIMING_STEPS or (step < TIMING_STEPS and step == total):
            per_step = float(np.median(durations[1:])) if step > 1 else elapsed
            if cfg.steps is None:
                total = max(step, step + int((budget - elapsed) / per_step))
            log(f"{per_step:.2f} s a step: {total} steps, about {total * per_step / 60:.1f} min")
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True)
        elif bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if cfg.steps is None and step > TIMING_STEPS and step % 20 == 0:
            # a shared machine changes speed: the schedule follows the time that is left
            total = max(step + 1, step + int((budget - elapsed) / ((elapsed - first) / (step - 1))))
            if bar is not None:
                bar.total = total
        if cfg.steps is None and elapsed > budget:
            break
    if bar is not None:
        bar.close()
    model.eval()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    head = float(np.mean(losses[: max(1, min(5, len(losses) // 4 or 1))]))
    tail = float(np.mean(losses[-max(1, min(5, len(losses) // 4 or 1)) :]))
    meta = {
        "base": base,
        "records": len(records),
        "records_dir": str(Path(records_dir).resolve()),
        "training": {
            **asdict(cfg),
            "steps": step,
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "loss_start": round(head, 4),
            "loss_end": round(tail, 4),
        },
    }
    adapters.save(peft_model, out_dir, meta)
    log(
        f"{step} steps in {seconds / 60:.1f} min ({cpu_seconds / 60:.1f} CPU min), loss {head:.3f} -> {tail:.3f}; "
        f"wrote {out_dir}"
    )
    return {
        "steps": step,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "loss_start": head,
        "loss_end": tail,
        "losses": losses,
        "engine": engine,
        "model": model,
    }


__all__ = ["FinetuneConfig", "finetune", "read_examples", "turned"]
