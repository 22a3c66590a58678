#!/usr/bin/env python
"""Where the Open Clip Art benchmark's numbers come from: per-class zero-shot recall and confusions of trained runs,
and the ceilings the captions set on retrieval.

    python benchmarks/diagnose_openclipart.py runs/oc/clip-seed0 runs/oc/clip-seed1

For each run folder (a saved model): the zero-shot category task's recall per class, the most frequent confusions,
and the share of test pictures predicted as each class (a model that sends most pictures to one big class scores
that class's share). Once for the test split: how many pictures share their first caption with another (under the
evaluation's pessimistic tie rule such a picture can never be ranked first by image-to-text retrieval), which bounds
I→T R@1.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from lightclip import LightClipModel, LightClipProcessor
from lightclip.evaluation import encode_images, zero_shot_classifier
from lightclip.openclipart import load_openclipart, openclipart_zero_shot_tasks


def caption_ceiling(test) -> dict:
    first = [captions[0] for captions in test["captions"]]
    counts = Counter(first)
    unique = sum(1 for caption in first if counts[caption] == 1)
    return {"test pictures": len(first), "with a first caption of their own": unique,
            "I->T R@1 ceiling": round(unique / len(first), 4), "most shared": counts.most_common(3)}


def per_class(run: str, test, task: str = "category") -> dict:
    model = LightClipModel.from_pretrained(run).eval()
    processor = LightClipProcessor.from_pretrained(run)
    spec = openclipart_zero_shot_tasks(test)[task]
    labels = torch.tensor(test[task])
    keep = labels >= 0
    with torch.no_grad():
        images = encode_images(model, processor, test, progress=False)[keep]
        classifier = zero_shot_classifier(model, processor, spec["classnames"], spec["templates"])
    predicted = (images @ classifier.T).argmax(1)
    labels = labels[keep]
    names = spec["classnames"]
    recall = {names[c]: round(float((predicted[labels == c] == c).float().mean()), 3)
              for c in range(len(names)) if (labels == c).any()}
    shares = Counter(names[int(p)] for p in predicted)
    confusions = Counter((names[int(t)], names[int(p)]) for t, p in zip(labels, predicted) if t != p)
    return {"acc1": round(float((predicted == labels).float().mean()), 4), "recall": recall,
            "predicted share": {k: round(v / len(predicted), 3) for k, v in shares.most_common(5)},
            "top confusions (true, predicted)": confusions.most_common(5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--task", default="category", choices=["category", "subcategory"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    test = load_openclipart("test")
    report = {"captions": caption_ceiling(test)}
    for run in args.runs:
        report[run] = per_class(run, test, args.task)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
