"""Inputs that get a clear answer: impossible config values, script step counts, images and texts the processor cannot
read, and a `--model` that names nothing."""

from __future__ import annotations

import logging

import huggingface_hub.constants
import numpy as np
import pytest
import transformers.utils.logging
from conftest import ROOT, load_script, make_config
from PIL import Image

from lightclip import LightClipConfig, LightClipImageProcessor, list_presets

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(projection_dim=-5), "projection_dim must be a positive integer, got -5"),
        (dict(projection_dim=0), "projection_dim must be a positive integer, got 0"),
        (dict(text_config=dict(num_hidden_layers=0)), "num_hidden_layers must be a positive integer, got 0"),
        (dict(text_config=dict(vocab_size=0)), "vocab_size must be a positive integer, got 0"),
        (dict(text_config=dict(max_position_embeddings=-1)), "max_position_embeddings must be a positive integer"),
        (dict(vision_config=dict(patch_size=0)), "patch_size must be a positive integer, got 0"),
        (dict(vision_config=dict(hidden_size=-64)), "hidden_size must be a positive integer, got -64"),
        (dict(vision_config=dict(image_size=0)), "image_size must be a positive integer, got 0"),
        (dict(logit_scale_init_value=NAN), "logit_scale_init_value must be a finite number, got nan"),
        (dict(logit_scale_max=INF), "logit_scale_max must be a finite number, got inf"),
        (dict(mlm_probability=1.5), r"mlm_probability must be in \[0, 1\], got 1.5"),
        (dict(text_config=dict(attention_dropout=1.0)), r"attention_dropout must be in \[0, 1\), got 1.0"),
        (dict(soft_alpha_max=-0.1), r"soft_alpha_max must be in \[0, 1\], got -0.1"),
        (dict(token_weight=-1.0), "token_weight must be a finite number >= 0, got -1.0"),
        (dict(kd_weight=NAN), "kd_weight must be a finite number >= 0, got nan"),
        (dict(kd_temperature=0), "kd_temperature must be a finite positive number, got 0"),
        (dict(sinkhorn_epsilon=INF), "sinkhorn_epsilon must be a finite positive number, got inf"),
        (dict(token_dim=0), "token_dim must be a positive integer, got 0"),
        (dict(neighbor_top_k=0), "neighbor_top_k must be a positive integer, got 0"),
        (dict(fusion_layers=[1, 5]), r"fusion_layers \[5\] out of range 1..2"),
        (dict(vision_config=dict(backbone="efficientnet-lite", backbone_kwargs=dict(width_multiplier=NAN))),
         "multipliers must be positive and finite"),
    ],
)
def test_an_impossible_config_value_is_named_with_its_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_an_impossible_value_is_refused_on_assignment_too():
    config = make_config()
    for owner, key, value, message in [
        (config, "projection_dim", -5, "projection_dim must be a positive integer, got -5"),
        (config.text_config, "num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
        (config.pretraining_config, "mlm_probability", -0.1, r"mlm_probability must be in \[0, 1\], got -0.1"),
    ]:
        with pytest.raises(ValueError, match=message):
            setattr(owner, key, value)
    assert config.projection_dim == 64 and config.pretraining_config.mlm_probability == 0.15


def test_boundary_values_that_mean_something_stay_valid():
    config = make_config(mlm_weight=0, mlm_probability=0.0, soft_alpha_max=1.0, logit_scale_init_value=-1.0,
                         token_num_negatives=None, text_config=dict(attention_dropout=0.0, initializer_range=0.0))
    assert config.pretraining_config.mlm_weight == 0 and config.pretraining_config.soft_alpha_max == 1.0


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_still_builds(name):
    LightClipConfig.from_preset(name)


@pytest.mark.parametrize("folder", sorted(str(p.parent) for p in (ROOT / "checkpoints").glob("*/config.json")))
def test_every_shipped_checkpoint_config_still_loads(folder):
    LightClipConfig.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------------
# the training script's options


@pytest.fixture(scope="module")
def pretrain():
    return load_script("examples/pretrain.py")


@pytest.mark.parametrize(
    "flag, value, least",
    [
        ("checkpointing_steps", "-1", "at least 1"), ("checkpointing_steps", "0", "at least 1"),
        ("max_train_steps", "-3", "at least 1"), ("logging_steps", "0", "at least 1"),
        ("eval_steps", "-1", "at least 0"), ("num_warmup_steps", "-1", "at least 0"),
        ("gradient_accumulation_steps", "0", "at least 1"), ("per_device_train_batch_size", "-1", "at least 1"),
        ("per_device_eval_batch_size", "0", "at least 1"), ("max_nonfinite_steps", "0", "at least 1"),
        ("checkpoints_total_limit", "-1", "at least 0"), ("image_size", "0", "at least 1"),
        ("num_train_epochs", "-1", "a finite positive number"), ("max_grad_norm", "-1", "a finite positive number"),
        ("learning_rate", "nan", "a finite positive number"),
    ],
)
def test_a_bad_step_count_names_its_flag(pretrain, flag, value, least):
    with pytest.raises(ValueError, match=rf"--{flag} must be {least}.*, got {value}"):
        pretrain.validate_args(pretrain.parse_args([f"--{flag}", value]))


def test_zero_warmup_and_end_only_evaluation_stay_valid(pretrain):
    pretrain.validate_args(pretrain.parse_args(["--num_warmup_steps", "0", "--eval_steps", "0"]))


# --------------------------------------------------------------------------------------------------------------------
# images and texts


def _red_square(dtype) -> np.ndarray:
    image = np.zeros((32, 32, 3), dtype=dtype)
    image[8:24, 8:24, 0] = 1 if dtype != np.uint8 else 255
    return image


def test_rescaling_float_pixels_already_in_0_1_warns(processor, caplog):
    transformers.utils.logging.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        processor.image_processor(images=_red_square(np.uint8), return_tensors="np")
    assert "already rescaled" not in caplog.text
    with caplog.at_level(logging.WARNING):
        processor.image_processor(images=_red_square(np.float32), return_tensors="np")
    assert "It looks like you are trying to rescale already rescaled images" in caplog.text
    assert "do_rescale=False" in caplog.text


def test_float_pixels_in_0_1_match_8_bit_ones_without_rescaling(processor):
    floats = processor.image_processor(images=_red_square(np.float32), do_rescale=False, return_tensors="np")
    uint8 = processor.image_processor(images=_red_square(np.uint8), return_tensors="np")
    np.testing.assert_allclose(floats["pixel_values"], uint8["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("images", [None, "image"])
def test_no_text_is_a_clear_error(processor, images):
    kwargs = {"images": _red_square(np.uint8)} if images else {}
    with pytest.raises(ValueError, match="at least one text is needed"):
        processor(text=[], return_tensors="pt", **kwargs)


def test_a_2d_uint8_array_is_a_grayscale_picture(processor):
    gray = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    as_pil = processor.image_processor(images=Image.fromarray(gray, mode="L"), return_tensors="np")["pixel_values"]
    for images in (gray, [gray, gray]):
        pixels = processor.image_processor(images=images, return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(pixels, np.concatenate([as_pil] * len(pixels)))


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((40, 50), dtype=np.float32), r"2-D image array .* uint8 or uint16, got float32 of shape \(40, 50\)"),
        (np.zeros((7,), dtype=np.uint8), r"got an array of shape \(7,\)"),
        ([np.zeros((2, 3, 4, 5, 6), dtype=np.uint8)],
         r"got a list of 1, the first an array of shape \(2, 3, 4, 5, 6\)"),
    ],
)
def test_an_array_of_no_image_shape_is_named_by_its_shape_not_printed(images, message):
    with pytest.raises(ValueError, match=message) as error:
        LightClipImageProcessor(image_size=32)(images=images, return_tensors="np")
    assert "[[" not in str(error.value) and "0 0 0" not in str(error.value) and len(str(error.value)) < 300


# --------------------------------------------------------------------------------------------------------------------
# --model


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: the hub library reads HF_HUB_OFFLINE once, at import, so its constant is set as well."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.mark.parametrize(
    "name, message",
    [
        ("nope", r"'nope' is not a preset, not a local folder, and the hub cannot be reached"),
        ("lightclip-xss", r"'lightclip-xss' is not a preset \(did you mean 'lightclip-xs'\?\), not a local folder"),
        ("lightclip-xxs", r"'lightclip-xxs' is a preset, which is built, not loaded: .*from_preset"),
        ("runs/missing/final", r"'runs/missing/final' is not a preset, not a local folder, and it is no hub id"),
    ],
)
def test_an_unknown_model_offline_says_what_it_is_not(offline, name, message):
    run_evaluation = load_script("examples/run_evaluation.py")
    with pytest.raises(OSError, match=message):
        run_evaluation.main(["--model", name, "--device", "cpu"])


def test_the_training_script_reports_an_unknown_model_the_same_way(offline, pretrain):
    with pytest.raises(OSError, match="'nope' is not a preset, not a local folder, and the hub cannot be reached"):
        pretrain.validate_args(pretrain.parse_args(["--model", "nope"]))


def test_a_saved_folder_still_loads_offline(offline, saved_dir):
    assert LightClipConfig.from_pretrained(saved_dir).projection_dim == 64
