"""The demo model: synthetic scenes, the training recipe, the published-layout checkpoint it writes, and
the shipped checkpoint finding real objects through the server's own path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from earthdial import training as train
from earthdial.contract.wire import source_by_reference
from earthdial.demo import synthetic
from earthdial.model import checkpoint, prompts
from earthdial.model.answers import parse_boxes
from earthdial.serving import service

MIN_ABSENT_NONE = 16  # of 20: eval-demo's target is >= 90 % on 200 scenes (docs/demo-model.md)

# ------------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------------


def test_scenes_are_deterministic_by_seed_and_index() -> None:
    a, b = synthetic.make_scene(3, 7), synthetic.make_scene(3, 7)
    assert a.objects == b.objects
    assert np.array_equal(synthetic.render(a), synthetic.render(b))
    other = synthetic.make_scene(3, 8)
    assert other.objects != a.objects
    pa, pb = synthetic.make_pair(3, 7), synthetic.make_pair(3, 7)
    assert pa.changed == pb.changed
    assert np.array_equal(synthetic.render(pa.after), synthetic.render(pb.after))


def _object_pixels(scene: synthetic.Scene, size: int) -> np.ndarray:
    """Where drawing the objects changed the image (the background render uses the same noise)."""
    diff = np.abs(synthetic.render(scene, size).astype(int) - synthetic.render(scene, size, objects=False))
    return diff.sum(axis=0) > 45


def _box_pixels(box: tuple[int, ...], size: int, pad: int = 0) -> tuple[slice, slice]:
    x1, y1, x2, y2 = (v * size / 100 for v in box[:4])
    return (
        slice(max(int(y1) - pad, 0), int(np.ceil(y2)) + pad),
        slice(max(int(x1) - pad, 0), int(np.ceil(x2)) + pad),
    )


@pytest.mark.parametrize("size", [112, 224])
def test_objects_are_where_their_labels_say(size: int) -> None:
    seen = set()
    for i in range(12):
        scene = synthetic.make_scene(11, i)
        changed = _object_pixels(scene, size)
        inside = np.zeros_like(changed)
        for obj in scene.objects:
            seen.add(obj.cls)
            rows, cols = _box_pixels(obj.box100(), size)
            area = changed[rows, cols]
            assert area.mean() > 0.25, f"{obj.cls} in scene {i}: its box holds few object pixels"
            # the object reaches every side of its box (within 2 px)
            r, c = np.nonzero(area)
            assert r.min() <= 2 and c.min() <= 2
            assert r.max() >= area.shape[0] - 3 and c.max() >= area.shape[1] - 3
            inside[_box_pixels(obj.box100(), size, pad=max(size // 28, 2))] = True
        # nearly all drawn pixels are in a box (wakes and shadows spill over a little)
        assert (changed & ~inside).sum() <= 0.05 * changed.sum() + 2
        # ships are on water, the others on land
        for obj in scene.objects:
            wet = synthetic.is_water(scene, obj.cx, obj.cy)
            assert bool(wet) == (obj.cls == "ship")
    assert seen == set(synthetic.CLASSES)


def test_pairs_record_what_appeared_and_disappeared() -> None:
    kinds = {"yes": 0, "no": 0}
    for i in range(40):
        pair = synthetic.make_pair(5, i)
        kinds["yes" if pair.changed else "no"] += 1
        for what, obj in pair.changed:
            if what == "appeared":
                assert obj in pair.after.objects and obj not in pair.before.objects
            else:
                assert obj in pair.before.objects and obj not in pair.after.objects
        if not pair.changed:
            assert pair.before.objects == pair.after.objects
    assert kinds["yes"] >= 12 and kinds["no"] >= 12


@pytest.mark.parametrize("quarter,flip", [(1, False), (2, False), (3, True), (0, True)])
def test_turned_labels_follow_turned_pixels(quarter: int, flip: bool) -> None:
    scene = synthetic.make_scene(2, 4)
    mask = train._turn_array(_object_pixels(scene, 112)[None], quarter, flip)[0]
    for obj in train.turn_scene(scene, quarter, flip).objects:
        area = mask[_box_pixels(obj.box100(), 112)]
        assert area.mean() > 0.25


def test_scene_geotiff_has_a_crs_and_reads_back() -> None:
    import rasterio

    scene = synthetic.make_scene(1, 1)
    image = synthetic.render(scene)
    path = synthetic.write_geotiff(_tmp() / "s.tif", image)
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 32633
        assert np.array_equal(src.read(), image)
        assert src.res == (1.0, 1.0)


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="earthdial-demo-test-"))


# ------------------------------------------------------------------------------------------------
# Tokenizer, records, training
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train.build_tokenizer()


def test_tokenizer_round_trips_answers(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    assert all(str(n) in vocab for n in range(101))
    for text in [
        "<ref>ship</ref><box>[[12, 40, 30, 52, 0]]</box>",
        "Yes. <ref>storage tank appeared</ref><box>[[0, 100, 7, 99, 0]]</box>",
        "<ref>ship</ref><box>[[5, 6, 7, 8, 0]]</box> <ref>building</ref><box>[[50, 60, 70, 80, 0]]</box>",
        "A coastal scene with water and land. There is a ship at the top left.",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    ids = tokenizer("[[12, 40, 30, 52, 0]]", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "[[",
        "12",
        ", ",
        "40",
        ", ",
        "30",
        ", ",
        "52",
        ", ",
        "0",
        "]]",
    ]
    box = parse_boxes(
        tokenizer.decode(tokenizer("<ref>ship</ref><box>[[12, 40, 30, 52, 0]]</box>")["input_ids"])
    )
    assert [(b.x1, b.y1, b.x2, b.y2, b.label) for b in box] == [(12, 40, 30, 52, "ship")]


def test_every_task_prompt_tokenizes_without_unknowns(tokenizer) -> None:
    from earthdial.model import prompts
    from earthdial.model.tokens import METHANE_UHI_ONLY

    for name, spec in prompts.TASKS.items():
        q = prompts.build_question(name, spec.default_prompt or "ship", spec.sensor)
        if any(tag in q for tag in METHANE_UHI_ONLY):
            continue  # tags of the Methane_UHI checkpoint, which the RGB-vocabulary demo refuses by name
        ids = tokenizer(q.replace("<image>", "<img></img>"), add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, name


@pytest.fixture(scope="module")
def fresh(tokenizer):
    model, cfg = train.build_model(tokenizer, seed=0)
    return model, cfg, train.make_engine(model, tokenizer, cfg)


def test_records_are_earthdial_conversations_and_match_the_engine_prompt(fresh) -> None:
    _, _, engine = fresh
    rng = np.random.default_rng(0)
    ex = train.make_examples("refer", 0, 0, 2, rng)[0]
    conv = ex.conversation
    assert [t["from"] for t in conv[:2]] == ["human", "gpt"] and conv[0]["value"].count("<image>") == 1
    assert conv[0]["value"].startswith("[refer] [")
    batch = train.collate([ex], engine)
    # the first turn's tokens are exactly the engine's prompt for that question
    from earthdial.model.engine import Query

    first = engine.prompt_text(Query(conv[0]["value"], [engine.image(im, ex.sensor) for im in ex.images]))
    prompt_ids = engine.tokenizer(first, add_special_tokens=False)["input_ids"]
    assert batch.input_ids[0, : len(prompt_ids)].tolist() == prompt_ids
    # loss only on answers: the first label is the first answer token
    lab = batch.labels[0]
    assert (lab[: len(prompt_ids) - 1] == -100).all() and lab[len(prompt_ids) - 1] != -100
    answer = engine.tokenizer.decode([t for t in lab.tolist() if t != -100])
    assert answer.startswith(conv[1]["value"] + "<|end|>")


def test_soft_number_targets_spread_over_neighbours(tokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids([str(n) for n in range(101)])
    loss = train.SoftNumberLoss(ids, len(tokenizer) + 10, sigma=1.5)
    logits = torch.full((1, 2, len(tokenizer) + 10), -20.0)
    labels = torch.tensor([[ids[50], -100]])
    logits[0, 0, ids[50]] = 20.0
    exact = loss(logits, labels)
    logits[0, 0, ids[50]], logits[0, 0, ids[52]] = -20.0, 20.0
    near = loss(logits, labels)
    logits[0, 0, ids[52]], logits[0, 0, ids[90]] = -20.0, 20.0
    far = loss(logits, labels)
    assert exact < near < far


def test_a_training_step_runs_and_the_loss_drops(tokenizer) -> None:
    torch.manual_seed(0)
    model, cfg = train.build_model(tokenizer, seed=1)
    train.attend_eagerly(model)
    engine = train.make_engine(model, tokenizer, cfg)
    tc = train.TrainConfig(batch_size=2, warmup_steps=1, lr=2e-3)
    batch = train.collate(train.make_examples("change", 0, 0, 2, np.random.default_rng(1)), engine)
    assert batch.look and batch.pair_look  # both look aids are in the loss
    loss_fn = train.SoftNumberLoss(
        tokenizer.convert_tokens_to_ids(list(train.NUMBERS)), model.config.text_config.vocab_size
    )
    aid = train.DenseAid(model.config.vision_config.hidden_size, model.config.text_config.hidden_size)
    opt = train.optimiser(model, tc, aid)
    losses = [train.train_step(model, batch, loss_fn, opt, tc, aid) for _ in range(5)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]


def test_absent_class_conversations_answer_with_no_box_then_find_what_is_there(fresh) -> None:
    _, _, engine = fresh
    examples = train.make_examples("absent", 0, 0, 8, np.random.default_rng(3))
    for ex in examples:
        first, answer = ex.conversation[0]["value"], ex.conversation[1]["value"]
        asked = first.split("<ref>")[1].split("</ref>")[0]
        present = {o.cls for o in ex.objects[0]}
        cls = next(c for c in synthetic.CLASSES if asked in train.SYNONYMS[c])
        assert answer == train.absent_answer(cls) and not parse_boxes(answer)
        assert cls not in present or not present  # asked about a class the scene lacks
        if present:  # then a follow-up about an object that is there, with its box
            assert parse_boxes(ex.conversation[3]["value"])
    assert any(not ex.objects[0] for ex in examples)  # some scenes emptied: open water, bare land
    batch = train.collate(examples, engine)
    assert (batch.labels != -100).any()


def test_a_continuation_run_starts_from_a_checkpoint(fresh, tmp_path) -> None:
    model, cfg, engine = fresh
    start = train.save_checkpoint(model, engine.tokenizer, cfg, tmp_path / "start")
    tc = train.continuation(str(start), minutes=2, steps=2, batch_size=2, check_every=0, threads=1)
    assert tc.mix == train.ABSENT_MIX and tc.dense_weight == 0 and tc.vision_share == 0
    _, _, pub, summary = train.train(tc, tmp_path / "next")
    assert summary["steps"] == 2 and summary["vision_steps"] == 0
    assert summary["continued_from"]["path"] == "start"
    assert (tmp_path / "next" / "model.safetensors").exists()


def test_saved_checkpoint_reloads_with_identical_logits(fresh, tmp_path) -> None:
    model, cfg, engine = fresh
    out = train.save_checkpoint(model, engine.tokenizer, cfg, tmp_path / "demo")
    loaded, tok, info = checkpoint.load(out)
    assert info.demo and info.image_size == 112 and info.tokens_per_tile == 16 and info.max_tiles == 1
    assert tok.get_vocab() == engine.tokenizer.get_vocab()
    batch = train.collate(train.make_examples("change", 0, 0, 2, np.random.default_rng(0)), engine)
    model.eval()
    with torch.no_grad():
        a = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits
        b = loaded(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# The shipped demo checkpoint
# ------------------------------------------------------------------------------------------------

shipped = pytest.mark.skipif(
    not (train.DEMO_DIR / "model.safetensors").exists(), reason="the demo checkpoint is not built yet"
)


@pytest.fixture(scope="module")
def demo_engine():
    from earthdial.model.engine import Engine

    return Engine(str(train.DEMO_DIR), device="cpu")


@shipped
def test_shipped_demo_is_small_and_says_it_is_the_demo(demo_engine) -> None:
    size = sum(p.stat().st_size for p in train.DEMO_DIR.iterdir())
    assert size <= 30 * 1024 * 1024
    d = demo_engine.describe()
    assert d["demo"] is True and d["image_size"] == 112 and d["tokens_per_tile"] == 16
    assert d["trained_tasks"] == list(checkpoint.DEMO_TASKS)


def test_the_demo_tasks_are_the_ones_its_training_mix_teaches() -> None:
    """checkpoint.DEMO_TASKS (what `status` says the demo model knows) follows the training recipe."""
    from earthdial.training import data

    kinds = set(data.DEFAULT_MIX) | set(data.ABSENT_MIX)
    taught = {"absent": {"refer"}, "describe": {"caption", "classify", "identify"}}
    assert set(checkpoint.DEMO_TASKS) == set().union(*(taught.get(k, {k}) for k in kinds))
    assert set(checkpoint.DEMO_TASKS) <= set(prompts.TASKS)


@shipped
def test_shipped_demo_finds_ships_through_the_server_path(demo_engine, tmp_path) -> None:
    """Held-out scenes (a seed training never used) written as GeoTIFFs and asked about by reference,
    as a client would: the returned box must overlap the true ship."""
    hits, tried = 0, 0
    for i in range(200):
        scene = synthetic.make_scene(train.EVAL_SEED + 1, i)
        ships = scene.of_class("ship")
        if not ships:
            continue
        path = synthetic.write_geotiff(tmp_path / f"ship_{i}.tif", synthetic.render(scene))
        reply = service.run(
            {"op": "ask", "task": "refer", "prompt": "ship", "source": source_by_reference(str(path))},
            [],
            demo_engine,
        )
        boxes = parse_boxes(reply["answer"])
        assert boxes, reply["answer"]
        assert reply["features"]["features"] and reply["features"]["crs"] == "EPSG:32633"
        hits += train.box_iou(boxes[0], train.truth_box(ships[0])) >= 0.5
        tried += 1
        if tried == 20:
            break
    # eval-demo measures the rate on 200 scenes; 20 are enough to catch a broken model or path
    assert hits >= 14, f"{hits} of {tried} ships found at IoU >= 0.5"  # the shipped model: 17


@shipped
def test_shipped_demo_sees_a_change(demo_engine, tmp_path) -> None:
    right = 0
    for i in range(20):
        pair = synthetic.make_pair(train.EVAL_SEED + 1, i)
        paths = [
            synthetic.write_geotiff(tmp_path / f"p{i}_{k}.tif", synthetic.render(s))
            for k, s in enumerate((pair.before, pair.after))
        ]
        reply = service.run(
            {"op": "ask", "task": "change", "sources": [source_by_reference(str(p)) for p in paths]},
            [],
            demo_engine,
        )
        right += reply["answer"].lower().startswith("yes") == bool(pair.changed)
    assert right >= 18, f"{right} of 20 pairs right"  # the acceptance: >= 90 % (the shipped model: 20)


@shipped
def test_shipped_demo_boxes_carry_scores_from_their_token_probabilities(demo_engine) -> None:
    from earthdial.model.engine import Query
    from earthdial.model.scoring import Answer

    scene = synthetic.make_scene(train.EVAL_SEED + 1, 3)
    image = demo_engine.image(synthetic.render(scene), "[hr_rgb_0.5]")
    asked = scene.objects[0].cls
    (answer,) = demo_engine.generate(
        [Query(prompts.build_question("refer", asked, "[hr_rgb_0.5]"), [image], 40)]
    )
    assert isinstance(answer, Answer) and len(answer.logprobs) == len(answer.ids) > 0
    scores = answer.box_scores()
    assert len(scores) == len(parse_boxes(answer)) >= 1
    assert all(0 < s <= 1 for s in scores)


@shipped
def test_shipped_demo_says_none_for_an_absent_class(demo_engine, tmp_path) -> None:
    none, tried = 0, 0
    for i in range(40):
        scene = synthetic.make_scene(train.EVAL_SEED + 1, i)
        missing = [c for c in synthetic.CLASSES if not scene.of_class(c)]
        if not missing:
            continue
        path = synthetic.write_geotiff(tmp_path / f"absent_{i}.tif", synthetic.render(scene))
        reply = service.run(
            {"op": "ask", "task": "refer", "prompt": missing[0], "source": source_by_reference(str(path))},
            [],
            demo_engine,
        )
        none += not parse_boxes(reply["answer"])
        tried += 1
        if tried == 20:
            break
    assert none >= MIN_ABSENT_NONE, f"{none} of {tried} absent-class questions answered with no box"


def test_serve_falls_back_to_the_shipped_demo() -> None:
    from earthdial.cli import model_choice

    found = (
        model_choice.demo_model()
    )  # the package ships the demo model: `earthdial serve` without --model uses it
    assert found == str(train.DEMO_DIR)
    assert (train.DEMO_DIR / "config.json").is_file() and (
        train.DEMO_DIR / "model.safetensors"
    ).stat().st_size > 1e6


# ------------------------------------------------------------------------------------------------
# Training aids and the number code
# ------------------------------------------------------------------------------------------------


def test_train_demo_writes_into_the_current_directory_never_the_installed_package(tmp_path) -> None:
    """Without --out, train-demo writes ./earthdial-demo-model (and --help says so); the shipped demo
    checkpoint is left as it was, and a second run refuses to write over the first one's folder."""
    import hashlib
    import subprocess

    from conftest import EARTHDIAL

    def shipped() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(train.DEMO_DIR.iterdir())}

    before = shipped()
    helped = subprocess.run([*EARTHDIAL, "train-demo", "--help"], capture_output=True, text=True, timeout=60)
    assert "./earthdial-demo-model" in "".join(helped.stdout.split()), helped.stdout  # wrapped at a hyphen
    argv = [*EARTHDIAL, "train-demo", "--steps", "1", "--minutes", "0.5", "--threads", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "earthdial-demo-model"
    assert (written / "config.json").is_file() and (written / "model.safetensors").is_file()
    assert shipped() == before
    again = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and "pass --out DIR" in again.stderr, again.stderr
    assert shipped() == before


def test_dense_targets_cover_every_cell_the_box_overlaps() -> None:
    ship = synthetic.SceneObject("ship", 0.30, 0.40, 0.30, 0.08, 0.0, (230.0, 230.0, 230.0))
    cls, box = train.dense_targets([ship])
    x1, y1, x2, y2 = ship.bounds()  # x 0.15-0.45, y ~0.36-0.44: columns 0-1 of row 1
    covered = sorted(int(i) for i in torch.nonzero(cls).flatten())
    assert covered == [4, 5]
    assert all(int(cls[i]) == 1 + synthetic.CLASSES.index("ship") for i in covered)
    assert torch.allclose(box[4], torch.tensor([x1, y1, x2, y2])) and torch.equal(box[4], box[5])
    assert float(box[0].abs().sum()) == 0.0


def test_pair_look_matches_each_later_token_with_the_same_cell(fresh) -> None:
    _, _, engine = fresh
    batch = train.collate(train.make_examples("change", 0, 0, 2, np.random.default_rng(3)), engine)
    assert len(batch.pair_look) == 2 * 16
    for row, position, (key,) in batch.pair_look:
        ids = batch.input_ids[row].tolist()
        slots = [i for i, t in enumerate(ids) if t == engine.image_token_id]
        assert position in slots[16:] and key == slots[slots.index(position) - 16]


def test_change_yes_looks_at_the_later_image_even_for_a_disappearance(fresh) -> None:
    # attention is causal: only the later image's tokens can have compared the two images
    _, _, engine = fresh
    index = next(
        i for i in range(200) if [w for w, _ in synthetic.make_pair(0, i).changed] == ["disappeared"]
    )
    examples = train.make_examples("change", 0, index, 2, np.random.default_rng(3))
    batch = train.collate(examples, engine)
    yes = engine.tokenizer.convert_tokens_to_ids("Yes")
    entries = [(row, pos, keys) for row, pos, keys in batch.look if int(batch.labels[row, pos]) == yes]
    assert len(entries) == 2  # one Yes per example
    for row, _, keys in entries:
        slots = [i for i, t in enumerate(batch.input_ids[row].tolist()) if t == engine.image_token_id]
        ((image, obj),) = examples[row].focus[0]
        assert image == 0  # the object is drawn in the earlier image...
        assert keys == [slots[16 + c] for c in train._cells_of(obj)]  # ...the Yes looks at the later one


def test_number_code_turns_a_linear_read_into_the_right_number(tokenizer) -> None:
    model, _ = train.build_model(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(list(train.NUMBERS))
    rows = model.lm_head.weight.detach()[ids]
    for value in (0, 7, 38, 64, 100):
        h = torch.zeros(rows.shape[1])
        h[-2], h[-1] = 3.0 * value / 100, 3.0  # (c * v, c) for any scale c
        assert int(torch.argmax(rows @ h)) == value


def test_sample_scene_truth_names_its_crs_as_gdal_reads_it(tmp_path) -> None:
    """The truth GeoJSON holds the scene's CRS coordinates, so it must say so in a way GDAL (and so QGIS)
    reads: a file GDAL takes for EPSG:4326 turns a QGIS project to 4326 when added first."""
    import pyogrio

    from earthdial.demo import samples

    for crs in ("EPSG:32633", "EPSG:3857"):
        path = samples.write_sample_scene(tmp_path / f"s_{crs[5:]}.tif", crs=crs)
        info = pyogrio.read_info(samples.truth_path(path))
        assert info["crs"] == crs, (crs, info["crs"])
        assert info["features"] == len(samples.sample_scene().objects)


def test_sample_scene_truth_lies_on_the_drawn_objects(tmp_path) -> None:
    import json

    import rasterio
    from rasterio.features import rasterize
    from shapely.geometry import shape

    from earthdial.demo import samples

    for crs in ("EPSG:32633", "EPSG:3857"):
        path = samples.write_sample_scene(tmp_path / f"s_{crs[5:]}.tif", crs=crs)
        truth = json.loads(samples.truth_path(path).read_text())
        scene = samples.sample_scene()
        _, labels = synthetic.render_with_labels(scene, 448)
        with rasterio.open(path) as src:
            assert src.crs.to_string() == crs and (src.width, src.height) == (448, 448)
            transform = src.transform
        assert [f["properties"]["class"] for f in truth["features"]] == [o.cls for o in scene.objects]
        assert "ship" in [f["properties"]["class"] for f in truth["features"]]
        for feature, obj in zip(truth["features"], scene.objects, strict=True):
            drawn = rasterize([(shape(feature["geometry"]), 1)], out_shape=(448, 448), transform=transform)
            mine = labels == 1 + synthetic.CLASSES.index(obj.cls)
            overlap = (drawn.astype(bool) & mine).sum() / mine.sum()
            assert overlap > 0.9, (crs, obj.cls, overlap)  # the outline holds the object's pixels
            assert feature["properties"]["box"] == list(obj.box100())
