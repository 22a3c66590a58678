"""Configs: presets, parameter counts, strict keys, foreign configs, objective groups, save/load."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import ROOT, make_config
from transformers import (
    AutoConfig,
    BertConfig,
    CLIPConfig,
    EfficientNetModel,
    MobileNetV2Model,
    PreTrainedConfig,
)

import lightclip
from lightclip import (
    LightClipConfig,
    LightClipModel,
    LightClipPretrainingConfig,
    LightClipTextConfig,
    LightClipVisionConfig,
    resolve_objectives,
)
from lightclip.configuration_lightclip import PRETRAINING_FIELDS

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
        ["lightclip-xxs", "lightclip-xxs-cnn", "lightclip-xxs-lite0", "lightclip-lite0-64px", "lightclip-lite0-56px",
         "lightclip-xs",
         "lightclip-mobilenetv2", "lightclip-efficientnet-b0", "lightclip-efficientnet-lite0"]
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
        (dict(token_num_negatives=0), "token_num_negatives"),
        (dict(token_num_negatives="15"), "token_num_negatives"),
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
        ("kd", ["clip", "kd"]),  # distillation joins any group and keeps its contrastive term
        ("fd,clip-ping", ["clip", "nn", "xnn", "fd"]),
        ("lightclip,kd,fd", ["soft", "token", "mlm", "kd", "fd"]),
        ("siglip", ["siglip"]),  # the sigmoid loss replaces clip
        ("clip,siglip,clip-ping", ["siglip", "nn", "xnn"]),
        ("siglip,token,mlm,kd", ["siglip", "token", "mlm", "kd"]),
    ],
)
def test_resolve_objectives(names, expected):
    assert resolve_objectives(names) == expected


@pytest.mark.parametrize("names", ["soft,siglip", "lightclip,siglip", "all,siglip"])
def test_two_contrastive_terms_are_refused(names):
    with pytest.raises(ValueError, match=r"\['siglip', 'soft'\] are each an image-text contrastive term; choose one"):
        resolve_objectives(names)


def test_config_objectives_default_and_groups():
    assert make_config().pretraining_config.objectives == ["clip"]
    assert make_config(objectives="clip-ping").pretraining_config.objectives == ["clip", "nn", "xnn"]


def test_resolve_objectives_unknown_lists_choices():
    with pytest.raises(ValueError, match=r"unknown objective 'tokens'.*'token'"):
        resolve_objectives("clip,tokens")


def _non_default_config() -> LightClipConfig:
    """Every top-level field off its default, so a field dropped on save cannot hide behind the default."""
    return make_config(
        text_config=dict(causal=False, eos_token_id=3, layer_norm_eps=1e-6, hidden_act="quick_gelu"),
        vision_config=dict(attention_dropout=0.1, initializer_range=0.01),
        projection_dim=48, logit_scale_init_value=1.5, logit_scale_max=4.0, objectives="all,kd,fd",
        soft_mode="similarity", soft_alpha_max=0.3, soft_schedule="cosine", soft_temperature=0.5,
        siglip_logit_scale_init_value=1.0, siglip_logit_bias_init_value=-5.0,
        token_weight=0.5, token_dim=40, token_matching="hungarian", token_chunk_size=8, token_num_negatives=7,
        sinkhorn_epsilon=0.1,
        sinkhorn_iterations=5, sinkhorn_unroll=True, hungarian_capacity=3, hungarian_num_negatives=2, mlm_weight=0.25,
        mlm_probability=0.3, fusion_layers=[1, 2], fusion_num_heads=4, fusion_type="additive",
        fusion_image_source="multiscale", fusion_detach_image=True, fusion_word_attention=False, nn_weight=0.4,
        xnn_weight=0.6, xnn_mode="x1",
        neighbor_head="mlp", neighbor_direction="teacher_to_student", neighbor_logit_scale_init_value=2.0,
        neighbor_top_k=3, teacher_image_dim=24, teacher_text_dim=40, kd_weight=0.7, kd_temperature=0.05,
        fd_weight=3.0, fd_loss="mse", distill_teacher_dim=32, distill_teacher="org/teacher",
    )


def _fields(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def test_non_default_config_really_differs_from_defaults():
    config, default = _non_default_config(), LightClipConfig()
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    ours = {f.name for f in dataclasses.fields(LightClipConfig)} - base
    same = [k for k in ours - {"text_config", "vision_config", "pretraining_config"}
            if getattr(config, k) == getattr(default, k)]
    settings, default_settings = config.pretraining_config, default.pretraining_config
    same += [k for k in PRETRAINING_FIELDS if getattr(settings, k) == getattr(default_settings, k)]
    assert same == []


@pytest.mark.parametrize("load", [LightClipConfig.from_pretrained, AutoConfig.from_pretrained])
def test_config_save_load_preserves_every_field(tmp_path, load):
    config = _non_default_config()
    config.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert type(loaded) is LightClipConfig
    for name, value in _fields(config).items():
        if name in ("text_config", "vision_config", "pretraining_config"):
            assert _fields(getattr(loaded, name)) == _fields(value), name
        elif name not in ("transformers_version",):
            assert getattr(loaded, name) == value, name
    assert loaded.pretraining_config.objectives == ["soft", "token", "mlm", "nn", "xnn", "kd", "fd"]


def test_cnn_config_round_trip_keeps_backbone(tmp_path):
    config = LightClipConfig.from_preset("lightclip-mobilenetv2", vision_config=dict(image_size=64))
    config.save_pretrained(tmp_path)
    vision = LightClipConfig.from_pretrained(tmp_path).vision_config
    assert (vision.backbone, vision.image_size, vision.backbone_kwargs, vision.hidden_size) == (
        "mobilenetv2", 64, {"depth_multiplier": 1.0}, 1280)


def test_objectives_resolve_when_set_after_construction(tmp_path):
    """`from_pretrained(folder, pretraining_config=dict(objectives=...))` and an assignment after construction
    resolve the groups."""
    make_config().save_pretrained(tmp_path)
    loaded = LightClipConfig.from_pretrained(tmp_path, pretraining_config=dict(objectives="lightclip"))
    assert loaded.pretraining_config.objectives == ["soft", "token", "mlm"]
    loaded.pretraining_config.objectives = "clip-ping"
    assert loaded.pretraining_config.objectives == ["clip", "nn", "xnn"]
    with pytest.raises(ValueError, match="unknown objective"):
        loaded.pretraining_config.objectives = "lightclipp"


# ------------------------------------------------------------------------------------------------------------------
# training-only settings: `pretraining_config` only
# ------------------------------------------------------------------------------------------------------------------


def _save_flat(config: LightClipConfig, folder) -> None:
    """Save `config` with its training-only settings at the top level instead of in `pretraining_config`."""
    config.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    settings = data.pop("pretraining_config")
    del settings["model_type"]
    (folder / "config.json").write_text(json.dumps({**data, **settings}))


def test_a_config_file_with_top_level_settings_is_refused_naming_where_they_go(tmp_path):
    _save_flat(_non_default_config(), tmp_path / "flat")
    for load in (LightClipConfig.from_pretrained, LightClipModel.from_pretrained):
        with pytest.raises(ValueError, match=r"training-only setting\(s\) \[.*'token_weight'.*\] at the top level: "
                                             r"they are fields of pretraining_config"):
            load(tmp_path / "flat")


@pytest.mark.parametrize("path", sorted((ROOT / "checkpoints").glob("*/config.json")), ids=lambda p: p.parent.name)
def test_shipped_config_files_load_with_their_values(path):
    data = json.loads(path.read_text())
    assert not set(data) & set(PRETRAINING_FIELDS)  # every setting in pretraining_config
    stored = data["pretraining_config"]
    settings = LightClipConfig.from_pretrained(path.parent).pretraining_config.settings_dict()
    defaults = LightClipPretrainingConfig().settings_dict()
    assert settings == {key: stored.get(key, default) for key, default in defaults.items()}


def test_a_saved_config_holds_the_settings_nested(tmp_path):
    config = _non_default_config()
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert not set(data) & set(PRETRAINING_FIELDS)
    assert set(PRETRAINING_FIELDS) <= set(data["pretraining_config"])
    assert not set(config.to_dict()) & set(PRETRAINING_FIELDS)
    assert config.to_dict()["pretraining_config"]["token_weight"] == 0.5


def test_settings_go_into_pretraining_config_and_a_top_level_one_is_refused(tmp_path):
    config = LightClipConfig(pretraining_config=dict(objectives=["lightclip"], token_weight=0.1, mlm_weight=0.3))
    settings = config.pretraining_config
    assert (settings.objectives, settings.token_weight, settings.mlm_weight) == (["soft", "token", "mlm"], 0.1, 0.3)
    refused = r"training-only setting\(s\) \['objectives', 'token_weight'\] at the top level.*pretraining_config=dict"
    with pytest.raises(ValueError, match=refused):
        LightClipConfig(objectives=["lightclip"], token_weight=0.5)
    # from_preset, the builder of a run's config, takes them by name, over its pretraining_config dict
    preset = make_config(objectives="clip-ping", mlm_weight=0.25, pretraining_config=dict(mlm_weight=0.1))
    assert (preset.pretraining_config.mlm_weight, preset.pretraining_config.token_dim) == (0.25, 64)  # preset's kept
    preset.save_pretrained(tmp_path)
    loaded = LightClipConfig.from_pretrained(tmp_path, pretraining_config=dict(token_weight=0.5,
                                                                                fusion_word_attention=False))
    assert (loaded.pretraining_config.token_weight, loaded.pretraining_config.mlm_weight) == (0.5, 0.25)
    assert loaded.pretraining_config.fusion_word_attention is False
    with pytest.raises(ValueError,
                       match=r"\['token_weight'\] at the top level.*from_pretrained\(path, pretraining_config"):
        LightClipConfig.from_pretrained(tmp_path, token_weight=0.5)
    checkpoint = ROOT / "checkpoints" / "lightclip-xxs-lite0-shapes"
    model = LightClipModel.from_pretrained(checkpoint, pretraining_config=dict(token_weight=0.5))
    assert model.config.pretraining_config.token_weight == 0.5
    with pytest.raises(ValueError, match=r"\['token_weight'\] at the top level"):
        LightClipModel.from_pretrained(checkpoint, token_weight=0.5)


def test_a_setting_set_on_the_model_config_is_an_error():
    config = make_config()
    with pytest.raises(AttributeError, match="pretraining_config.token_weight"):
        config.token_weight = 0.5
    assert not hasattr(config, "token_weight")


@pytest.mark.parametrize("key", ["soft_mode", "soft_schedule", "token_matching", "fusion_type", "fusion_image_source",
                                 "xnn_mode", "neighbor_head", "neighbor_direction"])
def test_a_value_outside_a_literal_field_raises(key):
    with pytest.raises(ValueError, match=rf"'{key}' expected one of .*bogus"):
        LightClipPretrainingConfig(**{key: "bogus"})
    with pytest.raises(ValueError, match=rf"'{key}' expected one of .*bogus"):
        setattr(make_config().pretraining_config, key, "bogus")
    with pytest.raises(ValueError, match=r"'backbone' expected one of .*resnet"):
        make_config().vision_config.backbone = "resnet"


@pytest.mark.parametrize("build", [
    lambda: LightClipPretrainingConfig(token_wieght=1.0),
    lambda: LightClipConfig(pretraining_config=dict(token_wieght=1.0)),
    lambda: make_config(pretraining_config=dict(token_wieght=1.0)),
])
def test_unknown_nested_key_suggests_the_right_one(build):
    with pytest.raises(ValueError, match=r"LightClipPretrainingConfig got unknown key\(s\): 'token_wieght' "
                                         r"\(did you mean 'token_weight'\?\)"):
        build()


def test_unknown_key_in_a_nested_file_is_named(tmp_path):
    make_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["pretraining_config"]["mlm_probabilty"] = 0.2
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="did you mean 'mlm_probability'"):
        LightClipConfig.from_pretrained(tmp_path)


def test_keys_transformers_takes_are_not_unknown():
    config = make_config(attn_implementation="eager", torch_dtype="float32", use_cache=False, name_or_path="a/b",
                         _commit_hash="0" * 40, auto_map={"AutoConfig": "configuration_lightclip.LightClipConfig"})
    assert (config.dtype, config.name_or_path, config._attn_implementation) == (torch.float32, "a/b", "eager")


def test_foreign_pretraining_config_raises():
    with pytest.raises(ValueError, match=r"'lightclip_pretraining'.*'lightclip'"):
        LightClipPretrainingConfig(model_type="lightclip")


def test_an_int_is_taken_where_a_float_is_declared():
    settings = make_config(mlm_weight=0, soft_alpha_max=1, text_config=dict(attention_dropout=0)).pretraining_config
    assert (settings.mlm_weight, settings.soft_alpha_max) == (0, 1)
