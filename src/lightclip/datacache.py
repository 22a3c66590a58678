"""The on-disk cache of the built-in datasets (`shapes`, `openclipart`): `save_to_disk` folders under `cache_root()`,
each written whole beside its place and renamed (`fileio.write_folder_atomic`), with a marker file that says it is
complete, so a killed build leaves nothing that loads as complete."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .fileio import write_folder_atomic

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "lightclip_complete.json"


def cache_root() -> str:
    """`$LIGHTCLIP_CACHE` or `~/.cache/lightclip`."""
    return os.environ.get("LIGHTCLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightclip")


def load_cached(path: str, features, num_rows: int | None = None):
    """The complete cached dataset at `path` when it has these `features` (and `num_rows`), else None: a partial,
    corrupted or older cache is rebuilt by the caller."""
    import datasets

    if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        return None
    try:
        dataset = datasets.load_from_disk(path)
    except Exception as error:
        logger.warning("Rebuilding the dataset cache at %s: unreadable (%s)", path, error)
        return None
    if dataset.features != features or (num_rows is not None and len(dataset) != num_rows):
        return None
    return dataset


def read_marker(path: str) -> dict:
    """The marker written with a cached dataset (what its builder recorded, e.g. skip counts)."""
    with open(os.path.join(path, COMPLETE_MARKER), encoding="utf-8") as f:
        return json.load(f)


def save_atomically(dataset, path: str, marker: dict) -> None:
    """Saves into a folder beside `path` with the marker, then renames it to `path` (`write_folder_atomic`),
    replacing an incomplete or stale folder there but not a complete copy another process wrote meanwhile. A disk
    that refuses the write leaves no cache, and the caller keeps its in-memory dataset."""

    def write(folder: Path) -> None:
        dataset.save_to_disk(str(folder))
        with open(folder / COMPLETE_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f)

    try:
        write_folder_atomic(path, write, keep=lambda: load_cached(path, dataset.features) is not None)
    except OSError as error:  # a full or read-only disk
        logger.warning("Not caching %s (%s)", path, error)
