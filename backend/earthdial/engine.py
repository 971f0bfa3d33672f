"""The EarthDial engine: a loaded checkpoint plus the whole generation path, readable in one sitting.

chip pixels -> image inputs (RGB tiles, or band groups) -> image features spliced into the prompt's
embeddings at the <IMG_CONTEXT> positions -> batched greedy decoding -> answer text.
"""

from __future__ import annotations

import importlib.util
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, pixels, scoring, sensors
from .prompts import expand_images, render_chat
from .protocol import EarthDialError, ErrorCode
from .quantize import device_memory, weight_bytes
from .quantize import quantize as quantize_model
from .tokens import CHAT_TOKENS, METHANE_UHI_ONLY, SENSOR_TAGS, STOP_TOKENS, TASK_TAGS


@dataclass
class Image:
    """One image of a query, ready for the vision tower.

    rgb:   (tiles, 3, size, size), ImageNet-normalised InternVL tiles; each tile gives tokens_per_tile tokens.
    bands: (groups, 3, size, size), sensor-normalised groups of three bands; all groups fuse into ONE
           tile's worth of tokens (EarthDial's stage-3 path)."""

    pixels: torch.Tensor
    kind: str = "rgb"

    @property
    def tiles(self) -> int:
        return 1 if self.kind == "bands" else int(self.pixels.shape[0])


@dataclass
class Query:
    question: str  # user turn with one <image> marker per image
    images: list[Image]
    max_new_tokens: int = 100
    history: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def fuse_group_features(features: torch.Tensor) -> torch.Tensor:
    """EarthDial's band-group fusion: k feature maps (k, tokens, dim) laid out in a ceil(sqrt(k)) grid
    (row-major, empty cells zero) and resized bilinearly back to (tokens, dim) - an interpolation over the
    token and feature axes, not over space."""
    k, tokens, dim = features.shape
    if k == 1:
        return features[0]
    g = math.ceil(math.sqrt(k))
    canvas = features.new_zeros(g * tokens, g * dim)
    for i in range(k):
        r, c = divmod(i, g)
        canvas[r * tokens : (r + 1) * tokens, c * dim : (c + 1) * dim] = features[i]
    return F.interpolate(canvas[None, None], size=(tokens, dim), mode="bilinear", align_corners=False)[0, 0]


def attention_for(device: str) -> str:
    """flash-attention 2 where the package imports on a GPU, else PyTorch's sdpa (flash kernels on sm80+)."""
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class Engine:
    def __init__(
        self, model_dir: str, device: str = "auto", max_tiles: int | None = None, quantize: str = "none"
    ) -> None:
        device = pick_device(device)
        # bf16 on GPUs (what the weights are published in); fp32 on CPUs, where bf16 matmuls are slow or absent.
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, tokenizer, info = checkpoint.load(model_dir, device, dtype, attention_for(device))
        self.quantization = quantize_model(model, quantize)
        self._setup(model, tokenizer, info, max_tiles)

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, info: checkpoint.CheckpointInfo, max_tiles: int | None = None
    ) -> Engine:
        """An engine around an already-built model (benchmarks build full-size random models this way)."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, info, max_tiles)
        return engine

    def _setup(
        self, model: Any, tokenizer: Any, info: checkpoint.CheckpointInfo, max_tiles: int | None
    ) -> None:
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.device = str(model.device.type)
        self.dtype = model.dtype
        self.attn_implementation = model.config._attn_implementation
        self.max_tiles = max_tiles or self.info.max_tiles
        self.tokenizer.padding_side = "left"
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = sorted({vocab[t] for t in STOP_TOKENS if t in vocab})
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        )
        self.image_token_id = self.model.config.image_token_id
        self._strip = [t for t in CHAT_TOKENS if t in vocab]
        self._lock = threading.Lock()  # one generate at a time on the device
        if not hasattr(self, "quantization"):
            self.quantization = {"mode": "none", "bytes_after": weight_bytes(model)}
        self.plan: dict[str, Any] | None = None  # the memory plan the server runs with, for status

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.info.path,
            "variant": self.info.variant,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attn_implementation,
            "image_size": self.info.image_size,
            "tokens_per_tile": self.info.tokens_per_tile,
            "max_tiles": self.max_tiles,
            "parameters": self.info.num_parameters,
            "demo": self.info.demo,
            "quantize": self.quantization["mode"],
            "weights_gb": round(self.quantization["bytes_after"] / 1024**3, 4),
            "memory": self.memory(),
            "plan": self.plan,
        }

    def memory(self) -> dict[str, float | None]:
        """Device memory in GiB: what this process uses and what is free."""
        free, total = device_memory(self.device)
        if self.device.startswith("cuda"):
            used = torch.cuda.memory_allocated()
        else:
            import resource

            used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS, Linux reports kB
        gib = 1024**3
        return {
            "used_gb": round(used / gib, 3),
            "free_gb": None if free is None else round(free / gib, 3),
            "total_gb": None if total is None else round(total / gib, 3),
        }

    # -- pixels -> images ---------------------------------------------------------------------------
    def image(self, data: np.ndarray, sensor_tag: str, nodata: float | None = None) -> Image:
        """A chip's (bands, rows, cols) pixels -> the model input its sensor tag calls for."""
        spec = sensors.sensor(sensor_tag)
        size = self.info.image_size
        if spec.path == "rgb":
            rgb = pixels.to_unit_rgb(data, nodata)
            tiles = pixels.dynamic_tiles(
                rgb, size, self.info.min_tiles, self.max_tiles, self.info.use_thumbnail
            )
            return Image(pixels.normalize(tiles), "rgb")
        norm = sensors.normalize_bands(data, sensors.norm_for(sensor_tag, data.shape[0]), nodata)
        resized = F.interpolate(
            torch.from_numpy(norm)[None], size=(size, size), mode="bicubic", align_corners=False
        )[0]
        groups = torch.stack([resized[g] for g in sensors.band_groups(resized.shape[0])])
        return Image(groups, "bands")

    # -- images -> features -----------------------------------------------------------------------
    def image_features(self, images: list[Image]) -> torch.Tensor:
        """Projected features for the images in order: (sum of tiles x tokens_per_tile, llm hidden)."""
        model = self.model.model
        rgb = [im.pixels for im in images if im.kind == "rgb"]
        rgb_feats = iter(())
        if rgb:  # all RGB tiles of the batch in one vision call
            out = model.get_image_features(
                pixel_values=torch.cat(rgb).to(self.device, self.dtype)
            ).pooler_output
            rgb_feats = iter(out.split([t.shape[0] for t in rgb]))
        parts = []
        for im in images:
            if im.kind == "rgb":
                parts.append(next(rgb_feats).flatten(0, 1))
                continue
            hidden = model.vision_tower(pixel_values=im.pixels.to(self.device, self.dtype)).last_hidden_state
            fused = fuse_group_features(hidden[:, 1:, :])  # drop the CLS token, then fuse the groups
            side = int(math.isqrt(fused.shape[0]))
            shuffled = model.pixel_shuffle(
                fused.reshape(1, side, side, -1), self.model.config.downsample_ratio
            )
            parts.append(model.multi_modal_projector(shuffled.reshape(1, -1, shuffled.shape[-1]))[0])
        return torch.cat(parts)

    # -- prompts ----------------------------------------------------------------------------------
    def check_tags(self, text: str) -> None:
        """A task or sensor tag the checkpoint's vocabulary lacks is an error naming the variant to load."""
        vocab = self.info.vocab
        for tag in re.findall(r"\[[a-z0-9_.]+\]", text):
            if tag in (*SENSOR_TAGS, *TASK_TAGS) and tag not in vocab:
                need = (
                    "EarthDial_4B_Methane_UHI" if tag in METHANE_UHI_ONLY else "another EarthDial checkpoint"
                )
                raise EarthDialError(
                    ErrorCode.WRONG_VARIANT,
                    f"{tag} is not in the vocabulary of the loaded {self.info.variant}; serve {need} for it",
                )

    def prompt_text(self, query: Query) -> str:
        chat = render_chat(query.question, self.info.system_message, query.history)
        return expand_images(chat, [im.tiles for im in query.images], self.info.tokens_per_tile)

    # -- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, queries: list[Query], **overrides: Any) -> list[str]:
        """Greedy answers for a batch of queries (left-padded; each row stops at its own stop token).
        `overrides` go to transformers' generate (benchmarks pin the answer length with them)."""
        if not queries:
            return []
        for q in queries:
            self.check_tags(q.question)
        texts = [self.prompt_text(q) for q in queries]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        input_ids = enc["input_ids"].to(self.device)
        with self._lock:
            embeds = self.model.get_input_embeddings()(input_ids)
            images = [im for q in queries for im in q.images]
            if images:
                feats = self.image_features(images).to(embeds.dtype)
                slots = input_ids == self.image_token_id
                if int(slots.sum()) != feats.shape[0]:
                    raise EarthDialError(
                        ErrorCode.MODEL_ERROR,
                        f"{int(slots.sum())} image slots for {feats.shape[0]} image tokens",
                    )
                embeds = embeds.masked_scatter(slots[..., None], feats)
            out = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=enc["attention_mask"].to(self.device),
                max_new_tokens=max(q.max_new_tokens for q in queries),
                do_sample=False,
                num_beams=1,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **{"output_scores": True, "return_dict_in_generate": True, **overrides},
            )
        return scoring.answers(self, out, [q.max_new_tokens for q in queries])

    def _decode(self, ids: list[int]) -> str:
        for i, tok in enumerate(ids):
            if tok in self.stop_ids:
                ids = ids[:i]
                break
        # skip_special_tokens would also drop <ref>/<box>, which carry the answer's grounding
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for tok in self._strip:
            text = text.replace(tok, "")
        return text.strip()
