import io
import json
import os
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from lightclip import shapes
from lightclip.shapes import (
    COLOURS,
    HELD_OUT_COMBINATIONS,
    SHAPES,
    make_shapes_dataset,
    shapes_zero_shot_tasks,
)


@pytest.fixture(scope="module")
def train():
    return make_shapes_dataset("train", num_samples=600, use_cache=False)


@pytest.fixture(scope="module")
def test():
    return make_shapes_dataset("test", num_samples=300, use_cache=False)


def _objects(row):
    return json.loads(row["objects"])


def _image_bytes(dataset):
    return [d["bytes"] for d in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


def test_deterministic():
    a = make_shapes_dataset("train", num_samples=30, seed=3, use_cache=False)
    b = make_shapes_dataset("train", num_samples=30, seed=3, use_cache=False)
    assert _image_bytes(a) == _image_bytes(b)
    assert a["captions"] == b["captions"]
    c = make_shapes_dataset("train", num_samples=30, seed=4, use_cache=False)
    assert not set(_image_bytes(a)) & set(_image_bytes(c))


def test_splits_disjoint(train, test):
    assert not set(_image_bytes(train)) & set(_image_bytes(test))
    assert len(set(_image_bytes(train))) == len(train)


def test_held_out_compositions(train, test):
    held_out = {tuple(c) for c in HELD_OUT_COMBINATIONS}
    assert len(held_out) >= 4
    for row in train:
        assert not any((o["colour"], o["shape"]) in held_out for o in _objects(row))
        assert row["composition_seen"]
    unseen = 0
    for row in test:
        has_held_out = any((o["colour"], o["shape"]) in held_out for o in _objects(row))
        assert row["composition_seen"] == (not has_held_out)
        unseen += has_held_out
    assert 0.3 * len(test) < unseen < 0.7 * len(test)
    main_combos = {(COLOURS[r["colour"]], SHAPES[r["shape"]]) for r in test if not r["composition_seen"]}
    assert main_combos == held_out  # every held-out combination is tested


def _words(table):
    return "|".join(sorted((w for ws in table.values() for w in ws), key=len, reverse=True))


def test_captions_match_drawn_objects(test):
    size_re, shape_re, colour_re = _words(shapes.SIZE_WORDS), _words(shapes.SHAPE_WORDS), "|".join(COLOURS)
    rel_re = _words(shapes.RELATION_WORDS)
    shape_of = {w: s for s, ws in shapes.SHAPE_WORDS.items() for w in ws}
    size_of = {w: s for s, ws in shapes.SIZE_WORDS.items() for w in ws}
    relation_of = {w: r for r, ws in shapes.RELATION_WORDS.items() for w in ws}
    phrase = rf"(?:an? )?(?:({size_re}) )?({colour_re}) ({shape_re})"
    checked_relations = checked_positions = main_only = one_attribute = 0
    for row in test:
        objects = _objects(row)
        drawn = {(o["colour"], o["shape"]): o for o in objects}
        assert len(row["captions"]) >= 2 and len(set(row["captions"])) == len(row["captions"])
        assert row["text"] == row["captions"][0]
        for caption in row["captions"]:
            one = re.fullmatch(rf"an? ({size_re}) (?:({colour_re}) (?:shape|thing|object)|({shape_re}))"
                               r"(?: with (?:a smaller shape|smaller shapes))?", caption)
            if one:  # the main object by its size and one attribute
                size, colour, shape_word = one.groups()
                assert size_of[size] == objects[0]["size"], caption
                assert (colour == objects[0]["colour"] if colour
                        else shape_of[shape_word] == objects[0]["shape"]), caption
                one_attribute += 1
                continue
            mentioned = re.findall(phrase, caption)
            assert mentioned, caption
            for size, colour, shape_word in mentioned:
                obj = drawn[(colour, shape_of[shape_word])]  # KeyError: an object that is not in the picture
                assert size == "" or size_of[size] == obj["size"], caption
            # the main object is named in every caption, sometimes alone in a picture of several objects
            assert (objects[0]["colour"], objects[0]["shape"]) in {(c, shape_of[s]) for _, c, s in mentioned}
            main_only += len(objects) > 1 and len(mentioned) == 1
            for match in re.finditer(rf"{phrase} ({rel_re}) {phrase}", caption):
                a, b = drawn[(match[2], shape_of[match[3]])], drawn[(match[6], shape_of[match[7]])]
                dx, dy = a["x"] - b["x"], a["y"] - b["y"]
                expected = (("above" if dy < 0 else "below") if abs(dy) > abs(dx)
                            else ("left of" if dx < 0 else "right of"))
                assert relation_of[match[4]] == expected, caption
                checked_relations += 1
            if len(objects) == 1 and "on the left" in caption:
                assert objects[0]["x"] < 1 / 3 and 1 / 3 <= objects[0]["y"] <= 2 / 3
                checked_positions += 1
            if len(objects) == 1 and "at the top" in caption:
                assert objects[0]["y"] < 1 / 3 and 1 / 3 <= objects[0]["x"] <= 2 / 3
                checked_positions += 1
    assert checked_relations > 50 and checked_positions > 5 and main_only > 50 and one_attribute > 50


def test_pixels_match_metadata(test):
    for row in test.select(range(60)):
        image = np.asarray(row["image"].convert("RGB"), dtype=int)
        assert image.shape == (64, 64, 3)
        for obj in _objects(row):
            x, y = int(obj["x"] * 64), int(obj["y"] * 64)
            assert np.abs(image[y, x] - np.array(obj["rgb"])).max() <= 3, (obj, image[y, x])
        # the main object is the largest
        radii = [o["radius"] for o in _objects(row)]
        assert radii[0] == max(radii)


def test_labels_and_columns(train):
    assert train.features["shape"].names == list(SHAPES) and len(SHAPES) >= 6
    assert train.features["colour"].names == list(COLOURS) and len(COLOURS) >= 8
    assert set(train["shape"]) == set(range(len(SHAPES)))
    assert min(train["colour"]) >= 0 and max(train["colour"]) < len(COLOURS)
    assert train["index"] == list(range(len(train)))
    assert sum(n == 1 for n in train["num_objects"]) > 0.35 * len(train)
    for row in train.select(range(20)):
        assert SHAPES[row["shape"]] == _objects(row)[0]["shape"]
        assert COLOURS[row["colour"]] == _objects(row)[0]["colour"]


def test_zero_shot_tasks():
    tasks = shapes_zero_shot_tasks()
    assert set(tasks) == {"shape", "colour"}
    assert tasks["shape"]["classnames"] == list(SHAPES) and tasks["colour"]["classnames"] == list(COLOURS)
    for task in tasks.values():
        assert all("{}" in t for t in task["templates"]) and len(task["templates"]) >= 2


def test_cache_roundtrip_and_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path))
    first = make_shapes_dataset("test", num_samples=20)
    (entry,) = os.listdir(tmp_path / "shapes")
    cached = make_shapes_dataset("test", num_samples=20)
    assert cached.cache_files and str(tmp_path) in cached.cache_files[0]["filename"]
    assert _image_bytes(cached) == _image_bytes(first)
    for name in os.listdir(tmp_path / "shapes" / entry):  # corrupt the arrow data
        if name.endswith(".arrow"):
            (tmp_path / "shapes" / entry / name).write_bytes(b"garbage")
    again = make_shapes_dataset("test", num_samples=20)
    assert _image_bytes(again) == _image_bytes(first)
    assert os.listdir(tmp_path / "shapes") == [entry]  # rewritten in place, no temporary left behind
    Image.open(io.BytesIO(_image_bytes(again)[0])).verify()


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_shapes_dataset("validation", use_cache=False)
