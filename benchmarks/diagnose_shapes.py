#!/usr/bin/env python
"""Why does (or doesn't) a tower learn shape on lightclip-shapes? Six diagnostics, one script, one budget.

    python benchmarks/diagnose_shapes.py                         # everything, 600 steps at batch 64 (about 20 min)
    python benchmarks/diagnose_shapes.py --only supervised --steps 300

1. `supervised`: each image tower trained with cross-entropy on the shape label (can it learn shape at all from
   these pictures, in this budget?).
2. `contrastive`: a lightclip `clip` model and transformers' own `CLIPModel` with the same widths, depths, heads,
   patch and image size, the same tokenizer, batches, optimiser, schedule and steps, each trained by the same minimal
   loop, then the lightclip `convnet` tower in the same loop. Zero-shot shape and colour, retrieval R@1.
3. `probe`: a linear probe on the shape label of each contrastively trained image embedding (is shape in the
   features but not aligned to the text, or not in the features?).
4. `text`: how distinct the shape prompts' text embeddings are, zero-shot with caption-style prompts and with the true
   colour named, single-object against multi-object pictures.
5. `captions`: the `convnet` model trained contrastively on other captions of the same pictures: only the main
   object's shape ("a triangle"), its colour and shape ("a red triangle"), or half shape-only and half colour-only
   captions. Which words the captions carry decides whether the image tower learns shape.

All runs see identical data: the shapes train split decoded once at the tower's input size (bicubic, as the
evaluation transform; no augmentation), one of its three captions drawn per sample from a seeded generator, and the
same batches in the same order.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from _common import CLIPModelEncoders, clip_step
from PIL import Image
from torch import nn

from lightclip import LightClipConfig, LightClipModel, LightClipProcessor
from lightclip.evaluation import encode_texts, linear_probe, zero_shot_classifier
from lightclip.images import load_rgb_image
from lightclip.shapes import COLOURS, SHAPES, evaluate_shapes, make_shapes_dataset, shapes_zero_shot_tasks
from lightclip.trainer_utils import cosine_with_warmup, param_groups

VIT_PRESET, CNN_PRESET, LITE_PRESET = "lightclip-xxs", "lightclip-xxs-cnn", "lightclip-xxs-lite0"


class ShapesTensors:
    """A shapes split decoded once: normalised pixels, tokenised captions (all three per image) and labels."""

    def __init__(self, split: str, processor: LightClipProcessor, image_size: int, num_samples: int | None = None):
        self.dataset = make_shapes_dataset(split, num_samples=num_samples)
        images = [load_rgb_image(x).resize((image_size, image_size), Image.BICUBIC) for x in self.dataset["image"]]
        self.pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        captions = self.dataset["captions"]
        flat = [c for caps in captions for c in caps]
        tokens = processor(text=flat, padding=True, return_tensors="pt")
        self.num_captions = len(captions[0])
        self.input_ids = tokens["input_ids"].view(len(captions), self.num_captions, -1)
        self.attention_mask = tokens["attention_mask"].view(len(captions), self.num_captions, -1)
        self.shape = torch.tensor(self.dataset["shape"])
        self.colour = torch.tensor(self.dataset["colour"])

    def with_captions(self, captions: list[list[str]], processor: LightClipProcessor) -> "ShapesTensors":
        """A copy whose captions are replaced (the same number per image)."""
        other = copy.copy(self)
        tokens = processor(text=[c for caps in captions for c in caps], padding=True, return_tensors="pt")
        other.num_captions = len(captions[0])
        other.input_ids = tokens["input_ids"].view(len(captions), other.num_captions, -1)
        other.attention_mask = tokens["attention_mask"].view(len(captions), other.num_captions, -1)
        return other

    def batches(self, steps: int, batch_size: int, seed: int):
        """The same (indices, caption choice) sequence for every model: shuffled epochs, one random caption each."""
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        for _ in range(steps):
            if len(order) < batch_size:
                order += torch.randperm(len(self.shape), generator=generator).tolist()
            index, order = torch.tensor(order[:batch_size]), order[batch_size:]
            pick = torch.randint(self.num_captions, (batch_size,), generator=generator)
            ids, mask = self.input_ids[index, pick], self.attention_mask[index, pick]
            keep = int(mask.sum(-1).max())
            yield index, ids[:, :keep], mask[:, :keep]


def make_optimizer(model: nn.Module, args) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The pretrain.py defaults: AdamW (0.9, 0.98), eps 1e-6, weight decay 0.1 off norms and biases, 5 % warm-up."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, args.learning_rate), betas=(0.9, 0.98), eps=1e-6)
    return optimizer, cosine_with_warmup(optimizer, int(0.05 * args.steps), args.steps)


# --------------------------------------------------------------------------------------------------- 1. supervised


def hf_clip_vision(config: LightClipConfig) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    v = config.vision_config
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size))


def supervised(args, towers: dict[str, tuple[nn.Module, int]], data: dict[int, tuple]) -> dict:
    results = {}
    for name, (tower, size) in towers.items():
        train, test = data[size]
        torch.manual_seed(args.seed)
        head = nn.Linear(tower.config.hidden_size, len(SHAPES))
        model = nn.ModuleDict({"tower": tower, "head": head}).train()
        optimizer, scheduler = make_optimizer(model, args)
        start = time.perf_counter()
        for index, _, _ in train.batches(args.steps, args.batch_size, args.seed):
            loss = F.cross_entropy(head(tower(train.pixels[index]).pooler_output), train.shape[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            correct = (head(tower(test.pixels).pooler_output).argmax(-1) == test.shape).float()
        results[name] = {**_split_accuracy(correct, test), "final_train_loss": loss.item(),
                         "seconds": time.perf_counter() - start}
        print(f"supervised {name}: {_fmt(results[name])}", flush=True)
    return results


def _split_accuracy(correct: torch.Tensor, test: ShapesTensors) -> dict[str, float]:
    seen = torch.tensor(test.dataset["composition_seen"])
    single = torch.tensor(test.dataset["num_objects"]) == 1
    return {"acc1": correct.mean().item(), "acc1_seen": correct[seen].mean().item(),
            "acc1_unseen": correct[~seen].mean().item(), "acc1_single": correct[single].mean().item(),
            "acc1_multi": correct[~single].mean().item()}


def _fmt(values: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


# --------------------------------------------------------------------------------------------------- 2. contrastive


def HFClipAdapter(config: LightClipConfig) -> CLIPModelEncoders:
    """transformers `CLIPModel` of the same widths, depths, heads, image and patch size, vocabulary and context as
    `config`, behind the `encode_image` / `encode_text` helpers lightclip's evaluation calls."""
    from transformers import CLIPConfig, CLIPModel

    t, v = config.text_config, config.vision_config
    return CLIPModelEncoders(CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         max_position_embeddings=t.max_position_embeddings, pad_token_id=t.pad_token_id,
                         bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id),
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                           image_size=v.image_size, patch_size=v.patch_size),
        projection_dim=config.projection_dim)), config)


def contrastive(args, models: dict[str, nn.Module], data: dict[int, tuple], processor) -> dict:
    """The same minimal CLIP loop for every model; returns the shapes benchmark of each and keeps the models."""
    results = {}
    for name, model in models.items():
        size = _image_size(model)
        train, test = data[size]
        torch.manual_seed(args.seed)
        model.train()
        optimizer, scheduler = make_optimizer(model, args)
        start = time.perf_counter()
        for index, ids, mask in train.batches(args.steps, args.batch_size, args.seed):
            loss = clip_step(model, optimizer, scheduler, train.pixels[index], ids, mask)
        seconds = time.perf_counter() - start
        model.eval()
        bench = evaluate_shapes(model, _processor_for(processor, _config(model)), dataset=test.dataset)
        results[name] = {k.removeprefix("shapes/"): v for k, v in bench.items() if "acc1" in k or "recall@1" in k}
        results[name].update(final_train_loss=loss.item(), seconds=seconds)
        print(f"contrastive {name}: {_fmt(results[name])}", flush=True)
    return results


def _config(model: nn.Module) -> LightClipConfig:
    return model.lightclip_config if isinstance(model, CLIPModelEncoders) else model.config


def _image_size(model: nn.Module) -> int:
    return _config(model).vision_config.image_size


def _processor_for(processor: LightClipProcessor, config: LightClipConfig) -> LightClipProcessor:
    """The shared tokenizer with the image processor the tower expects (size and normalisation)."""
    from lightclip import LightClipImageProcessor

    return LightClipProcessor(LightClipImageProcessor.from_vision_config(config.vision_config), processor.tokenizer)


# --------------------------------------------------------------------------------------------------- 3 and 4


def probe(models: dict[str, nn.Module], data: dict[int, tuple]) -> dict:
    """Linear probes (shape, colour) on the frozen, L2-normalised image embeddings of each contrastive model."""
    results = {}
    for name, model in models.items():
        train, test = data[_image_size(model)]
        with torch.no_grad():
            fit, held = model.encode_image(train.pixels), model.encode_image(test.pixels)
        results[name] = {
            f"{label}_probe_acc1": linear_probe(fit, getattr(train, label), held, getattr(test, label))["acc1"]
            for label in ("shape", "colour")
        }
        print(f"probe {name}: {_fmt(results[name])}", flush=True)
    return results


def text_side(models: dict[str, nn.Module], data: dict[int, tuple], processor) -> dict:
    """Are the shape words distinct in the text space, and does the prompt wording matter?"""
    results = {}
    templates = shapes_zero_shot_tasks()["shape"]["templates"]
    for name, model in models.items():
        test = data[_image_size(model)][1]
        model.eval()
        with torch.no_grad():
            images = model.encode_image(test.pixels)
        prompts = encode_texts(model, processor, [f"a photo of a {s}." for s in SHAPES])
        cosine = prompts @ prompts.t()
        off_diagonal = (cosine.sum() - cosine.diagonal().sum()) / (len(SHAPES) * (len(SHAPES) - 1))
        entry = {"shape_prompt_mean_cosine": off_diagonal.item()}
        for key, wording in (("default_prompts", templates),
                             ("caption_style", ["a large {}", "a big {}", "a small {}"])):
            classifier = zero_shot_classifier(model, processor, list(SHAPES), wording)
            correct = ((images @ classifier.t()).argmax(-1) == test.shape).float()
            entry.update({f"{key}_{k}": v for k, v in _split_accuracy(correct, test).items()})
        # "a large <true colour> <shape>": the shape alone decides among prompts that match the colour
        named = torch.stack([encode_texts(model, processor, [f"a large {c} {s}" for s in SHAPES]) for c in COLOURS])
        correct = (torch.einsum("nd,nsd->ns", images, named[test.colour]).argmax(-1) == test.shape).float()
        entry.update({f"true_colour_named_{k}": v for k, v in _split_accuracy(correct, test).items()})
        results[name] = entry
        print(f"text {name}: {_fmt(entry)}", flush=True)
    return results


CAPTION_VARIANTS = {
    "shape only": ["a {s}", "a picture of a {s}"],
    "colour and shape": ["a {c} {s}", "a picture of a {c} {s}"],
    "shape only or colour only": ["a {s}", "a picture of a {s}", "a {c} shape", "something {c}"],
}


def caption_ablation(args, config: LightClipConfig, data: dict[int, tuple], processor) -> dict:
    """The same CNN model and loop, trained on captions that name only some attributes of the main object."""
    size = config.vision_config.image_size
    train, test = data[size]
    results = {}
    for name, templates in CAPTION_VARIANTS.items():
        captions = [[t.format(c=COLOURS[c], s=SHAPES[s]) for t in templates]
                    for c, s in zip(train.colour.tolist(), train.shape.tolist())]
        torch.manual_seed(args.seed)
        model = LightClipModel(config)
        trained = contrastive(args, {f"captions: {name}": model},
                              {size: (train.with_captions(captions, processor), test)}, processor)
        probed = probe({f"captions: {name}": model}, data)
        results[name] = {**trained[f"captions: {name}"], **probed[f"captions: {name}"]}
    return results


def imagenet_start(args, processor) -> dict:
    """EfficientNet-Lite0 at 64 px (`lightclip-xxs-lite0`): its frozen ImageNet features probed on shape and colour,
    then the same contrastive loop from the ImageNet weights and from random weights."""
    from lightclip.pretrained_towers import load_efficientnet_lite_imagenet

    config = LightClipConfig.from_preset(LITE_PRESET)
    size, sized = config.vision_config.image_size, _processor_for(processor, config)
    data = {size: (ShapesTensors("train", sized, size), ShapesTensors("test", sized, size))}
    models = {}
    for start in ("ImageNet", "random"):
        torch.manual_seed(args.seed)
        models[f"lightclip {LITE_PRESET}, {start} start"] = model = LightClipModel(config)
        if start == "ImageNet":
            load_efficientnet_lite_imagenet(model)
    train, test = data[size]
    tower = models[f"lightclip {LITE_PRESET}, ImageNet start"].vision_model.eval()
    with torch.no_grad():
        fit, held = (F.normalize(tower(x).pooler_output, dim=-1) for x in (train.pixels, test.pixels))
    results = {"ImageNet features (untrained)": {
        f"{label}_probe_acc1": linear_probe(fit, getattr(train, label), held, getattr(test, label))["acc1"]
        for label in ("shape", "colour")}}
    print(f"probe ImageNet features: {_fmt(results['ImageNet features (untrained)'])}", flush=True)
    trained = contrastive(args, models, data, processor)
    probed = probe(models, data)
    results.update({name: {**trained[name], **probed[name]} for name in models})
    return results


# --------------------------------------------------------------------------------------------------- main


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["supervised", "contrastive", "probe", "text", "captions", "imagenet"]
    parser.add_argument("--only", nargs="+", default=parts, choices=parts)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vit, cnn = LightClipConfig.from_preset(VIT_PRESET), LightClipConfig.from_preset(CNN_PRESET)
    processor = LightClipProcessor.from_preset(VIT_PRESET)  # the tokenizer every model shares
    data = {}
    for config in (vit, cnn):
        size = config.vision_config.image_size
        if size not in data:
            sized = _processor_for(processor, config)
            data[size] = (ShapesTensors("train", sized, size), ShapesTensors("test", sized, size))

    results: dict = {"args": vars(args)}
    if "supervised" in args.only:
        torch.manual_seed(args.seed)
        towers = {f"lightclip {VIT_PRESET} ViT": (LightClipModel(vit).vision_model, vit.vision_config.image_size),
                  "transformers CLIPVisionModel (same dims)": (hf_clip_vision(vit), vit.vision_config.image_size),
                  f"lightclip {CNN_PRESET} convnet": (LightClipModel(cnn).vision_model, cnn.vision_config.image_size)}
        results["supervised"] = supervised(args, towers, data)
    if {"contrastive", "probe", "text"} & set(args.only):
        torch.manual_seed(args.seed)
        models = {f"lightclip {VIT_PRESET}": LightClipModel(vit),
                  "transformers CLIPModel (same dims)": HFClipAdapter(vit),
                  f"lightclip {CNN_PRESET}": LightClipModel(cnn)}
        results["contrastive"] = contrastive(args, models, data, processor)
        if "probe" in args.only:
            results["probe"] = probe(models, data)
        if "text" in args.only:
            results["text"] = text_side(models, data, processor)
    if "captions" in args.only:
        results["captions"] = caption_ablation(args, cnn, data, processor)
    if "imagenet" in args.only:
        results["imagenet"] = imagenet_start(args, processor)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
