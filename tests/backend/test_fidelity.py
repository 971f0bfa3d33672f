"""The model path as upstream EarthDial's own code runs it (one test or more per row of docs/fidelity.md).

Every expected value here is worked out by hand or written from the upstream fact as docs/fidelity.md's
row states it (with upstream's file and line), never by calling the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_geotiff
from earthdial.cli.main import build_parser
from earthdial.contract.wire import EarthDialError
from earthdial.geo.georef import box_pixel_corners
from earthdial.model import checkpoint, prompts, sensors
from earthdial.model.answers import Box
from earthdial.model.engine import Engine, Image, Query, fuse_group_features, fusion_grid
from earthdial.serving import requests, service


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    return Engine(str(tiny_checkpoint), device="cpu")


# -- 1. band-group fusion grid ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "grid"),
    [(1, (1, 1)), (2, (2, 1)), (3, (2, 2)), (4, (2, 2)), (5, (3, 2)), (7, (3, 3)), (10, (4, 3))],
)
def test_fusion_grid_is_ceil_sqrt_rows_by_ceil_k_over_rows_columns(k: int, grid: tuple[int, int]) -> None:
    assert fusion_grid(k) == grid


def test_two_groups_stack_vertically_remainder_row_to_the_first() -> None:
    # k = 2: 2 rows x 1 column; 5 output rows split 3 + 2 (5 // 2 = 2, remainder 1 to the first row)
    feats = torch.stack([torch.full((5, 4), 1.0), torch.full((5, 4), 2.0)])
    out = fuse_group_features(feats)
    expected = torch.tensor([[1.0] * 4] * 3 + [[2.0] * 4] * 2)
    torch.testing.assert_close(out, expected)


def test_five_groups_fill_a_three_by_two_grid_with_a_zero_padded_last_row() -> None:
    # k = 5 into a 7 x 6 output: rows 3 + 2 + 2, columns 3 + 3; cell (2, 1) is empty (zeros)
    feats = torch.stack([torch.full((7, 6), float(v)) for v in (1, 2, 3, 4, 5)])
    out = fuse_group_features(feats)
    expected = torch.zeros(7, 6)
    expected[0:3, 0:3], expected[0:3, 3:6] = 1, 2
    expected[3:5, 0:3], expected[3:5, 3:6] = 3, 4
    expected[5:7, 0:3] = 5
    torch.testing.assert_close(out, expected)


def test_each_group_is_resized_bilinearly_into_its_own_cell() -> None:
    # k = 2, (4 tokens, 3 dims) -> cells of 2 x 3: halving the token axis with align_corners False samples
    # at 2i + 0.5, the mean of rows 2i and 2i + 1; the feature axis keeps its size (no change).
    g = torch.arange(24, dtype=torch.float32).reshape(2, 4, 3)
    out = fuse_group_features(g)
    top = (g[0, 0::2] + g[0, 1::2]) / 2
    bottom = (g[1, 0::2] + g[1, 1::2]) / 2
    torch.testing.assert_close(out, torch.cat([top, bottom]))


def test_fusion_output_is_upstreams_fixed_1024_square_at_448_px() -> None:
    # a 448 px InternViT-300M tile: 1024 tokens x 1024 features; 12 bands = 4 groups in 2 x 2 cells of 512
    feats = torch.zeros(4, 1024, 1024)
    feats[3] = 1.0
    out = fuse_group_features(feats)
    assert out.shape == (1024, 1024)
    assert out[512:, 512:].min() == 1.0 and out[:512].abs().max() == 0 and out[:, :512].abs().max() == 0


# -- 2. tile budget of pairs and sequences --------------------------------------------------------


@pytest.mark.parametrize(("images", "budget"), [(1, 6), (2, 3), (3, 2), (4, 1), (7, 1)])
def test_each_image_of_a_query_gets_max_one_or_budget_over_images(engine: Engine, images, budget) -> None:
    assert engine.max_tiles == 6  # the tiny checkpoint's max_dynamic_patch
    assert engine.tile_budget(images) == budget  # max(1, 6 // images), by hand


def test_a_pair_image_is_tiled_with_half_the_budget(engine: Engine) -> None:
    # 3:2 image at 224 px tiles: with 6 tiles the exact 3 x 2 grid (+ thumbnail); with 3 the grids are
    # 1x1, 1x2, 2x1, 1x3, 3x1 - none has 6 tiles, so at most 3 (+ thumbnail)
    img = (np.random.default_rng(0).random((3, 448, 672)) * 255).astype(np.uint8)
    assert engine.image(img, "[hr_rgb_0.5]").pixels.shape[0] == 6 + 1
    assert engine.image(img, "[hr_rgb_0.5]", images=2).pixels.shape[0] <= 3 + 1


# -- 3. normalisation constants -------------------------------------------------------------------


def test_landsat8_constants_are_upstreams() -> None:
    mean = (1685.92, 2576.61, 3412.41, 4061.92, 4908.37, 4252.26, 4252.26, 4252.26)
    std = (359.73, 418.77, 568.26, 626.04, 978.89, 866.68, 866.68, 866.68)
    assert sensors.L8_MEAN == pytest.approx(mean, abs=0.01)
    assert sensors.L8_STD == pytest.approx(std, abs=0.01)
    assert sensors.norm_for("[l8_ms_30]", 8) == "l8_norm"
    data = np.full((8, 2, 2), 2000, dtype=np.uint16)
    out = sensors.normalize_bands(data, "l8_norm")
    assert out[0, 0, 0] == pytest.approx((2000 - 1685.92) / 359.73, abs=1e-4)
    assert out[7, 1, 1] == pytest.approx((2000 - 4252.26) / 866.68, abs=1e-4)


def test_sentinel2_l2a_stds_are_upstreams() -> None:
    assert sensors.S2_L2A_STD == (
        1111.4,
        1159.1,
        1188.1,
        1375.2,
        1376.6,
        1358.6,
        1418.4,
        1476.4,
        1439.9,
        1582.1,
        1460.7,
        1352.2,
    )


# -- 4. SAR as evaluated --------------------------------------------------------------------------


def test_sar_db_maps_to_8_bit_over_minus_30_to_0_db() -> None:
    # (dB + 30) / 30 * 255, clipped, rounded: -30 -> 0, -15 -> 127.5 -> 128 (half to even), 0 -> 255,
    # +5 -> clipped 255, -40 -> clipped 0, NaN -> 0
    data = np.array([[[-30.0, -15.0, 0.0], [5.0, -40.0, np.nan]]], dtype=np.float32)
    np.testing.assert_array_equal(sensors.sar_to_8bit(data), [[[0, 128, 255], [255, 0, 0]]])


def test_8_bit_sar_is_scaled_to_0_1_then_normalised_with_the_db_constants() -> None:
    data = np.array([[[0, 255]]], dtype=np.uint8)
    out = sensors.normalize_bands(data, "s1")
    np.testing.assert_allclose(out[0, 0], [(0 + 20.26) / 5.91, (1 + 20.26) / 5.91], rtol=1e-6)


def test_sar_region_captions_take_the_rgb_path(engine: Engine) -> None:
    assert sensors.pixel_path("[s1_vh_1]", "identify") == "rgb"
    assert sensors.pixel_path("[s1_vh_1]", "refer") == "bands"
    # a uniform -15 dB image -> 8-bit 128 -> grey 128/255 in each channel, ImageNet-normalised
    image = engine.image(np.full((1, 50, 50), -15.0, dtype=np.float32), "[s1_vh_1]", task="identify")
    assert image.kind == "rgb"
    grey = 128 / 255
    expected = [(grey - 0.485) / 0.229, (grey - 0.456) / 0.224, (grey - 0.406) / 0.225]
    np.testing.assert_allclose(image.pixels[0, :, 10, 10].numpy(), expected, atol=1e-4)
    bands = engine.image(np.full((1, 50, 50), -15.0, dtype=np.float32), "[s1_vh_1]", task="refer")
    assert bands.kind == "bands"
    np.testing.assert_allclose(bands.pixels[0, :, 10, 10].numpy(), [(grey + 20.26) / 5.91] * 3, atol=1e-4)


# -- 5. BOS from the tokenizer config --------------------------------------------------------------


def _copy_with_tokenizer_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(("setting", "expected"), [(True, True), (False, False), (None, False)])
def test_bos_is_added_exactly_when_the_tokenizer_config_says_so(tiny_checkpoint, tmp_path, setting, expected):
    # None: no add_bos_token key - the tiny tokenizer's own defaults add no special tokens
    d = _copy_with_tokenizer_config(tiny_checkpoint, tmp_path / "c", add_bos_token=setting)
    tok = checkpoint.load_tokenizer(d)
    assert checkpoint.adds_bos(d, tok) is expected


def test_the_engine_puts_bos_first_only_when_the_checkpoint_asks(engine: Engine) -> None:
    bos = engine.tokenizer.convert_tokens_to_ids("<s>")
    ids, mask = engine.encode(["<|user|>\nhi<|end|>", "<|user|>\nhello there<|end|>"])
    assert bos not in ids.tolist()[0] and bos not in ids.tolist()[1]
    with_bos = Engine.from_model(
        engine.model, engine.tokenizer, dataclasses.replace(engine.info, add_bos=True)
    )
    ids2, mask2 = with_bos.encode(["<|user|>\nhi<|end|>", "<|user|>\nhello there<|end|>"])
    for row in range(2):
        first = int(mask2[row].tolist().index(1))
        assert ids2[row, first] == bos  # the first real token after the left padding
        assert ids2[row, first + 1 :].tolist() == ids[row, int(mask[row].tolist().index(1)) :].tolist()


def test_the_demo_tokenizer_adds_no_bos() -> None:
    demo = Path(checkpoint.__file__).parent.parent / "models" / "demo"
    assert "add_bos_token" not in json.loads((demo / "tokenizer_config.json").read_text())
    assert checkpoint.adds_bos(demo, checkpoint.load_tokenizer(demo)) is False


# -- 6. prompt texts --------------------------------------------------------------------------------


def test_tree_species_prompt_is_upstreams_with_the_image_first() -> None:
    q = prompts.build_question("tree_species", "Quercus robur, Pinus nigra", "[hr_rgbi_0.5]")
    assert q == (
        "[hr_rgbi_0.5] [treeclassify] Classify the botanical tree species present inside the image in "
        "one of the following species. Species: Quercus robur, Pinus nigra \nAnswer in one word or a "
        "short phrase."
    )
    assert prompts.task("tree_species").sensor == "[hr_rgbi_0.5]"
    assert "<|user|>\n<image>\n[hr_rgbi_0.5] [treeclassify]" in prompts.render_chat(q, "sys")


def test_damage_and_disaster_prompts_are_upstreams() -> None:
    damage = prompts.build_question("damage", "[[6, 6, 12, 22, 0]]", "[hr_rgb_temp_0.5]")
    assert damage == (
        "[identify] [hr_rgb_temp_0.5] <image> <image>\n Compare the building at "
        "<box>[[6, 6, 12, 22, 0]]</box> between the pre-disaster and post-disaster images. In the "
        "post-disaster image, classify the level of damage. Classes: no-damage, destroyed, "
        "minor-damage, major-damage."
    )
    disaster = prompts.build_question("disaster", "", "[hr_rgb_temp_0.5]")
    assert disaster.endswith("Options: volcano, fire, earthquake, flood, tsunami, wind.")


def test_refer_and_grounding_questions_have_upstreams_space_before_the_newline() -> None:
    # detection_test.py / grounding_desscription_test.py req_prompt: "<image> \n Give ..." / "<image> \n Describe ..."
    assert prompts.build_question("refer", "ships", "[hr_rgb_0.5]") == (
        "[refer] [hr_rgb_0.5] <image> \n Give me the location of <ref>ships</ref>"
    )
    assert prompts.build_question("grounding", "", "[hr_rgb_0.5]") == (
        "[grounding] [hr_rgb_0.5] <image> \n Describe the image in detail. Detect objects location. Describe "
        "objects size. Where objects are located?. Describe relation between objects."
    )
    # a follow-up turn (images in the history) still drops the marker and the newline
    assert prompts.build_question("refer", "ships", "[hr_rgb_0.5]", images=0) == (
        "[refer] [hr_rgb_0.5] Give me the location of <ref>ships</ref>"
    )


def test_the_prompt_ids_of_a_served_refer_request_equal_upstreams_string(engine: Engine, monkeypatch) -> None:
    encoded: list[torch.Tensor] = []
    real = engine.encode
    monkeypatch.setattr(engine, "encode", lambda texts: (encoded.append(real(texts)[0]), real(texts))[1])
    rgb = (np.random.default_rng(2).random((3, 40, 40)) * 255).astype(np.uint8)
    reply = service.run(_value_header("refer", sensor="[hr_rgb_0.5]", max_new_tokens=2), [rgb], engine)
    # upstream's chat(): phi3-chat with the checkpoint's system message, the detection script's question,
    # <image> -> <img> + <IMG_CONTEXT> x (64 tokens per 224 px tile x tiles) + </img>, then tokenizer(query)
    phi3_chat_default = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
    cfg = json.loads((Path(engine.info.path) / "config.json").read_text())
    system = cfg.get("system_message", phi3_chat_default)  # upstream: the config's, else the template's
    image = "<img>" + "<IMG_CONTEXT>" * (64 * reply["tiles"]) + "</img>"
    query = (
        f"<|system|>\n{system}<|end|><|user|>\n[refer] [hr_rgb_0.5] {image} \n Give me the location of "
        "<ref>ships</ref><|end|><|assistant|>\n"
    )
    assert encoded[0][0].tolist() == engine.tokenizer(query)["input_ids"]
    no_space = query.replace("</img> \n", "</img>\n")
    assert engine.tokenizer(no_space)["input_ids"] != engine.tokenizer(query)["input_ids"]


def test_lcz_questions_carry_the_s1_vh_10_tag() -> None:
    assert sensors.prompt_tag("[s2_ms_10]", 10) == "[s1_vh_10]"
    assert sensors.prompt_tag("[s2_ms_10]", 12) == "[s2_ms_10]"
    assert sensors.norm_for("[s2_ms_10]", 10) == "s2_norm"  # the pixels stay Sentinel-2's


def test_lcz_through_the_service(tiny_ms_checkpoint: Path) -> None:
    engine = Engine(str(tiny_ms_checkpoint), device="cpu")  # multispectral needs the MS variant
    header = {"op": "ask", "task": "classify", "prompt": "compact high-rise, water",
              "source": {"kind": "value", "transform": [10, 0, 500000, 0, -10, 4000000], "crs": "EPSG:32633"},
              "options": {"sensor": "[s2_ms_10]"}}  # fmt: skip
    data = np.random.default_rng(0).random((10, 32, 32)).astype(np.float32)
    job = service.prepare(header, [data], engine)
    assert job.query.question.startswith("[s1_vh_10] <image>\n Classify")


def test_post_disaster_referring_decodes_100_tokens() -> None:
    assert prompts.task("post_disaster_refer").max_new_tokens == 100


# -- 7. decoding per task ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(prompts.TASKS))
def test_greedy_is_one_beam_and_at_least_one_new_token_as_the_published_evaluation(name: str) -> None:
    # every evaluation script sets num_beams = 1 under --dynamic and passes min_new_tokens=1
    how = prompts.decoding_for(name, "greedy")
    assert (how.num_beams, how.min_new_tokens, how.sampling, how.system_message) == (1, 1, None, None)


@pytest.mark.parametrize(
    ("name", "beams"),
    [
        ("classify", 5),
        ("tree_species", 5),
        ("methane", 5),
        ("uhi", 5),
        ("caption", 5),
        ("vqa", 5),
        ("change", 5),
        ("disaster", 5),
        ("damage", 5),
        ("post_disaster_refer", 5),
        ("refer", 2),
        ("identify", 2),
        ("grounding", 2),
        ("chat", 1),
    ],
)
def test_beams_are_the_evaluation_scripts_num_beams_defaults(name: str, beams: int) -> None:
    how = prompts.decoding_for(name, "beams")
    assert (how.num_beams, how.min_new_tokens, how.sampling) == (beams, 1, None)


def test_upstream_demo_samples_as_the_demos_sliders_under_its_system_message() -> None:
    # demo/app.py slider defaults: temperature 0.7, top_p 0.95, repetition penalty 1.1; the system message
    # is its default text + a blank line + the (default) persona text; no min_new_tokens in the worker
    how = prompts.decoding_for("chat", "upstream_demo")
    assert how.num_beams == 1 and how.min_new_tokens == 0
    assert (how.sampling.temperature, how.sampling.top_p, how.sampling.repetition_penalty) == (0.7, 0.95, 1.1)
    assert how.system_message == (
        "Please describe this image in the details!\n\nPlease describe this image in the details!"
    )


@pytest.mark.parametrize("mode", ["sampling", "upstream", "beam"])
def test_an_unknown_decoding_is_a_bad_request(mode: str) -> None:
    with pytest.raises(EarthDialError) as err:
        prompts.decoding_for("refer", mode)
    assert err.value.code == "bad_request"
    assert "greedy, beams, upstream_demo" in err.value.message


def _value_header(task: str, **options) -> dict:
    return {"op": "ask", "task": task, "prompt": "ships",
            "source": {"kind": "value", "transform": [1, 0, 0, 0, -1, 0], "crs": "EPSG:32633"},
            "options": options}  # fmt: skip


def test_a_published_checkpoint_decodes_greedily_unless_a_request_asks_otherwise(engine: Engine) -> None:
    rgb = (np.random.default_rng(1).random((3, 40, 40)) * 255).astype(np.uint8)
    assert not engine.info.demo and engine.decoding == "greedy"  # a published-layout checkpoint
    job = service.prepare(_value_header("refer"), [rgb], engine)
    assert (job.query.num_beams, job.query.min_new_tokens, job.query.sampling) == (1, 1, None)
    job = service.prepare(_value_header("refer", decoding="beams"), [rgb], engine)
    assert (job.query.num_beams, job.query.min_new_tokens) == (2, 1)
    job = service.prepare(_value_header("chat", decoding="upstream_demo"), [rgb], engine)
    assert job.query.sampling is not None and job.query.system.startswith("Please describe")
    with pytest.raises(EarthDialError):
        service.prepare(_value_header("refer", decoding=5), [rgb], engine)


def test_serve_takes_a_decoding_flag() -> None:
    for mode in ("greedy", "beams", "upstream_demo"):
        assert build_parser().parse_args(["serve", "--decoding", mode]).decoding == mode
    assert build_parser().parse_args(["serve"]).decoding == "auto"
    for bad in ("beam", "upstream"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--decoding", bad])


def test_queries_built_without_a_decoding_are_greedy_with_one_new_token_at_least() -> None:
    q = Query("x", [])
    assert (q.num_beams, q.min_new_tokens, q.sampling) == (1, 1, None)


class _Bias:
    """A logits processor adding `value` to one token's score at every step (after transformers' own
    processors, min_new_tokens among them, have run)."""

    def __init__(self, token: int, value: float) -> None:
        self.token, self.value = token, value

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.token] += self.value
        return scores


def _refer_query(engine: Engine, **kw) -> Query:
    image = engine.image(
        (np.random.default_rng(5).random((3, 40, 40)) * 255).astype(np.uint8), "[hr_rgb_0.5]"
    )
    return Query(prompts.build_question("refer", "ships"), [image], 6, **kw)


@pytest.mark.parametrize("beams", [1, 2])
def test_min_new_tokens_one_never_gives_an_empty_answer(engine: Engine, beams: int) -> None:
    from transformers import LogitsProcessorList

    end = engine.tokenizer.convert_tokens_to_ids("<|end|>")
    wants_end = LogitsProcessorList([_Bias(end, 1e4)])  # the model's first choice is always <|end|>
    empty = engine.generate(
        [_refer_query(engine, num_beams=beams, min_new_tokens=0)], logits_processor=wants_end
    )
    one = engine.generate(
        [_refer_query(engine, num_beams=beams, min_new_tokens=1)], logits_processor=wants_end
    )
    assert empty[0].ids == () and len(one[0].ids) == 1  # one token, then <|end|> (-inf only at step 0)


def test_generation_stops_on_end_only_as_upstream(engine: Engine) -> None:
    from transformers import LogitsProcessorList

    vocab = engine.tokenizer.get_vocab()
    assert engine.stop_ids == [vocab["<|end|>"]]
    for other in (
        "<|endoftext|>",
        "</s>",
    ):  # Phi-3's generation config lists these; upstream's chat() does not
        push = LogitsProcessorList([_Bias(vocab[other], 1e4)])
        out = engine.generate([_refer_query(engine)], logits_processor=push)
        assert out[0].ids == (vocab[other],) * 6  # decoding ran on to max_new_tokens past each of them


def test_upstream_demo_decoding_reaches_generate_as_the_demo_samples(engine: Engine, monkeypatch) -> None:
    seen: dict = {}
    real = engine.model.generate
    monkeypatch.setattr(engine.model, "generate", lambda *a, **k: (seen.update(k), real(*a, **k))[1])
    texts: list[str] = []
    real_encode = engine.encode
    monkeypatch.setattr(engine, "encode", lambda t: (texts.extend(t), real_encode(t))[1])
    rgb = (np.random.default_rng(1).random((3, 40, 40)) * 255).astype(np.uint8)
    torch.manual_seed(0)
    service.run(_value_header("chat", decoding="upstream_demo", max_new_tokens=3), [rgb], engine)
    assert (seen["do_sample"], seen["temperature"], seen["top_p"], seen["repetition_penalty"]) == (
        True,
        0.7,
        0.95,
        1.1,
    )
    assert seen["num_beams"] == 1 and seen["min_new_tokens"] == 0
    assert texts[0].startswith(
        "<|system|>\nPlease describe this image in the details!\n\nPlease describe this image in the details!<|end|>"
    )


def _queries(engine: Engine, beams: int) -> list[Query]:
    rng = np.random.default_rng(3)
    shapes = [(3, 40, 40), (3, 300, 500), (3, 120, 60)]  # 1, several and two-ish tiles: different lengths
    prompts_ = ["ships", "two large white storage tanks at the top", "a"]
    out = []
    for shape, p in zip(shapes, prompts_, strict=True):
        image = engine.image((rng.random(shape) * 255).astype(np.uint8), "[hr_rgb_0.5]")
        out.append(Query(prompts.build_question("refer", p), [image], 8, num_beams=beams, min_new_tokens=1))
    return out


def test_batched_beam_search_equals_sequential_beam_search(engine: Engine) -> None:
    queries = _queries(engine, beams=2)
    lengths = {engine.encode([engine.prompt_text(q)])[0].shape[1] for q in queries}
    assert len(lengths) == 3  # left padding is exercised
    batched = engine.generate(queries)
    alone = [engine.generate([q])[0] for q in queries]
    assert batched == alone
    assert all(a for a in batched)  # min_new_tokens 1: never an empty answer


def test_a_batch_mixing_decodings_answers_each_as_alone(engine: Engine) -> None:
    beams, greedy = _queries(engine, beams=2), _queries(engine, beams=1)
    for q in greedy:
        q.min_new_tokens = 0
    mixed = [beams[0], greedy[1], beams[2], greedy[0]]
    assert engine.generate(mixed) == [engine.generate([q])[0] for q in mixed]


def test_beam_batches_fit_the_memory_plan_in_sequences(engine: Engine, monkeypatch) -> None:
    # a plan for 4 requests at one sequence each holds 2 requests of 2 beams: 3 queries -> batches 2 + 1
    sizes: list[int] = []
    real = engine.generate_beams
    monkeypatch.setattr(
        engine, "generate_beams", lambda qs, *a, **k: (sizes.append(len(qs)), real(qs, *a, **k))[1]
    )
    monkeypatch.setattr(engine, "plan", {"batch": 4})
    engine.generate(_queries(engine, beams=2))
    assert sizes == [2, 1]


@pytest.mark.parametrize("beams", [1, 2])
def test_a_cancelled_query_stops_alone_in_a_beam_or_greedy_batch(engine: Engine, beams: int) -> None:
    queries = _queries(engine, beams=beams)
    alone = engine.generate([queries[1]])[0]
    queries[0].cancelled = lambda: True  # set before the first token: it stops after one
    out = engine.generate(queries)
    assert len(engine.tokenizer(out[0], add_special_tokens=False)["input_ids"]) <= 1
    assert out[1] == alone


# -- 8. config defaults ---------------------------------------------------------------------------


def test_absent_config_keys_take_upstreams_defaults() -> None:
    assert checkpoint.ps_version({}) == "v1"
    assert checkpoint.use_thumbnail({}) is False
    assert checkpoint.ps_version({"ps_version": "v2"}) == "v2"
    assert checkpoint.use_thumbnail({"use_thumbnail": True}) is True


def _pixel_shuffle_v1(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL's pixel_shuffle with ps_version v1 from its description: v2 without the final swap."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    return x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))


def test_a_checkpoint_without_ps_version_runs_v1_pixel_shuffle(tiny_checkpoint: Path, tmp_path: Path) -> None:
    d = tmp_path / "v1"
    shutil.copytree(tiny_checkpoint, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["ps_version"], cfg["use_thumbnail"]
    (d / "config.json").write_text(json.dumps(cfg))
    eng = Engine(str(d), device="cpu")
    assert eng.info.ps_version == "v1" and eng.info.use_thumbnail is False
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model = eng.model.model
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        side = math.isqrt(hidden.shape[1])
        shuffled = _pixel_shuffle_v1(hidden.reshape(1, side, side, -1))
        expected = model.multi_modal_projector(shuffled.reshape(1, -1, shuffled.shape[-1]))[0]
        got = eng.image_features([Image(pixels, "rgb")])
    torch.testing.assert_close(got, expected)


# -- 9. SAR pairs' tag -----------------------------------------------------------------------------


def test_sar_pairs_use_the_temporal_tag_only_if_the_vocabulary_holds_it() -> None:
    assert sensors.pair_tag(True, "[hr_rgb_temp_0.5]", {"[s1_vh_temp_10]"}) == "[s1_vh_temp_10]"
    assert sensors.pair_tag(True, "[hr_rgb_temp_0.5]", {"[s1_vh_10]"}) == "[s1_vh_10]"
    assert sensors.pair_tag(False, "[hr_rgb_temp_0.5]", set()) == "[hr_rgb_temp_0.5]"


# -- 10. rotated boxes ------------------------------------------------------------------------------


def test_the_rotation_worked_example_of_docs_outputs_md() -> None:
    corners = box_pixel_corners(Box(40, 45, 60, 55, 30, None), 100, 100)
    expected = [(38.840, 50.670), (56.160, 40.670), (61.160, 49.330), (43.840, 59.330)]
    for (x, y), (ex, ey) in zip(corners, expected, strict=True):
        assert x == pytest.approx(ex, abs=1e-3) and y == pytest.approx(ey, abs=1e-3)


def test_rotation_matches_upstreams_row_vector_product() -> None:
    # upstream eval: (corners - centre) @ [[cos, -sin], [sin, cos]] + centre, on the 0-100 grid
    a = math.radians(37.0)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rect = np.array([[10.0, 20.0], [50.0, 20.0], [50.0, 40.0], [10.0, 40.0]])
    centre = np.array([30.0, 30.0])
    expected = (rect - centre) @ rot + centre
    got = np.array(box_pixel_corners(Box(10, 20, 50, 40, 37, None), 100, 100))
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_the_service_picks_the_sar_pair_tag_from_the_loaded_vocabulary() -> None:
    from types import SimpleNamespace

    from earthdial.geo import presets

    inputs = SimpleNamespace(preset=presets.PRESETS["s1_vh_db"], gsd_m=10.0)
    spec = prompts.task("change")
    assert (
        service._sensor_for(spec, inputs, requests.Options(), frozenset({"[s1_vh_temp_10]"}))
        == "[s1_vh_temp_10]"
    )
    assert service._sensor_for(spec, inputs, requests.Options(), frozenset({"[s1_vh_10]"})) == "[s1_vh_10]"


def test_the_plan_of_a_pair_counts_each_images_share_of_the_tile_budget(
    tmp_path: Path, engine: Engine
) -> None:
    from affine import Affine

    from earthdial.contract.wire import source_by_reference

    paths = []
    for i in range(2):  # 3:2 windows: 6 + 1 tiles alone, at most 3 + 1 each in a pair
        p = tmp_path / f"t{i}.tif"
        data = np.random.default_rng(i).integers(0, 255, (3, 448, 672), dtype=np.uint8)
        paths.append(write_geotiff(p, data, transform=Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)))
    header = {
        "op": "ask",
        "task": "change",
        "sources": [source_by_reference(str(p)) for p in paths],
        "options": {"max_new_tokens": 2, "decoding": "greedy"},
    }
    plan = service.plan(header, [], engine)["plan"]
    reply = service.run(header, [], engine)
    assert plan["tiles"] == reply["tiles"] <= 2 * (3 + 1)


# -- 11. UHI bands resized as OpenCV's INTER_LINEAR -------------------------------------------------


@pytest.mark.parametrize(
    ("row", "size", "expected"),
    [
        ([0.0, 1.0, 2.0, 3.0], 2, [0.5, 2.5]),  # 2x shrink: x -> 2x + 0.5, the mean of each pair
        ([0.0, 10.0, 20.0, 30.0, 40.0], 2, [7.5, 32.5]),  # 2.5x: x -> 2.5x + 0.75; no antialias averaging
        ([0.0, 4.0], 4, [0.0, 1.0, 3.0, 4.0]),  # 2x growth: x -> x / 2 - 0.25, clamped to the edge pixels
    ],
)
def test_linear_resize_samples_pixel_centres_as_opencv(
    row: list[float], size: int, expected: list[float]
) -> None:
    from earthdial.model.pixels import resize_linear

    out = resize_linear(torch.tensor([[row]]), 1, size)
    torch.testing.assert_close(out[0, 0], torch.tensor(expected))


def test_linear_resize_is_separable_in_two_dimensions() -> None:
    from earthdial.model.pixels import resize_linear

    out = resize_linear(torch.tensor([[[0.0, 4.0], [8.0, 12.0]]]), 4, 4)[0]
    # rows sample at y = -0.25 (clamped 0), 0.25, 0.75, 1.25 (clamped 1); columns alike
    expected = torch.tensor([[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]], dtype=torch.float32)
    torch.testing.assert_close(out, expected)


def test_uhi_landsat_bands_take_the_linear_resize(engine: Engine) -> None:
    # band 1 normalises to 0 on the left half and 2 on the right; at 224 px column x samples the 2-pixel
    # row at (x + 0.5) / 112 - 0.5: columns up to 55 read 0, column 111 reads 2 * (111.5 / 112 - 0.5)
    data = np.empty((8, 2, 2), dtype=np.float32)
    for b, (m, s) in enumerate(zip(sensors.L8_MEAN, sensors.L8_STD, strict=True)):
        data[b, :, 0], data[b, :, 1] = m, m + 2 * s
    image = engine.image(data, "[l8_ms_30]")
    assert image.kind == "bands"
    band1 = image.pixels[0, 0]
    assert float(band1[7, 55]) == pytest.approx(0.0, abs=1e-5)
    assert float(band1[7, 111]) == pytest.approx(2 * (111.5 / 112 - 0.5), abs=1e-5)
    assert float(band1.max()) == pytest.approx(2.0, abs=1e-5) and float(band1.min()) >= -1e-6  # no overshoot


# -- 12. tiles per request ------------------------------------------------------------------------------


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_config_without_max_dynamic_patch_takes_the_evaluations_six_tiles(
    tiny_checkpoint, tmp_path
) -> None:
    d = _copy_with_config(tiny_checkpoint, tmp_path / "c", max_dynamic_patch=None)
    assert Engine(str(d), device="cpu").max_tiles == 6  # every evaluation script's --max-num
    d2 = _copy_with_config(tiny_checkpoint, tmp_path / "c2", max_dynamic_patch=2)
    assert Engine(str(d2), device="cpu").max_tiles == 2  # the config's own value wins when it has one


# -- 13. config keys upstream reads -----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("select_layer", -4), ("template", "internlm2-chat")])
def test_config_values_this_backend_cannot_honour_are_refused(tiny_checkpoint, tmp_path, key, value) -> None:
    d = _copy_with_config(tiny_checkpoint, tmp_path / "c", **{key: value})
    with pytest.raises(checkpoint.CheckpointError, match=key):
        checkpoint.load(d)


def test_absent_select_layer_and_template_load_as_earthdials(tiny_checkpoint, tmp_path) -> None:
    d = _copy_with_config(tiny_checkpoint, tmp_path / "c", select_layer=None, template=None)
    checkpoint.load(d)  # upstream's config defaults: select_layer -1; phi3-chat is EarthDial's template


def test_dynamic_image_size_false_gives_each_image_one_tile(tiny_checkpoint, tmp_path) -> None:
    # upstream's training dataloader and demo worker use the whole image when the key is false
    d = _copy_with_config(tiny_checkpoint, tmp_path / "c", dynamic_image_size=False)
    eng = Engine(str(d), device="cpu")
    img = (np.random.default_rng(0).random((3, 448, 672)) * 255).astype(np.uint8)  # 6 + 1 tiles when tiled
    assert eng.image(img, "[hr_rgb_0.5]").pixels.shape[0] == 1
    assert service._tiles_for(eng, 672, 448, "[hr_rgb_0.5]") == 1
    absent = _copy_with_config(tiny_checkpoint, tmp_path / "c2", dynamic_image_size=None)
    assert Engine(str(absent), device="cpu").image(img, "[hr_rgb_0.5]").pixels.shape[0] == 6 + 1
