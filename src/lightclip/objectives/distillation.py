"""Distillation from a frozen dual encoder (docs/distillation.md): affinity distillation (`kd`) and feature
distillation (`fd`).

The teacher (`lightclip.distillation.DistillationTeacher`, run online, or its precomputed `TeacherEmbeddingStore`) is
a `TargetSource` outside the trained model: the trainer asks it for each micro-batch's `teacher_targets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configuration_lightclip import LightClipConfig
from ..modeling_lightclip import LightClipModel
from .base import Features, Objective, TowerOutputs, upcast
from .contrastive import ClipLoss
from .distributed import gather_no_grad


def _soft_target_ce(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over rows of -sum_j softmax(teacher)_j log softmax(student)_j, in float32 at least."""
    student_logits, teacher_logits = upcast(student_logits, teacher_logits)
    return -(teacher_logits.softmax(dim=-1) * F.log_softmax(student_logits, dim=-1)).sum(dim=-1).mean()


class AffinityDistillationLoss(ClipLoss):
    """Affinity distillation (`kd`): the student's image->text and text->image distributions over the global batch
    are pulled to the teacher's (open_clip `DistillClipLoss`, TinyCLIP's affinity mimicking).

    loss = 1/2 (CE(softmax(T_i2t), S_i2t) + CE(softmax(T_t2i), S_t2i)), with S = s * img @ txt.T from the student's
    own scale s and T = t * timg @ ttxt.T from the teacher's scale t, or 1 / `temperature` when one is set. The
    cross-entropy, not the KL divergence, is returned (same gradient; it equals the teacher distribution's entropy,
    not 0, when the student matches the teacher). Teacher features are constants, gathered without autograd; the
    student's columns are gathered with gradients, so local rows against global columns average to the one-process
    loss under DDP, as `ClipLoss`.
    """

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be positive or None, got {temperature}")
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        teacher_image_features: Tensor,
        teacher_text_features: Tensor,
        teacher_logit_scale: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        """Student features (B_local, D_s) and teacher features (B_local, D_t), all L2-normalised; `logit_scale`
        and `teacher_logit_scale` exponentiated. `teacher_logit_scale` is ignored when a temperature is set."""
        if self.temperature is not None:
            teacher_logit_scale = 1.0 / self.temperature
        elif teacher_logit_scale is None:
            raise ValueError("AffinityDistillationLoss needs teacher_logit_scale when no temperature is set")
        student_per_image, student_per_text = self.logits(image_features, text_features, logit_scale)
        # the targets in float32 at least, autocast off: bf16 would round the teacher's distribution
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        teacher_image, teacher_text = (t.detach().to(dtype) for t in (teacher_image_features, teacher_text_features))
        teacher_logit_scale = torch.as_tensor(teacher_logit_scale).detach().to(teacher_image)
        with torch.autocast(teacher_image.device.type, enabled=False):
            teacher_per_image = teacher_logit_scale * teacher_image @ gather_no_grad(teacher_text).T
            teacher_per_text = teacher_logit_scale * teacher_text @ gather_no_grad(teacher_image).T
        loss = 0.5 * (
            _soft_target_ce(student_per_image, teacher_per_image) + _soft_target_ce(student_per_text, teacher_per_text)
        )
        return {"kd_loss": loss}


class FeatureDistillationLoss(nn.Module):
    """Feature distillation (`fd`, CLIP-KD's FD): each student embedding is pulled to its own sample's teacher
    embedding, image and text alike.

    Both sides are L2-normalised here. `loss="cosine"`: mean of 1 - cos; `loss="mse"`: `F.mse_loss`, the mean over
    rows and dimensions as CLIP-KD, which on unit vectors equals 2 (1 - cos) / D (the same pull, D / 2 times
    weaker). When the widths differ, the caller maps the student embeddings into the teacher's width first (a
    training-only projection it owns). Per-sample, so it needs no gather: the mean of the local means is the
    global mean under DDP.
    """

    def __init__(self, loss: str = "cosine") -> None:
        super().__init__()
        if loss not in ("cosine", "mse"):
            raise ValueError(f"loss must be 'cosine' or 'mse', got {loss!r}")
        self.loss = loss

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}"

    def distance(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Mean distance of the (projected) student rows to the teacher rows, (B, D_t) each."""
        (student,) = upcast(student)
        student = F.normalize(student, dim=-1)
        teacher = F.normalize(teacher.detach().to(student.dtype), dim=-1)
        if self.loss == "mse":
            return F.mse_loss(student, teacher)
        return (1.0 - (student * teacher).sum(dim=-1)).mean()

    def forward(
        self, image_features: Tensor, text_features: Tensor, teacher_image_features: Tensor,
        teacher_text_features: Tensor,
    ) -> dict[str, Tensor]:
        """Student features (B_local, D_t), already projected to the teacher's width; teacher features
        (B_local, D_t). Returns `{"fd_loss": 1/2 (d(image) + d(text))}`."""
        loss = 0.5 * (
            self.distance(image_features, teacher_image_features) + self.distance(text_features, teacher_text_features)
        )
        return {"fd_loss": loss}


class DistillationObjective(Objective):
    """Base of the objectives that distil a frozen dual encoder (docs/distillation.md): they read the teacher's
    per-sample embeddings of the batch, `teacher_targets`, which the trainer computes online or looks up."""

    needs_teacher_targets = True
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
    needs_logit_scale = True  # the student's distributions are scaled as its own CLIP logits
    summary = "affinity distillation"

    def __init__(self, config: LightClipConfig, model: LightClipModel | None = None):
        super().__init__(config)
        self.loss = AffinityDistillationLoss(self.settings.kd_temperature)

    def forward_features(self, outputs: TowerOutputs) -> Features:
        return self.teacher_features(outputs)

    def forward(self, shared: Features, own: Features) -> dict[str, Tensor]:
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

    def __init__(self, config: LightClipConfig, model: LightClipModel | None = None):
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

    def forward(self, shared: Features, own: Features) -> dict[str, Tensor]:
        return self.loss(own["image"], own["text"], own["teacher_image"], own["teacher_text"])

    @classmethod
    def card_setting(cls, config: Mapping[str, Any]) -> str:
        return f"{config.get('fd_loss')}, teacher width {config.get('distill_teacher_dim')}"


__all__ = ["AffinityDistillationLoss", "AffinityDistillationObjective", "DistillationObjective",
           "FeatureDistillationLoss", "FeatureDistillationObjective"]
