"""Tokenizer and image processor: special ids, English coverage, image modes, a numpy reference, save/load."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, context_length, make_config, random_rgb
from PIL import Image

from lightclip import LightClipConfig, LightClipProcessor, build_default_tokenizer
from lightclip.processing_lightclip import to_rgb8

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])

COMMON_WORDS = (
    "the of and to in is was for on with as at by from that this it he she they we you a an photo picture image man "
    "woman people child dog cat car house tree water street red blue green white black small large big two three "
    "sitting standing running playing table room city beautiful"
).split()


def normalise(rgb_uint8: np.ndarray) -> np.ndarray:
    """Reference: HWC uint8 -> CHW float, rescaled to [0, 1] and normalised with CLIP's mean and std."""
    return ((rgb_uint8.astype(np.float64) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def resize_crop_reference(image: Image.Image, size: int) -> np.ndarray:
    """Reference: shortest edge to `size` (long edge floored, keeping the aspect), bicubic, then centre crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = (size, int(height * scale)) if width <= height else (int(width * scale), size)
    resized = np.asarray(image.resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return normalise(resized[top: top + size, left: left + size])


def pixels(processor, image) -> np.ndarray:
    return processor(images=image, return_tensors="pt")["pixel_values"][0].double().numpy()


# --------------------------------------------------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("preset", ["lightclip-xxs", "lightclip-xs"])
def test_tokenizer_special_ids_match_text_config(preset):
    text = LightClipConfig.from_preset(preset).text_config
    tokenizer = LightClipProcessor.from_preset(preset).tokenizer
    assert tokenizer.mask_token == "[MASK]"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id,
            tokenizer.unk_token_id) == (text.pad_token_id, text.bos_token_id, text.eos_token_id, text.mask_token_id,
                                        text.unk_token_id)
    assert sorted(text.special_token_ids) == sorted(tokenizer.all_special_ids)
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 2, 3, 4]
    assert len(tokenizer) == text.vocab_size
    assert tokenizer.model_max_length == text.max_position_embeddings


def test_processor_rejects_mismatched_special_ids():
    with pytest.raises(ValueError, match="special-token ids"):
        LightClipProcessor.from_config(make_config(text_config=dict(eos_token_id=7)))


def test_encoding_is_bos_words_eos(tokenizer):
    encoded = tokenizer("A Dog.")["input_ids"]
    assert encoded[0] == 2 and encoded[-1] == 3
    assert tokenizer.convert_ids_to_tokens(encoded[1:-1]) == ["a", "dog", "."]


def test_common_english_words_are_single_tokens(tokenizer):
    split = {w: tokenizer.tokenize(w) for w in COMMON_WORDS if tokenizer.tokenize(w) != [w]}
    assert split == {}


def test_rare_words_are_spelled_in_pieces(tokenizer):
    for word in ["floccinaucinihilipilification", "zzyzx", "qwj"]:
        pieces = tokenizer.tokenize(word)
        assert len(pieces) > 1 and "[UNK]" not in pieces
        assert not pieces[0].startswith("##") and all(p.startswith("##") for p in pieces[1:])
        assert "".join(p.removeprefix("##") for p in pieces) == word


def test_ascii_words_never_unknown(tokenizer):
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    ids = tokenizer(" ".join(words))["input_ids"]
    assert tokenizer.unk_token_id not in ids
    lower = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 12))) for _ in range(100)]
    assert tokenizer.decode(tokenizer(" ".join(lower))["input_ids"], skip_special_tokens=True) == " ".join(lower)


def test_vocab_size_is_a_prefix_of_one_vocabulary():
    small, large = build_default_tokenizer(4096), build_default_tokenizer(8192)
    assert small("a dog")["input_ids"] == large("a dog")["input_ids"]
    full = build_default_tokenizer(32768)
    assert len(full) == 32768 and "" not in full.get_vocab()
    with pytest.raises(ValueError, match="too large"):
        build_default_tokenizer(32769)  # the file's trailing newline is not an entry


# --------------------------------------------------------------------------------------------------------------------
# image modes


def test_rgba_composited_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red
    rgba[1, 0] = (255, 0, 0, 128)  # half transparent red: 128/255 red over white
    rgb = np.asarray(to_rgb8(Image.fromarray(rgba, mode="RGBA"))).astype(int)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [255, 0, 0]
    assert np.abs(rgb[1, 0] - [255, 127, 127]).max() <= 1


def test_transparent_image_through_processor_is_white(processor):
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    expected = normalise(np.full((32, 32, 3), 255, dtype=np.uint8))
    np.testing.assert_allclose(pixels(processor, image), expected, atol=1e-5)


def test_grayscale_and_palette():
    gray = np.asarray(to_rgb8(Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), mode="L")))
    assert gray[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30, 70, 80, 90] + [0] * (256 * 3 - 9))
    palette.putpixel((0, 0), 1)
    palette.putpixel((1, 0), 2)
    assert np.asarray(to_rgb8(palette))[0].tolist() == [[10, 200, 30], [70, 80, 90]]
    palette.info["transparency"] = 2  # index 2 is transparent: becomes white
    assert np.asarray(to_rgb8(palette))[0].tolist() == [[10, 200, 30], [255, 255, 255]]


def test_16_bit_rescaled_not_saturated(tmp_path):
    values = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    expected = [255, 128, 0, 1]
    assert np.asarray(to_rgb8(image))[0, :, 0].tolist() == expected
    image.save(tmp_path / "deep.png")  # a 16-bit PNG reopens as "I;16" or "I": same result
    assert np.asarray(to_rgb8(Image.open(tmp_path / "deep.png")))[0, :, 0].tolist() == expected


@pytest.mark.parametrize("as_numpy", [False, True])
def test_16_bit_through_processor(processor, as_numpy):
    deep = np.full((32, 32), 32768, dtype=np.uint16)
    image = np.repeat(deep[..., None], 3, axis=-1) if as_numpy else Image.fromarray(deep)
    expected = normalise(np.full((32, 32, 3), 128, dtype=np.uint8))
    np.testing.assert_allclose(pixels(processor, image), expected, atol=1e-5)


def test_numpy_uint8_hwc_equals_pil(processor):
    array = random_rgb(40, 56)
    np.testing.assert_array_equal(pixels(processor, array), pixels(processor, Image.fromarray(array)))


def test_matching_size_only_normalises(processor):
    array = random_rgb(32, 32, seed=3)
    np.testing.assert_allclose(pixels(processor, Image.fromarray(array)), normalise(array), atol=1e-5)
    np.testing.assert_allclose(processor.image_processor.image_mean, CLIP_MEAN)
    np.testing.assert_allclose(processor.image_processor.image_std, CLIP_STD)


@pytest.mark.parametrize("height, width", [(48, 64), (90, 40), (300, 200)])
def test_resize_and_crop_match_reference(processor, height, width):
    image = Image.fromarray(random_rgb(height, width, seed=height))
    out = pixels(processor, image)
    assert out.shape == (3, 32, 32)
    # bicubic uint8 rounding may differ by one level: 1 / 255 / std
    np.testing.assert_allclose(out, resize_crop_reference(image, 32), atol=1.01 / 255 / CLIP_STD.min())


def test_centre_crop_takes_the_middle(processor):
    stripes = np.zeros((32, 96, 3), dtype=np.uint8)
    stripes[:, :32] = (255, 0, 0)
    stripes[:, 32:64] = (0, 255, 0)
    stripes[:, 64:] = (0, 0, 255)
    np.testing.assert_allclose(pixels(processor, stripes), normalise(stripes[:, 32:64]), atol=1e-5)


def test_images_at_the_target_size_skip_the_resize_with_the_same_pixels(processor):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ours = processor.image_processor
    reference = CLIPImageProcessorPil(size=ours.size, crop_size=ours.crop_size, image_mean=ours.image_mean,
                                      image_std=ours.image_std, resample=ours.resample)
    images = [Image.fromarray(random_rgb(32, 32, seed=1)), random_rgb(32, 45, seed=2), random_rgb(50, 32, seed=3),
              Image.fromarray(random_rgb(20, 24, seed=4)), np.random.default_rng(5).random((32, 32, 3))]
    for image in images:
        options = {"do_rescale": False} if isinstance(image, np.ndarray) and image.dtype != np.uint8 else {}
        ours_pixels = ours(image, return_tensors="pt", **options)["pixel_values"]
        assert torch.equal(ours_pixels, reference(image, return_tensors="pt", **options)["pixel_values"])


@pytest.mark.parametrize("lite", [False, True])
def test_batched_normalisation_is_bit_identical_to_image_by_image(lite):
    """The table lookup over a batch of 8-bit pictures of one size gives the per-image path's floats exactly; a batch
    of several sizes or a float picture takes that path."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = LightClipConfig.from_preset("lightclip-xxs-lite0" if lite else "lightclip-xxs")
    ours = LightClipProcessor.from_config(config).image_processor
    reference = CLIPImageProcessorPil(size=ours.size, crop_size=ours.crop_size, image_mean=ours.image_mean,
                                      image_std=ours.image_std, resample=ours.resample)
    side = config.vision_config.image_size
    same_size = [Image.fromarray(random_rgb(side, side, seed=k)) for k in range(5)]
    same_size[0] = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (side * side * 3 // 256 + 1))[
        : side * side * 3].reshape(side, side, 3))  # every level in every channel
    mixed = same_size[:2] + [random_rgb(side + 9, side + 3, seed=9)]
    floats = [np.random.default_rng(5).random((side, side, 3)), np.random.default_rng(6).random((side, side, 3))]
    for images, options in ((same_size, {}), (mixed, {}), (floats, {"do_rescale": False})):
        ours_pixels = ours(images=images, return_tensors="pt", **options)["pixel_values"]
        assert ours_pixels.dtype == torch.float32
        assert torch.equal(ours_pixels, reference(images=images, return_tensors="pt", **options)["pixel_values"])


def test_batch_of_mixed_images(processor):
    images = [Image.new("RGBA", (20, 100)), Image.new("L", (64, 64)), random_rgb(33, 47),
              Image.fromarray(np.zeros((10, 10), dtype=np.uint16))]
    assert processor(images=images, return_tensors="pt")["pixel_values"].shape == (4, 3, 32, 32)


# --------------------------------------------------------------------------------------------------------------------
# processor


def test_processor_call_combines_text_and_images(processor):
    batch = processor(text=CAPTIONS, images=[random_rgb(32, 32)] * 2, padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    lengths = [len(processor.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert batch["input_ids"].shape == (len(CAPTIONS), max(lengths))
    assert batch["attention_mask"].sum(-1).tolist() == lengths


def test_processor_save_load_round_trip(saved_dir, processor):
    loaded = LightClipProcessor.from_pretrained(saved_dir)
    images = [random_rgb(48, 40, seed=1), Image.new("RGBA", (32, 32), (5, 6, 7, 100))]
    before = processor(text=CAPTIONS, images=images, padding=True, return_tensors="pt")
    after = loaded(text=CAPTIONS, images=images, padding=True, return_tensors="pt")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert (loaded.tokenizer.mask_token_id, loaded.tokenizer.model_max_length) == (4, context_length())


def test_a_saved_tokenizer_does_not_carry_its_last_truncation(tmp_path):
    """A tokenizer called with truncation saves that state in tokenizer.json; reloaded, the processor must not pass it
    on as a bare `max_length` (transformers warns, and the length truncates nothing)."""
    import warnings

    processor = LightClipProcessor.from_preset("lightclip-xxs")
    processor(text=["a red circle"], padding=True, truncation=True, max_length=10)
    processor.save_pretrained(tmp_path)
    reloaded = LightClipProcessor.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = reloaded(text=["a red circle", "a blue star on a long striped background"], padding=True)
    assert len(batch["input_ids"][1]) > 10
    assert "max_length" not in reloaded.tokenizer.init_kwargs
