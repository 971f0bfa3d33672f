"""Prompts as EarthDial was trained on them, tokenised by the checkpoint's own tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from earthdial.contract.wire import EarthDialError
from earthdial.model import checkpoint
from earthdial.model.engine import Engine, Query
from earthdial.model.prompts import TASKS, build_question, expand_images, render_chat
from earthdial.model.tokens import INTERNVL_TOKENS, PHI3_TOKENS, SENSOR_TAGS, TASK_TAGS, earthdial_tokens
from earthdial.training import tiny


@pytest.fixture(scope="module", params=[224, 448])
def engine(request, tmp_path_factory) -> Engine:
    path = tiny.make_tiny_checkpoint(
        tmp_path_factory.mktemp(f"ck{request.param}"),
        variant="EarthDial_4B_Methane_UHI",
        image_size=request.param,
    )  # the Methane_UHI vocabulary holds every task and sensor tag
    return Engine(str(path), device="cpu")


def test_phi3_chat_template_is_exact() -> None:
    text = render_chat("<image>\nWhat is this?", "SYS")
    assert text == "<|system|>\nSYS<|end|><|user|>\n<image>\nWhat is this?<|end|><|assistant|>\n"
    assert render_chat("hi", "S").endswith("<|user|>\n<image>\nhi<|end|><|assistant|>\n")
    two = render_chat("again", "S", (("<image>\nfirst", "a1"),))
    assert (
        two
        == "<|system|>\nS<|end|><|user|>\n<image>\nfirst<|end|><|assistant|>\na1<|end|><|user|>\nagain<|end|><|assistant|>\n"
    )


def test_task_prompts_have_earthdial_shapes() -> None:
    assert (
        build_question("refer", "ships")
        == "[refer] [hr_rgb_0.5] <image> \n Give me the location of <ref>ships</ref>"
    )
    assert build_question("caption", "") == (
        "[caption] [hr_rgb_0.5] <image>\n Could you please provide the caption for the input image?"
    )
    assert build_question("identify", "[[7, 22, 14, 31, 0]]", "[s1_vh_1]") == (
        "[identify] [s1_vh_1] <image>\n what object is in this location <box>[[7, 22, 14, 31, 0]]</box>"
    )


def test_unknown_task_and_missing_prompt_are_typed_errors() -> None:
    with pytest.raises(EarthDialError) as err:
        build_question("segment", "x")
    assert err.value.code == "unknown_task"
    with pytest.raises(EarthDialError) as err:
        build_question("refer", "  ")
    assert err.value.code == "bad_request"


def test_special_task_and_sensor_tokens_are_single_ids(engine: Engine) -> None:
    tok = engine.tokenizer
    vocab = tok.get_vocab()
    for t in (*PHI3_TOKENS, *INTERNVL_TOKENS, *earthdial_tokens("EarthDial_4B_Methane_UHI")):
        ids = tok.encode(t, add_special_tokens=False)
        assert ids == [vocab[t]], t
    # inside real prompts too, for every task
    for task in TASKS:
        q = build_question(task, "[[1, 2, 3, 4, 0]]" if task == "identify" else "ships")
        ids = tok.encode(render_chat(q, "S"), add_special_tokens=False)
        for t in ("<|user|>", "<|end|>", "<|assistant|>", TASKS[task].sensor):
            assert ids.count(vocab[t]) >= 1, (task, t)
        tags = [t for t in (*TASK_TAGS, *SENSOR_TAGS) if t in q]
        assert tags, task
        for t in tags:
            assert vocab[t] in ids


def test_rgb_vocabulary_lacks_methane_uhi_tokens(tiny_checkpoint) -> None:
    vocab = checkpoint.load_tokenizer(tiny_checkpoint).get_vocab()
    assert "[uhi]" not in vocab and "[hyper_rgb_3]" not in vocab and "[l8_ms_30]" not in vocab
    assert "[refer]" in vocab and "[s1_vh_temp_10]" in vocab


def test_image_context_count_is_tiles_times_tokens_per_tile(engine: Engine) -> None:
    size = engine.info.image_size
    per_tile = (size // 14) ** 2 // 4
    assert engine.info.tokens_per_tile == per_tile
    img = np.zeros((3, size, 3 * size), dtype=np.uint8)  # a 3x1 grid plus the thumbnail: 4 tiles
    image = engine.image(img, "[hr_rgb_0.5]")
    assert image.pixels.shape == (4, 3, size, size)
    text = engine.prompt_text(Query(build_question("caption", ""), [image]))
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(engine.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 4 * per_tile
    assert ids.count(engine.tokenizer.convert_tokens_to_ids("<img>")) == 1


def test_expand_images_counts_markers() -> None:
    out = expand_images("a <image> b <image>", [1, 2], 3)
    assert out == "a <img>" + "<IMG_CONTEXT>" * 3 + "</img> b <img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    with pytest.raises(EarthDialError):
        expand_images("<image>", [1, 1], 3)


def test_generation_returns_text_and_batches_match_single_runs(engine: Engine) -> None:
    rng = np.random.RandomState(0)
    a = engine.image((rng.rand(3, 60, 200) * 255).astype(np.uint8), "[hr_rgb_0.5]")
    b = engine.image((rng.rand(3, 90, 90) * 255).astype(np.uint8), "[hr_rgb_0.5]")
    qa = Query(build_question("refer", "ships"), [a], 12)
    qb = Query(build_question("caption", ""), [b], 12)
    single = [engine.generate([qa])[0], engine.generate([qb])[0]]
    assert engine.generate([qa, qb]) == single
    assert all(isinstance(s, str) for s in single)


def test_a_prompt_naming_objects_defaults_to_refer_and_a_question_to_chat() -> None:
    from earthdial.model.prompts import default_task

    for prompt in ("ships", "small boats", " oil storage tanks. ", "Airplanes"):
        assert default_task(prompt) == "refer", prompt
    for prompt in (
        "",
        "Is there a ship?",
        "what is in the image",
        "describe the harbour",
        "how many ships are moored here",
        "a harbour with many ships and two cranes",
    ):
        assert default_task(prompt) == "chat", prompt
