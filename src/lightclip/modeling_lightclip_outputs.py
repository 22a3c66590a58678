"""What the lightclip towers and `LightClipModel` return, and the input check every image tower runs.

Both image towers (the ViT in `modeling_lightclip.py`, the CNNs in `modeling_lightclip_convnet.py`) build these, so
they live apart from either; like those two files, this one is copied next to a checkpoint for `trust_remote_code`.
"""

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_lightclip import LightClipVisionConfig


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


def check_pixel_values(pixel_values: torch.Tensor, config: LightClipVisionConfig) -> None:
    """Refuse a batch of the wrong shape with a message that names the fix, before a layer fails on it obscurely."""
    expected = (config.num_channels, config.image_size, config.image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values must have shape (batch, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}. "
            "Preprocess images with LightClipProcessor / LightClipImageProcessor, which converts RGBA, grayscale and "
            "16-bit images and resizes them to the model's image_size."
        )


__all__ = ["LightClipOutput", "LightClipVisionModelOutput", "check_pixel_values"]
