"""Configs: presets, parameter counts, strict keys, foreign configs, objective groups, save/load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_config
from transformers import (
    AutoConfig, BertConfig, CLIPConfig, EfficientNetModel, MobileNetV2Model, PreTrainedConfig,
)

import lightclip
from lightclip import LightClipConfig, LightClipModel, LightClipTextConfig, LightClipVisionConfig, resolve_objectives

CNN_PRESETS = {"lightclip-mobilenetv2": MobileNetV2Model, "lightclip-efficientnet-b0": EfficientNetModel}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pre_ln_layer_params(width: int, mlp: int) -> int:
    """One pre-LN transformer block: 2 LayerNorms, fused QKV + output projection (with biases), 2-layer MLP."""
    layer_norms = 2 * 2 * width
    attention = (width * 3 * width + 3 * width) + (width * width + width)
    feed_forward = (width * mlp + mlp) + (mlp * width + width)
    return layer_norms + attention + feed_forward


def text_tower_params(text: LightClipTextConfig) -> int:
    d = text.hidden_size
    embeddings = text.vocab_size * d + text.max_position_embeddings * d
    return embeddings + text.num_hidden_layers * pre_ln_layer_params(d, text.intermediate_size) + 2 * d


def vit_tower_params(vision: LightClipVisionConfig) -> int:
    d, p = vision.hidden_size, vision.patch_size
    tokens = (vision.image_size // p) ** 2 + 1
    embeddings = d + vision.num_channels * p * p * d + tokens * d  # CLS, bias-free patch conv, positions
    return embeddings + 2 * d + vision.num_hidden_layers * pre_ln_layer_params(d, vision.intermediate_size) + 2 * d


def heads_params(config: LightClipConfig) -> int:
    """Two bias-free projections and the logit scale."""
    return (config.text_config.hidden_size + config.vision_config.hidden_size) * config.projection_dim + 1


def test_list_presets():
    assert lightclip.list_presets() == sorted(
        ["lightclip-xxs", "lightclip-xxs-cnn", "lightclip-xxs-lite0", "lightclip-xs", "lightclip-mobilenetv2", "lightclip-efficientnet-b0",
         "lightclip-efficientnet-lite0"]
    )


@pytest.mark.parametrize("name", ["lightclip-xxs", "lightclip-xs"])
def test_vit_preset_parameter_count_matches_formula(name):
    config = LightClipConfig.from_preset(name)
    expected = text_tower_params(config.text_config) + vit_tower_params(config.vision_config) + heads_params(config)
    assert n_params(LightClipModel(config)) == expected


def test_xxs_parameter_count_literal():
    # text: 4096 x 64 tokens + 64 x 64 positions + 2 x 49,984 per block + 128 final norm = 366,336;
    # image: 64 CLS + 3 x 8 x 8 x 64 patch conv + 17 x 64 positions + 2 x 128 norms + 2 x 49,984 = 113,664;
    # 2 x 64 x 64 projections + 1 logit scale: counted by hand for the preset's context of 64 tokens
    assert make_config().text_config.max_position_embeddings == 64
    assert n_params(LightClipModel(make_config())) == 488_193


@pytest.mark.parametrize("name", sorted(CNN_PRESETS))
def test_cnn_preset_builds_with_transformers_backbone(name):
    config = LightClipConfig.from_preset(name, vision_config=dict(image_size=64))
    model = LightClipModel(config)
    backbone_cls = CNN_PRESETS[name]
    kwargs = {"add_pooling_layer": False} if backbone_cls is MobileNetV2Model else {}
    reference = backbone_cls(config.vision_config.backbone_config(), **kwargs)
    expected = text_tower_params(config.text_config) + n_params(reference) + heads_params(config)
    assert n_params(model) == expected
    assert config.vision_config.hidden_size == 1280  # both B0-size CNNs end in 1280 channels


def test_from_preset_unknown_name_suggests():
    with pytest.raises(ValueError, match=r"Unknown preset 'lightclip-xss'.*Did you mean 'lightclip-xs"):
        LightClipConfig.from_preset("lightclip-xss")


def test_from_preset_overrides_merge_into_towers():
    config = make_config(projection_dim=32, text_config=dict(num_hidden_layers=3))
    assert config.projection_dim == 32
    assert config.text_config.num_hidden_layers == 3
    assert config.text_config.hidden_size == 64  # the rest of the preset's tower is kept


@pytest.mark.parametrize(
    "build, bad_key",
    [
        (lambda: make_config(projection_dimm=32), "projection_dimm"),
        (lambda: make_config(text_config=dict(hiden_size=64)), "hiden_size"),
        (lambda: make_config(vision_config=dict(patchsize=8)), "patchsize"),
        (lambda: LightClipConfig(soft_alpha=0.1), "soft_alpha"),
    ],
)
def test_unknown_key_is_named(build, bad_key):
    with pytest.raises(ValueError, match=bad_key):
        build()


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ValueError, match="did you mean 'projection_dim'"):
        make_config(projection_dimm=32)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(fusion_type="sum"), "fusion_type"),
        (dict(token_matching="greedy"), "token_matching"),
        (dict(neighbor_direction="both"), "neighbor_direction"),
        (dict(vision_config=dict(backbone="resnet")), "backbone"),
        (dict(text_config=dict(hidden_size=65)), "hidden_size"),
        (dict(vision_config=dict(image_size=36)), "patch_size"),
        (dict(objectives=["clipp"]), "clipp"),
    ],
)
def test_invalid_values_raise(kwargs, key):
    with pytest.raises(ValueError, match=key):
        make_config(**kwargs)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    CLIPConfig().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    BertConfig().save_pretrained(path)
    return path


@pytest.mark.parametrize("loader", [LightClipConfig.from_pretrained, LightClipModel.from_pretrained])
@pytest.mark.parametrize("folder, other", [("clip_folder", "clip"), ("bert_folder", "bert")])
def test_foreign_config_raises_naming_both_types(loader, folder, other, request):
    with pytest.raises(ValueError, match=rf"model_type 'lightclip'.*model_type '{other}'"):
        loader(request.getfixturevalue(folder))


def test_foreign_sub_config_raises(clip_folder):
    with pytest.raises(ValueError, match=r"'lightclip_text_model'.*'clip_text_model'"):
        LightClipTextConfig.from_pretrained(clip_folder)


@pytest.mark.parametrize(
    "names, expected",
    [
        ("clip", ["clip"]),
        ("lightclip", ["soft", "token", "mlm"]),
        ("clip-ping", ["clip", "nn", "xnn"]),
        ("all", ["soft", "token", "mlm", "nn", "xnn"]),
        ("token", ["clip", "token"]),  # a contrastive term is always there
        ("clip+soft", ["soft"]),  # soft replaces clip
        ("xnn, mlm", ["clip", "mlm", "xnn"]),  # canonical order
        (["LightCLIP", "nn"], ["soft", "token", "mlm", "nn"]),
    ],
)
def test_resolve_objectives(names, expected):
    assert resolve_objectives(names) == expected


def test_config_objectives_default_and_groups():
    assert make_config().objectives == ["clip"]
    assert make_config(objectives="clip-ping").objectives == ["clip", "nn", "xnn"]


def test_resolve_objectives_unknown_lists_choices():
    with pytest.raises(ValueError, match=r"unknown objective 'tokens'.*'token'"):
        resolve_objectives("clip,tokens")


def _non_default_config() -> LightClipConfig:
    """Every top-level field off its default, so a field dropped on save cannot hide behind the default."""
    return make_config(
        text_config=dict(causal=False, eos_token_id=3, layer_norm_eps=1e-6, hidden_act="quick_gelu"),
        vision_config=dict(attention_dropout=0.1, initializer_range=0.01),
        projection_dim=48, logit_scale_init_value=1.5, logit_scale_max=4.0, objectives="all",
        soft_mode="uniform", soft_alpha_max=0.3, soft_schedule="cosine", soft_temperature=0.5,
        token_weight=0.5, token_dim=40, token_matching="hungarian", token_chunk_size=8, sinkhorn_epsilon=0.1,
        sinkhorn_iterations=5, sinkhorn_unroll=True, hungarian_capacity=3, hungarian_num_negatives=2, mlm_weight=0.25,
        mlm_probability=0.3, fusion_layers=[1, 2], fusion_num_heads=4, fusion_type="additive",
        fusion_image_source="multiscale", fusion_detach_image=True, fusion_word_attention=False, nn_weight=0.4,
        xnn_weight=0.6, xnn_mode="x1",
        neighbor_head="mlp", neighbor_direction="teacher_to_student", neighbor_logit_scale_init_value=2.0,
        neighbor_top_k=3, teacher_image_dim=24, teacher_text_dim=40,
    )


def _fields(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def test_non_default_config_really_differs_from_defaults():
    config, default = _non_default_config(), LightClipConfig()
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    ours = {f.name for f in dataclasses.fields(LightClipConfig)} - base
    same = [k for k in ours - {"text_config", "vision_config"} if getattr(config, k) == getattr(default, k)]
    assert same == []


@pytest.mark.parametrize("load", [LightClipConfig.from_pretrained, AutoConfig.from_pretrained])
def test_config_save_load_preserves_every_field(tmp_path, load):
    config = _non_default_config()
    config.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert type(loaded) is LightClipConfig
    for name, value in _fields(config).items():
        if name in ("text_config", "vision_config"):
            assert _fields(getattr(loaded, name)) == _fields(value), name
        elif name not in ("transformers_version",):
            assert getattr(loaded, name) == value, name
    assert loaded.objectives == ["soft", "token", "mlm", "nn", "xnn"]


def test_cnn_config_round_trip_keeps_backbone(tmp_path):
    config = LightClipConfig.from_preset("lightclip-mobilenetv2", vision_config=dict(image_size=64))
    config.save_pretrained(tmp_path)
    vision = LightClipConfig.from_pretrained(tmp_path).vision_config
    assert (vision.backbone, vision.image_size, vision.backbone_kwargs, vision.hidden_size) == (
        "mobilenetv2", 64, {"depth_multiplier": 1.0}, 1280)


def test_objectives_resolve_when_set_after_construction(tmp_path):
    """`from_pretrained(folder, objectives=...)` sets the attribute after `__post_init__`; it must still resolve."""
    make_config().save_pretrained(tmp_path)
    loaded = LightClipConfig.from_pretrained(tmp_path, objectives="lightclip")
    assert loaded.objectives == ["soft", "token", "mlm"]
    loaded.objectives = "clip-ping"
    assert loaded.objectives == ["clip", "nn", "xnn"]
    with pytest.raises(ValueError, match="unknown objective"):
        loaded.objectives = "lightclipp"
