#!/usr/bin/env python
"""Print the shapes results of groups of runs as a markdown table: one row per group, mean ± std over its seeds.

    python utils/seed_table.py clip=runs/clip-seed{0,1,2} clip-ping=runs/ping-seed{0,1,2}
    python utils/seed_table.py --per_seed clip=runs/clip-seed0,runs/clip-seed1,runs/clip-seed2

Each argument is `label=run_dir[,run_dir...]` (or the run folders as separate shell words after `label=`, or the
label repeated, as the shell expands `label=runs/seed{0,1,2}`); every run folder holds the `eval_results.json` that
`examples/pretrain.py` writes. The std is the sample standard deviation (n - 1), as in every results table of the
docs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from lightclip.evaluation import load_results

COLUMNS = [
    ("shape top-1", "shapes/shape/acc1"), ("shape top-1 unseen", "shapes/shape/acc1_unseen"),
    ("colour top-1", "shapes/colour/acc1"), ("colour top-1 unseen", "shapes/colour/acc1_unseen"),
    ("I→T R@1", "shapes/retrieval/text_retrieval_recall@1"), ("T→I R@1", "shapes/retrieval/image_retrieval_recall@1"),
]


def parse_groups(words: list[str]) -> dict[str, list[Path]]:
    """`a=x,y b=z`, `a=x y b=z` and `a=x a=y b=z` (what the shell makes of `a=x{0,1}`-style braces) all give
    {"a": [x, y], "b": [z]}."""
    groups: dict[str, list[Path]] = {}
    label = None
    for word in words:
        if "=" in word:
            label, word = word.split("=", 1)
            groups.setdefault(label, [])
        if label is None:
            raise SystemExit(f"{word!r} comes before any label=: write label=run_dir[,run_dir...]")
        groups[label] += [Path(part) for part in word.split(",") if part]
    return groups


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+")
    parser.add_argument("--per_seed", action="store_true", help="Also print each run's values.")
    args = parser.parse_args(argv)
    lines = ["| runs | n | " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for label, runs in parse_groups(args.groups).items():
        results = [load_results(run / "eval_results.json") for run in runs]
        values = [[100 * r[key] for r in results] for _, key in COLUMNS]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(mean_std(v) for v in values) + " |")
        if args.per_seed:
            lines += [f"| {run.name} | 1 | " + " | ".join(f"{v[i]:.1f}" for v in values) + " |"
                      for i, run in enumerate(runs)]
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
