"""The softmax image-text contrastive terms: CLIP's symmetric InfoNCE (`clip`) and LightCLIP's progressively softened
negatives (`soft`), over the global batch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..configuration_lightclip import LightClipConfig
from ..modeling_lightclip import LightClipModel
from .base import Features, Objective, symmetric_ce, upcast
from .distributed import gather_with_grad, global_labels


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP over the global batch (open_clip `local_loss=True, gather_with_grad=True`).

    Example:

    ```python
    >>> import torch, torch.nn.functional as F
    >>> from lightclip.objectives.contrastive import ClipLoss
    >>> img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    >>> sorted(ClipLoss()(img, txt, torch.tensor(14.3)))
    ['contrastive_loss']
    ```
    """

    def logits(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
        """Local image rows against all texts, and local text rows against all images: (B_local, B_global) each."""
        all_image = gather_with_grad(image_features)
        all_text = gather_with_grad(text_features)
        return logit_scale * image_features @ all_text.T, logit_scale * text_features @ all_image.T

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> dict[str, Tensor]:
        """`image_features`, `text_features`: L2-normalised (B_local, D); `logit_scale`: the exponentiated scale."""
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        labels = global_labels(image_features.shape[0], image_features.device)
        return {"contrastive_loss": symmetric_ce(logits_per_image, logits_per_text, labels)}


def soft_negative_weights(logits: Tensor, labels: Tensor, mode: str = "similarity", temperature: float = 1.0
                          ) -> Tensor:
    """r of `SoftClipLoss`: each row's weights over its negatives (0 at the positive `labels`), summing to 1."""
    positive = F.one_hot(labels, logits.shape[-1]).bool()
    if mode == "uniform":
        return (~positive).to(logits.dtype) / (logits.shape[-1] - 1)
    return (logits.detach() / temperature).masked_fill(positive, float("-inf")).softmax(dim=-1)


def _soft_ce(logits: Tensor, labels: Tensor, alpha: float, mode: str, temperature: float) -> Tensor:
    """Cross-entropy against q = (1 - alpha) onehot + alpha r, r spread over the negatives of each row, in float32
    at least (bf16 logits would round the soft targets and the sum)."""
    (logits,) = upcast(logits)
    log_probs = F.log_softmax(logits, dim=-1)
    positive = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    target = (1.0 - alpha) * positive + alpha * soft_negative_weights(logits, labels, mode, temperature)
    return -(target * log_probs).sum(dim=-1).mean()


class SoftClipLoss(ClipLoss):
    """CLIP loss with progressively softened negative labels (LightCLIP, instance level; docs/method.md).

    Image-text pairs are not strictly one-to-one, so part of each target row moves from the positive to the
    negatives: q_i = (1 - alpha) onehot(i) + alpha r_i. `mode="similarity"` (our reading of the paper) weights the
    negatives by the model's own detached similarities, r_ij = softmax_{j != i}(sg(s_ij) / temperature);
    `mode="uniform"` spreads alpha evenly, r_ij = 1 / (B_global - 1). alpha rises from 0 to `alpha_max` with training
    progress, because early similarities are noise; at alpha = 0 the loss equals `ClipLoss` exactly.
    """

    def __init__(
        self,
        mode: str = "similarity",
        alpha_max: float = 0.2,
        schedule: str = "linear",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in ("similarity", "uniform"):
            raise ValueError(f"mode must be 'similarity' or 'uniform', got {mode!r}")
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.mode = mode
        self.alpha_max = alpha_max
        self.schedule = schedule
        self.temperature = temperature
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        """Training progress `step / total_steps`, set by the trainer every step; clamped to [0, 1]."""
        self.progress = min(max(float(progress), 0.0), 1.0)

    @property
    def alpha(self) -> float:
        """Current softening: 0 at the start, `alpha_max` at the end, monotone in between."""
        p = self.progress
        ramp = p if self.schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * p))
        return self.alpha_max * ramp

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, alpha_max={self.alpha_max}, schedule={self.schedule!r}, alpha={self.alpha:.4f}"

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> dict[str, Tensor]:
        alpha = self.alpha
        if alpha == 0.0:
            return super().forward(image_features, text_features, logit_scale)
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        labels = global_labels(image_features.shape[0], image_features.device)
        loss = 0.5 * (
            _soft_ce(logits_per_image, labels, alpha, self.mode, self.temperature)
            + _soft_ce(logits_per_text, labels, alpha, self.mode, self.temperature)
        )
        return {"contrastive_loss": loss}


class ClipObjective(Objective):
    """Symmetric image-text InfoNCE over the global batch (CLIP), on the model's own logit scale."""

    name, loss_key = "clip", "contrastive_loss"
    replaces_contrastive = needs_logit_scale = True

    def __init__(self, config: LightClipConfig, model: LightClipModel | None = None):
        super().__init__(config)
        self.loss = ClipLoss()

    def forward(self, shared: Features, own: Features) -> dict[str, Tensor]:
        return self.loss(shared["image_embeds"], shared["text_embeds"], shared["logit_scale"])

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        return "clip: symmetric image-text InfoNCE", "1.0"


class SoftClipObjective(ClipObjective):
    """LightCLIP's InfoNCE with progressively softened negative labels; replaces `clip` (equal at alpha = 0)."""

    name = "soft"

    def __init__(self, config: LightClipConfig, model: LightClipModel | None = None):
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


__all__ = ["ClipLoss", "ClipObjective", "SoftClipLoss", "SoftClipObjective", "soft_negative_weights"]
