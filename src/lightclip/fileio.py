"""Durable writes: a file or a folder is written beside its destination, flushed to disk, then renamed into place,
so a kill or a full disk leaves the previous contents or the new ones, never a torn file."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
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
    _move_entries(staging, root, [path.name for path in sorted(staging.iterdir()) if path.name != COMPLETE_MARKER])
    shutil.rmtree(staging)


def write_folder_atomic(folder: str | os.PathLike, write: Callable[[Path], None],
                        keep: Callable[[], bool] | None = None, marker: str | None = None) -> bool:
    """Write `folder` whole: `write(staging)` fills a new hidden folder beside it (`.<name>.<pid>.<random>.partial`, on
    the same file system), which is flushed and renamed to `folder`, so no reader sees half of it and a failure leaves
    `folder` as it was. Returns whether the new files are in place.

    A `folder` that holds files already is left as it is when `keep()` says so (another writer finished it first):
    the new files are dropped and False returned. Otherwise, with a `marker` (the file whose presence says the folder
    is complete) the new files are moved over the old ones one by one, the old marker removed first and the new one
    moved last, and the folder's other files stay; without one, the folder is replaced whole."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        write(staging)
        fsync_tree(staging)
        try:
            os.replace(staging, folder)  # succeeds only onto a missing or empty folder: of two writers, one wins
        except OSError:
            if keep is not None and keep():
                return False
            if marker is not None:
                (folder / marker).unlink(missing_ok=True)
                names = sorted(name for name in os.listdir(staging) if name != marker)
                _move_entries(staging, folder, [*names, marker])
                return True
            shutil.rmtree(folder)
            os.replace(staging, folder)
        fsync_path(folder.parent)
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_entries(source: Path, root: Path, names: Iterable[str]) -> None:
    """Move the named entries of `source` over `root`'s, in order (a folder replaces a folder whole), then flush
    `root`."""
    for name in names:
        target = root / name
        if (source / name).is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(source / name, target)
    fsync_path(root)
