#!/usr/bin/env python
"""Where do the similarity-weighted soft labels put their negative mass on lightclip-shapes?

    python benchmarks/diagnose_soft.py runs/compare-seed0/soft
    python benchmarks/diagnose_soft.py runs/compare-seed0/soft --batch_size 64 --num_batches 200

`SoftClipLoss(mode="similarity")` moves alpha of each target row onto the negatives, weighted by the model's own
detached similarities, r_ij = softmax_{j != i}(s_ij) (`lightclip.objectives.contrastive.soft_negative_weights`, the
loss's own code). For a trained model folder, on the shapes test split (one caption per picture), this draws random
batches of the training batch size and sums r over four kinds of negative by the main object's labels: same colour and
shape, same colour only, same shape only, neither. It prints each kind's mass next to its share of the negatives (the
mass uniform softening would give it) and their ratio. A kind with a ratio well above 1 is one whose captions the loss
asks the model to score closer to the picture: the loss then pushes less to tell that kind apart.
"""

from __future__ import annotations

import argparse
import json

import torch

from lightclip import LightClipModel, LightClipProcessor
from lightclip.evaluation import encode_images, encode_texts
from lightclip.objectives.contrastive import soft_negative_weights
from lightclip.shapes import make_shapes_dataset

KINDS = ("same colour and shape", "same colour only", "same shape only", "neither")


def negative_mass(logits: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-label mass and uniform share of each kind in `KINDS`, summed over the rows of one batch's `logits`."""
    eye = torch.eye(len(logits), dtype=torch.bool)
    r = soft_negative_weights(logits, torch.arange(len(logits)))
    same_colour = colour[:, None] == colour[None, :]
    same_shape = shape[:, None] == shape[None, :]
    masks = (same_colour & same_shape, same_colour & ~same_shape, ~same_colour & same_shape, ~same_colour & ~same_shape)
    share = torch.stack([(m & ~eye).sum(1).float() / (len(logits) - 1) for m in masks], dim=1)
    mass = torch.stack([(r * m).sum(1) for m in masks], dim=1)
    return mass.sum(0), share.sum(0)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="A trained lightclip folder.")
    parser.add_argument("--batch_size", type=int, default=64, help="The training batch size the rows are drawn in.")
    parser.add_argument("--num_batches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = LightClipModel.from_pretrained(args.model).eval()
    processor = LightClipProcessor.from_pretrained(args.model)
    test = make_shapes_dataset(split="test")
    image_embeds = encode_images(model, processor, test)
    text_embeds = encode_texts(model, processor, test["text"])
    scale = model.logit_scale.exp().item()
    colour, shape = torch.tensor(test["colour"]), torch.tensor(test["shape"])

    generator = torch.Generator().manual_seed(args.seed)
    totals = {"image rows": [torch.zeros(len(KINDS)), torch.zeros(len(KINDS))],
              "text rows": [torch.zeros(len(KINDS)), torch.zeros(len(KINDS))]}
    for _ in range(args.num_batches):
        idx = torch.randperm(len(test), generator=generator)[: args.batch_size]
        logits = scale * image_embeds[idx] @ text_embeds[idx].T
        for name, rows in (("image rows", logits), ("text rows", logits.T)):
            mass, share = negative_mass(rows, colour[idx], shape[idx])
            totals[name][0] += mass
            totals[name][1] += share

    results = {"logit_scale": scale}
    for name, (mass, share) in totals.items():
        mass, share = mass / mass.sum(), share / share.sum()
        results[name] = {kind: {"soft_mass": round(m, 4), "uniform_share": round(s, 4), "ratio": round(m / s, 2)}
                         for kind, m, s in zip(KINDS, mass.tolist(), share.tolist())}
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
