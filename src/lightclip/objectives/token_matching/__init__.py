"""LightCLIP, token level: relaxed bipartite matching between image patches and words (`token`).

`TokenMatchingLoss` is a symmetric InfoNCE over pair scores S_tok; each matching method is a module of its own:
`sinkhorn` (entropic optimal transport, our reading), `hungarian` (a strict matching with patch capacity) and FILIP's
late interaction in `pairs`, which also holds how every method forms and chunks its pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...configuration_lightclip import LightClipConfig
from ...modeling_lightclip import LightClipModel
from ..base import Features, Objective, TowerOutputs, symmetric_ce
from ..distributed import gather_no_grad, gather_with_grad, global_labels, world_info
from . import pairs
from .hungarian import hungarian_pair_scores
from .pairs import filip_pair_scores
from .sinkhorn import sinkhorn_pair_scores, sinkhorn_plan


class TokenMatchingLoss(nn.Module):
    """Patch-word relaxed bipartite matching (LightCLIP, token level; docs/method.md).

    The pair score S_tok(i, j) = sum Pi A / sum Pi aligns the patches of image i with the valid words of text j under a
    matching Pi: entropic OT (`"sinkhorn"`, our reading, default), Hungarian matching with patch capacity
    (`"hungarian"`; every pair by default, or the positives and `num_negatives` hardest negatives with FILIP scores
    elsewhere), or FILIP's independent max (`"filip"`, baseline). The loss is a symmetric InfoNCE over the global
    batch on S_tok, scaled by its own learnable temperature `logit_scale` (exponentiated, owned by the caller).

    `softmax_negatives=k` (our reading; any method) bounds the cost: each image row and each text column is a softmax
    over its positive and its k hardest negatives only, chosen by the cosine of mean-pooled tokens (no matching), and
    only those 1 + k pairs per query are matched: B (1 + k) pairs per direction instead of B^2, linear in the batch.
    Every logit of a softmax is then a matched score (one scale), unlike Hungarian's `num_negatives`, which it
    overrides.
    """

    def __init__(
        self,
        method: str = "sinkhorn",
        epsilon: float = 0.05,
        iterations: int = 10,
        capacity: int = 2,
        num_negatives: int | None = None,
        chunk_size: int = 32,
        unroll: bool = False,
        softmax_negatives: int | None = None,
    ) -> None:
        super().__init__()
        if method not in ("sinkhorn", "hungarian", "filip"):
            raise ValueError(f"method must be 'sinkhorn', 'hungarian' or 'filip', got {method!r}")
        if softmax_negatives is not None and softmax_negatives < 1:
            raise ValueError(f"softmax_negatives must be a positive integer or None, got {softmax_negatives}")
        self.method = method
        self.epsilon = epsilon
        self.iterations = iterations
        self.capacity = capacity
        self.num_negatives = num_negatives
        self.chunk_size = chunk_size
        self.unroll = unroll
        self.softmax_negatives = softmax_negatives

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, epsilon={self.epsilon}, iterations={self.iterations}, "
                f"softmax_negatives={self.softmax_negatives}")

    def pair_scores(
        self,
        image_tokens: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        labels: Tensor | None = None,
        dim: int = 1,
        keys: Tensor | None = None,
    ) -> Tensor:
        """S_tok of every image with every text, or of the pairs `keys` names, laid out as `scores.gather(dim, keys)`;
        without keys, `labels` / `dim` choose the Hungarian method's hard negatives."""
        if self.method == "sinkhorn":
            return sinkhorn_pair_scores(image_tokens, text_tokens, text_mask, self.epsilon, self.iterations,
                                        self.chunk_size, unroll=self.unroll, keys=keys, dim=dim)
        if self.method == "hungarian":
            num_negatives = self.num_negatives if keys is None else None
            return hungarian_pair_scores(image_tokens, text_tokens, text_mask, self.capacity, num_negatives, labels,
                                         dim, self.chunk_size, keys=keys)
        return filip_pair_scores(image_tokens, text_tokens, text_mask, self.chunk_size, keys=keys, dim=dim)

    def hard_keys(
        self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor, labels: Tensor, dim: int
    ) -> Tensor:
        """Each query's positive and its `softmax_negatives` hardest negatives, positive first (see `pair_scores`).

        A query's keys depend only on its own row (`dim=1`) or column (`dim=0`), so a rank's local queries against
        the gathered batch pick what one process picks on the global batch.
        """
        similarity = pairs.pooled_similarity(image_tokens, text_tokens, text_mask)
        return pairs.hard_keys(similarity, self.softmax_negatives, labels, dim)

    def forward(
        self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor, logit_scale: Tensor
    ) -> dict[str, Tensor]:
        """image_tokens (B, N, D) and text_tokens (B, M, D) L2-normalised; text_mask (B, M) bool, True = valid word."""
        labels = global_labels(image_tokens.shape[0], image_tokens.device)
        _, world_size = world_info()
        hungarian_hard = self.method == "hungarian" and self.num_negatives is not None
        per_query = hungarian_hard or self.softmax_negatives is not None  # pairs chosen per row / column
        if world_size == 1 and not per_query:
            scores = self.pair_scores(image_tokens, text_tokens, text_mask)
            return {"token_loss": symmetric_ce(logit_scale * scores, logit_scale * scores.T, labels)}
        # local image rows against all texts, and all images against the local text columns
        all_image = gather_with_grad(image_tokens)
        all_text = gather_with_grad(text_tokens)
        all_mask = gather_no_grad(text_mask)
        image_keys = text_keys = None
        if self.softmax_negatives is not None:
            image_keys = self.hard_keys(image_tokens, all_text, all_mask, labels, dim=1)  # (B_local, 1 + k)
            text_keys = self.hard_keys(all_image, text_tokens, text_mask, labels, dim=0)  # (1 + k, B_local)
        per_image = self.pair_scores(image_tokens, all_text, all_mask, labels, dim=1, keys=image_keys)
        per_text = self.pair_scores(all_image, text_tokens, text_mask, labels, dim=0, keys=text_keys)
        if image_keys is not None:
            labels = torch.zeros_like(labels)  # the keys put each query's positive first
        return {"token_loss": symmetric_ce(logit_scale * per_image, logit_scale * per_text.T, labels)}


class TokenMatchingObjective(Objective):
    """LightCLIP's relaxed bipartite matching between image patches and words, with its own projections and scale."""

    name, loss_key, weight_field, logit_scale_init = "token", "token_loss", "token_weight", "logit_scale_init_value"
    needs_image_tokens = needs_text_tokens = True

    def __init__(self, config: LightClipConfig, model: LightClipModel | None = None):
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

    def forward(self, shared: Features, own: Features) -> dict[str, Tensor]:
        return self.loss(own["patch_tokens"], own["word_tokens"], own["word_mask"], own["logit_scale"])

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        negatives = config.get("token_num_negatives")
        bound = "" if negatives is None else f", {negatives} hard negative{'s' * (negatives != 1)} per query"
        return ("token: patch-word relaxed bipartite matching",
                f"{config.get('token_weight')} ({config.get('token_matching')}{bound})")


__all__ = ["TokenMatchingLoss", "TokenMatchingObjective", "filip_pair_scores", "hungarian_pair_scores",
           "sinkhorn_pair_scores", "sinkhorn_plan"]
