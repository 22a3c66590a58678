#!/usr/bin/env python
"""Does the size of the text tower decide colour on held-out colour-shape combinations?

    python benchmarks/diagnose_text_tower.py --seed 1 --output_dir runs/diagnose-text-tower

Trains the image tower of `lightclip-xxs-lite0` (EfficientNet-Lite0 at 64 px from its ImageNet weights) with
text towers of growing width and depth, each with the plain `clip` loss for 500 steps at batch 64, one
`examples/pretrain.py` run per variant (runs that already have `eval_results.json` are reused), then prints per
variant: zero-shot colour and shape top-1 on seen / held-out combinations, retrieval R@1, the `clip` training
images/s of the run, and how additive the text embeddings of "a {colour} {shape}" are (R² of the best fit
`mean + colour vector + shape vector` over all 64 combinations: 1.0 means the text side composes colour and shape
perfectly). `--timing_steps N` also times N steps of each variant with the default `lightclip` objectives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from lightclip import LightClipConfig, LightClipModel, LightClipProcessor
from lightclip.evaluation import load_results
from lightclip.presets import PRESETS
from lightclip.shapes import COLOURS, SHAPES

ROOT = Path(__file__).resolve().parents[1]
# name: (text tower, projection dim); "xxs" is the default preset's own text tower
VARIANTS: dict[str, tuple[dict, int]] = {
    "xxs (width 64, 2 layers)": ({}, 64),
    "xxs, 8,192-token vocabulary": (dict(vocab_size=8192), 64),
    "xxs, 256-d projection": ({}, 256),
    "width 128, 4 layers": (dict(vocab_size=8192, hidden_size=128, intermediate_size=512, num_hidden_layers=4), 128),
    "width 256, 2 layers": (dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                 num_attention_heads=4), 128),
    "width 256, 2 layers, 256-d (lightclip-lite0-64px)": (
        PRESETS["lightclip-lite0-64px"]["text_config"], PRESETS["lightclip-lite0-64px"]["projection_dim"]),
    "width 256, 6 layers (the real-size presets')": (
        dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
        256),
}


def variant_config(text_overrides: dict, projection_dim: int) -> LightClipConfig:
    base = LightClipConfig.from_preset("lightclip-xxs-lite0")
    return LightClipConfig.from_preset("lightclip-xxs-lite0", text_config={**base.text_config.to_dict(),
                                       **text_overrides}, projection_dim=projection_dim, token_dim=projection_dim)


def train(config_dir: Path, run_dir: Path, seed: int, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "pretrain.py"),
           "--model", str(config_dir), "--image_tower_init", "imagenet", "--seed", str(seed),
           "--output_dir", str(run_dir), "--overwrite_output_dir", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def images_per_second(run_dir: Path) -> float:
    """Median images/s of the logged training steps after the first 10 (start-up excluded)."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_sec"] for r in rows if "images_per_sec" in r and r["step"] > 10)


@torch.no_grad()
def additive_r2(run_dir: Path) -> float:
    """R² of `mean + colour + shape` fitted to the text embeddings of every "a {colour} {shape}" caption."""
    model, processor = LightClipModel.from_pretrained(run_dir).eval(), LightClipProcessor.from_pretrained(run_dir)
    inputs = processor(text=[f"a {c} {s}" for c in COLOURS for s in SHAPES], return_tensors="pt", padding=True)
    emb = model.encode_text(inputs["input_ids"], inputs["attention_mask"]).view(len(COLOURS), len(SHAPES), -1)
    mean = emb.mean((0, 1), keepdim=True)
    fit = emb.mean(1, keepdim=True) + emb.mean(0, keepdim=True) - mean
    return float(1 - (emb - fit).pow(2).sum() / (emb - mean).pow(2).sum())


def main() -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/diagnose-text-tower")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--timing_steps", type=int, default=0)
    args = parser.parse_args()
    out, rows = Path(args.output_dir), []
    for name in args.variants:
        i = list(VARIANTS).index(name)
        config_dir, run_dir = out / f"config-{i}", out / f"clip-{i}-seed{args.seed}"
        config = variant_config(*VARIANTS[name])
        config.save_pretrained(config_dir)
        if not (run_dir / "eval_results.json").exists():
            train(config_dir, run_dir, args.seed, ["--objectives", "clip", "--max_train_steps", "500"])
        results = load_results(run_dir / "eval_results.json")
        row = {"text tower": name, "text params (M)": sum(p.numel() for p in LightClipModel(config).text_model
                                                          .parameters()) / 1e6,
               **{label: 100 * results[f"shapes/{key}"] for label, key in [
                   ("colour seen", "colour/acc1_seen"), ("colour unseen", "colour/acc1_unseen"),
                   ("colour", "colour/acc1"), ("shape unseen", "shape/acc1_unseen"), ("shape", "shape/acc1"),
                   ("I→T R@1", "retrieval/text_retrieval_recall@1"),
                   ("T→I R@1", "retrieval/image_retrieval_recall@1")]},
               "clip images/s": images_per_second(run_dir), "text additive R²": additive_r2(run_dir)}
        if args.timing_steps:
            timing_dir = out / f"lightclip-timing-{i}"
            train(config_dir, timing_dir, args.seed, ["--objectives", "lightclip", "--max_train_steps",
                                                      str(args.timing_steps), "--eval_steps", "0"])
            row["lightclip images/s"] = images_per_second(timing_dir)
        rows.append(row)
    print("\n| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.3f}" if "R²" in k else f"{v:.1f}"
                                for k, v in row.items()) + " |")
    return rows


if __name__ == "__main__":
    main()
