"""Fingerprinted fp16 tables: the folder format of the feature banks (`neighbors.FeatureBank`) and of the teacher
embedding stores (`distillation.TeacherEmbeddingStore`).

A folder holds row-aligned safetensors tables (row i = dataset index i; L2-normalised fp16 features) and a JSON
metadata file recording what it was built from: the rows (`dataset_identity`: N and a fingerprint of the captions
and image references, computed without decoding an image) and the teachers. It is written whole
(`write_table_folder`), memory-mapped on load (`load_safetensors`), and refused, with every difference named, by a
run whose data or teachers differ (`read_matching_metadata`, `check_built_from`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.nn import functional as F

from .fileio import write_folder_atomic

__all__ = [
    "ImageTextTables",
    "check_built_from",
    "dataset_fingerprint",
    "dataset_identity",
    "gather_rows",
    "iter_rows",
    "load_safetensors",
    "read_folder_metadata",
    "read_matching_metadata",
    "renormalize_fp16_",
    "row_caption",
    "write_table_folder",
]


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _mmap_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a copy-on-write memory map (pages are read on first access)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    dtypes = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64, "BF16": None}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = dtypes.get(info["dtype"])
        start, end = info["data_offsets"]
        if dtype is None or end == start:  # unsupported dtype or empty tensor: read normally
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                tensors[name] = f.get_tensor(name)
            continue
        array = np.memmap(path, dtype=dtype, mode="c", offset=8 + header_len + start, shape=tuple(info["shape"]))
        tensors[name] = torch.from_numpy(array)
    return tensors


def load_safetensors(path: str, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped (read on first access) or read whole."""
    if mmap:
        return _mmap_safetensors(path)
    from safetensors.torch import load_file

    return load_file(path)


def read_folder_metadata(folder: str, file_name: str, format_version: int, what: str, build_hint: str) -> dict:
    """The metadata of a folder of stored features, after checking that it exists and has the format this code
    reads."""
    meta_path = os.path.join(folder, file_name)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{folder} is not a {what} (no {file_name}); build it with {build_hint}")
    with open(meta_path, encoding="utf-8") as f:
        metadata = json.load(f)
    if metadata.get("format_version") != format_version:
        raise ValueError(f"{folder}: {what} format version {metadata.get('format_version')}, this lightclip reads "
                         f"version {format_version}; rebuild the {what} with --overwrite")
    return metadata


class ImageTextTables:
    """Row-aligned image and text tables (row i = dataset index i): their length and widths."""

    image_features: torch.Tensor
    text_features: torch.Tensor

    def __len__(self) -> int:
        return self.image_features.shape[0]

    @property
    def image_dim(self) -> int:
        return self.image_features.shape[1]

    @property
    def text_dim(self) -> int:
        return self.text_features.shape[1]


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows] (float32 or int64) for a CPU table, through numpy: a single-threaded gather of a few hundred
    rows. torch's indexing kernels go parallel on such sizes and, on a busy machine, wait for OpenMP threads
    (measured 20-25 ms per call on 2 loaded cores against 0.05 ms here)."""
    if table.device.type != "cpu":
        return table.index_select(0, rows.to(table.device))
    out = table.numpy()[rows.numpy()]
    return torch.from_numpy(out.astype(np.float32) if out.dtype.kind == "f" else out.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# What a folder was built from
# ----------------------------------------------------------------------------------------------------------------


def row_caption(row: dict, caption_index: int) -> str:
    """The caption a row is encoded and fingerprinted by: `captions[caption_index]` (the last one when the row has
    fewer), or its lone "caption" / "text"; "" when it has none."""
    captions = row.get("captions")
    if captions is None:
        captions = row.get("caption", row.get("text"))
    if isinstance(captions, (list, tuple)):
        if not captions:
            return ""
        return str(captions[min(caption_index, len(captions) - 1)])
    return "" if captions is None else str(captions)


def _image_identity(image: Any) -> bytes:
    """Bytes that identify an image without decoding it: its path when it has one, else its content."""
    if isinstance(image, str):
        return image.encode()
    if isinstance(image, dict):
        if image.get("path"):
            return str(image["path"]).encode()
        return hashlib.sha256(image.get("bytes") or b"").digest()
    if hasattr(image, "tobytes"):  # PIL image or array
        filename = getattr(image, "filename", "")
        return filename.encode() if filename else hashlib.sha256(image.tobytes()).digest()
    return repr(image).encode()


def iter_rows(dataset, batch_size: int, decode: bool = True) -> Iterable[dict]:
    """Rows of a `datasets.Dataset` (batched, images optionally left undecoded), of an `IterableDataset` (tar shards,
    streaming) or of any sequence of dicts."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    if not decode and isinstance(features.get("image"), datasets.Image) and features["image"].decode:
        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # identify images by path or bytes
    if isinstance(dataset, datasets.Dataset):
        for batch in dataset.iter(batch_size=batch_size):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield dict(zip(keys, values))
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for i in range(len(dataset)):
            yield dataset[i]
    else:
        yield from dataset


def _fingerprint_and_len(dataset, caption_index: int, batch_size: int = 1024) -> tuple[str, int]:
    rows = hashlib.sha256()
    n = 0
    for row in iter_rows(dataset, batch_size, decode=False):
        rows.update(row_caption(row, caption_index).encode() + b"\x00")
        rows.update(_image_identity(row.get("image")) + b"\x01")
        n += 1
    h = hashlib.sha256(str(n).encode())
    h.update(rows.digest())
    return h.hexdigest(), n


def dataset_fingerprint(dataset, caption_index: int = 0, batch_size: int = 1024) -> str:
    """sha256 over N, each row's encoded caption (`captions[caption_index]`) and its image identity (path when the
    image has one, else a hash of its bytes). Independent of how the dataset was loaded, and computed without
    decoding images (one pass over the rows; streamed datasets are read once for it). `datasets`' own
    `_fingerprint` is recorded in bank.json too, for information only (it changes with every transform even when
    the content does not)."""
    return _fingerprint_and_len(dataset, caption_index, batch_size)[0]


def dataset_identity(dataset, caption_index: int = 0) -> dict:
    """What a bank or store records of the rows it is built from, to refuse other data later: N and
    `dataset_fingerprint`."""
    fingerprint, n = _fingerprint_and_len(dataset, caption_index)
    return {"n": n, "fingerprint": fingerprint}


def _rows(metadata: dict) -> str:
    n, fingerprint = metadata.get("n"), metadata.get("fingerprint")
    if n is None and fingerprint is None:
        return "rows it does not record"
    return f"{'?' if n is None else n} rows (fingerprint {(fingerprint or 'not recorded')[:12]})"


def _teacher_summary(meta: dict | None) -> str:
    if not meta:
        return "a teacher it does not record"
    details = [f"{meta['dim']}-d" if meta.get("dim") is not None else None, meta.get("model_type"),
               f"weights {meta['weights'][:12]}" if meta.get("weights") else None]
    details = [d for d in details if d]
    return f"{meta.get('spec')!r}" + (f" ({', '.join(details)})" if details else "")


def _identity_mismatches(found: dict, expected: dict) -> list[str]:
    """One line per difference between the stored metadata `found` and the `expected` identity: the rows and
    fingerprint of the dataset, each teacher (spec, width, weights) and any other expected key."""
    problems = []
    if any(found.get(key) != expected[key] for key in ("n", "fingerprint") if key in expected):
        problems.append(f"it was built on {_rows(found)} of another dataset; this data has {_rows(expected)}")
    for key, value in expected.items():
        if key in ("n", "fingerprint") or found.get(key) == value:
            continue
        if key == "teachers":  # {"image": {...}, "text": {...}}: only the modalities asked for are compared
            stored = found.get("teachers") or {}
            problems += [f"{modality} teacher: built with {_teacher_summary(stored.get(modality))}, requested "
                         f"{_teacher_summary(meta)}"
                         for modality, meta in value.items() if stored.get(modality) != meta]
        elif key == "teacher":
            problems.append(f"teacher: built with {_teacher_summary(found.get(key))}, requested "
                            f"{_teacher_summary(value)}")
        else:
            problems.append(f"{key}: stored {found.get(key)!r}, requested {value!r}")
    return problems


def check_built_from(found: dict, expected: dict, folder: str | None, what: str, rebuild: str) -> None:
    """Raise `ValueError` naming each difference between a folder's metadata and what this run needs, and how to
    rebuild it (`rebuild`, a sentence), so a folder built for other data or other teachers is never silently used.
    Metadata without the rows or the fingerprint counts as built for another dataset."""
    problems = _identity_mismatches(found, expected)
    if problems:
        raise ValueError(f"The {what} in {folder or '.'} was built for another dataset or other teachers:\n  "
                         + "\n  ".join(problems) + f"\n{rebuild}")


def read_matching_metadata(meta_path: str, expected: dict, format_version: int, what: str,
                           rebuild: str = "Pass overwrite=True (--overwrite) to rebuild it, or choose another output "
                                          "folder.") -> dict | None:
    """The metadata stored at `meta_path` when every key of `expected` and the format version match it; None when
    there is none. A mismatch raises `ValueError` naming each difference (`check_built_from`)."""
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path, encoding="utf-8") as f:
        found = json.load(f)
    expected = {**expected, "format_version": format_version}
    check_built_from(found, expected, os.path.dirname(meta_path), what, rebuild)
    return found


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def renormalize_fp16_(table: torch.Tensor, block_size: int = 65536) -> torch.Tensor:
    """L2-normalise the rows of an fp16 table again after the cast, in place and blockwise (no fp32 copy of it)."""
    for start in range(0, len(table), block_size):
        table[start:start + block_size] = F.normalize(table[start:start + block_size].float(), dim=-1).half()
    return table


def write_table_folder(out_dir: str, tables: dict[str, dict[str, torch.Tensor]], metadata_file: str,
                       metadata: dict, replace: bool = False) -> bool:
    """Write a bank's or store's safetensors `tables` ({file name: tensors}) and its metadata as one folder.

    The folder is written whole (`fileio.write_folder_atomic`), so no reader ever sees half of it and, of two builders
    of the same new folder, only the first to finish writes it: the other gets False (its files are dropped) and
    should read the winner's. `replace=True` (rebuilding a folder on purpose) replaces a folder that holds metadata
    already. A folder holding other files gets ours file by file, the metadata removed first and written last.
    """
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        for name, tensors in tables.items():
            save_file(tensors, str(staging / name), metadata={"format": "pt"})
        with open(staging / metadata_file, "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)

    meta_path = os.path.join(out_dir, metadata_file)
    return write_folder_atomic(out_dir, write, keep=lambda: not replace and os.path.exists(meta_path),
                               marker=metadata_file)
