"""LightClipForPreTraining: `LightClipModel` plus the training-only objectives selected by the config.

Each objective in `config.pretraining_config.objectives` is one module of `lightclip.objectives`, held in
`self.objectives` (an `nn.ModuleDict` keyed by name) with its own parameters, features step and loss; an objective
that is off builds and runs nothing. `save_pretrained` writes only the inner `LightClipModel`, so inference costs
nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_lightclip import LightClipConfig
from .fusion import LightClipFusion
from .modeling_lightclip import LightClipModel, LightClipPreTrainedModel
from .objectives import Objective, TowerOutputs, build_objective, mask_text


@dataclass
class LightClipForPreTrainingOutput(ModelOutput):
    """Output of [`LightClipForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): weighted sum of the active objectives.
        losses (`dict[str, torch.FloatTensor]`): each active term, unweighted: `contrastive_loss`, `token_loss`,
            `mlm_loss`, `nn_loss`, `xnn_loss`, `kd_loss`, `fd_loss`.
        logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`): local image-text logits.
        logits_per_text (`torch.FloatTensor` of shape `(batch_size, batch_size)`): their transpose.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): normalised image embeddings.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): normalised text embeddings.
    """

    loss: torch.FloatTensor | None = None
    losses: dict[str, torch.FloatTensor] | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


class LightClipForPreTraining(LightClipPreTrainedModel):
    r"""`LightClipModel` with the LightCLIP and CLIP-PING training objectives selected by
    `config.pretraining_config.objectives`.

    The trainer calls `set_progress(step / total_steps)` every step (the softened-label schedule reads it) and
    `clamp_logit_scales_()` after every optimiser step. For the CLIP-PING terms, pass `neighbor_targets`: the frozen
    teacher features of each sample's neighbours, as returned by `lightclip.neighbors.FeatureBank.lookup(batch["index"])`.
    For the distillation terms (`kd`, `fd`), pass `teacher_targets`: the frozen teacher's embeddings of the batch.

    Example:

    ```python
    >>> import torch
    >>> from lightclip import LightClipConfig, LightClipForPreTraining
    >>> model = LightClipForPreTraining(LightClipConfig.from_preset("lightclip-xxs", objectives="lightclip"))
    >>> list(model.objectives)
    ['soft', 'token', 'mlm']
    >>> ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]])
    >>> out = model(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=torch.randn(2, 3, 32, 32))
    >>> sorted(out.losses)
    ['contrastive_loss', 'mlm_loss', 'token_loss']
    ```"""

    # training-only modules are absent from saved checkpoints by design and start fresh
    _keys_to_ignore_on_load_missing = [r"^(?!lightclip\.)"]

    def __init__(self, config: LightClipConfig):
        super().__init__(config)
        self.lightclip = LightClipModel(config)
        self.objectives = nn.ModuleDict(
            {name: build_objective(name, config, self.lightclip) for name in config.pretraining_config.objectives}
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Objective) and module.logit_scale_init is not None:
            init.constant_(module.logit_scale, module.logit_scale_init_value())
        elif isinstance(module, LightClipFusion):
            init.zeros_(module.head_bias)

    def mask_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking of the text for the MLM objective: (masked ids, labels with -100 where not masked)."""
        return mask_text(self.config, input_ids, attention_mask, generator)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (step / total steps); drives the softened-label schedule."""
        for objective in self.objectives.values():
            objective.set_progress(progress)

    @torch.no_grad()
    def clamp_logit_scales_(self) -> None:
        """Clamp every stored logit scale (the model's and each objective's) to [0, logit_scale_max]."""
        self.lightclip.clamp_logit_scale_()
        for objective in self.objectives.values():
            objective.clamp_logit_scale_()

    def log_values(self) -> dict[str, float]:
        """The objectives' scalars worth logging besides their losses (e.g. the soft-label alpha)."""
        return {k: v for objective in self.objectives.values() for k, v in objective.log_values().items()}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save only the inference `LightClipModel` (training-only modules are dropped)."""
        return self.lightclip.save_pretrained(save_directory, *args, **kwargs)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mlm_input_ids: torch.Tensor | None = None,
                mlm_labels: torch.Tensor | None = None, neighbor_targets: dict[str, torch.Tensor] | None = None,
                teacher_targets: dict[str, torch.Tensor] | None = None, return_features: bool = False,
                **kwargs) -> LightClipForPreTrainingOutput | dict:
        r"""Compute every active objective on one (local) batch.

        Args:
            mlm_input_ids, mlm_labels: a pre-masked copy of `input_ids` and its labels (-100 = not masked). When
                absent and `mlm` is on, BERT masking is applied here.
            neighbor_targets: `image_nn`, `text_nn`, `image_xnn`, `text_xnn` teacher-space targets `(batch, dim)`.
            teacher_targets: for `kd` / `fd`, the frozen teacher's `image_embeds` and `text_embeds` of the batch
                `(batch, teacher_dim)` and its exponentiated `logit_scale` `()` (`DistillationTeacher.embed` or
                `TeacherEmbeddingStore.lookup` with its `logit_scale`).
            return_features: return the per-sample features dict of `forward_features` instead of the losses;
                gradient accumulation caches these and calls `compute_losses` on the merged set.
        """
        features = self.forward_features(input_ids, pixel_values, attention_mask, mlm_input_ids, mlm_labels,
                                         neighbor_targets, teacher_targets)
        return features if return_features else self.compute_losses(features)

    def forward_features(self, input_ids, pixel_values, attention_mask=None, mlm_input_ids=None, mlm_labels=None,
                         neighbor_targets=None, teacher_targets=None) -> dict:
        """Everything the losses need, per sample (rows), plus scalars: the shared `image_embeds`, `text_embeds`
        and `logit_scale`, and one dict per objective under its name.

        Keeping every trainable map here means a loss over features merged from several micro-batches sends each
        micro-batch's gradient through its own rows only (see `merge_features`).
        """
        model = self.lightclip
        text_tower = model.text_model
        if input_ids is None or pixel_values is None:
            raise ValueError("LightClipForPreTraining needs input_ids and pixel_values")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = text_tower.truncate(input_ids, attention_mask)
        objectives = self.objectives.values()
        stages = any(objective.needs_vision_stages for objective in objectives)
        vision_out = text_out = None
        if stages or any(objective.needs_image_tokens for objective in objectives):
            vision_out = model.vision_model(pixel_values, stages)
            image_pooled = vision_out.pooler_output
        else:
            image_pooled = model.vision_model.forward_pooled(pixel_values)
        if any(objective.needs_text_tokens for objective in objectives):
            text_out = text_tower(input_ids, attention_mask)
            text_pooled = text_out.pooler_output
        else:
            text_pooled = text_tower.forward_pooled(input_ids, attention_mask)
        features = {
            "image_embeds": F.normalize(model.visual_projection(image_pooled), dim=-1),
            "text_embeds": F.normalize(model.text_projection(text_pooled), dim=-1),
            "logit_scale": model.logit_scale_exp(),
        }
        outputs = TowerOutputs(
            model=model, input_ids=input_ids, attention_mask=attention_mask, vision=vision_out, text=text_out,
            image_embeds=features["image_embeds"], text_embeds=features["text_embeds"], mlm_input_ids=mlm_input_ids,
            mlm_labels=mlm_labels, neighbor_targets=neighbor_targets, teacher_targets=teacher_targets,
        )
        for name, objective in self.objectives.items():
            own = objective.forward_features(outputs)
            if own:
                features[name] = own
        return features

    def compute_losses(self, features: dict) -> LightClipForPreTrainingOutput:
        """The weighted objectives on (possibly merged) features."""
        shared = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
        losses, loss = {}, 0.0
        for name, objective in self.objectives.items():
            term = objective(shared, features.get(name, {}))
            losses.update(term)
            loss = loss + objective.weight * term[objective.loss_key]
        image_embeds, text_embeds = shared["image_embeds"], shared["text_embeds"]
        logits_per_text = shared["logit_scale"] * text_embeds @ image_embeds.t()
        return LightClipForPreTrainingOutput(
            loss=loss, losses=losses, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
            image_embeds=image_embeds, text_embeds=text_embeds,
        )


def merge_features(chunks: list[dict], live: int) -> dict:
    """Concatenate the features of several micro-batches, for a loss that sees all their negatives.

    `chunks[live]` carries gradients, the others are cached (no grad). Rows are concatenated (per-word features
    padded to the longest caption); scalars come from the live chunk, their gradient divided by the number of chunks,
    so that summing the backward of every chunk's merged loss gives exactly the full-batch gradient (open_clip's
    accumulation, made exact for the logit scales and the per-micro-batch MLM loss); a constant scalar (a frozen
    teacher's logit scale) comes out unchanged. Nested dicts (one per objective) merge the same way.
    """
    count = len(chunks)
    merged = {}
    for key, value in chunks[live].items():
        if isinstance(value, dict):
            merged[key] = merge_features([c[key] for c in chunks], live)
        elif value.dim() == 0:
            merged[key] = value.detach() + (value - value.detach()) / count
        else:
            parts = [c[key] for c in chunks]
            length = max(p.shape[1] for p in parts) if value.dim() >= 2 else None
            if length is not None and any(p.shape[1] != length for p in parts):
                parts = [F.pad(p, (0, 0) * (p.dim() - 2) + (0, length - p.shape[1])) for p in parts]
            merged[key] = torch.cat(parts)
    return merged


__all__ = ["LightClipForPreTraining", "LightClipForPreTrainingOutput", "merge_features"]
