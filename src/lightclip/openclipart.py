"""The Open Clip Art Library (release 0.18) as a real captioned image-text source and benchmark.

Debian ships the library as two packages (`apt-get install -y openclipart-png openclipart-svg`): PNG renders under
`/usr/share/openclipart/png/` and the same pictures as SVG under `.../svg/`, at the same relative paths, in a folder
tree of 22 top-level categories (`animals/mammals/dogs/...`). The SVGs carry human-written Dublin Core metadata: a
title and keywords. This module pairs each PNG with its SVG's metadata, writes captions from the title, the keywords
and the folder words with the boilerplate removed (`make_captions`; rules and examples in docs/data.md), composites
transparency on white, bounds and squares each picture on white (`prepare_image`), drops duplicates, tiny and blank
pictures as counted skips, and splits by a hash of the file's path (`split_of`). The result is cached once per
(collection, image size) under `lightclip.datacache.cache_root()` like `shapes`.

`--train_data openclipart` reads the installed package (or `$OPENCLIPART_ROOT`); any folder holding `png/` and `svg/`
in the same layout is read the same way (`--train_data path/to/folder`). `evaluate_openclipart` is the benchmark:
zero-shot top-1 over the top-level categories and over the sub-folders with enough pictures, retrieval between test
pictures and their captions, and a linear probe on the categories.

The library is a public-domain dedication (Debian's copyright file for the packages).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .datacache import cache_root, load_cached, read_marker, save_atomically
from .images import UnreadableImageError, load_rgb_image

logger = logging.getLogger(__name__)

# Bump when the captions, pictures, split or classes change: it is part of the cache fingerprint.
BUILD_VERSION = 3

SOURCE_NAMES = ("openclipart", "open-clip-art")
DATASET_ID = "openclipart-0.18"
DEFAULT_ROOT = "/usr/share/openclipart"
ROOT_ENV = "OPENCLIPART_ROOT"
INSTALL_COMMAND = "apt-get install -y openclipart-png openclipart-svg"
DEFAULT_IMAGE_SIZE = 128
# Percent of the pictures in the test split, chosen by a hash of the file's relative path.
TEST_PERCENT = 15
# A picture smaller than this on either side is skipped: too small to show anything at the models' sizes.
MIN_SIDE = 16
# A zero-shot class needs this many pictures in the whole collection (train and test).
MIN_CLASS_PICTURES = 30
# Top-level folders that name no visual concept: never zero-shot classes.
NOT_A_CLASS = ("unsorted", "special")

_NS = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
       "cc": "http://web.resource.org/cc/"}

# Titles that describe a collection, a theme or an author instead of the picture (matched case-insensitively).
BOILERPLATE_TITLES = (
    r"part of the .* collection.*", r".*\bcollection\b.*\b(by|\d{4})\b.*", r".*\btheme\b", r".*\biconset\b.*",
    r"etiquette icons", r"gramastar", r"various clip ?arts?", r"svg\b.*", r".*\bs[iu]bmission\b.*",
    r"aiga_symbol_signs", r"untitled.*", r"(clip ?art|icons?|image|drawing|picture)s?", r"new document.*",
)
# "Clipart by <author> - <name>": the name after the dash is the picture's own (often its file name).
_CREDIT_TITLE = re.compile(r"^\s*clip ?art by [^-]+-\s*(?P<name>.*)$", re.IGNORECASE)
# Keywords that say nothing about the picture: tooling, collections, and the catch-all folders.
STOP_KEYWORDS = frozenset({
    "hash", "magick", "theme", "unsorted", "special", "icon", "icons", "appicon", "clipart", "clip art", "image",
    "images", "svg", "png", "media", "externalsource", "united_nations_member", "iconic", "schema", "remix",
    "signs_and_symbols", "public domain", "openclipart", "work", "shapes",
})
_STOP_KEYWORD_PATTERNS = (re.compile(r".*_theme_icon$"), re.compile(r"^\w+sym$"))

# Zero-shot class names of the sub-folders of release 0.18 with enough pictures: common names that the captions need
# not say ("insects" for `animals/bugs`). A top-level category, and a folder missing here, is named by its own words
# (`folder_phrase`), which the captions do say.
SUBCATEGORY_NAMES: dict[str, str] = {
    "animals/birds": "birds", "animals/bugs": "insects", "animals/mammals": "mammals",
    "buildings/homes": "houses",
    "computer/buttons": "buttons", "computer/hardware": "computer hardware", "computer/icons": "desktop icons",
    "computer/icons/flat-theme": "flat icons", "computer/icons/flat-theme/action": "flat action icons",
    "computer/icons/flat-theme/applications": "flat application icons",
    "computer/icons/lemon-theme/actions": "action icons", "computer/icons/lemon-theme/apps": "application icons",
    "computer/icons/lemon-theme/devices": "device icons", "computer/icons/lemon-theme/filesystems": "folder icons",
    "computer/icons/lemon-theme/mimetypes": "file type icons",
    "food/beverages": "drinks", "food/desserts": "desserts", "food/fruit": "fruit",
    "food/meats_and_eggs": "meat and eggs",
    "people/smilies": "smileys", "people/stickmen": "stick figures",
    "recreation/games/cards/bordered": "bordered playing cards",
    "recreation/games/cards/ornamental": "ornamental playing cards",
    "recreation/games/cards/simple": "simple playing cards", "recreation/games/cards/white": "white playing cards",
    "recreation/music": "music", "recreation/sports": "sports",
    "shapes/arrows": "arrows", "shapes/jigsaw": "jigsaw pieces", "shapes/stars": "stars",
    "signs_and_symbols/flags": "flags", "signs_and_symbols/flags/africa": "african flags",
    "signs_and_symbols/flags/america": "flags of the americas", "signs_and_symbols/flags/asia": "asian flags",
    "signs_and_symbols/flags/europe": "european flags", "signs_and_symbols/flags/europe/france": "french flags",
    "signs_and_symbols/flags/semaphore": "semaphore flags", "signs_and_symbols/led": "led digits",
    "signs_and_symbols/map_symbols": "map symbols", "special/patterns": "patterns",
    "tools/weapons": "weapons", "transportation/boating": "boats", "transportation/roadsigns": "road signs",
}
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a clip art of {}.", "a drawing of {}.", "an icon of {}.", "{} clip art.", "a picture of {}.",
)


# --------------------------------------------------------------------------------------------------- the collection


def is_openclipart_source(source) -> bool:
    """Whether a data argument names this collection: its name, or a folder holding `png/` and `svg/`."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    if source in SOURCE_NAMES:
        return True
    return os.path.isdir(os.path.join(source, "png")) and os.path.isdir(os.path.join(source, "svg"))


def find_root(source: str | os.PathLike = "openclipart") -> Path:
    """The folder holding `png/` and `svg/`: `source` itself when it is a folder, else `$OPENCLIPART_ROOT` or the
    Debian packages' `/usr/share/openclipart`. Raises `FileNotFoundError` naming the install command."""
    if source not in SOURCE_NAMES:
        root = Path(source)
    else:
        root = Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
    missing = [name for name in ("png", "svg") if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"The Open Clip Art Library is not at {root} (no {' and no '.join(f'{m}/' for m in missing)} folder). "
            f"Install it with `{INSTALL_COMMAND}` (Debian or Ubuntu, as root), or set {ROOT_ENV} to a folder holding "
            "png/ and svg/ in the same layout.")
    return root


@dataclass
class ClipArtMetadata:
    """What an SVG says about its picture."""

    title: str | None = None
    keywords: tuple[str, ...] = ()
    creator: str | None = None


def read_svg_metadata(path: str | os.PathLike) -> ClipArtMetadata:
    """The Dublin Core title, keywords (`dc:subject` / `rdf:li`) and creator of an SVG; empty when it has none or
    does not parse."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, ValueError):
        return ClipArtMetadata()
    work = root.find(".//cc:Work", _NS)
    if work is None:
        return ClipArtMetadata()
    title = work.find("dc:title", _NS)
    creator = work.find("dc:creator//dc:title", _NS)
    keywords = tuple(li.text.strip() for li in work.iterfind("dc:subject//rdf:li", _NS) if li.text and li.text.strip())
    return ClipArtMetadata(title=title.text.strip() if title is not None and title.text else None,
                           keywords=keywords, creator=creator.text.strip() if creator is not None and creator.text
                           else None)


def _words(text: str) -> str:
    """Underscores and dashes as spaces, numbers and numbered suffixes ("tigre05", "_01") dropped, one space."""
    text = re.sub(r"[_\-]+", " ", text)
    text = re.sub(r"(?<=[a-zA-Z])\d+\b", "", text)
    text = re.sub(r"\b\d+\b", "", text)
    return re.sub(r"\s+", " ", text).strip(" ,.;:")


def clean_title(title: str | None) -> str | None:
    """The title as a caption phrase, or None when it is boilerplate: a collection or theme name, a bare file name
    without words, "untitled". "Clipart by <author> - <name>" keeps <name>; dates in brackets go."""
    if not title:
        return None
    title = title.strip()
    credit = _CREDIT_TITLE.match(title)
    if credit:
        title = credit.group("name")
    title = re.sub(r"\([^)]*\d{4}[^)]*\)", "", title)
    if any(re.fullmatch(pattern, title.strip(), re.IGNORECASE) for pattern in BOILERPLATE_TITLES):
        return None
    title = _words(title)
    if not re.search(r"[a-zA-Z]{3}", title):
        return None
    return title


def clean_keywords(keywords, creator: str | None = None, exclude=()) -> list[str]:
    """Keywords as words, in order, without duplicates, tooling and collection tags, addresses, the author's name, or
    words already said (`exclude`, e.g. the title's); "rome,italy" is two keywords."""
    author = {w for w in re.findall(r"[a-z]+", (creator or "").lower()) if len(w) > 2}
    said = {w.lower() for phrase in exclude for w in phrase.split()}
    kept: list[str] = []
    for keyword in (part for k in keywords for part in re.split(r"[,;]", k)):
        raw = keyword.strip().lower()
        if re.search(r"@|https?:|www\.", raw):
            continue
        if raw in STOP_KEYWORDS or any(p.fullmatch(raw) for p in _STOP_KEYWORD_PATTERNS):
            continue
        word = _words(raw)
        if len(word) < 3 or word in kept or word in said or word in STOP_KEYWORDS:
            continue
        if author and set(word.split()) & author:
            continue
        kept.append(word)
    return kept


def folder_phrase(folder: str) -> str:
    """The class name of a folder in the zero-shot tasks: `SUBCATEGORY_NAMES`, else its `folder_words`."""
    return SUBCATEGORY_NAMES.get(folder) or folder_words(folder)


def folder_words(folder: str) -> str:
    """The words of a folder's path, as the person who filed the picture wrote them, each word once (`food/fruit` ->
    "food fruit", `signs_and_symbols/flags/africa` -> "signs and symbols flags africa")."""
    words: list[str] = []
    for part in folder.split("/"):
        words += [w for w in _words(part).lower().split() if w not in words]
    return " ".join(words)


def make_captions(folder: str, metadata: ClipArtMetadata) -> list[str]:
    """The captions of one picture, most specific first (the first is the one retrieval is scored on):

    1. "<title>, <folder> clip art" (or "<folder> clip art" without a usable title);
    2. "<title>" alone, as an alt text (only with a title);
    3. "<folder> clip art: <keyword>, <keyword>, ..." (at most 6 keywords; only with keywords).
    """
    title = clean_title(metadata.title)
    where = folder_words(folder) if folder else ""
    keywords = clean_keywords(metadata.keywords, metadata.creator, exclude=[title or "", where])[:6]
    subject = f"{where} clip art" if where else "clip art"
    captions = [f"{title}, {subject}" if title else subject]
    if title:
        captions.append(title)
    if keywords:
        captions.append(f"{subject}: {', '.join(keywords)}")
    return captions


def split_of(relative_path: str) -> str:
    """"test" for `TEST_PERCENT` % of the files, by a hash of the relative path (stable across machines and runs,
    and a picture stays in its split when others are added)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


class SkippedPicture(ValueError):
    """A file that is not used: `reason` is counted in the build's skip counts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def prepare_image(data: bytes, size: int) -> bytes:
    """PNG bytes of the picture composited on white, shrunk to fit `size` x `size` (never enlarged) and centred on a
    white square, so a random or centre crop keeps the whole drawing. Raises `SkippedPicture` for an unreadable,
    tiny (under `MIN_SIDE` px) or blank (one colour) picture."""
    import warnings

    try:
        with warnings.catch_warnings():  # a few renders are over 100 megapixels: decoded once, then shrunk
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_rgb_image(data)
    except UnreadableImageError as error:
        raise SkippedPicture(error.reason) from error
    if min(image.size) < MIN_SIDE:
        raise SkippedPicture("tiny image")
    extrema = image.getextrema()
    if all(low == high for low, high in extrema):
        raise SkippedPicture("blank image")
    if max(image.size) > size:
        image.thumbnail((size, size), Image.LANCZOS, reducing_gap=3.0)
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    buffer = io.BytesIO()
    square.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------- the dataset


def _features(categories: list[str], subcategories: list[str]):
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "captions": datasets.List(datasets.Value("string")),
        "category": datasets.ClassLabel(names=categories),
        "subcategory": datasets.ClassLabel(names=subcategories),
        "folder": datasets.Value("string"),
        "file": datasets.Value("string"),
        "title": datasets.Value("string"),
        "keywords": datasets.List(datasets.Value("string")),
        "index": datasets.Value("int64"),
    })


def _list_pictures(root: Path) -> list[str]:
    """The PNG files under `root/png`, as sorted relative paths, a link listed once at its target when that is in
    the collection (a picture filed in several folders)."""
    png_root = (root / "png").resolve()
    seen: set[str] = set()
    for folder, _, names in os.walk(root / "png", followlinks=True):
        for name in names:
            if not name.lower().endswith(".png"):
                continue
            path = Path(folder) / name
            real = path.resolve()
            try:
                seen.add(real.relative_to(png_root).as_posix())
            except ValueError:  # a link out of the collection: its own path
                seen.add(path.relative_to(root / "png").as_posix())
    if not seen:
        raise FileNotFoundError(f"no PNG files under {root / 'png'}")
    return sorted(seen)


def _zero_shot_classes(folders: list[str]) -> tuple[list[str], list[str]]:
    """(top-level categories, sub-folders) with at least `MIN_CLASS_PICTURES` kept pictures, sorted."""
    tops = Counter(f.split("/")[0] for f in folders if f)
    subs = Counter(f for f in folders if "/" in f)
    categories = sorted(c for c, n in tops.items() if n >= MIN_CLASS_PICTURES and c not in NOT_A_CLASS)
    subcategories = sorted(s for s, n in subs.items() if n >= MIN_CLASS_PICTURES and s.split("/")[0] not in NOT_A_CLASS)
    return categories, subcategories


def _fingerprint(root: Path, pictures: list[str], image_size: int) -> str:
    """Of the build version, the image size and every file's path, size and modification time."""
    digest = hashlib.sha256(json.dumps([BUILD_VERSION, image_size]).encode())
    for relative in pictures:
        for kind, suffix in (("png", ".png"), ("svg", ".svg")):
            path = root / kind / (relative[:-4] + suffix if kind == "svg" else relative)
            try:
                stat = path.stat()
                digest.update(f"{kind}/{relative}:{stat.st_size}:{int(stat.st_mtime)}\n".encode())
            except OSError:
                digest.update(f"{kind}/{relative}:missing\n".encode())
    return f"{image_size}px-{len(pictures)}-" + digest.hexdigest()[:12]


def build_openclipart(root: Path, image_size: int = DEFAULT_IMAGE_SIZE, progress: bool = True,
                      pictures: list[str] | None = None
                      ) -> tuple[dict[str, dict[str, list]], list[str], list[str], Counter]:
    """Reads the whole collection (`pictures`: its `_list_pictures`, when already listed): ({split: columns},
    categories, subcategories, skip counts by reason)."""
    from tqdm.auto import tqdm

    pictures = _list_pictures(root) if pictures is None else pictures
    rows: list[dict] = []
    skips: Counter = Counter()
    digests: set[bytes] = set()
    for relative in tqdm(pictures, desc="openclipart", disable=not progress):
        try:
            data = (root / "png" / relative).read_bytes()
        except OSError:
            skips["unreadable image"] += 1
            continue
        digest = hashlib.sha256(data).digest()
        if digest in digests:  # the same file under two names
            skips["duplicate picture"] += 1
            continue
        digests.add(digest)
        try:
            image = prepare_image(data, image_size)
        except SkippedPicture as skipped:
            skips[skipped.reason] += 1
            continue
        folder = os.path.dirname(relative)
        metadata = read_svg_metadata(root / "svg" / (relative[:-4] + ".svg"))
        if metadata.title is None and not metadata.keywords:
            skips["no metadata (captions from the folder only)"] += 1
        rows.append({"image": {"bytes": image, "path": None}, "captions": make_captions(folder, metadata),
                     "folder": folder, "file": relative, "title": metadata.title or "",
                     "keywords": list(metadata.keywords)})
    categories, subcategories = _zero_shot_classes([r["folder"] for r in rows])
    splits: dict[str, dict[str, list]] = {}
    for row in rows:
        columns = splits.setdefault(split_of(row["file"]), {k: [] for k in _features(categories, subcategories)})
        top = row["folder"].split("/")[0]
        row = {**row, "category": categories.index(top) if top in categories else -1,
               "subcategory": subcategories.index(row["folder"]) if row["folder"] in subcategories else -1,
               "index": len(columns["file"])}
        for key, value in row.items():
            columns[key].append(value)
    return splits, categories, subcategories, skips


def load_openclipart(split: str = "train", source: str | os.PathLike = "openclipart", *,
                     image_size: int = DEFAULT_IMAGE_SIZE, use_cache: bool = True, progress: bool = True):
    """A split ("train" or "test") of the collection as a `datasets.Dataset`, built on first use and then read from
    the cache (both splits are built together; a changed collection or image size builds anew).

    Columns: image (PNG, composited on white, fitted in `image_size` px and squared on white), captions (list, most
    specific first: `make_captions`), category and subcategory (ClassLabel of the zero-shot tasks; -1 outside
    them), folder, file (path relative to `png/`), title and keywords (the SVG's, as written), index (0..n-1 in
    the split). The skip counts of the build are in `openclipart_skips(split, ...)`.
    """
    import datasets

    if split not in ("train", "test"):
        raise ValueError(f"openclipart has splits 'train' and 'test', not {split!r}")
    if image_size < MIN_SIDE:
        raise ValueError(f"image_size must be at least {MIN_SIDE}, got {image_size}")
    root = find_root(source)
    pictures = _list_pictures(root)
    folder = _cache_folder(root, image_size, pictures)
    if use_cache:
        try:
            marker = read_marker(os.path.join(folder, split))
            features = _features(marker["categories"], marker["subcategories"])
            if (dataset := load_cached(os.path.join(folder, split), features)) is not None:
                return dataset
        except (OSError, ValueError, KeyError):
            pass
    splits, categories, subcategories, skips = build_openclipart(root, image_size, progress=progress,
                                                                 pictures=pictures)
    features = _features(categories, subcategories)
    built = {}
    for name in ("train", "test"):
        columns = splits.get(name) or {k: [] for k in features}
        built[name] = datasets.Dataset.from_dict(columns, features=features)
        if use_cache:
            save_atomically(built[name], os.path.join(folder, name), {
                "build_version": BUILD_VERSION, "root": str(root), "num_rows": len(built[name]),
                "categories": categories, "subcategories": subcategories, "skipped": dict(skips)})
    logger.info("openclipart from %s: %d train / %d test pictures; skipped %s", root, len(built["train"]),
                len(built["test"]), dict(skips) or "none")
    return built[split]


def _cache_folder(root: Path, image_size: int, pictures: list[str] | None = None) -> str:
    pictures = _list_pictures(root) if pictures is None else pictures
    return os.path.join(cache_root(), "openclipart", _fingerprint(root, pictures, image_size))


def openclipart_skips(source: str | os.PathLike = "openclipart", image_size: int = DEFAULT_IMAGE_SIZE) -> dict:
    """{reason: count} of the files the cached build left out (duplicates, tiny, blank, unreadable)."""
    folder = _cache_folder(find_root(source), image_size)
    try:
        return read_marker(os.path.join(folder, "train"))["skipped"]
    except (OSError, ValueError, KeyError):
        return {}


# --------------------------------------------------------------------------------------------------- the benchmark


def openclipart_zero_shot_tasks(dataset) -> dict[str, dict]:
    """The zero-shot tasks of a split: "category" (top-level folders) and "subcategory" (sub-folders with enough
    pictures), with readable class names and clip-art prompt templates."""
    tasks = {}
    for task in ("category", "subcategory"):
        names = dataset.features[task].names
        tasks[task] = {"classnames": [folder_phrase(n) for n in names], "folders": list(names),
                       "templates": list(ZERO_SHOT_TEMPLATES), "label_column": task}
    return tasks


def evaluate_openclipart(model, processor, *, dataset=None, train_dataset=None, source: str = "openclipart",
                         image_size: int = DEFAULT_IMAGE_SIZE, batch_size: int = 64, final: bool = True,
                         progress: bool = False) -> dict[str, float]:
    """The Open Clip Art benchmark on the test split, CLIP_benchmark names under `openclipart/`:

    - `openclipart/category/{acc1,acc5,mean_per_class_recall}` and `openclipart/subcategory/...`: zero-shot over
      the pictures of each task's classes (`openclipart/<task>/num_images` of them; chance is 1 / classes);
    - `openclipart/retrieval/{image,text}_retrieval_recall@{1,5,10}`: between the test pictures and their first
      (most specific) caption;
    - `openclipart/linear_probe/category/acc1`: a logistic-regression probe on frozen image features, fitted on the
      train split, in the `final` evaluation only (it encodes the whole train split; evaluations during training
      skip it).
    """
    from .evaluation import (
        as_map_dataset,
        encode_images,
        evaluate_linear_probe,
        grouped_zero_shot,
        retrieval_from_image_embeds,
        zero_shot_classifier,
    )

    if dataset is None:
        dataset = load_openclipart("test", source, image_size=image_size, progress=progress)
    dataset = as_map_dataset(dataset)
    results: dict[str, float] = {"openclipart/num_images": len(dataset)}
    if len(dataset) == 0:
        return results
    image_embeds = encode_images(model, processor, dataset, batch_size=batch_size, progress=progress)
    for task, spec in openclipart_zero_shot_tasks(dataset).items():
        labels = np.asarray(dataset[spec["label_column"]])
        keep = np.flatnonzero(labels >= 0)
        if len(spec["classnames"]) < 2 or len(keep) == 0:
            continue
        classifier = zero_shot_classifier(model, processor, spec["classnames"], spec["templates"])
        task_results = grouped_zero_shot(image_embeds[keep], classifier, labels[keep].tolist(), None)
        results.update({f"openclipart/{task}/{k}": v for k, v in task_results.items()})
        results[f"openclipart/{task}/num_classes"] = len(spec["classnames"])
    retrieval = retrieval_from_image_embeds(model, processor, image_embeds, [c[:1] for c in dataset["captions"]],
                                            (1, 5, 10))
    retrieval.pop("num_images")
    results.update({f"openclipart/retrieval/{k}": v for k, v in retrieval.items()})
    if final:
        if train_dataset is None:
            train_dataset = load_openclipart("train", source, image_size=image_size, progress=progress)
        train_dataset = as_map_dataset(train_dataset)
        train_rows = [i for i, y in enumerate(train_dataset["category"]) if y >= 0]
        test_rows = [i for i, y in enumerate(dataset["category"]) if y >= 0]
        if train_rows and test_rows:
            probe = evaluate_linear_probe(model, processor, train_dataset.select(train_rows),
                                          dataset.select(test_rows), "category", batch_size=batch_size,
                                          progress=progress)
            results.update({f"openclipart/linear_probe/category/{k}": v for k, v in probe.items()})
    return results


# ----------------------------------------------------------------------------------------------- model cards

CARD_METRICS = (
    ("openclipart/category/acc1", "zero-shot category top-1"),
    ("openclipart/category/acc5", "zero-shot category top-5"),
    ("openclipart/subcategory/acc1", "zero-shot sub-folder top-1"),
    ("openclipart/subcategory/acc5", "zero-shot sub-folder top-5"),
    ("openclipart/linear_probe/category/acc1", "linear probe, category top-1"),
    ("openclipart/retrieval/image_retrieval_recall@1", "text-to-image retrieval recall@1"),
    ("openclipart/retrieval/image_retrieval_recall@5", "text-to-image retrieval recall@5"),
    ("openclipart/retrieval/text_retrieval_recall@1", "image-to-text retrieval recall@1"),
    ("openclipart/retrieval/text_retrieval_recall@5", "image-to-text retrieval recall@5"),
)
MODEL_INDEX_METRICS = (
    ("openclipart/category/acc1", "zero-shot category top-1 accuracy"),
    ("openclipart/subcategory/acc1", "zero-shot sub-folder top-1 accuracy"),
)
MODEL_INDEX_TASK = "Zero-shot image classification (Open Clip Art Library 0.18: categories and sub-folders)"
MODEL_INDEX_DATASET_NAME = "Open Clip Art Library 0.18"
# the card's pipeline example and its note under the evaluation table
CARD_EXAMPLE = ("pig.png", ["a clip art of a pig", "a clip art of a bus", "a clip art of a flag"])
CARD_CHANCE_NOTE = (
    "Chance level is 1/15 for the category task (15 top-level folders) and 1/42 for the sub-folder task (42 folders). "
    "Image-to-text recall@1 is bounded by 0.44: the other test pictures share their first caption with another test "
    "picture (for example 202 generated stars), and a tie counts as a miss.")
DEFAULT_LABEL_COLUMN = "category"  # the main zero-shot task
NUM_IMAGES_KEY = "openclipart/num_images"
BENCHMARK_TITLE = "Zero-shot classification, linear probe and retrieval on the Open Clip Art test split"
SYNTHETIC = False

# how every built-in benchmark is called (`lightclip.data.builtin_benchmark`)
evaluate_benchmark = evaluate_openclipart

def describe_training_data(train: dict) -> str:
    """The card's "data" row for a run on this collection, from its `train_config.json`."""
    return (f"Open Clip Art Library 0.18 (Debian `openclipart-png` / `openclipart-svg`), train split, pictures at "
            f"{train.get('openclipart_image_size') or DEFAULT_IMAGE_SIZE} px, captions from the SVG titles, keywords "
            "and folders")
