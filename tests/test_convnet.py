"""The native small CNN tower (`backbone="convnet"`, preset `lightclip-xxs-cnn`): structure against a functional
reference, parameter count by hand, save/load, config validation, the zero-shot pipeline and ONNX export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_exact_save_load, assert_zero_shot_pipeline_and_onnx, random_pixels, random_rgb
from PIL import Image

import lightclip
from lightclip import LightClipConfig, LightClipModel, LightClipProcessor

PRESET = "lightclip-xxs-cnn"


@pytest.fixture(scope="module")
def cnn_model() -> LightClipModel:
    torch.manual_seed(0)
    model = LightClipModel(LightClipConfig.from_preset(PRESET))
    # a few training-mode forwards give the BatchNorm layers non-trivial running statistics
    with torch.no_grad():
        for seed in range(3):
            model.vision_model(random_pixels(8, seed=seed))
    return model.eval()


def reference_feature_map(model: LightClipModel, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's output, computed with `F.conv2d` / `F.batch_norm` from the state dict alone (eval mode)."""
    state = {k.removeprefix("vision_model.backbone."): v for k, v in model.state_dict().items()
             if k.startswith("vision_model.backbone.")}
    outputs, hidden = [], pixels
    for stage in range(len(model.config.vision_config.convnet_widths())):
        for conv, norm, stride in ((0, 1, 1), (3, 4, 2)):
            p = f"stages.{stage}."
            hidden = F.conv2d(hidden, state[f"{p}{conv}.weight"], stride=stride, padding=1)
            hidden = F.batch_norm(hidden, state[f"{p}{norm}.running_mean"], state[f"{p}{norm}.running_var"],
                                  state[f"{p}{norm}.weight"], state[f"{p}{norm}.bias"], eps=1e-5)
            hidden = hidden.clamp(min=0)
        outputs.append(hidden)
    return outputs


def test_preset_is_listed_and_the_tower_is_native():
    assert PRESET in lightclip.list_presets()
    config = LightClipConfig.from_preset(PRESET)
    assert config.vision_config.backbone == "convnet"
    assert config.vision_config.hidden_size == 128  # derived from the last width


def test_outputs_match_a_functional_reference(cnn_model):
    pixels = random_pixels(3)
    with torch.no_grad():
        out = cnn_model.get_image_features(pixels, output_hidden_states=True)
        embeds = cnn_model.encode_image(pixels)
    stages = reference_feature_map(cnn_model, pixels)
    # stride 8: a 32 px picture gives a 4 x 4 map of 128 channels
    tokens = stages[-1].flatten(2).transpose(1, 2)
    assert out.patch_tokens.shape == (3, 16, 128)
    torch.testing.assert_close(out.patch_tokens, tokens)
    torch.testing.assert_close(out.pooler_output, tokens.mean(1) @ cnn_model.visual_projection.weight.T)
    torch.testing.assert_close(embeds, F.normalize(out.pooler_output, dim=-1))
    assert len(out.hidden_states) == 4  # the input, then one state per stage
    for state, reference in zip(out.hidden_states[1:], stages):
        torch.testing.assert_close(state, reference.flatten(2).transpose(1, 2))


def test_parameter_count_by_hand():
    config = LightClipConfig.from_preset(PRESET)
    cin, expected = 3, 0
    for width in (32, 64, 128):  # two bias-free 3x3 convs and two BatchNorm (weight, bias) per stage
        expected += 9 * cin * width + 2 * width + 9 * width * width + 2 * width
        cin = width
    assert sum(p.numel() for p in LightClipModel(config).vision_model.parameters()) == expected == 287_456


def test_fresh_model_gives_distinct_unit_embeddings():
    torch.manual_seed(1)
    model = LightClipModel(LightClipConfig.from_preset(PRESET)).eval()
    with torch.no_grad():
        embeds = model.encode_image(random_pixels(4, seed=3))
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(4))
    assert (embeds @ embeds.T)[~torch.eye(4, dtype=torch.bool)].max() < 0.999


def test_widths_configure_the_tower_and_bad_kwargs_fail():
    config = LightClipConfig.from_preset(PRESET, vision_config=dict(backbone_kwargs=dict(widths=[8, 16])))
    model = LightClipModel(config).eval()
    with torch.no_grad():
        out = model.get_image_features(random_pixels(2))
    assert out.patch_tokens.shape == (2, 64, 16)  # two stride-2 stages: 8 x 8 tokens
    with pytest.raises(ValueError, match="widths"):
        LightClipConfig.from_preset(PRESET, vision_config=dict(backbone_kwargs=dict(depth=3)))
    with pytest.raises(ValueError, match="positive"):
        LightClipConfig.from_preset(PRESET, vision_config=dict(backbone_kwargs=dict(widths=[])))


def test_save_load_round_trip_keeps_batchnorm_statistics(cnn_model, tmp_path):
    assert_exact_save_load(cnn_model, tmp_path, random_pixels(2, seed=5))


def test_zero_shot_pipeline_and_onnx_export(cnn_model, tmp_path):
    image = Image.fromarray(random_rgb(40, 52, seed=2))
    assert_zero_shot_pipeline_and_onnx(cnn_model, LightClipProcessor.from_preset(PRESET), tmp_path, image,
                                       random_pixels(3, seed=7))


def test_model_card_describes_the_native_tower(cnn_model, tmp_path):
    from lightclip.hub import write_model_card

    cnn_model.save_pretrained(tmp_path)
    LightClipProcessor.from_preset(PRESET).save_pretrained(tmp_path)
    write_model_card(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "native CNN, 32 px input, 3 stages of widths 32, 64, 128" in card
    assert "(transformers)" not in card
