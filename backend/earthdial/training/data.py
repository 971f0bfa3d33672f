"""Training data: synthetic scenes turned into conversations in EarthDial's format, their augmentation
(flips and quarter turns) and batches with the dense targets of the training-only aids.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from earthdial.demo import synthetic
from earthdial.demo.synthetic import CLASSES, Scene, SceneObject
from earthdial.model import prompts
from earthdial.model.engine import Query
from earthdial.training.model import ARTICLE, NUMBERS, POSITIONS, SYNONYMS

# ------------------------------------------------------------------------------------------------
# Records: scenes -> conversations in EarthDial's format
# ------------------------------------------------------------------------------------------------

RGB_SENSORS = ("[hr_rgb_0.5]",) * 3 + ("[s2_rgb_10]",)  # tags whose path is plain RGB


def box_text(obj: SceneObject) -> str:
    return "[[" + ", ".join(str(v) for v in obj.box100()) + "]]"


def grounded(label: str, obj: SceneObject) -> str:
    return f"<ref>{label}</ref><box>{box_text(obj)}</box>"


def position_word(obj: SceneObject) -> str:
    x1, y1, x2, y2 = obj.bounds()
    col = min(int((x1 + x2) / 2 * 3), 2)
    row = min(int((y1 + y2) / 2 * 3), 2)
    return POSITIONS[row * 3 + col]


def _ordered(objects: list[SceneObject]) -> list[SceneObject]:
    return sorted(objects, key=lambda o: CLASSES.index(o.cls))


def describe_scene(scene: Scene) -> str:
    """A caption: the kind of scene and its objects with coarse positions."""
    share = float(synthetic.water_grid(scene).mean())
    if share == 0:
        first = "An inland scene."
    elif share > 0.62:
        first = "A harbour scene, mostly water."
    else:
        first = "A coastal scene with water and land."
    objs = _ordered(scene.objects)
    if not objs:
        return first + " There are no objects."
    parts = [f"{ARTICLE[o.cls]} at the {position_word(o)}" for o in objs]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{first} There is {listed}."


def record(question: str, answer: str) -> list[dict[str, str]]:
    """A conversation in EarthDial's training format."""
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@dataclass
class Example:
    conversation: list[dict[str, str]]
    images: list[np.ndarray]  # (3, rows, cols) uint8, as read from a GeoTIFF
    sensor: str
    task: str
    objects: list[list[SceneObject]] = field(default_factory=list)  # per image, for the dense aid
    label_maps: list[np.ndarray] = field(default_factory=list)  # per image: 0 background, 1 + class
    # per answer turn, the (image index, object) of each box it writes, in order (for the look aid)
    focus: list[list[tuple[int, SceneObject]]] = field(default_factory=list)
    # per answer turn, the (image index, object)s its first token looks at (a change answer's Yes)
    answer_look: list[list[tuple[int, SceneObject]]] = field(default_factory=list)


def _sensor(rng: np.random.Generator) -> str:
    return str(rng.choice(RGB_SENSORS))


def refer_example(scene: Scene, image: np.ndarray, rng: np.random.Generator, max_turns: int = 3) -> Example:
    """A referring conversation: the first turn asks for one object (the form the server sends), later
    turns (follow-ups with the image in the history) ask for the scene's other objects."""
    sensor = _sensor(rng)
    objs = [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))][:max_turns]
    conv: list[dict[str, str]] = []
    for k, obj in enumerate(objs):
        asked = str(rng.choice(SYNONYMS[obj.cls]))
        q = prompts.build_question("refer", asked, sensor, images=None if k == 0 else 0)
        conv += record(q, grounded(obj.cls, obj))
    return Example(conv, [image], sensor, "refer", [scene.objects], focus=[[(0, o)] for o in objs])


def absent_answer(cls: str) -> str:
    """The answer to a referring question about a class the image does not hold. EarthDial's published
    referring data has no such example (every answer carries a box), so the phrasing is the project's:
    a sentence with no box, like the demo's grounding `No objects.` and EarthDial's change captions
    (`There is no difference.`)."""
    return f"There is no {cls}."


def absent_example(scene: Scene, image: np.ndarray, rng: np.random.Generator) -> Example:
    """A referring conversation whose first turn asks for a class the scene lacks (answered with no box),
    followed by a turn about an object that is there (with the image in the history), so that the model
    learns to tell the two apart rather than to stop drawing boxes."""
    sensor = _sensor(rng)
    present = {o.cls for o in scene.objects}
    missing = [c for c in CLASSES if c not in present]
    if not missing:
        raise ValueError(
            "an absent-class example needs a scene that lacks a class (make_examples leaves one out)"
        )
    cls = str(rng.choice(missing))
    q = prompts.build_question("refer", str(rng.choice(SYNONYMS[cls])), sensor)
    conv = record(q, absent_answer(cls))
    focus: list[list[tuple[int, SceneObject]]] = [[]]
    if scene.objects:
        obj = scene.objects[int(rng.integers(0, len(scene.objects)))]
        q2 = prompts.build_question("refer", str(rng.choice(SYNONYMS[obj.cls])), sensor, images=0)
        conv += record(q2, grounded(obj.cls, obj))
        focus.append([(0, obj)])
    return Example(conv, [image], sensor, "absent", [scene.objects], focus=focus)


def grounding_answer(scene: Scene) -> str:
    return " ".join(grounded(o.cls, o) for o in _ordered(scene.objects)) or "No objects."


def grounding_example(scene: Scene, image: np.ndarray, rng: np.random.Generator) -> Example:
    sensor = _sensor(rng)
    q = prompts.build_question("grounding", "", sensor)
    focus = [[(0, o) for o in _ordered(scene.objects)]]
    return Example(
        record(q, grounding_answer(scene)), [image], sensor, "grounding", [scene.objects], focus=focus
    )


def describe_example(scene: Scene, image: np.ndarray, rng: np.random.Generator) -> Example:
    """One of the short single-image tasks: caption, classification of the main object, or what is at a
    box (identify)."""
    sensor = _sensor(rng)
    kind = rng.choice(["caption", "classify", "identify"])
    if kind == "caption":
        q, a = prompts.build_question("caption", "", sensor), describe_scene(scene)
    elif kind == "classify":
        classes = ", ".join(str(c) for c in rng.permutation(CLASSES))
        q, a = prompts.build_question("classify", classes, sensor), scene.main_object().cls
    else:
        obj = scene.objects[int(rng.integers(0, len(scene.objects)))]
        q, a = prompts.build_question("identify", box_text(obj), sensor), obj.cls
    return Example(record(q, a), [image], sensor, "describe", [scene.objects], focus=[[]])


def change_answer(pair: synthetic.Pair) -> str:
    if not pair.changed:
        return "No."
    items = sorted(pair.changed, key=lambda c: CLASSES.index(c[1].cls))
    return "Yes. " + " ".join(grounded(f"{o.cls} {what}", o) for what, o in items)


def change_example(pair: synthetic.Pair, before: np.ndarray, after: np.ndarray) -> Example:
    sensor = "[hr_rgb_temp_0.5]"
    q = prompts.build_question("change", "", sensor)
    items = sorted(pair.changed, key=lambda c: CLASSES.index(c[1].cls))
    focus = [[(1 if what == "appeared" else 0, o) for what, o in items]]
    # the Yes looks at what changed in the LATER image, even for an object that disappeared: attention is
    # causal, so only the later image's tokens can have compared the two images (looking at the earlier
    # image's object instead left 19 of 43 disappearances unseen)
    answer_look = [[(1, o) for _, o in items]]
    return Example(
        record(q, change_answer(pair)),
        [before, after],
        sensor,
        "change",
        [pair.before.objects, pair.after.objects],
        focus=focus,
        answer_look=answer_look,
    )


# ------------------------------------------------------------------------------------------------
# Augmentation: the eight flips and quarter turns, applied to images and object labels alike
# ------------------------------------------------------------------------------------------------


def _turn_object(o: SceneObject, quarter: int, flip: bool) -> SceneObject:
    """The object after np.rot90(image, quarter, axes=(1, 2)) (counter-clockwise turns), then a
    left-right flip."""
    from dataclasses import replace

    cx, cy, angle = o.cx, o.cy, o.angle
    for _ in range(quarter % 4):  # (x, y) -> (y, 1 - x); a direction (cos a, sin a) turns by -90 degrees
        cx, cy, angle = cy, 1.0 - cx, angle - 90.0
    if flip:
        cx, angle = 1.0 - cx, 180.0 - angle
    return replace(o, cx=cx, cy=cy, angle=angle % 360.0)


def turn_scene(scene: Scene, quarter: int, flip: bool) -> Scene:
    """Labels of a turned scene (the terrain parameters are no longer valid for rendering)."""
    terrain = {"_wet": _turn_array(synthetic.water_grid(scene), quarter, flip)}
    return Scene(
        scene.seed, [_turn_object(o, quarter, flip) for o in scene.objects], scene.water_level, terrain
    )


def _turn_array(a: np.ndarray, quarter: int, flip: bool) -> np.ndarray:
    axes = (a.ndim - 2, a.ndim - 1)
    out = np.rot90(a, quarter % 4, axes=axes)
    if flip:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


def turn_pair(pair: synthetic.Pair, quarter: int, flip: bool) -> synthetic.Pair:
    return synthetic.Pair(
        turn_scene(pair.before, quarter, flip),
        turn_scene(pair.after, quarter, flip),
        [(what, _turn_object(o, quarter, flip)) for what, o in pair.changed],
    )


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------

SINGLE_TASKS: dict[str, Callable[..., Example]] = {
    "refer": refer_example,
    "grounding": grounding_example,
    "describe": describe_example,
    "absent": absent_example,
}
# share of steps per kind of batch (each step's batch is one kind, so its sequences have similar lengths)
DEFAULT_MIX = {"refer": 0.55, "change": 0.2, "grounding": 0.2, "describe": 0.05}
# the continuation run that taught the shipped model to say "none": the mix above with absent-class
# questions mixed in (a quarter of those scenes emptied of all objects, as open water or bare land tiles are)
ABSENT_MIX = {"refer": 0.45, "absent": 0.2, "change": 0.17, "grounding": 0.13, "describe": 0.05}
EMPTY_SHARE = 0.25
SIZES = ((112, 0.85), (168, 0.10), (224, 0.05))  # rendering sizes; the engine resizes to 112


def _render_size(rng: np.random.Generator) -> int:
    sizes, weights = zip(*SIZES, strict=True)
    return int(rng.choice(sizes, p=weights))


def make_examples(
    task: str, seed: int, start: int, count: int, rng: np.random.Generator, max_objects: int = 4
) -> list[Example]:
    """`count` examples of `task` from scenes start, start+1, ... of the stream `seed`. Each rendered scene
    serves two examples, in two different orientations."""
    out: list[Example] = []
    index = start
    while len(out) < count:
        size = _render_size(rng)
        if task == "change":
            pair = synthetic.make_pair(seed, index, max_objects)
            (before, lb), (after, la) = (
                synthetic.render_with_labels(s, size) for s in (pair.before, pair.after)
            )
            for q, f in _two_orientations(rng):
                ex = change_example(
                    turn_pair(pair, q, f), _turn_array(before, q, f), _turn_array(after, q, f)
                )
                ex.label_maps = [_turn_array(lb, q, f), _turn_array(la, q, f)]
                out.append(ex)
        else:
            scene = synthetic.make_scene(seed, index, max_objects=max_objects)
            if task == "absent" and rng.random() < EMPTY_SHARE:
                scene = Scene(scene.seed, [], scene.water_level, scene.terrain)  # the same ground, bare
            elif task == "absent" and {o.cls for o in scene.objects} == set(CLASSES):
                # every class is there: leave one object out, so that the class asked about is truly absent
                gone = int(rng.integers(0, len(scene.objects)))
                scene = Scene(
                    scene.seed,
                    [o for k, o in enumerate(scene.objects) if k != gone],
                    scene.water_level,
                    scene.terrain,
                )
            image, labels = synthetic.render_with_labels(scene, size)
            for q, f in _two_orientations(rng):
                ex = SINGLE_TASKS[task](turn_scene(scene, q, f), _turn_array(image, q, f), rng)
                ex.label_maps = [_turn_array(labels, q, f)]
                out.append(ex)
        index += 1
    return out[:count]


def _two_orientations(rng: np.random.Generator) -> list[tuple[int, bool]]:
    a, b = rng.choice(8, size=2, replace=False)
    return [(int(a) % 4, bool(a >= 4)), (int(b) % 4, bool(b >= 4))]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): the next token to predict at each position, -100 where no loss
    pixel_values: torch.Tensor  # (images, 3, 112, 112)
    tasks: list[str] = field(default_factory=list)
    cell_class: torch.Tensor | None = (
        None  # (images, cells): 0 background, 1 + class of an object centred there
    )
    cell_box: torch.Tensor | None = None  # (images, cells, 4): that object's box / 100
    patch_class: torch.Tensor | None = None  # (images, patches, 1 + classes): share of each label per patch
    look: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (row, position, key positions)
    pair_look: list[tuple[int, int, list[int]]] = field(default_factory=list)  # same, image to image


GRID = 4  # image tokens per side (16 tokens: 8 x 8 patches, pixel-shuffled 2 x 2)
PATCHES = 8  # ViT patches per side


def patch_targets(labels: np.ndarray) -> torch.Tensor:
    """(patches, 1 + classes): the share of each label (background first) in each ViT patch, row-major."""
    size = labels.shape[0]
    k = size // PATCHES
    onehot = np.eye(1 + len(CLASSES), dtype=np.float32)[labels[: k * PATCHES, : k * PATCHES]]
    shares = onehot.reshape(PATCHES, k, PATCHES, k, -1).mean(axis=(1, 3))
    return torch.from_numpy(shares.reshape(PATCHES * PATCHES, -1))


def dense_targets(objects: list[SceneObject]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image token (row-major 4 x 4 cells): the class of the object that covers most of the cell, and
    that object's box on 0-1, on every cell the object's box overlaps (so whichever of its cells the
    language model looks at, the box can be read there)."""
    cls = torch.zeros(GRID * GRID, dtype=torch.long)
    box = torch.zeros(GRID * GRID, 4)
    best = torch.zeros(GRID * GRID)
    for o in objects:
        x1, y1, x2, y2 = o.bounds()
        for cell in _cells_of(o):
            r, c = divmod(cell, GRID)
            share = max(0.0, min(x2, (c + 1) / GRID) - max(x1, c / GRID)) * max(
                0.0, min(y2, (r + 1) / GRID) - max(y1, r / GRID)
            )
            if share > best[cell]:
                best[cell] = share
                cls[cell] = 1 + CLASSES.index(o.cls)
                box[cell] = torch.tensor([x1, y1, x2, y2])
    return cls, box


def conversation_pieces(
    conversation: list[dict[str, str]], images: list[Any], engine: Any
) -> list[tuple[str, bool]]:
    """The training text of a conversation as (text, is_answer) pieces whose concatenation is exactly the
    engine's prompt for the last question (history included) followed by the last answer and <|end|>."""
    turns = [(conversation[i]["value"], conversation[i + 1]["value"]) for i in range(0, len(conversation), 2)]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, (q, a) in enumerate(turns):
        prefix = engine.prompt_text(Query(q, images, history=tuple(turns[:k])))
        if not prefix.startswith(done):
            raise ValueError("the chat template did not extend the previous turns")
        pieces.append((prefix[len(done) :], False))
        pieces.append((a + "<|end|>", True))
        done = prefix + a + "<|end|>"
    return pieces


def _cells_of(obj: SceneObject) -> list[int]:
    """The image-token cells (row-major 4 x 4) that an object's box overlaps."""
    x1, y1, x2, y2 = obj.bounds()
    c0, c1 = int(max(x1, 0.0) * GRID), min(int(min(x2, 0.999) * GRID), GRID - 1)
    r0, r1 = int(max(y1, 0.0) * GRID), min(int(min(y2, 0.999) * GRID), GRID - 1)
    return [r * GRID + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


_PROMPT_IDS: weakref.WeakKeyDictionary[Any, dict[str, list[int]]] = weakref.WeakKeyDictionary()


def _token_ids(tok: Any, text: str) -> list[int]:
    """Token ids of a prompt piece; prompts repeat (a few tasks, tags and phrasings), so they are cached,
    per tokenizer."""
    known = _PROMPT_IDS.setdefault(tok, {})
    ids = known.get(text)
    if ids is None:
        if len(known) > 20_000:
            known.clear()
        ids = known[text] = tok(text, add_special_tokens=False)["input_ids"]
    return ids


def collate(examples: list[Example], engine: Any) -> Batch:
    """Tokenise conversations as the engine prompts them; the loss is on the assistant answers (and the
    <|end|> that closes each) only. Also lists, for the look aids, where each box's numbers are predicted
    and which image tokens hold that box's object, what a turn's first token looks at, and in a pair which
    earlier-image token each later-image token matches."""
    tok = engine.tokenizer
    numbers = set(tok.convert_tokens_to_ids(list(NUMBERS)))
    image_id = engine.image_token_id
    rows, targets, pixels, look, pair_look = [], [], [], [], []
    for b, ex in enumerate(examples):
        images = [engine.image(im, ex.sensor) for im in ex.images]
        ids: list[int] = []
        turn_of: list[int] = []  # answer turn of each token, -1 outside answers
        turn = 0
        for text, answer in conversation_pieces(ex.conversation, images, engine):
            piece = _token_ids(tok, text) if not answer else tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            turn_of += [turn if answer else -1] * len(piece)
            turn += answer
        # labels[t] = the token at t+1 where that token belongs to an answer
        lab = [ids[t + 1] if turn_of[t + 1] >= 0 else -100 for t in range(len(ids) - 1)] + [-100]
        rows.append(ids)
        targets.append(lab)
        pixels += [im.pixels for im in images]
        context = [i for i, t in enumerate(ids) if t == image_id]
        per_image = engine.info.tokens_per_tile
        for k, focus in enumerate(ex.focus):
            spots = [t for t in range(len(ids) - 1) if turn_of[t + 1] == k and lab[t] in numbers]
            for n, t in enumerate(spots):
                if n // 5 < len(focus):
                    img, obj = focus[n // 5]
                    look.append((b, t, [context[img * per_image + c] for c in _cells_of(obj)]))
        for k, seen in enumerate(ex.answer_look):
            if seen:
                first = next(t for t in range(len(ids) - 1) if turn_of[t + 1] == k)
                cells = {context[img * per_image + c] for img, obj in seen for c in _cells_of(obj)}
                look.append((b, first, sorted(cells)))
        # a pair: each token of the later image looks at the same cell of the earlier one
        if len(images) == 2:
            pair_look += [(b, context[per_image + c], [context[c]]) for c in range(per_image)]
    width = max(len(r) for r in rows)
    pad = engine.pad_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    dense = [dense_targets(objs) for ex in examples for objs in ex.objects]
    cell_class = torch.stack([d[0] for d in dense]) if dense else None
    cell_box = torch.stack([d[1] for d in dense]) if dense else None
    maps = [m for ex in examples for m in ex.label_maps]
    patch_class = torch.stack([patch_targets(m) for m in maps]) if maps and len(maps) == len(dense) else None
    return Batch(
        input_ids,
        attention,
        labels,
        torch.cat(pixels),
        [ex.task for ex in examples],
        cell_class,
        cell_box,
        patch_class,
        look,
        pair_look,
    )


class SoftNumberLoss:
    """Cross-entropy over the vocabulary where a number target (0-100) is a Gaussian over the number
    tokens around it (sigma in number units) instead of a single token."""

    def __init__(self, number_ids: list[int], vocab_size: int, sigma: float = 1.5) -> None:
        self.number_ids = torch.tensor(number_ids)
        lookup = torch.full((vocab_size,), -1, dtype=torch.long)
        lookup[self.number_ids] = torch.arange(len(number_ids))
        self.value_of = lookup
        v = torch.arange(len(number_ids), dtype=torch.float32)
        kernel = torch.exp(-0.5 * ((v[:, None] - v[None]) / sigma) ** 2)
        self.kernel = kernel / kernel.sum(dim=1, keepdim=True)  # row n: the target for value n

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sel = labels != -100
        logp = F.log_softmax(logits[sel].float(), dim=-1)  # (N, V)
        target = labels[sel]
        value = self.value_of[target]
        is_num = value >= 0
        loss = torch.empty(target.shape[0], dtype=logp.dtype)
        other = ~is_num
        loss[other] = -logp[other].gather(1, target[other, None])[:, 0]
        if is_num.any():
            q = self.kernel[value[is_num]]  # (n, 101)
            loss[is_num] = -(q * logp[is_num][:, self.number_ids]).sum(dim=1)
        return loss.mean()
