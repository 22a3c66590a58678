"""LightCLIP model configuration.

`LightClipConfig` is the single source of truth for a lightclip model: the two towers and the shared projection,
which define `LightClipModel`, and `pretraining_config` (`LightClipPretrainingConfig`), the training-only objectives
that `LightClipForPreTraining` builds. The inference model reads only the tower and projection fields, so a checkpoint
trained with any mix of objectives loads as a plain dual encoder. A training-only key at the top level (of a file or
of `LightClipConfig(...)` / `from_pretrained(...)`) is refused, naming where it belongs; `from_preset` alone takes
them by name, as the builder of a run's config.

The configs are `huggingface_hub` strict dataclasses, as transformers' own are: every field's type (and the choices of a
`Literal` field) and range (sizes positive, scales finite, dropout rates in [0, 1), the masking probability in
[0, 1], weights >= 0) is checked on construction and on assignment, and the cross-field checks
(`validate_architecture`) run after construction and again on save. A float field is declared `float | int` so that
`mlm_weight=0` stays valid.
"""

import copy
import dataclasses
import difflib
import functools
import math
import os
from collections.abc import Callable
from typing import Any, Literal, get_args

from huggingface_hub.dataclasses import as_validated_field, strict
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    StrictDataclassError,
    StrictDataclassFieldValidationError,
)
from transformers.configuration_utils import PreTrainedConfig

# written by transformers (`custom_object_save`) for `trust_remote_code` loading and kept by `PreTrainedConfig` as a
# plain attribute: the one key a lightclip config accepts that no transformers class declares or consumes
_REMOTE_CODE_KEYS = ("auto_map",)


def _check_model_type(cls: type[PreTrainedConfig], given: str | None) -> None:
    """A config of another model type is named as such, before any of its values is checked (a `config.json` of CLIP
    or BERT would otherwise fail on its first foreign key or value)."""
    if given is not None and given != cls.model_type:
        raise ValueError(
            f"{cls.__name__} expects model_type {cls.model_type!r} but got a config of model_type {given!r}: this "
            f"checkpoint is not a lightclip model" + (" component" if cls.base_config_key else "")
            + ". Load it with its own class (e.g. AutoConfig / AutoModel)."
        )


def _reject_unknown_keys(config: PreTrainedConfig, kwargs: dict) -> None:
    """Raise for a misspelt key instead of keeping it as an attribute nothing reads.

    Unknown means unknown to transformers too: `PreTrainedConfig.__post_init__` consumes the keys it knows
    (`attn_implementation`, `torch_dtype`, generation parameters, ...) and stores any other one as a plain attribute,
    so a key it stored that is no field of this class is a typo. Private (`_name_or_path`) and remote-code keys pass.
    """
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = [key for key in kwargs if key in vars(config) and key not in fields and not key.startswith("_")
               and key not in _REMOTE_CODE_KEYS]
    if unknown:
        known = sorted(fields)
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{type(config).__name__} got unknown key(s): {', '.join(hints)}")


def _value_rule(description: str, check: Callable[[Any], bool]) -> Callable:
    """A dataclass field whose value must pass `check`, as transformers' `interval` builds one: strict runs it on
    construction and on every assignment, after the type check. None passes (an optional field left unset)."""

    def validate(value: Any) -> None:
        if value is not None and not check(value):
            raise ValueError(f"must be {description}, got {value!r}")

    return as_validated_field(validate)


positive_int = _value_rule("a positive integer", lambda value: value > 0)
finite_number = _value_rule("a finite number", math.isfinite)
positive_number = _value_rule("a finite positive number", lambda value: math.isfinite(value) and value > 0)
non_negative_number = _value_rule("a finite number >= 0", lambda value: math.isfinite(value) and value >= 0)
probability = _value_rule("in [0, 1)", lambda value: 0 <= value < 1)
fraction = _value_rule("in [0, 1]", lambda value: 0 <= value <= 1)


def _error_message(cls: type[PreTrainedConfig], key: str, error: StrictDataclassError) -> str:
    """A value rule's error reads `<field> must be ..., got <value>`; a type or class check keeps strict's text."""
    if isinstance(error, StrictDataclassFieldValidationError) and type(error.__cause__) is ValueError:
        return f"{cls.__name__}: {key} {error.__cause__}"
    return f"{cls.__name__}: {error}"


def _unresolved_source_message(name: str, error: OSError) -> str | None:
    """Why `from_pretrained(name)` found no config, when `name` is no folder and the hub gave nothing: transformers
    names only the hub, so a preset name or a mistyped one reads as a connection problem. None for any other failure
    (a folder without `config.json`, a gated repository, ...), whose own error is clear."""
    from .presets import PRESETS

    if os.path.isdir(name):
        return None
    if name in PRESETS:
        return (f"{name!r} is a preset, which is built, not loaded: LightClipConfig.from_preset({name!r}) (the "
                f"training script's --model takes it as it is); from_pretrained reads a saved folder or a hub id")
    cause = error.__cause__
    if isinstance(cause, LocalEntryNotFoundError):
        hub = "the hub cannot be reached to look it up (offline, or no connection), nor is it in the local cache"
    elif isinstance(cause, RepositoryNotFoundError) and not isinstance(cause, GatedRepoError):
        hub = "no model on the hub has that id (a private one needs a token: `hf auth login`)"
    elif isinstance(cause, HFValidationError):
        hub = "it is no hub id (`name` or `org/name`)"
    else:
        return None
    close = difflib.get_close_matches(name, list(PRESETS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{name!r} is not a preset{hint}, not a local folder, and {hub}"


def _strict_config(cls: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    """`huggingface_hub`'s `@strict` with the errors of a lightclip config: a foreign `model_type` is named first, a
    misspelt key gets a "did you mean" hint, and a bad value raises `ValueError` naming the class and the field, on
    construction and on assignment. Strict raises its own `StrictDataclassError`, which is no `ValueError`; every bad
    config value in this package is a `ValueError`, which callers (the trainer's option checks) catch."""
    cls = strict(cls)
    init, setattr_ = cls.__init__, cls.__setattr__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _check_model_type(cls, kwargs.pop("model_type", None))
        try:
            init(self, *args, **kwargs)
        except StrictDataclassError as error:
            raise ValueError(f"{cls.__name__}: {error}") from error
        _reject_unknown_keys(self, kwargs)

    @functools.wraps(setattr_)
    def __setattr__(self, key, value):
        try:
            setattr_(self, key, value)
        except StrictDataclassError as error:
            raise ValueError(_error_message(cls, key, error)) from error

    cls.__init__, cls.__setattr__ = __init__, __setattr__
    return cls


@_strict_config
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

    vocab_size: int = positive_int(default=8192)
    hidden_size: int = positive_int(default=256)
    intermediate_size: int = positive_int(default=1024)
    num_hidden_layers: int = positive_int(default=6)
    num_attention_heads: int = positive_int(default=4)
    max_position_embeddings: int = positive_int(default=77)
    hidden_act: str = "gelu"
    layer_norm_eps: float | int = positive_number(default=1e-5)
    attention_dropout: float | int = probability(default=0.0)
    initializer_range: float | int = non_negative_number(default=0.02)
    causal: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    mask_token_id: int | None = 4
    unk_token_id: int | None = 1

    def validate_architecture(self) -> None:
        """The width splits evenly over the attention heads."""
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )

    @property
    def special_token_ids(self) -> list[int]:
        """Ids that are never words (padding, start, end, mask, unknown): excluded from word tokens and from MLM masking
        (never a target, never drawn as a random replacement), as transformers' MLM collator excludes every special
        id."""
        return [t for t in (self.pad_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id,
                            self.unk_token_id) if t is not None]


VisionBackbone = Literal["vit", "convnet", "mobilenetv2", "efficientnet", "efficientnet-lite"]
VISION_BACKBONES = get_args(VisionBackbone)
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


@_strict_config
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

    backbone: VisionBackbone = "vit"
    backbone_kwargs: dict | None = None
    image_size: int = positive_int(default=224)
    patch_size: int = positive_int(default=16)
    num_channels: int = positive_int(default=3)
    hidden_size: int = positive_int(default=256)
    intermediate_size: int = positive_int(default=1024)
    num_hidden_layers: int = positive_int(default=6)
    num_attention_heads: int = positive_int(default=4)
    hidden_act: str = "gelu"
    layer_norm_eps: float | int = positive_number(default=1e-5)
    attention_dropout: float | int = probability(default=0.0)
    initializer_range: float | int = non_negative_number(default=0.02)

    def __post_init__(self, **kwargs):
        # a CNN's width follows from its backbone (and reading it checks the backbone_kwargs)
        if self.backbone == "convnet":
            self.hidden_size = self.convnet_widths()[-1]
        elif self.backbone == "efficientnet-lite":
            self.efficientnet_lite_kwargs()
            self.hidden_size = EFFICIENTNET_LITE_HIDDEN_SIZE
        elif self.backbone != "vit":
            self.hidden_size = self.backbone_config().hidden_size
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """A ViT's width splits evenly over its heads and its image into whole patches."""
        super().validate_architecture()
        if self.backbone == "vit":
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError("hidden_size must be a multiple of num_attention_heads")
            if self.image_size % self.patch_size != 0:
                raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")

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
        if not all(math.isfinite(kwargs[key]) and kwargs[key] > 0 for key in ("width_multiplier", "depth_multiplier")):
            raise ValueError(f"efficientnet-lite multipliers must be positive and finite, got {kwargs}")
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


# every objective, in canonical order (the registry `lightclip.objectives.OBJECTIVE_CLASSES` holds their classes);
# `kd` and `fd` (distillation from a frozen dual encoder) belong to no group: they combine with any of them
OBJECTIVES = ("clip", "soft", "siglip", "token", "mlm", "nn", "xnn", "kd", "fd")
# the image-text contrastive terms, the objectives whose class declares `replaces_contrastive`: exactly one trains,
# `clip` unless another is chosen. Named here because the inference config resolves objectives without importing
# training code; the registry's test checks that the two agree.
CONTRASTIVE_OBJECTIVES = ("clip", "soft", "siglip")
OBJECTIVE_GROUPS = {
    "clip": ("clip",),
    "lightclip": ("soft", "token", "mlm"),
    "clip-ping": ("clip", "nn", "xnn"),
    "all": ("soft", "token", "mlm", "nn", "xnn"),
}


def resolve_objectives(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand group names (`lightclip`, `clip-ping`, `all`) into terms, in canonical order.

    Exactly one image-text contrastive term trains (`CONTRASTIVE_OBJECTIVES`): `clip` when none is chosen, and any
    other replaces it (`clip+soft` is `soft`); two others are an error.
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
    default = CONTRASTIVE_OBJECTIVES[0]
    chosen = sorted(terms & set(CONTRASTIVE_OBJECTIVES) - {default})
    if len(chosen) > 1:
        raise ValueError(f"objectives {chosen} are each an image-text contrastive term; choose one")
    if chosen:
        terms.discard(default)
    else:
        terms.add(default)
    return [t for t in OBJECTIVES if t in terms]


@_strict_config
class LightClipPretrainingConfig(PreTrainedConfig):
    r"""The training-only settings of a lightclip model: which objectives `LightClipForPreTraining` builds, and how.

    `LightClipModel` reads none of them, so they sit apart in `LightClipConfig.pretraining_config` and the rest of a
    `config.json` reads as the inference model. See `docs/method.md` for each reading and its alternatives:

    - `objectives`: terms to train, any of `clip`, `soft`, `siglip`, `token`, `mlm`, `nn`, `xnn`, `kd`, `fd`, or the
      groups `lightclip`, `clip-ping`, `all`; a group or a comma list is resolved to terms on every assignment.
    - `soft_*`: progressively softened negative labels (LightCLIP, instance level).
    - `siglip_*`: the pairwise sigmoid loss of SigLIP, in place of the softmax contrastive term.
    - `token_*`, `sinkhorn_*`, `hungarian_*`: patch-word relaxed bipartite matching (LightCLIP, token level).
    - `mlm_*`, `fusion_*`: masked language modelling through the auxiliary fusion module (LightCLIP).
    - `nn_*`, `xnn_*`, `neighbor_*`, `teacher_*`: nearest-neighbour guidance from frozen feature banks (CLIP-PING).
    - `kd_*`, `fd_*`, `distill_*`: affinity and feature distillation from a frozen dual encoder
      (`docs/distillation.md`).

    A field declared here is all a new setting needs: `LightClipConfig.from_preset` then takes it by name
    (`from_preset(name, token_weight=0.5)`), and `examples/pretrain.py` makes it an option (`--token_weight 0.5`).

    Example:

    ```python
    >>> from lightclip import LightClipConfig, LightClipPretrainingConfig
    >>> config = LightClipConfig(pretraining_config=LightClipPretrainingConfig(objectives="lightclip", mlm_weight=0.5))
    >>> config.pretraining_config.objectives
    ['soft', 'token', 'mlm']
    ```"""

    model_type = "lightclip_pretraining"
    base_config_key = "pretraining_config"

    # which objectives LightClipForPreTraining builds (None: clip)
    objectives: list[str] | tuple[str, ...] | str | None = None
    # instance level: progressively softened negatives
    # uniform: label smoothing over the negatives; similarity (our reading of the paper): the model's detached logits
    soft_mode: Literal["similarity", "uniform"] = "uniform"
    soft_alpha_max: float | int = fraction(default=0.2)
    soft_schedule: Literal["linear", "cosine"] = "linear"
    soft_temperature: float | int = positive_number(default=1.0)
    # SigLIP: its own logit scale (log) and bias, initialised as Zhai et al. (t = 10, b = -10)
    siglip_logit_scale_init_value: float | int = finite_number(default=math.log(10.0))
    siglip_logit_bias_init_value: float | int = finite_number(default=-10.0)
    # token level: relaxed bipartite matching
    token_weight: float | int = non_negative_number(default=1.0)
    token_dim: int = positive_int(default=256)
    token_matching: Literal["sinkhorn", "hungarian", "filip"] = "sinkhorn"
    token_chunk_size: int = positive_int(default=32)
    # None: softmax over every pair; k: the positive and its k hardest negatives (k >= 1: with none the loss is 0)
    token_num_negatives: int | None = positive_int(default=None)
    sinkhorn_epsilon: float | int = positive_number(default=0.05)
    sinkhorn_iterations: int = positive_int(default=10)
    sinkhorn_unroll: bool = False  # backprop through the iterations (exact, slower) instead of a fixed plan
    hungarian_capacity: int = positive_int(default=2)
    # None: match every pair (one score scale per row)
    hungarian_num_negatives: int | None = positive_int(default=None)
    # masked language modelling through the fusion module
    mlm_weight: float | int = non_negative_number(default=1.0)
    mlm_probability: float | int = fraction(default=0.15)  # 1: every maskable token masked
    fusion_layers: list[int] | None = None  # 1-based text layers; None = 3 evenly spaced, last included
    fusion_num_heads: int | None = positive_int(default=None)  # None = text num_attention_heads
    fusion_type: Literal["cross_attention", "additive"] = "cross_attention"
    fusion_image_source: Literal["last", "multiscale"] = "last"  # last: pooled + last-stage tokens
    fusion_detach_image: bool = False
    fusion_word_attention: bool = True  # bidirectional self-attention over the masked caption in each fusion block
    # CLIP-PING: nearest-neighbour guidance
    nn_weight: float | int = non_negative_number(default=1.0)
    xnn_weight: float | int = non_negative_number(default=1.0)
    xnn_mode: Literal["x2", "x1"] = "x2"
    neighbor_head: Literal["linear", "mlp"] = "linear"
    neighbor_direction: Literal["student_to_teacher", "teacher_to_student"] = "student_to_teacher"
    neighbor_logit_scale_init_value: float | int = finite_number(default=math.log(1 / 0.07))
    neighbor_top_k: int = positive_int(default=1)
    teacher_image_dim: int | None = positive_int(default=None)
    teacher_text_dim: int | None = positive_int(default=None)
    # distillation from a frozen dual encoder (docs/distillation.md)
    kd_weight: float | int = non_negative_number(default=1.0)
    # None: the teacher's own logit scale; tau: teacher logits / tau
    kd_temperature: float | int | None = positive_number(default=None)
    fd_weight: float | int = non_negative_number(default=1.0)
    fd_loss: Literal["cosine", "mse"] = "cosine"
    # the teacher's embedding width (fd projects to it when it differs)
    distill_teacher_dim: int | None = positive_int(default=None)
    distill_teacher: str | None = None  # the teacher's hub id or folder, for the record (model card)

    def __post_init__(self, **kwargs):
        if self.objectives is None:
            self.objectives = ["clip"]
        super().__post_init__(**kwargs)

    def __setattr__(self, key, value):
        # `config.objectives = "lightclip"` and `from_pretrained(..., objectives="lightclip")` assign after
        # construction: resolve groups and validate names on every assignment, or a string would be stored as it is
        if key == "objectives" and value is not None:
            value = resolve_objectives(value)
        super().__setattr__(key, value)

    @classmethod
    def own_fields(cls) -> tuple[dataclasses.Field, ...]:
        """The training-only settings: its fields, less those `PreTrainedConfig` declares for every config."""
        common = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        return tuple(f for f in dataclasses.fields(cls) if f.name not in common)

    def settings_dict(self) -> dict:
        """`{field: value}` of the training-only settings."""
        return {f.name: getattr(self, f.name) for f in self.own_fields()}


# the training-only settings, by name: refused at the top level of a `LightClipConfig`, taken by `from_preset`
PRETRAINING_FIELDS = tuple(f.name for f in LightClipPretrainingConfig.own_fields())


def _reject_top_level_settings(kwargs: dict) -> None:
    """A training-only setting given to the model config: refused, naming where it goes (a misspelt one is refused
    by the unknown-key check)."""
    settings = sorted(key for key in kwargs if key in PRETRAINING_FIELDS)
    if settings:
        raise ValueError(
            f"LightClipConfig got training-only setting(s) {settings} at the top level: they are fields of "
            f"pretraining_config (LightClipConfig(pretraining_config=dict({settings[0]}=...)), "
            f"from_pretrained(path, pretraining_config=dict({settings[0]}=...)), or the \"pretraining_config\" of a "
            "config.json)"
        )


@_strict_config
class LightClipConfig(PreTrainedConfig):
    r"""Configuration of a lightclip dual encoder: its towers and shared projection, which define `LightClipModel`,
    and `pretraining_config`, the training-only objectives of `LightClipForPreTraining` (`LightClipPretrainingConfig`).

    The training-only settings live in `pretraining_config` only (`LightClipConfig(pretraining_config=dict(
    token_weight=0.5))`, `config.pretraining_config.token_weight`): one at the top level, given to the constructor,
    to `from_pretrained` or set on the model config, is an error naming where it belongs, since it would be stored
    where nothing reads it. `from_preset` takes them by name and puts them there.

    Example:

    ```python
    >>> from lightclip import LightClipConfig
    >>> config = LightClipConfig.from_preset("lightclip-xxs", objectives=["lightclip"])
    >>> config.pretraining_config.objectives
    ['soft', 'token', 'mlm']
    ```"""

    model_type = "lightclip"
    sub_configs_defaults = {
        "text_config": LightClipTextConfig,
        "vision_config": LightClipVisionConfig,
        "pretraining_config": LightClipPretrainingConfig,
    }
    text_config: dict | LightClipTextConfig | None = None
    vision_config: dict | LightClipVisionConfig | None = None
    projection_dim: int = positive_int(default=256)
    logit_scale_init_value: float | int = finite_number(default=math.log(1 / 0.07))
    logit_scale_max: float | int = finite_number(default=math.log(100.0))
    pretraining_config: dict | LightClipPretrainingConfig | None = None

    def __post_init__(self, **kwargs):
        _reject_top_level_settings(kwargs)
        super().__post_init__(**kwargs)

    def __setattr__(self, key, value):
        if key in PRETRAINING_FIELDS:
            raise AttributeError(f"{key} is a training-only setting: set config.pretraining_config.{key}")
        super().__setattr__(key, value)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`PreTrainedConfig.from_dict`, refusing a training-only setting among `kwargs`
        (`from_pretrained(path, token_weight=0.5)`), which it would otherwise drop: `pretraining_config=dict(...)`
        updates the file's settings."""
        _reject_top_level_settings(kwargs)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """`PreTrainedConfig.get_config_dict`; a name that is no folder and that the hub cannot give says so, and what
        else it is not (a preset, with the closest one), before any model, processor or script goes further."""
        try:
            return super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            message = _unresolved_source_message(str(pretrained_model_name_or_path), error)
            if message is None:
                raise
            raise OSError(message) from error

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LightClipConfig":
        """Build a named preset (see `lightclip.list_presets()`); `overrides` replace top-level fields, `text_config` /
        `vision_config` / `pretraining_config` dicts update the preset's, and a training-only setting given by name
        (`objectives="lightclip"`, `token_weight=0.5`) updates `pretraining_config` over such a dict."""
        from .presets import PRESETS

        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown preset {name!r}.{hint} Available: {sorted(PRESETS)}")
        preset = copy.deepcopy(PRESETS[name])
        for key in cls.sub_configs:
            preset.setdefault(key, {}).update(overrides.pop(key, None) or {})
        settings = {key: overrides.pop(key) for key in list(overrides) if key in PRETRAINING_FIELDS}
        preset["pretraining_config"].update(settings)
        preset.update(overrides)
        return cls(**preset)

    def validate_fusion_layers(self) -> None:
        """The fusion layers are text layers that exist: a model with more or fewer is refused here, not at build."""
        self.resolved_fusion_layers()

    def resolved_fusion_layers(self) -> list[int]:
        """Text layers (1-based) after which the fusion module injects the image."""
        n = self.text_config.num_hidden_layers
        fusion_layers = self.pretraining_config.fusion_layers
        if fusion_layers:
            bad = [i for i in fusion_layers if not 1 <= i <= n]
            if bad:
                raise ValueError(f"fusion_layers {bad} out of range 1..{n}")
            return sorted(set(fusion_layers))
        stages = min(3, n)
        return sorted({round(n * (k + 1) / stages) for k in range(stages)})


__all__ = ["LightClipConfig", "LightClipPretrainingConfig", "LightClipTextConfig", "LightClipVisionConfig",
           "resolve_objectives"]
