"""The model path as upstream EarthDial's own code runs it (one test or more per row of docs/fidelity.md).

Every expected value here is worked out by hand or written from the facts sheet's description of the
upstream code ("Corrections read against the upstream code"), never by calling the code under test.
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

from earthdial import checkpoint, prompts, requests, sensors, service
from earthdial.answers import Box
from earthdial.cli import build_parser
from earthdial.engine import Engine, Image, Query, fuse_group_features, fusion_grid
from earthdial.georef import box_pixel_corners
from earthdial.protocol import EarthDialError


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    return Engine(str(tiny_checkpoint), device="cpu")


# -- 1. band-group fusion grid ------------------------------------------------------------------


@pytest.mark.parametrize(("k", "grid"), [(1, (1, 1)), (2, (2, 1)), (3, (2, 2)), (4, (2, 2)), (5, (3, 2)),
                                         (7, (3, 3)), (10, (4, 3))])  # fmt: skip
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
    assert sensors.S2_L2A_STD == (1111.4, 1159.1, 1188.1, 1375.2, 1376.6, 1358.6, 1418.4, 1476.4, 1439.9,
                                  1582.1, 1460.7, 1352.2)  # fmt: skip


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
    demo = Path(checkpoint.__file__).parent / "models" / "demo"
    assert "add_bos_token" not in json.loads((demo / "tokenizer_config.json").read_text())
    assert checkpoint.adds_bos(demo, checkpoint.load_tokenizer(demo)) is False


# -- 6. prompt texts --------------------------------------------------------------------------------


def test_tree_species_prompt_is_upstreams_with_the_image_first() -> None:
    q = prompts.build_question("tree_species", "Quercus robur, Pinus nigra", "[hr_rgbi_0.5]")
    assert q == ("[hr_rgbi_0.5] [treeclassify] Classify the botanical tree species present inside the image in "
                 "one of the following species. Species: Quercus robur, Pinus nigra \nAnswer in one word or a "
                 "short phrase.")  # fmt: skip
    assert prompts.task("tree_species").sensor == "[hr_rgbi_0.5]"
    assert "<|user|>\n<image>\n[hr_rgbi_0.5] [treeclassify]" in prompts.render_chat(q, "sys")


def test_damage_and_disaster_prompts_are_upstreams() -> None:
    damage = prompts.build_question("damage", "[[6, 6, 12, 22, 0]]", "[hr_rgb_temp_0.5]")
    assert damage == ("[identify] [hr_rgb_temp_0.5] <image> <image>\n Compare the building at "
                      "<box>[[6, 6, 12, 22, 0]]</box> between the pre-disaster and post-disaster images. In the "
                      "post-disaster image, classify the level of damage. Classes: no-damage, destroyed, "
                      "minor-damage, major-damage.")  # fmt: skip
    disaster = prompts.build_question("disaster", "", "[hr_rgb_temp_0.5]")
    assert disaster.endswith("Options: volcano, fire, earthquake, flood, tsunami, wind.")


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


@pytest.mark.parametrize(("name", "beams"), [
    ("classify", 5), ("tree_species", 5), ("methane", 5), ("uhi", 5), ("caption", 5), ("vqa", 5),
    ("change", 5), ("disaster", 5), ("damage", 5), ("post_disaster_refer", 5),
    ("refer", 2), ("identify", 2), ("grounding", 2),
])  # fmt: skip
def test_upstream_decoding_uses_the_evaluation_scripts_beams(name: str, beams: int) -> None:
    assert prompts.decoding_for(name, "upstream") == (beams, 1)
    assert prompts.decoding_for(name, "greedy") == (1, 0)


def test_chat_is_greedy_as_upstreams_demo_worker() -> None:
    assert prompts.decoding_for("chat", "upstream") == (1, 0)


def test_an_unknown_decoding_is_a_bad_request() -> None:
    with pytest.raises(EarthDialError) as err:
        prompts.decoding_for("refer", "sampling")
    assert err.value.code == "bad_request"


def _value_header(task: str, **options) -> dict:
    return {"op": "ask", "task": task, "prompt": "ships",
            "source": {"kind": "value", "transform": [1, 0, 0, 0, -1, 0], "crs": "EPSG:32633"},
            "options": options}  # fmt: skip


def test_decoding_is_chosen_per_request_over_the_server_default(engine: Engine) -> None:
    rgb = (np.random.default_rng(1).random((3, 40, 40)) * 255).astype(np.uint8)
    assert engine.decoding == "upstream"  # a published-layout (non-demo) checkpoint
    job = service.prepare(_value_header("refer"), [rgb], engine)
    assert (job.query.num_beams, job.query.min_new_tokens) == (2, 1)
    job = service.prepare(_value_header("refer", decoding="greedy"), [rgb], engine)
    assert (job.query.num_beams, job.query.min_new_tokens) == (1, 0)
    with pytest.raises(EarthDialError):
        service.prepare(_value_header("refer", decoding=5), [rgb], engine)


def test_serve_takes_a_decoding_flag() -> None:
    assert build_parser().parse_args(["serve", "--decoding", "greedy"]).decoding == "greedy"
    assert build_parser().parse_args(["serve"]).decoding == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--decoding", "beam"])


def test_scan_queries_stay_greedy() -> None:
    q = Query("x", [])
    assert (q.num_beams, q.min_new_tokens) == (1, 0)


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

    from earthdial import presets

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
    import rasterio
    from affine import Affine

    from earthdial.protocol import source_by_reference

    paths = []
    for i in range(2):  # 3:2 windows: 6 + 1 tiles alone, at most 3 + 1 each in a pair
        p = tmp_path / f"t{i}.tif"
        data = np.random.default_rng(i).integers(0, 255, (3, 448, 672), dtype=np.uint8)
        with rasterio.open(p, "w", driver="GTiff", width=672, height=448, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)) as dst:  # fmt: skip
            dst.write(data)
        paths.append(p)
    header = {"op": "ask", "task": "change", "sources": [source_by_reference(str(p)) for p in paths],
              "options": {"max_new_tokens": 2, "decoding": "greedy"}}  # fmt: skip
    plan = service.plan(header, [], engine)["plan"]
    reply = service.run(header, [], engine)
    assert plan["tiles"] == reply["tiles"] <= 2 * (3 + 1)
