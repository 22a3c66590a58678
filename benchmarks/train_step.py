"""One training step (forward, backward, AdamW) of `LightClipForPreTraining` ("clip") vs `CLIPModel(return_loss=True)`.

Same dims (default `lightclip-xs` at 64 px), same batch, one process, interleaved rounds. A large fp32 `torch.mm` is
timed as a third variant in the same rounds, so "fraction of matmul FLOP/s" compares numbers taken under the same
load. FLOPs of one step are counted with `torch.utils.flop_counter.FlopCounterMode`.

    python benchmarks/train_step.py                   # lightclip-xs, 64 px, batch 64 (about 1-2 minutes on 2 cores)
    python benchmarks/train_step.py --quick           # 3 rounds
    python benchmarks/train_step.py --device cuda --bf16 --batch-size 256 --image-size 224
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


def lightclip_step(config, batch, args, device) -> Callable[[], None]:
    from lightclip import LightClipForPreTraining

    model = LightClipForPreTraining(config).train().to(device)
    return make_step(model, lambda: model(**batch).loss, args, device)


def hf_clip_step(config, batch, args, device) -> Callable[[], None]:
    model = _common.hf_clip_model(config).train().to(device)
    return make_step(model, lambda: model(**batch, return_loss=True).loss, args, device)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="lightclip-xs")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mm-size", type=int, default=2048, help="side of the square fp32 matmul reference")
    args = p.parse_args()
    device = _common.setup(args, default_repeats=7, quick_repeats=3)
    config = _common.lightclip_config(args.preset, args.image_size, objectives="clip")
    batch = _common.make_batch(config, args.batch_size, device, seed=args.seed)
    steps = {"lightclip": lightclip_step(config, batch, args, device), "CLIPModel": hf_clip_step(config, batch, args, device)}
    flops = {name: _common.count_flops(step) for name, step in steps.items()}
    a = torch.randn(args.mm_size, args.mm_size, device=device)
    b = torch.randn(args.mm_size, args.mm_size, device=device)
    times = _common.time_interleaved({**steps, "mm": lambda: torch.mm(a, b)}, device, args.warmup, args.repeats)
    mm_flops = 2 * args.mm_size**3

    print(_common.machine(args))
    print(f"- model: {args.preset} dims, {args.image_size} px, batch {args.batch_size}, objectives clip, AdamW")
    print(f"- fp32 torch.mm {args.mm_size}^2 in the same rounds: {mm_flops / times.median('mm') / 1e9:.1f} GFLOP/s")
    print("- step: median round; speed vs CLIPModel and fraction of mm FLOP/s: medians over rounds of paired ratios")
    print()
    print("| model | step (s) | images/s | speed vs CLIPModel | GFLOP/step | GFLOP/s | fraction of mm FLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name in steps:
        s = times.median(name)
        # achieved FLOP/s / mm FLOP/s = (flops / t_step) / (mm_flops / t_mm), paired per round
        fraction = flops[name] / mm_flops / times.ratio(name, "mm")
        print(f"| {name} | {s:.3f} | {args.batch_size / s:,.1f} | {1 / times.ratio(name, 'CLIPModel'):.2f}x | "
              f"{flops[name] / 1e9:.1f} | {flops[name] / s / 1e9:.1f} | {fraction:.2f} |")


if __name__ == "__main__":
    main()
