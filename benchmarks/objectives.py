"""Training-step cost of each objective of `LightClipForPreTraining` relative to "clip" alone.

One model per objective set, all built from the same seed (identical towers), trained on the same batch in one
process, interleaved rounds. The soft-label schedule is set to mid-training (alpha > 0, so the soft path runs);
CLIP-PING terms get fixed random neighbour targets (teacher widths 384 and 384).

    python benchmarks/objectives.py            # lightclip-xs dims, 64 px, batch 64 (about 3 minutes on 2 cores)
    python benchmarks/objectives.py --quick    # 3 rounds
    python benchmarks/objectives.py --device cuda --bf16
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from train_step import make_step  # noqa: E402

# name -> (objectives, target ratio vs clip)
VARIANTS = {
    "clip": ("clip", None),
    "soft": ("soft", 1.02),
    "token": ("clip,token", 1.25),
    "mlm": ("clip,mlm", 1.40),
    "clip-ping (nn+xnn)": ("clip-ping", 1.05),
    "all": ("all", None),
}


def objective_step(name: str, objectives: str, args, device, batch, targets):
    from lightclip import LightClipForPreTraining

    config = _common.lightclip_config(args.preset, args.image_size, objectives=objectives,
                                      teacher_image_dim=args.teacher_dim, teacher_text_dim=args.teacher_dim)
    torch.manual_seed(args.seed)
    model = LightClipForPreTraining(config).train().to(device)
    model.set_progress(0.5)
    neighbors = {"nn", "xnn"} & set(config.pretraining_config.objectives)
    kwargs = dict(batch, neighbor_targets=targets) if neighbors else batch
    return make_step(model, lambda: model(**kwargs).loss, args, device)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="lightclip-xs")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher-dim", type=int, default=384)
    p.add_argument("--flops", action="store_true",
                   help="also count each step's FLOPs (FlopCounterMode: matmuls, convs, attention; one extra step each)")
    p.add_argument("--only", nargs="*", default=None, help=f"subset of {list(VARIANTS)} (clip is always run)")
    args = p.parse_args()
    device = _common.setup(args, default_repeats=3, quick_repeats=2)
    config = _common.lightclip_config(args.preset, args.image_size)
    batch = _common.make_batch(config, args.batch_size, device, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    targets = {k: torch.randn(args.batch_size, args.teacher_dim, generator=g).to(device)
               for k in ("image_nn", "text_nn", "image_xnn", "text_xnn")}
    names = [n for n in VARIANTS if args.only is None or n == "clip" or n in args.only]
    steps = {n: objective_step(n, VARIANTS[n][0], args, device, batch, targets) for n in names}
    flops = {n: _common.count_flops(step) for n, step in steps.items()} if args.flops else None
    times = _common.time_interleaved(steps, device, args.warmup, args.repeats)

    print(_common.machine(args))
    print(f"- model: {args.preset} dims, {args.image_size} px, batch {args.batch_size}, full-length text "
          f"({config.text_config.max_position_embeddings} tokens), AdamW")
    print("- step: median round; vs clip: median over rounds of the paired time ratio (same round)")
    print()
    extra_head, extra_sep = (" GFLOP/step | FLOPs vs clip |", "---|---|") if flops else ("", "")
    print("| objectives | step (s) | vs clip | target | met |" + extra_head)
    print("|---|---|---|---|---|" + extra_sep)
    for n in times:
        s, ratio = times.median(n), times.ratio(n, "clip")
        target = VARIANTS[n][1]
        met = "" if target is None else ("yes" if ratio <= target else "no")
        extra = f" {flops[n] / 1e9:.1f} | {flops[n] / flops['clip']:.2f}x |" if flops else ""
        print(f"| {n} ({VARIANTS[n][0]}) | {s:.3f} | {ratio:.2f}x | {'' if target is None else f'<= {target}x'} | {met} |"
              + extra)


if __name__ == "__main__":
    main()
