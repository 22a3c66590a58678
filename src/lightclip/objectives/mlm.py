"""LightCLIP's masked language modelling (`mlm`) through an auxiliary, training-only fusion module.

Our reading of the paper (docs/method.md), ALBEF-style: at several text-encoder stages, the masked text states plus
the running fusion state attend to each other (bidirectional self-attention over the caption, so a masked word is
predicted from the words on both sides; the text tower itself is causal), then cross-attend to the unmasked image
tokens (pooled embedding + patch tokens, projected to the text width); an MLP follows, each with a residual and
pre-LayerNorm. The last block feeds an MLM head whose decoder is the text token-embedding matrix (tied). The masked
caption is drawn by BERT masking (`mask_tokens`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init
from transformers.activations import ACT2FN

from ..configuration_lightclip import LightClipConfig
from ..modeling_lightclip import LightClipModel, PackedTokens
from .base import Features, Objective, TowerOutputs


class LightClipCrossAttention(nn.Module):
    """Queries attend to keys/values of another (or the same) sequence (SDPA); `key_mask` (batch, keys) marks the
    keys that may be attended (padding excluded). Queries or keys given as the packed rows of a `PackedTokens`
    (`query_packing`, `key_packing`) are projected as rows and attend on its grid; the output comes back like the
    queries."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, text: Tensor, image: Tensor, key_mask: Tensor | None = None,
                query_packing: PackedTokens | None = None, key_packing: PackedTokens | None = None) -> Tensor:
        q, kv = self.q_proj(text), self.kv_proj(image)
        q = q if query_packing is None else query_packing.unpack(q)
        kv = kv if key_packing is None else key_packing.unpack(kv)
        (batch, length, width), keys = q.shape, kv.shape[1]
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        kv = kv.view(batch, keys, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask).transpose(1, 2).reshape(-1, length, width)
        return self.out_proj(out if query_packing is None else query_packing.pack(out))


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

    def forward(self, state: Tensor, image_tokens: Tensor, words: PackedTokens, word_mask: Tensor | None = None,
                queries: PackedTokens | None = None) -> Tensor:
        """`state`: `(tokens, width)`, the packed rows of `words`. Only the words of `queries` (a subset) come out
        when given; word attention still reads all of `words`."""
        out = words if queries is None else queries
        rows = None if queries is None else words.rows_of(queries)
        if hasattr(self, "self_attn"):
            normed = self.norm_self(state)
            picked = normed if rows is None else normed[rows]
            state = state if rows is None else state[rows]
            state = state + self.self_attn(picked, normed, word_mask, query_packing=out, key_packing=words)
        elif rows is not None:
            state = state[rows]
        if self.additive:  # the pooled image embedding of each word's caption
            state = state + self.norm_attn(image_tokens[:, 0])[out.batch_index]
        else:
            state = state + self.cross_attn(self.norm_attn(state), image_tokens, query_packing=out)
        return state + self.fc2(self.act(self.fc1(self.norm_mlp(state))))


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

    def forward(self, text_hidden_states: tuple[Tensor, ...], image_sources: list[Tensor],
                token_embedding: Tensor, positions: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """MLM logits `(batch, length, vocab)` (zeros at padding), or `(positions.sum(), vocab)` when
        `positions` is given.

        Every block runs on packed words (`PackedTokens`), so padding costs nothing.

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
        grid = text_hidden_states[0].shape[:2]
        real = (torch.ones(grid, dtype=torch.bool, device=text_hidden_states[0].device) if attention_mask is None
                else attention_mask.bool())
        words = PackedTokens(real if positions is None else real | positions)
        chosen = None if positions is None else PackedTokens(positions)
        word_attention = hasattr(self.blocks[0], "self_attn")
        rows = words if word_attention or chosen is None else chosen  # the words the blocks run on
        state, images = None, {}
        for k, (layer, block) in enumerate(zip(self.layers, self.blocks)):
            text = rows.pack(text_hidden_states[layer])
            state = text if state is None else state + text
            # stages that share a source and its projection ("last") share one projected copy
            key = (min(k, len(image_sources) - 1), min(k, len(self.image_proj) - 1))
            if key not in images:
                source = image_sources[key[0]].detach() if self.detach_image else image_sources[key[0]]
                images[key] = self.image_norm(self.image_proj[key[1]](source))
            image = images[key]
            # the last block's output is read at the chosen words only
            last = word_attention and k == len(self.blocks) - 1
            state = block(state, image, rows, attention_mask if word_attention else None,
                          queries=chosen if last else None)
        hidden = self.head_norm(self.head_act(self.head_transform(state)))
        logits = F.linear(hidden, token_embedding, self.head_bias)
        return logits if chosen is not None else words.unpack(logits)


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: list[int] | tuple[int, ...] | set[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: returns `(masked_input_ids, labels)`.

    `probability` of the non-special, non-padding tokens are chosen; of those 80 % become `mask_token_id`, 10 % a
    random non-special token, 10 % stay. `labels` holds the original id at chosen positions and -100 elsewhere.
    Every row with at least one maskable token gets at least one chosen token (one drawn uniformly when the coin
    flips chose none): short captions would otherwise often give the masked pass nothing to predict.
    """
    device = input_ids.device
    gen_device = generator.device if generator is not None else device

    def rand(shape: torch.Size) -> Tensor:
        return torch.rand(shape, generator=generator, device=gen_device).to(device)

    specials = torch.tensor(sorted(set(special_token_ids) | {mask_token_id}), device=device, dtype=input_ids.dtype)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, specials)
    chosen = maskable & (rand(input_ids.shape) < probability)
    # rows that drew nothing but could: pick one maskable position uniformly
    empty = maskable.any(-1) & ~chosen.any(-1)
    pick = (rand(input_ids.shape) * maskable).argmax(-1)
    chosen[empty, pick[empty]] = True

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = rand(input_ids.shape)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[specials[(specials >= 0) & (specials < vocab_size)]] = False
    allowed_ids = allowed.nonzero().squeeze(-1).to(input_ids.dtype)
    random_ids = allowed_ids[(rand(input_ids.shape) * len(allowed_ids)).long().clamp(max=len(allowed_ids) - 1)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


class MaskedLanguageModelingLoss(nn.Module):
    """Cross-entropy over the masked positions only (labels != -100)."""

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """logits (B, L, V), labels (B, L). A batch with nothing masked gives 0, still attached to the graph, so
        every rank runs the same backward under DDP."""
        selected = labels != -100
        if not selected.any():
            return {"mlm_loss": logits.sum() * 0.0}
        return {"mlm_loss": F.cross_entropy(logits[selected].float(), labels[selected])}


class MaskedLanguageModelingObjective(Objective):
    """LightCLIP's MLM through the auxiliary fusion module, which injects the image into the masked text."""

    name, loss_key, weight_field = "mlm", "mlm_loss", "mlm_weight"
    needs_image_tokens = needs_masked_text = True  # the masked caption runs through the text tower in its own pass

    def __init__(self, config: LightClipConfig, model: LightClipModel):
        super().__init__(config)
        if config.text_config.mask_token_id is None:
            raise ValueError("the mlm objective needs text_config.mask_token_id (a tokenizer with a mask token)")
        self.fusion = LightClipFusion(config, self._image_source_widths(model))
        self.loss = MaskedLanguageModelingLoss()

    @property
    def needs_vision_stages(self) -> bool:
        return self.settings.fusion_image_source == "multiscale"

    def init_weights(self, module: nn.Module) -> None:
        super().init_weights(module)
        if module is self.fusion:
            init.zeros_(module.head_bias)

    def mask_text(self, input_ids: Tensor, attention_mask: Tensor,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """BERT masking of the text with the config's tokens and probability: (masked ids, labels with -100 where not
        masked)."""
        text = self.config.text_config
        return mask_tokens(input_ids, attention_mask, mask_token_id=text.mask_token_id, vocab_size=text.vocab_size,
                           special_token_ids=text.special_token_ids, probability=self.settings.mlm_probability,
                           generator=generator)

    def sample_inputs(self, input_ids: Tensor, attention_mask: Tensor,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        mlm_input_ids, mlm_labels = self.mask_text(input_ids, attention_mask, generator)
        return {"mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels}

    def _stage_indices(self, num_states: int) -> list[int]:
        """Evenly spaced image-tower stages, one per fusion stage, the last stage included."""
        stages = len(self.config.resolved_fusion_layers())
        return [max(1, round((num_states - 1) * (k + 1) / stages)) for k in range(stages)]

    def _image_source_widths(self, model: LightClipModel) -> list[int]:
        vision = self.config.vision_config
        if self.settings.fusion_image_source == "last":
            return [vision.hidden_size]
        if vision.backbone == "vit":
            return [vision.hidden_size] * len(self.config.resolved_fusion_layers())
        tower = model.vision_model
        device = next(tower.parameters()).device
        was_training = tower.training
        with torch.no_grad():
            tower.eval()
            size = vision.image_size
            states = tower(torch.zeros(1, vision.num_channels, size, size, device=device), True).hidden_states
            tower.train(was_training)
        return [states[i].shape[-1] for i in self._stage_indices(len(states))]

    def forward_features(self, outputs: TowerOutputs) -> Features:
        text_tower, vision = outputs.model.text_model, outputs.vision
        mlm_input_ids, mlm_labels = outputs.mlm_input_ids, outputs.mlm_labels
        if mlm_input_ids is None:
            mlm_input_ids, mlm_labels = self.mask_text(outputs.input_ids, outputs.attention_mask)
        else:
            mlm_input_ids, _ = text_tower.truncate(mlm_input_ids, None)
            mlm_labels = mlm_labels[:, : mlm_input_ids.shape[1]]
        masked = text_tower(mlm_input_ids, outputs.attention_mask, output_hidden_states=True)
        if self.settings.fusion_image_source == "last":
            sources = [torch.cat([vision.pooler_output[:, None], vision.patch_tokens], dim=1)]
        else:
            states = vision.hidden_states
            sources = [states[i] for i in self._stage_indices(len(states))]
            if self.config.vision_config.backbone != "vit":  # CNN stages carry no pooled token: prepend their mean
                sources = [torch.cat([s.mean(1, keepdim=True), s], dim=1) for s in sources]
        token_embedding = text_tower.embeddings.token_embedding.weight
        # only the masked words need the vocabulary head and the last fusion block's outputs (LightClipFusion)
        selected = mlm_labels != -100
        logits = self.fusion(masked.hidden_states, sources, token_embedding, positions=selected,
                             attention_mask=outputs.attention_mask)
        return dict(self.loss(logits, mlm_labels[selected]))  # per micro-batch (no negatives): a scalar

    def forward(self, shared: Features, own: Features) -> dict[str, Tensor]:
        return {"mlm_loss": own["mlm_loss"]}

    @classmethod
    def card_row(cls, config: Mapping[str, Any]) -> tuple[str, str]:
        return ("mlm: masked language modelling through the image-text fusion module",
                f"{config.get('mlm_weight')} (mask probability {config.get('mlm_probability')})")


__all__ = ["LightClipCrossAttention", "LightClipFusion", "LightClipFusionBlock", "MaskedLanguageModelingLoss",
           "MaskedLanguageModelingObjective", "mask_tokens"]
