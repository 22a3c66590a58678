"""LightClipForPreTraining: `LightClipModel` plus every training-only module, composed from the config.

Each objective in `config.objectives` builds its own modules and runs its own forward; an objective that is off
builds and runs nothing. `save_pretrained` writes only the inner `LightClipModel`, so inference costs nothing extra.
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
from .losses import (
    ClipLoss,
    MaskedLanguageModelingLoss,
    NeighborContrastiveLoss,
    SoftClipLoss,
    TokenMatchingLoss,
    mask_tokens,
)
from .modeling_lightclip import LightClipModel, LightClipPreTrainedModel


@dataclass
class LightClipForPreTrainingOutput(ModelOutput):
    """Output of [`LightClipForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): weighted sum of the active objectives.
        losses (`dict[str, torch.FloatTensor]`): each active term, unweighted: `contrastive_loss`, `token_loss`,
            `mlm_loss`, `nn_loss`, `xnn_loss`.
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


def _neighbor_head(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))
    return nn.Linear(d_in, d_out)


class LightClipForPreTraining(LightClipPreTrainedModel):
    r"""`LightClipModel` with the LightCLIP and CLIP-PING training objectives selected by `config.objectives`.

    The trainer calls `set_progress(step / total_steps)` every step (the softened-label schedule reads it). For the
    CLIP-PING terms, pass `neighbor_targets`: the frozen teacher features of each sample's neighbours, as returned by
    `lightclip.neighbors.FeatureBank.lookup(batch["index"])`.

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
        terms = set(config.objectives)
        text_width = config.text_config.hidden_size
        vision_width = config.vision_config.hidden_size
        if "soft" in terms:
            self.contrastive = SoftClipLoss(
                mode=config.soft_mode, alpha_max=config.soft_alpha_max, schedule=config.soft_schedule,
                temperature=config.soft_temperature,
            )
        else:
            self.contrastive = ClipLoss()
        if "token" in terms:
            self.image_token_proj = nn.Linear(vision_width, config.token_dim)
            self.text_token_proj = nn.Linear(text_width, config.token_dim)
            self.token_logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
            self.token_loss = TokenMatchingLoss(
                method=config.token_matching, epsilon=config.sinkhorn_epsilon, iterations=config.sinkhorn_iterations,
                capacity=config.hungarian_capacity, num_negatives=config.hungarian_num_negatives,
                chunk_size=config.token_chunk_size, unroll=config.sinkhorn_unroll,
            )
        if "mlm" in terms:
            if config.text_config.mask_token_id is None:
                raise ValueError("the mlm objective needs text_config.mask_token_id (a tokenizer with a mask token)")
            self.fusion = LightClipFusion(config, self._image_source_widths())
            self.mlm_loss = MaskedLanguageModelingLoss()
        for name in [n for n in ("nn", "xnn") if n in terms]:
            if config.teacher_image_dim is None or config.teacher_text_dim is None:
                raise ValueError(
                    f"the {name} objective needs config.teacher_image_dim and config.teacher_text_dim: the widths of "
                    "the feature bank's teachers (FeatureBank.image_dim / .text_dim)"
                )
            # NN heads map into the own modality's teacher space; XNN heads into the other one (docs/method.md)
            image_dim = config.teacher_image_dim if name == "nn" else config.teacher_text_dim
            text_dim = config.teacher_text_dim if name == "nn" else config.teacher_image_dim
            if config.neighbor_direction == "student_to_teacher":
                heads = (_neighbor_head(config.neighbor_head, config.projection_dim, image_dim),
                         _neighbor_head(config.neighbor_head, config.projection_dim, text_dim))
            else:
                heads = (_neighbor_head(config.neighbor_head, image_dim, config.projection_dim),
                         _neighbor_head(config.neighbor_head, text_dim, config.projection_dim))
            setattr(self, f"{name}_image_head", heads[0])
            setattr(self, f"{name}_text_head", heads[1])
            setattr(self, f"{name}_logit_scale",
                    nn.Parameter(torch.tensor(config.neighbor_logit_scale_init_value)))
            # teacher -> student: the targets come out of trainable heads and must keep their gradient
            setattr(self, f"{name}_loss", NeighborContrastiveLoss(
                name, detach_targets=config.neighbor_direction == "student_to_teacher"))
        self.post_init()

    def _image_source_widths(self) -> list[int]:
        if self.config.fusion_image_source == "last":
            return [self.config.vision_config.hidden_size]
        return self._vision_stage_widths()

    def _vision_stage_indices(self, num_states: int) -> list[int]:
        """Evenly spaced image-tower stages, one per fusion stage, the last stage included."""
        stages = len(self.config.resolved_fusion_layers())
        return [max(1, round((num_states - 1) * (k + 1) / stages)) for k in range(stages)]

    def _vision_stage_widths(self) -> list[int]:
        vision = self.config.vision_config
        if vision.backbone == "vit":
            return [vision.hidden_size] * len(self.config.resolved_fusion_layers())
        tower = self.lightclip.vision_model
        device = next(tower.parameters()).device
        was_training = tower.training
        with torch.no_grad():
            tower.eval()
            size = vision.image_size
            states = tower(torch.zeros(1, vision.num_channels, size, size, device=device), True).hidden_states
            tower.train(was_training)
        return [states[i].shape[-1] for i in self._vision_stage_indices(len(states))]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            for name in ("token", "nn", "xnn"):
                if hasattr(self, f"{name}_logit_scale"):
                    value = self.config.logit_scale_init_value if name == "token" else \
                        self.config.neighbor_logit_scale_init_value
                    init.constant_(getattr(self, f"{name}_logit_scale"), value)
        elif isinstance(module, LightClipFusion):
            init.zeros_(module.head_bias)

    def mask_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking of the text for the MLM objective: (masked ids, labels with -100 where not masked)."""
        text_cfg = self.config.text_config
        return mask_tokens(input_ids, attention_mask, mask_token_id=text_cfg.mask_token_id,
                           vocab_size=text_cfg.vocab_size, special_token_ids=text_cfg.special_token_ids,
                           probability=self.config.mlm_probability, generator=generator)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (step / total steps); drives the softened-label schedule."""
        if isinstance(self.contrastive, SoftClipLoss):
            self.contrastive.set_progress(progress)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save only the inference `LightClipModel` (training-only modules are dropped)."""
        return self.lightclip.save_pretrained(save_directory, *args, **kwargs)

    def _scale(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_logit_scale").clamp(max=self.config.logit_scale_max).exp()

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mlm_input_ids: torch.Tensor | None = None,
                mlm_labels: torch.Tensor | None = None, neighbor_targets: dict[str, torch.Tensor] | None = None,
                return_features: bool = False, **kwargs) -> LightClipForPreTrainingOutput | dict[str, torch.Tensor]:
        r"""Compute every active objective on one (local) batch.

        Args:
            mlm_input_ids, mlm_labels: a pre-masked copy of `input_ids` and its labels (-100 = not masked). When
                absent and `mlm` is on, BERT masking is applied here.
            neighbor_targets: `image_nn`, `text_nn`, `image_xnn`, `text_xnn` teacher-space targets `(batch, dim)`.
            return_features: return the per-sample features dict of `forward_features` instead of the losses;
                gradient accumulation caches these and calls `compute_losses` on the merged set.
        """
        features = self.forward_features(input_ids, pixel_values, attention_mask, mlm_input_ids, mlm_labels,
                                         neighbor_targets)
        return features if return_features else self.compute_losses(features)

    def forward_features(self, input_ids, pixel_values, attention_mask=None, mlm_input_ids=None, mlm_labels=None,
                         neighbor_targets=None) -> dict[str, torch.Tensor]:
        """Everything the losses need, per sample (rows), plus scalars (logit scales, the per-sample MLM loss).

        Keeping every trainable map here means a loss over features merged from several micro-batches sends each
        micro-batch's gradient through its own rows only (see `merge_features`).
        """
        config = self.config
        terms = config.objectives
        model = self.lightclip
        text_tower = model.text_model
        if input_ids is None or pixel_values is None:
            raise ValueError("LightClipForPreTraining needs input_ids and pixel_values")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = text_tower.truncate(input_ids, attention_mask)
        multiscale = "mlm" in terms and config.fusion_image_source == "multiscale"
        vision_out = model.vision_model(pixel_values, multiscale)
        text_out = text_tower(input_ids, attention_mask)
        features = {
            "image_embeds": F.normalize(model.visual_projection(vision_out.pooler_output), dim=-1),
            "text_embeds": F.normalize(model.text_projection(text_out.pooler_output), dim=-1),
            "logit_scale": model.logit_scale_exp(),
        }
        if "token" in terms:
            specials = torch.tensor(config.text_config.special_token_ids, device=input_ids.device)
            features["word_mask"] = attention_mask.bool() & ~torch.isin(input_ids, specials)
            features["patch_tokens"] = F.normalize(self.image_token_proj(vision_out.patch_tokens), dim=-1)
            features["word_tokens"] = F.normalize(self.text_token_proj(text_out.last_hidden_state), dim=-1)
            features["token_logit_scale"] = self._scale("token")
        if "mlm" in terms:
            features.update(self._mlm(input_ids, attention_mask, mlm_input_ids, mlm_labels, vision_out))
        for name in ("nn", "xnn"):
            if name in terms:
                features.update(self._neighbor_features(name, features, neighbor_targets))
        return features

    def compute_losses(self, features: dict[str, torch.Tensor]) -> LightClipForPreTrainingOutput:
        """The weighted objectives on (possibly merged) features."""
        config = self.config
        image_embeds, text_embeds, logit_scale = features["image_embeds"], features["text_embeds"], features["logit_scale"]
        losses = dict(self.contrastive(image_embeds, text_embeds, logit_scale))
        weights = {"contrastive_loss": 1.0, "token_loss": config.token_weight, "mlm_loss": config.mlm_weight,
                   "nn_loss": config.nn_weight, "xnn_loss": config.xnn_weight}
        if "token" in config.objectives:
            losses.update(self.token_loss(features["patch_tokens"], features["word_tokens"], features["word_mask"],
                                          features["token_logit_scale"]))
        if "mlm" in config.objectives:
            losses["mlm_loss"] = features["mlm_loss"]
        for name in ("nn", "xnn"):
            if name in config.objectives:
                losses.update(getattr(self, f"{name}_loss")(
                    features[f"{name}_image_queries"], features[f"{name}_text_queries"],
                    features[f"{name}_image_targets"], features[f"{name}_text_targets"], features[f"{name}_logit_scale"],
                ))
        loss = sum(weights[k] * v for k, v in losses.items())
        logits_per_text = logit_scale * text_embeds @ image_embeds.t()
        return LightClipForPreTrainingOutput(
            loss=loss, losses=losses, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
            image_embeds=image_embeds, text_embeds=text_embeds,
        )

    def _mlm(self, input_ids, attention_mask, mlm_input_ids, mlm_labels, vision_out) -> dict[str, torch.Tensor]:
        if mlm_input_ids is None:
            mlm_input_ids, mlm_labels = self.mask_text(input_ids, attention_mask)
        else:
            mlm_input_ids, _ = self.lightclip.text_model.truncate(mlm_input_ids, None)
            mlm_labels = mlm_labels[:, : mlm_input_ids.shape[1]]
        masked = self.lightclip.text_model(mlm_input_ids, attention_mask, output_hidden_states=True)
        if self.config.fusion_image_source == "last":
            sources = [torch.cat([vision_out.pooler_output[:, None], vision_out.patch_tokens], dim=1)]
        else:
            states = vision_out.hidden_states
            sources = [states[i] for i in self._vision_stage_indices(len(states))]
            if self.config.vision_config.backbone != "vit":  # CNN stages carry no pooled token: prepend their mean
                sources = [torch.cat([s.mean(1, keepdim=True), s], dim=1) for s in sources]
        token_embedding = self.lightclip.text_model.embeddings.token_embedding.weight
        # the fusion blocks never mix words, so only the masked words need to go through them and the vocab head
        selected = mlm_labels != -100
        logits = self.fusion(masked.hidden_states, sources, token_embedding, positions=selected)
        return self.mlm_loss(logits, mlm_labels[selected])  # {"mlm_loss": ...}: per micro-batch, no negatives

    def _neighbor_features(self, name: str, features: dict, targets: dict | None) -> dict[str, torch.Tensor]:
        keys = (f"image_{name}", f"text_{name}")
        if targets is None or any(k not in targets for k in keys):
            raise ValueError(
                f"the {name} objective needs neighbor_targets with keys {keys}: pass "
                "FeatureBank.lookup(batch['index']) (see docs/neighbors.md)"
            )
        image_head, text_head = getattr(self, f"{name}_image_head"), getattr(self, f"{name}_text_head")
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        image_t = F.normalize(targets[keys[0]].to(image_embeds), dim=-1)
        text_t = F.normalize(targets[keys[1]].to(text_embeds), dim=-1)
        if self.config.neighbor_direction == "student_to_teacher":
            queries = (F.normalize(image_head(image_embeds), dim=-1), F.normalize(text_head(text_embeds), dim=-1))
            goals = (image_t, text_t)
        else:  # teacher features are projected into the student space; the student embeddings are the queries
            queries = (image_embeds, text_embeds)
            goals = (F.normalize(image_head(image_t), dim=-1), F.normalize(text_head(text_t), dim=-1))
        return {f"{name}_image_queries": queries[0], f"{name}_text_queries": queries[1],
                f"{name}_image_targets": goals[0], f"{name}_text_targets": goals[1],
                f"{name}_logit_scale": self._scale(name)}


def merge_features(chunks: list[dict[str, torch.Tensor]], live: int) -> dict[str, torch.Tensor]:
    """Concatenate the features of several micro-batches, for a loss that sees all their negatives.

    `chunks[live]` carries gradients, the others are cached (no grad). Rows are concatenated (word tokens padded to
    the longest); scalars come from the live chunk, their gradient divided by the number of chunks, so that summing
    the backward of every chunk's merged loss gives exactly the full-batch gradient (open_clip's accumulation,
    made exact for the logit scales and the per-micro-batch MLM loss).
    """
    count = len(chunks)
    merged = {}
    for key, value in chunks[live].items():
        if value.dim() == 0:
            merged[key] = value.detach() + (value - value.detach()) / count
            continue
        parts = [c[key] for c in chunks]
        if value.dim() >= 2 and key in ("word_tokens", "word_mask"):
            length = max(p.shape[1] for p in parts)
            parts = [F.pad(p, (0, 0) * (p.dim() - 2) + (0, length - p.shape[1])) for p in parts]
        merged[key] = torch.cat(parts)
    return merged


__all__ = ["LightClipForPreTraining", "LightClipForPreTrainingOutput", "merge_features"]
