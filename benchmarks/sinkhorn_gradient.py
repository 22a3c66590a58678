#!/usr/bin/env python
"""The Sinkhorn token score's default backward (plan held constant) against the exact gradient through the unrolled
iterations: direction, norm and time, side by side in one run.

    python benchmarks/sinkhorn_gradient.py
    python benchmarks/sinkhorn_gradient.py --batch 64 --patches 16 --words 18 --threads 1

The score of a pair is S = <Pi, A> with Pi the entropic plan of the similarities A. Holding Pi constant gives
dS/dA = Pi, the exact gradient of the entropy-regularised value <Pi, A> + eps H(Pi) (envelope theorem), not of S
itself; `sinkhorn_unroll=True` differentiates S through every iteration. docs/method.md discusses the choice.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lightclip.objectives.token_matching import sinkhorn_pair_scores


def gradients(image, text, mask, weights, args, unroll: bool) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    scores = sinkhorn_pair_scores(image, text, mask, args.epsilon, args.iterations, unroll=unroll)
    grads = torch.autograd.grad((scores * weights).sum(), (image, text))
    return torch.cat([g.flatten() for g in grads]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patches", type=int, default=16)
    parser.add_argument("--words", type=int, default=18)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.trials):
        image = F.normalize(torch.randn(args.batch, args.patches, args.dim, generator=generator), dim=-1)
        text = F.normalize(torch.randn(args.batch, args.words, args.dim, generator=generator), dim=-1)
        lengths = torch.randint(args.words // 2, args.words + 1, (args.batch,), generator=generator)
        mask = torch.arange(args.words) < lengths[:, None]
        weights = torch.randn(args.batch, args.batch, generator=generator)  # a generic upstream gradient
        image.requires_grad_(), text.requires_grad_()
        fixed, fixed_s = gradients(image, text, mask, weights, args, unroll=False)
        exact, exact_s = gradients(image, text, mask, weights, args, unroll=True)
        rows.append((F.cosine_similarity(fixed, exact, dim=0).item(), (fixed.norm() / exact.norm()).item(),
                     exact_s / fixed_s))
    cosine, norm, cost = (torch.tensor(column) for column in zip(*rows))
    print(f"B={args.batch} N={args.patches} M<={args.words} D={args.dim} eps={args.epsilon} "
          f"iterations={args.iterations}, {args.trials} trials, {args.threads} thread(s)")
    print(f"cosine(fixed-plan gradient, exact gradient): {cosine.mean():.3f} ± {cosine.std():.3f}")
    print(f"norm ratio fixed / exact:                    {norm.mean():.3f} ± {norm.std():.3f}")
    print(f"time ratio exact / fixed (forward+backward): {cost.mean():.2f} ± {cost.std():.2f}")


if __name__ == "__main__":
    main()
