"""Shared helpers of the lightclip benchmarks: arguments, machine description, timing, inputs, reference models.

Every script measures the variants it compares in ONE process, with the same threads, interleaved round by round
(variant A, variant B, A, B, ...) after a warmup, and reports the median of the rounds, so slow drift of the machine
hits all variants alike. Ratios are the numbers to quote; absolute numbers depend on the machine printed with them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch


def parser(description: str, quick_help: str = "") -> argparse.ArgumentParser:
    """The arguments every benchmark takes; scripts add their own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: nproc)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per variant before timing")
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast (mainly for --device cuda)")
    p.add_argument("--quick", action="store_true", help="fewer rounds / smaller settings. " + quick_help)
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args: argparse.Namespace, default_repeats: int = 7, quick_repeats: int = 3) -> torch.device:
    """Apply threads and seed; fill in `args.repeats`; return the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = quick_repeats if args.quick else default_repeats
    if args.quick:
        args.warmup = min(args.warmup, 1)
    torch.manual_seed(args.seed)
    args.load_at_start = os.getloadavg()[0]
    if device_is_cpu(args) and args.load_at_start > os.cpu_count() and torch.get_num_threads() > 1:
        print(f"warning: load average {args.load_at_start:.1f} on {os.cpu_count()} cores. Multi-threaded timings "
              "swing 10x or more when other processes hold the cores (every OpenMP barrier waits for a descheduled "
              "thread); --threads 1 gives steadier ratios.", file=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch.cuda.is_available() is False")
    return device


def device_is_cpu(args: argparse.Namespace) -> bool:
    return torch.device(args.device).type == "cpu"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(args: argparse.Namespace) -> str:
    """A markdown block: machine, library versions, threads, device and the exact command."""
    import transformers

    lines = [
        f"- CPU: {cpu_model()}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- device: {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + (", bf16 autocast" if args.bf16 else ", fp32"),
        f"- 1-min load average: {getattr(args, 'load_at_start', float('nan')):.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end"
        " (above the thread count means other processes shared the cores)",
        f"- rounds: warmup {args.warmup}, median of {args.repeats} (variants interleaved)",
        "- command: `" + command_line() + "`",
    ]
    return "\n".join(lines)


# environment variables that change the timings, written in front of the command when set
TIMING_ENVIRONMENT = ("OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def command_line() -> str:
    """The command as anyone can run it from the repository root: `python benchmarks/<script>.py ...`, with neither
    the interpreter's path nor the machine's path to the script, after the `TIMING_ENVIRONMENT` variables set."""
    script = os.path.abspath(sys.argv[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.relpath(script, root) if script.startswith(root + os.sep) else os.path.basename(script)
    environment = [f"{k}={os.environ[k]}" for k in TIMING_ENVIRONMENT if k in os.environ]
    return " ".join(shlex.quote(a) for a in [*environment, "python", script, *sys.argv[1:]])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args: argparse.Namespace, device: torch.device):
    """bf16 autocast when `--bf16`, else a no-op context."""
    if args.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Timings(dict):
    """`name -> [seconds of each round]`, from `time_interleaved`."""

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def ratio(self, name: str, reference: str) -> float:
        """Median over rounds of `time(name) / time(reference)` taken in the same round: under a shared, drifting
        machine this paired estimate is steadier than a ratio of medians."""
        return statistics.median(a / b for a, b in zip(self[name], self[reference]))


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
                     ) -> Timings:
    """Wall time (s) of each callable per round, timed round-robin: every round runs every variant once, in
    alternating order (forward, then reversed), so a load that rises or falls during a round favours no variant."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = Timings({name: [] for name in fns})
    order = list(fns.items())
    for round_index in range(repeats):
        for name, fn in (order if round_index % 2 == 0 else order[::-1]):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's `convolution_backward` formula with the weight gradient of a grouped convolution divided by its groups:
    torch counts it as if the convolution were dense, `groups` times too many (a depthwise layer's backward came out
    65x its forward at 64 channels)."""
    from torch.utils.flop_counter import conv_backward_flop

    def count(mask: list[bool]) -> int:  # the unwrapped formula takes shapes, as this one does
        return conv_backward_flop.__wrapped__(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation,
                                              transposed, output_padding, groups, mask, out_shape, **kwargs)

    grad_input = count([output_mask[0], False, False])
    return grad_input + (count([False, True, False]) // groups if output_mask[1] else 0)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, as `torch.utils.flop_counter.FlopCounterMode` counts them (matmuls, convs, attention),
    with grouped convolutions' backward counted right (`_conv_backward_flop`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}
                         ) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------------
# inputs and the transformers reference model


def lightclip_config(preset: str, image_size: int | None = None, **overrides):
    """A preset's `LightClipConfig`, optionally at another image size (ViT towers)."""
    from lightclip import LightClipConfig

    if image_size is not None:
        overrides["vision_config"] = {"image_size": image_size}
    return LightClipConfig.from_preset(preset, **overrides)


def make_batch(config, batch_size: int, device: torch.device, seed: int = 0, length: int | None = None,
               captions: str = "random") -> dict[str, torch.Tensor]:
    """Random images and texts on `device`. `captions="random"`: `[bos, words..., eos]` of `length` tokens (default:
    the full context; attention mask all ones). `captions="openclipart"`: one caption of each of `batch_size` random
    Open Clip Art training drawings, tokenised by the preset's tokenizer and padded to the longest, as the training
    collator pads them."""
    g = torch.Generator().manual_seed(seed)
    text, vision = config.text_config, config.vision_config
    if captions == "openclipart":
        ids, mask = openclipart_tokens(config, batch_size, seed)
    elif captions == "random":
        length = length or text.max_position_embeddings
        ids = torch.randint(10, text.vocab_size, (batch_size, length), generator=g)
        ids[:, 0] = text.bos_token_id
        ids[:, -1] = text.eos_token_id
        mask = torch.ones_like(ids)
    else:
        raise ValueError(f"captions must be 'random' or 'openclipart', got {captions!r}")
    size = vision.image_size
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "pixel_values": torch.randn(batch_size, vision.num_channels, size, size, generator=g).to(device),
    }


def openclipart_tokens(config, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of one random caption of each of `batch_size` random Open Clip Art training
    drawings (the library must be installed; see `lightclip.openclipart`)."""
    from lightclip import LightClipProcessor
    from lightclip.collate import pad_token_ids
    from lightclip.openclipart import load_openclipart

    captions = load_openclipart("train", progress=False)["captions"]
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(captions), size=batch_size, replace=len(captions) < batch_size)
    chosen = [captions[r][rng.integers(len(captions[r]))] for r in rows]
    tokenizer = LightClipProcessor.from_config(config).tokenizer
    ids = tokenizer(chosen, truncation=True, max_length=config.text_config.max_position_embeddings)["input_ids"]
    return pad_token_ids(ids, config.text_config.pad_token_id)


def describe_text(attention_mask: torch.Tensor, captions: str) -> str:
    """One line on a batch's captions: their real lengths and how much of the padded grid they fill."""
    lengths = attention_mask.sum(-1).float()
    if captions == "random":
        return f"{attention_mask.shape[1]}-token random captions, no padding"
    return (f"{captions} captions, real length median {lengths.median():.0f} tokens (p90 "
            f"{lengths.quantile(0.9):.0f}), padded to {attention_mask.shape[1]}: "
            f"{float(lengths.sum() / attention_mask.numel()):.0%} of the grid is real tokens")


def cpu_runtime_folder(device: torch.device, runtime: str) -> str | None:
    """A fresh temporary folder for an exported model to run in the CPU runtime `runtime` (a module name), or None
    (that backend is skipped) off the CPU or when the runtime is not installed."""
    if device.type != "cpu":
        return None
    try:
        importlib.import_module(runtime)
    except ImportError:
        return None
    return tempfile.mkdtemp(prefix=f"lightclip-{runtime.partition('.')[0]}-")


def onnx_runtime(model, device: torch.device, int8: bool = False):
    """`lightclip.export.OnnxClip` on the `export_towers` graphs of `model` (written to a temporary folder), with as
    many intra-op threads as torch uses; `int8`: the dynamically quantised graphs. None (skipped) off the CPU or
    without onnxruntime."""
    folder = cpu_runtime_folder(device, "onnxruntime")
    if folder is None:
        return None
    from lightclip.export import OnnxClip, export_towers

    export_towers(model, folder, check=False, int8="dynamic" if int8 else False)
    return OnnxClip(folder, threads=torch.get_num_threads(), int8=int8)


# the ways `image_encoders` runs `encode_image`
EAGER_NCHW, EAGER, EAGER_FUSED, ONNX_FP32 = "eager NCHW", "eager (default)", "eager fused", "ONNX Runtime fp32"


def image_encoders(model, device: torch.device, nchw: bool = False) -> dict[str, Callable[[torch.Tensor], object]]:
    """`encode_image` of one eval-mode `LightClipModel` in each way it can run, on the same weights: eager as built
    (`channels_last` for a CNN tower); for a CNN also eager fused (`LightClipModel.fuse`, channels_last) and, with
    `nchw`, eager in the contiguous NCHW layout (`memory_format = torch.contiguous_format`); and ONNX Runtime fp32 on
    the `export_towers` graph (see `onnx_runtime`). Each callable takes pixel values."""
    encoders = {EAGER: model.encode_image}
    if model.config.vision_config.backbone != "vit":
        if nchw:
            contiguous = copy.deepcopy(model)
            contiguous.vision_model.memory_format = torch.contiguous_format
            encoders = {EAGER_NCHW: contiguous.encode_image, **encoders}
        encoders[EAGER_FUSED] = copy.deepcopy(model).fuse().encode_image
    clip = onnx_runtime(model, device)
    if clip is not None:
        encoders[ONNX_FP32] = lambda pixel_values: clip.encode_image(pixel_values.numpy())
    return encoders


def hf_clip_model(config):
    """transformers' `CLIPModel` with the widths, depths, heads, MLP size, activation, image and patch size,
    vocabulary, context length, projection and special tokens of a lightclip ViT config (SDPA attention)."""
    from transformers import CLIPConfig, CLIPModel

    text, vision = config.text_config, config.vision_config
    if vision.backbone != "vit":
        raise ValueError("the CLIPModel reference exists only for ViT image towers")
    clip_config = CLIPConfig(
        text_config=dict(
            vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
            max_position_embeddings=text.max_position_embeddings, hidden_act=text.hidden_act,
            layer_norm_eps=text.layer_norm_eps, pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id, projection_dim=config.projection_dim,
        ),
        vision_config=dict(
            hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
            image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.num_channels,
            hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps, projection_dim=config.projection_dim,
        ),
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )
    clip_config._attn_implementation = "sdpa"
    return CLIPModel(clip_config)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



class CLIPModelEncoders(torch.nn.Module):
    """A transformers `CLIPModel` behind the `encode_image` / `encode_text` calls of lightclip's evaluation and the
    logit-scale helpers of a training loop, so the same loops and benchmarks run it beside a lightclip model."""

    def __init__(self, model, lightclip_config):
        super().__init__()
        self.model = model
        self.lightclip_config = lightclip_config  # the dims it copies

    def encode_image(self, pixel_values, normalize: bool = True):
        out = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_text(self, input_ids, attention_mask=None, normalize: bool = True):
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def clamp_logit_scale_(self):
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def logit_scale_exp(self):
        return self.model.logit_scale.exp()


def clip_step(model, optimizer, scheduler, pixel_values, input_ids, attention_mask) -> torch.Tensor:
    """One step of the plain symmetric CLIP loss for a model with `encode_image` / `encode_text` /
    `logit_scale_exp` / `clamp_logit_scale_` (a lightclip model or `CLIPModelEncoders`): the minimal loop the
    diagnostics and the CLIPModel peer train with. Returns the loss."""
    image = model.encode_image(pixel_values)
    text = model.encode_text(input_ids, attention_mask)
    logits = model.logit_scale_exp() * image @ text.t()
    labels = torch.arange(len(logits))
    loss = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                  + torch.nn.functional.cross_entropy(logits.t(), labels))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    model.clamp_logit_scale_()
    return loss
