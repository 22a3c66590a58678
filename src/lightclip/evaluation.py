"""Evaluation of lightclip dual encoders: zero-shot classification, image-text retrieval and linear probes.

The protocol (docs/evaluation.md) uses the metric names of CLIP_benchmark:

- **Zero-shot classification.** Each class is represented by the mean of the L2-normalised text embeddings of its
  prompts (one per template), renormalised (prompt ensembling, as in CLIP); `templates="openai"` is CLIP's ensemble
  of 80 ImageNet prompts. `acc1`, `acc5` (top-1 / top-5 accuracy) and `mean_per_class_recall` (top-1 recall averaged
  over the classes).
- **Retrieval.** `image_retrieval_recall@k` is text -> image: a caption scores a hit when its own image is among its
  k most similar images. `text_retrieval_recall@k` is image -> text: an image scores a hit when *any* of its
  captions is among its k most similar captions.
- **Linear probe.** Multinomial logistic regression (L-BFGS, in torch) on frozen image features; the L2 penalty is
  chosen on a validation split carved from the training set, then the probe is refitted on the whole training set.
  `acc1`.

Result files that spell these names `top<k>` (`top1`, `top1_unseen`, `val_top1`) load under the current names
(`load_results`).

Ties are resolved pessimistically everywhere: a target counts as ranked within the top k only when fewer than k
competitors score *greater than or equal to* it. A degenerate model that gives every candidate the same score
therefore scores 0 (and not, by accident of sort order, 1).

The first half of the module holds pure metric functions on embeddings (numpy arrays or tensors, no model): they
compute the similarities in torch and score them with the package's `evaluate` metric modules (`lightclip/metrics`,
loaded offline by `load_metric`). The second half holds runners that encode a `datasets.Dataset` in batches under
`torch.no_grad()`.

Example:

```python
>>> import torch
>>> from lightclip.evaluation import retrieval_metrics
>>> embeds = torch.eye(3)
>>> retrieval_metrics(embeds, embeds, torch.tensor([0, 1, 2]), ks=(1,))
{'image_retrieval_recall@1': 1.0, 'text_retrieval_recall@1': 1.0}
```
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .fileio import write_text_atomic
from .images import load_rgb_image

__all__ = [
    "DEFAULT_TEMPLATES",
    "OPENAI_IMAGENET_TEMPLATES",
    "TEMPLATE_SETS",
    "as_map_dataset",
    "encode_images",
    "encode_texts",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "format_results",
    "grouped_zero_shot",
    "linear_probe",
    "load_metric",
    "load_results",
    "rename_legacy_keys",
    "resolve_templates",
    "retrieval_from_image_embeds",
    "retrieval_metrics",
    "save_results",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]

# CLIP's 80 ImageNet prompts, in their published order: the ensemble ImageNet-style zero-shot results are reported
# with. Copied from openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb (the same strings as open_clip's
# OPENAI_IMAGENET_TEMPLATES in src/open_clip/zero_shot_metadata.py).
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)

# A short generic ensemble (15 of the 80 above and the bare "a {}."): cheap to encode, for class names without
# task-specific prompts.
DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "art of the {}.",
    "itap of a {}.",
    "a {}.",
]

# Template sets a task may name instead of listing its prompts, e.g. `templates="openai"` for ImageNet-style prompts.
TEMPLATE_SETS: dict[str, Sequence[str]] = {"default": DEFAULT_TEMPLATES, "openai": OPENAI_IMAGENET_TEMPLATES}

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# Training-feature elements up to which the linear probe runs on one thread.
_SINGLE_THREAD_PROBE_SIZE = 2**20

# Similarity rows computed and handed to the retrieval metric at once, so no full copy of the matrix is made in torch.
_SCORE_ROWS = 1024

# The `evaluate` metric modules the metrics below are computed with (package files, loaded offline).
METRICS_DIR = Path(__file__).parent / "metrics"


# ----------------------------------------------------------------------------------------------------------------
# Metrics on embeddings
# ----------------------------------------------------------------------------------------------------------------


def _as_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor view of a tensor, numpy array or sequence (detached)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    else:
        x = torch.as_tensor(np.asarray(x))
    return x.to(dtype) if dtype is not None else x


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    """The `evaluate` metric module `lightclip/metrics/<name>.py` ("zero_shot_accuracy", "retrieval_recall"), loaded
    offline from the installed file once per process and reused; its inputs stay in memory (no cache file, no lock).
    """
    import evaluate

    return evaluate.load(str(METRICS_DIR / f"{name}.py"), keep_in_memory=True)


def zero_shot_accuracy(
    image_embeds: Any, classifier: Any, labels: Any, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Zero-shot classification scores by cosine similarity (the `zero_shot_accuracy` metric module), named as
    CLIP_benchmark names them.

    Args:
        image_embeds: `(N, D)` image embeddings (normalised here; the ranking does not depend on it).
        classifier: `(C, D)` class embeddings, e.g. from `zero_shot_classifier`.
        labels: `(N,)` integer class indices.
        topk: the k values to report. A k is reported only when `C >= k`, so `acc5` is absent for fewer than 5
            classes.

    Returns:
        `{"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}` as fractions in [0, 1]: top-k accuracy, and the
        top-1 recall of each class present in `labels`, averaged. Ties count against the true class (see module doc).
    """
    image_embeds = F.normalize(_as_tensor(image_embeds, torch.float32), dim=-1)
    classifier = F.normalize(_as_tensor(classifier, torch.float32), dim=-1)
    labels = _as_tensor(labels, torch.long)
    if image_embeds.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} image embeddings but {labels.shape[0]} labels")
    if image_embeds.shape[0] == 0:
        raise ValueError("zero_shot_accuracy needs at least one image")
    scores = (image_embeds @ classifier.T).numpy()
    return load_metric("zero_shot_accuracy").compute(predictions=scores, references=labels.numpy(), topk=tuple(topk))


def retrieval_metrics(
    image_embeds: Any, text_embeds: Any, text_to_image: Any, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for text -> image and image -> text retrieval by cosine similarity (the `retrieval_recall` metric
    module).

    Args:
        image_embeds: `(N_images, D)`.
        text_embeds: `(N_texts, D)`; several captions may belong to one image.
        text_to_image: `(N_texts,)` long tensor, `text_to_image[j]` is the index of the image of caption `j`.
        ks: the k values.

    Returns:
        `image_retrieval_recall@k` (text -> image, averaged over captions: a hit when the caption's own image is in
        its top k) and `text_retrieval_recall@k` (image -> text, averaged over images that have at least one caption:
        a hit when any of the image's captions is in its top k). Ties count against the target.
    """
    image_embeds = F.normalize(_as_tensor(image_embeds, torch.float32), dim=-1)
    text_embeds = F.normalize(_as_tensor(text_embeds, torch.float32), dim=-1)
    text_to_image = _as_tensor(text_to_image, torch.long)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {tuple(text_to_image.shape)}")
    if num_texts == 0 or num_images == 0:
        raise ValueError("retrieval_metrics needs at least one image and one caption")
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image holds indices outside [0, {num_images})")
    metric = load_metric("retrieval_recall")
    for start in range(0, num_texts, _SCORE_ROWS):
        scores = text_embeds[start : start + _SCORE_ROWS] @ image_embeds.T
        metric.add_batch(predictions=scores.numpy(), references=text_to_image[start : start + _SCORE_ROWS].numpy())
    return metric.compute(ks=tuple(ks))


def _fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights `(D, C)` and bias `(C,)` minimising mean cross-entropy + `weight_decay * ||W||^2` with L-BFGS."""
    weight = torch.zeros(features.shape[1], num_classes, dtype=features.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-6, tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


class _Standardizer:
    """Per-feature standardisation with statistics from the fitting set (keeps L-BFGS well conditioned)."""

    def __init__(self, features: torch.Tensor):
        self.mean = features.mean(0)
        self.std = features.std(0, unbiased=False).clamp_min(1e-8)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


def _probe_acc1(fit_x, fit_y, eval_x, eval_y, num_classes: int, weight_decay: float, max_iter: int) -> float:
    scale = _Standardizer(fit_x)
    weight, bias = _fit_logistic_regression(scale(fit_x), fit_y, num_classes, weight_decay, max_iter)
    predictions = (scale(eval_x) @ weight + bias).argmax(1)
    return (predictions == eval_y).double().mean().item()


def linear_probe(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    val_fraction: float = 0.2,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    seed: int = 0,
    max_iter: int = 100,
) -> dict[str, float]:
    """Logistic-regression probe on frozen features, regularisation chosen on a validation split.

    Features are standardised with training statistics. The probe minimises mean cross-entropy plus
    `weight_decay * ||W||^2` (the bias is not penalised; this equals scikit-learn's `C = 1 / (2 * n * weight_decay)`)
    with full-batch L-BFGS in float64. `val_fraction` of the training set (a seeded random split) scores each
    weight decay; the best one (the largest among equals) is refitted on the whole training set and scored on the test
    set. With a single weight decay, or a training set too small to split, no selection is run.

    Returns:
        `{"acc1": test accuracy, "weight_decay": chosen value, "val_acc1": its validation accuracy (NaN when no
        selection ran)}`.
    """
    train_x = _as_tensor(train_features, torch.float64)
    test_x = _as_tensor(test_features, torch.float64)
    train_y = _as_tensor(train_labels, torch.long)
    test_y = _as_tensor(test_labels, torch.long)
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if len(weight_decays) == 0:
        raise ValueError("weight_decays must not be empty")
    num_classes = int(max(train_y.max(), test_y.max())) + 1

    # L-BFGS on a small problem is thousands of tiny ops: one thread avoids sync overhead (10x faster on a busy CPU)
    threads = torch.get_num_threads()
    if train_x.numel() <= _SINGLE_THREAD_PROBE_SIZE:
        torch.set_num_threads(1)
    try:
        num_val = int(round(val_fraction * train_x.shape[0]))
        best_decay, best_val = float(weight_decays[0]), math.nan
        if len(weight_decays) > 1 and 0 < num_val < train_x.shape[0]:
            order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed))
            val_idx, fit_idx = order[:num_val], order[num_val:]
            for decay in sorted(weight_decays):
                acc1 = _probe_acc1(
                    train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx], num_classes, decay,
                    max_iter,
                )
                if math.isnan(best_val) or acc1 >= best_val:
                    best_decay, best_val = float(decay), acc1
        acc1 = _probe_acc1(train_x, train_y, test_x, test_y, num_classes, best_decay, max_iter)
    finally:
        torch.set_num_threads(threads)
    return {"acc1": acc1, "weight_decay": best_decay, "val_acc1": best_val}


# ----------------------------------------------------------------------------------------------------------------
# Encoding with a model
# ----------------------------------------------------------------------------------------------------------------


class _EvalMode:
    """Puts a model in eval mode and `torch.no_grad()`, restoring its training flag on exit (safe mid-training)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        # per-module flags: a frozen submodule kept in eval mode inside a training model stays so
        modules = self.model.modules() if hasattr(self.model, "modules") else []
        self.modes = [(module, module.training) for module in modules]
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return self

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        for module, training in self.modes:
            module.training = training
        return False


def _model_device(model, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def encode_texts(
    model, processor, texts: Sequence[str], *, batch_size: int = 256, device=None, progress: bool = False,
    desc: str = "Encoding texts",
) -> torch.Tensor:
    """L2-normalised text embeddings `(len(texts), D)` on CPU, float32.

    Texts are batched in order of length (less padding), and the embeddings returned in the input order.
    """
    device = _model_device(model, device)
    texts = list(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    with _EvalMode(model):
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
            batch_texts = [texts[i] for i in order[start : start + batch_size]]
            batch = processor(text=batch_texts, padding=True, truncation=True, return_tensors="pt")
            attention_mask = batch.get("attention_mask")
            embeds = model.encode_text(
                batch["input_ids"].to(device),
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                normalize=True,
            )
            chunks.append(F.normalize(embeds.float(), dim=-1).cpu())
    if not chunks:
        raise ValueError("no texts to encode")
    embeds = torch.empty_like(torch.cat(chunks))
    embeds[torch.tensor(order)] = torch.cat(chunks)
    return embeds


def encode_images(
    model, processor, dataset, *, image_column: str = "image", batch_size: int = 64, device=None,
    normalize: bool = True, progress: bool = True, desc: str = "Encoding images",
) -> torch.Tensor:
    """Image embeddings `(len(dataset), D)` on CPU, float32, through `processor(images=...)` and `model.encode_image`.

    `dataset` is a `datasets.Dataset` (or anything whose `[start:end]` slice maps `image_column` to a list).
    """
    device = _model_device(model, device)
    images_only = dataset.select_columns([image_column]) if hasattr(dataset, "select_columns") else dataset
    chunks = []
    with _EvalMode(model):
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, disable=not progress, leave=False):
            images = [load_rgb_image(image) for image in images_only[start : start + batch_size][image_column]]
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            embeds = model.encode_image(pixel_values, normalize=normalize)
            chunks.append(embeds.float().cpu())
    if not chunks:
        raise ValueError("no images to encode")
    return torch.cat(chunks)


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """The prompt templates a task asks for: a list as given, or a `TEMPLATE_SETS` name ("openai", "default").

    A bare string is always a set name, so that a single template passed by mistake is refused rather than split
    into one-character prompts.
    """
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}: pass one of {sorted(TEMPLATE_SETS)} or a list")
        return list(TEMPLATE_SETS[templates])
    return list(templates)


def zero_shot_classifier(
    model, processor, classnames: Sequence[str], templates: str | Sequence[str], batch_size: int = 256, device=None
) -> torch.Tensor:
    """Zero-shot class embeddings `(C, D)` by prompt ensembling (docs/evaluation.md).

    `templates` is a list or a `TEMPLATE_SETS` name (`"openai"`: CLIP's 80 ImageNet prompts). Each template is
    formatted with the class name (`"a photo of a {}."`, or `"{c}"` placeholders), the prompts are encoded and
    L2-normalised, averaged per class, and the mean is renormalised.
    """
    templates = resolve_templates(templates)
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    prompts = [_format_template(template, name) for name in classnames for template in templates]
    embeds = encode_texts(model, processor, prompts, batch_size=batch_size, device=device)
    return F.normalize(embeds.view(len(classnames), len(templates), -1).mean(1), dim=-1)


def _format_template(template: str, classname: str) -> str:
    return template.replace("{c}", classname) if "{c}" in template else template.format(classname)


# ----------------------------------------------------------------------------------------------------------------
# Runners on datasets
# ----------------------------------------------------------------------------------------------------------------


def as_map_dataset(dataset):
    """A streamed `datasets.IterableDataset` (tar shards, `streaming=True`) read into a `Dataset`; others unchanged."""
    try:
        from datasets import Dataset, IterableDataset
    except ImportError:
        return dataset
    if isinstance(dataset, IterableDataset):
        return Dataset.from_list(list(dataset), features=dataset.features)
    return dataset


def _group_name(value) -> str:
    """Key suffix of a group value; booleans read as "seen" / "unseen" (the `composition_seen` convention)."""
    if isinstance(value, (bool, np.bool_)):
        return "seen" if value else "unseen"
    return str(value)


def grouped_zero_shot(
    image_embeds: torch.Tensor, classifier: torch.Tensor, labels: Sequence[int], groups: Sequence | None
) -> dict[str, float]:
    """`zero_shot_accuracy`, plus `acc1_<group>` and `num_images_<group>` per value of `groups` (if given)."""
    results = zero_shot_accuracy(image_embeds, classifier, labels)
    if groups is not None:
        labels = torch.as_tensor(labels)
        for value in sorted(set(groups), key=str):
            mask = torch.tensor([g == value for g in groups])
            results[f"acc1_{_group_name(value)}"] = zero_shot_accuracy(
                image_embeds[mask], classifier, labels[mask], topk=(1,)
            )["acc1"]
            results[f"num_images_{_group_name(value)}"] = int(mask.sum())
    results["num_images"] = len(labels)
    return results


def evaluate_zero_shot(
    model, processor, dataset, classnames: Sequence[str], templates: str | Sequence[str], label_column: str, *,
    image_column: str = "image", batch_size: int = 64, group_column: str | None = None, progress: bool = True,
) -> dict[str, float]:
    """Zero-shot `acc1`, `acc5` and `mean_per_class_recall` on `dataset`, whose `label_column` holds class indices
    into `classnames`; `templates` is a list or a `TEMPLATE_SETS` name (`"openai"` for ImageNet-style prompts).

    With `group_column`, also reports `acc1_<group>` and `num_images_<group>` per value of that column (booleans read
    as "seen"/"unseen").
    """
    dataset = as_map_dataset(dataset)
    classifier = zero_shot_classifier(model, processor, classnames, templates)
    image_embeds = encode_images(
        model, processor, dataset, image_column=image_column, batch_size=batch_size, progress=progress
    )
    groups = dataset[group_column] if group_column is not None else None
    return grouped_zero_shot(image_embeds, classifier, dataset[label_column], groups)


def _flatten_captions(captions_per_image: Sequence) -> tuple[list[str], torch.Tensor]:
    texts, owners = [], []
    for image_index, captions in enumerate(captions_per_image):
        captions = [captions] if isinstance(captions, str) else list(captions)
        texts.extend(captions)
        owners.extend([image_index] * len(captions))
    return texts, torch.tensor(owners, dtype=torch.long)


def evaluate_retrieval(
    model, processor, dataset, *, image_column: str = "image", caption_column: str = "captions",
    batch_size: int = 64, ks: Sequence[int] = (1, 5, 10), progress: bool = True,
) -> dict[str, float]:
    """Retrieval recall@k in both directions; `caption_column` holds a caption or a list of captions per image."""
    dataset = as_map_dataset(dataset)
    image_embeds = encode_images(
        model, processor, dataset, image_column=image_column, batch_size=batch_size, progress=progress
    )
    return retrieval_from_image_embeds(model, processor, image_embeds, dataset[caption_column], ks)


def retrieval_from_image_embeds(model, processor, image_embeds, captions_per_image, ks) -> dict[str, float]:
    """Retrieval recall@k against already encoded images (the captions are encoded here)."""
    texts, text_to_image = _flatten_captions(captions_per_image)
    text_embeds = encode_texts(model, processor, texts)
    results = retrieval_metrics(image_embeds, text_embeds, text_to_image, ks=ks)
    results.update(num_images=image_embeds.shape[0], num_texts=len(texts))
    return results


def evaluate_linear_probe(
    model, processor, train_dataset, test_dataset, label_column: str, *, image_column: str = "image",
    batch_size: int = 64, val_fraction: float = 0.2, weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    seed: int = 0, progress: bool = True,
) -> dict[str, float]:
    """Linear probe on frozen image features: `model.encode_image(..., normalize=False)`, i.e. the projected embedding
    before L2 normalisation (standardised inside `linear_probe`)."""
    train_dataset, test_dataset = as_map_dataset(train_dataset), as_map_dataset(test_dataset)
    features = [
        encode_images(
            model, processor, dataset, image_column=image_column, batch_size=batch_size, normalize=False,
            progress=progress,
        )
        for dataset in (train_dataset, test_dataset)
    ]
    results = linear_probe(
        features[0], train_dataset[label_column], features[1], test_dataset[label_column],
        val_fraction=val_fraction, weight_decays=weight_decays, seed=seed,
    )
    results.update(num_train=len(train_dataset), num_test=len(test_dataset))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Results files
# ----------------------------------------------------------------------------------------------------------------


def _jsonable(value, digits: int):
    if isinstance(value, dict):
        return {str(k): _jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, digits) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return _jsonable(value.tolist(), digits)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None  # JSON has no NaN / Infinity
        return float(f"{value:.{digits}g}") if value != 0 else 0.0
    return value


def format_results(results: dict, digits: int = 6) -> str:
    """`results` as JSON text: sorted keys, indented, floats to `digits` significant digits, NaN / inf as null."""
    return json.dumps(_jsonable(results, digits), indent=2, sort_keys=True)


def save_results(results: dict, path: str | os.PathLike, digits: int = 6) -> None:
    """Write `format_results(results, digits)` to `path` (atomically), creating its folder."""
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, format_results(results, digits) + "\n")


# An accuracy key as files written before the CLIP_benchmark names spelled it: `top1`, `top5`, `top1_unseen` (grouped
# zero-shot) and `val_top1` (linear probe), possibly after a prefix such as `eval/shapes/shape/`.
_LEGACY_ACCURACY_KEY = re.compile(r"(?P<prefix>^|/)(?P<val>val_)?top(?P<k>\d+)(?P<group>_[^/]*)?$")


def rename_legacy_keys(results: dict) -> dict:
    """`results` under the current metric names, nested dicts included: `top<k>` becomes `acc<k>`
    (`shapes/shape/top1_unseen` -> `shapes/shape/acc1_unseen`, `val_top1` -> `val_acc1`), so an old results file or
    training log reads like a new one. Where both spellings are present the current key is kept."""
    renamed = {}
    for key, value in results.items():
        if isinstance(value, dict):
            value = rename_legacy_keys(value)
        current = _LEGACY_ACCURACY_KEY.sub(r"\g<prefix>\g<val>acc\g<k>\g<group>", key)
        if current == key or current not in results:
            renamed[current] = value
    return renamed


def load_results(path: str | os.PathLike) -> dict:
    """Read a file written by `save_results`, with the accuracy keys of older files under their current names."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    return rename_legacy_keys(results) if isinstance(results, dict) else results
