"""One training step (forward, backward, AdamW) of `LightClipForPreTraining` ("clip") vs `CLIPModel(return_loss=True)`.

Same dims (default `lightclip-xs` at 64 px), same batch, one process, interleaved rounds. A third arm runs the same
lightclip model with every token through both towers' last layers, as an objective that reads per-token states
makes it (the `clip` step computes the pooled tokens alone there); a CNN preset has no `CLIPModel` arm. A large fp32
`torch.mm` is timed as a third variant in the same rounds, so "fraction of matmul FLOP/s" compares numbers taken under
the same load. FLOPs of one step are counted with `torch.utils.flop_counter.FlopCounterMode`.

    python benchmarks/train_step.py                   # lightclip-xs, 64 px, batch 64 (about 1-2 minutes on 2 cores)
    python benchmarks/train_step.py --quick           # 3 rounds
    python benchmarks/train_step.py --device cuda --bf16 --batch-size 256 --image-size 224
    python benchmarks/train_step.py --preset lightclip-lite0-56px --image-size 56 --text-length 28
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def make_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], args, device) -> Callable[[], None]:
    """A closure running one optimisation step of `model` on a fixed batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _common.autocast(args, device):
            loss = loss_fn()
        loss.backward()
        optimizer.step()

    return step


def lightclip_step(config, batch, args, device, every_token: bool = False) -> Callable[[], None]:
    from lightclip import LightClipForPreTraining

    torch.manual_seed(args.seed)
    model = LightClipForPreTraining(config).train().to(device)
    if every_token:  # an instance flag shadows the objective's class flags
        model.objectives["clip"].needs_image_tokens = model.objectives["clip"].needs_text_tokens = True
    return make_step(model, lambda: model(**batch).loss, args, device)


def hf_clip_step(config, batch, args, device) -> Callable[[], None]:
    model = _common.hf_clip_model(config).train().to(device)
    return make_step(model, lambda: model(**batch, return_loss=True).loss, args, device)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="lightclip-xs")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-length", type=int, default=None, help="caption tokens (default: the full context)")
    p.add_argument("--mm-size", type=int, default=2048, help="side of the square fp32 matmul reference")
    args = p.parse_args()
    device = _common.setup(args, default_repeats=7, quick_repeats=3)
    config = _common.lightclip_config(args.preset, args.image_size, objectives="clip")
    batch = _common.make_batch(config, args.batch_size, device, seed=args.seed, length=args.text_length)
    steps = {"lightclip": lightclip_step(config, batch, args, device),
             "lightclip, every token": lightclip_step(config, batch, args, device, every_token=True)}
    vit = config.vision_config.backbone == "vit"
    if vit:
        steps["CLIPModel"] = hf_clip_step(config, batch, args, device)
    reference = "CLIPModel" if vit else "lightclip, every token"
    flops = {name: _common.count_flops(step) for name, step in steps.items()}
    a = torch.randn(args.mm_size, args.mm_size, device=device)
    b = torch.randn(args.mm_size, args.mm_size, device=device)
    times = _common.time_interleaved({**steps, "mm": lambda: torch.mm(a, b)}, device, args.warmup, args.repeats)
    mm_flops = 2 * args.mm_size**3

    print(_common.machine(args))
    length = batch["input_ids"].shape[1]
    print(f"- model: {args.preset} dims, {args.image_size} px, batch {args.batch_size}, {length} tokens, objectives "
          "clip, AdamW")
    print(f"- fp32 torch.mm {args.mm_size}^2 in the same rounds: {mm_flops / times.median('mm') / 1e9:.1f} GFLOP/s")
    print(f"- step: median round; speed vs {reference} and fraction of mm FLOP/s: medians over rounds of paired ratios")
    print()
    print(f"| model | step (s) | images/s | speed vs {reference} | GFLOP/step | GFLOP/s | fraction of mm FLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name in steps:
        s = times.median(name)
        # achieved FLOP/s / mm FLOP/s = (flops / t_step) / (mm_flops / t_mm), paired per round
        fraction = flops[name] / mm_flops / times.ratio(name, "mm")
        print(f"| {name} | {s:.3f} | {args.batch_size / s:,.1f} | {1 / times.ratio(name, reference):.2f}x | "
              f"{flops[name] / 1e9:.1f} | {flops[name] / s / 1e9:.1f} | {fraction:.2f} |")


if __name__ == "__main__":
    main()
