"""Webdataset-style tar shards as an image-text source, read with the standard library's `tarfile`.

A source is a .tar file, a brace pattern ("shards-{000..009}.tar"), a glob or a folder of .tar files; a sample is
the consecutive files sharing a key (`key.jpg` + `key.txt` / `key.json`). `load_tar_shards` reads every shard's
headers first, so that each row's "index" is its global position and a shard cut short is named before training;
`lightclip.data.load_image_text_dataset` calls it for tar sources.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator

from .collate import TRUNCATED_SHARD, as_caption_list

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


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
                captions.extend(as_caption_list(meta.get(field)))
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


def load_tar_shards(source: str, max_samples: int | None = None):
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
