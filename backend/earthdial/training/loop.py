"""The training loop: the vision stage with its dense aids, the conversation stage with soft number
targets and the attention ("look") aids, the optimiser and its schedule.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from earthdial.demo import synthetic
from earthdial.demo.synthetic import CLASSES
from earthdial.model import checkpoint
from earthdial.training.data import (
    ABSENT_MIX,
    DEFAULT_MIX,
    Batch,
    SoftNumberLoss,
    _render_size,
    _turn_array,
    _two_orientations,
    collate,
    dense_targets,
    make_examples,
    patch_targets,
    turn_scene,
)
from earthdial.training.evaluate import quick_check
from earthdial.training.model import (
    NUMBERS,
    TRAIN_SEED,
    build_model,
    build_tokenizer,
    make_engine,
    save_checkpoint,
)

# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    minutes: float = 29.0  # wall-clock cap of the optimisation loop (with `steps`, stops early if reached)
    seed: int = TRAIN_SEED
    batch_size: int = 32
    lr: float = 1e-3  # stage 2 (2e-3 there kept the referring loss flat for 450 steps)
    vision_lr: float = 2e-3  # stage 1
    warmup_steps: int = 100
    final_lr_ratio: float = 0.15
    weight_decay: float = 0.05
    clip: float = 1.0
    bf16: bool | None = None  # None: only where the CPU has native bf16 (AVX512-BF16 or AMX)
    freeze_vision: bool = True  # after stage 1; False trains the vision tower in stage 2 too
    threads: int = 2
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    dense_weight: float = 0.5  # weight of the training-only dense aid (0: off)
    look_weight: float = 0.5  # weight of the training-only look aid (attention supervision; 0: off)
    look_layers: tuple[int, ...] = (2, 3)
    easy_share: float = 0.2  # share of stage 2 on scenes with fewer objects (a curriculum; 0: none)
    vision_share: float = 0.25  # share of the budget spent first on the vision tower alone (dense aid)
    vision_batch: int = 48
    vision_steps: int | None = None  # with `steps`: the vision stage's steps
    steps: int | None = None  # the schedule's length in steps; None: as many as `minutes` allows
    check_every: int = 200  # a quick held-out check every this many steps (0: never)
    check_scenes: int = 48
    init: str | None = None  # a checkpoint directory to continue from (no stage 1; see `continuation`)


def continuation(init: str, minutes: float = 8.0, seed: int = 1, **overrides: Any) -> TrainConfig:
    """The recipe that continues a trained demo checkpoint on the absent-class mixture: stage 2 only,
    a short warm-up to a lower learning rate, no curriculum, no dense aid (its heads are not saved, so
    they would start from random and pull the projector about)."""
    values: dict[str, Any] = dict(
        init=init,
        minutes=minutes,
        seed=seed,
        lr=3e-4,
        warmup_steps=20,
        final_lr_ratio=0.2,
        mix=dict(ABSENT_MIX),
        dense_weight=0.0,
        easy_share=0.0,
        vision_share=0.0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over the first steps, then a cosine from 1 to `final_lr_ratio` over the run's
    progress (0..1: the share of the time budget, or of max_steps, used)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ThreadTuner:
    """Picks 1 or `most` torch threads by measured seconds per token. On a shared 2-core machine two
    threads are ~1.7x faster when the cores are free, but a step can take 10x longer while another
    process holds a core (the threads wait on each other), where one thread is the better choice."""

    def __init__(self, most: int) -> None:
        self.options = sorted({1, max(most, 1)})
        self.cost: dict[int, float] = {}
        self.step = 0

    def choose(self) -> int:
        self.step += 1
        untried = [n for n in self.options if n not in self.cost]
        if untried:
            return untried[0]
        best = min(self.options, key=lambda n: self.cost[n])
        if len(self.options) > 1 and self.step % 12 == 0:  # keep measuring the other choice
            return next(n for n in self.options if n != best)
        return best

    def record(self, threads: int, seconds: float, tokens: int) -> None:
        v = seconds / max(tokens, 1)
        old = self.cost.get(threads)
        self.cost[threads] = v if old is None else 0.7 * old + 0.3 * v


def optimiser(model: Any, cfg: TrainConfig, extra: Any = None) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    named = list(model.named_parameters()) + (list(extra.named_parameters()) if extra is not None else [])
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embeddings" in name or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively. Without it (AVX2 only), bf16 autocast is emulated and was
    measured ~20x SLOWER than fp32 here, so it is used only where it helps."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


BOX_WEIGHT = 5.0  # of the dense aid's box term (L1 on 0-1 coordinates)


class DenseAid(torch.nn.Module):
    """Training-only heads that give the vision tower and projector a dense signal from the first step (the
    language loss reaches them only through a few answer tokens): on each ViT patch, the share of each
    class in it (a segmentation); on each projected image token, the class of an object centred in its
    cell and that object's box. They are not saved: the checkpoint is the plain InternVL layout."""

    def __init__(self, vision_dim: int, dim: int) -> None:
        super().__init__()
        self.patch_head = torch.nn.Linear(vision_dim, 1 + len(CLASSES))
        self.head = torch.nn.Linear(dim, 1 + len(CLASSES) + 4)
        self.last_box_error = float("nan")

    def loss(self, vision: torch.Tensor, feats: torch.Tensor, batch: Batch) -> torch.Tensor:
        out = self.head(feats.float())  # (images, cells, 1 + classes + 4)
        logits, box = out[..., : 1 + len(CLASSES)], out[..., 1 + len(CLASSES) :]
        cell_class, cell_box = batch.cell_class, batch.cell_box
        if cell_class is None or cell_box is None:
            raise ValueError("a vision batch needs its dense targets (cell_class, cell_box)")
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), cell_class.reshape(-1))
        pos = cell_class > 0
        if pos.any():
            box_l1 = F.l1_loss(box[pos], cell_box[pos])
            self.last_box_error = float(box_l1.detach()) * 100  # mean error on the 0-100 scale, for logs
            total = total + BOX_WEIGHT * box_l1
        if batch.patch_class is not None:
            patch_logits = self.patch_head(vision[:, 1:].float())  # drop the CLS token
            logp = F.log_softmax(patch_logits, dim=-1)
            total = total - (batch.patch_class * logp).sum(-1).mean()
        return total


def look_loss(
    attentions: tuple[torch.Tensor, ...],
    look: list[tuple[int, int, list[int]]],
    layers: tuple[int, ...],
    head: int = 0,
) -> torch.Tensor:
    """The look aid (training only): where the answer writes a box's numbers (and a change answer its Yes),
    one head of the given language-model layers should attend to the image tokens of that box's object;
    in a pair, one head should match each token of the later image with the same cell of the earlier one
    (the comparison a change answer needs). The loss is -log of the attention mass on the target tokens;
    the other heads are free."""
    rows = torch.tensor([b for b, _, _ in look])
    pos = torch.tensor([t for _, t, _ in look])
    mask = torch.zeros(len(look), attentions[0].shape[-1], dtype=torch.bool)
    for i, (_, _, keys) in enumerate(look):
        mask[i, keys] = True
    total = attentions[0].new_zeros(())
    for layer in layers:
        probs = attentions[layer][rows, head, pos].float()  # (entries, keys)
        mass = (probs * mask).sum(-1)
        total = total - torch.log(mass + 1e-6).mean()
    return total / len(layers)


def attend_eagerly(model: Any) -> None:
    """The look aids need the language model's attention weights, which only the eager implementation
    returns (the vision tower keeps sdpa)."""
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa", "": "sdpa"})


def train_step(
    model: Any,
    batch: Batch,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    aid: DenseAid | None = None,
) -> float:
    """One optimiser step. The image features are computed once and spliced into the prompt embeddings
    at the <IMG_CONTEXT> positions, exactly as `Engine.generate` does."""
    model.train()
    bf16 = native_bf16() if cfg.bf16 is None else cfg.bf16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        image_out = model.model.get_image_features(pixel_values=batch.pixel_values)
        feats = image_out.pooler_output
        embeds = model.get_input_embeddings()(batch.input_ids)
        slots = (batch.input_ids == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(slots, feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        looking = cfg.look_weight > 0 and bool(batch.look or batch.pair_look)
        out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, output_attentions=looking)
    lm = loss_fn(out.logits, batch.labels)
    loss = lm
    if aid is not None and batch.cell_class is not None and cfg.dense_weight > 0:
        loss = lm + cfg.dense_weight * aid.loss(image_out.last_hidden_state, feats, batch)
    if looking and batch.look:
        loss = loss + cfg.look_weight * look_loss(out.attentions, batch.look, cfg.look_layers)
    if looking and batch.pair_look:
        loss = loss + cfg.look_weight * look_loss(out.attentions, batch.pair_look, (1,), head=1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    opt.step()
    return float(lm.detach())  # the language loss (the dense aid's is not reported)


class TaskStream:
    """Endless batches: each step draws a task by the mix and takes fresh scenes from the seed's stream."""

    def __init__(self, cfg: TrainConfig, engine: Any) -> None:
        self.cfg, self.engine = cfg, engine
        self.rng = np.random.default_rng([cfg.seed, 0xBA7C4])
        self.next_index = 0
        self.tasks = list(cfg.mix)
        w = np.array([cfg.mix[t] for t in self.tasks], dtype=np.float64)
        self.weights = w / w.sum()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next(1.0)

    def next(self, progress: float) -> Batch:
        """A batch; early in training (`cfg.easy_share` of it) scenes hold fewer objects: first one, then
        up to two, so that finding *an* object is learned before picking the one asked for."""
        task = str(self.rng.choice(self.tasks, p=self.weights))
        n = self.cfg.batch_size
        easy = self.cfg.easy_share
        most = 1 if progress < easy / 2 else 2 if progress < easy else 4
        examples = make_examples(task, self.cfg.seed, self.next_index, n, self.rng, most)
        self.next_index += (n + 1) // 2
        return collate(examples, self.engine)


def vision_batch(cfg: TrainConfig, engine: Any, start: int, rng: np.random.Generator) -> Batch:
    """Images only (single scenes and both images of pairs), with their dense targets."""
    pixels: list[torch.Tensor] = []
    dense: list[tuple[torch.Tensor, torch.Tensor]] = []
    maps: list[torch.Tensor] = []
    index = start
    while len(pixels) < cfg.vision_batch:
        size = _render_size(rng)
        if rng.random() < 0.3:
            pair = synthetic.make_pair(cfg.seed, index)
            scenes = [pair.before, pair.after]
        else:
            scenes = [synthetic.make_scene(cfg.seed, index)]
        for scene in scenes:
            image, labels = synthetic.render_with_labels(scene, size)
            for q, f in _two_orientations(rng):
                pixels.append(engine.image(_turn_array(image, q, f), "[hr_rgb_0.5]").pixels)
                dense.append(dense_targets(turn_scene(scene, q, f).objects))
                maps.append(patch_targets(_turn_array(labels, q, f)))
        index += 1
    n = cfg.vision_batch
    empty = torch.zeros(0, dtype=torch.long)
    return Batch(
        empty,
        empty,
        empty,
        torch.cat(pixels[:n]),
        ["vision"],
        torch.stack([d[0] for d in dense[:n]]),
        torch.stack([d[1] for d in dense[:n]]),
        torch.stack(maps[:n]),
    )


def train_vision(
    model: Any,
    engine: Any,
    aid: DenseAid,
    cfg: TrainConfig,
    seconds: float,
    steps: int | None,
    log: Callable[[str], None],
) -> int:
    """Stage 1: the vision tower and projector learn the scenes through the dense aid alone (cheap: no
    language model), so that stage 2 starts from image tokens that already say what is where."""
    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
        *aid.parameters(),
    ]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    rng = np.random.default_rng([cfg.seed, 0x7151])
    started = time.perf_counter()
    step, index = 0, 10_000_000  # scenes of the same stream, far from stage 2's
    recent: list[float] = []
    tuner = ThreadTuner(cfg.threads)
    model.train()
    while (step < steps) if steps is not None else (time.perf_counter() - started < seconds):
        progress = step / steps if steps is not None else (time.perf_counter() - started) / max(seconds, 1e-9)
        for g in opt.param_groups:
            # 50 warm-up steps, then a cosine from 1 to 0.3: stage 2 warms up again from there
            g["lr"] = (
                cfg.vision_lr
                * min(1.0, (step + 1) / 50)
                * (0.3 + 0.35 * (1 + math.cos(math.pi * min(progress, 1.0))))
            )
        torch.set_num_threads(1)
        batch = vision_batch(cfg, engine, index, rng)
        index += cfg.vision_batch
        threads = tuner.choose()
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        out = model.model.get_image_features(pixel_values=batch.pixel_values)
        loss = aid.loss(out.last_hidden_state, out.pooler_output, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        tuner.record(threads, time.perf_counter() - t0, batch.pixel_values.shape[0])
        recent.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            log(
                f"vision step {step} {(time.perf_counter() - started) / 60:.1f} min dense loss {np.mean(recent[-20:]):.3f}"
                f" box error {aid.last_box_error:.1f}"
            )
    return step


def train(
    cfg: TrainConfig, out: str | Path | None = None, log: Callable[[str], None] = print
) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """Train a demo model from scratch for `cfg.minutes` of wall-clock time (or exactly `cfg.max_steps`
    steps); save it to `out` if given. Returns (model, tokenizer, published config, training summary).
    The data stream is fixed by the seed; with a time budget the number of steps depends on the
    machine's speed, with max_steps the run is step-for-step repeatable."""
    torch.set_num_threads(cfg.threads)
    if cfg.init:
        model, tokenizer, _ = checkpoint.load(cfg.init, "cpu", torch.float32, "sdpa")
        pub = json.loads((Path(cfg.init) / "config.json").read_text())
        previous = pub.pop("training", None)
        model.train()
    else:
        tokenizer = build_tokenizer()
        model, pub = build_model(tokenizer, cfg.seed)
        previous = None
    if cfg.look_weight > 0:
        attend_eagerly(model)
    engine = make_engine(model, tokenizer, pub)
    loss_fn = SoftNumberLoss(
        tokenizer.convert_tokens_to_ids(list(NUMBERS)), model.config.text_config.vocab_size
    )
    aid = (
        DenseAid(model.config.vision_config.hidden_size, model.config.text_config.hidden_size)
        if cfg.dense_weight > 0
        else None
    )
    started_all = time.perf_counter()
    vision_steps = 0
    if aid is not None and (cfg.vision_steps if cfg.steps is not None else cfg.vision_share > 0):
        vision_steps = train_vision(
            model,
            engine,
            aid,
            cfg,
            cfg.vision_share * cfg.minutes * 60.0,
            cfg.vision_steps if cfg.steps is not None else None,
            log,
        )
    if cfg.freeze_vision:  # the vision tower learns in stage 1 only (or stays as initialised without it)
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
    opt = optimiser(model, cfg, aid)
    stream = TaskStream(cfg, engine)
    tuner = ThreadTuner(cfg.threads)
    budget = cfg.minutes * 60.0 - (time.perf_counter() - started_all)
    started = time.perf_counter()
    step = 0
    losses: dict[str, list[float]] = {t: [] for t in cfg.mix}
    checks: list[dict[str, Any]] = []
    stopped_early = False
    while True:
        elapsed = time.perf_counter() - started
        if cfg.steps is not None and step >= cfg.steps:
            break
        if elapsed >= budget:
            stopped_early = cfg.steps is not None
            if stopped_early:
                log(f"time cap of {cfg.minutes:g} min reached after {step} of {cfg.steps} steps")
            break
        progress = step / cfg.steps if cfg.steps is not None else elapsed / budget
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, progress, cfg)
        torch.set_num_threads(1)  # data: small ops, no use for a second thread
        batch = stream.next(progress)
        threads = tuner.choose()
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        loss = train_step(model, batch, loss_fn, opt, cfg, aid)
        tuner.record(threads, time.perf_counter() - t0, batch.input_ids.numel())
        losses[batch.tasks[0]].append(loss)
        step += 1
        if step % 50 == 0:
            means = {t: np.mean(v[-20:]) for t, v in losses.items() if v}
            log(
                f"step {step} {elapsed / 60:.1f} min lr {opt.param_groups[0]['lr']:.2e} threads {threads} "
                + " ".join(f"{t} {m:.3f}" for t, m in means.items())
            )
        if cfg.check_every and step % cfg.check_every == 0:
            res = quick_check(engine, cfg.check_scenes)
            res.update(step=step, minutes=round((time.perf_counter() - started) / 60, 2))
            checks.append(res)
            log(f"check: {res}")
    torch.set_num_threads(cfg.threads)
    model.set_attn_implementation("sdpa")
    model.eval()
    seconds = time.perf_counter() - started_all
    summary: dict[str, Any] = {
        "seed": cfg.seed,
        "vision_steps": vision_steps,
        "vision_batch": cfg.vision_batch,
        "steps": step,
        "planned_steps": cfg.steps,
        "stopped_early": stopped_early,
        "minutes": round(seconds / 60, 2),
        "threads_seconds_per_token": {str(k): round(v, 7) for k, v in tuner.cost.items()},
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "mix": cfg.mix,
        "freeze_vision": cfg.freeze_vision,
        "dense_weight": cfg.dense_weight,
        "look_weight": cfg.look_weight,
        "easy_share": cfg.easy_share,
        "vision_share": cfg.vision_share,
        "bf16": native_bf16() if cfg.bf16 is None else cfg.bf16,
        "checks": checks,
    }
    if cfg.init:
        summary["continued_from"] = {
            "path": os.path.basename(os.path.normpath(cfg.init)),
            "training": previous,
        }
    pub["training"] = summary
    if out is not None:
        save_checkpoint(model, tokenizer, pub, out)
    return model, tokenizer, pub, summary
