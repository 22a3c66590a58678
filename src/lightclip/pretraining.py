"""LightClipForPreTraining: `LightClipModel` plus the training-only objectives selected by the config.

Each objective in `config.pretraining_config.objectives` is one `Objective` of the registry
`lightclip.objectives.OBJECTIVE_CLASSES`, held in `self.objectives` (an `nn.ModuleDict` keyed by name) with its own
parameters, initialisation, drawn inputs, features step and loss; an objective that is off builds and runs nothing.
This module reads only what `Objective` declares, never an objective by name. `save_pretrained` writes only the inner
`LightClipModel`, so inference costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_lightclip import LightClipConfig
from .modeling_lightclip import LightClipModel, LightClipPreTrainedModel
from .objectives import TowerOutputs, build_objective


@dataclass
class LightClipForPreTrainingOutput(ModelOutput):
    """Output of [`LightClipForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): weighted sum of the active objectives.
        losses (`dict[str, torch.FloatTensor]`): each active term, unweighted, under its objective's `loss_key`.
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
    r"""`LightClipModel` with the training objectives selected by `config.pretraining_config.objectives`.

    The trainer calls `set_progress(step / total_steps)` every step (schedules read it), `sample_inputs` for every
    batch (the inputs objectives draw, such as a masked caption) and `clamp_logit_scales_()` after every optimiser
    step. An objective that `needs_neighbor_targets` or `needs_teacher_targets` reads `neighbor_targets` /
    `teacher_targets`, from the `TargetSource` of that `target_key` (a feature bank, a distillation teacher):
    `source.batch_targets(batch, config.pretraining_config)`.

    Example:

    ```python
    >>> import torch
    >>> from lightclip import LightClipConfig, LightClipForPreTraining
    >>> model = LightClipForPreTraining(LightClipConfig.from_preset("lightclip-xxs", objectives="lightclip"))
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
        contrastive = [name for name, objective in self.objectives.items() if objective.replaces_contrastive]
        if len(contrastive) != 1:
            raise ValueError(f"objectives {list(self.objectives)} hold {len(contrastive)} image-text contrastive terms "
                             f"{contrastive}; exactly one trains (configuration_lightclip.CONTRASTIVE_OBJECTIVES must "
                             "name every objective that declares replaces_contrastive)")
        # DDP refuses a trainable parameter that gets no gradient: the model's scale trains only if an objective
        # reads it
        self.lightclip.logit_scale.requires_grad_(self.needs("needs_logit_scale"))
        self.post_init()

    def needs(self, need: str) -> bool:
        """Whether an active objective declares `need` (an `Objective.needs_*` attribute)."""
        return any(getattr(objective, need) for objective in self.objectives.values())

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        for objective in self.objectives.values():  # each initialises what it owns of the module
            objective.init_weights(module)

    def sample_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The inputs the active objectives draw for a batch (a masked caption), as keyword arguments of `forward`;
        an objective that needs them and is not given them draws its own, unseeded."""
        return {key: value for objective in self.objectives.values()
                for key, value in objective.sample_inputs(input_ids, attention_mask, generator).items()}

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (step / total steps); drives the objectives' schedules."""
        for objective in self.objectives.values():
            objective.set_progress(progress)

    @torch.no_grad()
    def clamp_logit_scales_(self) -> None:
        """Clamp every stored logit scale (the model's and each objective's) to [0, logit_scale_max]."""
        self.lightclip.clamp_logit_scale_()
        for objective in self.objectives.values():
            objective.clamp_logit_scale_()

    def log_values(self) -> dict[str, float]:
        """The objectives' scalars worth logging besides their losses (e.g. a schedule's current value)."""
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
            mlm_input_ids, mlm_labels: a masked copy of `input_ids` and its labels (-100 = not masked), as
                `sample_inputs` draws them, for an objective that `needs_masked_text`; drawn here when absent.
            neighbor_targets: for an objective that `needs_neighbor_targets`, the teacher-space targets `(batch, dim)`
                of a feature bank's `batch_targets` (`image_nn`, `text_nn`, `image_xnn`, `text_xnn`).
            teacher_targets: for an objective that `needs_teacher_targets`, the frozen teacher's `image_embeds` and
                `text_embeds` of the batch `(batch, teacher_dim)` and its exponentiated `logit_scale` `()`, as
                `DistillationTeacher.batch_targets` or `TeacherEmbeddingStore.batch_targets` return them.
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
