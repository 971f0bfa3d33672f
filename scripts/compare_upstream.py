"""Run EarthDial's own model code and ours on the same tiny checkpoints, prompts and pixels; print the
largest differences (docs/fidelity.md records them). Not a CI test: it needs upstream's source and an old
transformers in a venv of its own. From a fresh clone, after `bash scripts/install.sh`:

    # once: upstream's code as a bare git dir (any clone of github.com/hiyamdebary/EarthDial; commit
    # 92c1260 was compared) and a venv with the versions upstream pins
    git clone --bare https://github.com/hiyamdebary/EarthDial UPSTREAM.git
    python3.11 -m venv OLDVENV
    OLDVENV/bin/pip install torch==2.13.0 transformers==4.37.2 tokenizers==0.15.1 sentencepiece \
        einops==0.6.1 peft==0.10.0 "accelerate<0.30" safetensors numpy
    # then, with the project's venv (the script puts this clone's backend/ first on sys.path):
    .venv/bin/python scripts/compare_upstream.py --upstream-git UPSTREAM.git --venv OLDVENV --work WORKDIR

The script runs itself a second time inside that venv (`--role upstream`, without PYTHONPATH) to drive
upstream's `modeling_internvl_chat.py` / `modeling_intern_vit.py` / `conversation.py`, CPU, fp32, eager
attention. That half imports nothing of this project: its module level is the standard library only.
Both sides get the same pixel tensors (ours, from `Engine.image`): pixel preprocessing is held by the unit
tests, this compares the model path: image features, prompt ids, first-step logits and answers.

Cases: the four pixel paths at 224 px and at 448 px / ViT width 1024, absent config defaults, every task's
question exactly as our service builds it (`service.prepare`, pairs included), 5-beam search,
`min_new_tokens` (a logits bias that makes <|end|> the first choice at every step: 1 gives one token, 0 an
empty answer) and the stop-token set (a bias that makes <|endoftext|> the first choice: decoding must run
on past it, as upstream's `eos_token_id=<|end|>` does).

Shims in the upstream run, none of which touches the arithmetic: `timm` (imported only for DropPath,
which is used only when drop_path_rate > 0; timm needs torchvision, which has no build for torch 2.13
here) is a stub; `Tensor.cuda` is the identity (upstream's `chat` moves ids to CUDA unconditionally);
the tokenizer is read from tokenizer.json with `PreTrainedTokenizerFast` (transformers 4.37 does not know
the `TokenizersBackend` class name transformers 5 writes), its BPE merges rewritten from [a, b] pairs to
the "a b" strings tokenizers 0.15 reads; the LLM runs with eager attention (the tiny
config asks for flash-attention 2, which is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

UPSTREAM_FILES = "src/earthdial"
TIMM_STUB = """class DropPath:  # stand-in: upstream uses DropPath only when drop_path_rate > 0
    def __init__(self, *args, **kwargs):
        raise RuntimeError("timm stub: run with drop_path_rate 0")
"""
MAX_NEW = 12  # tokens each compared answer decodes at most


class Bias:
    """A logits processor adding `value` to one token's score at every step (both transformers versions
    run it after their own processors, min_new_tokens among them)."""

    def __init__(self, token: int, value: float) -> None:
        self.token, self.value = token, value

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores = scores.clone()
        scores[:, self.token] += self.value
        return scores


def processors(bias: list | None, tok: Any) -> dict[str, Any]:
    """generate's `logits_processor` for a case's [token, value] bias (none when it has none)."""
    if not bias:
        return {}
    from transformers import LogitsProcessorList

    return {"logits_processor": LogitsProcessorList([Bias(tok.convert_tokens_to_ids(bias[0]), bias[1])])}


# ------------------------------------------------------------------------------------------------
# Upstream side (runs in the old-transformers venv; imports only torch, numpy, transformers, upstream)
# ------------------------------------------------------------------------------------------------


def run_upstream(work: Path) -> None:
    import numpy as np
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self  # chat() calls .cuda() on the prompt ids
    sys.path[:0] = [str(work / "stubs"), str(work / "upstream" / "src")]
    from transformers import PreTrainedTokenizerFast

    from earthdial.model.internvl_chat import InternVLChatModel

    cases = json.loads((work / "cases.json").read_text())
    results: dict[str, Any] = {}
    meta: dict[str, dict] = {}
    models: dict[str, tuple] = {}
    for case in cases:
        name, ckpt = case["name"], case["checkpoint"]
        if ckpt not in models:
            model = InternVLChatModel.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
            tok = PreTrainedTokenizerFast(tokenizer_file=str(old_format_tokenizer(Path(ckpt), work)))
            tok.pad_token = "<|endoftext|>"
            models[ckpt] = (model, tok)
        model, tok = models[ckpt]
        with torch.no_grad():
            feats = [upstream_image_input(model, case, i, work) for i in range(len(case["images"]))]
            feats_in = torch.cat(feats)
            patches = [int(f.shape[0]) for f in feats]
            results[f"{name}.features"] = model.extract_feature(feats_in).numpy()
            # the prompt as chat() builds it, and the first-step logits through forward()
            model.img_context_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
            seen: dict[str, torch.Tensor] = {}
            lm_generate = model.language_model.generate

            def capture(*args, _seen=seen, _gen=lm_generate, **kwargs):
                out = _gen(*args, **kwargs)
                _seen["ids"] = out
                return out

            model.language_model.generate = capture
            answers = {}
            for label, beams, min_new in case["decodings"]:
                config = dict(
                    num_beams=beams,
                    max_new_tokens=case["max_new_tokens"],
                    min_new_tokens=min_new,
                    do_sample=False,
                    **processors(case.get("bias"), tok),
                )
                answers[label] = model.chat(tok, feats_in, case["question"], config, num_patches_list=patches)
                results[f"{name}.ids.{label}"] = seen["ids"][0].numpy()
            results[f"{name}.end_id"] = np.array(tok.convert_tokens_to_ids("<|end|>"))
            results[f"{name}.bos_id"] = np.array(model.language_model.config.bos_token_id)
            model.language_model.generate = lm_generate
            enc = tok(seen_query(model, case["question"], patches), return_tensors="pt")
            results[f"{name}.input_ids"] = enc["input_ids"][0].numpy()
            out = model.forward(
                pixel_values=feats_in,
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                image_flags=torch.ones(feats_in.shape[0], 1, dtype=torch.long),
                return_dict=True,
            )
            results[f"{name}.logits"] = out.logits[0, -1].numpy()
            meta[name] = {"answers": answers}
    np.savez(work / "upstream.npz", **results)
    (work / "upstream.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))


def upstream_image_input(model: Any, case: dict, i: int, work: Path) -> Any:
    """What upstream's chat() takes for image i of a case: RGB tiles as they are; a band image as its
    fused ViT features (upstream's own fusion), one tile's worth."""
    import numpy as np
    import torch

    image = case["images"][i]
    pixels = torch.from_numpy(np.load(work / f"{case['name']}.{i}.pixels.npy"))
    if image["kind"] == "rgb":
        return pixels
    if image.get("final_size"):  # upstream's own fusion, at the tiny model's (tokens, dim)
        groups = []
        for k in range(0, pixels.shape[0], 3):
            sub = pixels[k : k + 3]
            out = model.vision_model(pixel_values=sub[None], return_dict=True).last_hidden_state
            groups.append(out[:, 1:, :])
        fused = model.bilinear_interpolate_and_concat(groups, final_size=tuple(image["final_size"]))
    else:  # unmodified: sequential_vit_features fuses into its fixed 1024 x 1024
        fused = model.sequential_vit_features(pixels[None], "bilinear")
    return fused[None] if fused.ndim == 2 else fused


def old_format_tokenizer(ckpt: Path, work: Path) -> Path:
    """tokenizer.json as tokenizers 0.15 reads it: BPE merges as "a b" strings (newer tokenizers write
    [a, b] pairs). The same vocabulary, merges and added tokens."""
    data = json.loads((ckpt / "tokenizer.json").read_text())
    merges = data["model"].get("merges") or []
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
    out = work / f"{ckpt.name}.tokenizer-0.15.json"
    out.write_text(json.dumps(data, ensure_ascii=False))
    return out


def seen_query(model: Any, question: str, patches: list[int]) -> str:
    """The prompt text upstream's chat() builds (template, system message, image tokens per image)."""
    from earthdial.conversation import get_conv_template

    if "<image>" not in question:
        question = "<image>\n" + question
    template = get_conv_template(model.template)
    template.system_message = model.system_message
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    query = template.get_prompt()
    for n in patches:
        query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * model.num_image_token * n + "</img>", 1)
    return query


# ------------------------------------------------------------------------------------------------
# Our side
# ------------------------------------------------------------------------------------------------


def prepare(work: Path, upstream_git: Path) -> None:
    """Upstream's Python files out of the bare git dir, the timm stub, and the tiny checkpoints."""
    from earthdial.training import tiny

    files = subprocess.run(
        ["git", f"--git-dir={upstream_git}", "ls-tree", "-r", "--name-only", "HEAD", UPSTREAM_FILES],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if not files:
        raise SystemExit(f"{upstream_git}: no {UPSTREAM_FILES}/ at HEAD (is it a clone of EarthDial?)")
    for name in files:
        if not name.endswith(".py"):
            continue
        target = work / "upstream" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = subprocess.run(
            ["git", f"--git-dir={upstream_git}", "show", f"HEAD:{name}"], check=True, capture_output=True
        ).stdout
        target.write_bytes(blob)
    stub = work / "stubs" / "timm" / "models"
    stub.mkdir(parents=True, exist_ok=True)
    (work / "stubs" / "timm" / "__init__.py").write_text("")
    (stub / "__init__.py").write_text("")
    (stub / "layers.py").write_text(TIMM_STUB)
    for name, size, hidden, variant in (
        ("tiny224", 224, 64, "EarthDial_4B_MS"),
        ("tiny448", 448, 1024, "EarthDial_4B_MS"),
        ("tiny224-uhi", 224, 64, "EarthDial_4B_Methane_UHI"),
    ):
        ckpt = work / name
        if not (ckpt / "config.json").exists():
            tiny.make_tiny_checkpoint(ckpt, variant, image_size=size, seed=1, vision_hidden=hidden)
        # upstream's Phi-3 would ask for flash-attention 2 (not installed); eager is the same arithmetic
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["llm_config"]["attn_implementation"] = "eager"
        cfg["llm_config"]["_attn_implementation"] = "eager"
        (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    # the same weights with ps_version and use_thumbnail absent: both sides must fall back to upstream's
    # config-class defaults (v1 pixel shuffle, no thumbnail)
    v1 = work / "tiny224-nodefaults"
    if v1.exists():
        shutil.rmtree(v1)
    shutil.copytree(work / "tiny224", v1)
    cfg = json.loads((v1 / "config.json").read_text())
    del cfg["ps_version"], cfg["use_thumbnail"]
    (v1 / "config.json").write_text(json.dumps(cfg, indent=2))


GREEDY, GREEDY0, BEAMS2, BEAMS5 = ["greedy", 1, 1], ["greedy-min0", 1, 0], ["beams2", 2, 1], ["beams5", 5, 1]
# (task, prompt, data kind, images) for every task, each asked as our service builds the question
TASK_CASES = (
    ("chat", "How many ships are in the harbour?", "rgb", 1),
    ("caption", "", "rgb", 1),
    ("vqa", "Is there a bridge?", "rgb", 1),
    ("classify", "forest, water, harbour", "rgb", 1),
    ("grounding", "", "rgb", 1),
    ("refer", "ships", "rgb", 1),
    ("identify", "[[10, 20, 30, 40, 0]]", "rgb", 1),
    ("tree_species", "Quercus robur, Pinus nigra", "ms4", 1),
    ("methane", "", "ms4", 1),
    ("uhi", "", "ms8", 1),
    ("change", "", "rgb", 2),
    ("disaster", "", "rgb", 2),
    ("damage", "[[6, 6, 12, 22, 0]]", "rgb", 2),
    ("post_disaster_refer", "buildings", "rgb", 2),
)


def cases(work: Path) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(7)
    rgb = (rng.random((3, 300, 500)) * 255).astype(np.uint8)
    ms4 = (rng.random((4, 120, 120)) * 255).astype(np.uint8)  # RGB + NIR, tree_norm
    ms12 = rng.integers(0, 4000, (12, 64, 64)).astype(np.uint16)  # Sentinel-2 L2A
    sar = rng.normal(-18, 4, (1, 100, 100)).astype(np.float32)  # VH in dB
    out: list[dict] = []
    refer = "[refer] [hr_rgb_0.5] <image> \n Give me the location of <ref>ships</ref>"
    for ckpt, final in (("tiny224", True), ("tiny448", False)):
        for kind, tag, data, question in (
            ("rgb", "[hr_rgb_0.5]", rgb, refer),
            (
                "ms4",
                "[hr_rgbi_0.5]",
                ms4,
                "[hr_rgbi_0.5] [treeclassify] Classify the botanical tree species present inside the image in one of "
                "the following species. Species: pine, oak \nAnswer in one word or a short phrase.",
            ),
            (
                "ms12",
                "[s2_ms_10]",
                ms12,
                "[s2_ms_10] <image>\n Classify the given image in one of the following "
                "classes. Classes: forest, water \nAnswer in one word or a short phrase.",
            ),
            (
                "sar",
                "[s1_vh_1]",
                sar,
                "[refer] [s1_vh_1] <image> \n Give me the location of <ref>ships</ref>",
            ),
        ):
            out.append(
                {
                    "name": f"{ckpt}-{kind}",
                    "checkpoint": ckpt,
                    "question": question,
                    "final": final,
                    "sources": [(data, tag)],
                    "decodings": [GREEDY, BEAMS2],
                }
            )
    out.append(
        {
            "name": "nodefaults-rgb",
            "checkpoint": "tiny224-nodefaults",
            "question": refer,
            "final": True,
            "sources": [(rgb, "[hr_rgb_0.5]")],
            "decodings": [GREEDY, BEAMS2],
        }
    )
    # min_new_tokens: <|end|> is every step's first choice; 1 gives one token, 0 an empty answer
    out.append(
        {
            "name": "min-new-tokens",
            "checkpoint": "tiny224",
            "question": refer,
            "final": True,
            "sources": [(rgb, "[hr_rgb_0.5]")],
            "decodings": [GREEDY, GREEDY0, BEAMS5],
            "bias": ["<|end|>", 50.0],
        }
    )
    # the stop set: <|endoftext|> is every step's first choice; only <|end|> stops, so decoding runs on
    out.append(
        {
            "name": "stop-tokens",
            "checkpoint": "tiny224",
            "question": refer,
            "final": True,
            "sources": [(rgb, "[hr_rgb_0.5]")],
            "decodings": [GREEDY, BEAMS2],
            "bias": ["<|endoftext|>", 50.0],
        }
    )
    inputs = {"rgb": rgb, "ms4": ms4, "ms8": rng.integers(5000, 30000, (8, 60, 60)).astype(np.uint16)}
    for task, prompt, kind, images in TASK_CASES:
        ckpt = "tiny224-uhi" if task in ("methane", "uhi") else "tiny224"
        out.append(
            {
                "name": f"task-{task}",
                "checkpoint": ckpt,
                "task": task,
                "prompt": prompt,
                "final": True,
                "arrays": [inputs[kind]] * images,
                "decodings": [GREEDY, BEAMS5],
            }
        )
    for c in out:
        c["checkpoint"] = str(work / c["checkpoint"])
        c["max_new_tokens"] = MAX_NEW
    return out


def our_images(engine: Any, case: dict) -> tuple[str, list[Any]]:
    """The question and the images of a case on our side: as given, or - for a task case - exactly as
    `service.prepare` builds them from a by-value request."""
    if "task" not in case:
        return case["question"], [engine.image(data, tag) for data, tag in case["sources"]]
    from earthdial.serving import service

    source = {"kind": "value", "transform": [0.5, 0, 500000, 0, -0.5, 4000000], "crs": "EPSG:32633"}
    header = {
        "op": "ask",
        "task": case["task"],
        "prompt": case["prompt"],
        "options": {"max_new_tokens": case["max_new_tokens"]},
    }
    header.update(
        {"sources": [source] * len(case["arrays"])} if len(case["arrays"]) > 1 else {"source": source}
    )
    job = service.prepare(header, list(case["arrays"]), engine)
    case["question"] = job.query.question
    return job.query.question, job.query.images


def run_ours(work: Path, case_list: list[dict]) -> dict:
    import numpy as np
    import torch

    from earthdial.model.engine import Engine, Query

    engines: dict[str, Engine] = {}
    ours: dict = {}
    for case in case_list:
        ckpt = case["checkpoint"]
        if ckpt not in engines:
            engines[ckpt] = Engine(ckpt, device="cpu")
        engine = engines[ckpt]
        question, images = our_images(engine, case)
        case["images"] = []
        for i, image in enumerate(images):
            entry: dict[str, Any] = {"kind": image.kind}
            # band images: all groups' channels in order (upstream regroups them by three, padding alike)
            pixels = image.pixels.flatten(0, 1) if image.kind == "bands" else image.pixels
            np.save(work / f"{case['name']}.{i}.pixels.npy", pixels.numpy())
            if image.kind == "bands" and case["final"]:
                tokens = (engine.info.image_size // 14) ** 2
                entry["final_size"] = [tokens, engine.model.config.vision_config.hidden_size]
            case["images"].append(entry)
        q = Query(question, images, case["max_new_tokens"])
        with torch.no_grad():
            feats = engine.image_features(images).numpy()
            ids, mask = engine.encode([engine.prompt_text(q)])
            embeds = engine.embed(ids, [q])
            logits = engine.model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].numpy()
        answers, gen_ids = {}, {}
        for label, beams, min_new in case["decodings"]:
            q = Query(question, images, case["max_new_tokens"], num_beams=beams, min_new_tokens=min_new)
            answer = engine.generate([q], **processors(case.get("bias"), engine.tokenizer))[0]
            answers[label] = answer
            gen_ids[label] = list(answer.ids)
            # upstream's chat() decodes with skip_special_tokens and cuts at <|end|>; ours keeps the
            # added tags and markup (<ref>, <box>, sensor tags), so compare texts decoded its way too
            answers[label + "_upstream_style"] = engine.tokenizer.decode(
                gen_ids[label], skip_special_tokens=True
            ).strip()
        ours[case["name"]] = {
            "features": feats,
            "input_ids": ids[0].numpy(),
            "logits": logits,
            "answers": answers,
            "ids": gen_ids,
            "stop_ids": list(engine.stop_ids),
        }
    return ours


def until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return list(ids)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--upstream-git", type=Path, help="a bare git dir (or .git) of EarthDial's repository"
    )
    parser.add_argument("--venv", type=Path, help="the venv with upstream's pinned transformers (see above)")
    parser.add_argument(
        "--work", type=Path, required=True, help="a folder for checkpoints, files and results"
    )
    parser.add_argument("--role", default="ours", choices=["ours", "upstream"])
    parser.add_argument("--json", type=Path, help="also write the measured differences to this file")
    args = parser.parse_args(argv)
    if args.role == "ours":
        missing = [f"--{k.replace('_', '-')}" for k in ("upstream_git", "venv") if getattr(args, k) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
        if not (args.venv / "bin" / "python").exists():
            parser.error(f"--venv {args.venv}: no bin/python in it")
    elif not (args.work / "cases.json").exists():
        parser.error(f"--work {args.work}: no cases.json (run the script without --role first)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    if args.role == "upstream":
        run_upstream(work)
        return 0
    # this clone's backend first, whatever the venv has installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.upstream_git.resolve())
    case_list = cases(work)
    ours = run_ours(work, case_list)
    (work / "cases.json").write_text(
        json.dumps(
            [{k: v for k, v in c.items() if k not in ("sources", "arrays")} for c in case_list], indent=1
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [
            str(args.venv / "bin" / "python"),
            str(Path(__file__).resolve()),
            "--role",
            "upstream",
            "--work",
            str(work),
        ],
        check=True,
        env=env,
    )
    theirs = np.load(work / "upstream.npz")
    their_meta = json.loads((work / "upstream.json").read_text())
    rows = []
    for case in case_list:
        name = case["name"]
        mine = ours[name]
        f_ours, f_up = mine["features"], theirs[f"{name}.features"].reshape(mine["features"].shape)
        end = [int(theirs[f"{name}.end_id"])]
        row: dict[str, Any] = {
            "case": name,
            "question": case["question"],
            "features_shape": list(f_ours.shape),
            "features_max_abs": float(np.abs(f_ours - f_up).max()),
            "features_max_rel": float(np.abs(f_ours - f_up).max() / max(np.abs(f_up).max(), 1e-12)),
            "prompt_ids_equal": bool(np.array_equal(mine["input_ids"], theirs[f"{name}.input_ids"])),
            "prompt_tokens": int(mine["input_ids"].shape[0]),
            "logits_max_abs": float(np.abs(mine["logits"] - theirs[f"{name}.logits"]).max()),
            "argmax_equal": bool(mine["logits"].argmax() == theirs[f"{name}.logits"].argmax()),
            "stop_ids_equal": mine["stop_ids"] == end,
            "decodings": {},
        }
        for label, _, _ in case["decodings"]:
            their_ids = theirs[f"{name}.ids.{label}"].tolist()
            # transformers 4.37 starts an inputs_embeds-only generation from the LLM config's BOS and
            # returns it ahead of the new tokens (skip_special_tokens then hides it)
            if their_ids and their_ids[0] == int(theirs[f"{name}.bos_id"]):
                their_ids = their_ids[1:]
            their_ids = until_stop(their_ids, end)
            row["decodings"][label] = {
                "ids_equal": mine["ids"][label] == their_ids,
                "tokens": len(their_ids),
                "text_equal": mine["answers"][label + "_upstream_style"]
                == their_meta[name]["answers"][label],
                "ours": str(mine["answers"][label]),
                "upstream": their_meta[name]["answers"][label],
            }
        rows.append(row)

    def mark(ok: bool) -> str:
        return "=" if ok else "DIFF"

    print(
        f"{'case':26} {'features':>11} {'max|d|':>9} {'rel':>9} {'prompt':>11} {'logit|d|':>9} {'top1':>4} "
        f"{'stop':>4}  decodings: ids/text (tokens)"
    )
    for r in rows:
        decoded = "  ".join(
            f"{label} {mark(d['ids_equal'])}/{mark(d['text_equal'])} ({d['tokens']})"
            for label, d in r["decodings"].items()
        )
        prompt = f"{mark(r['prompt_ids_equal'])} ({r['prompt_tokens']})"
        print(
            f"{r['case']:26} {str(r['features_shape']):>11} {r['features_max_abs']:9.2e} "
            f"{r['features_max_rel']:9.2e} {prompt:>11} {r['logits_max_abs']:9.2e} "
            f"{mark(r['argmax_equal']):>4} {mark(r['stop_ids_equal']):>4}  {decoded}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    ok = all(
        r["prompt_ids_equal"] and r["stop_ids_equal"] and all(d["ids_equal"] for d in r["decodings"].values())
        for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
