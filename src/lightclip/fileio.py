"""Durable writes: a file or a folder is written beside its destination, flushed to disk, then renamed into place,
so a kill or a full disk leaves the previous contents or the new ones, never a torn file."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# below this much free space a failed write is reported as a full disk (torch's zip writer says only "file write
# failed" when the disk fills)
NEARLY_FULL_BYTES = 64 * 2**20

STAGING_DIR = ".tmp-save"
COMPLETE_MARKER = ".complete"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file or folder entry to disk (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and folder under `root`, then `root` itself."""
    root = Path(root)
    for path in sorted(root.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(root)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(error: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a failed write was (most likely) a full disk."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def save_into_folder(root: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Run `save(staging)` into a staging folder inside `root`, flush it, mark it complete, then move its files over
    `root`'s. A failure while saving removes the staging folder and re-raises, leaving `root` as it was; a kill
    between the renames leaves a complete staging folder that `finish_interrupted_save` moves into place."""
    root = Path(root)
    staging = root / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        save(staging)
        fsync_tree(staging)
        (staging / COMPLETE_MARKER).touch()
        fsync_path(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_interrupted_save(root)


def finish_interrupted_save(root: str | os.PathLike) -> None:
    """Complete a `save_into_folder` that a kill stopped during its renames, or drop one stopped before it was
    complete: afterwards `root` holds either its previous files or every new one."""
    root = Path(root)
    staging = root / STAGING_DIR
    if not staging.is_dir():
        return
    if not (staging / COMPLETE_MARKER).exists():
        shutil.rmtree(staging, ignore_errors=True)
        return
    for path in sorted(staging.iterdir()):
        if path.name == COMPLETE_MARKER:
            continue
        target = root / path.name
        if path.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    fsync_path(root)
    shutil.rmtree(staging)
