"""LightClipModel: a lightweight CLIP dual encoder for transformers.

This file holds the inference model only. Training-only modules (losses, the MLM fusion module, neighbour heads) live
in `pretraining.py` and are never imported here, so a saved checkpoint is a plain dual encoder and this file can be
copied next to it for `trust_remote_code=True` users.
"""


import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_lightclip import (
    EFFICIENTNET_LITE_HIDDEN_SIZE,
    LightClipConfig,
    LightClipTextConfig,
    LightClipVisionConfig,
)


@dataclass
class LightClipVisionModelOutput(ModelOutput):
    """Output of an image tower.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_tokens, hidden_size)`):
            The tower's final token sequence: `[CLS] + patches` for the ViT, the flattened last feature map for CNNs.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Pooled image representation (normalised CLS for the ViT, global average for CNNs), before projection.
        patch_tokens (`torch.FloatTensor` of shape `(batch_size, num_patches, hidden_size)`):
            Normalised patch (ViT) or feature-map (CNN) tokens, without CLS: the image side of token-level objectives.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Token sequences `(batch_size, tokens_i, width_i)` after each layer (ViT) or stage (CNN), when
            `output_hidden_states=True`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LightClipOutput(ModelOutput):
    """Output of [`LightClipModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            Symmetric image-text contrastive loss on this batch.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities of every image with every text.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`):
            L2-normalised projected text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`):
            L2-normalised projected image embeddings.
        text_model_output (`BaseModelOutputWithPooling`):
            The text tower's output.
        vision_model_output (`LightClipVisionModelOutput`):
            The image tower's output.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: LightClipVisionModelOutput | None = None

    def to_tuple(self) -> tuple:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of a square similarity matrix whose diagonal holds the positives."""
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return 0.5 * (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels))


class LightClipAttention(nn.Module):
    """Multi-head self-attention on `F.scaled_dot_product_attention` with one fused QKV projection."""

    def __init__(self, config: LightClipTextConfig | LightClipVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], attn_mask=attention_mask, dropout_p=dropout,
            is_causal=is_causal and attention_mask is None,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))

    def forward_query(self, hidden_states: torch.Tensor, query: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output `(batch, 1, width)` of one query row per sample (`query`: its input state `(batch, 1,
        width)`) over all keys; `attention_mask` `(batch, 1, 1, length)` boolean or None. Used by the pooled-only
        last layer of `encode_image` / `encode_text`."""
        batch, length, _ = hidden_states.shape
        width = self.embed_dim
        q = F.linear(query, self.qkv.weight[:width], self.qkv.bias[:width])
        kv = F.linear(hidden_states, self.qkv.weight[width:], self.qkv.bias[width:])
        kv = kv.view(batch, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = q.view(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attention_mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, 1, width))


class LightClipMLP(nn.Module):
    def __init__(self, config: LightClipTextConfig | LightClipVisionConfig):
        super().__init__()
        self.config = config
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class LightClipEncoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block, as in CLIP."""

    def __init__(self, config: LightClipTextConfig | LightClipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = LightClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = LightClipMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_mask, is_causal)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))

    def forward_pooled(self, hidden_states: torch.Tensor, index: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output `(batch, 1, width)` at one position per sample (`index`, `(batch,)`): keys and values
        come from every token, but queries, the output projection and the MLP run on that row only."""
        normed = self.layer_norm1(hidden_states)
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        state = hidden_states[rows, index][:, None]
        state = state + self.self_attn.forward_query(normed, normed[rows, index][:, None], attention_mask)
        return state + self.mlp(self.layer_norm2(state))


class LightClipEncoder(nn.Module):
    def __init__(self, config: LightClipTextConfig | LightClipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([LightClipEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                is_causal: bool = False, output_hidden_states: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        all_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, is_causal)
            if output_hidden_states:
                all_states += (hidden_states,)
        return hidden_states, all_states

    def forward_pooled(self, hidden_states: torch.Tensor, index: torch.Tensor,
                       last_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       is_causal: bool = False) -> torch.Tensor:
        """The final state `(batch, width)` at position `index` only: the last block runs its queries, output
        projection and MLP on that row (`last_mask`: the row's `(batch, 1, 1, length)` key mask, or None)."""
        for layer in self.layers[:-1]:
            hidden_states = layer(hidden_states, attention_mask, is_causal)
        return self.layers[-1].forward_pooled(hidden_states, index, last_mask)[:, 0]


class LightClipTextEmbeddings(nn.Module):
    def __init__(self, config: LightClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class LightClipTextTransformer(nn.Module):
    """CLIP-style text tower. Truncates over-long input (keeping end-of-text) and pools at the first end-of-text id."""

    def __init__(self, config: LightClipTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = LightClipTextEmbeddings(config)
        self.encoder = LightClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def truncate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cut text to the position table; a row that loses its end-of-text token gets it back in the last slot."""
        limit = self.config.max_position_embeddings
        if input_ids.shape[1] <= limit:
            return input_ids, attention_mask
        eos = self.config.eos_token_id
        lengths = attention_mask.sum(-1) if attention_mask is not None else None
        input_ids = input_ids[:, :limit].clone()
        attention_mask = attention_mask[:, :limit] if attention_mask is not None else None
        if eos is not None:
            cut = lengths > limit if lengths is not None else torch.ones_like(input_ids[:, 0], dtype=torch.bool)
            input_ids[cut, -1] = eos
        return input_ids, attention_mask

    def _attention_bias(self, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """None when SDPA's own causal path is exact; else a boolean mask (True = attend)."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        keys = attention_mask.bool()[:, None, None, :]
        if self.config.causal:
            # built from comparisons of positions (not tril / eye), so the graph exports to ONNX Runtime, which has
            # no boolean EyeLike kernel
            positions = torch.arange(length, device=keys.device)
            keys = keys & (positions[None, :] <= positions[:, None])
            # a padded query row with no visible key would give NaN; let it see itself
            keys = keys | (positions[None, :] == positions[:, None])
        return keys

    def pool_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Position of the first end-of-text token of each row, or of the last real token when there is none."""
        last = (attention_mask.sum(-1) - 1).clamp(min=0) if attention_mask is not None else torch.full_like(
            input_ids[:, 0], input_ids.shape[1] - 1)
        if self.config.eos_token_id is None:
            return last
        is_eos = input_ids == self.config.eos_token_id
        return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), last)

    def forward_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(...).pooler_output` `(batch, width)`, with the last layer run for the pooled token only."""
        input_ids, attention_mask = self.truncate(input_ids, attention_mask)
        length = input_ids.shape[1]
        hidden_states = self.embeddings(input_ids)
        bias = self._attention_bias(attention_mask, length)
        index = self.pool_index(input_ids, attention_mask)
        positions = torch.arange(length, device=input_ids.device)
        keys = positions[None] <= index[:, None] if self.config.causal else torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            keys = keys & attention_mask.bool()
        keys = keys | (positions[None] == index[:, None])  # the pooled row always sees itself, as in forward
        last_mask = None if bool(keys.all()) else keys[:, None, None, :]
        pooled = self.encoder.forward_pooled(hidden_states, index, last_mask, bias, self.config.causal)
        return self.final_layer_norm(pooled)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        input_ids, attention_mask = self.truncate(input_ids, attention_mask)
        hidden_states = self.embeddings(input_ids)
        bias = self._attention_bias(attention_mask, input_ids.shape[1])
        hidden_states, all_states = self.encoder(hidden_states, bias, self.config.causal, output_hidden_states)
        last_hidden_state = self.final_layer_norm(hidden_states)
        index = self.pool_index(input_ids, attention_mask)
        pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=index.device), index]
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_states
        )


class LightClipVisionEmbeddings(nn.Module):
    def __init__(self, config: LightClipVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(self.position_ids)


def _check_pixel_values(pixel_values: torch.Tensor, config: LightClipVisionConfig) -> None:
    expected = (config.num_channels, config.image_size, config.image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values must have shape (batch, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}. "
            "Preprocess images with LightClipProcessor / LightClipImageProcessor, which converts RGBA, grayscale and "
            "16-bit images and resizes them to the model's image_size."
        )


class LightClipVisionTransformer(nn.Module):
    """ViT image tower: patch embedding, CLS token, pre-LN transformer; pooled output is the normalised CLS state."""

    def __init__(self, config: LightClipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = LightClipVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = LightClipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward_features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        _check_pixel_values(pixel_values, self.config)
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.encoder(hidden_states, None, False, output_hidden_states)

    def forward_head(self, last_hidden_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled CLS, patch tokens), both through the final LayerNorm."""
        normed = self.post_layernorm(last_hidden_state)
        return normed[:, 0], normed[:, 1:]

    def forward_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`forward(...).pooler_output` `(batch, width)`, with the last layer run for the CLS token only."""
        _check_pixel_values(pixel_values, self.config)
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        cls = torch.zeros(hidden_states.shape[0], dtype=torch.long, device=hidden_states.device)
        return self.post_layernorm(self.encoder.forward_pooled(hidden_states, cls))

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> LightClipVisionModelOutput:
        last_hidden_state, all_states = self.forward_features(pixel_values, output_hidden_states)
        pooled, patches = self.forward_head(last_hidden_state)
        return LightClipVisionModelOutput(
            last_hidden_state=last_hidden_state, pooler_output=pooled, patch_tokens=patches, hidden_states=all_states
        )


def _run_groups(groups: list[nn.Module], pixel_values: torch.Tensor,
                output_hidden_states: bool) -> BaseModelOutputWithPooling:
    """The native CNNs' forward: the groups in order; the last feature map and, on request, the input and every
    group's output, like transformers' CNNs."""
    states, hidden = (pixel_values,) if output_hidden_states else None, pixel_values
    for group in groups:
        hidden = group(hidden)
        if output_hidden_states:
            states += (hidden,)
    return BaseModelOutputWithPooling(last_hidden_state=hidden, hidden_states=states)


class LightClipConvNet(nn.Module):
    """The native small CNN (`backbone="convnet"`): per stage a 3x3 conv and a stride-2 3x3 conv, each followed by
    BatchNorm and ReLU. Returns the last feature map and, on request, every stage's output, like transformers' CNNs.
    """

    def __init__(self, config: LightClipVisionConfig):
        super().__init__()
        stages, width = [], config.num_channels
        for out in config.convnet_widths():
            stages.append(nn.Sequential(*self._conv(width, out, stride=1), *self._conv(out, out, stride=2)))
            width = out
        self.stages = nn.ModuleList(stages)

    def groups(self) -> list[nn.Module]:
        """The stages in input-to-output order (for locking, as `LightClipEfficientNetLite.groups`)."""
        return list(self.stages)

    @staticmethod
    def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        return _run_groups(self.groups(), pixel_values, output_hidden_states)


class Conv2dSame(nn.Conv2d):
    """A bias-free `nn.Conv2d` with TensorFlow's "SAME" padding, as the released EfficientNet-Lite weights expect.

    The output has `ceil(size / stride)` pixels. Total padding per side pair is
    `max((ceil(size / stride) - 1) * stride + kernel - size, 0)`, split floor / ceil with the extra pixel on the right
    and bottom. At stride 1 (odd kernels) that is `(kernel - 1) / 2` on each side for every input size, so torch's own
    padding does it; at stride 2 it depends on the input size and is computed at every call (any input size works).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        static = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, static, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = F.pad(x, self.same_padding(x.shape[-2:]))
        return super().forward(x)

    def same_padding(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The zero padding (left, right, top, bottom, as `F.pad` takes it) of an input of spatial `size` (H, W)."""
        return (*tf_same_padding(size[1], self.kernel_size[1], self.stride[1]),
                *tf_same_padding(size[0], self.kernel_size[0], self.stride[0]))


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" zero padding of one spatial dimension, (before, after): `ceil(size / stride)` outputs, the odd
    pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_into_conv(conv: nn.Conv2d, pads: tuple[int, int, int, int]) -> nn.Conv2d:
    """One plain `nn.Conv2d` equal to zero padding `pads` (left, right, top, bottom) followed by `conv`.

    Per dimension the new conv pads both sides by the larger amount and its kernel gains zero taps on the smaller side,
    so a stride-2 "SAME" pad of (0, 1) becomes padding 1 and a 4x4 kernel whose first row and column are zero. In
    eager PyTorch the pad copies the whole feature map: pad and 3x3 depthwise conv took about 5x the time of the
    widened conv alone (channels_last, 96 x 112 x 112 maps, batch 16, one thread), whose extra taps cost little."""
    if conv.dilation != (1, 1) or isinstance(conv.padding, str) and conv.padding != "valid":
        raise ValueError(f"pad_into_conv needs an undilated convolution with numeric padding, got {conv}")
    own = (0, 0) if isinstance(conv.padding, str) else conv.padding
    left, right, top, bottom = pads[0] + own[1], pads[1] + own[1], pads[2] + own[0], pads[3] + own[0]
    pad_h, pad_w = max(top, bottom), max(left, right)
    weight = F.pad(conv.weight, (pad_w - left, pad_w - right, pad_h - top, pad_h - bottom))
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, tuple(weight.shape[-2:]), conv.stride, (pad_h, pad_w),
                       groups=conv.groups, bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
    folded.weight.copy_(weight)
    if conv.bias is not None:
        folded.bias.copy_(conv.bias)
    return folded.train(conv.training)


# activations that may overwrite their input once the BatchNorm before them is folded away: they then own the
# convolution's fresh output, and an in-place activation saves allocating (and page-faulting) one more feature map
_INPLACE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish)


def fuse_conv_bn(module: nn.Module) -> int:
    """Fold every `nn.BatchNorm2d` that directly follows an `nn.Conv2d` among the children of a module into that
    convolution (eval-mode statistics, `torch.nn.utils.fusion.fuse_conv_bn_eval`) and replace it by `nn.Identity`;
    the activation right after such a pair runs in place from then on. Returns the number of pairs folded.

    Pairs are found by registration order, which is call order (conv, norm, activation) in each block of the four CNN
    towers; `tests/test_fuse.py` checks every tower's outputs against the unfused model."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for index, ((conv_name, conv), (norm_name, norm)) in enumerate(zip(children, children[1:])):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) \
                    and norm.num_features == conv.out_channels:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, nn.Identity())
                following = children[index + 2][1] if index + 2 < len(children) else None
                if isinstance(following, _INPLACE_ACTIVATIONS):
                    following.inplace = True
                folded += 1
    return folded


def _conv_bn_act(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> nn.Sequential:
    """Conv2dSame, BatchNorm with TensorFlow's momentum 0.99 (0.01 in torch) and eps 1e-3, then ReLU6 (if `act`)."""
    layers = [("conv", Conv2dSame(in_channels, out_channels, kernel_size, stride, groups)),
              ("bn", nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.01))]
    if act:
        layers.append(("act", nn.ReLU6(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class LightClipMBConv(nn.Module):
    """EfficientNet-Lite's mobile inverted bottleneck (no squeeze-excite, ReLU6): 1x1 expansion (absent when
    `expand_ratio` is 1), depthwise `kernel_size` conv at `stride`, linear 1x1 projection; a residual connection when
    the shape is kept, with drop-connect (per-sample stochastic depth at `drop_rate`) on it in training."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int,
                 drop_rate: float):
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = _conv_bn_act(in_channels, mid, 1) if expand_ratio != 1 else None
        self.depthwise = _conv_bn_act(mid, mid, kernel_size, stride, groups=mid)
        self.project = _conv_bn_act(mid, out_channels, 1, act=False)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_rate = drop_rate

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.expand(inputs) if self.expand is not None else inputs
        x = self.project(self.depthwise(x))
        if not self.residual:
            return x
        if self.training and self.drop_rate > 0:
            keep = 1 - self.drop_rate
            mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).add_(keep).floor_()
            x = x * mask / keep
        return x + inputs


# EfficientNet-B0's block table, shared by Lite0..4: (repeats, kernel, stride, expand ratio, output channels) per stage
EFFICIENTNET_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                       (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def efficientnet_round_filters(channels: int, width_multiplier: float, divisor: int = 8) -> int:
    """Channels scaled by `width_multiplier`, rounded to the nearest multiple of `divisor`, never more than 10 % down
    (TF EfficientNet's `round_filters`)."""
    scaled = channels * width_multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


class LightClipEfficientNetLite(nn.Module):
    """The native EfficientNet-Lite (`backbone="efficientnet-lite"`), layer for layer the released TF model, so its
    ImageNet weights load (`lightclip.pretrained_towers.load_efficientnet_lite_imagenet`) and give the same outputs.

    Stem (3x3 stride-2 conv to 32 channels, BatchNorm, ReLU6), the 7 MBConv stages of EfficientNet-B0's block table,
    head (1x1 conv to 1280, BatchNorm, ReLU6). Lite differs from B0 by ReLU6 for swish, no squeeze-excite, and a stem,
    head and first / last stage depth that `width_multiplier` / `depth_multiplier` do not scale; the other stage
    widths are rounded to multiples of 8 and their depths rounded up. Convolutions pad as TensorFlow's "SAME".
    Drop-connect grows linearly with the block index, from 0 to `drop_connect_rate` * (n - 1) / n.

    Returns the head's feature map and, on request, the input and the output of each of `groups()`, in order.
    """

    def __init__(self, config: LightClipVisionConfig):
        super().__init__()
        self.config = config
        kwargs = config.efficientnet_lite_kwargs()
        width, depth = kwargs["width_multiplier"], kwargs["depth_multiplier"]
        repeats = [r if i in (0, len(EFFICIENTNET_STAGES) - 1) else math.ceil(r * depth)
                   for i, (r, *_) in enumerate(EFFICIENTNET_STAGES)]
        total, index, channels = sum(repeats), 0, 32
        self.stem = _conv_bn_act(config.num_channels, channels, 3, stride=2)
        stages = []
        for (_, kernel, stride, expand, out), count in zip(EFFICIENTNET_STAGES, repeats):
            out = efficientnet_round_filters(out, width)
            blocks = []
            for i in range(count):
                rate = kwargs["drop_connect_rate"] * index / total
                blocks.append(LightClipMBConv(channels, out, kernel, stride if i == 0 else 1, expand, rate))
                channels, index = out, index + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = _conv_bn_act(channels, EFFICIENTNET_LITE_HIDDEN_SIZE, 1)

    def groups(self) -> list[nn.Module]:
        """The layer groups in input-to-output order: stem, the 7 stages, head. Freezing all but the last N of them is
        open_clip's `lock_image_tower(unlocked_groups=N)`."""
        return [self.stem, *self.stages, self.head]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        return _run_groups(self.groups(), pixel_values, output_hidden_states)


class LightClipConvVisionTower(nn.Module):
    """A CNN as image tower: the native `LightClipConvNet` or `LightClipEfficientNetLite`, or a transformers CNN
    (MobileNetV2 or EfficientNet, no torchvision).

    The last feature map, flattened, gives the tokens; their mean is the pooled output.

    The convolutions run in `memory_format`, `torch.channels_last` by default, in training as in inference: on one CPU
    thread it speeds up eager inference of every CNN preset (`benchmarks/RESULTS.md`) and made a training step about
    1.35x faster (MobileNetV2 at 224 px, EfficientNet-Lite0 at 64 px, BatchNorm in train mode), and it is the layout of
    tensor-core convolutions on GPUs. Set the attribute to `torch.contiguous_format` to opt out. `fuse()` prepares the
    tower for inference only.
    """

    memory_format: torch.memory_format = torch.channels_last
    is_fused: bool = False

    def __init__(self, config: LightClipVisionConfig):
        super().__init__()
        self.config = config
        if config.backbone == "convnet":
            self.backbone = LightClipConvNet(config)
        elif config.backbone == "efficientnet-lite":
            self.backbone = LightClipEfficientNetLite(config)
        elif config.backbone == "mobilenetv2":
            from transformers import MobileNetV2Model

            self.backbone = MobileNetV2Model(config.backbone_config(), add_pooling_layer=False)
        else:
            from transformers import EfficientNetModel

            self.backbone = EfficientNetModel(config.backbone_config())
            self.backbone.pooler = None  # we pool ourselves; keeps the checkpoint free of an unused layer
        self.apply_memory_format()  # before any optimiser or DDP wrapper sees the parameters

    def forward_features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        _check_pixel_values(pixel_values, self.config)
        if self.training and self.is_fused:
            raise RuntimeError("this image tower was fused for inference (fuse() folded its BatchNorm layers away) and "
                               "cannot run in training mode; call .eval(), or load the unfused checkpoint to train")
        self.apply_memory_format()
        pixel_values = pixel_values.contiguous(memory_format=self.memory_format)
        if self.config.backbone == "efficientnet":
            embeddings = self.backbone.embeddings(pixel_values)
            out = self.backbone.encoder(embeddings, output_hidden_states=output_hidden_states, return_dict=True)
        elif self.config.backbone in ("convnet", "efficientnet-lite"):  # the native CNNs
            out = self.backbone(pixel_values, output_hidden_states)
        else:
            out = self.backbone(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        tokens = out.last_hidden_state.flatten(2).transpose(1, 2)
        stages = tuple(h.flatten(2).transpose(1, 2) for h in out.hidden_states) if output_hidden_states else None
        return tokens, stages

    def apply_memory_format(self) -> None:
        """Lay the convolution weights out in `memory_format`, unless they already are. Loading a checkpoint gives
        contiguous tensors, so `from_pretrained` and every forward call this (a stride check when nothing changes)."""
        first = next(m for m in self.backbone.modules() if isinstance(m, nn.Conv2d))
        if not first.weight.is_contiguous(memory_format=self.memory_format):
            self.backbone.to(memory_format=self.memory_format)

    @torch.no_grad()
    def fuse(self) -> "LightClipConvVisionTower":
        """Reparameterise the tower for inference, in place: TensorFlow "SAME" zero padding moves into the
        convolutions (`pad_into_conv`), every BatchNorm folds into the convolution before it (`fuse_conv_bn`), and the
        activations after them run in place. The outputs stay equal to float rounding; eager inference gets faster
        (`benchmarks/RESULTS.md`). A fused tower can no longer train."""
        if self.training:
            raise RuntimeError("fuse() folds BatchNorm's running statistics into the convolutions: call .eval() first")
        if not self.is_fused:
            self._fold_same_padding()
            fuse_conv_bn(self.backbone)
            self.is_fused = True
            self.apply_memory_format()
        return self

    def _fold_same_padding(self) -> None:
        """Move each explicit zero padding before a strided convolution into that convolution. Where the padding
        depends on the input size (MobileNetV2's `tf_padding`, `Conv2dSame`), the sizes come from one forward of a
        blank picture at `image_size`, the only size the tower accepts."""
        backbone = self.backbone
        if self.config.backbone == "efficientnet":
            from transformers.models.efficientnet.modeling_efficientnet import (
                EfficientNetDepthwiseLayer,
                EfficientNetEmbeddings,
            )

            for module in backbone.modules():
                if isinstance(module, EfficientNetEmbeddings):
                    module.convolution = pad_into_conv(module.convolution, module.padding.padding)
                    module.padding = nn.Identity()
                elif isinstance(module, EfficientNetDepthwiseLayer) and module.stride == 2:  # only then it pads
                    module.depthwise_conv = pad_into_conv(module.depthwise_conv, module.depthwise_conv_pad.padding)
                    module.depthwise_conv_pad = nn.Identity()
            return
        if self.config.backbone == "efficientnet-lite":
            targets = {name: m for name, m in backbone.named_modules() if isinstance(m, Conv2dSame) and m.stride[0] > 1}
        elif self.config.backbone == "mobilenetv2" and backbone.config.tf_padding:
            from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import MobileNetV2ConvLayer

            targets = {name: m for name, m in backbone.named_modules() if isinstance(m, MobileNetV2ConvLayer)}
            if any(m.convolution.dilation != (1, 1) or m.config is not backbone.config for m in targets.values()):
                return  # a dilated MobileNetV2 (output_stride < 32) keeps its padding
        else:
            return
        sizes = self._input_sizes(list(targets.values()))
        for name, module in targets.items():
            if isinstance(module, Conv2dSame):
                backbone.set_submodule(name, pad_into_conv(module, module.same_padding(sizes[module])))
            else:
                conv = module.convolution
                pads = (*tf_same_padding(sizes[module][1], conv.kernel_size[1], conv.stride[1]),
                        *tf_same_padding(sizes[module][0], conv.kernel_size[0], conv.stride[0]))
                module.convolution = pad_into_conv(conv, pads)
        if self.config.backbone == "mobilenetv2":
            backbone.config.tf_padding = False  # the padding is in every convolution now

    def _input_sizes(self, modules: list[nn.Module]) -> dict[nn.Module, tuple[int, int]]:
        """The spatial size (H, W) of each module's input in a forward of a blank batch-1 picture."""
        sizes = {}

        def record(module: nn.Module, args: tuple) -> None:
            sizes[module] = tuple(args[0].shape[-2:])

        hooks = [m.register_forward_pre_hook(record) for m in modules]
        weight = next(self.backbone.parameters())
        size = self.config.image_size
        try:
            self.forward_features(torch.zeros(1, self.config.num_channels, size, size, dtype=weight.dtype,
                                              device=weight.device))
        finally:
            for hook in hooks:
                hook.remove()
        return sizes

    def forward_head(self, last_hidden_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return last_hidden_state.mean(dim=1), last_hidden_state

    def forward_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`forward(...).pooler_output` `(batch, width)`, as the ViT tower's (a CNN computes nothing extra for it)."""
        return self.forward_head(self.forward_features(pixel_values)[0])[0]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> LightClipVisionModelOutput:
        tokens, stages = self.forward_features(pixel_values, output_hidden_states)
        pooled, patches = self.forward_head(tokens)
        return LightClipVisionModelOutput(
            last_hidden_state=tokens, pooler_output=pooled, patch_tokens=patches, hidden_states=stages
        )


def build_vision_tower(config: LightClipVisionConfig) -> nn.Module:
    return LightClipVisionTransformer(config) if config.backbone == "vit" else LightClipConvVisionTower(config)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _pickle_refusal_message(source) -> str:
    pickled = []
    if os.path.isdir(source):
        pickled = sorted(f for f in os.listdir(source) if f.endswith(PICKLE_SUFFIXES))
    found = f" It holds only pickled weights ({', '.join(pickled)})." if pickled else ""
    return (
        f"{source} has no model.safetensors.{found} lightclip loads weights from safetensors only and never "
        "unpickles a checkpoint, because loading a pickle can run arbitrary code. If you trust the file, convert it "
        "once: `from safetensors.torch import save_file; save_file(torch.load(path, weights_only=True), "
        "'model.safetensors')`, or load it into a LightClipModel and call `save_pretrained`."
    )


class LightClipPreTrainedModel(PreTrainedModel):
    config: LightClipConfig
    base_model_prefix = "lightclip"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LightClipEncoderLayer", "LightClipTextEmbeddings", "LightClipVisionEmbeddings"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading weights from safetensors only.

        transformers 5 still falls back to `pytorch_model.bin` (a pickle, which can run code when loaded) when a folder
        or repo has no safetensors file. lightclip never unpickles a checkpoint: such a source is refused with an
        error naming the pickled files, before any of them is opened.
        """
        if pretrained_model_name_or_path is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if kwargs.get("use_safetensors") is False:
            raise ValueError("lightclip loads weights from safetensors only; use_safetensors=False is not supported")
        kwargs["use_safetensors"] = True
        from safetensors import SafetensorError

        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"{pretrained_model_name_or_path}: its safetensors weights cannot be read ({error}); the file is "
                "truncated or corrupt: download or save it again"
            ) from error
        except OSError as error:
            if "safetensors" not in str(error):
                raise
            raise OSError(_pickle_refusal_message(pretrained_model_name_or_path)) from error
        for module in (loaded[0] if isinstance(loaded, tuple) else loaded).modules():
            if isinstance(module, LightClipConvVisionTower):
                module.apply_memory_format()  # loaded tensors are contiguous
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, refusing a model whose image tower was fused for inference: its weights
        no longer have the checkpoint's layout (no BatchNorm), and a checkpoint always stays unfused."""
        if any(isinstance(m, LightClipConvVisionTower) and m.is_fused for m in self.modules()):
            raise ValueError("this model was fused for inference (fuse() folded its BatchNorm layers into the "
                             "convolutions); save the model before fusing it, or load it again to save it")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """All initialisation lives here; loading re-runs it only for what the checkpoint lacks (and buffers).

        transformers skips custom modules that hold no direct parameter or buffer, so the blocks and the CNN tower are
        initialised from `LightClipModel`, which holds `logit_scale`. `init.*` never overwrites loaded tensors.
        """
        super()._init_weights(module)
        if isinstance(module, LightClipTextEmbeddings):
            init.normal_(module.token_embedding.weight, std=0.02)
            init.normal_(module.position_embedding.weight, std=0.01)
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, LightClipVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5)
            init.normal_(module.patch_embedding.weight, std=module.config.initializer_range)
            init.normal_(module.position_embedding.weight, std=module.config.initializer_range)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, LightClipModel):
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5)
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)
            for sub in module.modules():
                self._init_block(sub)

    @staticmethod
    def _init_block(module: nn.Module) -> None:
        if isinstance(module, LightClipAttention):
            depth_scale = (2 * module.config.num_hidden_layers) ** -0.5
            init.normal_(module.qkv.weight, std=module.embed_dim**-0.5 * depth_scale)
            init.normal_(module.out_proj.weight, std=module.embed_dim**-0.5)
            init.zeros_(module.qkv.bias)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, LightClipMLP):
            width = module.config.hidden_size
            init.normal_(module.fc1.weight, std=(2 * width) ** -0.5)
            init.normal_(module.fc2.weight, std=width**-0.5 * (2 * module.config.num_hidden_layers) ** -0.5)
        elif isinstance(module, LightClipConvVisionTower):
            # transformers' CNNs draw convs and norm scales from N(0, 0.02), which vanishes when trained from scratch.
            # He init on fan-out per group (timm's `fix_group_fanout`): torch's fan-out of a depthwise conv counts all
            # channels, which shrinks it by sqrt(channels) and, with fresh BatchNorm statistics in eval mode, gave
            # ~1e-14 embeddings that F.normalize could not normalise.
            for sub in module.modules():
                if isinstance(sub, nn.Conv2d):
                    fan_out = sub.kernel_size[0] * sub.kernel_size[1] * sub.out_channels // sub.groups
                    init.normal_(sub.weight, std=(2.0 / fan_out) ** 0.5)
                elif isinstance(sub, nn.BatchNorm2d):
                    init.ones_(sub.weight)
                    init.zeros_(sub.bias)


class LightClipModel(LightClipPreTrainedModel):
    r"""A lightweight CLIP dual encoder: an image tower (ViT or CNN) and a shortened text transformer, each with a
    linear projection into a shared space, and a learnable logit scale clamped at `config.logit_scale_max`.

    Example:

    ```python
    >>> import lightclip, torch
    >>> from lightclip import LightClipConfig, LightClipModel
    >>> model = LightClipModel(LightClipConfig.from_preset("lightclip-xxs")).eval()
    >>> image = model.encode_image(torch.randn(2, 3, 32, 32))
    >>> image.shape
    torch.Size([2, 64])
    ```"""

    def __init__(self, config: LightClipConfig):
        super().__init__(config)
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = LightClipTextTransformer(config.text_config)
        self.vision_model = build_vision_tower(config.vision_config)
        self.text_projection = nn.Linear(self.text_embed_dim, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(self.vision_embed_dim, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, fuse: bool = False, **kwargs):
        """`LightClipPreTrainedModel.from_pretrained`; with `fuse=True` the loaded model (in eval mode) comes back
        fused for inference (`fuse()`). The zero-shot pipeline passes it on: `pipeline(...,
        model_kwargs={"fuse": True})`."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if fuse:
            (loaded[0] if isinstance(loaded, tuple) else loaded).fuse()
        return loaded

    def fuse(self) -> "LightClipModel":
        """Reparameterise a CNN image tower for inference, in place, and return the model: BatchNorm folded into the
        convolutions, zero padding into the convolutions' own, activations in place
        (`LightClipConvVisionTower.fuse`). Embeddings stay equal to float rounding and eager `encode_image` gets
        faster; `export_towers` exports a fused copy. Needs eval mode. A fused model refuses a training-mode forward
        and `save_pretrained()`: the checkpoint stays unfused, reload it for those. A ViT tower has nothing to fold."""
        if isinstance(self.vision_model, LightClipConvVisionTower):
            self.vision_model.fuse()
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`LightClipPreTrainedModel.save_pretrained`, with the zero-shot Auto class added to `auto_map` (one class can
        hold only one auto class through `register_for_auto_class`)."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        auto_map = getattr(self.config, "auto_map", None)
        if auto_map and "AutoModel" in auto_map:
            auto_map.setdefault("AutoModelForZeroShotImageClassification", auto_map["AutoModel"])
            self.config.to_json_file(os.path.join(save_directory, "config.json"))
        return out

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        """Text tower output whose `pooler_output` is the projected (unnormalised) text embedding."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        out.pooler_output = self.text_projection(out.pooler_output)
        return out

    def get_image_features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False
                           ) -> LightClipVisionModelOutput:
        """Image tower output whose `pooler_output` is the projected (unnormalised) image embedding."""
        out = self.vision_model(pixel_values, output_hidden_states)
        out.pooler_output = self.visual_projection(out.pooler_output)
        return out

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """open_clip-style tensor helper: `(batch, projection_dim)` text embeddings.

        Only the pooled token is needed, so the last text layer runs for that token alone (same result as
        `get_text_features`, about 1/num_layers less work)."""
        embeds = self.text_projection(self.text_model.forward_pooled(input_ids, attention_mask))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """open_clip-style tensor helper: `(batch, projection_dim)` image embeddings.

        With the ViT tower the last layer runs for the CLS token alone (same result as `get_image_features`)."""
        embeds = self.visual_projection(self.vision_model.forward_pooled(pixel_values))
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def logit_scale_exp(self) -> torch.Tensor:
        """exp(logit_scale), clamped at `config.logit_scale_max` as CLIP does."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the stored parameter to [0, logit_scale_max]; trainers call this after every optimiser step."""
        self.logit_scale.clamp_(0, self.config.logit_scale_max)

    @can_return_tuple
    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_loss: bool = False,
                output_hidden_states: bool = False, **kwargs) -> LightClipOutput:
        r"""Embed both modalities and score every image against every text.

        Example:

        ```python
        >>> import torch
        >>> from lightclip import LightClipConfig, LightClipModel
        >>> model = LightClipModel(LightClipConfig.from_preset("lightclip-xxs")).eval()
        >>> out = model(input_ids=torch.tensor([[2, 10, 3], [2, 11, 3]]), pixel_values=torch.randn(3, 3, 32, 32))
        >>> out.logits_per_image.shape
        torch.Size([3, 2])
        ```"""
        if input_ids is None or pixel_values is None:
            raise ValueError("LightClipModel.forward needs both input_ids and pixel_values")
        vision_out = self.vision_model(pixel_values, output_hidden_states)
        text_out = self.text_model(input_ids, attention_mask, output_hidden_states)
        image_embeds = F.normalize(self.visual_projection(vision_out.pooler_output), dim=-1)
        text_embeds = F.normalize(self.text_projection(text_out.pooler_output), dim=-1)
        logits_per_text = self.logit_scale_exp() * text_embeds @ image_embeds.t()
        loss = contrastive_loss(logits_per_text) if return_loss else None
        return LightClipOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_out,
            vision_model_output=vision_out,
        )


__all__ = ["LightClipModel", "LightClipPreTrainedModel", "LightClipOutput", "LightClipVisionModelOutput"]
