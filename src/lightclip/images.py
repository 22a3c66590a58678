"""Decoding the pictures of the standardised rows: a path, bytes, a {"bytes", "path"} dict, a PIL image, an array or
a tensor as 8-bit RGB, with a bound on the decoded size. It sits below `data`, `evaluation` and the teachers, which
all read pictures this way, and imports nothing of the package but `to_rgb8`."""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .processing_lightclip import to_rgb8

# training pictures are decoded and kept with their longest side at most this many pixels: over 4x the largest
# preset's input (224 px), and at most 3 MB of 8-bit RGB each, whatever the size of the file
MAX_IMAGE_SIDE = 1024

__all__ = ["MAX_IMAGE_SIDE", "UnreadableImageError", "load_rgb_image"]


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
