"""The demo model's vocabulary (every integer 0-100 one token), its configuration and initialisation,
and saving it in EarthDial's published layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from earthdial.model import checkpoint, prompts
from earthdial.model.engine import Engine
from earthdial.model.tokens import IMG_CONTEXT, detect_variant
from earthdial.training import tiny

DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
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
    return tiny.earthdial_tokenizer(tok, DEMO_VARIANT, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def demo_published_config(vocab_size: int, eos_id: int) -> dict[str, Any]:
    """The demo model's config.json in the published internvl_chat layout: image 112, patch 14 (16 image
    tokens), vision 128 x 4 layers, text 256 x 4 layers, one tile per image."""
    cfg = tiny.tiny_published_config(vocab_size, IMAGE_SIZE, DEMO_VARIANT)
    cfg["_name_or_path"] = "EarthDial-demo"
    cfg["demo"] = True
    cfg["system_message"] = SYSTEM_MESSAGE
    cfg["max_dynamic_patch"] = 1  # the demo saw single 112 px tiles only: whole windows are resized
    cfg["use_thumbnail"] = False
    cfg["vision_config"].update(
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=4,
        num_hidden_layers=4,
        initializer_factor=1.0,  # layer-scale start: 0.1 kept a from-scratch ViT near identity for too long
    )
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
