"""The EarthDial engine: a loaded checkpoint plus the whole generation path, readable in one sitting.

chip pixels -> image inputs (RGB tiles, or band groups) -> image features spliced into the prompt's
embeddings at the <IMG_CONTEXT> positions -> batched decoding (greedy as EarthDial's evaluation, beams or
sampling on request) -> answer text.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.model import adapters, checkpoint, pixels, precision, scoring, sensors
from earthdial.model.prompts import DEFAULT_DECODING, Sampling, expand_images, render_chat
from earthdial.model.quantize import device_memory, weight_bytes
from earthdial.model.quantize import quantize as quantize_model
from earthdial.model.tokens import CHAT_TOKENS, METHANE_UHI_ONLY, SENSOR_TAGS, STOP_TOKENS, TASK_TAGS


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
    # Decoding (see prompts.decoding_for): greedy with upstream's min_new_tokens 1 unless the caller asks
    # for beams or sampling; `system` replaces the checkpoint's system message.
    num_beams: int = 1
    min_new_tokens: int = 1
    cancelled: Callable[[], bool] | None = None  # true once the request is cancelled: decoding stops
    sampling: Sampling | None = None
    system: str | None = None


def pick_device(device: str = "auto", cuda: bool | None = None, mps: bool | None = None) -> str:
    """The device to run on: auto takes an NVIDIA GPU, else Apple silicon's GPU (MPS), else the CPU.
    `cuda` / `mps`: whether each is available (None: ask torch); tests pass them to check every choice."""
    has_cuda = torch.cuda.is_available() if cuda is None else cuda
    has_mps = _mps_available() if mps is None else mps
    if device == "auto":
        return "cuda" if has_cuda else "mps" if has_mps else "cpu"
    if device == "cuda" and not has_cuda:
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    if device == "mps" and not has_mps:
        raise RuntimeError("--device mps was asked for but torch sees no MPS device (Apple silicon only)")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def fusion_grid(k: int) -> tuple[int, int]:
    """(rows, cols) of upstream's band-group fusion grid: ceil(sqrt(k)) rows, ceil(k / rows) columns."""
    rows = math.ceil(math.sqrt(k))
    return rows, math.ceil(k / rows)


def _cell_sizes(total: int, n: int) -> list[int]:
    """`total` split into n cells of total // n, the remainder added one by one to the first cells."""
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def fuse_group_features(features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """EarthDial's band-group fusion (upstream `bilinear_interpolate_and_concat`): k feature maps
    (k, tokens, dim) are each resized bilinearly (align_corners False) into their own cell of a
    (tokens, dim) output, laid out row-major on a fusion_grid(k) grid; a short last row is zero on its
    right. It interpolates over the token and feature axes, not over space.

    Upstream fixes the output at 1024 x 1024, which is (tokens, dim) of a 448 px InternViT-300M tile;
    at any other size upstream's own image-token count would not match, so the output here is the
    input's (tokens, dim), equal to upstream's wherever upstream runs. k = 1 is a plain resize."""
    k, tokens, dim = features.shape
    out_rows, out_cols = size or (tokens, dim)

    def resize(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]

    if k == 1:
        return resize(features[0], out_rows, out_cols)
    rows, cols = fusion_grid(k)
    heights, widths = _cell_sizes(out_rows, rows), _cell_sizes(out_cols, cols)
    out = features.new_zeros(out_rows, out_cols)
    top = 0
    for r in range(rows):
        left = 0
        for c in range(cols):
            i = r * cols + c
            if i < k:
                out[top : top + heights[r], left : left + widths[c]] = resize(
                    features[i], heights[r], widths[c]
                )
            left += widths[c]
        top += heights[r]
    return out


def with_cancel(queries: list[Query], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` plus a stopping criterion that ends the rows of cancelled queries (each query's own
    rows: one with greedy decoding, every beam candidate with beam search), so one cancelled request of a
    batch does not stop the others."""
    flags = [q.cancelled for q in queries]
    if not any(flags):
        return overrides
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = torch.tensor([bool(f and f()) for f in flags], dtype=torch.bool, device=input_ids.device)
            return done.repeat_interleave(input_ids.shape[0] // len(flags))  # rows are grouped per query

    criteria = StoppingCriteriaList([*overrides.get("stopping_criteria", []), Cancelled()])
    return {**overrides, "stopping_criteria": criteria}


def decoding_key(query: Query) -> tuple[int, int, Sampling | None, int]:
    """What must be equal for queries to decode in one batch: beams, min_new_tokens, sampling, and for
    beam search the answer length."""
    beams = query.num_beams
    return beams, query.min_new_tokens, query.sampling, query.max_new_tokens if beams > 1 else 0


def sampling_options(sampling: Sampling | None) -> dict[str, Any]:
    """generate's arguments for one-beam decoding: greedy, or sampled as `sampling` says."""
    if sampling is None:
        return {"do_sample": False}
    return {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
    }


CACHE_MODES = ("dynamic", "static", "compiled")  # greedy's KV cache (`serve --kv-cache`); not `decoding`
MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix saves less than its extra forward pass costs


def cache_mode_for(device: str, mode: str = "auto") -> str:
    """Greedy decoding's KV cache and compilation (the cache mode; `decoding` is the search: greedy, beams). "dynamic": transformers' growing cache, eager (the
    fallback); "static": a preallocated KV cache, eager; "compiled": the static cache with the decode
    step compiled (torch.compile), the one way to near the bandwidth bound on a GPU. "auto": compiled on
    CUDA, dynamic on a CPU, where compiling did not pay on the demo model or the small config
    (benchmarks/bench_generation.py, docs/performance.md)."""
    if mode == "auto":
        return "compiled" if device.startswith("cuda") else "dynamic"
    if mode not in CACHE_MODES:
        raise ValueError(f"the KV cache mode must be auto or one of {', '.join(CACHE_MODES)}, not {mode!r}")
    return mode


def cpu_threads(requested: int | None, cores: int | None = None) -> int:
    """torch threads for a CPU engine: `requested`, else one fewer than the cores (at least one), so that
    the scan's reader thread and the server's I/O have a core of their own; 0 leaves torch's default. On
    the 2-core dev machine one thread scanned faster than torch's two at batch 1 to 32, as fast at 64
    (docs/performance.md)."""
    if requested is not None:
        return max(0, requested)
    return max(1, (cores if cores is not None else os.cpu_count() or 1) - 1)


def compile_config(device: str) -> Any:
    """How generate compiles the decode step: CUDA graphs ("reduce-overhead") on a GPU, plain inductor
    elsewhere; generate compiles only on accelerators unless told to compile on all devices."""
    from transformers import CompileConfig

    config = CompileConfig(mode="reduce-overhead" if device.startswith("cuda") else "default")
    config._compile_all_devices = True  # type: ignore[assignment]  # private switch, annotated None upstream
    return config


def attention_for(device: str) -> str:
    """flash-attention 2 where the package imports on a GPU, else PyTorch's sdpa (flash kernels on sm80+)."""
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class Engine:
    def __init__(
        self,
        model_dir: str,
        device: str = "auto",
        max_tiles: int | None = None,
        quantize: str = "none",
        cache_mode: str = "auto",
        adapter: str | None = None,
        dtype: str | precision.Precision = "auto",
    ) -> None:
        device = pick_device(device)
        # bf16 on GPUs (what the weights are published in); on a CPU what it computes fastest (precision.py)
        chosen = (
            dtype
            if isinstance(dtype, precision.Precision)
            else precision.choose(device, dtype, precision.llm_width(model_dir))
        )
        model, tokenizer, info = checkpoint.load(model_dir, device, chosen.dtype, attention_for(device))
        self.precision = chosen
        self.adapter: dict[str, Any] | None = None
        if adapter:  # a LoRA adapter merged into the weights, before any quantization
            model, self.adapter = adapters.apply(model, info, adapter)
        int8_compute = torch.bfloat16 if chosen.dtype == torch.bfloat16 else None  # else as the CPU does best
        self.quantization = quantize_model(model, quantize, int8_compute)
        self._setup(model, tokenizer, info, max_tiles)
        self.cache_mode = cache_mode_for(self.device, cache_mode)

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
        # upstream's chat() stops on the template separator <|end|> only (load_tokenizer requires it)
        self.stop_ids = [vocab[t] for t in STOP_TOKENS]
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        )
        self.image_token_id = self.model.config.image_token_id
        self._strip = [t for t in CHAT_TOKENS if t in vocab]
        self._lock = threading.Lock()  # one generate at a time on the device
        if not hasattr(self, "adapter"):
            self.adapter = None
        if not hasattr(self, "precision"):
            self.precision = precision.Precision(model.dtype, "set by the caller (a model built in-process)")
        if not hasattr(self, "quantization"):
            self.quantization = {"mode": "none", "bytes_after": weight_bytes(model)}
        self.plan: dict[str, Any] | None = None  # the memory plan the server runs with, for status
        self.machine: dict[str, Any] | None = None  # machine.collect() before the load, for status
        # Requests' default decoding (prompts.decoding_for): greedy, min_new_tokens 1, as EarthDial's
        # published evaluation (and as the demo model was trained and measured); `serve --decoding` sets it.
        self.decoding = DEFAULT_DECODING
        self.cache_mode = cache_mode_for(self.device)  # greedy's KV cache and compile mode
        self._static: tuple[tuple[int, int], Any] | None = None  # ((batch, cache length), StaticCache)
        self.share_prefix = True  # greedy batches prefill a common text prefix once (shared_prefix)

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.info.path,
            "variant": self.info.variant,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": self.precision.reason,
            "attention": self.attn_implementation,
            "image_size": self.info.image_size,
            "tokens_per_tile": self.info.tokens_per_tile,
            "max_tiles": self.max_tiles,
            "parameters": self.info.num_parameters,
            "demo": self.info.demo,
            "trained_tasks": list(checkpoint.DEMO_TASKS) if self.info.demo else None,  # None: all of them
            "adapter": self.adapter,
            "quantize": self.quantization["mode"],
            "quantize_kernel": self.quantization.get("kernel"),
            "weights_gb": round(self.quantization["bytes_after"] / 1024**3, 4),
            "memory": self.memory(),
            "plan": self.plan,
            "decoding": self.decoding,
            "cache_mode": self.cache_mode,
            "add_bos": self.info.add_bos,
            "ps_version": self.info.ps_version,
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
    def image(
        self,
        data: np.ndarray,
        sensor_tag: str,
        nodata: float | None = None,
        task: str | None = None,
        images: int = 1,
    ) -> Image:
        """A chip's (bands, rows, cols) pixels -> the model input its sensor tag (and task) calls for.
        `images`: how many images the query holds; each gets its share of the tile budget."""
        size = self.info.image_size
        if sensors.pixel_path(sensor_tag, task) == "rgb":
            if sensor_tag in sensors.SAR_TAGS:  # SAR region captions: the 8-bit image as grey RGB
                data = sensors.sar_to_8bit(data, nodata)
                nodata = None
            rgb = pixels.to_unit_rgb(data, nodata)
            tiles = pixels.dynamic_tiles(
                rgb, size, self.info.min_tiles, self.tile_budget(images), self.info.use_thumbnail
            )
            return Image(pixels.normalize(tiles), "rgb")
        norm_name = sensors.norm_for(sensor_tag, data.shape[0])
        norm = sensors.normalize_bands(data, norm_name, nodata)
        # Upstream resizes SAR with torchvision's Resize on a tensor (antialiased since torchvision 0.17),
        # Landsat-8 UHI bands with OpenCV's INTER_LINEAR (its classification evaluation) and the other
        # band sets with a plain bicubic F.interpolate (no antialias); keep each as it is there.
        if norm_name == "l8_norm":
            resized = pixels.resize_linear(torch.from_numpy(norm), size, size)
        else:
            resized = F.interpolate(
                torch.from_numpy(norm)[None],
                size=(size, size),
                mode="bicubic",
                align_corners=False,
                antialias=norm_name == "s1",
            )[0]
        groups = torch.stack([resized[g] for g in sensors.band_groups(resized.shape[0])])
        return Image(groups, "bands")

    def tile_budget(self, images: int = 1) -> int:
        """Tiles each image of a query may take: upstream's max(1, max_dynamic_patch // images); one for a
        checkpoint whose config turns dynamic tiling off."""
        if not self.info.dynamic_image_size:
            return 1
        return max(1, self.max_tiles // max(1, images))

    # -- images -> features -----------------------------------------------------------------------
    def image_features(self, images: list[Image], one_call: bool = True) -> torch.Tensor:
        """Projected features for the images in order: (sum of tiles x tokens_per_tile, llm hidden).
        All RGB tiles and all band groups of all the images go through the vision tower in ONE call
        (`one_call=False`: one call per image, the former way, kept for the equality test and benchmark)."""
        if not images:
            raise ValueError("image_features needs at least one image")
        if not one_call:
            return torch.cat([self.image_features([im]) for im in images])
        pix = torch.cat([im.pixels for im in images]).to(self.device, self.dtype)
        hidden = self.model.model.vision_tower(pixel_values=pix).last_hidden_state[:, 1:, :]  # CLS dropped
        per_image = hidden.split([int(im.pixels.shape[0]) for im in images])
        rgb = [h for h, im in zip(per_image, images, strict=True) if im.kind == "rgb"]
        rgb_feats = iter(self.project(torch.cat(rgb)).split([h.shape[0] for h in rgb]) if rgb else ())
        parts = []
        for h, im in zip(per_image, images, strict=True):
            if im.kind == "rgb":
                parts.append(next(rgb_feats).flatten(0, 1))
            else:  # the groups of one image fuse into one tile's worth of tokens
                parts.append(self.project(fuse_group_features(h)[None])[0])
        return torch.cat(parts)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision-tower tokens (n, tokens, dim), CLS dropped -> LLM image tokens (n, tokens/4, hidden):
        pixel shuffle as the checkpoint's ps_version says, then the projector. ps_version v1 leaves the
        shuffled grid transposed, as upstream's v1 does."""
        model = self.model.model
        n, tokens, _ = features.shape
        side = int(math.isqrt(tokens))
        shuffled = model.pixel_shuffle(
            features.reshape(n, side, side, -1), self.model.config.downsample_ratio
        )
        if self.info.ps_version == "v1":
            shuffled = shuffled.permute(0, 2, 1, 3).contiguous()  # undo v2's final swap
        return model.multi_modal_projector(shuffled.reshape(n, -1, shuffled.shape[-1]))

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
        chat = render_chat(query.question, query.system or self.info.system_message, query.history)
        return expand_images(chat, [im.tiles for im in query.images], self.info.tokens_per_tile)

    # -- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, queries: list[Query], **overrides: Any) -> list[str]:
        """Answers for a batch of queries (left-padded; each row stops at its own stop token). A batch
        that shares one single-beam decoding (greedy, or sampled) runs here; others are split by
        `generate_by_decoding`. `overrides` go to transformers' generate (benchmarks pin the answer
        length with them)."""
        if not queries:
            return []
        if queries[0].num_beams > 1 or len({decoding_key(q) for q in queries}) > 1:
            return self.generate_by_decoding(queries, **overrides)
        first = queries[0]
        input_ids, attention_mask, max_new = self._encoded(queries)
        with self._lock:
            embeds = self.embed(input_ids, queries)
            options = self.cache_options(len(queries), input_ids.shape[1] + max_new)
            if not options and self.share_prefix:
                options = self.shared_prefix(input_ids, attention_mask, embeds)
            out = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new,
                num_beams=1,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **{
                    "output_scores": True,
                    "return_dict_in_generate": True,
                    "min_new_tokens": min(first.min_new_tokens, max_new),
                    **sampling_options(first.sampling),
                    **with_cancel(queries, {**options, **overrides}),
                },
            )
        return list(scoring.answers(self, out, [q.max_new_tokens for q in queries]))  # Answer is a str

    def shared_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embeds: torch.Tensor
    ) -> dict[str, Any]:
        """generate's arguments for a batch whose rows all begin with the same text (a scan's tiles: one
        system message, task and sensor tags before each image): that prefix goes through the language
        model once and its cache is copied to every row, so the prefill computes only the rest. Only
        for rows without padding (equal lengths) and a prefix of MIN_SHARED_PREFIX tokens or more; {}
        otherwise. Answers and scores equal an unshared prefill's (test_decode.py)."""
        rows, length = input_ids.shape
        if rows < 2 or not bool(attention_mask.all()):
            return {}
        same = (input_ids == input_ids[:1]).all(0) & (input_ids[0] != self.image_token_id)
        prefix = int(same.long().cumprod(0).sum())  # image tokens never count: their embeddings differ
        if prefix < MIN_SHARED_PREFIX or prefix >= length:
            return {}
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.model(
            inputs_embeds=embeds[:1, :prefix],
            attention_mask=attention_mask[:1, :prefix],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(rows)
        return {"cache": cache}

    def _encoded(self, queries: list[Query]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A batch's tags checked, its prompts encoded, and the most new tokens any of its rows may take."""
        for q in queries:
            self.check_tags(q.question)
        input_ids, attention_mask = self.encode([self.prompt_text(q) for q in queries])
        return input_ids, attention_mask, max(q.max_new_tokens for q in queries)

    def cache_options(self, batch: int, length: int) -> dict[str, Any]:
        """generate's cache (and compile) arguments for a greedy batch of `batch` rows needing `length`
        positions. The static cache is sized up to a multiple of 256 positions (at most 255 more than the
        memory plan's dynamic cache) and kept while batch and size stay the same (reset between batches,
        as gpt-fast keeps one), so the compiled decode step sees the same shapes and is not recompiled
        for every prompt length."""
        if self.cache_mode == "dynamic":
            return {}
        from transformers import StaticCache

        key = (batch, -(-length // 256) * 256)
        if self._static is None or self._static[0] != key:
            self._static = (key, StaticCache(config=self.model.config, max_cache_len=key[1]))
        else:
            self._static[1].reset()
        if self.cache_mode == "compiled":
            return {"cache": self._static[1], "compile_config": compile_config(self.device)}
        return {"cache": self._static[1], "disable_compile": True}

    # -- decoding other than greedy (upstream's beams) and the prompt encoding both paths share --------
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt texts -> left-padded (input_ids, attention_mask) on the device. A BOS is put first
        exactly when the checkpoint's tokenizer config asks for it (upstream tokenises with the
        tokenizer's defaults); nothing else is added (no EOS after the open assistant turn)."""
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if self.info.add_bos:
            rows = [[self.tokenizer.bos_token_id, *r] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def embed(self, input_ids: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        """Token embeddings with the queries' image features at the <IMG_CONTEXT> positions."""
        embeds = self.model.get_input_embeddings()(input_ids)
        images = [im for q in queries for im in q.images]
        if not images:
            return embeds
        feats = self.image_features(images).to(embeds.dtype)
        slots = input_ids == self.image_token_id
        if int(slots.sum()) != feats.shape[0]:
            raise EarthDialError(
                ErrorCode.MODEL_ERROR, f"{int(slots.sum())} image slots for {feats.shape[0]} image tokens"
            )
        return embeds.masked_scatter(slots[..., None], feats)

    def generate_by_decoding(self, queries: list[Query], **overrides: Any) -> list[str]:
        """Answers for queries that mix decodings: one batch per `decoding_key` - for beam search per
        max_new_tokens too, since a beam answer cut short is not the answer of a shorter search.
        Single-beam groups (greedy, sampled) go back through `generate`."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(decoding_key(q), []).append(i)
        answers: list[str] = [""] * len(queries)
        for (beams, min_new, _, _), idx in groups.items():
            if beams <= 1:
                out = self.generate([queries[i] for i in idx], **overrides)
                for i, a in zip(idx, out, strict=True):
                    answers[i] = a
                continue
            # each beam is a sequence with its own cache: the memory plan's batch counts sequences
            step = max(1, int((self.plan or {}).get("batch") or len(idx)) // beams)
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                out = self.generate_beams([queries[i] for i in chunk], beams, min_new, **overrides)
                for i, a in zip(chunk, out, strict=True):
                    answers[i] = a
        return answers

    @torch.inference_mode()
    def generate_beams(
        self, queries: list[Query], num_beams: int, min_new_tokens: int, **overrides: Any
    ) -> list[str]:
        """Beam search as upstream's evaluation scripts run it (no sampling, min_new_tokens, transformers'
        defaults for length penalty and early stopping), batched with left padding."""
        input_ids, attention_mask, max_new = self._encoded(queries)
        with self._lock:
            embeds = self.embed(input_ids, queries)
            out = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new,
                min_new_tokens=min(min_new_tokens, max_new),
                do_sample=False,
                num_beams=num_beams,
                num_return_sequences=1,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **{"output_scores": True, "return_dict_in_generate": True, **with_cancel(queries, overrides)},
            )
        return list(scoring.answers(self, out, [q.max_new_tokens for q in queries]))  # Answer is a str

    def text_of(self, ids: list[int]) -> str:
        """The answer text of generated token ids: cut at the first stop token, grounding tags kept."""
        for i, tok in enumerate(ids):
            if tok in self.stop_ids:
                ids = ids[:i]
                break
        # skip_special_tokens would also drop <ref>/<box>, which carry the answer's grounding
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for mark in self._strip:
            text = text.replace(mark, "")
        return text.strip()
