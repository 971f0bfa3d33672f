"""The EarthDial engine: a loaded checkpoint plus the whole generation path, readable in one sitting.

chip pixels -> tiles -> prompt with image tokens -> batched greedy decoding -> answer text.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import checkpoint, pixels
from .prompts import expand_images, render_chat
from .tokens import CHAT_TOKENS, STOP_TOKENS


@dataclass
class Query:
    question: str  # user turn with one <image> marker per image
    images: list[torch.Tensor]  # per image: normalised tiles (n, 3, size, size)
    max_new_tokens: int = 100
    history: tuple[tuple[str, str], ...] = ()


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


class Engine:
    def __init__(self, model_dir: str, device: str = "auto", max_tiles: int | None = None) -> None:
        self.device = pick_device(device)
        # bf16 on GPUs (what the weights are published in); fp32 on CPUs, where bf16 matmuls are slow or absent.
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        has_flash = self.device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
        self.attn_implementation = "flash_attention_2" if has_flash else "sdpa"
        self.model, self.tokenizer, self.info = checkpoint.load(
            model_dir, self.device, self.dtype, self.attn_implementation
        )
        self.max_tiles = max_tiles or self.info.max_tiles
        self.tokenizer.padding_side = "left"
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = sorted({vocab[t] for t in STOP_TOKENS if t in vocab})
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        )
        self._strip = [t for t in CHAT_TOKENS if t in vocab]
        self._lock = threading.Lock()  # one generate at a time on the device

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
        }

    def image_tiles(self, data: np.ndarray, nodata: float | None = None) -> torch.Tensor:
        """A chip's (bands, rows, cols) pixels -> normalised InternVL tiles at the checkpoint's tile size."""
        rgb = pixels.to_unit_rgb(data, nodata)
        tiles = pixels.dynamic_tiles(
            rgb, self.info.image_size, self.info.min_tiles, self.max_tiles, self.info.use_thumbnail
        )
        return pixels.normalize(tiles)

    def prompt_text(self, query: Query) -> str:
        chat = render_chat(query.question, self.info.system_message, query.history)
        return expand_images(chat, [len(t) for t in query.images], self.info.tokens_per_tile)

    @torch.inference_mode()
    def generate(self, queries: list[Query]) -> list[str]:
        """Greedy answers for a batch of queries (left-padded; each row stops at its own stop token)."""
        if not queries:
            return []
        texts = [self.prompt_text(q) for q in queries]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        tiles = [t for q in queries for t in q.images]
        pixel_values = torch.cat(tiles).to(self.device, self.dtype) if tiles else None
        with self._lock:
            out = self.model.generate(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
                pixel_values=pixel_values,
                max_new_tokens=max(q.max_new_tokens for q in queries),
                do_sample=False,
                num_beams=1,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        return [self._decode(ids[: q.max_new_tokens]) for ids, q in zip(new, queries, strict=True)]

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
