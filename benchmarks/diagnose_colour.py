#!/usr/bin/env python
"""Where does zero-shot colour fail on lightclip-shapes, and is colour in the image features at all?

    python benchmarks/diagnose_colour.py checkpoints/lightclip-xxs-lite0-shapes
    python benchmarks/diagnose_colour.py runs/my-run --num_train 4000

For a trained model folder, on the shapes test split:
1. zero-shot colour top-1 on seen and held-out colour-shape combinations, and the confusions of each held-out
   combination (true colour and shape -> predicted colour);
2. a linear probe on the colour label, fitted on train-split pictures (seen combinations only) and scored on the
   test split's seen and held-out pictures, once on the image embedding and once on the image tower's pooled
   features before the projection. A probe that fails on a held-out combination says that colour is not
   represented apart from shape there: the failure is in the image features, not in the text alignment.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from lightclip import LightClipModel, LightClipProcessor
from lightclip.evaluation import encode_images, linear_probe, zero_shot_classifier
from lightclip.shapes import COLOURS, SHAPES, make_shapes_dataset, shapes_zero_shot_tasks


class PooledFeatures(torch.nn.Module):
    """The image tower's pooled output before the projection, behind the `encode_image` interface."""

    def __init__(self, model: LightClipModel):
        super().__init__()
        self.model = model

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.vision_model(pixel_values).pooler_output


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="A trained lightclip folder.")
    parser.add_argument("--num_train", type=int, default=2000, help="Train-split pictures the probes are fitted on.")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = LightClipModel.from_pretrained(args.model).eval()
    processor = LightClipProcessor.from_pretrained(args.model)
    test = make_shapes_dataset(split="test")
    train = make_shapes_dataset(split="train", num_samples=args.num_train)
    colour, shape = torch.tensor(test["colour"]), torch.tensor(test["shape"])
    seen = torch.tensor(test["composition_seen"])

    spec = shapes_zero_shot_tasks()["colour"]
    embeds = encode_images(model, processor, test)
    predicted = (embeds @ zero_shot_classifier(model, processor, spec["classnames"], spec["templates"]).T).argmax(1)
    correct = predicted == colour
    results = {"zero_shot": {"seen": correct[seen].float().mean().item(),
                             "held_out": correct[~seen].float().mean().item()}}
    per_combination = collections.defaultdict(collections.Counter)
    for c, s, p, is_seen in zip(colour.tolist(), shape.tolist(), predicted.tolist(), seen.tolist()):
        if not is_seen:
            per_combination[f"{COLOURS[c]} {SHAPES[s]}"][COLOURS[p]] += 1
    results["held_out_predictions"] = {k: dict(v.most_common()) for k, v in sorted(per_combination.items())}

    train_labels = torch.tensor(train["colour"])
    for name, encoder in (("embedding", model), ("pooled_features", PooledFeatures(model))):
        fit = encode_images(encoder, processor, train)
        test_features = embeds if encoder is model else encode_images(encoder, processor, test)
        results[f"probe_{name}"] = {
            split: linear_probe(fit, train_labels, test_features[mask], colour[mask])["acc1"]
            for split, mask in (("seen", seen), ("held_out", ~seen))
        }
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
