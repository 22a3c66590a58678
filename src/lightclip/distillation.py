"""A frozen CLIP teacher for distillation (`kd`, `fd`; docs/distillation.md), online or precomputed.

- `DistillationTeacher` loads any dual encoder transformers can load (`CLIPModel`, `SiglipModel`, a lightclip
  checkpoint) with its own processor, and embeds the student's batch: the same augmented crops, taken back from the
  student's normalisation into the teacher's size and normalisation in torch, and the same captions through the
  teacher's tokenizer.
- `build_teacher_embeddings` runs it once over the training data on the evaluation view and stores one fp16 image and
  text embedding per sample in a fingerprinted table folder (`lightclip.tables`, as a feature bank);
  `TeacherEmbeddingStore.lookup` reads them back by the batch's dataset indices, so a step costs a lookup instead of
  a teacher forward.

Training-only: neither `import lightclip` nor the inference model imports this module.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tables import (
    ImageTextTables,
    check_built_from,
    dataset_identity,
    gather_rows,
    load_safetensors,
    read_folder_metadata,
    read_matching_metadata,
    renormalize_fp16_,
    write_table_folder,
)

if TYPE_CHECKING:
    from .configuration_lightclip import LightClipPretrainingConfig

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "teacher_embeddings.safetensors"
METADATA_FILE = "teacher.json"
VIEW = "resize + centre crop at the student's image size, first non-empty caption"

# `from_pretrained` options that say where the files come from, for the model and the processor alike
_HUB_OPTIONS = ("local_files_only", "revision", "cache_dir", "token", "subfolder")

# PIL resampling filters (the image processors' `resample`) as torch interpolation modes
_TORCH_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}

__all__ = ["DistillationTeacher", "TeacherEmbeddingStore", "build_teacher_embeddings"]


def _size_field(size: Any, key: str) -> int | None:
    """One field of an image processor's `size` / `crop_size` (a `SizeDict` or a plain dict)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


def _square_side(size: Any) -> int | None:
    """The side of a square `size` ({"height", "width"} or {"shortest_edge"}); None when it is not one."""
    height, width = _size_field(size, "height"), _size_field(size, "width")
    if height is not None and height == width:
        return int(height)
    edge = _size_field(size, "shortest_edge")
    return None if edge is None else int(edge)


def pixel_affine(image_processor) -> tuple[Tensor, Tensor]:
    """(a, b), each (3,), with pixel_values = a * x + b for x the 8-bit RGB value: what an image processor's rescale
    and normalisation do, so a batch can move from one processor's normalisation to another's."""
    scale = float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", True) else 1.0
    if getattr(image_processor, "do_normalize", True):
        mean = torch.as_tensor(image_processor.image_mean, dtype=torch.float64).expand(3)
        std = torch.as_tensor(image_processor.image_std, dtype=torch.float64).expand(3)
    else:
        mean, std = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    return scale / std, -mean / std


def weights_fingerprint(model: nn.Module, samples: int = 64) -> str:
    """sha256 over every state tensor's name, shape, dtype and `samples` evenly strided values: tells two teachers
    apart without reading all their weights, and gives the same answer on any device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples].float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()


def _pooled(output: Any) -> Tensor:
    """`get_image_features` / `get_text_features` return a tensor (transformers < 5) or an output whose
    `pooler_output` holds the projected embedding."""
    return output if isinstance(output, Tensor) else output.pooler_output


class DistillationTeacher:
    """A frozen dual encoder that embeds the student's batches (docs/distillation.md).

    Deliberately not an `nn.Module`: held by an objective or a trainer, it never becomes a submodule, so its weights
    are never trained, wrapped by DDP, saved with the student or put in a training checkpoint. The model stays in
    eval mode with `requires_grad=False`, and every call runs under `torch.no_grad()`.

    Args:
        model: a transformers model with `get_image_features`, `get_text_features` and `logit_scale`.
        processor: its processor (an image processor and a tokenizer).
        student_image_processor: the image processor that produced the student's `pixel_values` (its rescale and
            normalisation are undone before the teacher's are applied).
        name: what the teacher is called in a store's metadata (the hub id or folder).

    A `TargetSource` of `lightclip.objectives`: the trainer reads each batch's `teacher_targets` through
    `batch_targets`.
    """

    target_key = "teacher_targets"

    def __init__(self, model: nn.Module, processor, student_image_processor, name: str = "teacher"):
        for method in ("get_image_features", "get_text_features"):
            if not callable(getattr(model, method, None)):
                raise ValueError(f"teacher {name!r} ({type(model).__name__}) has no {method}: a dual encoder "
                                 "(CLIPModel, SiglipModel, a lightclip checkpoint) is needed")
        if getattr(model, "logit_scale", None) is None:
            raise ValueError(f"teacher {name!r} ({type(model).__name__}) has no logit_scale")
        self.model = model.eval().requires_grad_(False)
        self.processor, self.name = processor, name
        self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        # (1, 3, 1, 1) float32 affine maps from 8-bit values to each side's pixel_values
        self._student_affine = tuple(t.float().view(1, 3, 1, 1) for t in pixel_affine(student_image_processor))
        self._teacher_affine = tuple(t.float().view(1, 3, 1, 1) for t in pixel_affine(self.image_processor))
        self.resize_side = _square_side(self.image_processor.size)
        crop = getattr(self.image_processor, "crop_size", None)
        self.crop_side = _square_side(crop) if getattr(self.image_processor, "do_center_crop", False) else None
        if self.resize_side is None:
            raise ValueError(f"teacher {name!r}: cannot read a square input size from its image processor's size "
                             f"{self.image_processor.size!r}")
        self.resample = _TORCH_MODES.get(int(getattr(self.image_processor, "resample", 3)), "bicubic")
        text_config = getattr(model.config, "text_config", None)
        self.max_length = getattr(text_config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        # SigLIP was trained on text padded to its full length
        self.text_padding = "max_length" if getattr(model.config, "model_type", "") == "siglip" else True

    @classmethod
    def from_pretrained(cls, path_or_id: str, student_image_processor, device: str | torch.device | None = None,
                        **from_pretrained_kwargs) -> "DistillationTeacher":
        """`AutoModel` + `AutoProcessor` from a folder or hub id; a lightclip checkpoint loads through the Auto
        registration that importing the package (and so this module) did. `from_pretrained_kwargs` go to
        `AutoModel.from_pretrained` (e.g. `dtype=torch.bfloat16`); its hub options go to the processor too."""
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(path_or_id, **from_pretrained_kwargs)
        hub = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_OPTIONS}
        processor = AutoProcessor.from_pretrained(path_or_id, **hub)
        teacher = cls(model, processor, student_image_processor, name=str(path_or_id))
        return teacher.to(device) if device is not None else teacher

    def to(self, device: str | torch.device) -> "DistillationTeacher":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def logit_scale(self) -> Tensor:
        """The teacher's exponentiated logit scale, float32 (clamped as the model does when it says how)."""
        scale_exp = getattr(self.model, "logit_scale_exp", None)
        scale = scale_exp() if callable(scale_exp) else self.model.logit_scale.exp()
        return scale.detach().float()

    @functools.cached_property
    def image_dim(self) -> int:
        """Width of the teacher's embeddings, image and text alike (as `TeacherEmbeddingStore.image_dim`): read from
        one caption's embedding, since CLIP, SigLIP and lightclip configs each name it differently."""
        return self.embed_texts(["a photo"]).shape[1]

    def metadata(self) -> dict:
        """What identifies the teacher in a store: its name, model type and a fingerprint of its weights."""
        return {"spec": self.name, "model_type": getattr(self.model.config, "model_type", None),
                "weights": weights_fingerprint(self.model)}

    def teacher_pixels(self, pixel_values: Tensor) -> Tensor:
        """The student's `pixel_values` (B, 3, H, W) as the teacher's processor would have made them from the same
        crops: back to 8-bit values, resized (antialiased, like PIL) and centre-cropped to the teacher's input,
        normalised the teacher's way."""
        device = self.device
        (a_s, b_s), (a_t, b_t) = ([t.to(device) for t in pair] for pair in (self._student_affine, self._teacher_affine))
        x = (pixel_values.to(device, torch.float32) - b_s) / a_s
        if x.shape[-2:] != (self.resize_side, self.resize_side):
            x = F.interpolate(x, size=(self.resize_side, self.resize_side), mode=self.resample,
                              antialias=self.resample != "nearest", align_corners=None if self.resample == "nearest"
                              else False).clamp(0.0, 255.0)
        if self.crop_side is not None and self.crop_side < self.resize_side:
            top = (self.resize_side - self.crop_side) // 2
            x = x[..., top:top + self.crop_side, top:top + self.crop_side]
        return (x * a_t + b_t).to(self.dtype)

    @torch.no_grad()
    def embed_images(self, pixel_values: Tensor) -> Tensor:
        """(B, D) L2-normalised float32 image embeddings of the student's `pixel_values`."""
        features = _pooled(self.model.get_image_features(pixel_values=self.teacher_pixels(pixel_values)))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """(B, D) L2-normalised float32 text embeddings of the raw captions, tokenised the teacher's way."""
        tokens = self.tokenizer(list(texts), padding=self.text_padding, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        inputs = {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask") if k in tokens}
        return F.normalize(_pooled(self.model.get_text_features(**inputs)).float(), dim=-1)

    def embed(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(image embeddings (B, D), text embeddings (B, D), logit scale ()) of a student batch, on the teacher's
        device. The batch needs `pixel_values` and the raw captions under `texts` (`ImageTextCollator(...,
        return_raw=True)`)."""
        if "texts" not in batch:
            raise KeyError("the teacher reads the raw captions under batch['texts']: build the collator with "
                           "ImageTextCollator(..., return_raw=True)")
        pixel_values, texts = batch["pixel_values"], list(batch["texts"])
        if len(texts) != len(pixel_values):
            raise ValueError(f"batch has {len(pixel_values)} images but {len(texts)} captions")
        if not texts:
            empty = torch.zeros(0, 0, device=self.device)
            return empty, empty.clone(), self.logit_scale
        return self.embed_images(pixel_values), self.embed_texts(texts), self.logit_scale

    def batch_targets(self, batch: Mapping[str, Any], settings: LightClipPretrainingConfig | None = None,
                      device: str | torch.device | None = None) -> dict[str, Tensor]:
        """`embed` of a collated batch, as `teacher_targets` on `device` (default: the teacher's)."""
        image, text, scale = self.embed(batch)
        return _teacher_targets(image, text, scale, device)

    def __repr__(self) -> str:
        return (f"DistillationTeacher(name={self.name!r}, model={type(self.model).__name__}, "
                f"input={self.crop_side or self.resize_side}px, device={self.device})")


class TeacherEmbeddingStore(ImageTextTables):
    """Precomputed teacher embeddings, one fp16 image and text row per dataset index, memory-mapped.

    A folder written by `build_teacher_embeddings`: `teacher_embeddings.safetensors` (`image` (N, D), `text` (N, D),
    L2-normalised fp16; `present` (N,) uint8, 0 for the samples the collator skipped) and `teacher.json` (format
    version, N, the dataset fingerprint, the teacher and its embedding widths, the view, the teacher's logit scale).
    A `TargetSource` of `lightclip.objectives`, as `DistillationTeacher`.
    """

    target_key = "teacher_targets"

    def __init__(self, image_features: Tensor, text_features: Tensor, present: Tensor, metadata: dict,
                 path: str | None = None):
        if not len(image_features) == len(text_features) == len(present):
            raise ValueError("store tensors must all have N rows")
        self.image_features, self.text_features, self.present = image_features, text_features, present.bool()
        self.metadata, self.path = metadata, path

    @classmethod
    def load(cls, path: str, mmap: bool = True) -> "TeacherEmbeddingStore":
        """Open a store folder; with `mmap=True` rows are read from disk on first lookup."""
        metadata = read_folder_metadata(path, METADATA_FILE, FORMAT_VERSION, "teacher embedding store",
                                        "examples/precompute_teacher.py")
        tensors = load_safetensors(os.path.join(path, EMBEDDINGS_FILE), mmap)
        return cls(tensors["image"], tensors["text"], tensors["present"], metadata, path)

    @property
    def logit_scale(self) -> Tensor:
        """The teacher's exponentiated logit scale when the store was built, float32."""
        return torch.tensor(float(self.metadata["logit_scale"]))

    def check_dataset(self, dataset, rebuild: str = "Rebuild it with examples/precompute_teacher.py --overwrite on "
                                                    "this data, or choose another folder.") -> None:
        """Raise `ValueError` unless `dataset` is the one the store was built from (N and fingerprint, one pass over
        its rows): rows of other data would be distilled towards another sample's embeddings."""
        check_built_from(self.metadata, dataset_identity(dataset, 0), self.path, "teacher embedding store", rebuild)

    def lookup(self, sample_index: Tensor | Sequence[int], device: str | torch.device | None = None
               ) -> tuple[Tensor, Tensor]:
        """(image embeddings (B, D), text embeddings (B, D)), float32, L2-normalised, for a batch's dataset
        indices, on `device` (default: the device of `sample_index`)."""
        if device is None:
            device = sample_index.device if isinstance(sample_index, Tensor) else "cpu"
        rows = torch.as_tensor(sample_index, dtype=torch.long).cpu().reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"dataset indices {rows.min()}..{rows.max()} outside the store's 0..{len(self) - 1}")
        missing = rows[~self.present[rows]]
        if len(missing):
            raise ValueError(f"no teacher embedding for dataset row(s) {missing[:5].tolist()}: the store skipped them "
                             "(unreadable image or empty caption) when it was built")
        image = F.normalize(gather_rows(self.image_features, rows), dim=-1)
        text = F.normalize(gather_rows(self.text_features, rows), dim=-1)
        return image.to(device), text.to(device)

    def batch_targets(self, batch: Mapping[str, Any], settings: LightClipPretrainingConfig | None = None,
                      device: str | torch.device | None = None) -> dict[str, Tensor]:
        """`lookup` of a collated batch's `index`, with the stored logit scale, as `teacher_targets`."""
        image, text = self.lookup(batch["index"], device=device)
        return _teacher_targets(image, text, self.logit_scale, device)

    def __repr__(self) -> str:
        teacher = self.metadata.get("teacher", {})
        return (f"TeacherEmbeddingStore(n={len(self)}, image_dim={self.image_dim}, text_dim={self.text_dim}, "
                f"teacher={teacher.get('spec')!r}, path={self.path!r})")


def _teacher_targets(image: Tensor, text: Tensor, logit_scale: Tensor, device: str | torch.device | None
                     ) -> dict[str, Tensor]:
    """The `teacher_targets` the distillation objectives read (`DistillationObjective.TARGET_KEYS`)."""
    return {key: value.to(device) if device is not None else value
            for key, value in (("image_embeds", image), ("text_embeds", text), ("logit_scale", logit_scale))}


def build_teacher_embeddings(
    dataset,
    teacher: DistillationTeacher,
    processor,
    out_dir: str,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TeacherEmbeddingStore:
    """Run `teacher` once over `dataset` on the evaluation view and store the embeddings in `out_dir`.

    The batches are the student's evaluation batches (`ImageTextCollator(processor, train=False)`: resize + centre
    crop at the student's image size, the first non-empty caption) and go through `teacher.embed`, exactly as the
    online teacher embeds a training batch, so both agree on an un-augmented batch. An existing store is reused when
    the dataset (N and fingerprint), the teacher (name, type, weights) and the view match; a mismatch raises
    `ValueError` naming it unless `overwrite=True`. The folder is written whole (`write_table_folder`): of two
    builders of one store, the second to finish reads the first's.

    Args:
        dataset: standardised rows (`image`, `captions`, `index` covering 0..N-1), map-style or streamed (a streamed
            dataset is read twice: once for the fingerprint).
        processor: the student's processor (the view and which captions the collator skips follow it).
    """
    from tqdm.auto import tqdm

    from .collate import ImageTextCollator, SkipCounter

    image_size = _square_side(processor.image_processor.crop_size)
    expected = {**dataset_identity(dataset, 0), "teacher": teacher.metadata(),
                "view": {"image_size": image_size, "transform": VIEW}}
    n = expected["n"]
    meta_path = os.path.join(out_dir, METADATA_FILE)
    existed = os.path.isfile(meta_path)
    if not overwrite and read_matching_metadata(meta_path, expected, FORMAT_VERSION, "teacher embedding store"):
        return TeacherEmbeddingStore.load(out_dir)
    collator = ImageTextCollator(processor, train=False, image_size=image_size, return_raw=True,
                                 return_skip_counts=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    image = text = None
    present = torch.zeros(n, dtype=torch.uint8)
    skips = SkipCounter()
    bar = tqdm(total=n, desc="teacher embeddings", unit="pair", disable=not show_progress)
    for batch in loader:
        rows, counts = batch["index"], batch.pop("skip_counts")
        skips.merge(counts)
        bar.update(len(rows) + SkipCounter().merge(counts).num_skipped)
        if not len(rows):
            continue
        if rows.min() < 0 or rows.max() >= n:
            raise ValueError(f"dataset 'index' values must lie in [0, {n}), got {rows.min()}..{rows.max()}")
        image_embeds, text_embeds, _ = teacher.embed(batch)
        if image is None:
            image = torch.zeros(n, image_embeds.shape[1], dtype=torch.float16)
            text = torch.zeros(n, text_embeds.shape[1], dtype=torch.float16)
        image[rows], text[rows] = image_embeds.cpu().half(), text_embeds.cpu().half()
        present[rows] = 1
    bar.close()
    if image is None:
        raise ValueError("no sample of the dataset could be read: nothing to store")
    tensors = {"image": renormalize_fp16_(image), "text": renormalize_fp16_(text), "present": present}
    metadata = {
        "format_version": FORMAT_VERSION,
        **expected,
        "dims": {"image": image.shape[1], "text": text.shape[1]},
        "logit_scale": float(teacher.logit_scale),
        "present": int(present.sum()),
        "skipped": skips.summary(),
        "fingerprint_method": "sha256(N, captions[0], image path or sha256(image bytes)) per row",
        "embeddings": {"dtype": "float16", "normalized": True},
    }
    if not write_table_folder(out_dir, {EMBEDDINGS_FILE: tensors}, METADATA_FILE, metadata, replace=existed):
        # another builder finished this store first: use it if it was built from the same data and teacher
        read_matching_metadata(meta_path, expected, FORMAT_VERSION, "teacher embedding store")
    return TeacherEmbeddingStore.load(out_dir)
