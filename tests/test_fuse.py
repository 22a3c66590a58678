"""CNN image towers at inference speed: `channels_last` by default (same outputs, training included) and
`LightClipModel.fuse()` (BatchNorm and zero padding folded into the convolutions) for the four CNN backbones, with
its refusals, `from_pretrained(fuse=True)`, the zero-shot pipeline and the ONNX export of a fused model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_pixels, random_rgb
from PIL import Image
from torch import nn

import lightclip  # noqa: F401  (registers the Auto classes)
from lightclip import LightClipConfig, LightClipModel, LightClipProcessor

SMALL_TEXT = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
# every CNN backbone, small; 64 px puts an asymmetric "SAME" pad before each stride-2 conv, 65 px a symmetric one
TOWERS = {
    "convnet": ("lightclip-xxs-cnn", 32, {}),
    "efficientnet-lite": ("lightclip-efficientnet-lite0", 64,
                          dict(width_multiplier=0.25, depth_multiplier=0.5, drop_connect_rate=0.2)),
    "efficientnet-lite-65px": ("lightclip-efficientnet-lite0", 65,
                               dict(width_multiplier=0.25, depth_multiplier=0.5, drop_connect_rate=0.2)),
    "mobilenetv2": ("lightclip-mobilenetv2", 64, dict(depth_multiplier=0.35)),
    "mobilenetv2-65px": ("lightclip-mobilenetv2", 65, dict(depth_multiplier=0.35)),
    "efficientnet": ("lightclip-efficientnet-b0", 64,
                     dict(width_coefficient=0.25, depth_coefficient=0.25, dropout_rate=0.2)),
}


def tower_config(name: str) -> LightClipConfig:
    preset, size, kwargs = TOWERS[name]
    vision = dict(image_size=size, backbone_kwargs=kwargs) if kwargs else dict(image_size=size)
    return LightClipConfig.from_preset(preset, vision_config=vision, text_config=SMALL_TEXT)


def trained_looking(config: LightClipConfig, seed: int = 0) -> LightClipModel:
    """A model in eval mode whose BatchNorm layers hold non-trivial statistics and affine parameters, so folding
    them changes every convolution. Its inference runs the unfused layers (`auto_fuse` off): the reference that
    every fused output here is compared with."""
    torch.manual_seed(seed)
    model = LightClipModel(config)
    size = config.vision_config.image_size
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        for batch_seed in range(2):
            model.vision_model(random_pixels(8, size=size, seed=batch_seed))
    model.vision_model.auto_fuse = False
    return model.eval()


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, msg: str = "") -> None:
    """Equal within `tolerance` times the largest magnitude of `expected`: float rounding of a reordered sum."""
    scale = expected.abs().max().clamp(min=1e-6)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=tolerance, msg=msg or None)


@pytest.fixture(scope="module", params=list(TOWERS))
def pair(request) -> tuple[LightClipModel, LightClipModel, torch.Tensor]:
    """(unfused model, fused copy, pixels) for one CNN tower."""
    model = trained_looking(tower_config(request.param))
    pixels = random_pixels(3, size=model.config.vision_config.image_size, seed=9)
    return model, copy.deepcopy(model).fuse(), pixels


def test_fused_embeddings_equal_unfused(pair):
    model, fused, pixels = pair
    with torch.no_grad():
        reference, out = model.get_image_features(pixels, True), fused.get_image_features(pixels, True)
        torch.testing.assert_close(fused.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=1e-5)
    # the unnormalised features through a dozen folded layers: rounding reaches about 1e-5 of their scale
    assert_close_to_scale(out.pooler_output, reference.pooler_output, 1e-4)
    for state, expected in zip(out.hidden_states, reference.hidden_states, strict=True):
        assert_close_to_scale(state, expected, 1e-4)


def test_fuse_leaves_no_batchnorm_or_called_padding(pair):
    model, fused, pixels = pair
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert fused.vision_model.is_fused and not model.vision_model.is_fused
    pads = []
    hooks = [m.register_forward_hook(lambda *args: pads.append(1)) for m in fused.modules()
             if isinstance(m, nn.ZeroPad2d)]
    with torch.no_grad():
        fused.encode_image(pixels)
    for hook in hooks:
        hook.remove()
    assert not pads
    if fused.config.vision_config.backbone == "mobilenetv2":
        assert not fused.vision_model.backbone.config.tf_padding
        assert model.vision_model.backbone.config.tf_padding  # the unfused copy still pads itself


def test_fuse_refuses_training_and_saving(pair, tmp_path):
    model, fused, pixels = pair
    with pytest.raises(RuntimeError, match="eval"):
        copy.deepcopy(model).train().fuse()
    with pytest.raises(ValueError, match="fused"):
        fused.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    trainable = copy.deepcopy(fused).train()  # switching modes is allowed; a training forward is not
    with pytest.raises(RuntimeError, match="training mode"):
        trainable.encode_image(pixels)


@pytest.mark.parametrize("name", ["convnet", "efficientnet-lite"])
def test_fuse_folds_the_frozen_batch_norm_of_a_locked_tower(name):
    from lightclip.modeling_lightclip_convnet import LightClipFrozenBatchNorm2d
    from lightclip.trainer_utils import lock_image_tower

    model = trained_looking(tower_config(name))
    pixels = random_pixels(3, size=model.config.vision_config.image_size, seed=9)
    with torch.no_grad():
        reference = model.encode_image(pixels)
    lock_image_tower(model, unlocked_groups=1, freeze_bn_stats=True)
    assert any(isinstance(m, LightClipFrozenBatchNorm2d) for m in model.modules())
    fused = copy.deepcopy(model).eval().fuse()
    assert not any(isinstance(m, (nn.BatchNorm2d, LightClipFrozenBatchNorm2d)) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(pixels), reference, rtol=0, atol=0)
        torch.testing.assert_close(fused.encode_image(pixels), reference, rtol=0, atol=1e-5)


def test_vit_has_nothing_to_fuse(model, tmp_path):
    vit = copy.deepcopy(model)
    assert vit.fuse() is vit
    vit.save_pretrained(tmp_path)  # nothing was folded, so it saves


def test_channels_last_is_the_default_and_equals_contiguous():
    config = tower_config("mobilenetv2")
    model = trained_looking(config)
    conv = next(m for m in model.vision_model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    contiguous = copy.deepcopy(model)
    contiguous.vision_model.memory_format = torch.contiguous_format
    pixels = random_pixels(3, size=64, seed=4)
    with torch.no_grad():
        out, expected = model.get_image_features(pixels, True), contiguous.get_image_features(pixels, True)
    conv = next(m for m in contiguous.vision_model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous()
    assert_close_to_scale(out.pooler_output, expected.pooler_output, 1e-4)
    assert_close_to_scale(out.last_hidden_state, expected.last_hidden_state, 1e-4)


@pytest.mark.parametrize("name", ["convnet", "mobilenetv2"])
def test_channels_last_training_step_equals_contiguous(name):
    """BatchNorm in train mode: same loss and gradients in both layouts."""
    model = trained_looking(tower_config(name)).train()
    contiguous = copy.deepcopy(model)
    contiguous.vision_model.memory_format = torch.contiguous_format
    size = model.config.vision_config.image_size
    batch = dict(input_ids=torch.randint(5, 4000, (4, 8), generator=torch.Generator().manual_seed(0)),
                 pixel_values=random_pixels(4, size=size, seed=1), return_loss=True)
    losses = [m(**batch).loss for m in (model, contiguous)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (model, contiguous)]
    assert_close_to_scale(grads[0], grads[1], 1e-4)


def test_from_pretrained_restores_channels_last_and_can_fuse(tmp_path):
    model = trained_looking(tower_config("efficientnet"))
    model.save_pretrained(tmp_path)
    loaded = LightClipModel.from_pretrained(tmp_path)
    conv = next(m for m in loaded.vision_model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    fused, info = LightClipModel.from_pretrained(tmp_path, fuse=True, output_loading_info=True)
    assert fused.vision_model.is_fused and not fused.training
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    pixels = random_pixels(2, size=64, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fused.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=1e-5)


def test_zero_shot_pipeline_with_fuse(tmp_path):
    from transformers import pipeline

    model = trained_looking(tower_config("convnet"))
    model.save_pretrained(tmp_path)
    LightClipProcessor.from_preset("lightclip-xxs-cnn", text_config=SMALL_TEXT).save_pretrained(tmp_path)
    image, labels = Image.fromarray(random_rgb(40, 52, seed=2)), ["a red circle", "a blue square"]
    plain = pipeline("zero-shot-image-classification", model=str(tmp_path))
    fused = pipeline("zero-shot-image-classification", model=str(tmp_path), model_kwargs={"fuse": True})
    assert fused.model.vision_model.is_fused and not plain.model.vision_model.is_fused
    expected = {r["label"]: r["score"] for r in plain(image, candidate_labels=labels)}
    scores = {r["label"]: r["score"] for r in fused(image, candidate_labels=labels)}
    torch.testing.assert_close(torch.tensor([scores[k] for k in labels]), torch.tensor([expected[k] for k in labels]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnet", "efficientnet-lite"])
def test_onnx_export_is_fused_and_matches_eager(name, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from lightclip.export import IMAGE_FILE, OnnxClip, export_towers

    model = trained_looking(tower_config(name))
    pixels = random_pixels(3, size=model.config.vision_config.image_size, seed=6)
    with torch.no_grad():
        reference = model.encode_image(pixels)
    export_towers(model, tmp_path / "plain")
    assert not model.vision_model.is_fused  # the export fused a copy
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    ops = {node.op_type for node in onnx.load(str(tmp_path / "plain" / IMAGE_FILE)).graph.node}
    assert "Conv" in ops and not ops & {"BatchNormalization", "Pad"}
    export_towers(copy.deepcopy(model).fuse(), tmp_path / "fused")
    for folder in ("plain", "fused"):
        out = torch.from_numpy(OnnxClip(tmp_path / folder).encode_image(pixels.numpy()))
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
