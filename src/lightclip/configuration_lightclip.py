"""LightCLIP model configuration.

`LightClipConfig` is the single source of truth for a lightclip model: the two towers, the shared projection, and the
training-only objectives that `LightClipForPreTraining` builds from it. The inference model reads only the tower and
projection fields, so a checkpoint trained with any mix of objectives loads as a plain dual encoder.
"""

from __future__ import annotations

import copy
import difflib
import math

from transformers.configuration_utils import PreTrainedConfig

# kwargs that transformers itself passes through `__post_init__`; anything else unknown is a typo.
_PASSTHROUGH_KWARGS = {
    "auto_map",
    "name_or_path",
    "_commit_hash",
    "_name_or_path",
    "output_attentions",
    "attn_implementation",
    "experts_implementation",
    "torch_dtype",
    "per_layer_config",
    "transformers_version",
    "use_cache",
    "_attn_implementation_internal",
    "_experts_implementation_internal",
}


def _reject_unknown_kwargs(config: PreTrainedConfig, kwargs: dict) -> None:
    """Raise a clear error for misspelt keys instead of silently storing them as attributes, and for a config of
    another model type (a `config.json` of CLIP or BERT would otherwise fail on its first foreign key)."""
    given_type = kwargs.get("model_type")
    if given_type is not None and given_type != type(config).model_type:
        raise ValueError(
            f"{type(config).__name__} expects model_type {type(config).model_type!r} but got a config of model_type "
            f"{given_type!r}: this checkpoint is not a lightclip model"
            + (" component" if type(config).base_config_key else "")
            + ". Load it with its own class (e.g. AutoConfig / AutoModel)."
        )
    known = {f for f in type(config).__dataclass_fields__} | _PASSTHROUGH_KWARGS
    unknown = [k for k in kwargs if k not in known and not k.startswith("_")]
    # generation parameters are popped by transformers itself
    from transformers import GenerationConfig

    unknown = [k for k in unknown if k not in GenerationConfig._get_default_generation_params()]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{type(config).__name__} got unknown key(s): {', '.join(hints)}")


class LightClipTextConfig(PreTrainedConfig):
    r"""Configuration of the lightclip text tower: a CLIP-style transformer, shortened as LightCLIP recommends.

    The special-token ids must match the tokenizer; `LightClipProcessor.from_preset` builds one that does.
    Pooling takes the hidden state at the first `eos_token_id`. Text longer than `max_position_embeddings` is
    truncated inside the model, keeping the end-of-text token.

    Example:

    ```python
    >>> from lightclip import LightClipTextConfig
    >>> config = LightClipTextConfig(hidden_size=128, num_hidden_layers=4)
    ```"""

    model_type = "lightclip_text_model"
    base_config_key = "text_config"

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    causal: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    mask_token_id: int | None = 4
    unk_token_id: int | None = 1

    def __post_init__(self, **kwargs):
        _reject_unknown_kwargs(self, kwargs)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        super().__post_init__(**kwargs)

    @property
    def special_token_ids(self) -> list[int]:
        """Ids that are never words (padding, start, end, mask, unknown): excluded from word tokens and from MLM masking
        (never a target, never drawn as a random replacement), as transformers' MLM collator excludes every special id."""
        return [t for t in (self.pad_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id,
                            self.unk_token_id) if t is not None]


VISION_BACKBONES = ("vit", "convnet", "mobilenetv2", "efficientnet", "efficientnet-lite")
# `backbone="convnet"`: stage widths of the native small CNN (each stage: 3x3 conv, then a stride-2 3x3 conv)
CONVNET_DEFAULT_WIDTHS = (32, 64, 128)
# `backbone="efficientnet-lite"`: the native EfficientNet-Lite. Its backbone_kwargs and their defaults (Lite0), and the
# (width_multiplier, depth_multiplier) of the released variants (TF `efficientnet_lite_builder.py`). The stem (32) and
# head (1280) widths are not scaled in Lite, so every variant has 1280-d features.
EFFICIENTNET_LITE_DEFAULTS = {"width_multiplier": 1.0, "depth_multiplier": 1.0, "drop_connect_rate": 0.2}
EFFICIENTNET_LITE_VARIANTS = {
    "lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2), "lite3": (1.2, 1.4), "lite4": (1.4, 1.8),
}
EFFICIENTNET_LITE_HIDDEN_SIZE = 1280
# Input normalisation the released EfficientNet-Lite ImageNet weights expect: (x - 127) / 128 on 0..255 pixels, i.e.
# (x / 255 - mean) / std on the processor's 0..1 pixels. `LightClipProcessor.from_config` uses it for this backbone.
IMAGENET_LITE_MEAN = (127 / 255,) * 3
IMAGENET_LITE_STD = (128 / 255,) * 3


class LightClipVisionConfig(PreTrainedConfig):
    r"""Configuration of the lightclip image tower.

    `backbone` picks the tower: `"vit"` is the native ViT of this package; `"convnet"` is its native small CNN
    (`backbone_kwargs={"widths": [32, 64, 128]}`: one stage per width, each a 3x3 conv and a stride-2 3x3 conv, with
    BatchNorm and ReLU), whose locality bias suits small pictures and small datasets; `"efficientnet-lite"` is its
    native EfficientNet-Lite (`backbone_kwargs={"width_multiplier": 1.0, "depth_multiplier": 1.0,
    "drop_connect_rate": 0.2}`, Lite0 by default; ImageNet weights load with
    `lightclip.pretrained_towers.load_efficientnet_lite_imagenet`); `"mobilenetv2"` and
    `"efficientnet"` are transformers' own CNNs (no torchvision), configured through `backbone_kwargs`. Every tower
    returns a pooled embedding and a sequence of patch (ViT) or feature-map (CNN) tokens. For the CNNs,
    `hidden_size` is derived from the backbone and any value given is overwritten.
    """

    model_type = "lightclip_vision_model"
    base_config_key = "vision_config"

    backbone: str = "vit"
    backbone_kwargs: dict | None = None
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        _reject_unknown_kwargs(self, kwargs)
        if self.backbone not in VISION_BACKBONES:
            raise ValueError(f"backbone must be one of {VISION_BACKBONES}, got {self.backbone!r}")
        if self.backbone == "vit":
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError("hidden_size must be a multiple of num_attention_heads")
            if self.image_size % self.patch_size != 0:
                raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        elif self.backbone == "convnet":
            self.hidden_size = self.convnet_widths()[-1]
        elif self.backbone == "efficientnet-lite":
            self.efficientnet_lite_kwargs()  # validates
            self.hidden_size = EFFICIENTNET_LITE_HIDDEN_SIZE
        else:
            self.hidden_size = self.backbone_config().hidden_size
        super().__post_init__(**kwargs)

    def convnet_widths(self) -> list[int]:
        """Stage widths of the `"convnet"` tower."""
        kwargs = dict(self.backbone_kwargs or {})
        widths = [int(w) for w in kwargs.pop("widths", CONVNET_DEFAULT_WIDTHS)]
        if kwargs:
            raise ValueError(f"backbone 'convnet' takes backbone_kwargs 'widths' only, got {sorted(kwargs)}")
        if not widths or min(widths) < 1:
            raise ValueError(f"convnet widths must be positive, got {widths}")
        return widths

    def efficientnet_lite_kwargs(self) -> dict:
        """`backbone_kwargs` of the `"efficientnet-lite"` tower with the defaults filled in: `width_multiplier`,
        `depth_multiplier` (1.0 / 1.0 = Lite0; see `EFFICIENTNET_LITE_VARIANTS`) and `drop_connect_rate` (stochastic
        depth of the last block in training; earlier blocks get a proportionally smaller rate)."""
        given = dict(self.backbone_kwargs or {})
        unknown = sorted(set(given) - set(EFFICIENTNET_LITE_DEFAULTS))
        if unknown:
            raise ValueError(f"backbone 'efficientnet-lite' takes backbone_kwargs "
                             f"{sorted(EFFICIENTNET_LITE_DEFAULTS)} only, got unknown {unknown}")
        kwargs = {key: float(given.get(key, default)) for key, default in EFFICIENTNET_LITE_DEFAULTS.items()}
        if kwargs["width_multiplier"] <= 0 or kwargs["depth_multiplier"] <= 0:
            raise ValueError(f"efficientnet-lite multipliers must be positive, got {kwargs}")
        if not 0 <= kwargs["drop_connect_rate"] < 1:
            raise ValueError(f"efficientnet-lite drop_connect_rate must be in [0, 1), got "
                             f"{kwargs['drop_connect_rate']}")
        return kwargs

    def efficientnet_lite_variant(self) -> str | None:
        """The released variant (`"lite0"` .. `"lite4"`) whose multipliers this config has, or None."""
        kwargs = self.efficientnet_lite_kwargs()
        multipliers = (kwargs["width_multiplier"], kwargs["depth_multiplier"])
        return next((name for name, value in EFFICIENTNET_LITE_VARIANTS.items() if value == multipliers), None)

    def backbone_config(self):
        """The transformers config of a CNN backbone, built from `image_size`, `num_channels` and `backbone_kwargs`."""
        kwargs = dict(self.backbone_kwargs or {})
        if self.backbone == "mobilenetv2":
            from transformers import MobileNetV2Config

            from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import apply_depth_multiplier

            cfg = MobileNetV2Config(image_size=self.image_size, num_channels=self.num_channels, **kwargs)
            keep = cfg.finegrained_output and cfg.depth_multiplier < 1.0
            cfg.hidden_size = 1280 if keep else apply_depth_multiplier(cfg, 1280)
            return cfg
        if self.backbone == "efficientnet":
            from transformers import EfficientNetConfig

            from transformers.models.efficientnet.modeling_efficientnet import round_filters

            cfg = EfficientNetConfig(image_size=self.image_size, num_channels=self.num_channels, **kwargs)
            # the top conv has round_filters(1280) channels and its norm `hidden_dim`: they must agree
            cfg.hidden_dim = cfg.hidden_size = round_filters(cfg, 1280)
            return cfg
        raise ValueError(f"backbone {self.backbone!r} has no transformers config")


OBJECTIVES = ("clip", "soft", "token", "mlm", "nn", "xnn")
OBJECTIVE_GROUPS = {
    "clip": ("clip",),
    "lightclip": ("soft", "token", "mlm"),
    "clip-ping": ("clip", "nn", "xnn"),
    "all": ("soft", "token", "mlm", "nn", "xnn"),
}


def resolve_objectives(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand group names (`lightclip`, `clip-ping`, `all`) into terms, in canonical order.

    `soft` replaces `clip` as the contrastive term (it equals `clip` at alpha = 0), so asking for both keeps `soft`.
    """
    if isinstance(names, str):
        names = [n for n in names.replace("+", ",").split(",") if n.strip()]
    terms: set[str] = set()
    for name in names:
        name = name.strip().lower()
        if name in OBJECTIVE_GROUPS:
            terms.update(OBJECTIVE_GROUPS[name])
        elif name in OBJECTIVES:
            terms.add(name)
        else:
            choices = sorted(set(OBJECTIVES) | set(OBJECTIVE_GROUPS))
            raise ValueError(f"unknown objective {name!r}; choose from {choices}")
    if "soft" in terms:
        terms.discard("clip")
    if not terms & {"clip", "soft"}:
        terms.add("clip")
    return [t for t in OBJECTIVES if t in terms]


class LightClipConfig(PreTrainedConfig):
    r"""Configuration of a lightclip dual encoder and of its training-only objectives.

    Tower and projection fields define `LightClipModel`. The objective fields are read only by
    `LightClipForPreTraining` (see `docs/method.md` for each reading and its alternatives):

    - `objectives`: terms to train, any of `clip`, `soft`, `token`, `mlm`, `nn`, `xnn`, or the groups `lightclip`,
      `clip-ping`, `all`.
    - `soft_*`: progressively softened negative labels (LightCLIP, instance level).
    - `token_*`, `sinkhorn_*`, `hungarian_*`: patch-word relaxed bipartite matching (LightCLIP, token level).
    - `mlm_*`, `fusion_*`: masked language modelling through the auxiliary fusion module (LightCLIP).
    - `nn_*`, `xnn_*`, `neighbor_*`, `teacher_*`: nearest-neighbour guidance from frozen feature banks (CLIP-PING).

    Example:

    ```python
    >>> from lightclip import LightClipConfig
    >>> config = LightClipConfig.from_preset("lightclip-xxs", objectives=["lightclip"])
    >>> config.objectives
    ['soft', 'token', 'mlm']
    ```"""

    model_type = "lightclip"
    sub_configs_defaults = {"text_config": LightClipTextConfig, "vision_config": LightClipVisionConfig}

    text_config: dict | LightClipTextConfig | None = None
    vision_config: dict | LightClipVisionConfig | None = None
    projection_dim: int = 256
    logit_scale_init_value: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)

    # which objectives LightClipForPreTraining builds
    objectives: list[str] | None = None
    # instance level: progressively softened negatives
    soft_mode: str = "similarity"  # "similarity" (own detached logits) | "uniform"
    soft_alpha_max: float = 0.2
    soft_schedule: str = "linear"  # "linear" | "cosine"
    soft_temperature: float = 1.0
    # token level: relaxed bipartite matching
    token_weight: float = 1.0
    token_dim: int = 256
    token_matching: str = "sinkhorn"  # "sinkhorn" | "hungarian" | "filip"
    token_chunk_size: int = 32
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 10
    sinkhorn_unroll: bool = False  # backprop through the iterations (exact, slower) instead of a fixed plan
    hungarian_capacity: int = 2
    hungarian_num_negatives: int = 4
    # masked language modelling through the fusion module
    mlm_weight: float = 1.0
    mlm_probability: float = 0.15
    fusion_layers: list[int] | None = None  # 1-based text layers; None = 3 evenly spaced, last included
    fusion_num_heads: int | None = None  # None = text num_attention_heads
    fusion_type: str = "cross_attention"  # "cross_attention" | "additive"
    fusion_image_source: str = "last"  # "last" (pooled + last-stage tokens) | "multiscale"
    fusion_detach_image: bool = False
    fusion_word_attention: bool = True  # bidirectional self-attention over the masked caption in each fusion block
    # CLIP-PING: nearest-neighbour guidance
    nn_weight: float = 1.0
    xnn_weight: float = 1.0
    xnn_mode: str = "x2"  # "x2" | "x1"
    neighbor_head: str = "linear"  # "linear" | "mlp"
    neighbor_direction: str = "student_to_teacher"  # "student_to_teacher" | "teacher_to_student"
    neighbor_logit_scale_init_value: float = math.log(1 / 0.07)
    neighbor_top_k: int = 1
    teacher_image_dim: int | None = None
    teacher_text_dim: int | None = None

    def __post_init__(self, **kwargs):
        _reject_unknown_kwargs(self, kwargs)
        self.objectives = resolve_objectives(self.objectives or ["clip"])
        choices = {
            "soft_mode": ("similarity", "uniform"),
            "soft_schedule": ("linear", "cosine"),
            "token_matching": ("sinkhorn", "hungarian", "filip"),
            "fusion_type": ("cross_attention", "additive"),
            "fusion_image_source": ("last", "multiscale"),
            "xnn_mode": ("x2", "x1"),
            "neighbor_head": ("linear", "mlp"),
            "neighbor_direction": ("student_to_teacher", "teacher_to_student"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        super().__post_init__(**kwargs)

    def __setattr__(self, key, value):
        # `from_pretrained(..., objectives="lightclip")` and `config.objectives = ...` set the attribute after
        # `__post_init__`: resolve groups and validate names there too, or a string would be stored as it is
        if key == "objectives" and value is not None:
            value = resolve_objectives(value)
        super().__setattr__(key, value)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LightClipConfig":
        """Build a named preset (see `lightclip.list_presets()`); `overrides` replace top-level fields, and
        `text_config` / `vision_config` dicts update the preset's towers."""
        from .presets import PRESETS

        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown preset {name!r}.{hint} Available: {sorted(PRESETS)}")
        preset = copy.deepcopy(PRESETS[name])
        for key in ("text_config", "vision_config"):
            preset[key].update(overrides.pop(key, None) or {})
        preset.update(overrides)
        return cls(**preset)

    def resolved_fusion_layers(self) -> list[int]:
        """Text layers (1-based) after which the fusion module injects the image."""
        n = self.text_config.num_hidden_layers
        if self.fusion_layers:
            bad = [i for i in self.fusion_layers if not 1 <= i <= n]
            if bad:
                raise ValueError(f"fusion_layers {bad} out of range 1..{n}")
            return sorted(set(self.fusion_layers))
        stages = min(3, n)
        return sorted({round(n * (k + 1) / stages) for k in range(stages)})


__all__ = ["LightClipConfig", "LightClipTextConfig", "LightClipVisionConfig", "resolve_objectives"]
