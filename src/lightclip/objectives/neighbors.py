"""CLIP-PING's nearest-neighbour guidance (`nn`, same modality; `xnn`, cross modality): the student embeddings,
mapped by training-only heads, are contrasted with frozen teacher features of each sample's neighbours.

The targets come from a feature bank (`lightclip.neighbors.FeatureBank`, or `ActiveTeacherNeighbors` for the teachers
run online), a `TargetSource` the trainer asks for each micro-batch's `neighbor_targets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configuration_lightclip import LightClipConfig, LightClipPretrainingConfig
from ..modeling_lightclip import LightClipModel
from .base import Features, Objective, TowerOutputs
from .distributed import gather_no_grad, gather_with_grad, global_labels


class NeighborContrastiveLoss(nn.Module):
    """In-batch InfoNCE of mapped student embeddings against frozen neighbour targets (CLIP-PING NN / XNN; see
    docs/method.md).

    NCE(a, b) is one-directional: rows are the local queries, columns the gathered targets of the global batch, the
    label is the query's own target. Targets are constants (feature banks or frozen teachers): they are detached and
    gathered without autograd. With `detach_targets=False` (teacher features projected into the student space by a
    trainable head) they keep their gradient and are gathered with it. One instance per term; `name` sets the output
    key (`"nn"` -> `"nn_loss"`).
    """

    def __init__(self, name: str = "nn", detach_targets: bool = True) -> None:
        super().__init__()
        self.name = name
        self.detach_targets = detach_targets

    def extra_repr(self) -> str:
        return f"name={self.name!r}, detach_targets={self.detach_targets}"

    def nce(self, queries: Tensor, targets: Tensor, logit_scale: Tensor) -> Tensor:
        """One-directional InfoNCE of local query rows against the global batch of targets."""
        targets = targets.to(queries.dtype)
        all_targets = gather_no_grad(targets.detach()) if self.detach_targets else gather_with_grad(targets)
        logits = logit_scale * queries @ all_targets.T
        return F.cross_entropy(logits, global_labels(queries.shape[0], queries.device))

    def forward(
        self,
        image_queries: Tensor,
        text_queries: Tensor,
        image_targets: Tensor,
        text_targets: Tensor,
        logit_scale: Tensor,
    ) -> dict[str, Tensor]:
        """Queries (B_local, D_t) L2-normalised, already mapped by the caller's heads; targets (B_local, D_t)
        L2-normalised. Returns `{f"{name}_loss": 0.5 * (NCE(image) + NCE(text))}`."""
        loss = 0.5 * (
            self.nce(image_queries, image_targets, logit_scale) + self.nce(text_queries, text_targets, logit_scale)
        )
        return {f"{self.name}_loss": loss}


def _neighbor_head(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))
    return nn.Linear(d_in, d_out)


class NeighborObjective(Objective):
    """CLIP-PING's guidance from the same modality's nearest neighbours in the teachers' feature banks (NN)."""

    name, loss_key, weight_field = "nn", "nn_loss", "nn_weight"
    logit_scale_init = "neighbor_logit_scale_init_value"
    needs_neighbor_targets = True
    summary = "nearest-neighbour guidance, same modality (CLIP-PING)"

    def __init__(self, config: LightClipConfig, model: LightClipModel | None = None):
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
                "FeatureBank.batch_targets(batch, config.pretraining_config) (see docs/neighbors.md)"
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

    def forward(self, shared: Features, own: Features) -> dict[str, Tensor]:
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


__all__ = ["CrossNeighborObjective", "NeighborContrastiveLoss", "NeighborObjective"]
