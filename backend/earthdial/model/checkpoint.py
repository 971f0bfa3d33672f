"""EarthDial checkpoints in their published layout, and their conversion to transformers' native InternVL.

The published repositories (EarthDial_4B_RGB, _MS, _Methane_UHI) hold an InternVL-chat `config.json`
(`model_type: internvl_chat`, `vision_config`, `llm_config`), safetensors keyed `vision_model.*`,
`mlp1.*`, `language_model.*`, and tokenizer files, but no modelling code. Names and config are converted
here, in memory, to `InternVLForConditionalGeneration` with a `phi3` text config;
`earthdial.training.tiny.make_tiny_checkpoint` writes the same layout with random weights so tests load through this exact path.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from earthdial.model.quiet import quiet_model_loading
from earthdial.model.tokens import (
    CHAT_TOKENS,
    IMG_CONTEXT,
    INTERNVL_TOKENS,
    detect_variant,
)

INTERNVL_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


class CheckpointError(Exception):
    """A checkpoint directory that cannot be loaded; the message names the file or keys at fault."""


# ------------------------------------------------------------------------------------------------
# Weight names
# ------------------------------------------------------------------------------------------------

# The one table of names: (published, native). `{n}` is a layer number and `{wb}` weight or bias; a name
# ending in "." is a prefix, the rest of the key kept as is. Both directions are compiled from it, in order.
_RENAMES = (
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    ("vision_model.encoder.layers.{n}.ls1", "model.vision_tower.encoder.layer.{n}.lambda_1"),
    ("vision_model.encoder.layers.{n}.ls2", "model.vision_tower.encoder.layer.{n}.lambda_2"),
    ("vision_model.encoder.layers.{n}.attn.proj.", "model.vision_tower.encoder.layer.{n}.attention.projection_layer."),
    ("vision_model.encoder.layers.{n}.norm1.", "model.vision_tower.encoder.layer.{n}.layernorm_before."),
    ("vision_model.encoder.layers.{n}.norm2.", "model.vision_tower.encoder.layer.{n}.layernorm_after."),
    ("vision_model.encoder.layers.{n}.mlp.", "model.vision_tower.encoder.layer.{n}.mlp."),
    ("mlp1.0.{wb}", "model.multi_modal_projector.layer_norm.{wb}"),
    ("mlp1.1.{wb}", "model.multi_modal_projector.linear_1.{wb}"),
    ("mlp1.3.{wb}", "model.multi_modal_projector.linear_2.{wb}"),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.weight", "lm_head.weight"),
)  # fmt: skip
_FIELDS = {"n": r"\d+", "wb": "weight|bias"}


def _compile(source: str, target: str) -> tuple[re.Pattern[str], str]:
    """`source` as an anchored pattern and `target` as its replacement (fields by name)."""
    pattern = re.escape(source)
    for name, regex in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{regex})")
        target = target.replace("{" + name + "}", rf"\g<{name}>")
    return re.compile("^" + pattern + ("" if source.endswith(".") else "$")), target


_TO_NATIVE = [_compile(published, native) for published, native in _RENAMES]
_TO_PUBLISHED = [_compile(native, published) for published, native in _RENAMES]
# InternViT's fused q/k/v (published) and transformers' separate projections (native): split and joined
_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_NATIVE_QKV = re.compile(
    r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$"
)


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, repl in table:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return None


def published_to_native(published: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename published keys to native ones. Returns (native state dict, published keys not understood)."""
    native: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in published.items():
        if m := _QKV.match(key):
            q, k, v = tensor.chunk(3, dim=0)  # InternViT stacks q, k, v by rows
            base = f"model.vision_tower.encoder.layer.{m[1]}.attention"
            native[f"{base}.q_proj.{m[2]}"] = q
            native[f"{base}.k_proj.{m[2]}"] = k
            native[f"{base}.v_proj.{m[2]}"] = v
        elif (new := _rename(key, _TO_NATIVE)) is not None:
            native[new] = tensor
        else:
            unknown.append(key)
    return native, unknown


def native_to_published(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `published_to_native`, used to write checkpoints in the published layout."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in native.items():
        if m := _NATIVE_QKV.match(key):
            parts.setdefault((m[1], m[3]), {})[m[2]] = tensor
        elif (new := _rename(key, _TO_PUBLISHED)) is not None:
            out[new] = tensor
        else:
            raise CheckpointError(f"no published name for native key {key}")
    for (layer, kind), qkv_parts in parts.items():
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat(
            [qkv_parts["q"], qkv_parts["k"], qkv_parts["v"]], dim=0
        )
    return out


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def native_config(published: dict[str, Any], image_token_id: int) -> Any:
    """An `InternVLConfig` (phi3 text config) equivalent to a published internvl_chat config."""
    from transformers import InternVLConfig

    if published.get("model_type") != "internvl_chat":
        raise CheckpointError(
            f"config.json model_type is {published.get('model_type')!r}, expected 'internvl_chat'"
        )
    vis, llm = dict(published["vision_config"]), dict(published["llm_config"])
    if llm.get("model_type") != "phi3":
        raise CheckpointError(f"llm_config.model_type is {llm.get('model_type')!r}; EarthDial uses phi3")
    if ps_version(published) not in ("v1", "v2"):
        raise CheckpointError(f"ps_version {published['ps_version']!r} is unknown (InternVL has v1 and v2)")
    check_upstream_keys(published)
    vision_config = {
        "hidden_size": vis["hidden_size"],
        "num_hidden_layers": vis["num_hidden_layers"],
        "num_attention_heads": vis["num_attention_heads"],
        "intermediate_size": vis["intermediate_size"],
        "hidden_act": vis.get("hidden_act", "gelu"),
        "layer_norm_eps": vis.get("layer_norm_eps", 1e-6),
        "image_size": vis["image_size"],
        "patch_size": vis["patch_size"],
        "num_channels": vis.get("num_channels", 3),
        "attention_bias": vis.get("qkv_bias", True),
        "use_qk_norm": vis.get("qk_normalization", False),
        "norm_type": vis.get("norm_type", "layer_norm"),
        "layer_scale_init_value": vis.get("initializer_factor", 0.1),
        "use_mean_pooling": True,  # InternViT has no final norm; the native class skips it with this flag
    }
    text = {
        k: v
        for k, v in llm.items()
        if k not in ("architectures", "auto_map", "_name_or_path", "attn_implementation")
    }
    rope = text.pop("rope_scaling", None)
    if rope:
        rope = dict(rope)
        kind = rope.pop("type", rope.pop("rope_type", None))
        # Phi-3's old name for long-context RoPE is "su"; current transformers calls it "longrope".
        rope["rope_type"] = "longrope" if kind in ("su", "longrope") else kind
        rope["rope_theta"] = text.get("rope_theta", 10000.0)
        if "original_max_position_embeddings" in text and "factor" not in rope:
            rope["factor"] = text["max_position_embeddings"] / text["original_max_position_embeddings"]
        text["rope_parameters"] = rope
    text["model_type"] = "phi3"
    text["tie_word_embeddings"] = False
    size = int(published.get("force_image_size") or vis["image_size"])
    tokens_per_tile = int((size // vis["patch_size"]) ** 2 * published.get("downsample_ratio", 0.5) ** 2)
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=tokens_per_tile,
        downsample_ratio=published.get("downsample_ratio", 0.5),
        projector_hidden_act="gelu",
        vision_feature_layer=published.get("select_layer", -1),
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,  # Phi-3's lm_head is its own matrix; the native default would tie it
    )


EVALUATION_MAX_TILES = 6  # `--max-num` of every upstream evaluation script; also its config class default
TEMPLATE = "phi3-chat"  # the one chat template EarthDial uses (prompts.render_chat)


def check_upstream_keys(published: dict[str, Any]) -> None:
    """Config keys upstream reads that only one value of works here: `select_layer` (which ViT layer's
    output feeds the projector; upstream takes `hidden_states[select_layer]`, -1 being the last layer,
    EarthDial's training value) and `template` (the conversation template; EarthDial's is phi3-chat,
    the only one `render_chat` writes). Any other value is refused rather than silently run as these."""
    layer = published.get("select_layer", -1)
    if layer != -1:
        raise CheckpointError(
            f"select_layer {layer!r}: only -1 (the vision tower's last layer, as EarthDial was trained) is supported"
        )
    template = published.get("template", TEMPLATE)
    if template != TEMPLATE:
        raise CheckpointError(
            f"template {template!r}: only {TEMPLATE!r} (EarthDial's chat template) is supported"
        )


def dynamic_image_size(published: dict[str, Any]) -> bool:
    """Whether RGB images are split into dynamic tiles. An explicit false (a model trained on whole
    images: upstream's training dataloader and demo worker then give one tile) is honoured; absent counts
    as tiled, since every upstream evaluation tiles (`--dynamic`) whatever the config says."""
    return bool(published.get("dynamic_image_size", True))


def ps_version(published: dict[str, Any]) -> str:
    """The pixel-shuffle version; upstream's config class defaults to 'v1' (transposed) when absent."""
    return str(published.get("ps_version", "v1"))


def use_thumbnail(published: dict[str, Any]) -> bool:
    """Whether multi-tile images get a thumbnail; upstream's config class defaults to False."""
    return bool(published.get("use_thumbnail", False))


def adds_bos(directory: str | Path, tokenizer: Any) -> bool:
    """Whether a prompt starts with the BOS token, as upstream's `tokenizer(query)` would add it: the
    checkpoint's tokenizer_config.json `add_bos_token` when it has the key, else what the tokenizer's
    own default special tokens do to a plain text."""
    cfg_path = Path(directory) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if "add_bos_token" in cfg:
        return bool(cfg["add_bos_token"]) and tokenizer.bos_token_id is not None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


# The tasks the built-in demo model was trained on (training.data's mix: refer and absent-class refer,
# grounding, change, and "describe": caption, classify, identify; docs/demo-model.md); any other task's
# answers from it are noise, so `status` lists these for a demo model (model.trained_tasks).
DEMO_TASKS = ("refer", "grounding", "caption", "classify", "identify", "change")


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    variant: str
    image_size: int  # force_image_size: the tile size the model was trained at
    tokens_per_tile: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    system_message: str
    vocab: frozenset[str]
    num_parameters: int
    demo: bool = False  # the built-in demo model (config.json "demo": true), trained on synthetic scenes
    ps_version: str = "v2"  # pixel shuffle: "v2", or "v1" (features left transposed, as upstream's v1)
    dynamic_image_size: bool = True  # false: each image is one tile (no dynamic tiling)
    add_bos: bool = False  # prompts start with <s> (the tokenizer config asks for it)


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    for shard in shards:
        if not (directory / shard).exists():
            raise CheckpointError(f"{directory}: weight shard {shard} named in the index is missing")
    return [directory / shard for shard in shards]


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in _shards(directory):
        tensors.update(load_file(str(shard)))
    return tensors


# safetensors dtype names <-> torch dtypes (the format: 8-byte little-endian header length, a JSON header
# of name -> dtype/shape/data_offsets, then the raw little-endian tensor bytes)
_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one safetensors file, read one tensor at a time with plain reads: no mmap
    whose touched pages would count as a second copy of the weights in the process's memory."""
    with open(path, "rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        except (struct.error, ValueError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file ({exc})") from exc
        start = 8 + length
        header.pop("__metadata__", None)
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if entry["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
            if tensor.numel() * tensor.element_size() != end - begin:
                raise CheckpointError(
                    f"{path}: tensor {name}: {end - begin} bytes for shape {entry['shape']}"
                )
            f.seek(start + begin)
            raw = memoryview(tensor.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy is a buffer
            if end > begin and f.readinto(raw) != end - begin:
                raise CheckpointError(f"{path}: tensor {name} is cut short (truncated file?)")
            yield name, tensor


def write_safetensors(
    path: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    make: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """A safetensors file written one tensor at a time (`make(name)` builds each on demand), so writing
    a full-size checkpoint needs one tensor in memory, not all of them. Written beside and renamed."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    offset = 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype in specs:
            tensor = make(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: made {tuple(tensor.shape)}, declared {tuple(shape)}")
            f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]  # numpy is a buffer
    tmp.replace(path)


def load_tokenizer(directory: str | Path) -> Any:
    """The checkpoint's tokenizer, `tokenizers`-backed. Upstream loads the slow (sentencepiece) one
    (`use_fast=False`); transformers 5 has only the `tokenizers` backend for Llama-type vocabularies
    (it ignores `use_fast`), and the tiny and demo tokenizers exist only as tokenizer.json. Phi-3-mini's
    tokenizer config sets `legacy: false`, under which the two backends are meant to split text alike
    (not checkable here: the published tokenizer files are not on this machine). So: the fast one, with
    BOS decided by `adds_bos` (docs/fidelity.md)."""
    quiet_model_loading()  # before transformers (and torchao through it) is imported
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    missing = [
        t for t in (*INTERNVL_TOKENS, "<|end|>", "<|user|>", "<|assistant|>") if t not in tok.get_vocab()
    ]
    if missing:
        raise CheckpointError(f"{directory}: tokenizer lacks InternVL/Phi-3 tokens {missing}")
    return tok


def load(
    directory: str | Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    weights: str = "meta",
) -> tuple[Any, Any, CheckpointInfo]:
    """Load a published-layout checkpoint into `InternVLForConditionalGeneration`.
    Every published key must land on a native parameter of the right shape and none may be left over.
    `weights`: "meta" (the default) builds the model without storage and moves each published tensor,
    renamed and cast one at a time, into it, so the peak is about one copy of the weights; "copy" is the
    former path (build on the device, read the whole file, copy in), kept for the load benchmark."""
    quiet_model_loading()
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json (is this an EarthDial checkpoint directory?)")
    published_cfg = json.loads((directory / "config.json").read_text())
    tokenizer = load_tokenizer(directory)
    vocab = tokenizer.get_vocab()
    config = native_config(published_cfg, image_token_id=vocab[IMG_CONTEXT])
    if len(tokenizer) > config.text_config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {len(tokenizer)} tokens but llm_config.vocab_size is {config.text_config.vocab_size}"
        )
    if weights == "copy":
        model = _load_by_copy(directory, config, device, dtype, attn_implementation)
    elif weights == "meta":
        model = _load_on_meta(directory, config, device, dtype, attn_implementation)
    else:
        raise ValueError(f"weights must be 'meta' or 'copy', not {weights!r}")
    model.eval()

    size = int(published_cfg.get("force_image_size") or published_cfg["vision_config"]["image_size"])
    declared = published_cfg.get("earthdial_variant") or _variant_from_name(
        str(published_cfg.get("_name_or_path", "")) + " " + directory.name
    )
    info = CheckpointInfo(
        path=str(directory),
        variant=detect_variant(set(vocab), declared),
        image_size=size,
        tokens_per_tile=config.image_seq_length,
        min_tiles=int(published_cfg.get("min_dynamic_patch", 1)),
        max_tiles=int(published_cfg.get("max_dynamic_patch", EVALUATION_MAX_TILES)),
        use_thumbnail=use_thumbnail(published_cfg),
        system_message=published_cfg.get("system_message") or INTERNVL_SYSTEM_MESSAGE,
        vocab=frozenset(vocab),
        num_parameters=sum(p.numel() for p in model.parameters()),
        demo=bool(published_cfg.get("demo", False)),
        ps_version=ps_version(published_cfg),
        add_bos=adds_bos(directory, tokenizer),
        dynamic_image_size=dynamic_image_size(published_cfg),
    )
    return model, tokenizer, info


def _weight_problems(
    directory: Path,
    expected: dict[str, torch.Size],
    native: dict[str, torch.Size],
    unknown: list[str],
) -> None:
    """A CheckpointError naming missing, misshapen and unexpected weights, if there are any."""
    missing = sorted(set(expected) - set(native))
    mismatched = [
        f"{k}: checkpoint {tuple(native[k])} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(native))
        if native[k] != expected[k]
    ]
    unexpected = unknown + sorted(set(native) - set(expected))
    if not (missing or mismatched or unexpected):
        return

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")

    problems = []
    if missing:
        published_names = native_to_published({k: torch.empty(expected[k], device="meta") for k in missing})
        problems.append(f"missing weights: {names(sorted(published_names))}")
    if mismatched:
        problems.append(f"wrong shapes: {names(mismatched)}")
    if unexpected:
        problems.append(f"unexpected weights: {names(unexpected)}")
    raise CheckpointError(f"{directory}: weights do not match config.json: " + "; ".join(problems))


def _load_by_copy(directory: Path, config: Any, device: str, dtype: torch.dtype, attn: str) -> Any:
    """The former path: whole published dict + the model on the device + a converted copy at peak."""
    from transformers import InternVLForConditionalGeneration
    from transformers.initialization import no_init_weights

    native, unknown = published_to_native(_read_safetensors(directory))
    with no_init_weights(), torch.device(device):
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _weight_problems(directory, expected, {k: v.shape for k, v in native.items()}, unknown)
    model.load_state_dict({k: v.to(dtype) for k, v in native.items()}, strict=True)
    return model


def _load_on_meta(directory: Path, config: Any, device: str, dtype: torch.dtype, attn: str) -> Any:
    """gpt-fast's way: the model built on the meta device (no storage), each published tensor read,
    renamed (qkv split), cast and moved to the device on its own, then assigned in place of the meta
    parameter. Non-persistent buffers (RoPE frequencies), which no checkpoint holds, are rebuilt."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    native: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for shard in _shards(directory):
        for key, tensor in iter_safetensors(shard):
            part, unk = published_to_native({key: tensor})
            unknown += unk
            for name, t in part.items():
                # q, k, v come out as views of the stacked qkv: clone them so the stack can be freed
                native[name] = t.to(device=device, dtype=dtype, copy=t.dtype == dtype)
            del tensor, part
    _weight_problems(directory, expected, {k: v.shape for k, v in native.items()}, unknown)
    model.load_state_dict(native, strict=True, assign=True)
    del native
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as `_from_config(dtype=...)` builds them on the copy path
    try:
        for module in model.modules():
            stale = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
            if not stale:
                continue
            if not hasattr(module, "config"):
                raise CheckpointError(
                    f"{directory}: cannot rebuild buffers {stale} of {type(module).__name__}"
                )
            with torch.device(device):
                fresh = type(module)(config=module.config)
            for n in stale:
                module._buffers[n] = fresh._buffers[n]
    finally:
        torch.set_default_dtype(previous)
    return model


def _variant_from_name(name: str) -> str | None:
    upper = name.upper()
    if "METHANE" in upper or "UHI" in upper:
        return "EarthDial_4B_Methane_UHI"
    if re.search(r"(^|[_\-\s/])MS($|[_\-\s/])", upper):
        return "EarthDial_4B_MS"
    if "RGB" in upper:
        return "EarthDial_4B_RGB"
    return None


__all__ = [
    "CHAT_TOKENS",
    "CheckpointError",
    "CheckpointInfo",
    "load",
    "load_tokenizer",
    "native_config",
    "native_to_published",
    "published_to_native",
]
