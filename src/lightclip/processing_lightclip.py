"""Image processor, default tokenizer and processor for lightclip.

The default tokenizer is an uncased WordPiece whose vocabulary ships with the package (`data_files/vocab.txt`):
special tokens, every single character and its `##` continuation, common suffixes, then the most frequent English
words from `wordfreq` (see `utils/build_vocab.py`). A tokenizer of size V uses the first V entries, so the vocabulary
size is a config choice and any word can still be spelled. It needs no network and has a `[MASK]` token for MLM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerFast
from transformers.image_utils import is_scaled_image, is_valid_image, make_flat_list_of_images, to_numpy_array
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

VOCAB_FILE = Path(__file__).parent / "data_files" / "vocab.txt"
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[CLS]", "eos_token": "[SEP]",
                  "mask_token": "[MASK]"}


def build_default_tokenizer(vocab_size: int = 8192, model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """The package's offline WordPiece tokenizer with the first `vocab_size` entries of the shipped vocabulary.

    Ids: [PAD]=0, [UNK]=1, [CLS]=2 (start), [SEP]=3 (end of text, where the text tower pools), [MASK]=4.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = VOCAB_FILE.read_text(encoding="utf-8").splitlines()[:vocab_size]
    if len(words) < vocab_size:
        raise ValueError(f"the shipped vocabulary has {len(words)} entries; vocab_size={vocab_size} is too large")
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, padding_side="right", truncation_side="right",
        model_input_names=["input_ids", "attention_mask"], **SPECIAL_TOKENS,
    )


def _forget_call_state(tokenizer) -> None:
    """Drop the truncation a tokenizer kept from its last call. The fast backend stores it and `tokenizer.json` saves
    it; transformers reloads it as a `max_length` init kwarg, which the processor then passes to every call without
    a truncation strategy: a warning on `padding=True`, and a length that truncates nothing."""
    if tokenizer is None:
        return
    for key in ("max_length", "truncation_strategy"):
        tokenizer.init_kwargs.pop(key, None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()


def _high_bit_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit and float images as 8-bit, scaled by the range of their type (never clipped to 255).

    'I;16*': 0..65535. 'I': 0..65535 when the values fit (16-bit PNGs open as 'I'), else min..max.
    'F': 0..1 when the values fit, else 0..255, else 0..65535, else min..max.
    """
    array = np.asarray(image, dtype=np.float64)
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
        scale_lo, scale_hi = 0.0, 65535.0
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        scale_lo, scale_hi = 0.0, 1.0
    elif image.mode == "F" and lo >= 0 and hi <= 255:
        scale_lo, scale_hi = 0.0, 255.0
    elif image.mode == "F" and lo >= 0 and hi <= 65535:
        scale_lo, scale_hi = 0.0, 65535.0
    else:
        scale_lo, scale_hi = lo, max(hi, lo + 1e-12)
    return np.round((array - scale_lo) * 255.0 / (scale_hi - scale_lo)).clip(0, 255).astype(np.uint8)


def to_rgb8(image: Image.Image) -> Image.Image:
    """PIL image in any mode -> 8-bit RGB: 16-bit and float images rescaled by their range (not saturated),
    transparency composited on white, grayscale / palette / CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":  # 'I;16', 'I;16B', 'I', 'F'
        return Image.fromarray(_high_bit_depth_to_uint8(image)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _grayscale_as_pil(images):
    """2-D 8- and 16-bit arrays (H x W, in lists at any depth) as PIL grayscale images, which are converted to RGB
    like any other; a 2-D array of another type has no such reading."""
    if isinstance(images, (list, tuple)):
        return [_grayscale_as_pil(image) for image in images]
    if is_valid_image(images) and not isinstance(images, Image.Image) and images.ndim == 2:
        array = to_numpy_array(images)
        if array.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"a 2-D image array is read as a grayscale picture and must be uint8 or uint16, got "
                             f"{array.dtype} of shape {array.shape}")
        return Image.fromarray(array)
    return images


def _describe_images(images) -> str:
    """What was passed as images, by type and shape, never by value (an array's repr lists its pixels)."""
    if isinstance(images, (list, tuple)):
        first = f", the first {_describe_images(images[0])}" if images else ""
        return f"a {type(images).__name__} of {len(images)}{first}"
    if hasattr(images, "shape"):
        return f"an array of shape {tuple(images.shape)}"
    return f"a {type(images).__name__}"


class LightClipImageProcessor(CLIPImageProcessorPil):
    """CLIP preprocessing (resize shortest edge, centre crop, normalise) on PIL/numpy, no torchvision.

    Converts RGBA, grayscale, palette, CMYK and 16-bit images, and 2-D (grayscale) arrays, to 8-bit RGB instead of
    rejecting them.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int | None = None, **kwargs):
        if image_size is not None:
            kwargs.setdefault("size", {"shortest_edge": image_size})
            kwargs.setdefault("crop_size", {"height": image_size, "width": image_size})
        super().__init__(**kwargs)

    @classmethod
    def from_vision_config(cls, vision_config) -> "LightClipImageProcessor":
        """The processor a tower expects, at its `image_size`: CLIP's normalisation, but
        EfficientNet-Lite's (`IMAGENET_LITE_MEAN` / `IMAGENET_LITE_STD`, i.e. (x - 127) / 128, as its released ImageNet
        weights were trained) for `backbone="efficientnet-lite"`."""
        normalisation = {}
        if vision_config.backbone == "efficientnet-lite":
            from .configuration_lightclip import IMAGENET_LITE_MEAN, IMAGENET_LITE_STD

            normalisation = dict(image_mean=list(IMAGENET_LITE_MEAN), image_std=list(IMAGENET_LITE_STD))
        return cls(image_size=vision_config.image_size, **normalisation)

    def resize(self, image: np.ndarray, size, resample=None, reducing_gap=None, **kwargs) -> np.ndarray:
        """`CLIPImageProcessorPil.resize`, returning an 8-bit image that already has the target size as it is: PIL
        would only copy its pixels, after a round trip through a PIL image that costs as much as the rest of the
        preprocessing (training crops arrive at the tower's size)."""
        height, width = image.shape[-2:]
        if image.dtype == np.uint8 and reducing_gap is None and (
                (size.shortest_edge and not size.longest_edge and min(height, width) == size.shortest_edge)
                or (size.height, size.width) == (height, width)):
            return image
        return super().resize(image, size, resample=resample, reducing_gap=reducing_gap, **kwargs)

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        """`CLIPImageProcessorPil._prepare_images_structure`, reading a 2-D 8- or 16-bit array as a grayscale picture
        (as a PIL "L" image), and naming an input of no image shape by its shape: transformers' own error prints every
        pixel of it."""
        images = _grayscale_as_pil(self.fetch_images(images))
        try:
            return make_flat_list_of_images(images, expected_ndims=expected_ndims)
        except ValueError:
            raise ValueError(f"images must be PIL images or arrays of shape (H, W, C), (C, H, W) or (H, W), or a "
                             f"batch or list of them; got {_describe_images(images)}") from None

    def _preprocess(self, images: list[np.ndarray], do_resize, size, resample, do_center_crop, crop_size, do_rescale,
                    rescale_factor, do_normalize, image_mean, image_std, do_pad, pad_size, return_tensors, **kwargs):
        """`CLIPImageProcessorPil._preprocess`, with one shortcut: 8-bit images of one size are rescaled and normalised
        together by a table lookup (each channel's 256 levels through `rescale` then `normalize`, so the result is
        bit-identical), several times faster than image by image on a training batch. Float images already in [0, 1]
        are rescaled again, as in transformers, with its warning."""
        if do_rescale and any(is_scaled_image(image) for image in images):
            logger.warning_once(
                "It looks like you are trying to rescale already rescaled images. If the input"
                " images have pixel values between 0 and 1, set `do_rescale=False` to avoid rescaling them again."
            )
        if not (do_rescale and do_normalize) or do_pad:
            return super()._preprocess(images, do_resize, size, resample, do_center_crop, crop_size, do_rescale,
                                       rescale_factor, do_normalize, image_mean, image_std, do_pad, pad_size,
                                       return_tensors, **kwargs)
        sized = []
        for image in images:
            if do_resize:
                image = self.resize(image=image, size=size, resample=resample)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            sized.append(image)
        if sized and all(i.dtype == np.uint8 for i in sized) and len({i.shape for i in sized}) == 1:
            channels = sized[0].shape[0]
            levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], channels, axis=0)  # (C, 256, 1)
            table = self.normalize(self.rescale(levels, rescale_factor), image_mean, image_std).ravel()
            offsets = (np.arange(channels, dtype=np.uint16) * 256)[None, :, None, None]
            processed = np.take(table, np.stack(sized) + offsets)  # (N, C, H, W): channel c, value v -> table[256c + v]
        else:
            processed = [self.normalize(self.rescale(i, rescale_factor), image_mean, image_std) for i in sized]
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    def convert_to_rgb(self, image, input_data_format=None) -> np.ndarray:
        if isinstance(image, Image.Image):
            return np.asarray(to_rgb8(image))
        if isinstance(image, np.ndarray) and image.dtype == np.uint16:
            image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
        return super().convert_to_rgb(image, input_data_format=input_data_format)


class LightClipProcessor(ProcessorMixin):
    """Wraps a `LightClipImageProcessor` and a fast tokenizer into one callable, like `CLIPProcessor`.

    Example:

    ```python
    >>> from PIL import Image
    >>> from lightclip import LightClipProcessor
    >>> processor = LightClipProcessor.from_preset("lightclip-xxs")
    >>> batch = processor(text=["a red circle"], images=[Image.new("RGB", (48, 40))], return_tensors="pt")
    >>> batch["pixel_values"].shape
    torch.Size([1, 3, 32, 32])
    ```"""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)
        _forget_call_state(tokenizer)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        """`ProcessorMixin.validate_inputs`, refusing an empty list of texts, on which the tokenizer fails with an
        `IndexError`."""
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if isinstance(text, (list, tuple)) and not text:
            raise ValueError("text is an empty list: at least one text is needed")

    @classmethod
    def from_preset(cls, name: str, **config_overrides) -> "LightClipProcessor":
        """Build the processor matching `LightClipConfig.from_preset(name, **config_overrides)`, offline."""
        from .configuration_lightclip import LightClipConfig

        return cls.from_config(LightClipConfig.from_preset(name, **config_overrides))

    @classmethod
    def from_config(cls, config) -> "LightClipProcessor":
        """Default image processor (`LightClipImageProcessor.from_vision_config`) and tokenizer for a
        `LightClipConfig`."""
        text = config.text_config
        tokenizer = build_default_tokenizer(text.vocab_size, text.max_position_embeddings)
        expected = {"pad_token_id": text.pad_token_id, "bos_token_id": text.bos_token_id,
                    "eos_token_id": text.eos_token_id, "mask_token_id": text.mask_token_id}
        actual = {k: getattr(tokenizer, k) for k in expected}
        if actual != expected:
            raise ValueError(f"text_config special-token ids {expected} do not match the default tokenizer {actual}")
        return cls(LightClipImageProcessor.from_vision_config(config.vision_config), tokenizer)


__all__ = ["LightClipImageProcessor", "LightClipProcessor", "build_default_tokenizer", "to_rgb8"]
