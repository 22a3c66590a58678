#!/usr/bin/env python
"""Precompute a distillation teacher's image and text embeddings of every training pair, once.

Reads the same data arguments as the training script, so row i of the store is the training example whose `index`
is i. The teacher sees the evaluation view (resize + centre crop at the student's image size, the first caption),
through the same code path as the online teacher. Example:

    python examples/precompute_teacher.py --train_data "shards/train-{00000..00999}.tar" --model lightclip-xs \\
        --distill_model openai/clip-vit-base-patch32 --output_dir banks/cc3m-clip-b32 --device cuda

Then train with `examples/pretrain.py --objectives clip,kd --distill_embeddings banks/cc3m-clip-b32` (see
docs/distillation.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from lightclip.data import DataArguments


@dataclass
class PrecomputeArguments:
    """The teacher, the student whose view it sees, and where the embeddings go."""

    distill_model: str = field(metadata={
        "help": "The teacher: a dual encoder folder or hub id (CLIPModel, SiglipModel, a lightclip checkpoint)."})
    output_dir: str = field(metadata={"help": "The folder of the precomputed embeddings."})
    model: str = field(default="lightclip-lite0-56px", metadata={
        "help": "The student (a preset name, or a checkpoint folder with its processor): its image size and "
                "processor define the view the teacher sees."})
    image_size: int | None = field(default=None, metadata={"help": "Override the student's image size."})
    batch_size: int = field(default=64, metadata={"help": "Teacher batch size."})
    device: str | None = field(default=None, metadata={"help": "Teacher device, e.g. cuda. Default: CPU."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "Teacher weights' precision (embeddings are stored in fp16 either way)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Rebuild embeddings that were computed for another dataset, teacher or view."})
    seed: int = field(default=0, metadata={"help": "Seed of the shapes generator."})


def student_processor(model: str, image_size: int | None = None):
    """The student's processor: a preset's, or the one saved in a checkpoint folder; `image_size` overrides its
    input size as `pretrain.py --image_size` does."""
    import lightclip
    from lightclip import LightClipImageProcessor, LightClipProcessor

    processor = (LightClipProcessor.from_preset(model) if model in lightclip.list_presets()
                 else LightClipProcessor.from_pretrained(model))
    if image_size:
        processor.image_processor = LightClipImageProcessor(
            image_size=image_size, image_mean=processor.image_processor.image_mean,
            image_std=processor.image_processor.image_std)
    return processor


def main(argv=None):
    """Parse the data and precompute arguments, build (or reuse) the store, print a summary; returns the store."""
    args = HfArgumentParser((DataArguments, PrecomputeArguments),
                            description=__doc__.split("\n\n")[0]).parse_args(argv)
    import torch

    from lightclip.data import load_datasets_from_args
    from lightclip.distillation import DistillationTeacher, build_teacher_embeddings

    train, _ = load_datasets_from_args(args, seed=args.seed)
    processor = student_processor(args.model, args.image_size)
    teacher = DistillationTeacher.from_pretrained(args.distill_model, processor.image_processor, device=args.device,
                                                  dtype=getattr(torch, args.dtype))
    start = time.perf_counter()
    store = build_teacher_embeddings(train, teacher, processor, args.output_dir, batch_size=args.batch_size,
                                     num_workers=args.dataloader_num_workers, overwrite=args.overwrite)
    summary = {"embeddings": args.output_dir, "n": len(store), "present": store.metadata["present"],
               "skipped": store.metadata["skipped"], "image_dim": store.image_dim, "text_dim": store.text_dim,
               "teacher_logit_scale": round(float(store.logit_scale), 4),
               "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(summary))
    print(f"train with: examples/pretrain.py --objectives clip,kd --distill_embeddings {args.output_dir}")
    return store


if __name__ == "__main__":
    main()
