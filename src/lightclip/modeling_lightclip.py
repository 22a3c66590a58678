"""LightClipModel: a lightweight CLIP dual encoder for transformers.

This file holds the config-driven model (`LightClipPreTrainedModel`, `LightClipModel`), the text transformer and the
ViT image tower; the CNN image towers live in `modeling_lightclip_convnet.py` and the outputs in
`modeling_lightclip_outputs.py`. Training-only modules (losses, the MLM fusion module, neighbour heads) live in
`pretraining.py` and are never imported here, so a saved checkpoint is a plain dual encoder and these files can be
copied next to it for `trust_remote_code=True` users.
"""


import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.generic import can_return_tuple

from .configuration_lightclip import LightClipConfig, LightClipTextConfig, LightClipVisionConfig
from .modeling_lightclip_convnet import LightClipConvVisionTower
from .modeling_lightclip_outputs import LightClipOutput, LightClipVisionModelOutput, check_pixel_values


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of a square similarity matrix whose diagonal holds the positives."""
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return 0.5 * (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels))


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """`(length, length)` boolean, True where a query attends: itself and the positions before it. Built from
    comparisons of positions (not `tril`), so the graph exports to ONNX Runtime, which has no boolean EyeLike kernel."""
    positions = torch.arange(length, device=device)
    return positions[None, :] <= positions[:, None]


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in plain matmuls and softmax (`attn_implementation="eager"`), taking the masks the "sdpa" interface
    takes: boolean, True where a query attends, or None, with `is_causal` then masking later keys."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is None and is_causal:
        attention_mask = causal_mask(key.shape[-2], key.device)
    if attention_mask is not None:
        attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class PackedTokens:
    """The real tokens of a padded `(batch, length)` batch, packed into `(tokens, ...)` rows.

    Projections, MLPs and LayerNorms act on each token alone: on the packed rows they skip the padding, which is most
    of a batch of real captions padded to its longest (about 60 % at batch 64 on Open Clip Art). Attention unpacks
    to the `(batch, length)` grid, whose padding positions hold zeros. The maths of every real token is unchanged.
    """

    def __init__(self, mask: torch.Tensor):
        self.batch, self.length = mask.shape
        flat = mask.reshape(-1)
        self.index = flat.nonzero().squeeze(1)  # flat grid position of each packed row
        self._row_of = flat.long().cumsum(0) - 1  # packed row of each grid position (valid where `mask`)

    @classmethod
    def of(cls, attention_mask: torch.Tensor | None) -> "PackedTokens | None":
        """None when no token is padding, or while tracing or compiling (the token count is data-dependent)."""
        if (attention_mask is None or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or bool(attention_mask.all())):
            return None
        return cls(attention_mask.bool())

    @property
    def batch_index(self) -> torch.Tensor:
        """The sample of each packed row."""
        return torch.div(self.index, self.length, rounding_mode="floor")

    def rows_at(self, index: torch.Tensor) -> torch.Tensor:
        """Packed rows of the tokens at grid positions `index[b]` of each sample b (`(batch,)`)."""
        return self._row_of[torch.arange(self.batch, device=index.device) * self.length + index]

    def rows_of(self, subset: "PackedTokens") -> torch.Tensor:
        """Packed rows of `subset`'s tokens, which must all be tokens of `self`."""
        return self._row_of[subset.index]

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """`(batch, length, ...)` -> `(tokens, ...)`."""
        return grid.reshape(self.batch * self.length, *grid.shape[2:]).index_select(0, self.index)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """`(tokens, ...)` -> `(batch, length, ...)`, zeros at padding."""
        grid = rows.new_zeros(self.batch * self.length, *rows.shape[1:]).index_copy(0, self.index, rows)
        return grid.view(self.batch, self.length, *rows.shape[1:])


class LightClipAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, computed by the `config._attn_implementation`
    function of transformers' `ALL_ATTENTION_FUNCTIONS` ("sdpa" unless the model was loaded with another)."""

    def __init__(self, config: LightClipTextConfig | LightClipVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                is_causal: bool = False, packing: PackedTokens | None = None) -> torch.Tensor:
        """`hidden_states` `(batch, length, width)`, or `(tokens, width)` rows of `packing`; the output alike."""
        qkv = self.qkv(hidden_states)
        if packing is not None:
            qkv = packing.unpack(qkv)
        batch, length, _ = qkv.shape
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self._attend(qkv[0], qkv[1], qkv[2], attention_mask, is_causal, packing)

    def forward_query(self, hidden_states: torch.Tensor, query: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, packing: PackedTokens | None = None
                      ) -> torch.Tensor:
        """Attention output `(batch, 1, width)` of one query row per sample (`query`: its input state `(batch, 1,
        width)`) over all keys (`hidden_states`, packed rows of `packing` or a grid); `attention_mask` `(batch, 1, 1,
        length)` boolean or None. Used by the pooled-only last layer of `encode_image` / `encode_text`."""
        width = self.embed_dim
        q = F.linear(query, self.qkv.weight[:width], self.qkv.bias[:width])
        kv = F.linear(hidden_states, self.qkv.weight[width:], self.qkv.bias[width:])
        if packing is not None:
            kv = packing.unpack(kv)
        batch, length, _ = kv.shape
        kv = kv.view(batch, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = q.view(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)
        return self._attend(q, kv[0], kv[1], attention_mask, is_causal=False)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, is_causal: bool, packing: PackedTokens | None = None
                ) -> torch.Tensor:
        """Heads `(batch, heads, tokens, head_dim)` in; the output projection of their attention out (on the packed
        rows of `packing` when given)."""
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self, query, key, value, attention_mask, scaling=self.scale, is_causal=is_causal,
            dropout=self.config.attention_dropout if self.training else 0.0,
        )
        attn_output = attn_output.reshape(*attn_output.shape[:2], self.embed_dim)
        return self.out_proj(attn_output if packing is None else packing.pack(attn_output))


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
                is_causal: bool = False, packing: PackedTokens | None = None) -> torch.Tensor:
        normed = self.layer_norm1(hidden_states)
        hidden_states = hidden_states + self.self_attn(normed, attention_mask, is_causal, packing)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))

    def forward_pooled(self, hidden_states: torch.Tensor, index: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, packing: PackedTokens | None = None
                       ) -> torch.Tensor:
        """The block's output `(batch, 1, width)` at one position per sample (`index`, `(batch,)`): keys and values
        come from every token, but queries, the output projection and the MLP run on that row only."""
        normed = self.layer_norm1(hidden_states)
        if packing is None:
            rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
            state, query = hidden_states[rows, index][:, None], normed[rows, index][:, None]
        else:
            rows = packing.rows_at(index)
            state, query = hidden_states[rows][:, None], normed[rows][:, None]
        state = state + self.self_attn.forward_query(normed, query, attention_mask, packing)
        return state + self.mlp(self.layer_norm2(state))


class LightClipEncoder(nn.Module):
    def __init__(self, config: LightClipTextConfig | LightClipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([LightClipEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                is_causal: bool = False, output_hidden_states: bool = False, packing: PackedTokens | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """`hidden_states` `(batch, length, width)`, or the packed rows of `packing` (every state comes out alike)."""
        all_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, is_causal, packing)
            if output_hidden_states:
                all_states += (hidden_states,)
        return hidden_states, all_states

    def forward_pooled(self, hidden_states: torch.Tensor, index: torch.Tensor,
                       last_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       is_causal: bool = False, packing: PackedTokens | None = None) -> torch.Tensor:
        """The final state `(batch, width)` at position `index` only: the last block runs its queries, output
        projection and MLP on that row (`last_mask`: the row's `(batch, 1, 1, length)` key mask, or None)."""
        for layer in self.layers[:-1]:
            hidden_states = layer(hidden_states, attention_mask, is_causal, packing)
        return self.layers[-1].forward_pooled(hidden_states, index, last_mask, packing)[:, 0]


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
    """CLIP-style text tower. Truncates over-long input (keeping end-of-text) and pools at the first end-of-text id.

    Padding is never computed (`PackedTokens`): its positions in `last_hidden_state` and `hidden_states` hold zeros.
    """

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
        """None when no mask (or the attention's own `is_causal`) is exact; else a boolean mask (True = attend)."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        keys = attention_mask.bool()[:, None, None, :]
        if self.config.causal:
            # a padded query row with no visible key would give NaN; let it see itself (a comparison, not `eye`, for
            # ONNX Runtime's sake, as in `causal_mask`)
            positions = torch.arange(length, device=keys.device)
            keys = (keys & causal_mask(length, keys.device)) | (positions[None, :] == positions[:, None])
        return keys

    def pool_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Position of the first end-of-text token of each row, or of the last real token when there is none."""
        last = (attention_mask.sum(-1) - 1).clamp(min=0) if attention_mask is not None else torch.full_like(
            input_ids[:, 0], input_ids.shape[1] - 1)
        if self.config.eos_token_id is None:
            return last
        is_eos = input_ids == self.config.eos_token_id
        if attention_mask is not None:  # a padding id equal to end-of-text is no end of text
            is_eos = is_eos & attention_mask.bool()
        return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), last)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, index: torch.Tensor
               ) -> tuple[torch.Tensor, PackedTokens | None]:
        """The token embeddings, packed (with their `PackedTokens`) to the real tokens and the pooled one when a row
        is padded (a row without any real token pools its first position); else the grid and None."""
        hidden_states = self.embeddings(input_ids)
        if attention_mask is None:
            return hidden_states, None
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        packing = PackedTokens.of(attention_mask.bool() | (positions[None] == index[:, None]))
        return (hidden_states, None) if packing is None else (packing.pack(hidden_states), packing)

    def forward_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(...).pooler_output` `(batch, width)`, with the last layer run for the pooled token only."""
        input_ids, attention_mask = self.truncate(input_ids, attention_mask)
        length = input_ids.shape[1]
        bias = self._attention_bias(attention_mask, length)
        index = self.pool_index(input_ids, attention_mask)
        hidden_states, packing = self._embed(input_ids, attention_mask, index)
        positions = torch.arange(length, device=input_ids.device)
        keys = positions[None] <= index[:, None] if self.config.causal else torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            keys = keys & attention_mask.bool()
        keys = keys | (positions[None] == index[:, None])  # the pooled row always sees itself, as in forward
        last_mask = None if bool(keys.all()) else keys[:, None, None, :]
        pooled = self.encoder.forward_pooled(hidden_states, index, last_mask, bias, self.config.causal, packing)
        return self.final_layer_norm(pooled)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        input_ids, attention_mask = self.truncate(input_ids, attention_mask)
        bias = self._attention_bias(attention_mask, input_ids.shape[1])
        index = self.pool_index(input_ids, attention_mask)
        hidden_states, packing = self._embed(input_ids, attention_mask, index)
        hidden_states, all_states = self.encoder(hidden_states, bias, self.config.causal, output_hidden_states,
                                                 packing)
        last_hidden_state = self.final_layer_norm(hidden_states)
        if packing is not None:  # padding positions come out as zeros
            last_hidden_state = packing.unpack(last_hidden_state)
            all_states = None if all_states is None else tuple(packing.unpack(s) for s in all_states)
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
        check_pixel_values(pixel_values, self.config)
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.encoder(hidden_states, None, False, output_hidden_states)

    def forward_head(self, last_hidden_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled CLS, patch tokens), both through the final LayerNorm."""
        normed = self.post_layernorm(last_hidden_state)
        return normed[:, 0], normed[:, 1:]

    def forward_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`forward(...).pooler_output` `(batch, width)`, with the last layer run for the CLS token only."""
        check_pixel_values(pixel_values, self.config)
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        cls = torch.zeros(hidden_states.shape[0], dtype=torch.long, device=hidden_states.device)
        return self.post_layernorm(self.encoder.forward_pooled(hidden_states, cls))

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> LightClipVisionModelOutput:
        last_hidden_state, all_states = self.forward_features(pixel_values, output_hidden_states)
        pooled, patches = self.forward_head(last_hidden_state)
        return LightClipVisionModelOutput(
            last_hidden_state=last_hidden_state, pooler_output=pooled, patch_tokens=patches, hidden_states=all_states
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
    # attention runs through `ALL_ATTENTION_FUNCTIONS`: "sdpa" by default, "eager" on request. The towers pass
    # boolean masks of shape (batch, 1, queries, keys) (a padded or pooled row always sees itself), which the flash
    # kernels, taking a padding mask per key only, cannot express.
    _supports_sdpa = True
    _supports_flash_attn = False
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
        # the towers are plain modules reading their own config: give them the implementation chosen for the model
        for tower_config in (config.text_config, config.vision_config):
            tower_config._attn_implementation = tower_config._attn_implementation or config._attn_implementation
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
        fused in place (`fuse()`). Inference is as fast without it: an eval-mode forward without autograd runs a fused
        copy of the CNN tower (`LightClipConvVisionTower.inference_tower`). `fuse=True` saves that copy's memory by
        dropping the unfused weights, for a model that will neither train nor be saved. The zero-shot pipeline passes
        it on: `pipeline(..., model_kwargs={"fuse": True})`."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if fuse:
            (loaded[0] if isinstance(loaded, tuple) else loaded).fuse()
        return loaded

    def fuse(self) -> "LightClipModel":
        """Reparameterise a CNN image tower for inference, in place, and return the model: BatchNorm folded into the
        convolutions, zero padding into the convolutions' own, activations in place
        (`LightClipConvVisionTower.fuse`). Embeddings stay equal to float rounding. An unfused model already runs a
        fused copy at inference (eval mode, autograd off); fusing in place only drops the unfused weights.
        `export_towers` exports a fused copy. Needs eval mode. A fused model refuses a training-mode forward and
        `save_pretrained()`: the checkpoint stays unfused, reload it for those. A ViT tower has nothing to fold."""
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
