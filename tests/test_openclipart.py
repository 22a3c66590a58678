"""The Open Clip Art source and benchmark (`lightclip.openclipart`) on a small collection made here in the package's
layout (PNG + SVG at the same relative paths, some transparent, one corrupt, one tiny, one blank, one duplicate, one
link), and on the real Debian package when it is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightclip import openclipart
from lightclip.data import detect_source_kind, load_image_text_dataset
from lightclip.images import load_rgb_image
from lightclip.openclipart import (
    ClipArtMetadata,
    clean_keywords,
    clean_title,
    find_root,
    folder_words,
    load_openclipart,
    make_captions,
    openclipart_zero_shot_tasks,
    read_svg_metadata,
    split_of,
)

ROOT = Path(__file__).resolve().parents[1]

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>Nicu Buculei</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
</svg>
"""

# (folder, count, title, keywords): three classes of 4 pictures; the dogs are transparent
FOLDERS = [
    ("animals/mammals/dogs", 4, "Copper the Beagle", ["mammal", "dog", "hash", "nicu buculei"]),
    ("food/fruit", 4, "Orange Slice", ["food", "fruit", "orange"]),
    ("computer/icons/flat-theme/action", 4, "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)",
     ["hash", "action", "computer", "icons", "theme"]),
]


def _picture(seed: int, mode: str) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = np.zeros((40, 60), dtype=np.uint8)
        alpha[10:30, 15:45] = 255  # opaque in the middle, transparent around
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    return image


def make_collection(root: Path) -> Path:
    """A collection of 12 usable pictures and 5 files to skip, in the Debian package's layout."""
    for folder, count, title, keywords in FOLDERS:
        (root / "png" / folder).mkdir(parents=True, exist_ok=True)
        (root / "svg" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"{folder.split('/')[-1]}_{i:02d}"
            mode = "RGBA" if folder.startswith("animals") else "RGB"
            _picture(hash((folder, i)) % 2**32, mode).save(root / "png" / folder / f"{name}.png")
            items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
            (root / "svg" / folder / f"{name}.svg").write_text(SVG.format(title=title, keywords=items))
    fruit = root / "png" / "food" / "fruit"
    (fruit / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    Image.new("RGB", (8, 8), "red").save(fruit / "tiny.png")
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(fruit / "blank.png")  # all transparent: white once composited
    (fruit / "zz_copy.png").write_bytes((fruit / "fruit_00.png").read_bytes())  # the same file under another name
    os.symlink("fruit/fruit_01.png", root / "png" / "food" / "linked.png")  # filed twice: listed once
    return root


@pytest.fixture()
def collection(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(openclipart, "MIN_CLASS_PICTURES", 3)
    monkeypatch.setattr(openclipart, "TEST_PERCENT", 30)
    return make_collection(tmp_path / "openclipart")


def test_titles_lose_their_boilerplate():
    assert clean_title("Orange Slice") == "Orange Slice"
    assert clean_title("red telephone") == "red telephone"
    assert clean_title("Clipart by Nicu Buculei - contour_chipmunk") == "contour chipmunk"
    assert clean_title("Clipart by Nicu Buculei - fc23") is None  # a file name without a word
    assert clean_title("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)") is None
    for boilerplate in ("Etiquette Icons", "gramastar", "Lemon SVG theme", "SVG Road Signs", "blueberry - iconset",
                        "R16 sibmission", "Various Cliparts", "", None):
        assert clean_title(boilerplate) is None, boilerplate
    assert clean_title("Tigre05") == "Tigre"
    assert clean_title("Historic - Belarus") == "Historic Belarus"


def test_keywords_keep_words_about_the_picture():
    keywords = ["hash", "mammal", "dog", "Dog", "magick", "lemon_theme_icon", "mapsym", "nicu buculei", "big_cat",
                "snu@autistici.org", "beagle,http://example.org"]
    assert clean_keywords(keywords, creator="Nicu Buculei") == ["mammal", "dog", "big cat", "beagle"]
    assert clean_keywords(keywords, creator="Nicu Buculei", exclude=["Copper the Beagle"]) == ["mammal", "dog",
                                                                                                "big cat"]


def test_captions_name_title_folder_and_keywords():
    metadata = ClipArtMetadata(title="Copper the Beagle", keywords=("mammal", "dog", "hash"), creator="Gerald G.")
    assert make_captions("animals/mammals/dogs", metadata) == [
        "Copper the Beagle, animals mammals dogs clip art", "Copper the Beagle",
        "animals mammals dogs clip art: mammal, dog"]
    # a boilerplate title leaves the folder words; no keyword left leaves no keyword caption
    icons = ClipArtMetadata(title="Etiquette Icons", keywords=("hash", "icons"))
    assert make_captions("computer/buttons", icons) == ["computer buttons clip art"]
    assert folder_words("signs_and_symbols/flags/africa") == "signs and symbols flags africa"
    assert folder_words("food/meats_and_eggs") == "food meats and eggs"


def test_svg_metadata_is_read(tmp_path):
    path = tmp_path / "x.svg"
    path.write_text(SVG.format(title="Orange Slice", keywords="<rdf:li>fruit</rdf:li><rdf:li> </rdf:li>"))
    assert read_svg_metadata(path) == ClipArtMetadata("Orange Slice", ("fruit",), "Nicu Buculei")
    (tmp_path / "bad.svg").write_text("<svg><metadata>")
    assert read_svg_metadata(tmp_path / "bad.svg") == ClipArtMetadata()
    assert read_svg_metadata(tmp_path / "missing.svg") == ClipArtMetadata()


def test_split_is_a_stable_hash_of_the_path():
    paths = [f"animals/dogs/dog_{i}.png" for i in range(4000)]
    splits = [split_of(p) for p in paths]
    assert splits == [split_of(p) for p in paths]
    share = splits.count("test") / len(splits)
    assert abs(share - openclipart.TEST_PERCENT / 100) < 0.02
    # known values, as the shipped checkpoints were split: the pictures of examples/images are test pictures (their
    # README says so), the beagle a training one
    for path in ("animals/mammals/pig_marcelo_caiafa1.png", "food/fruit/cherry_jonathan_dietrich_01.png",
                 "transportation/bus_01.png", "signs_and_symbols/flags/europe/norway/norway.png"):
        assert split_of(path) == "test", path
    assert split_of("animals/mammals/dogs/beagle_copper_ganson.png") == "train"
    script = "from lightclip.openclipart import split_of; print([split_of(f'a/{i}.png') for i in range(50)])"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert other == str([split_of(f"a/{i}.png") for i in range(50)])


def test_collection_loads_with_counted_skips_white_backgrounds_and_classes(collection):
    train, test = load_openclipart("train", collection), load_openclipart("test", collection)
    files = sorted(list(train["file"]) + list(test["file"]))
    expected = sorted(f"{folder}/{folder.split('/')[-1]}_{i:02d}.png" for folder, count, _, _ in FOLDERS
                      for i in range(count))
    assert files == expected  # the link is listed at its target, the copy, tiny, blank and corrupt files are not
    assert len(test) > 0 and len(train) > 0
    assert all(split_of(f) == "test" for f in test["file"]) and all(split_of(f) == "train" for f in train["file"])
    assert openclipart.openclipart_skips(collection) == {"duplicate picture": 1, "tiny image": 1, "blank image": 1,
                                                         "unreadable image": 1}
    assert train.features["category"].names == ["animals", "computer", "food"]
    assert train.features["subcategory"].names == ["animals/mammals/dogs", "computer/icons/flat-theme/action",
                                                   "food/fruit"]
    for row in list(train) + list(test):
        image = load_rgb_image(row["image"])
        assert image.size == (60, 60)  # 60 x 40 squared on white, not enlarged past its longer side
        if row["folder"].startswith("animals"):
            assert image.getpixel((2, 2)) == (255, 255, 255)  # transparency composited on white
        names = train.features["category"].names
        assert names[row["category"]] == row["folder"].split("/")[0]
        if row["folder"].startswith("computer"):
            # the collection title is boilerplate; the keywords are tooling or said by the folder already
            assert row["captions"] == ["computer icons flat theme action clip art"]
    assert list(test["index"]) == list(range(len(test)))


def test_collection_is_cached_once_and_bounded_in_size(collection, monkeypatch):
    first = load_openclipart("train", collection, image_size=32)
    assert max(load_rgb_image(first[0]["image"]).size) == 32

    def fail(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(openclipart, "build_openclipart", fail)
    again = load_openclipart("train", collection, image_size=32)
    assert list(again["file"]) == list(first["file"]) and list(again["captions"]) == list(first["captions"])
    with pytest.raises(AssertionError, match="built again"):  # another size is another build
        load_openclipart("train", collection, image_size=48)


def test_missing_package_names_the_install_command_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(openclipart.ROOT_ENV, str(tmp_path / "nowhere"))
    for load in (lambda: load_openclipart("train"), lambda: load_image_text_dataset("openclipart", "train")):
        with pytest.raises(FileNotFoundError, match="apt-get install -y openclipart-png openclipart-svg"):
            load()
    assert not (tmp_path / "cache").exists()
    half = tmp_path / "half"
    (half / "png").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no svg/"):
        find_root(half)


def test_data_source_kind_and_standard_columns(collection):
    assert detect_source_kind("openclipart") == "openclipart"
    assert detect_source_kind(str(collection)) == "openclipart"
    train = load_image_text_dataset(str(collection), "train")
    assert {"image", "captions", "index", "category"} <= set(train.column_names)
    assert train[0]["image"]["bytes"] is not None  # undecoded, as every source
    assert load_image_text_dataset(str(collection), "train", max_samples=2).num_rows == 2


def test_zero_shot_tasks_have_readable_labels(collection):
    tasks = openclipart_zero_shot_tasks(load_openclipart("test", collection))
    assert tasks["category"]["classnames"] == ["animals", "computer", "food"]
    # the release's sub-folders by their common names; one it does not have by its words
    assert tasks["subcategory"]["classnames"] == ["animals mammals dogs", "flat action icons", "fruit"]
    assert "a clip art of {}." in tasks["category"]["templates"]


def test_benchmark_scores_every_task(collection):
    from conftest import make_model

    from lightclip import LightClipProcessor
    from lightclip.openclipart import evaluate_openclipart

    model = make_model()
    processor = LightClipProcessor.from_config(model.config)
    results = evaluate_openclipart(model, processor, source=str(collection))
    for key in ("openclipart/category/acc1", "openclipart/subcategory/acc1", "openclipart/linear_probe/category/acc1",
                "openclipart/retrieval/image_retrieval_recall@1", "openclipart/retrieval/text_retrieval_recall@5"):
        assert 0.0 <= results[key] <= 1.0, key
    test = load_openclipart("test", collection)
    assert results["openclipart/category/num_images"] == len(test)
    assert results["openclipart/retrieval/num_texts"] == len(test)  # one caption, the first, per picture
    assert results["openclipart/category/num_classes"] == 3


def test_tiny_training_run_on_the_collection(collection, tmp_path, monkeypatch):
    """`examples/pretrain.py --train_data <folder>` trains, evaluates on the benchmark and writes a card (in this
    process, so that the fixture's class threshold holds)."""
    import importlib.util

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("pretrain_under_test", ROOT / "examples" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, pretrain)  # its dataclasses look their module up
    spec.loader.exec_module(pretrain)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--model", "lightclip-xxs", "--train_data", str(collection)])
    results = pretrain.main(["--model", "lightclip-xxs", "--train_data", str(collection), "--max_train_steps", "2",
                             "--per_device_train_batch_size", "4", "--logging_steps", "1", "--cpu_threads", "1",
                             "--output_dir", str(out)])
    assert 0.0 <= results["openclipart/category/acc1"] <= 1.0
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["step"] == 2 and saved["train_runtime"] > 0 and saved["train_samples_per_second"] > 0
    assert saved["environment"]["torch"] and "openclipart/linear_probe/category/acc1" in saved
    train_config = json.loads((out / "train_config.json").read_text())
    assert train_config["command"] == (
        f"accelerate launch examples/pretrain.py --model lightclip-xxs --train_data {collection}")
    card = (out / "README.md").read_text()
    assert "Open Clip Art Library 0.18" in card and "zero-shot category top-1" in card


@pytest.mark.skipif(not os.path.isdir(os.path.join(openclipart.DEFAULT_ROOT, "svg")),
                    reason="the Open Clip Art packages are not installed (apt-get install -y openclipart-png "
                           "openclipart-svg)")
def test_the_installed_package_reads(tmp_path, monkeypatch):
    """Two real folders of the package (linked into a small collection of the same layout, so the test stays fast):
    real PNG modes, real SVG metadata, real captions."""
    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path / "cache"))
    real = Path(openclipart.DEFAULT_ROOT)
    root = tmp_path / "subset"
    for kind in ("png", "svg"):
        (root / kind / "food").mkdir(parents=True)
        os.symlink(real / kind / "food" / "fruit", root / kind / "food" / "fruit")
    rows = list(load_openclipart("train", root)) + list(load_openclipart("test", root))
    assert len(rows) >= 60
    with_title = [r for r in rows if openclipart.clean_title(r["title"])]
    assert len(with_title) > len(rows) / 2
    assert all(r["captions"][0].endswith("food fruit clip art") for r in rows)
    assert all(max(load_rgb_image(r["image"]).size) <= openclipart.DEFAULT_IMAGE_SIZE for r in rows)
