"""The on-disk cache of the built-in datasets (`shapes`, `openclipart`): `save_to_disk` folders under `cache_root()`,
each written to a temporary folder and renamed, with a marker file written last, so a killed build leaves nothing
that loads as complete."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

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
    """Saves to a temporary folder beside `path`, writes the marker, then renames it to `path` (replacing an
    incomplete or stale folder there). A disk that refuses the write leaves no cache, and the caller keeps its
    in-memory dataset."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError as error:
        logger.warning("Not caching %s (%s)", path, error)
        return
    try:
        dataset.save_to_disk(tmp)
        with open(os.path.join(tmp, COMPLETE_MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, COMPLETE_MARKER)) and load_cached(path, dataset.features) is not None:
                return  # another process wrote a complete copy meanwhile
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as error:  # another process won the race, or the disk is full
        logger.debug("dataset cache not written at %s: %s", path, error)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
