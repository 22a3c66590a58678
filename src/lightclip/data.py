"""Image-text data for training and evaluation: loading, standardising, decoding, augmenting and collating.

Every source is standardised to the columns "image" (undecoded: `datasets.Image(decode=False)`, i.e. a dict with
"bytes" and/or "path", decoded by `load_rgb_image`), "captions" (list[str]) and "index" (the position in the
dataset, stable). Images are decoded in the collator, so a corrupt or missing file is skipped and counted instead
of crashing the data loader.

Sources (`load_image_text_dataset(source, ...)`, `--train_data source`):
- "shapes": the built-in lightclip-shapes dataset (`lightclip.shapes`), splits "train" and "test";
- "openclipart": the Open Clip Art Library installed from Debian's packages, or a folder holding its `png/` and
  `svg/` (`lightclip.openclipart`), splits "train" and "test";
- a folder in the Hugging Face imagefolder layout, with metadata.jsonl or metadata.csv;
- a .csv / .tsv / .jsonl / .json file of (image path, caption) rows, paths relative to the file's folder or absolute;
- webdataset tar shards: a .tar file, a brace pattern ("shards-{000..009}.tar"), a glob, or a folder of .tar files,
  samples `key.jpg` + `key.txt` / `key.json`, streamed with the standard library `tarfile`;
- anything else is a dataset name for `datasets.load_dataset(name, config_name, split=split)`.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .processing_lightclip import to_rgb8
from .openclipart import DEFAULT_IMAGE_SIZE as OPENCLIPART_IMAGE_SIZE, is_openclipart_source
from .shapes import is_shapes_source

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "png", "image_path", "file_name", "filepath")
CAPTION_COLUMN_CANDIDATES = ("text", "caption", "captions", "txt", "sentences")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# the skip reason of the samples lost at the end of a tar shard that is cut short (counted once per shard and pass)
TRUNCATED_SHARD = "lost tail of a truncated tar shard"
# training pictures are decoded and kept with their longest side at most this many pixels: over 4x the largest
# preset's input (224 px), and at most 3 MB of 8-bit RGB each, whatever the size of the file
MAX_IMAGE_SIDE = 1024


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
        return _load_tar_shards(source, max_samples=max_samples)
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


def _as_caption_list(value: Any) -> list[str]:
    """A caption cell (string, list of strings, dicts such as {"raw": ...}, None) as a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        for key in ("raw", "caption", "text", "captions", "sentences"):
            if key in value:
                return _as_caption_list(value[key])
        return []
    if isinstance(value, Iterable):
        return [c for v in value for c in _as_caption_list(v)]
    return [str(value)]


def standardize_image_text_dataset(dataset, *, image_column: str | None = None,
                                   caption_column: str | list[str] | None = None, base_dir: str | None = None,
                                   num_proc: int | None = None, require_captions: bool = True):
    """Renames/merges columns to "image" (undecoded), "captions" (list[str]) and "index" (row position)."""
    import datasets

    names = _column_names(dataset)
    image_column, caption_columns = resolve_columns(names, image_column, caption_column, require_captions)

    def merge(*args):
        *columns, indices = args
        captions = [[c for col in row[:len(caption_columns)] for c in _as_caption_list(col)] for row in zip(*columns)]
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


# --------------------------------------------------------------------------------------------------- tar shards


def expand_braces(pattern: str) -> list[str]:
    """Expands "{000..009}" numeric ranges (zero padding kept) and "{a,b}" lists, as webdataset does."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def list_tar_shards(source: str) -> list[str]:
    """The shard paths of a tar source (file, brace pattern, glob or folder), in order."""
    if os.path.isdir(source):
        shards = sorted(glob.glob(os.path.join(source, "*.tar")))
    else:
        shards = []
        for path in expand_braces(source):
            shards.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing or not shards:
        raise FileNotFoundError(f"Tar shards not found for {source!r}: {missing[:3] or 'no .tar files'}")
    return shards


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name, the rest the extension."""
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), extension.lower()


def _tar_samples(path: str, members: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each group of consecutive files sharing a key, from the first `members` members
    (all by default; `_scan_tar_shard` says how many are whole)."""
    key, files = None, {}
    with tarfile.open(path, "r|*") as archive:
        for member in itertools.islice(archive, members):
            if not member.isfile():
                continue
            member_key, extension = _split_key(member.name)
            if member_key != key and key is not None:
                yield key, files
                files = {}
            key = member_key
            handle = archive.extractfile(member)
            files[extension] = handle.read() if handle is not None else b""
    if key is not None:
        yield key, files


# what reading past the end of a cut shard raises: tarfile's own error, or a compressed stream's
_CUT_SHORT = (tarfile.ReadError, EOFError, zlib.error)


def _read_at(stream, offset: int, size: int) -> bytes:
    """Up to `size` bytes of a seekable (possibly decompressing) `stream` from `offset`; fewer where it ends."""
    try:
        stream.seek(offset)
        return stream.read(size)
    except _CUT_SHORT:
        return b""


def _scan_tar_shard(path: str) -> tuple[int, int, bool]:
    """(whole members, samples, truncated) of a shard, from its headers: the members whose data is all there, the
    samples they make (grouped as `_tar_samples` groups them), and whether the shard stops before its
    end-of-archive block (cut short, or corrupt after its last readable member), having lost its tail.

    Raises `tarfile.ReadError` naming the file when not one sample can be read from it (not a tar file, or cut
    inside its first sample)."""
    members, truncated = [], False
    try:
        archive = tarfile.open(path)
    except _CUT_SHORT as error:  # tarfile's message lists every compression tried: keep the plain tar one
        reason = str(error).splitlines()[-1].lstrip("- ")
        raise tarfile.ReadError(f"{path} is not a readable tar shard ({reason}); remove it or fetch it "
                                "again") from error
    with archive:
        while True:
            try:
                member = archive.next()
            except _CUT_SHORT:  # the last member's data runs past the end of the file
                truncated = True
                break
            if member is None:
                break
            members.append(member)
        if truncated and members:
            last = members[-1]
            if last.size and not _read_at(archive.fileobj, last.offset_data + last.size - 1, 1):
                members.pop()
        if not truncated:
            truncated = _read_at(archive.fileobj, archive.offset, tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE)
    keys = [_split_key(m.name)[0] for m in members if m.isfile()]
    samples = sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])
    if truncated and not samples:
        raise tarfile.ReadError(f"{path} is cut short or corrupt before its first whole sample; remove it or fetch it "
                                "again")
    return len(members), samples, truncated


def _decode_tar_sample(key: str, files: dict[str, bytes]) -> tuple[dict | None, list[str]]:
    image = next(({"bytes": files[e], "path": f"{key}.{e}"} for e in IMAGE_EXTENSIONS if e in files), None)
    captions: list[str] = []
    for extension in ("txt", "text", "caption"):
        if extension in files:
            captions.append(files[extension].decode("utf-8", errors="replace"))
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            meta = {}
        if isinstance(meta, dict):
            for field in ("caption", "text", "captions", "sentences"):
                captions.extend(_as_caption_list(meta.get(field)))
    return image, captions


def _generate_tar_examples(shards: list[tuple[str, int, int, int, bool]]):
    """Rows of each (path, offset, whole members, samples, truncated) shard; the last row read from a truncated
    shard carries its path under "truncated_shard", so that the collator counts the lost tail once per pass."""
    for path, offset, members, samples, truncated in shards:
        for position, (key, files) in enumerate(_tar_samples(path, members)):
            image, captions = _decode_tar_sample(key, files)
            lost_tail = path if truncated and position == samples - 1 else None
            yield {"image": image, "captions": captions, "index": offset + position, "key": key,
                   "truncated_shard": lost_tail}


def _load_tar_shards(source: str, max_samples: int | None = None):
    """A `datasets.IterableDataset` over webdataset-style shards; shards are split across data loader workers.

    "index" is the global position (shards in order), computed from the tar headers before streaming. A shard cut
    short gives its whole samples, with a warning naming it, and its lost tail is counted as a skip
    (`TRUNCATED_SHARD`); a shard with no readable sample raises `tarfile.ReadError` naming it.
    """
    # Not `datasets.load_dataset("webdataset", ...)`: its examples carry no global position (`map(with_indices=True)`
    # restarts in every data loader worker, and the feature banks are indexed by "index"), it refuses shards whose
    # samples mix .txt and .json captions, and one unparsable .json stops the whole stream.
    import datasets

    shards, offset = [], 0
    for path in list_tar_shards(source):
        members, samples, truncated = _scan_tar_shard(path)
        if truncated:
            logger.warning("%s is cut short or corrupt after %d samples: they are read, the rest of the shard is "
                           "lost and counted as skipped (%r)", path, samples, TRUNCATED_SHARD)
        shards.append((path, offset, members, samples, truncated))
        offset += samples
    features = datasets.Features({
        "image": datasets.Image(decode=False),
        "captions": datasets.List(datasets.Value("string")),
        "index": datasets.Value("int64"),
        "key": datasets.Value("string"),
        "truncated_shard": datasets.Value("string"),
    })
    dataset = datasets.IterableDataset.from_generator(_generate_tar_examples, features=features,
                                                      gen_kwargs={"shards": shards})
    return dataset.take(max_samples) if max_samples is not None else dataset


# --------------------------------------------------------------------------------------------------- images


class UnreadableImageError(ValueError):
    """An image that is missing or cannot be decoded; `reason` is "missing image" or "unreadable image"."""

    def __init__(self, message: str, reason: str = "unreadable image"):
        super().__init__(message)
        self.reason = reason


def _open_image(image: Any, max_side: int | None = None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return _open_image(bytes(image["bytes"]), max_side)
        if image.get("path") is not None:
            return _open_image(image["path"], max_side)
        raise UnreadableImageError("image dict has neither bytes nor path", "missing image")
    if image is None:
        raise UnreadableImageError("no image", "missing image")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if type(image).__module__.startswith("torch"):  # a CHW (or HW) float tensor in [0, 1] or [0, 255]
        array = image.detach().float().cpu()
        if array.ndim == 3 and array.shape[0] in (1, 3):
            array = array.permute(1, 2, 0)
        array = array.numpy()
        if array.size and array.max() <= 1.0 + 1e-6:
            array = array * 255.0
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8).squeeze())
    if isinstance(image, (bytes, bytearray, memoryview)):
        source, name = io.BytesIO(bytes(image)), f"<{len(image)} bytes>"
    elif isinstance(image, (str, os.PathLike)):
        source = name = os.fspath(image)
        if not os.path.isfile(source):
            raise UnreadableImageError(f"image file not found: {source}", "missing image")
    else:
        raise UnreadableImageError(f"cannot read an image from {type(image).__name__}")
    try:
        opened = Image.open(source)
        if max_side is not None and max(opened.size) > max_side:
            # JPEG decodes at 1/2, 1/4 or 1/8 scale when that still covers the bounded size; others ignore this
            scale = max_side / max(opened.size)
            opened.draft(None, (math.ceil(opened.width * scale), math.ceil(opened.height * scale)))
        opened.load()  # decode now: truncated files fail here, not later
        return opened
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"cannot decode image {name}: {error}") from error


def load_rgb_image(image: Any, max_side: int | None = None) -> Image.Image:
    """An 8-bit RGB PIL image from a PIL image, a path, bytes, a numpy array, a CHW float tensor (in [0, 1] or
    [0, 255]) or a {"bytes", "path"} dict.

    Transparency is composited on white; grayscale, palette, CMYK and 16-bit / float images are converted (16-bit
    scaled by its range); the EXIF orientation is applied. With `max_side`, a larger picture comes back with its
    longest side `max_side` (aspect ratio kept; a JPEG file is decoded at a reduced scale), so a huge file never
    costs its full size in memory (training uses `MAX_IMAGE_SIDE`). Raises `UnreadableImageError` for missing or
    corrupt images.
    """
    image = _open_image(image, max_side)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block is not a reason to lose the picture
        pass
    try:
        image = to_rgb8(image)
    except (ValueError, OSError) as error:
        raise UnreadableImageError(f"cannot convert image mode {image.mode} to RGB: {error}") from error
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)  # box-reduced by an integer factor first
    return image


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


# --------------------------------------------------------------------------------------------------- transforms


def _uniform(rng, low: float, high: float) -> float:
    """A uniform draw from a numpy or torch generator."""
    if isinstance(rng, np.random.Generator):
        return float(rng.uniform(low, high))
    import torch

    return float(low + (high - low) * torch.rand((), generator=rng).item())


class RandomResizedCrop:
    """Crops a random area (share `scale` of the picture, aspect ratio in `ratio`) and resizes it to `size` x `size`.

    The training augmentation of the open_clip recipe (scale 0.9-1.0), with PIL only. Deterministic given the
    generator (a `numpy.random.Generator` or a `torch.Generator`).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), resample=Image.BICUBIC):
        self.size, self.scale, self.ratio, self.resample = int(size), scale, ratio, resample

    def get_params(self, width: int, height: int, rng) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height), as torchvision's: ten tries, then a central crop."""
        area = width * height
        log_ratio = (np.log(self.ratio[0]), np.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(rng, *self.scale)
            aspect = float(np.exp(_uniform(rng, *log_ratio)))
            w, h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = min(int(_uniform(rng, 0, width - w + 1)), width - w)
                top = min(int(_uniform(rng, 0, height - h + 1)), height - h)
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: Image.Image, rng=None) -> Image.Image:
        rng = np.random.default_rng() if rng is None else rng
        left, top, w, h = self.get_params(image.width, image.height, rng)
        return image.resize((self.size, self.size), self.resample, box=(left, top, left + w, top + h))


class ResizeCenterCrop:
    """Evaluation transform: resizes the shorter side to `size`, then crops the centre square."""

    def __init__(self, size: int, resample=Image.BICUBIC):
        self.size, self.resample = int(size), resample

    def __call__(self, image: Image.Image, rng=None) -> Image.Image:
        side = min(image.width, image.height)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.resize((self.size, self.size), self.resample, box=(left, top, left + side, top + side))


# --------------------------------------------------------------------------------------------------- collation


class SkipCounter:
    """Counts skipped samples by reason and keeps a few example ids per reason.

    Reasons in `NOT_SKIPPED` ("truncated caption") are counted but the sample was used. Mergeable across data
    loader workers and processes: `merge(other)` takes a `SkipCounter` or its `state_dict()`.
    """

    NOT_SKIPPED = ("truncated caption",)

    def __init__(self, max_examples: int = 5):
        self.max_examples = max_examples
        self.counts: Counter = Counter()
        self.examples: dict[str, list] = {}

    def add(self, reason: str, example_id: Any = None, count: int = 1) -> None:
        self.counts[reason] += count
        examples = self.examples.setdefault(reason, [])
        if example_id is not None and len(examples) < self.max_examples:
            examples.append(example_id)

    @property
    def num_skipped(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason not in self.NOT_SKIPPED)

    def summary(self) -> dict[str, int]:
        """{reason: count} for every reason seen."""
        return dict(self.counts)

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state["counts"])
        self.examples = {k: list(v) for k, v in state["examples"].items()}

    def merge(self, other: SkipCounter | dict) -> SkipCounter:
        state = other.state_dict() if isinstance(other, SkipCounter) else other
        for reason, count in state["counts"].items():
            self.counts[reason] += count
            examples = self.examples.setdefault(reason, [])
            room = self.max_examples - len(examples)
            examples.extend(state["examples"].get(reason, [])[: max(room, 0)])
        return self

    def reset(self) -> None:
        self.counts.clear()
        self.examples.clear()

    def __repr__(self) -> str:
        return f"SkipCounter({self.summary()})"

    def warn(self, log: logging.Logger | None = None) -> str | None:
        """Logs one warning naming the reasons, their counts and a few example ids; returns it (None if empty)."""
        if not self.counts:
            return None
        parts = [f"{reason}: {count} (e.g. {', '.join(map(str, self.examples.get(reason, [])[:3])) or '?'})"
                 for reason, count in sorted(self.counts.items())]
        message = f"Skipped {self.num_skipped} samples; " + "; ".join(parts)
        (log or logger).warning(message)
        return message


def pad_token_ids(token_ids: list[list[int]], pad_token_id: int, padding_side: str = "right"):
    """(input_ids, attention_mask) int64 tensors of ragged id lists padded to the longest: what `tokenizer.pad`
    returns, built in one tensor fill instead of a Python pass over every row."""
    import torch

    lengths = torch.tensor([len(ids) for ids in token_ids])
    longest = int(lengths.max()) if len(token_ids) else 0
    positions = torch.arange(longest)
    mask = positions < lengths[:, None] if padding_side == "right" else positions >= longest - lengths[:, None]
    input_ids = torch.full((len(token_ids), longest), pad_token_id, dtype=torch.long)
    input_ids[mask] = torch.tensor([i for ids in token_ids for i in ids], dtype=torch.long)
    return input_ids, mask.long()


class ImageTextCollator:
    """Turns standardised examples into a model batch: decode, augment, pick a caption, tokenise, normalise.

    Bad samples (missing or unreadable image, no non-empty caption, a caption made only of unknown tokens) are
    skipped and counted in `skip_counter`, and so is the lost tail of a tar shard cut short (`TRUNCATED_SHARD`, on
    the last row read from it); a batch where every sample is bad has 0 rows (`batch["index"].numel() == 0`): skip
    it. Captions longer than `max_length` tokens are truncated by the tokenizer and counted as "truncated caption".
    Images are decoded with their longest side at most `MAX_IMAGE_SIDE`.

    Randomness (crop, caption choice) is drawn from a generator seeded with (seed, epoch, index), so it does not
    depend on the batch composition or the worker; call `set_epoch(epoch)` before each epoch (with data loader
    workers, before creating the epoch's iterator, and without `persistent_workers`). With workers, each worker
    counts in its own copy of the counter: pass `return_skip_counts=True` to get each batch's counts under
    "skip_counts" (pop it before calling the model) and merge them into a counter of the main process.
    `return_raw=True` also returns the augmented PIL images and the chosen captions under "images" / "texts".

    Args:
        processor: `processor(images=, return_tensors="pt")` and, for the captions, its `tokenizer`; without a
            `tokenizer` attribute, `processor(images=, text=, padding=True, truncation=True, max_length=,
            return_tensors="pt")`.
        train: random resized crop (training) or resize + centre crop (evaluation).
        image_size: output side of the crop, before the processor.
        caption_sampling: "random" (default for training) or "first" (default for evaluation).
        image_transform: replaces the crop: a callable (PIL image, numpy Generator) -> PIL image.
    """

    TOKEN_CACHE_SIZE = 2**17

    def __init__(self, processor, *, train: bool, image_size: int, max_length: int | None = None,
                 caption_sampling: str | None = None, seed: int = 0, skip_counter: SkipCounter | None = None,
                 image_transform: Callable | None = None, return_skip_counts: bool = False,
                 return_raw: bool = False):
        caption_sampling = caption_sampling or ("random" if train else "first")
        if caption_sampling not in ("random", "first"):
            raise ValueError(f"caption_sampling must be 'random' or 'first', not {caption_sampling!r}")
        self.processor, self.train, self.image_size = processor, train, int(image_size)
        self.max_length, self.caption_sampling, self.seed = max_length, caption_sampling, int(seed)
        self.skip_counter = skip_counter if skip_counter is not None else SkipCounter()
        self.image_transform = image_transform or (RandomResizedCrop(image_size) if train else ResizeCenterCrop(image_size))
        self.return_skip_counts = return_skip_counts
        self.return_raw = return_raw
        self.epoch = 0
        self._token_cache: dict[str, list[int]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _prepare(self, example: dict, position: int, counter: SkipCounter):
        """(image, caption, index) or None when the example is skipped."""
        index = int(example.get("index", position))
        if example.get("truncated_shard"):  # the last sample read from a shard cut short: its tail is lost
            counter.add(TRUNCATED_SHARD, example["truncated_shard"])
        captions = example.get("captions")
        if captions is None:
            captions = example.get("text", example.get("caption"))
        captions = [c for c in _as_caption_list(captions) if c.strip()]
        if not captions:
            counter.add("empty caption", index)
            return None
        try:
            image = load_rgb_image(example.get("image"), MAX_IMAGE_SIDE)
        except UnreadableImageError as error:
            counter.add(error.reason, index)
            logger.debug("skipping sample %s: %s", index, error)
            return None
        rng = self._rng(index)
        image = self.image_transform(image, rng)
        if self.caption_sampling == "random" and len(captions) > 1:
            caption = captions[int(rng.integers(len(captions)))]
        else:
            caption = captions[0]
        return image, caption.strip(), index

    def _tokenize(self, texts: list[str], indices: list[int], counter: SkipCounter) -> list[list[int] | None] | None:
        """Each caption's token ids, untruncated, or None for one to skip: a caption made only of unknown tokens
        (emoji, scripts the vocabulary lacks) would train on no word at all; an over-long one is kept and counted as
        truncated. None for all when the processor has no tokenizer (every caption is kept)."""
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            return None
        limit = self._max_length(tokenizer)
        unknown = tokenizer.unk_token_id
        structural = set(tokenizer.all_special_ids) - {unknown}
        kept = []
        for ids, index in zip(self._token_ids(tokenizer, texts), indices):
            words = [i for i in ids if i not in structural]
            if unknown is not None and words and all(i == unknown for i in words):
                counter.add("caption of unknown tokens only", index)
                kept.append(None)
                continue
            if limit and len(ids) > limit:
                counter.add("truncated caption", index)
            kept.append(ids)
        return kept

    def _token_ids(self, tokenizer, texts: list[str]) -> list[list[int]]:
        """Untruncated ids of each caption, tokenised once per collator: every epoch draws the same captions again,
        and tokenising them is a third of a small model's batch preparation. The cache stops growing at
        `TOKEN_CACHE_SIZE` captions (a data loader worker keeps its own)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._token_cache))
        fresh = dict(zip(missing, tokenizer(missing, truncation=False)["input_ids"])) if missing else {}
        room = self.TOKEN_CACHE_SIZE - len(self._token_cache)
        self._token_cache.update(list(fresh.items())[:max(room, 0)])
        return [self._token_cache[t] if t in self._token_cache else fresh[t] for t in texts]

    def _max_length(self, tokenizer) -> int | None:
        limit = self.max_length or getattr(tokenizer, "model_max_length", None)
        return limit if limit and limit <= 1_000_000 else None

    def _encode(self, images: list, texts: list[str], token_ids: list[list[int]] | None) -> dict:
        """pixel_values, input_ids and attention_mask. The ids from `_tokenize` are padded as they are (an over-long
        caption is tokenised again, truncated), so a caption is tokenised once; without ids, the processor does
        both."""
        if token_ids is None:
            encoded = self.processor(images=images, text=texts, padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            return {key: encoded[key] for key in ("pixel_values", "input_ids", "attention_mask")}
        tokenizer = self.processor.tokenizer
        limit = self._max_length(tokenizer)
        long = [i for i, ids in enumerate(token_ids) if limit and len(ids) > limit]
        if long:
            truncated = tokenizer([texts[i] for i in long], truncation=True, max_length=limit)["input_ids"]
            token_ids = list(token_ids)
            for i, ids in zip(long, truncated):
                token_ids[i] = ids
        input_ids, attention_mask = pad_token_ids(token_ids, tokenizer.pad_token_id, tokenizer.padding_side)
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        counter = SkipCounter(self.skip_counter.max_examples)
        prepared = [p for i, e in enumerate(examples) if (p := self._prepare(e, i, counter)) is not None]
        token_ids = None
        if prepared:
            token_ids = self._tokenize([p[1] for p in prepared], [p[2] for p in prepared], counter)
        if token_ids is not None:
            prepared = [p for p, ids in zip(prepared, token_ids) if ids is not None]
            token_ids = [ids for ids in token_ids if ids is not None]
        if prepared:
            images, texts, indices = map(list, zip(*prepared))
            batch = {**self._encode(images, texts, token_ids), "index": torch.tensor(indices, dtype=torch.long)}
        else:
            batch = {"pixel_values": torch.zeros(0, 3, self.image_size, self.image_size),
                     "input_ids": torch.zeros(0, 0, dtype=torch.long),
                     "attention_mask": torch.zeros(0, 0, dtype=torch.long),
                     "index": torch.zeros(0, dtype=torch.long)}
        self.skip_counter.merge(counter)
        if self.return_raw:  # the augmented PIL images and chosen captions, for online teachers (A-CLIP-PING)
            batch["images"], batch["texts"] = (images, texts) if prepared else ([], [])
        if self.return_skip_counts:
            batch["skip_counts"] = counter.state_dict()
        return batch
