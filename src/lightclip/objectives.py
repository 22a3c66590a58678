"""The training objectives of `LightClipForPreTraining`, one module each, registered in `OBJECTIVE_CLASSES`.

An objective owns its training-only parameters, turns one forward of the two towers into the per-sample features its
loss needs (`forward_features`), and computes that loss from features that may be merged over micro-batches
(`forward`). `LightClipForPreTraining` holds the active ones in an `nn.ModuleDict` keyed by name; the trainer and
the model card read the same registry. Adding an objective is one class here, its settings as fields of
`configuration_lightclip.LightClipPretrainingConfig` and its name in `configuration_lightclip.OBJECTIVES`
(docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_lightclip import LightClipConfig, LightClipPretrainingConfig
from .fusion import LightClipFusion
from .losses import (
    AffinityDistillationLoss,
    ClipLoss,
    FeatureDistillationLoss,
    MaskedLanguageModelingLoss,
    NeighborContrastiveLoss,
    SoftClipLoss,
    TokenMatchingLoss,
    mask_tokens,
)
from .modeling_lightclip import LightClipModel

Features = dict[str, torch.Tensor]


@dataclass
class TowerOutputs:
    """One forward of both towers on a local batch: what every objective may read to build its features."""

    model: LightClipModel
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision: Any  # LightClipVisionModelOutput, or None when no objective `needs_image_tokens`
    text: Any  # BaseModelOutputWithPooling, or None when no objective `needs_text_tokens`
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    mlm_input_ids: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None
    neighbor_targets: Mapping[str, torch.Tensor] | None = None
    teacher_targets: Mapping[str, torch.Tensor] | None = None


class Objective(nn.Module):
    """Base class: one training objective and its training-only parameters.

    Subclasses set `name` (the key in `config.pretraining_config.objectives`), `loss_key` (the key of its term in the
    output's `losses`), `weight_field` (the `pretraining_config` field weighting it; `None`: weight 1) and
    `logit_scale_init` (the field initialising its own `logit_scale` parameter, if it has one: of `pretraining_config`,
    or of the model config for the model's own CLIP scale init). `self.config` is the whole `LightClipConfig`, since
    objectives size themselves on the towers; `self.settings` is its `pretraining_config`.
    """

    name: ClassVar[str]
    loss_key: ClassVar[str]
    weight_field: ClassVar[str | None] = None
    logit_scale_init: ClassVar[str | None] = None
    needs_vision_stages: ClassVar[bool] = False
    # whether it reads `TowerOutputs.vision` / `.text` (per-token states); when no objective does, the towers run
    # their pooled-only forward, whose last layer computes the pooled token alone
    needs_image_tokens: ClassVar[bool] = False
    needs_text_tokens: ClassVar[bool] = False

    def __init__(self, config: LightClipConfig):
        super().__init__()
        self.config = config

    @property
    def settings(self) -> LightClipPretrainingConfig:
        """The training-only settings, read from the config on every use like the rest of it."""
        return self.config.pretraining_config

    @property
    def weight(self) -> float:
        return 1.0 if self.weight_field is None else float(getattr(self.settings, self.weight_field))

    def logit_scale_init_value(self) -> float:
        """The initial value of its `logit_scale`: the field `logit_scale_init` names."""
        owner = self.settings if hasattr(self.settings, self.logit_scale_init) else self.config
        return getattr(owner, self.logit_scale_init)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at `config.logit_scale_max` like the CLIP scale."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        if self.logit_scale_init is not None:
            self.logit_scale.clamp_(0, self.config.logit_scale_max)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1]; objectives with a schedule read it."""

    def log_values(self) -> dict[str, float]:
        """Scalars worth logging besides the loss."""
        return {}

    def forward_features(self, outputs: TowerOutputs) -> Features:
        """Per-sample features (rows) and scalars this objective's loss needs, beyond the shared embeddings."""
        return {}

    def forward(self, shared: Features, own: Features) -> dict[str, torch.Tensor]:
        """`{loss_key: loss}` from the shared features (`image_embeds`, `text_embeds`, `logit_scale`) and its own."""
        raise NotImplementedError

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        """(what it is, its weight and settings) for the model card, from a `pretraining_config` dict."""
        raise NotImplementedError


class ClipObjective(Objective):
    """Symmetric image-text InfoNCE over the global batch (CLIP)."""

    name, loss_key = "clip", "contrastive_loss"

    def __init__(self, config: LightClipConfig):
        super().__init__(config)
        self.loss = ClipLoss()

    def forward(self, shared: Features, own: Features) -> dict[str, torch.Tensor]:
        return self.loss(shared["image_embeds"], shared["text_embeds"], shared["logit_scale"])

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        return "clip: symmetric image-text InfoNCE", "1.0"


class SoftClipObjective(ClipObjective):
    """LightCLIP's InfoNCE with progressively softened negative labels; replaces `clip` (equal at alpha = 0)."""

    name = "soft"

    def __init__(self, config: LightClipConfig):
        Objective.__init__(self, config)
        settings = self.settings
        self.loss = SoftClipLoss(mode=settings.soft_mode, alpha_max=settings.soft_alpha_max,
                                 schedule=settings.soft_schedule, temperature=settings.soft_temperature)

    def set_progress(self, progress: float) -> None:
        self.loss.set_progress(progress)

    def log_values(self) -> dict[str, float]:
        return {"soft_alpha": self.loss.alpha}

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        return ("soft: InfoNCE with progressively softened negatives (replaces clip)",
                f"1.0; alpha rises to {config.get('soft_alpha_max')} ({config.get('soft_schedule')}, "
                f"{config.get('soft_mode')})")


class TokenMatchingObjective(Objective):
    """LightCLIP's relaxed bipartite matching between image patches and words, with its own projections and scale."""

    name, loss_key, weight_field, logit_scale_init = "token", "token_loss", "token_weight", "logit_scale_init_value"
    needs_image_tokens = needs_text_tokens = True

    def __init__(self, config: LightClipConfig):
        super().__init__(config)
        settings = self.settings
        self.image_proj = nn.Linear(config.vision_config.hidden_size, settings.token_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, settings.token_dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.loss = TokenMatchingLoss(
            method=settings.token_matching, epsilon=settings.sinkhorn_epsilon, iterations=settings.sinkhorn_iterations,
            capacity=settings.hungarian_capacity, num_negatives=settings.hungarian_num_negatives,
            chunk_size=settings.token_chunk_size, unroll=settings.sinkhorn_unroll,
            softmax_negatives=settings.token_num_negatives,
        )

    def forward_features(self, outputs: TowerOutputs) -> Features:
        specials = torch.tensor(self.config.text_config.special_token_ids, device=outputs.input_ids.device)
        return {
            "word_mask": outputs.attention_mask.bool() & ~torch.isin(outputs.input_ids, specials),
            "patch_tokens": F.normalize(self.image_proj(outputs.vision.patch_tokens), dim=-1),
            "word_tokens": F.normalize(self.text_proj(outputs.text.last_hidden_state), dim=-1),
            "logit_scale": self.scale(),
        }

    def forward(self, shared: Features, own: Features) -> dict[str, torch.Tensor]:
        return self.loss(own["patch_tokens"], own["word_tokens"], own["word_mask"], own["logit_scale"])

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        negatives = config.get("token_num_negatives")
        bound = "" if negatives is None else f", {negatives} hard negative{'s' * (negatives != 1)} per query"
        return ("token: patch-word relaxed bipartite matching",
                f"{config.get('token_weight')} ({config.get('token_matching')}{bound})")


def mask_text(config: LightClipConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of the text for the MLM objective: (masked ids, labels with -100 where not masked)."""
    text_cfg = config.text_config
    return mask_tokens(input_ids, attention_mask, mask_token_id=text_cfg.mask_token_id, vocab_size=text_cfg.vocab_size,
                       special_token_ids=text_cfg.special_token_ids,
                       probability=config.pretraining_config.mlm_probability,
                       generator=generator)


class MaskedLanguageModelingObjective(Objective):
    """LightCLIP's MLM through the auxiliary fusion module, which injects the image into the masked text."""

    name, loss_key, weight_field = "mlm", "mlm_loss", "mlm_weight"
    needs_image_tokens = True  # the masked caption runs through the text tower in its own pass

    def __init__(self, config: LightClipConfig, model: LightClipModel):
        super().__init__(config)
        if config.text_config.mask_token_id is None:
            raise ValueError("the mlm objective needs text_config.mask_token_id (a tokenizer with a mask token)")
        self.fusion = LightClipFusion(config, self._image_source_widths(model))
        self.loss = MaskedLanguageModelingLoss()

    @property
    def needs_vision_stages(self) -> bool:
        return self.settings.fusion_image_source == "multiscale"

    def _stage_indices(self, num_states: int) -> list[int]:
        """Evenly spaced image-tower stages, one per fusion stage, the last stage included."""
        stages = len(self.config.resolved_fusion_layers())
        return [max(1, round((num_states - 1) * (k + 1) / stages)) for k in range(stages)]

    def _image_source_widths(self, model: LightClipModel) -> list[int]:
        vision = self.config.vision_config
        if self.settings.fusion_image_source == "last":
            return [vision.hidden_size]
        if vision.backbone == "vit":
            return [vision.hidden_size] * len(self.config.resolved_fusion_layers())
        tower = model.vision_model
        device = next(tower.parameters()).device
        was_training = tower.training
        with torch.no_grad():
            tower.eval()
            size = vision.image_size
            states = tower(torch.zeros(1, vision.num_channels, size, size, device=device), True).hidden_states
            tower.train(was_training)
        return [states[i].shape[-1] for i in self._stage_indices(len(states))]

    def forward_features(self, outputs: TowerOutputs) -> Features:
        text_tower, vision = outputs.model.text_model, outputs.vision
        mlm_input_ids, mlm_labels = outputs.mlm_input_ids, outputs.mlm_labels
        if mlm_input_ids is None:
            mlm_input_ids, mlm_labels = mask_text(self.config, outputs.input_ids, outputs.attention_mask)
        else:
            mlm_input_ids, _ = text_tower.truncate(mlm_input_ids, None)
            mlm_labels = mlm_labels[:, : mlm_input_ids.shape[1]]
        masked = text_tower(mlm_input_ids, outputs.attention_mask, output_hidden_states=True)
        if self.settings.fusion_image_source == "last":
            sources = [torch.cat([vision.pooler_output[:, None], vision.patch_tokens], dim=1)]
        else:
            states = vision.hidden_states
            sources = [states[i] for i in self._stage_indices(len(states))]
            if self.config.vision_config.backbone != "vit":  # CNN stages carry no pooled token: prepend their mean
                sources = [torch.cat([s.mean(1, keepdim=True), s], dim=1) for s in sources]
        token_embedding = text_tower.embeddings.token_embedding.weight
        # only the masked words need the vocabulary head and the last fusion block's outputs (fusion.py)
        selected = mlm_labels != -100
        logits = self.fusion(masked.hidden_states, sources, token_embedding, positions=selected,
                             attention_mask=outputs.attention_mask)
        return dict(self.loss(logits, mlm_labels[selected]))  # per micro-batch (no negatives): a scalar

    def forward(self, shared: Features, own: Features) -> dict[str, torch.Tensor]:
        return {"mlm_loss": own["mlm_loss"]}

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        return ("mlm: masked language modelling through the image-text fusion module",
                f"{config.get('mlm_weight')} (mask probability {config.get('mlm_probability')})")


def _neighbor_head(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))
    return nn.Linear(d_in, d_out)


class NeighborObjective(Objective):
    """CLIP-PING's guidance from the same modality's nearest neighbours in the teachers' feature banks (NN)."""

    name, loss_key, weight_field = "nn", "nn_loss", "nn_weight"
    logit_scale_init = "neighbor_logit_scale_init_value"
    summary = "nearest-neighbour guidance, same modality (CLIP-PING)"

    def __init__(self, config: LightClipConfig):
        super().__init__(config)
        settings = self.settings
        if settings.teacher_image_dim is None or settings.teacher_text_dim is None:
            raise ValueError(
                f"the {self.name} objective needs pretraining_config.teacher_image_dim and "
                "pretraining_config.teacher_text_dim: the widths of the feature bank's teachers "
                "(FeatureBank.image_dim / .text_dim)"
            )
        image_dim, text_dim = self.teacher_dims(settings)
        head, width = settings.neighbor_head, config.projection_dim
        if settings.neighbor_direction == "student_to_teacher":
            self.image_head = _neighbor_head(head, width, image_dim)
            self.text_head = _neighbor_head(head, width, text_dim)
        else:
            self.image_head = _neighbor_head(head, image_dim, width)
            self.text_head = _neighbor_head(head, text_dim, width)
        self.logit_scale = nn.Parameter(torch.tensor(settings.neighbor_logit_scale_init_value))
        # teacher -> student: the targets come out of trainable heads and must keep their gradient
        self.loss = NeighborContrastiveLoss(self.name,
                                            detach_targets=settings.neighbor_direction == "student_to_teacher")

    @staticmethod
    def teacher_dims(settings: LightClipPretrainingConfig) -> tuple[int, int]:
        """Widths of the teacher spaces the image and the text neighbours live in: their own modality's."""
        return settings.teacher_image_dim, settings.teacher_text_dim

    def forward_features(self, outputs: TowerOutputs) -> Features:
        keys = (f"image_{self.name}", f"text_{self.name}")
        targets = outputs.neighbor_targets
        if targets is None or any(k not in targets for k in keys):
            raise ValueError(
                f"the {self.name} objective needs neighbor_targets with keys {keys}: pass "
                "FeatureBank.lookup(batch['index']) (see docs/neighbors.md)"
            )
        image_embeds, text_embeds = outputs.image_embeds, outputs.text_embeds
        image_t = F.normalize(targets[keys[0]].to(image_embeds), dim=-1)
        text_t = F.normalize(targets[keys[1]].to(text_embeds), dim=-1)
        if self.settings.neighbor_direction == "student_to_teacher":
            queries = (F.normalize(self.image_head(image_embeds), dim=-1),
                       F.normalize(self.text_head(text_embeds), dim=-1))
            goals = (image_t, text_t)
        else:  # teacher features are projected into the student space; the student embeddings are the queries
            queries = (image_embeds, text_embeds)
            goals = (F.normalize(self.image_head(image_t), dim=-1), F.normalize(self.text_head(text_t), dim=-1))
        return {"image_queries": queries[0], "text_queries": queries[1], "image_targets": goals[0],
                "text_targets": goals[1], "logit_scale": self.scale()}

    def forward(self, shared: Features, own: Features) -> dict[str, torch.Tensor]:
        return self.loss(own["image_queries"], own["text_queries"], own["image_targets"], own["text_targets"],
                         own["logit_scale"])

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        return f"{cls.name}: {cls.summary}", str(config.get(cls.weight_field))


class CrossNeighborObjective(NeighborObjective):
    """CLIP-PING's guidance from cross-modal nearest neighbours (XNN): each head maps into the other modality's
    teacher space (docs/method.md)."""

    name, loss_key, weight_field = "xnn", "xnn_loss", "xnn_weight"
    summary = "nearest-neighbour guidance, cross modality (CLIP-PING)"

    @staticmethod
    def teacher_dims(settings: LightClipPretrainingConfig) -> tuple[int, int]:
        return settings.teacher_text_dim, settings.teacher_image_dim

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        row = super().card_row(config)
        return row[0], f"{row[1]} ({config.get('xnn_mode')})"


class DistillationObjective(Objective):
    """Base of the objectives that distil a frozen dual encoder (docs/distillation.md): they read the teacher's
    per-sample embeddings of the batch, `teacher_targets`, which the trainer computes online or looks up."""

    summary: ClassVar[str]
    TARGET_KEYS: ClassVar[tuple[str, ...]] = ("image_embeds", "text_embeds", "logit_scale")

    def teacher_features(self, outputs: TowerOutputs) -> Features:
        """The teacher's image and text embeddings (B, D) and exponentiated logit scale (), float32 on the student's
        device: constants, so `merge_features` concatenates their rows and keeps the scale as it is."""
        targets = outputs.teacher_targets
        if targets is None or any(k not in targets for k in self.TARGET_KEYS):
            raise ValueError(
                f"the {self.name} objective needs teacher_targets with keys {self.TARGET_KEYS}: the teacher's "
                "embeddings of the batch, from examples/pretrain.py --distill_model (an online teacher) or "
                "--distill_embeddings (precomputed; see docs/distillation.md)"
            )
        batch = outputs.image_embeds.shape[0]
        image, text = (targets[k].detach().to(outputs.image_embeds.device, torch.float32) for k in self.TARGET_KEYS[:2])
        if image.shape[0] != batch or text.shape[0] != batch:
            raise ValueError(f"teacher_targets have {image.shape[0]} image and {text.shape[0]} text rows for a batch "
                             f"of {batch}")
        scale = torch.as_tensor(targets["logit_scale"]).detach().to(image.device, torch.float32).reshape(())
        return {"teacher_image": image, "teacher_text": text, "teacher_logit_scale": scale}

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        teacher = config.get("distill_teacher")
        return (f"{cls.name}: {cls.summary}" + (f" from `{teacher}`" if teacher else ""),
                f"{config.get(cls.weight_field)} ({cls.card_setting(config)})")

    @classmethod
    def card_setting(cls, config: Mapping[str, Any]) -> str:
        raise NotImplementedError


class AffinityDistillationObjective(DistillationObjective):
    """Affinity distillation (`kd`): the student's image-text distributions over the global batch are pulled to the
    teacher's (TinyCLIP, CLIP-KD, open_clip's `DistillClipLoss`)."""

    name, loss_key, weight_field = "kd", "kd_loss", "kd_weight"
    summary = "affinity distillation"

    def __init__(self, config: LightClipConfig):
        super().__init__(config)
        self.loss = AffinityDistillationLoss(self.settings.kd_temperature)

    def forward_features(self, outputs: TowerOutputs) -> Features:
        return self.teacher_features(outputs)

    def forward(self, shared: Features, own: Features) -> dict[str, torch.Tensor]:
        return self.loss(shared["image_embeds"], shared["text_embeds"], shared["logit_scale"], own["teacher_image"],
                         own["teacher_text"], own["teacher_logit_scale"])

    @classmethod
    def card_setting(cls, config: Mapping[str, Any]) -> str:
        temperature = config.get("kd_temperature")
        return "teacher's own logit scale" if temperature is None else f"teacher temperature {temperature}"


class FeatureDistillationObjective(DistillationObjective):
    """Feature distillation (`fd`, CLIP-KD's FD): each embedding is pulled to its own sample's teacher embedding,
    through a training-only projection to the teacher's width when the widths differ."""

    name, loss_key, weight_field = "fd", "fd_loss", "fd_weight"
    summary = "feature distillation"

    def __init__(self, config: LightClipConfig):
        super().__init__(config)
        settings = self.settings
        if settings.distill_teacher_dim is None:
            raise ValueError("the fd objective needs pretraining_config.distill_teacher_dim: the width of the "
                             "teacher's embeddings (examples/pretrain.py fills it from --distill_model or "
                             "--distill_embeddings)")
        width, teacher_dim = config.projection_dim, settings.distill_teacher_dim
        self.image_proj = nn.Linear(width, teacher_dim) if teacher_dim != width else None
        self.text_proj = nn.Linear(width, teacher_dim) if teacher_dim != width else None
        self.loss = FeatureDistillationLoss(settings.fd_loss)

    def forward_features(self, outputs: TowerOutputs) -> Features:
        image, text = outputs.image_embeds, outputs.text_embeds
        if self.image_proj is not None:
            image, text = self.image_proj(image), self.text_proj(text)
        return {"image": image, "text": text, **self.teacher_features(outputs)}

    def forward(self, shared: Features, own: Features) -> dict[str, torch.Tensor]:
        return self.loss(own["image"], own["text"], own["teacher_image"], own["teacher_text"])

    @classmethod
    def card_setting(cls, config: Mapping[str, Any]) -> str:
        return f"{config.get('fd_loss')}, teacher width {config.get('distill_teacher_dim')}"


OBJECTIVE_CLASSES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (ClipObjective, SoftClipObjective, TokenMatchingObjective,
                              MaskedLanguageModelingObjective, NeighborObjective, CrossNeighborObjective,
                              AffinityDistillationObjective, FeatureDistillationObjective)
}


def build_objective(name: str, config: LightClipConfig, model: LightClipModel) -> Objective:
    """The objective `name` for `config`; `model` is read (never kept) by objectives that size themselves on it."""
    cls = OBJECTIVE_CLASSES[name]
    return cls(config, model) if cls is MaskedLanguageModelingObjective else cls(config)


__all__ = ["OBJECTIVE_CLASSES", "Objective", "TowerOutputs", "build_objective", "mask_text"]
