"""Training utilities shared by `examples/pretrain.py` and the tests: optimizer groups, schedules, atomic
checkpoints, the JSONL log and its plot. Training-only; never imported by the inference model."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .fileio import STAGING_DIR, disk_full, finish_interrupted_save, fsync_tree, save_into_folder, write_text_atomic
from .hub import REMOTE_CODE_FILES, REQUIRED_FILES
from .modeling_lightclip_convnet import freeze_batch_norm_2d

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


def param_groups(model: nn.Module, weight_decay: float, learning_rate: float,
                 image_tower_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups with no weight decay on norms, biases, embeddings' 1-D params and the logit scales (CLIP recipe).

    The image tower may learn at `image_tower_lr_scale` times the base rate, as a pre-trained tower is fine-tuned
    while the rest of the model learns from scratch; its projection learns at the base rate.
    """
    groups: dict[tuple[bool, bool], list] = {}
    tower = f"{'lightclip.' if hasattr(model, 'lightclip') else ''}vision_model."
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "logit_scale" in name or "class_embedding" in name
        groups.setdefault((no_decay, image_tower_lr_scale != 1.0 and name.startswith(tower)), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
         "lr": learning_rate * (image_tower_lr_scale if in_tower else 1.0)}
        for (no_decay, in_tower), params in sorted(groups.items())
    ]


def _locked_groups(groups: list[nn.Module], unlocked: int, what: str) -> list[nn.Module]:
    """All but the last `unlocked` of `groups` (input to output), checked."""
    if not 0 <= unlocked <= len(groups):
        raise ValueError(f"{what} must be in [0, {len(groups)}], got {unlocked}")
    return groups[:len(groups) - unlocked]


def _tower(model: nn.Module, name: str) -> nn.Module:
    """`vision_model` / `text_model` of a `LightClipModel` or of a `LightClipForPreTraining`."""
    return model.get_submodule(f"lightclip.{name}" if hasattr(model, "lightclip") else name)


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> int:
    """LiT / open_clip `--lock-image`: freeze the image tower's layer groups except the last `unlocked_groups`.

    The tower must list its groups (`backbone.groups()`, input to output: the native CNNs have it); the projection
    stays trainable. With `freeze_bn_stats` (open_clip's `freeze_batch_norm_2d`), the locked groups' BatchNorm
    layers become `LightClipFrozenBatchNorm2d`, whose scale, shift and statistics are buffers that keep the
    pre-trained values in any mode, and the tower's `train()` leaves those groups in eval mode (no drop-connect).
    The state dict keeps its keys and values, so a locked model saves a checkpoint that loads into a fresh
    `LightClipModel`. Without it, the locked groups' BatchNorm statistics follow the training batches.

    Returns the number of parameters frozen (with `freeze_bn_stats`, the BatchNorm scales and shifts, buffers from
    then on, are not among them).
    """
    vision = _tower(model, "vision_model")
    backbone = getattr(vision, "backbone", None)
    if not hasattr(backbone, "groups"):
        raise ValueError(f"locking needs an image tower that lists its layer groups (backbone 'efficientnet-lite' or "
                         f"'convnet'), not {vision.config.backbone!r}")
    locked = _locked_groups(backbone.groups(), unlocked_groups, "unlocked_groups")
    if freeze_bn_stats:
        for group in locked:
            freeze_batch_norm_2d(group)
        vision.frozen_groups = len(locked)
        vision.train(vision.training)
    frozen = 0
    for group in locked:
        for param in group.parameters():
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def lock_text_tower(model: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> int:
    """open_clip `--lock-text`: freeze the text tower's groups (token and position embeddings, each transformer layer,
    the final LayerNorm) except the last `unlocked_layers`; the projection stays trainable, as open_clip's HF text
    encoder leaves its projection. Without `freeze_layer_norm`, the LayerNorms of the locked groups keep training.
    Returns the number of frozen parameters.
    """
    text = _tower(model, "text_model")
    groups = [text.embeddings, *text.encoder.layers, text.final_layer_norm]
    frozen = 0
    for group in _locked_groups(groups, unlocked_layers, "unlocked_layers"):
        for module in group.modules():
            if isinstance(module, nn.LayerNorm) and not freeze_layer_norm:
                continue
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to `min_ratio` of the peak learning rate.

    Unlike transformers' `get_cosine_schedule_with_warmup`, whose first step runs at learning rate 0, the first
    warm-up step here already runs at `1 / warmup_steps` of the peak.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>` holding `trainer_state.json`), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`latest` -> newest complete checkpoint in `output_dir`; a path -> that path. Either must exist, as in
    transformers' `Trainer`: a resume that cannot resume refuses rather than train again from step 0."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: {output_dir} holds no complete checkpoint (checkpoint-<step> with "
                f"{STATE_FILE}; a run saves them with --checkpointing_steps). Nothing was changed. Pass "
                "--overwrite_output_dir instead to train again from step 0.")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete lightclip checkpoint (no {STATE_FILE})")
    return path


# what a training run writes into its output folder (besides the copy of its --config_file, named in
# train_config.json); --overwrite_output_dir removes these and nothing else (a feature bank or notes stay)
RUN_OUTPUTS = (
    *REQUIRED_FILES, *REMOTE_CODE_FILES, "model.safetensors.index.json", "generation_config.json",
    "preprocessor_config.json", "special_tokens_map.json", "eval_results.json", "train_config.json",
    "train_log.jsonl", "training_curves.png", STAGING_DIR,
)
RUN_OUTPUT_DIR_RE = re.compile(r"^\.?(tmp-)?checkpoint-\d+$")


def run_outputs(output_dir: str | os.PathLike) -> list[Path]:
    """The files and checkpoint folders an earlier training run left in `output_dir`."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    names = set(RUN_OUTPUTS)
    try:
        config_file = json.loads((root / "train_config.json").read_text()).get("config_file")
        if config_file:
            names.add(Path(config_file).name)
    except (OSError, ValueError):
        pass
    return sorted(p for p in root.iterdir() if p.name in names or (p.is_dir() and RUN_OUTPUT_DIR_RE.match(p.name)))


def prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool = False, resume: bool = False,
                       clear: bool = True) -> Path:
    """Make `output_dir` ready for a run. A folder holding an earlier run is refused unless the run resumes it or
    `overwrite` is set; overwriting removes only the earlier run's outputs (`run_outputs`). With `clear=False`
    only the check runs (every process of a distributed run checks; one clears)."""
    root = Path(output_dir)
    if clear:
        finish_interrupted_save(root)
    previous = [] if resume else run_outputs(root)
    if previous and not overwrite:
        shown = ", ".join(p.name for p in previous[:4]) + (", ..." if len(previous) > 4 else "")
        found = list_checkpoints(root)
        resume_hint = (f"Pass --resume_from_checkpoint latest to continue it from {found[-1].name}, "
                       if found else "It holds no checkpoint to resume from. Pass ")
        raise FileExistsError(
            f"{root} already holds a training run ({shown}). {resume_hint}--overwrite_output_dir to replace it (only "
            "the run's own files are removed), or choose another --output_dir."
        )
    if clear:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        root.mkdir(parents=True, exist_ok=True)
    return root


def save_failure(what: str, error: BaseException, root: str | os.PathLike, kept: str) -> OSError:
    """The error a failed save raises: why (a full disk said as such), what was kept, and the last good checkpoint."""
    root = Path(root)
    reason = "no space left on device" if disk_full(error, root) else f"{type(error).__name__}: {error}"
    found = list_checkpoints(root)
    last = (f"the last good checkpoint is {found[-1]} (--resume_from_checkpoint latest)" if found
            else "the run has no checkpoint (--checkpointing_steps saves some)")
    return OSError(f"{what} failed: {reason}. {kept}; {last}.")


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: dict, keep: int | None = None,
                    process_state: dict | None = None) -> Path:
    """`accelerator.save_state` into a temporary folder, then an atomic rename: a run killed while saving never
    leaves a corrupt `checkpoint-<step>`. Each process adds its `process_state` as JSON (`process_state_<rank>.json`),
    so that nothing a resume reads needs unpickling. Older checkpoints beyond `keep` are removed."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        write_text_atomic(tmp / process_state_file(accelerator.process_index), json.dumps(process_state or {}))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except (OSError, RuntimeError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_failure(f"saving {final.name}", error, root, "the run stopped; its earlier checkpoints are kept"
                           ) from error
    if accelerator.is_main_process and keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def process_state_file(rank: int) -> str:
    return f"process_state_{rank}.json"


def load_process_state(checkpoint: str | os.PathLike, rank: int) -> dict:
    """What `save_checkpoint` stored for this process. A checkpoint holding pickled custom state (Accelerate's
    `custom_checkpoint_<i>.pkl`, which it loads with `weights_only=False`) is refused: loading it could run code."""
    checkpoint = Path(checkpoint)
    pickled = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise ValueError(f"{checkpoint} holds pickled state ({', '.join(pickled)}), which a resume never loads: it "
                         "was not written by this version of lightclip. Resume from a checkpoint this version wrote, "
                         "or pass --overwrite_output_dir to train again.")
    path = checkpoint / process_state_file(rank)
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint} has no {path.name}: not a complete lightclip checkpoint for this "
                                "number of processes")
    return json.loads(path.read_text())


def save_model_folder(output_dir: str | os.PathLike, save, what: str = "saving the final model") -> None:
    """`save(folder)` (the model's and processor's `save_pretrained`) into a staging folder inside `output_dir`, then
    renamed over the folder's files (`lightclip.fileio.save_into_folder`). A full disk or any other failure leaves
    the folder as it was and raises an error that says why and names the last good checkpoint."""
    try:
        save_into_folder(output_dir, save)
    except (OSError, RuntimeError) as error:
        raise save_failure(f"{what} into {output_dir}", error, output_dir,
                           "the folder keeps its previous contents") from error


class JsonlLog:
    """Append-only `train_log.jsonl`; one JSON object a line (a resumed run appends)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            record = {"time": round(time.time(), 3), **record}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return [record for _, record in _log_lines(self.path)]


def _log_lines(path: Path) -> list[tuple[str, dict]]:
    """The readable records of a JSONL log with their lines; a line that is not JSON (a write torn by a kill or a
    full disk) is dropped with a warning."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line, json.loads(line)))
        except ValueError:
            logger.warning("%s line %d is not a JSON record (a torn write?): dropped", path, number)
    return records


def truncate_log(path: str | os.PathLike, step: int) -> None:
    """Drop records after `step` (a resumed run re-logs them), and unreadable lines."""
    path = Path(path)
    if path.exists():
        keep = [line for line, record in _log_lines(path) if record.get("step", 0) <= step]
        write_text_atomic(path, "".join(line + "\n" for line in keep))


def plot_log(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Loss curves (every `*_loss` key) and eval metrics (`eval/*` acc1 and recall@1) over steps, as one PNG; a log
    that a resumed run continues may hold older key names, which are read as the current ones."""
    import matplotlib

    from .evaluation import rename_legacy_keys

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [rename_legacy_keys(record) for record in JsonlLog(log_path).read()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    loss_keys = sorted({k for r in train for k in r if k.endswith("loss")})
    for key in loss_keys:
        pts = [(r["step"], r[key]) for r in train if key in r]
        axes[0].plot(*zip(*pts), label=key, linewidth=1.2 if key == "loss" else 0.8)
    axes[0].set(xlabel="step", ylabel="loss", title="training losses", yscale="log")
    metric_keys = sorted({k for r in evals for k in r if k.startswith("eval/") and ("acc1" in k or "recall@1" in k)})
    for key in metric_keys:
        pts = [(r["step"], r[key]) for r in evals if key in r]
        axes[1].plot(*zip(*pts), marker="o", label=key.removeprefix("eval/"))
    axes[1].set(xlabel="step", ylabel="metric", title="evaluation", ylim=(0, 1))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


__all__ = ["param_groups", "lock_image_tower", "lock_text_tower", "cosine_with_warmup", "save_checkpoint",
           "resolve_checkpoint", "list_checkpoints", "JsonlLog", "truncate_log", "plot_log"]


def run_environment(repo: str | os.PathLike | None = None) -> dict:
    """Where a run ran, for its results row: the code's git commit (with "+changes" when the work tree differs from
    it), the CPU or GPU model, the torch version and the date (UTC)."""
    import platform
    import subprocess

    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        commit += "+changes" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                device = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        device = f"{device}, {os.cpu_count()} cores"
    return {"commit": commit, "device": device, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
