"""EarthDial's stage-3 band-group path, pairs, variants and server-side batching."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_geotiff
from earthdial.contract.client import Client
from earthdial.contract.wire import EarthDialError, source_by_reference
from earthdial.model import checkpoint, sensors
from earthdial.model.engine import Engine, Query, fuse_group_features
from earthdial.model.prompts import build_question
from earthdial.training import tiny


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    return Engine(str(tiny_checkpoint), device="cpu")


def _tif(path: Path, data: np.ndarray, crs: str = "EPSG:32633", nodata=None) -> Path:
    return write_geotiff(path, data, crs=crs, px=10, nodata=nodata)


@pytest.mark.parametrize(
    ("count", "groups"),
    [
        (1, [[0, 0, 0]]),
        (3, [[0, 1, 2]]),
        (4, [[0, 1, 2], [3, 3, 3]]),
        (8, [[0, 1, 2], [3, 4, 5], [6, 7, 7]]),
        (12, [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]),
    ],
)
def test_band_groups_pad_the_short_last_group_with_its_last_band(count: int, groups: list[list[int]]) -> None:
    assert sensors.band_groups(count) == groups


def test_fusion_of_four_groups_averages_each_two_by_two_block() -> None:
    # 4 maps in a 2x2 grid, resized by exactly one half: bilinear (align_corners=False) then averages
    # each 2x2 block of the (2T, 2D) canvas.
    feats = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(0))
    top = torch.cat([feats[0], feats[1]], dim=1)
    bottom = torch.cat([feats[2], feats[3]], dim=1)
    canvas = torch.cat([top, bottom], dim=0)  # (12, 16)
    expected = canvas.reshape(6, 2, 8, 2).mean(dim=(1, 3))
    torch.testing.assert_close(fuse_group_features(feats), expected)


def test_fusion_of_three_groups_leaves_the_fourth_cell_empty() -> None:
    feats = torch.ones(3, 4, 4)
    out = fuse_group_features(feats)
    # the bottom-right quarter of the canvas is zeros: its block averages are 0 there, 1 elsewhere
    assert out.shape == (4, 4)
    assert torch.allclose(out[2:, 2:], torch.zeros(2, 2)) and torch.allclose(out[:2, :2], torch.ones(2, 2))


def test_one_group_passes_through() -> None:
    feats = torch.randn(1, 5, 7)
    torch.testing.assert_close(fuse_group_features(feats), feats[0])


def test_s2_l2a_normalisation_uses_the_published_constants() -> None:
    data = np.zeros((12, 2, 2), dtype=np.uint16)
    data[0] = 756
    data[11] = 1821
    out = sensors.normalize_bands(data, "s2_l2a")
    assert out[0, 0, 0] == pytest.approx((756 - 756.4) / 1111.4, abs=1e-6)
    assert out[11, 0, 0] == pytest.approx((1821 - 1821.5) / 1352.2, abs=1e-6)
    assert out[5, 0, 0] == pytest.approx((0 - 2212.6) / sensors.S2_L2A_STD[5], rel=1e-6)


def test_sar_db_normalisation_and_nan_fill() -> None:
    # As upstream evaluated SAR: dB -> 8-bit over -30..0 dB (our documented choice), /255, then the dB
    # constants. By hand: -20.26 dB -> 9.74/30*255 = 82.79 -> 83 -> (83/255 + 20.26)/5.91 = 3.48316;
    # NaN -> 0 -> 20.26/5.91 = 3.42809; -14.35 -> 133.0 -> 133 -> 3.51634; -26.17 -> 32.56 -> 33 -> 3.44998.
    data = np.array([[[-20.26, np.nan], [-14.35, -26.17]]], dtype=np.float32)
    out = sensors.normalize_bands(data, "s1")
    np.testing.assert_allclose(out[0], [[3.48316, 3.42809], [3.51634, 3.44998]], atol=1e-4)


def test_multispectral_image_runs_the_band_group_path(engine: Engine) -> None:
    data = np.random.default_rng(0).integers(0, 4000, (12, 40, 50)).astype(np.uint16)
    image = engine.image(data, "[s2_ms_10]")
    size = engine.info.image_size
    assert image.kind == "bands" and image.pixels.shape == (4, 3, size, size) and image.tiles == 1
    # reference: each group through the vision tower, fused, shuffled and projected
    norm = torch.from_numpy(sensors.normalize_bands(data, "s2_l2a"))
    resized = F.interpolate(norm[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(image.pixels[3], resized[[9, 10, 11]])
    model = engine.model.model
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values=image.pixels).last_hidden_state[:, 1:]
        fused = fuse_group_features(hidden)
        side = int(fused.shape[0] ** 0.5)
        shuffled = model.pixel_shuffle(fused.reshape(1, side, side, -1), 0.5)
        expected = model.multi_modal_projector(shuffled.reshape(1, -1, shuffled.shape[-1]))[0]
        got = engine.image_features([image])
    assert got.shape == (engine.info.tokens_per_tile, engine.model.config.text_config.hidden_size)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("tag", "count"),
    [("[s2_ms_10]", 12), ("[l8_ms_30]", 8), ("[hr_rgbi_0.5]", 4), ("[s1_vh_10]", 1), ("[s2_ms_10]", 10)],
)
def test_every_band_count_gives_one_tile_of_tokens(engine: Engine, tag: str, count: int) -> None:
    data = np.random.default_rng(count).random((count, 30, 30)).astype(np.float32)
    image = engine.image(data, tag)
    assert image.tiles == 1
    assert engine.image_features([image]).shape[0] == engine.info.tokens_per_tile


def test_tags_the_vocabulary_lacks_name_the_variant_to_load(engine: Engine) -> None:
    with pytest.raises(EarthDialError) as err:
        engine.check_tags(build_question("methane", ""))
    assert err.value.code == "wrong_variant" and "EarthDial_4B_Methane_UHI" in err.value.message
    engine.check_tags(build_question("refer", "ships"))  # present in the RGB vocabulary: no error


def test_variant_is_recognised_from_the_checkpoint(tmp_path: Path) -> None:
    uhi = tiny.make_tiny_checkpoint(tmp_path / "whatever", variant="EarthDial_4B_Methane_UHI")
    assert checkpoint.load(uhi)[2].variant == "EarthDial_4B_Methane_UHI"
    ms = tiny.make_tiny_checkpoint(tmp_path / "ms", variant="EarthDial_4B_MS")
    assert checkpoint.load(ms)[2].variant == "EarthDial_4B_MS"


def test_batched_greedy_equals_sequential_across_prompt_lengths_and_image_counts(engine: Engine) -> None:
    rng = np.random.default_rng(1)
    rgb = lambda h, w: engine.image((rng.random((3, h, w)) * 255).astype(np.uint8), "[hr_rgb_0.5]")  # noqa: E731
    queries = [
        Query(build_question("refer", "ships"), [rgb(60, 200)], 10),
        Query(build_question("change", ""), [rgb(50, 50), rgb(50, 50)], 14),
        Query(
            build_question(
                "chat", "How many storage tanks are visible in the north-east part of this scene?"
            ),
            [engine.image(rng.random((12, 20, 20)).astype(np.float32), "[s2_ms_10]")],
            8,
        ),
        Query(
            build_question("chat", "and now?", images=0),
            [rgb(224, 224)],
            6,
            history=(("<image>\nfirst?", "yes"),),
        ),
    ]
    one_by_one = [engine.generate([q])[0] for q in queries]
    assert engine.generate(queries) == one_by_one


def test_pairs_and_multispectral_over_the_server(server: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    before = _tif(tmp_path / "before.tif", (rng.random((3, 64, 64)) * 255).astype(np.uint8))
    after = _tif(tmp_path / "after.tif", (rng.random((3, 64, 64)) * 255).astype(np.uint8))
    ms = _tif(tmp_path / "s2.tif", rng.integers(0, 5000, (12, 64, 64)).astype(np.uint16))
    with Client(server, timeout_s=60) as c:
        pair = c.request(
            {
                "op": "ask",
                "task": "change",
                "prompt": "",
                "sources": [source_by_reference(str(before)), source_by_reference(str(after))],
            }
        ).header
        assert pair["tiles"] == 2 and len(pair["chips"]) == 2
        with pytest.raises(EarthDialError) as err:  # the RGB checkpoint never saw the band-group path
            c.ask(
                source_by_reference(str(ms), bands=list(range(1, 13))),
                "what is this?",
                task="chat",
                options={"sensor": "[s2_ms_10]"},
            )
        assert err.value.code == "wrong_variant" and "EarthDial_4B_MS" in err.value.message
        with pytest.raises(EarthDialError) as err:
            c.ask(source_by_reference(str(before)), "", task="change")  # a pair task with one image
        assert err.value.code == "bad_request"
        with pytest.raises(EarthDialError) as err:
            c.ask(source_by_reference(str(before)), "", task="methane")
        assert err.value.code == "wrong_variant"
        status = c.status()
        tasks = {t["name"]: t for t in status["tasks"]}
        assert tasks["methane"]["variants"] == ["EarthDial_4B_Methane_UHI"]
        assert "EarthDial_4B_RGB" in tasks["refer"]["variants"] and tasks["change"]["images"] == 2
        assert {s["tag"] for s in status["sensors"]} >= {"[s2_ms_10]", "[s1_vh_10]", "[hr_rgb_0.5]"}


def test_the_server_batches_concurrent_requests_with_unchanged_answers(server: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    paths = [
        _tif(tmp_path / f"t{i}.tif", (rng.random((3, 48, 48 + 16 * i)) * 255).astype(np.uint8))
        for i in range(6)
    ]
    alone = []
    with Client(server, timeout_s=120) as c:
        for p in paths:
            alone.append(c.ask(source_by_reference(str(p)), "ships", task="refer")["answer"])
    together: dict[int, dict] = {}

    def ask(i: int) -> None:
        with Client(server, timeout_s=120) as c:
            together[i] = c.ask(source_by_reference(str(paths[i])), "ships", task="refer")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert [together[i]["answer"] for i in range(len(paths))] == alone
    assert max(r["timings"]["batch"] for r in together.values()) > 1


def test_all_groups_and_tiles_of_a_batch_in_one_vision_call(engine: Engine) -> None:
    """Band groups of several multispectral/SAR images and RGB tiles go through the vision tower in one
    call, and give what one call per image gives (RGB also what the native get_image_features gives)."""
    rng = np.random.default_rng(7)
    images = [
        engine.image(rng.random((12, 40, 40)).astype(np.float32), "[s2_ms_10]"),
        engine.image((rng.random((3, 500, 300)) * 255).astype(np.uint8), "[hr_rgb_0.5]"),
        engine.image(rng.random((8, 30, 30)).astype(np.float32), "[l8_ms_30]"),
        engine.image(rng.random((1, 30, 30)).astype(np.float32), "[s1_vh_10]"),
        engine.image(rng.random((12, 40, 40)).astype(np.float32), "[s2_ms_10]"),
    ]
    assert [im.kind for im in images] == ["bands", "rgb", "bands", "bands", "bands"]
    assert images[1].pixels.shape[0] > 1  # several tiles
    calls = []
    hook = engine.model.model.vision_tower.register_forward_hook(lambda m, a, k: calls.append(1))
    try:
        with torch.no_grad():
            batched = engine.image_features(images)
            assert len(calls) == 1
            looped = engine.image_features(images, one_call=False)
            assert len(calls) == 1 + len(images)
            native = engine.model.model.get_image_features(pixel_values=images[1].pixels).pooler_output
    finally:
        hook.remove()
    assert batched.shape == (sum(im.tiles for im in images) * engine.info.tokens_per_tile, batched.shape[1])
    torch.testing.assert_close(batched, looped)
    start = images[0].tiles * engine.info.tokens_per_tile
    torch.testing.assert_close(
        batched[start : start + native.shape[0] * native.shape[1]], native.flatten(0, 1)
    )
