"""Image-text sources for training and evaluation: the data arguments, loading and standardising every kind of
source, and decoding a map-style training set once.

Every source is standardised to the columns "image" (undecoded: `datasets.Image(decode=False)`, i.e. a dict with
"bytes" and/or "path", decoded by `load_rgb_image`), "captions" (list[str]) and "index" (the position in the
dataset, stable). Images are decoded in the collator (`lightclip.collate.ImageTextCollator`), so a corrupt or
missing file is skipped and counted instead of crashing the data loader.

Sources (`load_image_text_dataset(source, ...)`, `--train_data source`):
- "shapes": the built-in lightclip-shapes dataset (`lightclip.shapes`), splits "train" and "test";
- "openclipart": the Open Clip Art Library installed from Debian's packages, or a folder holding its `png/` and
  `svg/` (`lightclip.openclipart`), splits "train" and "test";
- a folder in the Hugging Face imagefolder layout, with metadata.jsonl or metadata.csv;
- a .csv / .tsv / .jsonl / .json file of (image path, caption) rows, paths relative to the file's folder or absolute;
- webdataset tar shards: a .tar file, a brace pattern ("shards-{000..009}.tar"), a glob, or a folder of .tar files,
  samples `key.jpg` + `key.txt` / `key.json`, streamed with the standard library `tarfile` (`lightclip.shards`);
- anything else is a dataset name for `datasets.load_dataset(name, config_name, split=split)`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .collate import SkipCounter, as_caption_list
from .images import MAX_IMAGE_SIDE, UnreadableImageError, load_rgb_image
from .openclipart import DEFAULT_IMAGE_SIZE as OPENCLIPART_IMAGE_SIZE
from .openclipart import is_openclipart_source
from .shapes import is_shapes_source
from .shards import load_tar_shards

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "png", "image_path", "file_name", "filepath")
CAPTION_COLUMN_CANDIDATES = ("text", "caption", "captions", "txt", "sentences")


# --------------------------------------------------------------------------------------------------- arguments


@dataclass
class DataArguments:
    """The data arguments of the training, evaluation and feature-bank scripts (`HfArgumentParser` dataclass)."""

    train_data: str = field(default="shapes", metadata={
        "help": "'shapes', 'openclipart' (or its folder), an imagefolder folder, a .csv/.jsonl file, tar shards "
                "('shards-{000..009}.tar') or a hub dataset name."})
    validation_data: str | None = field(default=None, metadata={
        "help": "Same kinds as --train_data. Default: the test split of shapes or openclipart when --train_data is "
                "one of them."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    train_split: str = "train"
    validation_split: str | None = field(default=None, metadata={
        "help": "Default: 'test' for shapes and openclipart, 'validation' for hub datasets and for local folders "
                "with a validation folder, else 'train'."})
    image_column: str | None = field(default=None, metadata={
        "help": f"Default: the first column among {', '.join(IMAGE_COLUMN_CANDIDATES)}."})
    caption_column: str | None = field(default=None, metadata={
        "help": "One column, or several separated by commas (each row then has several captions). "
                f"Default: a column among {', '.join(CAPTION_COLUMN_CANDIDATES)}."})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    streaming: bool = field(default=False, metadata={"help": "Stream hub and local datasets (tar shards always are)."})
    preprocessing_num_workers: int | None = None
    dataloader_num_workers: int = 0
    max_decoded_images_mb: int = field(default=1024, metadata={
        "help": "Training: decode the images of map-style data once and keep them in memory (8-bit RGB, per process) "
                "when they fit in this many MB, instead of decoding every image at every step; 0 turns this off."})
    shapes_train_size: int | None = field(default=None, metadata={"help": "Default 4000."})
    shapes_test_size: int | None = field(default=None, metadata={"help": "Default 500."})
    shapes_image_size: int = 64
    openclipart_image_size: int = field(default=OPENCLIPART_IMAGE_SIZE, metadata={
        "help": "Open Clip Art pictures are fitted in this many pixels and squared on white, once, in the cache."})


def load_datasets_from_args(args: DataArguments, seed: int = 0):
    """(train, validation or None) from `DataArguments` (or any object with its attributes)."""
    common = dict(image_column=args.image_column, caption_column=args.caption_column,
                  config_name=args.dataset_config_name, streaming=getattr(args, "streaming", False),
                  num_proc=args.preprocessing_num_workers, shapes_image_size=args.shapes_image_size,
                  openclipart_image_size=getattr(args, "openclipart_image_size", OPENCLIPART_IMAGE_SIZE), seed=seed)
    train = load_image_text_dataset(args.train_data, args.train_split, max_samples=args.max_train_samples,
                                    shapes_size=args.shapes_train_size, **common)
    validation_data = args.validation_data
    if validation_data is None and (is_shapes_source(args.train_data) or is_openclipart_source(args.train_data)):
        validation_data = args.train_data
    if validation_data is None:
        return train, None
    split = args.validation_split or default_validation_split(validation_data)
    validation = load_image_text_dataset(validation_data, split, max_samples=args.max_eval_samples,
                                         shapes_size=args.shapes_test_size, **common)
    return train, validation


def default_validation_split(source: str) -> str:
    """"test" for shapes and openclipart, "validation" for a hub dataset or an imagefolder with a validation folder,
    else "train"."""
    kind = detect_source_kind(source)
    if kind in ("shapes", "openclipart"):
        return "test"
    if kind == "hub":
        return "validation"
    if kind == "imagefolder" and any(os.path.isdir(os.path.join(source, name))
                                     for name in ("validation", "valid", "val", "dev")):
        return "validation"
    return "train"


def keep_readable_images(dataset, skip_counter: SkipCounter, prefix: str = "validation: "):
    """The rows of `dataset` whose image decodes (a streamed one is read into memory first); the others are counted
    in `skip_counter` under `prefix + reason`, with their row index. For evaluation sets, which are read whole."""
    from .evaluation import as_map_dataset

    dataset = as_map_dataset(dataset)
    keep = []
    for row, image in enumerate(dataset["image"]):
        try:
            load_rgb_image(image, MAX_IMAGE_SIDE)
            keep.append(row)
        except UnreadableImageError as error:
            skip_counter.add(prefix + error.reason, row)
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


# --------------------------------------------------------------------------------------------------- sources


def _metadata_problem(folder: str) -> str | None:
    """The first line of a folder's metadata.jsonl that is not UTF-8 or not JSON, named with its file and line
    number, if any."""
    path = os.path.join(folder, "metadata.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return (f"{path}, line {number}: not UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1} "
                        "of the line); save the file as UTF-8")
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as error:
                    return f"{path}, line {number}: not a JSON object ({error.msg})"
    return None


def detect_source_kind(source: str) -> str:
    """One of "shapes", "openclipart", "imagefolder", "csv", "json", "tar", "hub"."""
    if is_shapes_source(source):
        return "shapes"
    if is_openclipart_source(source):
        return "openclipart"
    lower = source.lower()
    if lower.endswith(".tar"):  # a file, a brace pattern or a glob; missing shards raise when listed
        return "tar"
    if os.path.isdir(source):
        names = os.listdir(source)
        has_metadata = any(n in names for n in ("metadata.jsonl", "metadata.csv"))
        return "tar" if not has_metadata and any(n.endswith(".tar") for n in names) else "imagefolder"
    if lower.endswith((".csv", ".tsv", ".jsonl", ".json")) and not os.path.isfile(source):
        raise FileNotFoundError(f"Data file not found: {source}")
    if os.path.isfile(source):
        if lower.endswith((".csv", ".tsv")):
            return "csv"
        if lower.endswith((".jsonl", ".json")):
            return "json"
        raise ValueError(f"Unsupported data file {source!r}: use .csv, .tsv, .jsonl, .json or .tar")
    return "hub"


# the data sources with a built-in benchmark; each also prefixes its metric names ("shapes/...", "openclipart/...")
BUILTIN_BENCHMARK_SOURCES = ("shapes", "openclipart")


def builtin_benchmark(source: str | None):
    """The module of the built-in dataset and benchmark that a data argument names (`lightclip.shapes` for "shapes",
    `lightclip.openclipart` for "openclipart" or its folder), else None. Each has `evaluate_benchmark`, its model-card
    metrics (`CARD_METRICS`, `MODEL_INDEX_METRICS`, ...) and `describe_training_data`. Here, above both modules,
    because each builds its benchmark on `lightclip.evaluation`."""
    from . import openclipart, shapes

    if shapes.is_shapes_source(source):
        return shapes
    if openclipart.is_openclipart_source(source):
        return openclipart
    return None


def results_benchmark(results: dict | None):
    """The built-in benchmark whose metrics a results dict holds (keys under its source's name), else None."""
    for source in BUILTIN_BENCHMARK_SOURCES:
        if any(key.startswith(f"{source}/") for key in (results or {})):
            return builtin_benchmark(source)
    return None


def load_image_text_dataset(
    source: str,
    split: str = "train",
    *,
    image_column: str | None = None,
    caption_column: str | list[str] | None = None,
    config_name: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
    num_proc: int | None = None,
    shapes_size: int | None = None,
    shapes_image_size: int = 64,
    openclipart_image_size: int = OPENCLIPART_IMAGE_SIZE,
    seed: int = 0,
    require_captions: bool = True,
):
    """Loads an image-text source and standardises it to the columns "image", "captions", "index".

    Returns a `datasets.Dataset`, or a `datasets.IterableDataset` for tar shards and when `streaming=True`.
    "image" is undecoded (`datasets.Image(decode=False)`); decode with `load_rgb_image`. Other columns of the source
    are kept (for shapes: "shape", "colour", "composition_seen", ...) except the image and caption columns.
    `seed` is the shapes generator seed. `require_captions=False` accepts a source without a caption column (images
    only, e.g. calibration pictures): its "captions" are then empty lists.
    """
    import datasets

    kind = detect_source_kind(source)
    if kind in ("shapes", "openclipart"):
        if kind == "shapes":
            from .shapes import make_shapes_dataset

            dataset = make_shapes_dataset(split, num_samples=shapes_size, image_size=shapes_image_size, seed=seed)
        else:
            from .openclipart import load_openclipart

            dataset = load_openclipart(split, source, image_size=openclipart_image_size)
        if max_samples is not None:
            dataset = dataset.select(range(min(max_samples, len(dataset))))
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        return dataset.to_iterable_dataset() if streaming else dataset
    if kind == "tar":
        return load_tar_shards(source, max_samples=max_samples)
    base_dir = None
    if kind == "imagefolder":
        try:
            dataset = datasets.load_dataset("imagefolder", data_dir=source, split=split, streaming=streaming)
        except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
            raise ValueError(f"{source}: cannot read the image folder: {_metadata_problem(source) or error}") from error
    elif kind in ("csv", "json"):
        data_kwargs = {"delimiter": "\t"} if source.lower().endswith(".tsv") else {}
        dataset = datasets.load_dataset(kind, data_files=source, split="train", streaming=streaming, **data_kwargs)
        base_dir = os.path.dirname(os.path.abspath(source))
    else:
        dataset = datasets.load_dataset(source, config_name, split=split, streaming=streaming)
    if isinstance(dataset, datasets.IterableDataset):
        # stream undecoded bytes: a corrupt image then reaches the collator, which skips and counts it
        dataset = dataset.decode(False)
    if max_samples is not None:
        dataset = dataset.take(max_samples) if streaming else dataset.select(range(min(max_samples, len(dataset))))
    return standardize_image_text_dataset(dataset, image_column=image_column, caption_column=caption_column,
                                          base_dir=base_dir, num_proc=num_proc, require_captions=require_captions)


def _column_names(dataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())  # a streamed dataset without known features


def resolve_columns(column_names: list[str], image_column: str | None = None,
                    caption_column: str | list[str] | None = None, require_captions: bool = True
                    ) -> tuple[str, list[str]]:
    """(image column, caption columns), auto-detected among the usual names when not given; no caption columns when
    none is found and `require_captions` is False."""
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMN_CANDIDATES if c in column_names), None)
        if image_column is None:
            raise ValueError(f"No image column among {column_names}; pass --image_column.")
    elif image_column not in column_names:
        raise ValueError(f"Image column {image_column!r} not in {column_names}")
    if caption_column is None:
        found = [c for c in CAPTION_COLUMN_CANDIDATES if c in column_names]
        numbered = sorted(c for c in column_names if re.fullmatch(r"(caption|text|sentence)s?_?\d+", c))
        if "captions" in found or "sentences" in found:  # prefer the columns holding several captions
            captions = ["captions" if "captions" in found else "sentences"]
        elif found:
            captions = found[:1]
        elif numbered:
            captions = numbered
        elif require_captions:
            raise ValueError(f"No caption column among {column_names}; pass --caption_column.")
        else:
            captions = []
    else:
        captions = caption_column.split(",") if isinstance(caption_column, str) else list(caption_column)
        captions = [c.strip() for c in captions]
        missing = [c for c in captions if c not in column_names]
        if missing:
            raise ValueError(f"Caption columns {missing} not in {column_names}")
    return image_column, captions


def standardize_image_text_dataset(dataset, *, image_column: str | None = None,
                                   caption_column: str | list[str] | None = None, base_dir: str | None = None,
                                   num_proc: int | None = None, require_captions: bool = True):
    """Renames/merges columns to "image" (undecoded), "captions" (list[str]) and "index" (row position)."""
    import datasets

    names = _column_names(dataset)
    image_column, caption_columns = resolve_columns(names, image_column, caption_column, require_captions)

    def merge(*args):
        *columns, indices = args
        captions = [[c for col in row[:len(caption_columns)] for c in as_caption_list(col)] for row in zip(*columns)]
        return {"captions": captions, "index": list(indices)}

    drop = [c for c in caption_columns if c != "captions"] + [c for c in ("index",) if c in names]
    map_kwargs = {} if isinstance(dataset, datasets.IterableDataset) else {"num_proc": num_proc, "desc": "captions"}
    # without caption columns `merge` reads the image column (unused): `datasets` drops all columns for input_columns=[]
    dataset = dataset.map(merge, input_columns=caption_columns or [image_column], with_indices=True, batched=True,
                          remove_columns=drop, **map_kwargs)
    if image_column != "image":
        if "image" in names:
            dataset = dataset.remove_columns("image")
        dataset = dataset.rename_column(image_column, "image")
    features = dataset.features
    if features is not None and isinstance(features.get("image"), datasets.Image):
        return dataset.cast_column("image", datasets.Image(decode=False))

    def as_image_dict(values):  # paths (relative to base_dir), bytes or {"bytes", "path"} dicts
        return {"image": [_image_reference(v, base_dir) for v in values]}

    dataset = dataset.map(as_image_dict, input_columns=["image"], batched=True, **map_kwargs)
    return dataset if features is None else dataset.cast_column("image", datasets.Image(decode=False))


def _image_reference(value: Any, base_dir: str | None) -> dict | None:
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        return {"bytes": None, "path": path}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    return value


# --------------------------------------------------------------------------------------------------- decoded images


def decode_images_once(dataset, max_bytes: int, probe: int = 64):
    """`DecodedImageTextDataset(dataset)` when the decoded images of the map-style `dataset` fit in `max_bytes`, else
    `dataset` itself: a training epoch then reads no file and decodes no image. Pictures are kept as the collator
    decodes them, longest side at most `MAX_IMAGE_SIDE`. The size is estimated from the first `probe` rows, so a
    large dataset costs only those decodes before it is left as it is."""
    if max_bytes <= 0 or not hasattr(dataset, "__len__") or len(dataset) == 0:
        return dataset
    total = len(dataset)
    first = [_decoded_row(dataset[i]) for i in range(min(probe, total))]
    rows, used = [row for row, _ in first], sum(size for _, size in first)
    if used / len(first) * total > max_bytes:
        logger.info("training images decoded at every step: about %.0f MB decoded, over the %.0f MB limit",
                    used / len(first) * total / 2**20, max_bytes / 2**20)
        return dataset
    for i in range(len(first), total):
        row, size = _decoded_row(dataset[i])
        rows.append(row)
        used += size
        if used > max_bytes:
            logger.info("training images decoded at every step: over %.0f MB decoded", max_bytes / 2**20)
            return dataset
    logger.info("%d training images decoded once and kept in memory (%.1f MB)", total, used / 2**20)
    return DecodedImageTextDataset(rows)


def _decoded_row(row: dict) -> tuple[dict, int]:
    """(row with its image decoded, bytes of the pixels); an unreadable image stays as it was, for the collator to
    skip and count."""
    try:
        image = load_rgb_image(row.get("image"), MAX_IMAGE_SIDE)
    except UnreadableImageError:
        return row, 0
    return {**row, "image": image}, image.width * image.height * len(image.getbands())


class DecodedImageTextDataset:
    """Map-style rows whose "image" is an 8-bit RGB PIL image, decoded once (`decode_images_once`): the collator's
    `load_rgb_image` gives back the same pixels, so the batches equal those of the undecoded dataset. DataLoader
    workers forked from the process share them."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]
