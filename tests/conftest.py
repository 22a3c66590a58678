"""Shared fixtures: the `lightclip-xxs` preset (32 px, 2 + 2 layers, width 64), a seeded model, its processor and a
session-wide saved folder holding both, so the save/load, Auto and pipeline tests share one checkpoint."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lightclip  # noqa: F401  (registers the Auto classes)
from lightclip import LightClipConfig, LightClipModel, LightClipProcessor

ROOT = Path(__file__).resolve().parents[1]
PRESET = "lightclip-xxs"
CAPTIONS = ["a red circle", "two small blue squares on a white table", "a dog", "the green triangle is large"]


def make_config(**overrides) -> LightClipConfig:
    """A fresh `lightclip-xxs` config; `overrides` as in `LightClipConfig.from_preset`."""
    return LightClipConfig.from_preset(PRESET, **overrides)


def context_length() -> int:
    """The preset's text context (position table)."""
    return make_config().text_config.max_position_embeddings


def make_model(seed: int = 0, **overrides) -> LightClipModel:
    torch.manual_seed(seed)
    return LightClipModel(make_config(**overrides)).eval()


def random_pixels(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def assert_exact_save_load(model: LightClipModel, folder, pixels: torch.Tensor) -> None:
    """`model` saved to and loaded from `folder` loads every tensor and embeds `pixels` identically."""
    model.save_pretrained(folder)
    loaded, info = LightClipModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(pixels), model.encode_image(pixels), rtol=0, atol=0)


def assert_pipeline_matches_model(model: LightClipModel, processor: LightClipProcessor, folder, image) -> None:
    """`pipeline("zero-shot-image-classification", model=folder)` scores `image` as `model` and `processor` do (finite
    scores: NaN never passes)."""
    from transformers import pipeline

    labels = ["a red circle", "a blue square"]
    result = pipeline("zero-shot-image-classification", model=str(folder))(image, candidate_labels=labels)
    batch = processor(text=[f"This is a photo of {label}." for label in labels], images=image, padding=True,
                      truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits_per_image[0].softmax(-1)
    scores = {r["label"]: r["score"] for r in result}
    torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), expected, rtol=1e-4, atol=1e-5)


def assert_zero_shot_pipeline_and_onnx(model: LightClipModel, processor: LightClipProcessor, folder, image,
                                       pixels: torch.Tensor) -> None:
    """`model` and `processor` saved under `folder`: the transformers zero-shot pipeline scores `image` as the model
    does, and the ONNX export embeds `pixels` as the model does."""
    from lightclip.export import OnnxClip, export_onnx

    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    assert_pipeline_matches_model(model, processor, folder / "model", image)

    export_onnx(folder / "model", folder / "onnx")
    onnx_model = OnnxClip(folder / "onnx")
    with torch.no_grad():
        reference = model.encode_image(pixels)
    torch.testing.assert_close(torch.from_numpy(onnx_model.encode_image(pixels.numpy())), reference, rtol=1e-4,
                               atol=1e-5)


@pytest.fixture(scope="session")
def processor() -> LightClipProcessor:
    return LightClipProcessor.from_preset(PRESET)


@pytest.fixture(scope="session")
def tokenizer(processor):
    return processor.tokenizer


@pytest.fixture(scope="session")
def model() -> LightClipModel:
    """A seeded xxs model in eval mode. Shared: tests must not modify it (use `make_model` for that)."""
    return make_model(seed=0)


@pytest.fixture(scope="session")
def text_batch(tokenizer) -> dict[str, torch.Tensor]:
    """`CAPTIONS`, padded to the longest, with attention mask."""
    return dict(tokenizer(CAPTIONS, padding=True, return_tensors="pt"))


@pytest.fixture(scope="session")
def saved_dir(tmp_path_factory, model, processor) -> str:
    """`model` and `processor` saved together, as a user would publish them."""
    path = tmp_path_factory.mktemp("lightclip-xxs")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def load_script(relative_path: str):
    """A repository script (e.g. "examples/pretrain.py") as a module, registered in `sys.modules` as the importlib
    recipe for source files does (dataclasses look their module up there)."""
    name = "script_" + relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def save_clip_teacher(folder, image_size: int = 48, seed: int = 0) -> str:
    """A tiny random `CLIPModel` (24-d embeddings, `image_size` px input) with a byte-level `CLIPTokenizer` (no
    merges) and its processor, saved to `folder`: a distillation teacher built offline."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in bytes_to_unicode().values():
            vocab[char + suffix] = len(vocab)
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=64)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(image_size=image_size, patch_size=16, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=24, logit_scale_init_value=math.log(20.0),
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)
