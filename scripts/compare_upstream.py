"""Run EarthDial's own model code and ours on the same tiny checkpoints, prompts and pixels; print the
largest differences (docs/fidelity.md records them). Not a CI test: it needs upstream's files and an old
transformers in a venv of its own.

    # once: upstream's code (the `fetch` of github:hiyamdebary/EarthDial gives a bare git dir) and a venv
    python3 -m venv /work/scratch-fidelity/venv
    /work/scratch-fidelity/venv/bin/pip install torch==2.13.0 transformers==4.37.2 tokenizers==0.15.1 \
        sentencepiece einops==0.6.1 peft==0.10.0 "accelerate<0.30" safetensors numpy
    # then, with the project's venv:
    PYTHONPATH=backend .venv/bin/python scripts/compare_upstream.py \
        --upstream-git /work/.mirror/hiyamdebary+EarthDial/repo --venv /work/scratch-fidelity/venv

The script runs itself a second time inside that venv (`--role upstream`) to drive upstream's
`modeling_internvl_chat.py` / `modeling_intern_vit.py` / `conversation.py`, CPU, fp32, eager attention.
Both sides get the same pixel tensors (ours, from `Engine.image`): pixel preprocessing is held by the unit
tests, this compares the model path: image features, prompt ids, first-step logits and answers.

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

import numpy as np

from earthdial.training import tiny

UPSTREAM_FILES = "src/earthdial"
TIMM_STUB = """class DropPath:  # stand-in: upstream uses DropPath only when drop_path_rate > 0
    def __init__(self, *args, **kwargs):
        raise RuntimeError("timm stub: run with drop_path_rate 0")
"""


# ------------------------------------------------------------------------------------------------
# Upstream side (runs in the old-transformers venv; imports only torch, numpy, transformers, upstream)
# ------------------------------------------------------------------------------------------------


def run_upstream(work: Path) -> None:
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self  # chat() calls .cuda() on the prompt ids
    sys.path[:0] = [str(work / "stubs"), str(work / "upstream" / "src")]
    from transformers import PreTrainedTokenizerFast

    from earthdial.model.internvl_chat import InternVLChatModel

    cases = json.loads((work / "cases.json").read_text())
    results: dict[str, np.ndarray] = {}
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
        pixels = torch.from_numpy(np.load(work / f"{name}.pixels.npy"))
        with torch.no_grad():
            if case["kind"] == "rgb":
                feats_in = pixels
            elif case.get("final_size"):  # upstream's own fusion, at the tiny model's (tokens, dim)
                groups = []
                for i in range(0, pixels.shape[0], 3):
                    sub = pixels[i : i + 3]
                    if sub.shape[0] < 3:
                        sub = torch.cat([sub] + [sub[-1:]] * (3 - sub.shape[0]))
                    out = model.vision_model(pixel_values=sub[None], return_dict=True).last_hidden_state
                    groups.append(out[:, 1:, :])
                feats_in = model.bilinear_interpolate_and_concat(groups, final_size=tuple(case["final_size"]))
            else:  # unmodified: sequential_vit_features fuses into its fixed 1024 x 1024
                feats_in = model.sequential_vit_features(pixels[None], "bilinear")
            if feats_in.ndim == 2:
                feats_in = feats_in[None]
            results[f"{name}.features"] = model.extract_feature(feats_in).numpy()
            # the prompt as chat() builds it, and the first-step logits through forward()
            model.img_context_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
            seen: dict[str, torch.Tensor] = {}
            lm_generate = model.language_model.generate

            def capture(*args, _seen=seen, _gen=lm_generate, **kwargs):
                _seen["embeds"] = kwargs["inputs_embeds"]
                _seen["mask"] = kwargs["attention_mask"]
                out = _gen(*args, **kwargs)
                _seen["ids"] = out
                return out

            model.language_model.generate = capture
            answers = {}
            for label, beams, min_new in case["decodings"]:
                answers[label] = model.chat(
                    tok,
                    feats_in,
                    case["question"],
                    dict(num_beams=beams, max_new_tokens=case["max_new_tokens"], min_new_tokens=min_new,
                         do_sample=False),
                )  # fmt: skip
                results[f"{name}.ids.{label}"] = seen["ids"][0].numpy()
            results[f"{name}.end_id"] = np.array(tok.convert_tokens_to_ids("<|end|>"))
            results[f"{name}.bos_id"] = np.array(model.language_model.config.bos_token_id)
            model.language_model.generate = lm_generate
            enc = tok(seen_query(model, tok, case, feats_in), return_tensors="pt")
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


def old_format_tokenizer(ckpt: Path, work: Path) -> Path:
    """tokenizer.json as tokenizers 0.15 reads it: BPE merges as "a b" strings (newer tokenizers write
    [a, b] pairs). The same vocabulary, merges and added tokens."""
    data = json.loads((ckpt / "tokenizer.json").read_text())
    merges = data["model"].get("merges") or []
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
    out = work / f"{ckpt.name}.tokenizer-0.15.json"
    out.write_text(json.dumps(data, ensure_ascii=False))
    return out


def seen_query(model, tok, case: dict, feats_in) -> str:
    """The prompt text upstream's chat() builds (template, system message, image tokens)."""
    from earthdial.conversation import get_conv_template

    question = case["question"]
    if "<image>" not in question:
        question = "<image>\n" + question
    template = get_conv_template(model.template)
    template.system_message = model.system_message
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    query = template.get_prompt()
    tiles = feats_in.shape[0]
    return query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * model.num_image_token * tiles + "</img>", 1)


# ------------------------------------------------------------------------------------------------
# Our side
# ------------------------------------------------------------------------------------------------


def prepare(work: Path, upstream_git: Path) -> None:
    """Upstream's Python files out of the bare git dir, the timm stub, and the two tiny checkpoints."""

    files = subprocess.run(
        ["git", f"--git-dir={upstream_git}", "ls-tree", "-r", "--name-only", "HEAD", UPSTREAM_FILES],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
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
    for name, size, hidden in (("tiny224", 224, 64), ("tiny448", 448, 1024)):
        ckpt = work / name
        if not (ckpt / "config.json").exists():
            tiny.make_tiny_checkpoint(ckpt, "EarthDial_4B_MS", image_size=size, seed=1, vision_hidden=hidden)
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


def cases(work: Path) -> list[dict]:
    rng = np.random.default_rng(7)
    rgb = (rng.random((3, 300, 500)) * 255).astype(np.uint8)
    ms4 = (rng.random((4, 120, 120)) * 255).astype(np.uint8)  # RGB + NIR, tree_norm
    ms12 = rng.integers(0, 4000, (12, 64, 64)).astype(np.uint16)  # Sentinel-2 L2A
    sar = rng.normal(-18, 4, (1, 100, 100)).astype(np.float32)  # VH in dB
    greedy, beams = ["greedy", 1, 0], ["beams", 2, 1]
    out = []
    for ckpt, final in (("tiny224", True), ("tiny448", False)):
        out += [
            {"name": f"{ckpt}-rgb", "checkpoint": ckpt, "kind": "rgb", "tag": "[hr_rgb_0.5]", "data": rgb,
             "question": "[refer] [hr_rgb_0.5] <image>\n Give me the location of <ref>ships</ref>"},
            {"name": f"{ckpt}-ms4", "checkpoint": ckpt, "kind": "bands", "tag": "[hr_rgbi_0.5]", "data": ms4,
             "question": "[hr_rgbi_0.5] [treeclassify] Classify the botanical tree species present inside the "
                         "image in one of the following species. Species: pine, oak \nAnswer in one word or a "
                         "short phrase."},
            {"name": f"{ckpt}-ms12", "checkpoint": ckpt, "kind": "bands", "tag": "[s2_ms_10]", "data": ms12,
             "question": "[s2_ms_10] <image>\n Classify the given image in one of the following classes. "
                         "Classes: forest, water \nAnswer in one word or a short phrase."},
            {"name": f"{ckpt}-sar", "checkpoint": ckpt, "kind": "bands", "tag": "[s1_vh_1]", "data": sar,
             "question": "[refer] [s1_vh_1] <image>\n Give me the location of <ref>ships</ref>"},
        ]  # fmt: skip
        for c in out[-4:]:
            c["final_size"] = None
            c["final"] = final
    out.append({"name": "nodefaults-rgb", "checkpoint": "tiny224-nodefaults", "kind": "rgb", "tag": "[hr_rgb_0.5]",
                "data": rgb, "question": out[0]["question"]})  # fmt: skip
    for c in out:
        c["checkpoint"] = str(work / c["checkpoint"])
        c["decodings"] = [greedy, beams]
        c["max_new_tokens"] = 12
    return out


def run_ours(work: Path, case_list: list[dict]) -> dict:
    import torch

    from earthdial.engine import Engine, Query

    engines: dict[str, Engine] = {}
    ours: dict = {}
    for case in case_list:
        ckpt = case["checkpoint"]
        if ckpt not in engines:
            engines[ckpt] = Engine(ckpt, device="cpu")
            # upstream's chat() stops on the template separator <|end|> only
            engines[ckpt].stop_ids = [engines[ckpt].tokenizer.convert_tokens_to_ids("<|end|>")]
        engine = engines[ckpt]
        image = engine.image(case["data"], case["tag"])
        pixels = image.pixels
        if image.kind == "bands" and case["tag"] not in ("[s1_vh_1]",):
            bands = case["data"].shape[0]
            pixels = image.pixels.flatten(0, 1)[:bands]  # the groups' bands without the padding repeats
        else:
            pixels = pixels.flatten(0, 1) if image.kind == "bands" else pixels
        np.save(work / f"{case['name']}.pixels.npy", pixels.numpy())
        if image.kind == "bands" and case.get("final"):
            info = engine.info
            case["final_size"] = [(info.image_size // 14) ** 2, engine.model.config.vision_config.hidden_size]
        q = Query(case["question"], [image], case["max_new_tokens"])
        with torch.no_grad():
            feats = engine.image_features([image]).numpy()
            ids, mask = engine.encode([engine.prompt_text(q)])
            embeds = engine.embed(ids, [q])
            logits = engine.model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].numpy()
        answers, gen_ids = {}, {}
        decode = engine._decode
        for label, beams, min_new in case["decodings"]:
            q = Query(
                case["question"], [image], case["max_new_tokens"], num_beams=beams, min_new_tokens=min_new
            )
            seen: list[list[int]] = []
            engine._decode = lambda ids, _seen=seen, _decode=decode: (_seen.append(ids), _decode(ids))[1]
            answers[label] = engine.generate([q])
            engine._decode = decode
            gen_ids[label] = seen[0]
            # upstream's chat() decodes with skip_special_tokens and cuts at <|end|>; ours keeps the
            # added tags and markup (<ref>, <box>, sensor tags), so compare texts decoded its way too
            answers[label + "_upstream_style"] = engine.tokenizer.decode(
                until_stop(seen[0], engine.stop_ids), skip_special_tokens=True
            ).strip()
        ours[case["name"]] = {"features": feats, "input_ids": ids[0].numpy(), "logits": logits,
                              "answers": answers, "ids": gen_ids}  # fmt: skip
    return ours


def until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return list(ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream-git", default="/work/.mirror/hiyamdebary+EarthDial/repo")
    parser.add_argument("--venv", default="/work/scratch-fidelity/venv")
    parser.add_argument("--work", default="/work/scratch-fidelity/compare")
    parser.add_argument("--role", default="ours", choices=["ours", "upstream"])
    parser.add_argument("--json", help="also write the measured differences to this file")
    args = parser.parse_args()
    work = Path(args.work)
    if args.role == "upstream":
        run_upstream(work)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, Path(args.upstream_git))
    case_list = cases(work)
    ours = run_ours(work, case_list)
    (work / "cases.json").write_text(
        json.dumps([{k: v for k, v in c.items() if k != "data"} for c in case_list], indent=1)
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [str(Path(args.venv) / "bin" / "python"), __file__, "--role", "upstream", "--work", str(work)],
        check=True, env=env,
    )  # fmt: skip
    theirs = np.load(work / "upstream.npz")
    their_meta = json.loads((work / "upstream.json").read_text())
    rows = []
    for case in case_list:
        name = case["name"]
        mine = ours[name]
        f_ours, f_up = mine["features"], theirs[f"{name}.features"].reshape(mine["features"].shape)
        same_ids = np.array_equal(mine["input_ids"], theirs[f"{name}.input_ids"])
        row = {
            "case": name,
            "features_shape": list(f_ours.shape),
            "features_max_abs": float(np.abs(f_ours - f_up).max()),
            "features_max_rel": float(np.abs(f_ours - f_up).max() / max(np.abs(f_up).max(), 1e-12)),
            "prompt_ids_equal": bool(same_ids),
            "prompt_tokens": int(mine["input_ids"].shape[0]),
            "logits_max_abs": float(np.abs(mine["logits"] - theirs[f"{name}.logits"]).max()),
            "argmax_equal": bool(mine["logits"].argmax() == theirs[f"{name}.logits"].argmax()),
        }
        end = [int(theirs[f"{name}.end_id"])]
        for label, _, _ in case["decodings"]:
            their_ids = theirs[f"{name}.ids.{label}"].tolist()
            # transformers 4.37 starts an inputs_embeds-only generation from the LLM config's BOS and
            # returns it ahead of the new tokens (skip_special_tokens then hides it)
            if their_ids and their_ids[0] == int(theirs[f"{name}.bos_id"]):
                their_ids = their_ids[1:]
            their_ids = until_stop(their_ids, end)
            row[f"{label}_ids_equal"] = until_stop(mine["ids"][label], end) == their_ids
            row[f"{label}_tokens"] = len(their_ids)
            row[f"{label}_text_equal"] = (
                mine["answers"][label + "_upstream_style"] == their_meta[name]["answers"][label]
            )
            row[f"{label}_ours"] = mine["answers"][label][0]
            row[f"{label}_upstream"] = their_meta[name]["answers"][label]
        rows.append(row)

    def mark(ok: bool) -> str:
        return "=" if ok else "DIFF"

    print(f"{'case':14} {'features':>11} {'max|d|':>9} {'rel':>9} {'prompt':>6} {'logit|d|':>9} {'top1':>4} "
          f"{'greedy ids/text':>16} {'beam-2 ids/text':>16}")  # fmt: skip
    for r in rows:
        greedy = f"{mark(r['greedy_ids_equal'])}/{mark(r['greedy_text_equal'])} ({r['greedy_tokens']})"
        beams = f"{mark(r['beams_ids_equal'])}/{mark(r['beams_text_equal'])} ({r['beams_tokens']})"
        print(f"{r['case']:14} {str(r['features_shape']):>11} {r['features_max_abs']:9.2e} "
              f"{r['features_max_rel']:9.2e} {mark(r['prompt_ids_equal']):>6} {r['logits_max_abs']:9.2e} "
              f"{mark(r['argmax_equal']):>4} {greedy:>16} {beams:>16}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    ok = all(r["prompt_ids_equal"] and r["greedy_ids_equal"] and r["beams_ids_equal"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
