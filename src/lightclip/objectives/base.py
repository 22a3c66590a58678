"""What `LightClipForPreTraining` and the training script know of an objective: the `Objective` contract, the tower
outputs it reads, the `TargetSource` interface of the frozen sources that feed it, and the helpers every loss shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from ..configuration_lightclip import LightClipConfig, LightClipPretrainingConfig
from ..modeling_lightclip import LightClipModel

Features = dict[str, Tensor]


@dataclass
class TowerOutputs:
    """One forward of both towers on a local batch, with the batch's extra inputs: what every objective may read to
    build its features."""

    model: LightClipModel
    input_ids: Tensor
    attention_mask: Tensor
    vision: Any  # LightClipVisionModelOutput, or None when no objective `needs_image_tokens`
    text: Any  # BaseModelOutputWithPooling, or None when no objective `needs_text_tokens`
    image_embeds: Tensor
    text_embeds: Tensor
    mlm_input_ids: Tensor | None = None  # `needs_masked_text`
    mlm_labels: Tensor | None = None
    neighbor_targets: Mapping[str, Tensor] | None = None  # `needs_neighbor_targets`
    teacher_targets: Mapping[str, Tensor] | None = None  # `needs_teacher_targets`


class TargetSource(Protocol):
    """A frozen source of per-sample targets, kept outside the trained model: a feature bank (`FeatureBank`,
    `ActiveTeacherNeighbors`) or a distillation teacher (`DistillationTeacher`, `TeacherEmbeddingStore`).

    An objective says which targets it reads (`needs_neighbor_targets`, `needs_teacher_targets`); the trainer asks
    each source it holds for those of every micro-batch and passes them to `LightClipForPreTraining.forward` under
    the source's `target_key`.
    """

    target_key: ClassVar[str]  # "neighbor_targets" or "teacher_targets": the forward argument it fills

    def batch_targets(self, batch: Mapping[str, Any], settings: LightClipPretrainingConfig,
                      device: torch.device | str | None = None) -> dict[str, Tensor]:
        """The targets of one collated batch (its `index`, `pixel_values`, raw `images` / `texts`, as the source
        reads), with the options `settings` holds for it, on `device`."""


class Objective(nn.Module):
    """One training objective: its training-only parameters, its features step and its loss.

    A subclass declares what the rest of the package reads, as class attributes:

    - `name` (its key in `pretraining_config.objectives` and in `OBJECTIVE_CLASSES`), `loss_key` (its term in the
      output's `losses`), `weight_field` (the `pretraining_config` field weighting it; `None`: weight 1) and
      `logit_scale_init` (the field initialising its own `logit_scale` parameter, if it has one: of
      `pretraining_config`, or of the model config);
    - `replaces_contrastive`: it is the image-text contrastive term. Exactly one trains: `clip` unless another is
      chosen (`configuration_lightclip.CONTRASTIVE_OBJECTIVES`, which the inference config reads without importing
      training code, names the same ones);
    - `needs_logit_scale`: it reads the model's own logit scale (`shared["logit_scale"]`); with none that does, the
      scale is frozen, since DDP refuses a trainable parameter that gets no gradient;
    - the inputs it reads from `TowerOutputs`: per-token states (`needs_image_tokens`, `needs_text_tokens`,
      `needs_vision_stages`; when no objective reads them, each tower runs its pooled-only forward), a masked
      caption (`needs_masked_text`, drawn by its `sample_inputs`), the targets of a `TargetSource`
      (`needs_neighbor_targets`, `needs_teacher_targets`).

    Its hooks: `init_weights` (transformers builds models on the meta device, so every parameter it owns is
    initialised there), `sample_inputs`, `forward_features`, `forward`, `set_progress`, `log_values` and `card_row`.
    `self.config` is the whole `LightClipConfig`, since objectives size themselves on the towers; `self.settings` is
    its `pretraining_config`.
    """

    name: ClassVar[str]
    loss_key: ClassVar[str]
    weight_field: ClassVar[str | None] = None
    logit_scale_init: ClassVar[str | None] = None
    replaces_contrastive: ClassVar[bool] = False
    needs_logit_scale: ClassVar[bool] = False
    needs_image_tokens: ClassVar[bool] = False
    needs_text_tokens: ClassVar[bool] = False
    needs_vision_stages: ClassVar[bool] = False
    needs_masked_text: ClassVar[bool] = False
    needs_neighbor_targets: ClassVar[bool] = False
    needs_teacher_targets: ClassVar[bool] = False

    def __init__(self, config: LightClipConfig, model: LightClipModel | None = None):
        """`model` is read (never kept) by an objective that sizes itself on the towers' outputs."""
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

    def init_weights(self, module: nn.Module) -> None:
        """Initialise what this objective owns of `module`, after its generic initialisation; called by
        `LightClipForPreTraining._init_weights` for every module (itself included) outside the inference model."""
        if module is self and self.logit_scale_init is not None:
            init.constant_(self.logit_scale, self.logit_scale_init_value())

    def scale(self) -> Tensor:
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

    def sample_inputs(self, input_ids: Tensor, attention_mask: Tensor,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Inputs it draws for a batch, as keyword arguments of `LightClipForPreTraining.forward` (a masked caption);
        the trainer draws them with a seeded `generator`, so a resumed run draws what an uninterrupted one does."""
        return {}

    def forward_features(self, outputs: TowerOutputs) -> Features:
        """Per-sample features (rows) and scalars this objective's loss needs, beyond the shared embeddings."""
        return {}

    def forward(self, shared: Features, own: Features) -> dict[str, Tensor]:
        """`{loss_key: loss}` from the shared features (`image_embeds`, `text_embeds`, `logit_scale`) and its own."""
        raise NotImplementedError

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        """(what it is, its weight and settings) for the model card, from a `pretraining_config` dict."""
        raise NotImplementedError


def upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """float32 at least (bf16 / fp16 autocast would round soft targets, sums and iterations), float64 stays."""
    return tuple(t if t.dtype == torch.float64 else t.float() for t in tensors)


def symmetric_ce(logits_per_image: Tensor, logits_per_text: Tensor, labels: Tensor) -> Tensor:
    """The symmetric InfoNCE of CLIP on given logits: the mean of the image->text and text->image cross-entropies."""
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


__all__ = ["Features", "Objective", "TargetSource", "TowerOutputs", "symmetric_ce", "upcast"]
