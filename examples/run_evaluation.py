#!/usr/bin/env python
"""Evaluate a lightclip model: a built-in benchmark (shapes, Open Clip Art), zero-shot classification, retrieval or a
linear probe.

Examples:

    # the built-in synthetic benchmark (no data needed)
    python examples/run_evaluation.py --model runs/xxs/final --output results/shapes.json

    # the Open Clip Art benchmark (after `apt-get install -y openclipart-png openclipart-svg`): zero-shot categories
    # and sub-folders, retrieval, linear probe; CLIP_benchmark names under openclipart/
    python examples/run_evaluation.py --model runs/xxs/final --data openclipart --output results/openclipart.json

    # zero-shot on an image folder (class names from the sub-folder names, generic templates)
    python examples/run_evaluation.py --model runs/xxs/final --task zero_shot --data path/to/imagefolder --split test

    # the same with CLIP's 80 ImageNet prompt templates, for ImageNet-style classes
    python examples/run_evaluation.py --model runs/xxs/final --task zero_shot --data path/to/imagefolder --split test \
        --templates openai

    # retrieval on anything lightclip.data reads: image folder with metadata.jsonl, csv/json, tar shards, hub
    python examples/run_evaluation.py --model runs/xxs/final --task retrieval --data path/to/captions --split train

    # linear probe: train on --train_split, test on --split
    python examples/run_evaluation.py --model runs/xxs/final --task linear_probe --data shapes --label_column shape

Results are printed and, with --output, written as JSON: {"model", "task", "data", "split", "metrics": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import HfArgumentParser


def option(help_text: str, default: Any = None) -> Any:
    """A dataclass field whose help text `HfArgumentParser` shows for its flag."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class ModelArguments:
    """The model to evaluate and where it runs."""

    model: str = field(metadata={"help": "saved lightclip model folder or hub id"})
    batch_size: int = 64
    device: str | None = option("default: cuda when available, else cpu")


@dataclass
class EvaluationArguments:
    """The task, its data and where the results go."""

    task: Literal["benchmark", "zero_shot", "retrieval", "linear_probe", "shapes"] = option(
        "benchmark: the built-in benchmark of --data (shapes, openclipart); shapes: --task benchmark --data shapes",
        "benchmark")
    data: str = option("'shapes', 'openclipart' (or its folder), an imagefolder path, or a hub dataset name",
                       "shapes")
    split: str = option("evaluation split (the test split for linear_probe)", "test")
    train_split: str = option("linear_probe: split the probe is trained on", "train")
    classnames_json: str | None = option('JSON file with "classnames" and "templates" (zero_shot)')
    templates: str | None = option(
        "zero_shot: prompt template set, 'openai' (CLIP's 80 ImageNet prompts) or 'default' (short generic); "
        "default: the task's own templates, else 'default'")
    label_column: str | None = option(
        "class-index column (default: 'label'; 'shape' for shapes, 'category' for openclipart)")
    group_column: str | None = option("zero_shot: also report acc1 per value of this column")
    image_column: str | None = option("default 'image' (retrieval: detected by lightclip.data)")
    caption_column: str | None = option("retrieval: caption column(s), default detected by lightclip.data")
    num_samples: int | None = option("shapes only: number of rendered images per split")
    output: str | None = option("write the results JSON here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every option of the argument dataclasses, as one namespace (the runners read across both groups)."""
    parser = HfArgumentParser((ModelArguments, EvaluationArguments), description=__doc__.split("\n")[0])
    return parser.parse_args(argv)


def load_eval_dataset(data: str, split: str, num_samples: int | None = None):
    """`shapes` renders the synthetic split; `openclipart` (or its folder) reads the collection; another folder loads
    as `imagefolder`; anything else goes to `load_dataset`."""
    from lightclip.openclipart import is_openclipart_source

    if data == "shapes":
        from lightclip.shapes import make_shapes_dataset

        return make_shapes_dataset(split=split, num_samples=num_samples)
    if is_openclipart_source(data):
        from lightclip.openclipart import load_openclipart

        return load_openclipart(split, data)
    from datasets import load_dataset

    if os.path.isdir(data):
        return load_dataset("imagefolder", data_dir=data, split=split)
    return load_dataset(data, split=split)


def load_retrieval_dataset(args: argparse.Namespace):
    """Any source `lightclip.data` reads (shapes, imagefolder with metadata, csv/json, tar shards, hub), with columns
    standardised to "image" and "captions" (a list per image); the runners read streamed sources into memory."""
    from lightclip.data import load_image_text_dataset

    return load_image_text_dataset(
        args.data, args.split, image_column=args.image_column, caption_column=args.caption_column,
        shapes_size=args.num_samples,
    )


def zero_shot_prompts(args: argparse.Namespace, dataset, label_column: str) -> tuple[list[str], list[str]]:
    """Class names from --classnames_json, the shapes task, or the label column's ClassLabel names. Templates from
    --templates when given, else the task's own (the JSON's "templates", a list or a set name such as "openai"; the
    shapes task's, which are not ImageNet-style), else the short default set."""
    from lightclip.evaluation import resolve_templates
    from lightclip.openclipart import is_openclipart_source, openclipart_zero_shot_tasks

    if args.classnames_json:
        with open(args.classnames_json, encoding="utf-8") as f:
            spec = json.load(f)
        classnames, templates = list(spec["classnames"]), spec.get("templates")
    elif args.data == "shapes":
        from lightclip.shapes import shapes_zero_shot_tasks

        task = shapes_zero_shot_tasks()[label_column]
        classnames, templates = task["classnames"], task["templates"]
    elif label_column in ("category", "subcategory") and is_openclipart_source(args.data):
        task = openclipart_zero_shot_tasks(dataset)[label_column]
        classnames, templates = task["classnames"], task["templates"]
    else:
        names = getattr(dataset.features[label_column], "names", None)
        if not names:
            raise ValueError(f"column {label_column!r} is not a ClassLabel: pass --classnames_json")
        classnames, templates = [name.replace("_", " ") for name in names], None
    return classnames, resolve_templates(args.templates or templates or "default")


def run(args: argparse.Namespace) -> dict:
    import torch

    from lightclip import LightClipModel, LightClipProcessor, evaluation
    from lightclip.data import builtin_benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LightClipModel.from_pretrained(args.model).to(device).eval()
    processor = LightClipProcessor.from_pretrained(args.model)
    benchmark = builtin_benchmark("shapes" if args.task == "shapes" else args.data)
    label_column = args.label_column or (benchmark.DEFAULT_LABEL_COLUMN if benchmark else "label")
    common = dict(image_column=args.image_column or "image", batch_size=args.batch_size)

    if args.task in ("benchmark", "shapes"):
        if benchmark is None:
            raise ValueError(f"--data {args.data!r} has no built-in benchmark (shapes, openclipart): pass --task "
                             "zero_shot, retrieval or linear_probe")
        dataset = load_eval_dataset("shapes" if args.task == "shapes" else args.data, "test", args.num_samples)
        return benchmark.evaluate_benchmark(model, processor, dataset=dataset, batch_size=args.batch_size)
    if args.task == "retrieval":
        dataset = load_retrieval_dataset(args)
        return evaluation.evaluate_retrieval(model, processor, dataset, batch_size=args.batch_size)
    dataset = load_eval_dataset(args.data, args.split, args.num_samples)
    if args.task == "zero_shot":
        classnames, templates = zero_shot_prompts(args, dataset, label_column)
        group_column = args.group_column or ("composition_seen" if args.data == "shapes" else None)
        return evaluation.evaluate_zero_shot(
            model, processor, dataset, classnames, templates, label_column, group_column=group_column, **common
        )
    train_dataset = load_eval_dataset(args.data, args.train_split, args.num_samples)
    return evaluation.evaluate_linear_probe(model, processor, train_dataset, dataset, label_column, **common)


def main(argv=None) -> dict:
    args = parse_args(argv)
    metrics = run(args)
    results = {
        "model": args.model, "task": args.task, "data": args.data,
        "split": "test" if args.task in ("benchmark", "shapes") else args.split, "metrics": metrics,
    }
    from lightclip.evaluation import format_results, save_results

    if args.output:
        save_results(results, args.output)
    print(format_results(results))
    return results


if __name__ == "__main__":
    main()
