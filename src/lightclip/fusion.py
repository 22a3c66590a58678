"""LightCLIP's auxiliary fusion module for masked language modelling (training only).

Our reading of the paper (docs/method.md), ALBEF-style: at several text-encoder stages, the masked text states plus
the running fusion state attend to each other (bidirectional self-attention over the caption, so a masked word is
predicted from the words on both sides; the text tower itself is causal), then cross-attend to the unmasked image
tokens (pooled embedding + patch tokens, projected to the text width); an MLP follows, each with a residual and
pre-LayerNorm. The last block feeds an MLM head whose decoder is the text token-embedding matrix (tied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_lightclip import LightClipConfig


class LightClipCrossAttention(nn.Module):
    """Queries attend to keys/values of another (or the same) sequence (SDPA); `key_mask` (batch, keys) marks the
    keys that may be attended (padding excluded)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, text: torch.Tensor, image: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = text.shape
        q = self.q_proj(text).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_proj(image).view(batch, image.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class LightClipFusionBlock(nn.Module):
    """One injection stage: `state + text_stage` -> (self-attention over the words) -> (cross-attention to the
    image) -> MLP, pre-LN residuals.

    With `fusion_word_attention=False` the words are not mixed (each masked word then sees only the causal text
    tower's left context); with `fusion_type="additive"` the cross-attention is replaced by adding the projected
    pooled image embedding.
    """

    def __init__(self, config: LightClipConfig):
        super().__init__()
        text = config.text_config
        width = text.hidden_size
        settings = config.pretraining_config
        heads = settings.fusion_num_heads or text.num_attention_heads
        self.additive = settings.fusion_type == "additive"
        if settings.fusion_word_attention:
            self.norm_self = nn.LayerNorm(width, eps=text.layer_norm_eps)
            self.self_attn = LightClipCrossAttention(width, heads)
        self.norm_attn = nn.LayerNorm(width, eps=text.layer_norm_eps)
        if not self.additive:
            self.cross_attn = LightClipCrossAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width, eps=text.layer_norm_eps)
        self.fc1 = nn.Linear(width, text.intermediate_size)
        self.act = ACT2FN[text.hidden_act]
        self.fc2 = nn.Linear(text.intermediate_size, width)

    def forward(self, state: torch.Tensor, image_tokens: torch.Tensor, word_mask: torch.Tensor | None = None,
                query_index: torch.Tensor | None = None) -> torch.Tensor:
        """`query_index` (batch, n): only these words come out (all words are still read by word attention)."""
        if hasattr(self, "self_attn"):
            words = self.norm_self(state)
            queries = words if query_index is None else _gather_words(words, query_index)
            state = state if query_index is None else _gather_words(state, query_index)
            state = state + self.self_attn(queries, words, word_mask)
        elif query_index is not None:
            state = _gather_words(state, query_index)
        if self.additive:
            state = state + self.norm_attn(image_tokens[:, :1])  # the pooled image embedding, broadcast over words
        else:
            state = state + self.cross_attn(self.norm_attn(state), image_tokens)
        return state + self.fc2(self.act(self.fc1(self.norm_mlp(state))))


def _gather_words(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`states[b, index[b]]` for every row b: (batch, length, width) -> (batch, n, width)."""
    return torch.gather(states, 1, index[..., None].expand(-1, -1, states.shape[-1]))


class LightClipFusion(nn.Module):
    """Injects the image into the masked text at `config.resolved_fusion_layers()` and predicts masked tokens.

    `image_widths` are the widths of the image sources: one entry (`fusion_image_source="last"`: pooled + last-stage
    tokens) or one per stage (`"multiscale"`: the image tower's own evenly spaced stages).
    """

    def __init__(self, config: LightClipConfig, image_widths: list[int]):
        super().__init__()
        text = config.text_config
        width = text.hidden_size
        self.layers = config.resolved_fusion_layers()
        self.detach_image = config.pretraining_config.fusion_detach_image
        self.image_proj = nn.ModuleList(nn.Linear(w, width) for w in image_widths)
        self.image_norm = nn.LayerNorm(width, eps=text.layer_norm_eps)
        self.blocks = nn.ModuleList(LightClipFusionBlock(config) for _ in self.layers)
        self.head_transform = nn.Linear(width, width)
        self.head_act = ACT2FN[text.hidden_act]
        self.head_norm = nn.LayerNorm(width, eps=text.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(text.vocab_size))

    def forward(self, text_hidden_states: tuple[torch.Tensor, ...], image_sources: list[torch.Tensor],
                token_embedding: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """MLM logits `(batch, length, vocab)`, or `(positions.sum(), vocab)` when `positions` is given.

        Args:
            text_hidden_states: the masked pass's states, index 0 = embeddings, index i = after text layer i.
            image_sources: `(batch, tokens, width_k)` image token sequences, pooled embedding first; one per stage,
                or a single one shared by all stages.
            token_embedding: the text tower's token-embedding matrix, the tied MLM decoder.
            positions: optional `(batch, length)` boolean mask of the words to predict (`mlm_labels != -100`); rows
                come out in the order of `labels[positions]`. Only these words go through the vocabulary head and
                out of the last block (whose word attention still reads every word); without word attention the
                blocks never mix words, so only these words go through any block.
            attention_mask: `(batch, length)`, 1 for words and 0 for padding, which word attention never reads.
        """
        keep = index = None
        word_attention = hasattr(self.blocks[0], "self_attn")
        if positions is not None:
            # each row's selected words first (stable sort keeps their order), cut to the longest row's count
            width = int(positions.sum(-1).max()) if positions.numel() else 0
            index = torch.sort((~positions).to(torch.int8), dim=-1, stable=True).indices[:, :width]
            keep = torch.gather(positions, 1, index)
        state = None
        for k, (layer, block) in enumerate(zip(self.layers, self.blocks)):
            text = text_hidden_states[layer]
            if index is not None and not word_attention:
                text = _gather_words(text, index)
            state = text if state is None else state + text
            source = image_sources[min(k, len(image_sources) - 1)]
            source = source.detach() if self.detach_image else source
            image = self.image_norm(self.image_proj[min(k, len(self.image_proj) - 1)](source))
            # the last block's output is read at the selected words only
            last_block_index = index if word_attention and k == len(self.blocks) - 1 else None
            state = block(state, image, attention_mask if word_attention else None, query_index=last_block_index)
        if keep is not None:
            state = state[keep]
        hidden = self.head_norm(self.head_act(self.head_transform(state)))
        return F.linear(hidden, token_embedding, self.head_bias)


__all__ = ["LightClipFusion", "LightClipFusionBlock", "LightClipCrossAttention"]
