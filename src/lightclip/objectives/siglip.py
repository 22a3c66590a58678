"""SigLIP (Zhai et al., ICCV 2023): the pairwise sigmoid image-text loss, replacing the softmax contrastive term."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from ..configuration_lightclip import LightClipConfig
from ..modeling_lightclip import LightClipModel
from .base import Features, Objective, TowerOutputs, upcast
from .distributed import gather_with_grad, global_labels


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss: every image-text pair of the global batch is its own binary classification.

    L = -(1/N) sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)), z = +1 for a pair and -1 otherwise, N the global
    batch: no normalisation over a row or column, so no softmax couples the batch. Each process scores its local
    images against the gathered texts and divides by its local batch, as open_clip's `SigLipLoss` divides each image's
    sum by the batch; averaged over processes (as DDP averages gradients) that is L. open_clip passes the texts
    around a ring instead of gathering them; gathering needs one (B_global, D) copy and is exact all the same.

    Example:

    ```python
    >>> import torch, torch.nn.functional as F
    >>> from lightclip.objectives.siglip import SigLipLoss
    >>> img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    >>> sorted(SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0)))
    ['siglip_loss']
    ```
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
                ) -> dict[str, Tensor]:
        """`image_features`, `text_features`: L2-normalised (B_local, D); `logit_scale` exponentiated, `logit_bias`
        as it is. The logits and their sum are computed in float32 at least."""
        image_features, all_text = upcast(image_features, gather_with_grad(text_features))
        logits = logit_scale * image_features @ all_text.T + logit_bias  # (B_local, B_global)
        positive = F.one_hot(global_labels(len(image_features), logits.device), logits.shape[1]).bool()
        signs = torch.where(positive, 1.0, -1.0).to(logits.dtype)
        return {"siglip_loss": -F.logsigmoid(signs * logits).sum() / len(image_features)}


class SigLipObjective(Objective):
    """SigLIP's sigmoid loss with its own learnable logit scale and bias (initialised at 10 and -10, Zhai et al.):
    replaces the softmax contrastive term and composes with every other objective.

    The bias is training-only: the saved model's `logits_per_image` stay its own scaled cosine similarities, and
    x . y ranks pairs as sigmoid(t x . y + b) does (docs/method.md).
    """

    name, loss_key, logit_scale_init = "siglip", "siglip_loss", "siglip_logit_scale_init_value"
    replaces_contrastive = True

    def __init__(self, config: LightClipConfig, model: LightClipModel | None = None):
        super().__init__(config)
        settings = self.settings
        self.logit_scale = nn.Parameter(torch.tensor(float(settings.siglip_logit_scale_init_value)))
        self.logit_bias = nn.Parameter(torch.tensor(float(settings.siglip_logit_bias_init_value)))
        self.loss = SigLipLoss()

    def init_weights(self, module: nn.Module) -> None:
        super().init_weights(module)
        if module is self:
            init.constant_(self.logit_bias, self.settings.siglip_logit_bias_init_value)

    def forward_features(self, outputs: TowerOutputs) -> Features:
        return {"logit_scale": self.scale(), "logit_bias": self.logit_bias}

    def forward(self, shared: Features, own: Features) -> dict[str, Tensor]:
        return self.loss(shared["image_embeds"], shared["text_embeds"], own["logit_scale"], own["logit_bias"])

    def log_values(self) -> dict[str, float]:
        return {"siglip_logit_scale": self.scale().item(), "siglip_logit_bias": self.logit_bias.item()}

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        return ("siglip: pairwise sigmoid image-text loss (replaces clip)",
                f"1.0; own logit scale and bias, from exp({config.get('siglip_logit_scale_init_value'):.4g}) and "
                f"{config.get('siglip_logit_bias_init_value')}")


__all__ = ["SigLipLoss", "SigLipObjective"]
