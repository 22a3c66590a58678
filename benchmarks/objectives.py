"""Training-step cost of each objective of `LightClipForPreTraining` relative to "clip" alone.

One model per objective set, all built from the same seed (identical towers), trained on the same batch in one
process, interleaved rounds. The soft-label schedule is set to mid-training (alpha > 0, so the soft path runs);
CLIP-PING terms get fixed random neighbour targets (teacher widths 384 and 384).

`--token-negatives K ...` adds "clip,token" with `token_num_negatives=K` (the bounded token loss) for each K.
`--token-loss-batches B ...` times instead the token loss module alone, forward + backward on random unit tokens of
the model's shapes (ViT patches, `--text-length` tokens, `token_dim`), every pair and each K, at each batch size,
next to `ClipLoss` and to the clip step of the model at the largest batch, in the same rounds.

    python benchmarks/objectives.py            # lightclip-xs dims, 64 px, batch 64 (about 3 minutes on 2 cores)
    python benchmarks/objectives.py --quick    # 3 rounds
    python benchmarks/objectives.py --device cuda --bf16
    python benchmarks/objectives.py --threads 1 --image-size 112 --batch-size 256 --text-length 20 \
        --only token --token-negatives 7 15 31                            # 49 patches, full steps
    python benchmarks/objectives.py --threads 1 --image-size 112 --text-length 20 \
        --token-negatives 7 15 31 --token-loss-batches 64 128 256          # the loss alone
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
    "mlm": ("clip,mlm", 1.50),
    "clip-ping (nn+xnn)": ("clip-ping", 1.05),
    "lightclip": ("lightclip", 1.70),
    "all": ("all", None),
}


def objective_step(name: str, objectives: str, args, device, batch, targets, **settings):
    from lightclip import LightClipForPreTraining

    config = _common.lightclip_config(args.preset, args.image_size, objectives=objectives,
                                      teacher_image_dim=args.teacher_dim, teacher_text_dim=args.teacher_dim, **settings)
    torch.manual_seed(args.seed)
    model = LightClipForPreTraining(config).train().to(device)
    model.set_progress(0.5)
    neighbors = {"nn", "xnn"} & set(config.pretraining_config.objectives)
    kwargs = dict(batch, neighbor_targets=targets) if neighbors else batch
    return make_step(model, lambda: model(**kwargs).loss, args, device)


def pass_flops(args, device, batch) -> dict[str, int]:
    """FLOPs (forward + backward) of the passes inside the steps: the image tower and the pooled text tower of a clip
    step, and the MLM's second text pass over the masked captions (every layer's states, which the fusion reads)."""
    from lightclip import LightClipForPreTraining

    config = _common.lightclip_config(args.preset, args.image_size, objectives="clip,mlm")
    torch.manual_seed(args.seed)
    model = LightClipForPreTraining(config).train().to(device)
    text, ids, mask = model.lightclip.text_model, batch["input_ids"], batch["attention_mask"]
    masked, _ = model.objectives["mlm"].mask_text(ids, mask, torch.Generator(device).manual_seed(args.seed))
    passes = {
        "image tower": lambda: model.lightclip.vision_model.forward_pooled(batch["pixel_values"]).sum().backward(),
        "text tower, pooled (clip)": lambda: text.forward_pooled(ids, mask).sum().backward(),
        "text tower, masked captions (mlm)": lambda: sum(
            h.sum() for h in text(masked, mask, output_hidden_states=True).hidden_states).backward(),
    }
    return {name: _common.count_flops(run) for name, run in passes.items()}


def token_loss_steps(config, batch_sizes: list[int], negatives: list[int], text_length: int, device, seed: int):
    """Forward + backward of `TokenMatchingLoss` (every pair and each k) and of `ClipLoss` alone at each batch size,
    on random unit tokens: the model's patches, `text_length - 2` valid words (start and end tokens are no words)."""
    import torch.nn.functional as F

    from lightclip.objectives.contrastive import ClipLoss
    from lightclip.objectives.token_matching import TokenMatchingLoss

    vision, settings = config.vision_config, config.pretraining_config
    patches, dim = (vision.image_size // vision.patch_size) ** 2, settings.token_dim
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device).requires_grad_()

    def step(loss, inputs, key):
        def run() -> None:  # gradients of the inputs, no optimiser step
            for x in inputs:
                x.grad = None
            loss(*inputs)[key].backward()
        return run

    steps = {}
    for b in batch_sizes:
        mask = torch.ones(b, text_length, dtype=torch.bool, device=device)
        mask[:, [0, -1]] = False
        scale = torch.tensor(14.3, device=device)
        tokens = (unit(b, patches, dim), unit(b, text_length, dim))
        for k in (None, *negatives):
            matcher = TokenMatchingLoss(settings.token_matching, settings.sinkhorn_epsilon,
                                        settings.sinkhorn_iterations, chunk_size=settings.token_chunk_size,
                                        softmax_negatives=k)
            name = f"token loss, {'every pair' if k is None else f'k={k}'}, B={b}"
            steps[name] = step(lambda img, txt, matcher=matcher, mask=mask: matcher(img, txt, mask, scale), tokens,
                               "token_loss")
        steps[f"clip loss, B={b}"] = step(lambda img, txt: ClipLoss()(img, txt, scale),
                                           (unit(b, config.projection_dim), unit(b, config.projection_dim)),
                                           "contrastive_loss")
    return steps, patches


def time_token_losses(args, device, config, batch, targets) -> None:
    """`--token-loss-batches`: the loss modules alone and the clip step at the largest batch, in the same rounds."""
    text_length = batch["input_ids"].shape[1]
    clip_step = f"clip step, B={args.batch_size}"
    steps = {clip_step: objective_step("clip", "clip", args, device, batch, targets)}
    losses, patches = token_loss_steps(config, args.token_loss_batches, args.token_negatives, text_length, device,
                                       args.seed)
    times = _common.time_interleaved({**steps, **losses}, device, args.warmup, args.repeats)
    settings = config.pretraining_config
    print(_common.machine(args))
    print(f"- token loss alone, forward + backward on random unit tokens: {patches} patches, {text_length} tokens "
          f"({text_length - 2} words), width {settings.token_dim}, {settings.token_matching}; clip loss: width "
          f"{config.projection_dim}")
    print(f"- clip step: {args.preset} dims, {args.image_size} px, batch {args.batch_size}, {text_length}-token text, "
          "AdamW")
    print("- time: median round; vs clip step: median over rounds of the paired time ratio (same round)")
    print()
    print("| variant | time (s) | vs clip step |")
    print("|---|---|---|")
    for n in times:
        print(f"| {n} | {times.median(n):.3f} | {times.ratio(n, clip_step):.3f}x |")


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="lightclip-xs")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-length", type=int, default=None, help="tokens per caption (default: the full context)")
    p.add_argument("--captions", choices=["random", "openclipart"], default="random",
                   help="random: --text-length tokens, no padding; openclipart: real captions padded to the longest")
    p.add_argument("--teacher-dim", type=int, default=384)
    p.add_argument("--flops", action="store_true",
                   help="also count each step's FLOPs, and those of the towers' passes inside them "
                        "(FlopCounterMode: matmuls, convs, attention; one extra step each)")
    p.add_argument("--only", nargs="*", default=None, help=f"subset of {list(VARIANTS)} (clip is always run)")
    p.add_argument("--token-negatives", type=int, nargs="*", default=[],
                   help="also run clip,token with token_num_negatives=K for each K")
    p.add_argument("--token-loss-batches", type=int, nargs="*", default=None,
                   help="time the token loss module alone at these batch sizes instead (see above)")
    args = p.parse_args()
    device = _common.setup(args, default_repeats=3, quick_repeats=2)
    if args.token_loss_batches:
        args.batch_size = max(args.token_loss_batches)
    config = _common.lightclip_config(args.preset, args.image_size)
    batch = _common.make_batch(config, args.batch_size, device, seed=args.seed, length=args.text_length,
                               captions=args.captions)
    g = torch.Generator().manual_seed(args.seed + 1)
    targets = {k: torch.randn(args.batch_size, args.teacher_dim, generator=g).to(device)
               for k in ("image_nn", "text_nn", "image_xnn", "text_xnn")}
    if args.token_loss_batches:
        time_token_losses(args, device, config, batch, targets)
        return
    variants, settings = dict(VARIANTS), {}
    for k in args.token_negatives:
        variants[f"token k={k}"], settings[f"token k={k}"] = VARIANTS["token"], {"token_num_negatives": k}
    names = [n for n in variants if args.only is None or n == "clip" or n in args.only or n in settings]
    steps = {n: objective_step(n, variants[n][0], args, device, batch, targets, **settings.get(n, {})) for n in names}
    flops = {n: _common.count_flops(step) for n, step in steps.items()} if args.flops else None
    times = _common.time_interleaved(steps, device, args.warmup, args.repeats)

    print(_common.machine(args))
    print(f"- model: {args.preset} dims, {args.image_size} px, batch {args.batch_size}, AdamW; text: "
          f"{_common.describe_text(batch['attention_mask'], args.captions)}")
    print("- step: median round; vs clip: median over rounds of the paired time ratio (same round)")
    print()
    extra_head, extra_sep = (" GFLOP/step | FLOPs vs clip |", "---|---|") if flops else ("", "")
    print("| objectives | step (s) | vs clip | target | met |" + extra_head)
    print("|---|---|---|---|---|" + extra_sep)
    for n in times:
        s, ratio = times.median(n), times.ratio(n, "clip")
        target = variants[n][1]
        met = "" if target is None else ("yes" if ratio <= target else "no")
        extra = f" {flops[n] / 1e9:.1f} | {flops[n] / flops['clip']:.2f}x |" if flops else ""
        bound = "" if target is None else f"<= {target}x"
        print(f"| {n} ({variants[n][0]}) | {s:.3f} | {ratio:.2f}x | {bound} | {met} |" + extra)
    if flops:
        print()
        print("| pass (forward + backward) | GFLOP | vs clip step |")
        print("|---|---|---|")
        for name, count in pass_flops(args, device, batch).items():
            print(f"| {name} | {count / 1e9:.1f} | {count / flops['clip']:.2f}x |")


if __name__ == "__main__":
    main()
