"""parse_boxes on answers in the shapes EarthDial, GeoChat and InternVL2 write, and on broken ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earthdial.model.answers import Box, parse_boxes


def B(x1, y1, x2, y2, angle=0.0, label=None):
    return Box(float(x1), float(y1), float(x2), float(y2), float(angle), label)


CORPUS = [
    # --- EarthDial / GeoChat form, 0-100 with an angle ---------------------------------------------
    ("[[20, 30, 40, 60, 0]]", [B(20, 30, 40, 60)]),
    ("<box>[[7, 22, 14, 31, 0]]</box>", [B(7, 22, 14, 31)]),
    ("[[50, 50, 60, 70, 45]]", [B(50, 50, 60, 70, 45)]),
    # referring: several boxes as separate lists
    ("[[1, 2, 3, 4, 0]][[5, 6, 7, 8, 90]]", [B(1, 2, 3, 4), B(5, 6, 7, 8, 90)]),
    ("<box>[[1, 2, 3, 4, 0]][[5, 6, 7, 8, 0]]</box>", [B(1, 2, 3, 4), B(5, 6, 7, 8)]),
    # grounding: several boxes in one list, often untagged
    ("[[10, 10, 20, 20, 0], [30, 30, 40, 40, 15]]", [B(10, 10, 20, 20), B(30, 30, 40, 40, 15)]),
    # triple brackets, as in grounded descriptions
    (
        "<ref>1 tan medium pool </ref> <box>[[[81, 22, 100, 42, 0]]]</box> located at right",
        [B(81, 22, 100, 42, 0, "1 tan medium pool")],
    ),
    # one label for the whole group
    (
        "<ref>2 ships</ref><box>[[1,2,3,4,0],[5,6,7,8,0]]</box>",
        [B(1, 2, 3, 4, 0, "2 ships"), B(5, 6, 7, 8, 0, "2 ships")],
    ),
    # two labelled groups in a grounded description
    (
        "The image shows <ref>a large white ship</ref> <box>[[12, 40, 30, 48, 10]]</box> docked next to "
        "<ref>2 small boats</ref> <box>[[60, 10, 64, 14, 0], [70, 12, 74, 16, 0]]</box> at the top.",
        [
            B(12, 40, 30, 48, 10, "a large white ship"),
            B(60, 10, 64, 14, 0, "2 small boats"),
            B(70, 12, 74, 16, 0, "2 small boats"),
        ],
    ),
    # a label is used by the group right after it only; a later bare group has none
    (
        "<ref>pool</ref> [[1, 1, 2, 2, 0]] and also some trees [[3, 3, 4, 4, 0]]",
        [B(1, 1, 2, 2, 0, "pool"), B(3, 3, 4, 4)],
    ),
    # the nearest preceding ref wins; text between ref and box is fine
    ("<ref>a</ref> <ref> b </ref> is located at <box>[[1, 1, 2, 2, 0]]</box>", [B(1, 1, 2, 2, 0, "b")]),
    # floats, negatives, out-of-range values clamp; swapped corners are put in order
    ("[[10.5, 20.25, 30.75, 40.0, 12.5]]", [B(10.5, 20.25, 30.75, 40.0, 12.5)]),
    ("[[-5, 20, 110, 140, 0]]", [B(0, 20, 100, 100)]),
    ("[[40, 60, 20, 30, -30]]", [B(20, 30, 40, 60, -30)]),
    ("[[1e2, 5e1, 2.5e1, 0.5e1, 0]]", [B(25, 5, 100, 50)]),
    # --- stock InternVL2 form: 4 numbers on 0-1000 -------------------------------------------------
    ("<ref>car</ref><box>[[100, 200, 300, 450]]</box>", [B(10, 20, 30, 45, 0, "car")]),
    (
        "<ref>houses</ref><box>[[0, 0, 1000, 1000], [250, 500, 755, 999]]</box>",
        [B(0, 0, 100, 100, 0, "houses"), B(25, 50, 75.5, 99.9, 0, "houses")],
    ),
    ("[[0, 0, 2000, 1500]]", [B(0, 0, 100, 100)]),
    # --- malformed, truncated or without boxes ----------------------------------------------------
    ("", []),
    ("A harbour with many boats.", []),
    ("no", []),
    ("[[1, 2, 3]]", []),  # three numbers
    ("[[1, 2, 3, 4, 5, 6]]", []),  # six numbers
    ("[[20, 30, 40, 60, 0", []),  # truncated before the closing brackets
    ("<box>[[20, 30, 40", []),
    # truncated after a complete first list: the complete one is kept
    ("[[1, 2, 3, 4, 0], [5, 6, 7", [B(1, 2, 3, 4)]),
    ("<ref>ship</ref><box>[[1, 2, 3, 4, 0]][[5, 6", [B(1, 2, 3, 4, 0, "ship")]),
    ("[[a, b, c, d, e]]", []),
    ("[[1, 2, , 4, 0]]", []),
    ("[[1 2 3 4 0]]", []),
    ("[[nan, 1, 2, 3, 0]]", []),
    ("[[inf, 1, 2, 3, 0]]", []),
    ("[[1e400, 1, 2, 3, 0]]", []),  # overflows to infinity
    ("[[99999999999, 1, -99999999999, 3, 7]]", [B(0, 1, 100, 3, 7)]),  # huge but finite: clamped
    ("[[1, 2, [3, 4], 5]]", []),  # nested garbage
    ("[[[[[[10, 10, 20, 20, 0]]]]]]", [B(10, 10, 20, 20)]),
    ("]]]][[ [[10, 10, 20, 20, 0]] ]", [B(10, 10, 20, 20)]),
    ("[1, 2, 3, 4, 0]", []),  # a single bracket in prose is not a box
    ("<box>[1, 2, 3, 4, 0]</box>", [B(1, 2, 3, 4)]),  # ... but inside box tags it is
    ("<ref>unterminated [[1, 2, 3, 4, 0]]", [B(1, 2, 3, 4)]),
    ("<ref></ref><box>[[1, 2, 3, 4, 0]]</box>", [B(1, 2, 3, 4)]),  # empty label -> None
    ("</box>]]<box></box><ref>x</ref>[[]]", []),
]


@pytest.mark.parametrize(("text", "expected"), CORPUS, ids=[str(i) for i in range(len(CORPUS))])
def test_parse_boxes_corpus(text, expected):
    assert parse_boxes(text) == expected


def test_corpus_covers_every_form_of_answer():
    """The corpus holds each form the parser must read (a pruned corpus would pass the test above while
    leaving a form untested), and no input twice."""
    texts = [text for text, _ in CORPUS]
    assert len(set(texts)) == len(texts)
    boxes = [b for _, expected in CORPUS for b in expected]
    assert any(b.angle != 0 for b in boxes)  # EarthDial's rotated boxes
    assert any(b.label for b in boxes) and any(b.label is None for b in boxes)  # <ref> labels, and none
    assert any("[[" in t and t.count(",") == 3 and "<ref>" in t for t in texts)  # InternVL's 0-1000 boxes
    assert any(len(expected) > 1 for _, expected in CORPUS)  # several boxes in one answer
    assert sum(1 for _, expected in CORPUS if not expected) >= 10  # malformed, truncated, none at all
    assert any(t.startswith("[[[") or "[[[" in t for t in texts)  # nested brackets


def test_non_string_input_gives_no_boxes():
    assert parse_boxes(None) == []  # type: ignore[arg-type]
    assert parse_boxes(b"[[1, 2, 3, 4, 0]]") == []  # type: ignore[arg-type]


def test_negative_zero_is_normalised():
    (box,) = parse_boxes("[[-0.0, -3, 10, 10, 0]]")
    assert box.x1 == 0.0 and str(box.x1) == "0.0"
    assert box.y1 == 0.0 and str(box.y1) == "0.0"


def test_box_is_frozen():
    box = B(1, 2, 3, 4)
    with pytest.raises(AttributeError):
        box.x1 = 5  # type: ignore[misc]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["[", "]", ", ", "<ref>", "</ref>", "<box>", "</box>", "ship", "7", "-2.5", "1e400", "250"]
        )
        | st.text(max_size=3),
        max_size=40,
    ).map("".join)
)
def test_never_raises_and_boxes_are_ordered_and_in_range(text):
    for box in parse_boxes(text):
        assert 0 <= box.x1 <= box.x2 <= 100
        assert 0 <= box.y1 <= box.y2 <= 100


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(*[st.integers(0, 100)] * 4, st.integers(0, 90)),
        min_size=1,
        max_size=5,
    )
)
def test_written_boxes_are_read_back(rows):
    text = "<box>[" + ", ".join("[" + ", ".join(str(v) for v in row) + "]" for row in rows) + "]</box>"
    expected = [B(min(a, c), min(b, d), max(a, c), max(b, d), e) for a, b, c, d, e in rows]
    assert parse_boxes(text) == expected
