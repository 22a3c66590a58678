"""From a standardised row to a model batch: the image transforms, the skip counter and `ImageTextCollator`.

The collator decodes each row's picture (`lightclip.images.load_rgb_image`), crops it (`RandomResizedCrop` in
training, `ResizeCenterCrop` in evaluation), picks and tokenises a caption, and skips and counts in a `SkipCounter`
the samples it cannot use, so a bad sample never stops the data loader. `as_caption_list`, the reading of a caption
cell, and `TRUNCATED_SHARD`, the skip reason of a tar shard's lost tail, are here because the sources
(`lightclip.data`, `lightclip.shards`) write what the collator reads: this module sits below both and imports nothing
of the package but `lightclip.images`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from PIL import Image

from .images import MAX_IMAGE_SIDE, UnreadableImageError, load_rgb_image

logger = logging.getLogger(__name__)

# the skip reason of the samples lost at the end of a tar shard that is cut short (counted once per shard and pass)
TRUNCATED_SHARD = "lost tail of a truncated tar shard"


# --------------------------------------------------------------------------------------------------- captions


def as_caption_list(value: Any) -> list[str]:
    """A caption cell (string, list of strings, dicts such as {"raw": ...}, None) as a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        for key in ("raw", "caption", "text", "captions", "sentences"):
            if key in value:
                return as_caption_list(value[key])
        return []
    if isinstance(value, Iterable):
        return [c for v in value for c in as_caption_list(v)]
    return [str(value)]


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
        self.image_transform = image_transform or (
            RandomResizedCrop(image_size) if train else ResizeCenterCrop(image_size))
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
        captions = [c for c in as_caption_list(captions) if c.strip()]
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
        # over-long captions are expected here (they are counted, then cut): not transformers' "longer than the
        # specified maximum sequence length" warning, which is meant for ids fed to the model as they are
        getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
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
