"""Train the built-in demo model: a micro EarthDial (InternVL layout, phi3 text model, 3 M parameters) on
synthetic scenes (`earthdial.synthetic`), saved in EarthDial's published layout.

The recipe is EarthDial's in miniature, a vision stage then instruction tuning on conversations:

* records are conversations in EarthDial's format (`[{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]`) built with the same task prompts the server sends
  (`prompts.build_question`), rendered with the phi3-chat template (`prompts.render_chat` /
  `expand_images`, through `Engine.prompt_text`) and with pixels prepared by `Engine.image`, so
  training and inference see identical inputs;
* the loss is on the assistant tokens only; number tokens (every integer 0-100 is one token) get soft
  targets, a Gaussian over neighbouring values (sigma 1.5), since a box off by one is nearly right;
* stage 1 trains the vision tower and projector alone through training-only dense heads (per patch the
  share of each class, per image token the class and box of the object covering it): cheap, and where
  localisation is learned. Stage 2 freezes the tower (unless `freeze_vision` is off) and trains the
  projector and language model on the conversations, with two training-only attention targets (the "look"
  aids): one head of layers 2-3 attends to the object whose box is being written, one head of layer 1
  matches each token of a pair's later image with the same cell of the earlier one;
* initialisation: 2-D sin-cos ViT position embeddings, smooth sin-cos number-token vectors, and a quadratic
  code in two dimensions of the numbers' output rows (see `build_model`);
* AdamW (0.9, 0.98), weight decay 0.05, warm-up then cosine in each stage, clip 1.0; bf16 autocast only
  where the CPU computes bf16 natively (on AVX2-only CPUs it is ~20x slower than fp32).

Tasks: referring (`[refer]`, with follow-up turns for the scene's other objects), grounded description
(`[grounding]`), caption (`[caption]`), classification of the main object, region identification
(`[identify]`) and change between two images (`[changedet]`: Yes/No plus the boxes of what appeared or
disappeared). `evaluate` scores a checkpoint on held-out scenes through the server's own request path.
"""

from __future__ import annotations

import json
import math
import os
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, prompts, synthetic
from .synthetic import CLASSES, Scene, SceneObject
from .tokens import IMG_CONTEXT

DEMO_DIR = Path(__file__).resolve().parent / "models" / "demo"
DEMO_VARIANT = "EarthDial_4B_RGB"  # the tags it knows are the RGB checkpoint's
SYSTEM_MESSAGE = "EarthDial demo."
IMAGE_SIZE = 112
TRAIN_SEED = 0
EVAL_SEED = 20261127  # held-out scenes: a stream never used in training

# ------------------------------------------------------------------------------------------------
# Tokenizer: a WordLevel vocabulary in which every integer 0-100 is one token
# ------------------------------------------------------------------------------------------------

NUMBERS = tuple(str(i) for i in range(101))
# Pieces: a number, "[[" or "]]", a word with its leading space, ", ", one whitespace char, any other char.
PIECES = r"\d+|\[\[|\]\]| ?[A-Za-z][A-Za-z_'\-]*|, |\s|."

# what users are likely to type for each class (referring prompts), and how answers name it
SYNONYMS = {
    "ship": ("ship", "ships", "boat", "boats", "vessel", "vessels", "the ship"),
    "airplane": ("airplane", "airplanes", "plane", "planes", "aircraft", "aeroplane"),
    "storage tank": ("storage tank", "storage tanks", "tank", "tanks", "oil tank", "oil tanks"),
    "building": ("building", "buildings", "house", "houses", "roof", "roofs"),
}
ARTICLE = {
    "ship": "a ship",
    "airplane": "an airplane",
    "storage tank": "a storage tank",
    "building": "a building",
}
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

_EXTRA_WORDS = """
A An The There This It is are a an the and with of at in on to no No Yes yes none None nothing object objects
scene image images inland coastal harbour harbor mostly water land shows appeared disappeared new gone removed
change changes changed detected found located size small medium large gray grey white red dark light
left right top bottom center centre middle upper lower near far all any one two three four several
ship ships boat boats vessel vessels airplane airplanes plane planes aircraft aeroplane storage tank tanks
oil building buildings house houses roof roofs road roads river forest farmland residential industrial
airport bridge field fields trees tree EarthDial demo find show where locate give me please what which how
many is there count of
"""


def _corpus() -> list[str]:
    """Texts whose words the vocabulary must hold: every task prompt the server sends, the answers the
    trainer writes, and a few common words."""
    texts = [SYSTEM_MESSAGE, _EXTRA_WORDS, prompts.DISASTER_TYPES, prompts.DAMAGE_CLASSES]
    for spec in prompts.TASKS.values():
        texts.append(spec.template.format(sensor="", images="", prompt=spec.default_prompt))
        texts.append(spec.description)
    texts += [p for names in SYNONYMS.values() for p in names]
    texts += list(POSITIONS)
    return texts


def build_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` over a WordLevel model. Words are kept with their leading space (both
    forms are in the vocabulary), integers 0-100 are single tokens, any other printable ASCII character is
    its own token, and decoding concatenates tokens exactly (a Fuse decoder), so answers round-trip."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    base = ["<unk>", "<s>", "</s>"]
    vocab: dict[str, int] = {t: i for i, t in enumerate(base)}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for n in NUMBERS:
        add(n)
    for c in map(chr, range(32, 127)):
        if not c.isalnum():
            add(c)
    add("\n")
    add("[[")
    add("]]")
    add(", ")
    for text in _corpus():
        for word in re.findall(r"[A-Za-z][A-Za-z_'\-]*", text):
            add(word)
            add(" " + word)
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":  # any word can still be spelled
        add(c)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return checkpoint.earthdial_tokenizer(tok, DEMO_VARIANT, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def demo_published_config(vocab_size: int, eos_id: int) -> dict[str, Any]:
    """The demo model's config.json in the published internvl_chat layout: image 112, patch 14 (16 image
    tokens), vision 128 x 4 layers, text 256 x 4 layers, one tile per image."""
    cfg = checkpoint.tiny_published_config(vocab_size, IMAGE_SIZE, DEMO_VARIANT)
    cfg["_name_or_path"] = "EarthDial-demo"
    cfg["demo"] = True
    cfg["system_message"] = SYSTEM_MESSAGE
    cfg["max_dynamic_patch"] = 1  # the demo saw single 112 px tiles only: whole windows are resized
    cfg["use_thumbnail"] = False
    cfg["vision_config"].update(
        hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4,
        initializer_factor=1.0,  # layer-scale start: 0.1 kept a from-scratch ViT near identity for too long
    )  # fmt: skip
    llm = cfg["llm_config"]
    llm.update(
        hidden_size=192,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=1024,
        original_max_position_embeddings=1024,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=1,
    )
    llm.pop("rope_scaling", None)  # plain RoPE: sequences are short
    return cfg


def _sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) 2-D sin-cos position values: half the channels encode the row, half the column."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    pos = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    parts = []
    for p in (rows.reshape(-1), cols.reshape(-1)):
        a = p[:, None] * omega[None]
        parts += [torch.sin(a), torch.cos(a)]
    return torch.cat(parts, dim=1).float()


def _number_vectors(dim: int, scale: float) -> torch.Tensor:
    """(101, dim) smooth sin-cos vectors for the values 0-100: near values get near vectors."""
    half = dim // 2
    periods = torch.logspace(math.log10(6.0), math.log10(400.0), half, dtype=torch.float64)
    v = torch.arange(101, dtype=torch.float64)[:, None] * (2 * math.pi / periods[None])
    out = torch.cat([torch.sin(v), torch.cos(v)], dim=1)
    return (out * scale * math.sqrt(2.0)).float()


NUMBER_CODE_SCALE = 20.0


def build_model(tokenizer: Any, seed: int = TRAIN_SEED) -> tuple[Any, dict[str, Any]]:
    """A freshly initialised demo model (native InternVL class) and its published config."""
    from transformers import InternVLForConditionalGeneration

    vocab_size = int(math.ceil(len(tokenizer) / 64) * 64)
    cfg = demo_published_config(vocab_size, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(seed)
    model: Any = InternVLForConditionalGeneration(
        checkpoint.native_config(cfg, tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    )
    with torch.no_grad():
        emb = model.model.vision_tower.embeddings
        side = IMAGE_SIZE // cfg["vision_config"]["patch_size"]
        emb.position_embeddings[0, 1:] = _sincos_2d(side, emb.position_embeddings.shape[-1])
        emb.position_embeddings[0, 0] = 0.0
        ids = tokenizer.convert_tokens_to_ids(list(NUMBERS))
        std = float(model.config.text_config.initializer_range)
        inp = model.get_input_embeddings().weight
        inp[ids] = _number_vectors(inp.shape[1], std)
        out = model.lm_head.weight
        out[ids] = _number_vectors(out.shape[1], std)
        # The last two dimensions of the number rows are a quadratic code: when the final hidden state
        # holds (c * v, c) there, the number logits are c * S * (v * n - n^2 / 2), a peak at n = v whatever
        # the scale c. So a coordinate read linearly off an image token becomes the right number token by
        # a linear map; without it the readout has to be learned as a non-linear function first.
        n = torch.arange(101, dtype=torch.float32) / 100.0
        out[ids, -2] = NUMBER_CODE_SCALE * n
        out[ids, -1] = -NUMBER_CODE_SCALE * n * n / 2
    return model, cfg


def save_checkpoint(model: Any, tokenizer: Any, cfg: dict[str, Any], directory: str | Path) -> Path:
    """Write the model in EarthDial's published layout (the files `make_tiny_checkpoint` writes)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    published = {k: v.contiguous() for k, v in checkpoint.native_to_published(state).items()}
    save_file(published, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("</s>", "<|endoftext|>", "<|end|>")]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}) + "\n")
    tokenizer.save_pretrained(str(directory))
    return directory


def make_engine(model: Any, tokenizer: Any, cfg: dict[str, Any]) -> Any:
    """An `Engine` around an in-memory model, built the way `checkpoint.load` describes a checkpoint: its
    `image` and `prompt_text` are what training uses, so the two paths cannot drift apart."""
    from .engine import Engine
    from .tokens import detect_variant

    vocab = tokenizer.get_vocab()
    info = checkpoint.CheckpointInfo(
        path="<training>",
        variant=detect_variant(set(vocab), cfg.get("earthdial_variant")),
        image_size=int(cfg["force_image_size"]),
        tokens_per_tile=model.config.image_seq_length,
        min_tiles=int(cfg.get("min_dynamic_patch", 1)),
        max_tiles=int(cfg.get("max_dynamic_patch", 6)),
        use_thumbnail=bool(cfg.get("use_thumbnail", True)),
        system_message=cfg.get("system_message") or checkpoint.INTERNVL_SYSTEM_MESSAGE,
        vocab=frozenset(vocab),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    return Engine.from_model(model, tokenizer, info)


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
        raise ValueError("an absent-class example needs a scene that lacks a class (make_examples leaves one out)")
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
        record(q, change_answer(pair)), [before, after], sensor, "change",
        [pair.before.objects, pair.after.objects], focus=focus, answer_look=answer_look,
    )  # fmt: skip


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
                scene = Scene(scene.seed, [o for k, o in enumerate(scene.objects) if k != gone],
                              scene.water_level, scene.terrain)  # fmt: skip
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
    from .engine import Query

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
    return Batch(input_ids, attention, labels, torch.cat(pixels), [ex.task for ex in examples], cell_class,
                 cell_box, patch_class, look, pair_look)  # fmt: skip


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
    values: dict[str, Any] = dict(init=init, minutes=minutes, seed=seed, lr=3e-4, warmup_steps=20,
                                  final_lr_ratio=0.2, mix=dict(ABSENT_MIX), dense_weight=0.0,
                                  easy_share=0.0, vision_share=0.0)  # fmt: skip
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


def look_loss(attentions: tuple[torch.Tensor, ...], look: list[tuple[int, int, list[int]]],
              layers: tuple[int, ...], head: int = 0) -> torch.Tensor:  # fmt: skip
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


def train_step(model: Any, batch: Batch, loss_fn: SoftNumberLoss, opt: torch.optim.Optimizer, cfg: TrainConfig,
               aid: DenseAid | None = None) -> float:  # fmt: skip
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
    return Batch(empty, empty, empty, torch.cat(pixels[:n]), ["vision"], torch.stack([d[0] for d in dense[:n]]),
                 torch.stack([d[1] for d in dense[:n]]), torch.stack(maps[:n]))  # fmt: skip


def train_vision(model: Any, engine: Any, aid: DenseAid, cfg: TrainConfig, seconds: float, steps: int | None,
                 log: Callable[[str], None]) -> int:  # fmt: skip
    """Stage 1: the vision tower and projector learn the scenes through the dense aid alone (cheap: no
    language model), so that stage 2 starts from image tokens that already say what is where."""
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *aid.parameters()]  # fmt: skip
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
    aid = (DenseAid(model.config.vision_config.hidden_size, model.config.text_config.hidden_size)
           if cfg.dense_weight > 0 else None)  # fmt: skip
    started_all = time.perf_counter()
    vision_steps = 0
    if aid is not None and (cfg.vision_steps if cfg.steps is not None else cfg.vision_share > 0):
        vision_steps = train_vision(model, engine, aid, cfg, cfg.vision_share * cfg.minutes * 60.0,
                                    cfg.vision_steps if cfg.steps is not None else None, log)  # fmt: skip
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
            log(f"step {step} {elapsed / 60:.1f} min lr {opt.param_groups[0]['lr']:.2e} threads {threads} "
                + " ".join(f"{t} {m:.3f}" for t, m in means.items()))  # fmt: skip
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
        summary["continued_from"] = {"path": os.path.basename(os.path.normpath(cfg.init)), "training": previous}
    pub["training"] = summary
    if out is not None:
        save_checkpoint(model, tokenizer, pub, out)
    return model, tokenizer, pub, summary


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def box_iou(a: Any, b: Any) -> float:
    """IoU of two boxes (answers.Box-like: x1, y1, x2, y2, angle on 0-100) as rotated polygons."""
    from shapely.geometry import Polygon

    from .georef import box_pixel_corners

    pa, pb = Polygon(box_pixel_corners(a, 100.0, 100.0)), Polygon(box_pixel_corners(b, 100.0, 100.0))
    if pa.area <= 0 or pb.area <= 0:
        return 0.0
    inter = pa.intersection(pb).area
    return float(inter / (pa.area + pb.area - inter))


def truth_box(obj: SceneObject) -> Any:
    from .answers import Box

    x1, y1, x2, y2, angle = obj.box100()
    return Box(x1, y1, x2, y2, angle, obj.cls)


def refer_target(scene: Scene, i: int) -> SceneObject:
    """The object asked for in held-out scene i: classes take turns, so every class is tested."""
    for k in range(len(CLASSES)):
        found = scene.of_class(CLASSES[(i + k) % len(CLASSES)])
        if found:
            return found[0]
    return scene.objects[0]


def score_refer(answer: str, obj: SceneObject) -> tuple[bool, float]:
    from .answers import parse_boxes

    boxes = parse_boxes(answer)
    if not boxes:
        return False, 0.0
    return True, box_iou(boxes[0], truth_box(obj))


def score_change(answer: str, pair: synthetic.Pair) -> tuple[bool, bool]:
    """(parsed, right): an answer parses when it starts with Yes or No (and a Yes names boxes)."""
    from .answers import parse_boxes

    text = answer.strip().lower()
    said_yes, said_no = text.startswith("yes"), text.startswith("no")
    parsed = (said_yes and bool(parse_boxes(answer))) or said_no
    return parsed, (said_yes if pair.changed else said_no) and (said_yes or said_no)


@torch.inference_mode()
def quick_check(engine: Any, n: int, seed: int = EVAL_SEED) -> dict[str, float]:
    """Held-out referring and change on n in-memory scenes (no GeoTIFFs): for progress logs."""
    from .engine import Query

    was_training = engine.model.training
    engine.model.eval()
    queries, objs = [], []
    for i in range(n):
        scene = synthetic.make_scene(seed, i)
        obj = refer_target(scene, i)
        im = engine.image(synthetic.render(scene, IMAGE_SIZE), "[hr_rgb_0.5]")
        queries.append(Query(prompts.build_question("refer", obj.cls, "[hr_rgb_0.5]"), [im], 40))
        objs.append(obj)
    answers_ = engine.generate(queries)
    ious = [score_refer(a, o)[1] for a, o in zip(answers_, objs, strict=True)]
    queries, pairs = [], []
    for i in range(n):
        pair = synthetic.make_pair(seed, i)
        ims = [
            engine.image(synthetic.render(s, IMAGE_SIZE), "[hr_rgb_temp_0.5]")
            for s in (pair.before, pair.after)
        ]
        queries.append(Query(prompts.build_question("change", "", "[hr_rgb_temp_0.5]"), ims, 40))
        pairs.append(pair)
    answers_ = engine.generate(queries)
    right = [score_change(a, p)[1] for a, p in zip(answers_, pairs, strict=True)]
    engine.model.train(was_training)
    return {
        "refer_iou50": round(float(np.mean([v >= 0.5 for v in ious])), 3),
        "mean_iou": round(float(np.mean(ious)), 3),
        "change_acc": round(float(np.mean(right)), 3),
    }


@dataclass
class EvalResult:
    scenes: int
    parse_rate: float
    refer_iou50: float
    mean_iou: float
    change_accuracy: float
    classify_accuracy: float
    grounding_recall: float
    by_class: dict[str, float]
    seconds: float
    absent_none: float = float("nan")  # share of questions about an absent class answered with no box
    scene_precision: float = float("nan")  # every class asked of every scene: boxes on a true object
    scene_recall: float = float("nan")  # ... and true objects found (IoU >= 0.5, same class)
    absent_questions: int = 0
    scan_precision: float = float("nan")  # a whole-scene scan (mosaic of scenes, overlapping tiles), merged
    scan_recall: float = float("nan")
    scan_tiles: int = 0

    def lines(self) -> list[str]:
        out = [
            f"held-out scenes      {self.scenes} referring + {self.scenes} change pairs (+ {self.scenes} classify/grounding)",
            f"parse rate           {self.parse_rate:.1%}   (all {4 * self.scenes} answers)",
            f"referring IoU>=0.5   {self.refer_iou50:.1%}   (mean IoU {self.mean_iou:.3f})",
            "  by class           " + ", ".join(f"{c} {v:.0%}" for c, v in self.by_class.items()),
            f"change yes/no        {self.change_accuracy:.1%}",
            f"classify main object {self.classify_accuracy:.1%}",
            f"grounding recall     {self.grounding_recall:.1%} (objects found at IoU>=0.5)",
            f"absent class: none   {self.absent_none:.1%}   ({self.absent_questions} questions about a class not in the scene)",
            f"scene precision      {self.scene_precision:.1%}   (every class asked of every scene: boxes on a true object)",
            f"scene recall         {self.scene_recall:.1%}   (true objects found at IoU>=0.5)",
            f"scan precision       {self.scan_precision:.1%}   (a {self.scan_tiles}-tile scan per class over a mosaic of scenes, merged boxes)",
            f"scan recall          {self.scan_recall:.1%}",
            f"time                 {self.seconds:.1f} s",
        ]
        return out


def evaluate(engine: Any, scenes: int = 200, seed: int = EVAL_SEED, workdir: str | Path | None = None,
             batch: int = 50, log: Callable[[str], None] | None = None) -> EvalResult:  # fmt: skip
    """Held-out evaluation through the server's own path: each scene is written as a GeoTIFF and asked
    about with `service` requests by reference (reading, band preset, sensor tag, pixels, prompt, model,
    answer parsing). Scenes are rendered at 112, 168 or 224 px like the training mix."""
    import tempfile

    from . import service
    from .answers import parse_boxes
    from .protocol import source_by_reference

    started = time.perf_counter()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="earthdial-eval-")
        workdir = tmp.name
    root = Path(workdir)
    rng = np.random.default_rng([seed, 0xE7A1])
    jobs: list[tuple[str, Any, Any]] = []  # (kind, truth, service job)
    for i in range(scenes):
        size = _render_size(rng)
        scene = synthetic.make_scene(seed, i)
        path = synthetic.write_geotiff(root / f"scene_{i:04d}.tif", synthetic.render(scene, size))
        src = source_by_reference(str(path))
        obj = refer_target(scene, i)
        asked = SYNONYMS[obj.cls][i % 2]  # singular and plural forms
        jobs.append(("refer", obj, {"op": "ask", "task": "refer", "prompt": asked, "source": src}))
        classes = ", ".join(CLASSES)
        jobs.append(("classify", scene, {"op": "ask", "task": "classify", "prompt": classes, "source": src}))
        jobs.append(("grounding", scene, {"op": "ask", "task": "grounding", "source": src}))
        for k, cls in enumerate(CLASSES):  # every class, present or not: absent-class answers and scene P/R
            asked_cls = SYNONYMS[cls][(i + k) % 2]
            jobs.append(("scene", (scene, cls), {"op": "ask", "task": "refer", "prompt": asked_cls, "source": src}))
        pair = synthetic.make_pair(seed, i)
        pb = synthetic.write_geotiff(root / f"pair_{i:04d}_a.tif", synthetic.render(pair.before, size))
        pa = synthetic.write_geotiff(root / f"pair_{i:04d}_b.tif", synthetic.render(pair.after, size))
        sources = [source_by_reference(str(pb)), source_by_reference(str(pa))]
        jobs.append(("change", pair, {"op": "ask", "task": "change", "sources": sources}))
    replies: list[dict[str, Any]] = []
    for k in range(0, len(jobs), batch):
        part = [service.prepare(h, [], engine) for _, _, h in jobs[k : k + batch]]
        service.generate(part, engine)
        replies += [service.finish(j, engine) for j in part]
        if log:
            log(f"  {len(replies)}/{len(jobs)} requests answered")
    by_class: dict[str, list[bool]] = {c: [] for c in CLASSES}
    parsed, ious, right, cls_right, found, total_objs = [], [], [], [], 0, 0
    absent: list[bool] = []
    boxes_said = boxes_right = objs_true = objs_found = 0
    for (kind, truth, _), reply in zip(jobs, replies, strict=True):
        answer = reply["answer"]
        if kind == "refer":
            ok, iou = score_refer(answer, truth)
            parsed.append(ok)
            ious.append(iou)
            by_class[truth.cls].append(iou >= 0.5)
        elif kind == "change":
            ok, good = score_change(answer, truth)
            parsed.append(ok)
            right.append(good)
        elif kind == "scene":
            scene_, cls = truth
            boxes = parse_boxes(answer)
            true = scene_.of_class(cls)
            if not true:
                absent.append(not boxes)
            hits = [b for b in boxes if any(box_iou(b, truth_box(o)) >= 0.5 for o in true)]
            boxes_said += len(boxes)
            boxes_right += len(hits)
            objs_true += len(true)
            objs_found += sum(any(box_iou(b, truth_box(o)) >= 0.5 for b in boxes) for o in true)
        elif kind == "classify":
            said = answer.strip().lower().rstrip(".")
            parsed.append(said in CLASSES)
            cls_right.append(said == truth.main_object().cls)
        else:
            boxes = parse_boxes(answer)
            parsed.append(bool(boxes))
            for obj in truth.objects:
                total_objs += 1
                found += any(b.label == obj.cls and box_iou(b, truth_box(obj)) >= 0.5 for b in boxes)
    scan_p, scan_r, scan_tiles = scan_check(engine, seed, root)
    if tmp is not None:
        tmp.cleanup()
    return EvalResult(
        scenes=scenes,
        parse_rate=float(np.mean(parsed)),
        refer_iou50=float(np.mean([v >= 0.5 for v in ious])),
        mean_iou=float(np.mean(ious)),
        change_accuracy=float(np.mean(right)),
        classify_accuracy=float(np.mean(cls_right)),
        grounding_recall=found / max(total_objs, 1),
        by_class={c: float(np.mean(v)) if v else float("nan") for c, v in by_class.items()},
        seconds=time.perf_counter() - started,
        absent_none=float(np.mean(absent)) if absent else float("nan"),
        scene_precision=boxes_right / boxes_said if boxes_said else float("nan"),
        scene_recall=objs_found / max(objs_true, 1),
        absent_questions=len(absent),
        scan_precision=scan_p,
        scan_recall=scan_r,
        scan_tiles=scan_tiles,
    )


def scan_check(engine: Any, seed: int, root: Path, n: int = 4, side: int = 224) -> tuple[float, float, int]:
    """Scene-level precision and recall of whole-scene scans: n x n held-out scenes (0.5 m pixels) side by
    side, each class scanned with 224 px tiles at 10 % overlap (so tiles straddle the scenes' borders),
    merged boxes matched to the true objects of that class at IoU >= 0.5."""
    import rasterio
    from rasterio.transform import from_origin
    from shapely.geometry import Polygon

    from . import scan, scenes
    from .answers import Box
    from .georef import box_pixel_corners
    from .protocol import source_by_reference

    layout = [[synthetic.make_scene(seed, 50_000 + r * n + c) for c in range(n)] for r in range(n)]
    image = np.concatenate([np.concatenate([synthetic.render(sc, side) for sc in row], axis=2) for row in layout], axis=1)
    path = root / "scan_mosaic.tif"
    transform = from_origin(*synthetic.ORIGIN, synthetic.SCENE_METRES / side, synthetic.SCENE_METRES / side)
    with rasterio.open(path, "w", driver="GTiff", width=image.shape[2], height=image.shape[1], count=3,
                       dtype="uint8", crs="EPSG:32633", transform=transform) as dst:  # fmt: skip
        dst.write(image)
    inverse = ~transform
    said = right = true_n = found_n = tiles = 0
    for cls in CLASSES:
        truth = []
        for r, row in enumerate(layout):
            for c, sc in enumerate(row):
                for o in sc.of_class(cls):
                    x1, y1, x2, y2, angle = o.box100()
                    corners = box_pixel_corners(Box(x1, y1, x2, y2, angle, cls), side, side)
                    truth.append(Polygon([(c * side + x, r * side + y) for x, y in corners]))
        found: list[dict[str, Any]] = []

        def keep(event: str, found: list[dict[str, Any]] = found, **fields: Any) -> None:
            if event == "progress":
                found.extend(fields["features"])

        header = {"op": "detect", "task": "refer", "prompt": SYNONYMS[cls][1], "source": source_by_reference(str(path)),
                  "options": {"tile_size": side, "overlap": 0.1, "batch": 16}}  # fmt: skip
        tiles = scan.run(header, engine, keep)["tiles"]
        boxes = [Polygon([inverse * tuple(xy) for xy in f["geometry"]["coordinates"][0]]) for f in scenes.finished(found)]

        def iou(a: Any, b: Any) -> float:
            inter = a.intersection(b).area
            return inter / max(a.area + b.area - inter, 1e-9)

        said += len(boxes)
        right += sum(any(iou(b, t) >= 0.5 for t in truth) for b in boxes)
        true_n += len(truth)
        found_n += sum(any(iou(b, t) >= 0.5 for b in boxes) for t in truth)
    return (right / said if said else float("nan")), found_n / max(true_n, 1), tiles


__all__ = [
    "DEMO_DIR",
    "EvalResult",
    "TrainConfig",
    "build_model",
    "build_tokenizer",
    "collate",
    "demo_published_config",
    "evaluate",
    "make_engine",
    "make_examples",
    "save_checkpoint",
    "train",
]
