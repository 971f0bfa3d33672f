"""Generation speed of the EarthDial architecture, against the card's own limits measured in the same run.

Builds the model with random weights through the same config conversion and engine the server uses
(`--size full`: the published EarthDial-4B shapes, bf16 on CUDA; `--size small`: a small config for CPUs),
then prints:
  - time to first token for one 448 px tile (one image, one tile, caption prompt);
  - tokens/s of whole answers at batch 1 for each decode mode (dynamic cache; static cache; static cache +
    compiled decode step), as ratios to the dynamic path measured in the same run;
  - decode tokens/s at batch 1 (the engine's default mode for the device), beside the memory-bandwidth bound (weight bytes / bandwidth), with the
    bandwidth both from the card's data sheet (where known) and MEASURED here by a large device copy;
  - tiles/s at batch 8 and 32 (one-tile requests, one new token: vision + prefill), beside the compute bound.

    python benchmarks/bench_generation.py --size full --device cuda      # on a GPU
    python benchmarks/bench_generation.py --size small --device cpu      # anywhere
    python benchmarks/bench_generation.py --size demo --device cpu       # the shipped demo checkpoint
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from earthdial import training as train
from earthdial.model import checkpoint
from earthdial.model.engine import CACHE_MODES, Engine, Query, attention_for, cache_mode_for
from earthdial.model.prompts import build_question
from earthdial.training import tiny

# Data-sheet memory bandwidth (bytes/s) and dense bf16 peak (FLOP/s) of cards we may run on.
CARDS = {
    "H200": (4.8e12, 989e12),
    "H100 80GB HBM3": (3.35e12, 989e12),  # SXM
    "H100 PCIe": (2.0e12, 756e12),
    "A100": (2.0e12, 312e12),
}


def small_config(vocab: int, image_size: int) -> dict:
    cfg = tiny.tiny_published_config(vocab, image_size)
    cfg["vision_config"].update(
        hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=6
    )
    cfg["llm_config"].update(
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=8,
    )
    head_dim = 64
    cfg["llm_config"]["rope_scaling"] = {
        "type": "su",
        "long_factor": [1.0] * (head_dim // 2),
        "short_factor": [1.0] * (head_dim // 2),
    }
    return cfg


def build_engine(size: str, device: str, image_size: int) -> Engine:
    if size == "demo":
        return Engine(str(train.DEMO_DIR), device=device)
    from transformers import InternVLForConditionalGeneration
    from transformers.initialization import no_init_weights

    tokenizer = tiny._tiny_tokenizer("EarthDial_4B_RGB")
    cfg = tiny.full_size_config(32064, image_size) if size == "full" else small_config(1024, image_size)
    cfg["llm_config"]["eos_token_id"] = cfg["llm_config"]["pad_token_id"] = tokenizer.pad_token_id
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = checkpoint.native_config(cfg, tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    with no_init_weights(), torch.device(device):
        model = InternVLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attention_for(device)
        )
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            elif "lambda" in name:
                p.fill_(0.1)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval()
    info = checkpoint.CheckpointInfo(
        path=f"<random {size}>",
        variant="EarthDial_4B_RGB",
        image_size=image_size,
        tokens_per_tile=config.image_seq_length,
        min_tiles=1,
        max_tiles=6,
        use_thumbnail=True,
        system_message=checkpoint.INTERNVL_SYSTEM_MESSAGE,
        vocab=frozenset(tokenizer.get_vocab()),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    return Engine.from_model(model, tokenizer, info)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 3) -> float:
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def measured_bandwidth(device: str) -> float:
    """Bytes/s of a large on-device copy (read + write), the practical ceiling for weight streaming."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeat=5)
    return 2 * n / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["full", "small", "demo"], default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument(
        "--modes",
        nargs="+",
        default=list(CACHE_MODES),
        choices=CACHE_MODES,
        help="KV cache modes to compare (the first is the baseline)",
    )
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    dev = args.device
    card = (
        torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or platform.machine()
    )
    print(f"device: {card} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}")

    engine = build_engine(args.size, dev, args.image_size)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    print(
        f"model: {args.size} shapes, {engine.info.num_parameters / 1e9:.3f} B parameters, "
        f"{weight_bytes / 1e9:.2f} GB {engine.dtype}, attention {engine.attn_implementation}"
    )
    size = engine.info.image_size
    tile = np.random.default_rng(0).integers(0, 255, (3, size, size), dtype=np.uint8)
    image = engine.image(tile, "[hr_rgb_0.5]")
    assert image.tiles == 1
    question = build_question("caption", "")

    def run(batch: int, new: int) -> None:
        engine.generate([Query(question, [image], new)] * batch, min_new_tokens=new)

    bw = measured_bandwidth(dev)
    sheet = next((v for k, v in CARDS.items() if k in card), None)
    per_mode: dict[str, tuple[float, float, float]] = {}  # mode -> (first token s, answer s, tokens/s)
    for mode in dict.fromkeys([*args.modes, cache_mode_for(dev)]):
        engine.cache_mode = mode  # each timing's warm-up call pays the compile for its shapes
        ttft_m = timed(lambda: run(1, 1), dev)
        t_long = timed(lambda: run(1, args.decode_tokens), dev)
        # whole answers (prefill included): a difference of two timings goes negative on a busy CPU
        per_mode[mode] = (ttft_m, t_long, args.decode_tokens / t_long)
    base = args.modes[0]
    for mode in args.modes:
        print(
            f"decode {mode:9}: {per_mode[mode][2]:8.1f} tokens/s at batch 1, {args.decode_tokens}-token answers "
            f"({per_mode[mode][2] / per_mode[base][2]:.2f}x {base}); first token {per_mode[mode][0] * 1000:.0f} ms"
        )
    engine.cache_mode = cache_mode_for(dev)
    ttft, t_long, _ = per_mode[engine.cache_mode]
    decode = (args.decode_tokens - 1) / (t_long - ttft)
    results = {"device": card, "size": args.size, "weights_gb": weight_bytes / 1e9, "ttft_s": ttft,
               "decode_tok_s": decode, "measured_bandwidth_gbs": bw / 1e9,
               "cache_modes": {m: {"ttft_s": v[0], "answer_s": v[1], "tok_s": v[2]} for m, v in per_mode.items()},
               "default_cache_mode": engine.cache_mode}  # fmt: skip
    bound = bw / weight_bytes
    print(f"time to first token (1 tile of {size} px): {ttft * 1000:.1f} ms")
    print(
        f"decode at batch 1 ({engine.cache_mode} KV cache, the default here): {decode:.1f} tokens/s; bandwidth bound {bound:.1f} tokens/s "
        f"(measured copy bandwidth {bw / 1e9:.0f} GB/s) -> {decode / bound:.2f} of the bound"
    )
    if sheet:
        print(
            f"  data-sheet bound: {sheet[0] / weight_bytes:.1f} tokens/s -> {decode / (sheet[0] / weight_bytes):.2f}"
        )
    vision_params = sum(p.numel() for n, p in engine.model.named_parameters() if "vision_tower" in n)
    llm_params = engine.info.num_parameters - vision_params
    prompt_tokens = len(engine.tokenizer(engine.prompt_text(Query(question, [image])))["input_ids"])
    flops_per_tile = 2 * vision_params * ((size // 14) ** 2 + 1) + 2 * llm_params * prompt_tokens
    for batch in args.batches:
        seconds = timed(lambda b=batch: run(b, 1), dev, repeat=2)
        tiles_s = batch / seconds
        results[f"tiles_s_batch{batch}"] = tiles_s
        line = f"tiles/s at batch {batch}: {tiles_s:.1f} ({flops_per_tile * tiles_s / 1e12:.1f} TFLOP/s achieved)"
        if sheet:
            line += f"; compute bound {sheet[1] / flops_per_tile:.0f} tiles/s -> {tiles_s * flops_per_tile / sheet[1]:.2f}"
        print(line)
    if dev.startswith("cuda"):
        results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        print(f"peak GPU memory: {results['peak_memory_gb']:.1f} GB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
