"""Tiny random checkpoints in EarthDial's published layout (and their tokenizers), for tests, benchmarks
and the demo model's starting point; the runtime never needs them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from earthdial.model.checkpoint import (
    native_config,
    native_to_published,
    write_safetensors,
)
from earthdial.model.tokens import (
    IMG_CONTEXT,
    INTERNVL_TOKENS,
    PHI3_TOKENS,
    earthdial_tokens,
)

# ------------------------------------------------------------------------------------------------
# Tiny checkpoints in the published layout
# ------------------------------------------------------------------------------------------------

# A small text corpus for the tiny tokenizer: the prompt vocabulary of EarthDial's tasks.
_CORPUS = """
Could you please provide the caption for the input image? Classify the given image in one of the following
classes. Classes: Answer in one word or a short phrase. Give me the location of what object is in this location
Describe the image in detail. Detect objects location. Describe objects size. Where objects are located?
Describe relation between objects. Answer the question using a single word. are there any semantic change
detected in the provided images? Analyze the images to identify the type of disaster that occurred. Options:
volcano, fire, flood, earthquake, storm. Compare the building at classify the level of damage. no-damage,
destroyed, minor-damage, major-damage. Locate all large buildings in the post-disaster image. ship ships
airplane airplanes storage tank tanks building buildings road roads river water forest farmland residential
industrial harbor airport bridge small medium large gray white red at the left right top bottom center of
Does this image has a methane plume ? What factors are responsible for the temperature? yes no The image shows
Image-1: Image-2: Classify the botanical tree species. Species: pine oak beech spruce birch
"""


def _tiny_tokenizer(variant: str) -> Any:
    """A byte-level BPE trained offline on `_CORPUS`, with Phi-3's, InternVL's and EarthDial's added tokens
    in their published order. Digits are split one by one, as in Phi-3's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return earthdial_tokenizer(tok, variant)


def earthdial_tokenizer(tok: Any, variant: str, **options: Any) -> Any:
    """A `tokenizers.Tokenizer` as a `PreTrainedTokenizerFast` with Phi-3's, InternVL's and `variant`'s
    EarthDial tokens added in their published order, and Phi-3's end-of-text as eos and pad."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        **options,
    )
    # transformers 5 ignores additional_special_tokens at construction: add them on the object.
    fast.add_special_tokens(
        {"additional_special_tokens": [*PHI3_TOKENS, *INTERNVL_TOKENS, *earthdial_tokens(variant)]}
    )
    fast.eos_token = "<|endoftext|>"
    fast.pad_token = "<|endoftext|>"
    return fast


def _rope_factors(n: int, seed: float) -> list[float]:
    return [round(1.0 + seed * i / max(n - 1, 1), 4) for i in range(n)]


def tiny_published_config(
    vocab_size: int, image_size: int = 224, variant: str = "EarthDial_4B_RGB"
) -> dict[str, Any]:
    """A small config in the published internvl_chat layout (same keys as EarthDial's config.json)."""
    head_dim = 16
    return {
        "_name_or_path": f"tiny-{variant}",
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        "model_type": "internvl_chat",
        "earthdial_variant": variant,
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "phi3-chat",
        "use_thumbnail": True,
        "torch_dtype": "float32",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": image_size,
            "patch_size": 14,
            "num_channels": 3,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "initializer_factor": 0.1,
            "drop_path_rate": 0.0,
            "use_flash_attn": False,
        },
        "llm_config": {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "hidden_size": 4 * head_dim,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 8192,
            "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "type": "su",
                "long_factor": _rope_factors(head_dim // 2, 0.5),
                "short_factor": _rope_factors(head_dim // 2, 0.1),
            },
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 32000 if vocab_size > 32000 else 2,
            "pad_token_id": None,
            "sliding_window": 262144,
            "tie_word_embeddings": False,
            "attn_implementation": "flash_attention_2",
        },
    }


def full_size_config(vocab_size: int = 32064, image_size: int = 448) -> dict[str, Any]:
    """The published EarthDial-4B shapes (InternViT-300M + Phi-3-mini), for benchmarks and memory plans."""
    cfg = tiny_published_config(vocab_size, image_size, "EarthDial_4B_RGB")
    cfg["_name_or_path"] = "EarthDial_4B-shapes"
    cfg["vision_config"].update(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24
    )
    head_dim = 96
    cfg["llm_config"].update(
        hidden_size=3072,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=32,
        max_position_embeddings=131072,
        eos_token_id=32000,
        pad_token_id=32000,
    )
    cfg["llm_config"]["rope_scaling"] = {
        "type": "su",
        "long_factor": _rope_factors(head_dim // 2, 0.5),
        "short_factor": _rope_factors(head_dim // 2, 0.1),
    }
    return cfg


def make_tiny_checkpoint(
    directory: str | Path,
    variant: str = "EarthDial_4B_RGB",
    image_size: int = 224,
    seed: int = 0,
    vision_hidden: int = 64,
) -> Path:
    """Write a tiny random-weight checkpoint in EarthDial's published layout (config, safetensors with
    published key names, tokenizer files with the added tokens). `vision_hidden` 1024 at image_size 448
    gives the (1024 tokens x 1024) vision features upstream's fixed-size band-group fusion assumes."""
    from safetensors.torch import save_file
    from transformers import InternVLForConditionalGeneration

    if variant not in ("EarthDial_4B_RGB", "EarthDial_4B_MS", "EarthDial_4B_Methane_UHI"):
        raise ValueError(f"unknown variant {variant!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer(variant)
    vocab_size = int(math.ceil(len(tokenizer) / 64) * 64)  # padded, like real checkpoints' embedding rows
    cfg = tiny_published_config(vocab_size, image_size, variant)
    cfg["vision_config"]["hidden_size"] = vision_hidden
    cfg["llm_config"]["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg["llm_config"]["pad_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(native_config(cfg, tokenizer.convert_tokens_to_ids(IMG_CONTEXT)))
    with torch.no_grad():
        # Random init leaves the class embedding, position embeddings and layer scales at constants;
        # give every tensor some spread so tests can tell a dropped or swapped weight from a kept one.
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" not in name:
                p.normal_(0.0, 0.1)
            elif "position_embeddings" in name or "cls_token" in name:
                p.normal_(0.0, 0.02)
    published = {k: v.contiguous() for k, v in native_to_published(model.state_dict()).items()}
    save_file(published, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps(
            {
                "eos_token_id": [
                    tokenizer.convert_tokens_to_ids(t) for t in ("</s>", "<|endoftext|>", "<|end|>")
                ]
            }
        )
    )
    tokenizer.save_pretrained(str(directory))
    return directory


def make_full_size_checkpoint(
    directory: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Path:
    """A random checkpoint with the published EarthDial-4B shapes and layout (`full_size_config`), in
    `dtype` (bf16, as published: about 8.3 GB), for load benchmarks. Written one tensor at a time from
    the shapes of a meta-device model, so writing it never holds more than one tensor."""
    from transformers import InternVLForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer("EarthDial_4B_RGB")
    cfg = full_size_config()
    cfg["llm_config"]["eos_token_id"] = cfg["llm_config"]["pad_token_id"] = tokenizer.pad_token_id
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = InternVLForConditionalGeneration._from_config(
            native_config(cfg, tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
        )
    shapes = native_to_published(model.state_dict())
    specs = [(name, tuple(t.shape), dtype) for name, t in sorted(shapes.items())]
    gen = torch.Generator().manual_seed(seed)

    def make(name: str) -> torch.Tensor:
        shape = shapes[name].shape
        if "norm" in name and len(shape) == 1:
            return torch.ones(shape)
        return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)

    write_safetensors(directory / "model.safetensors", specs, make, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(str(directory))
    return directory
