import io
import json
import logging
import os
import tarfile

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HfArgumentParser

from lightclip import collate, data, shards
from lightclip.collate import ImageTextCollator, RandomResizedCrop, ResizeCenterCrop, SkipCounter
from lightclip.data import DataArguments, DecodedImageTextDataset, decode_images_once, load_image_text_dataset
from lightclip.images import UnreadableImageError, load_rgb_image

WORDS = "a an the red green blue photo of picture cat dog circle square big small on left right very long".split()


class FakeProcessor:
    """An HF-style processor: a WordLevel tokenizer built in memory and a numpy normaliser."""

    def __init__(self, image_size=16, model_max_length=32):
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + WORDS)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
            model_max_length=model_max_length)
        self.image_size = image_size
        self.seen_images = []

    def __call__(self, images, text=None, padding=True, truncation=True, max_length=None, return_tensors="pt"):
        self.seen_images = list(images)
        arrays = [np.asarray(im.convert("RGB").resize((self.image_size,) * 2), dtype=np.float32) / 127.5 - 1
                  for im in images]
        out = {} if text is None else dict(self.tokenizer(text, padding=padding, truncation=truncation,
                                                          max_length=max_length, return_tensors=return_tensors))
        out["pixel_values"] = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return out


def _png(path, colour=(200, 30, 30), size=(24, 20)):
    Image.new("RGB", size, colour).save(path)
    return os.path.basename(path)


def _rows(n=3):
    return [(f"im{i}.png", f"a red circle {i}") for i in range(n)]


def _check_standard(dataset, n, first_caption="a red circle 0"):
    rows = list(dataset)
    assert len(rows) == n
    assert [r["index"] for r in rows] == list(range(n))
    assert rows[0]["captions"] == [first_caption]
    assert load_rgb_image(rows[0]["image"]).size == (24, 20)
    return rows


# --------------------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_imagefolder(tmp_path, metadata):
    for name, _ in _rows():
        _png(tmp_path / name)
    if metadata == "jsonl":
        lines = [json.dumps({"file_name": n, "text": c}) for n, c in _rows()]
        (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    else:
        (tmp_path / "metadata.csv").write_text("file_name,text\n" + "".join(f"{n},{c}\n" for n, c in _rows()))
    assert data.detect_source_kind(str(tmp_path)) == "imagefolder"
    rows = _check_standard(load_image_text_dataset(str(tmp_path)), 3)
    assert sorted(r["captions"][0] for r in rows) == [c for _, c in _rows()]


def test_csv_file_relative_and_absolute_paths(tmp_path):
    (tmp_path / "img").mkdir()
    names = [_png(tmp_path / "img" / n) for n, _ in _rows()]
    lines = [f"img/{names[0]},a red circle 0", f"{tmp_path / 'img' / names[1]},a red circle 1"]
    (tmp_path / "pairs.csv").write_text("filepath,caption\n" + "\n".join(lines) + "\n")
    dataset = load_image_text_dataset(str(tmp_path / "pairs.csv"))
    assert isinstance(dataset, datasets.Dataset) and set(dataset.column_names) == {"image", "captions", "index"}
    _check_standard(dataset, 2)


def test_jsonl_file_with_several_captions(tmp_path):
    rows = [{"image_path": _png(tmp_path / n), "captions": [c, c + " again"], "label": i}
            for i, (n, c) in enumerate(_rows())]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = load_image_text_dataset(str(tmp_path / "pairs.jsonl"), max_samples=2)
    assert dataset[1]["captions"] == ["a red circle 1", "a red circle 1 again"]
    assert dataset["label"] == [0, 1] and len(dataset) == 2


def test_several_caption_columns(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "p.csv").write_text("file_name,caption_1,caption_2\na.png,a red cat,a big cat\n")
    assert load_image_text_dataset(str(tmp_path / "p.csv"))[0]["captions"] == ["a red cat", "a big cat"]
    only = load_image_text_dataset(str(tmp_path / "p.csv"), caption_column="caption_2")
    assert only[0]["captions"] == ["a big cat"]


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _png_bytes(colour=(10, 200, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tar_shards_brace_pattern(tmp_path):
    for s in range(3):
        samples = [(f"s{s}/k{k}", {"jpg": _png_bytes(), "txt": f"shard {s} item {k}".encode()}) for k in range(2)]
        if s == 1:  # captions from json, and a sample without caption
            samples[0] = ("s1/k0", {"png": _png_bytes(), "json": json.dumps({"captions": ["x", "y"]}).encode()})
            samples.append(("s1/k2", {"jpg": _png_bytes()}))
        _write_shard(tmp_path / f"shards-{s:03d}.tar", samples)
    _write_shard(tmp_path / "shards-009.tar", [("other", {"jpg": _png_bytes(), "txt": b"not included"})])
    pattern = str(tmp_path / "shards-{000..002}.tar")
    assert shards.expand_braces(pattern)[-1].endswith("shards-002.tar")
    dataset = load_image_text_dataset(pattern)
    assert isinstance(dataset, datasets.IterableDataset)
    rows = list(dataset)
    assert [r["index"] for r in rows] == list(range(7))
    assert [r["captions"] for r in rows][:5] == [["shard 0 item 0"], ["shard 0 item 1"], ["x", "y"],
                                                 ["shard 1 item 1"], []]
    assert load_rgb_image(rows[2]["image"]).getpixel((0, 0)) == (10, 200, 10)
    assert [r["index"] for r in load_image_text_dataset(str(tmp_path), max_samples=3)] == [0, 1, 2]  # folder
    assert len(list(load_image_text_dataset(str(tmp_path)))) == 8
    with pytest.raises(FileNotFoundError):
        load_image_text_dataset(str(tmp_path / "shards-{003..004}.tar"))


def test_expand_braces():
    assert shards.expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert shards.expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]


def test_hub_dataset_via_load_dataset(monkeypatch):
    calls = []
    images = [Image.new("RGB", (24, 20), (i, i, i)) for i in range(3)]
    hub = datasets.Dataset.from_dict(
        {"img": images, "sentences": [[{"raw": f"cat {i}"}, {"raw": f"dog {i}"}] for i in range(3)]},
        features=datasets.Features({"img": datasets.Image(),
                                    "sentences": datasets.List({"raw": datasets.Value("string")})}))

    def fake_load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        calls.append((name, config, split, streaming))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_image_text_dataset("someone/flickr-like", "test", config_name="cfg", max_samples=2)
    assert calls == [("someone/flickr-like", "cfg", "test", False)]
    assert dataset[1]["captions"] == ["cat 1", "dog 1"] and len(dataset) == 2
    assert load_rgb_image(dataset[1]["image"]).getpixel((0, 0)) == (1, 1, 1)


def test_shapes_source_and_args(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_CACHE", str(tmp_path))
    parser = HfArgumentParser(DataArguments)
    args = parser.parse_args(["--shapes_train_size", "12", "--shapes_test_size", "6", "--shapes_image_size", "32"])
    train, validation = data.load_datasets_from_args(args)
    assert len(train) == 12 and len(validation) == 6
    assert train[0]["image"]["bytes"] != validation[0]["image"]["bytes"]
    assert {"image", "captions", "index", "shape", "colour"} <= set(train.column_names)
    assert load_rgb_image(train[0]["image"]).size == (32, 32)
    args = parser.parse_args(["--train_data", "someone/x"])
    assert args.validation_data is None and args.image_column is None


# --------------------------------------------------------------------------------------------------- bad samples


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    _png(tmp_path / "good0.png")
    _png(tmp_path / "good1.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    lines = ["good0.png,a red cat", "corrupt.png,a blue dog", "missing.png,a green cat",
             "good1.png,   ", "good1.png,a small dog"]
    (tmp_path / "pairs.csv").write_text("file_name,text\n" + "\n".join(lines) + "\n")
    dataset = load_image_text_dataset(str(tmp_path / "pairs.csv"))
    counter = SkipCounter()
    collator = ImageTextCollator(FakeProcessor(), train=True, image_size=16, skip_counter=counter)
    batch = collator([dataset[i] for i in range(len(dataset))])
    assert batch["index"].tolist() == [0, 4]
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["input_ids"].shape[0] == 2
    assert counter.summary() == {"unreadable image": 1, "missing image": 1, "empty caption": 1}
    assert counter.examples == {"unreadable image": [1], "missing image": [2], "empty caption": [3]}
    empty = collator([dataset[1], dataset[2]])  # a batch with only bad samples
    assert empty["index"].numel() == 0 and empty["pixel_values"].shape[0] == 0 and empty["input_ids"].shape[0] == 0
    assert counter.num_skipped == 5
    with caplog.at_level(logging.WARNING):
        message = counter.warn(logging.getLogger("test"))
    assert "missing image: 2" in message and "Skipped 5" in caplog.text


def test_images_decoded_once_give_the_same_batches_and_skips(tmp_path):
    names = [_png(tmp_path / f"im{i}.png", colour=(40 * i, 30, 200 - 40 * i), size=(24 + i, 20)) for i in range(4)]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    lines = [f"{names[0]},a red cat", "corrupt.png,a blue dog", f"{names[1]},a green cat", "missing.png,a cat",
             f"{names[2]},a small dog", f"{names[3]},a big dog"]
    (tmp_path / "pairs.csv").write_text("file_name,text\n" + "\n".join(lines) + "\n")
    dataset = load_image_text_dataset(str(tmp_path / "pairs.csv"))
    decoded = decode_images_once(dataset, max_bytes=2**20, probe=2)
    assert isinstance(decoded, DecodedImageTextDataset) and len(decoded) == len(dataset)
    batches, counters = [], []
    for rows in (dataset, decoded):
        counter = SkipCounter()
        collator = ImageTextCollator(FakeProcessor(), train=True, image_size=16, seed=3, skip_counter=counter)
        collator.set_epoch(2)
        batches.append(collator([rows[i] for i in range(len(rows))]))
        counters.append(counter.state_dict())
    assert batches[0].keys() == batches[1].keys() and batches[0]["index"].tolist() == [0, 2, 4, 5]
    assert all(torch.equal(batches[0][key], batches[1][key]) for key in batches[0])
    assert counters[0] == counters[1] and counters[1]["counts"] == {"unreadable image": 1, "missing image": 1}
    # 6,120 bytes of pixels: estimated as 8,640 from the first row, as 4,320 from the first two (one unreadable)
    assert decode_images_once(dataset, max_bytes=5000, probe=1) is dataset
    assert decode_images_once(dataset, max_bytes=5000, probe=2) is dataset
    assert decode_images_once(dataset, max_bytes=0) is dataset
    streamed = dataset.to_iterable_dataset()
    assert decode_images_once(streamed, max_bytes=2**20) is streamed


def test_skip_counter_merge_and_state():
    a, b = SkipCounter(max_examples=2), SkipCounter(max_examples=2)
    a.add("missing image", 1)
    b.add("missing image", 7)
    b.add("missing image", 8)
    b.add("truncated caption", 9)
    merged = SkipCounter(max_examples=2).merge(a).merge(b.state_dict())
    assert merged.summary() == {"missing image": 3, "truncated caption": 1}
    assert merged.examples["missing image"] == [1, 7] and merged.num_skipped == 3
    restored = SkipCounter()
    restored.load_state_dict(json.loads(json.dumps(merged.state_dict())))
    assert restored.summary() == merged.summary()
    assert SkipCounter().warn() is None


def test_over_long_captions_are_counted_without_a_tokenizer_warning():
    """The collator tokenises captions untruncated to count the ones it cuts: transformers' warning about ids longer
    than the model's maximum (meant for ids fed to the model as they are) must not reach the user."""
    import logging

    from lightclip import LightClipProcessor

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    library_logger = logging.getLogger("transformers")  # transformers' handler sits on it; records reach it
    library_logger.addHandler(records)
    try:
        processor = LightClipProcessor.from_preset("lightclip-lite0-56px")  # the package tokenizer, context 64
        collator = ImageTextCollator(processor, train=False, image_size=16)
        image = Image.new("RGB", (20, 20))
        batch = collator([{"image": image, "captions": [" ".join(["a red cat"] * 40)], "index": 0}])
    finally:
        library_logger.removeHandler(records)
    assert batch["input_ids"].shape == (1, 64)
    assert collator.skip_counter.summary() == {"truncated caption": 1}
    assert not [m for m in records.messages if "longer than the specified maximum" in m], records.messages


def test_truncated_captions_keep_end_token():
    processor = FakeProcessor()
    collator = ImageTextCollator(processor, train=False, image_size=16, max_length=6)
    image = Image.new("RGB", (20, 20))
    batch = collator([{"image": image, "captions": ["a red cat on the left very very long"], "index": 0},
                      {"image": image, "captions": ["a cat"], "index": 1}])
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0, -1].item() == processor.tokenizer.eos_token_id
    assert collator.skip_counter.summary() == {"truncated caption": 1}
    assert collator.skip_counter.num_skipped == 0


def test_captions_of_unknown_tokens_only_are_skipped_and_counted():
    collator = ImageTextCollator(FakeProcessor(), train=False, image_size=16)
    image = Image.new("RGB", (20, 20))
    batch = collator([{"image": image, "captions": ["\U0001F600 \U0001F431"], "index": 0},
                      {"image": image, "captions": ["\u4e2d\u6587"], "index": 1},
                      {"image": image, "captions": ["a \U0001F431"], "index": 2}])  # one known word: kept
    assert batch["index"].tolist() == [2]
    assert collator.skip_counter.summary() == {"caption of unknown tokens only": 2}
    assert collator.skip_counter.num_skipped == 2
    empty = collator([{"image": image, "captions": ["\U0001F600"], "index": 3}])
    assert empty["index"].numel() == 0 and empty["input_ids"].shape == (0, 0)


def test_caption_sampling_per_epoch_is_deterministic():
    captions = [f"a red cat {w}" for w in ("on", "left", "right", "big", "small", "photo")]
    examples = [{"image": Image.new("RGB", (20, 20)), "captions": captions, "index": i} for i in range(8)]

    def chosen(seed, epoch):
        processor = FakeProcessor()
        collator = ImageTextCollator(processor, train=True, image_size=16, seed=seed)
        collator.set_epoch(epoch)
        return processor.tokenizer.batch_decode(collator(examples)["input_ids"], skip_special_tokens=True)

    assert chosen(0, 0) == chosen(0, 0)
    assert chosen(0, 0) != chosen(0, 1) and chosen(0, 1) != chosen(1, 1)
    assert len(set(chosen(0, 0))) > 1
    first = ImageTextCollator(FakeProcessor(), train=True, image_size=16, caption_sampling="first")
    assert first(examples)["input_ids"].shape[0] == 8
    decoded = first.processor.tokenizer.batch_decode(first(examples)["input_ids"], skip_special_tokens=True)
    assert set(decoded) == {captions[0]}


def test_train_crop_is_seeded_by_epoch_and_index():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    processor = FakeProcessor(image_size=16)
    collator = ImageTextCollator(processor, train=True, image_size=16, seed=5)
    collator([{"image": image, "captions": ["a cat"], "index": 3}])
    first = np.asarray(processor.seen_images[0])
    collator([{"image": image, "captions": ["a cat"], "index": 3}])
    assert np.array_equal(first, np.asarray(processor.seen_images[0]))
    collator.set_epoch(1)
    collator([{"image": image, "captions": ["a cat"], "index": 3}])
    assert not np.array_equal(first, np.asarray(processor.seen_images[0]))


def test_with_lightclip_processor():
    processing = pytest.importorskip("lightclip.processing_lightclip")
    processor = processing.LightClipProcessor.from_preset("lightclip-xxs")
    dataset = load_image_text_dataset("shapes", "test", shapes_size=5, shapes_image_size=32)
    collator = ImageTextCollator(processor, train=True, image_size=32, max_length=32)
    batch = collator(list(dataset))
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 5
    assert batch["index"].tolist() == list(range(5))


def test_captions_tokenised_once_equal_the_processor_output():
    from lightclip import LightClipProcessor

    processor = LightClipProcessor.from_preset("lightclip-xxs")
    captions = ["a red circle", "a small blue star on the left of a big green square", "word " * 40, "x"]
    examples = [{"image": Image.new("RGB", (40, 32), (60 * i, 20, 30)), "captions": [c], "index": i}
                for i, c in enumerate(captions)]
    collator = ImageTextCollator(processor, train=True, image_size=32, max_length=16, seed=1, return_raw=True)
    batch = collator(examples)
    reference = processor(images=batch["images"], text=batch["texts"], padding=True, truncation=True, max_length=16,
                          return_tensors="pt")
    assert batch["input_ids"].shape == (4, 16)
    assert all(torch.equal(batch[key], reference[key]) for key in ("pixel_values", "input_ids", "attention_mask"))
    assert collator.skip_counter.summary() == {"truncated caption": 1}
    again = collator(examples)  # from the collator's token cache: the same batch, and counted again
    assert all(torch.equal(again[key], batch[key]) for key in ("pixel_values", "input_ids", "attention_mask"))
    assert collator.skip_counter.summary() == {"truncated caption": 2}
    assert len(collator._token_cache) == 4


def test_token_cache_stops_growing_at_its_size(monkeypatch):
    monkeypatch.setattr(ImageTextCollator, "TOKEN_CACHE_SIZE", 2)
    processor = FakeProcessor()
    collator = ImageTextCollator(processor, train=False, image_size=16)
    captions = ["a red cat", "a big dog", "a small cat on the left", "a red cat"]
    batch = collator([{"image": Image.new("RGB", (20, 20)), "captions": [c], "index": i}
                      for i, c in enumerate(captions)])
    reference = processor.tokenizer(captions, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert list(collator._token_cache) == ["a red cat", "a big dog"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_token_ids_equals_tokenizer_pad(side):
    tokenizer = FakeProcessor().tokenizer
    tokenizer.padding_side = side
    ids = tokenizer(["a red cat on the left", "a cat", "dog"])["input_ids"]
    reference = tokenizer.pad({"input_ids": ids}, padding=True, return_attention_mask=True, return_tensors="pt")
    input_ids, attention_mask = collate.pad_token_ids(ids, tokenizer.pad_token_id, side)
    assert torch.equal(input_ids, reference["input_ids"]) and torch.equal(attention_mask, reference["attention_mask"])
    assert input_ids.dtype == attention_mask.dtype == torch.long


# --------------------------------------------------------------------------------------------------- images


def _encoded(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_load_rgb_image_conversions(tmp_path):
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))  # half-transparent red on white
    assert load_rgb_image(rgba).getpixel((0, 0)) == (255, 127, 127)
    assert load_rgb_image(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb_image(Image.new("L", (2, 2), 77)).getpixel((1, 1)) == (77, 77, 77)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_rgb_image(palette).getpixel((0, 0)) == (10, 20, 30)
    palette.info["transparency"] = 1  # index 1 is transparent: white
    assert load_rgb_image(_encoded(palette)).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    values = np.array([[0, 257], [32768, 65535]], dtype=np.uint16)
    expected = [[0, 1], [128, 255]]  # round(v * 255 / 65535)
    sixteen = Image.fromarray(values)
    assert sixteen.mode.startswith("I;16")
    for source in (sixteen, _encoded(sixteen), {"bytes": _encoded(sixteen), "path": None}):
        out = np.asarray(load_rgb_image(source))
        assert out.dtype == np.uint8 and out[..., 0].tolist() == expected and (out[..., 0] == out[..., 2]).all()
    as_int = Image.fromarray(values.astype(np.int32))
    assert as_int.mode == "I"
    assert np.asarray(load_rgb_image(as_int))[..., 1].tolist() == expected
    as_float = Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32))
    assert np.asarray(load_rgb_image(as_float))[..., 0].tolist() == [[0, 128], [64, 255]]
    path = tmp_path / "x.png"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(path)
    for source in (str(path), path, {"bytes": None, "path": str(path)}, path.read_bytes()):
        assert load_rgb_image(source).getpixel((2, 1)) == (1, 2, 3)
    chw = torch.zeros(3, 2, 3)
    chw[:, 1, 2] = torch.tensor([1.0, 0.5, 0.0])  # [0, 1] floats scale to 8 bits
    assert load_rgb_image(chw).getpixel((2, 1)) == (255, 127, 0)
    assert load_rgb_image(chw * 255).getpixel((2, 1)) == (255, 127, 0)
    assert load_rgb_image(torch.full((1, 2, 2), 0.5)).getpixel((0, 0)) == (127, 127, 127)


def test_load_rgb_image_errors(tmp_path):
    with pytest.raises(UnreadableImageError) as missing:
        load_rgb_image(str(tmp_path / "nope.jpg"))
    assert missing.value.reason == "missing image"
    truncated = _encoded(Image.new("RGB", (64, 64), (5, 5, 5)), "JPEG")[:200]
    for bad in (b"garbage", truncated):
        with pytest.raises(UnreadableImageError) as unreadable:
            load_rgb_image(bad)
        assert unreadable.value.reason == "unreadable image"
    with pytest.raises(UnreadableImageError):
        load_rgb_image({"bytes": None, "path": None})


def test_random_resized_crop():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (36, 40, 3), dtype=np.uint8))
    crop = RandomResizedCrop(24)
    a = crop(image, np.random.default_rng(3))
    assert a.size == (24, 24)
    assert np.array_equal(np.asarray(a), np.asarray(crop(image, np.random.default_rng(3))))
    boxes = {crop.get_params(40, 36, np.random.default_rng(s)) for s in range(20)}
    assert len(boxes) > 10
    for left, top, w, h in boxes:
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 36
        assert 0.85 * 1440 <= w * h <= 1440 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    t1 = crop.get_params(40, 36, torch.Generator().manual_seed(0))
    assert t1 == crop.get_params(40, 36, torch.Generator().manual_seed(0))
    assert ResizeCenterCrop(16)(image).size == (16, 16)


def test_tar_shards_with_workers_and_skip_counts(tmp_path):
    for s in range(2):
        samples = [(f"k{s}_{k}", {"jpg": _png_bytes(), "txt": b"a cat"}) for k in range(4)]
        samples[1] = (f"k{s}_1", {"jpg": b"broken", "txt": b"a dog"})
        _write_shard(tmp_path / f"part-{s}.tar", samples)
    dataset = load_image_text_dataset(str(tmp_path / "part-{0..1}.tar"))
    collator = ImageTextCollator(FakeProcessor(), train=True, image_size=16, return_skip_counts=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collator)
    main, indices = SkipCounter(), []
    for batch in loader:
        main.merge(batch.pop("skip_counts"))
        indices += batch["index"].tolist()
    assert sorted(indices) == [0, 2, 3, 4, 6, 7]
    assert main.summary() == {"unreadable image": 2} and sorted(main.examples["unreadable image"]) == [1, 5]


def test_missing_local_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_text_dataset(str(tmp_path / "pairs.csv"))
    with pytest.raises(FileNotFoundError):
        load_image_text_dataset(str(tmp_path / "x-{0..1}.tar"))
