#!/usr/bin/env python
"""Print the results of groups of runs as a markdown table: one row per group, mean ± std over its seeds.

    python utils/seed_table.py clip=runs/clip-seed{0,1,2} clip-ping=runs/ping-seed{0,1,2}
    python utils/seed_table.py --per_seed clip=runs/clip-seed0,runs/clip-seed1,runs/clip-seed2
    python utils/seed_table.py --output docs/results.md --title "Open Clip Art, 300 steps" clip=runs/oc/clip-seed{0,1,2}

Each argument is `label=run_dir[,run_dir...]` (or the run folders as separate shell words after `label=`, or the
label repeated, as the shell expands `label=runs/seed{0,1,2}`); every run folder holds the `eval_results.json` that
`examples/pretrain.py` writes. The columns are those of the built-in benchmark the results hold (shapes or
openclipart), then the training time and samples/s when the runs recorded them. The std is the sample standard
deviation (n - 1), as in every results table of the docs. Under the table, each group's command (its first run's
`train_config.json`, the seed written `{seeds}`), and the commit, machine and date each run recorded.

`--output FILE` also writes the table, with its title and the command that made it, into FILE between the markers
`<!-- seed_table: TITLE -->` and `<!-- /seed_table -->` (replacing that section, or appending it).
`--regenerate FILE` reruns every command recorded in FILE's sections, so one command rewrites all its tables from
the runs:

    python utils/seed_table.py --regenerate docs/results.md
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
from pathlib import Path

from lightclip.evaluation import load_results

# (column, key, scale): accuracies are shown in percent
COLUMNS = {
    "shapes": [
        ("shape top-1", "shapes/shape/acc1", 100), ("shape top-1 unseen", "shapes/shape/acc1_unseen", 100),
        ("colour top-1", "shapes/colour/acc1", 100), ("colour top-1 unseen", "shapes/colour/acc1_unseen", 100),
        ("I→T R@1", "shapes/retrieval/text_retrieval_recall@1", 100),
        ("T→I R@1", "shapes/retrieval/image_retrieval_recall@1", 100),
    ],
    "openclipart": [
        ("category top-1", "openclipart/category/acc1", 100),
        ("category mean recall", "openclipart/category/mean_per_class_recall", 100),
        ("sub-folder top-1", "openclipart/subcategory/acc1", 100),
        ("probe top-1", "openclipart/linear_probe/category/acc1", 100),
        ("I→T R@1", "openclipart/retrieval/text_retrieval_recall@1", 100),
        ("T→I R@1", "openclipart/retrieval/image_retrieval_recall@1", 100),
        ("T→I R@5", "openclipart/retrieval/image_retrieval_recall@5", 100),
    ],
}
SPEED_COLUMNS = [("train s", "train_runtime", 1), ("samples/s", "train_samples_per_second", 1)]


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


def benchmark_columns(results: list[dict]) -> list[tuple[str, str, int]]:
    """The columns of the benchmark the first results hold, then the speed columns all of them have."""
    keys = set(results[0])
    benchmark = next((name for name in COLUMNS if any(k.startswith(f"{name}/") for k in keys)), "shapes")
    speed = [c for c in SPEED_COLUMNS if all(c[1] in r for r in results)]
    return COLUMNS[benchmark] + speed


def group_command(runs: list[Path]) -> str | None:
    """The first run's recorded command, its --seed and --output_dir values written as the group's seeds."""
    try:
        configs = [json.loads((run / "train_config.json").read_text()) for run in runs]
        command = configs[0]["command"]
    except (OSError, KeyError, ValueError):
        return None
    seeds = [config.get("seed") for config in configs]
    words = [_relative(word) for word in shlex.split(command)]
    seed_text = "{" + ",".join(str(s) for s in seeds) + "}" if len(runs) > 1 else str(seeds[0])
    for i, word in enumerate(words[:-1]):
        if word == "--seed":
            words[i + 1] = seed_text
        if word == "--output_dir":
            words[i + 1] = re.sub(r"seed\d+$", f"seed{seed_text}", words[i + 1])
    return " ".join(words)


def _relative(word: str) -> str:
    """An absolute path under the current folder, relative to it (how a reader of the docs runs the command)."""
    if word.startswith("/"):
        try:
            return str(Path(word).relative_to(Path.cwd()))
        except ValueError:
            return word
    return word


def provenance(results: list[dict]) -> str:
    """The commits, machines and dates the runs recorded (each once)."""
    environments = [r.get("environment") or {} for r in results]
    parts = []
    for key in ("commit", "device", "date"):
        values = list(dict.fromkeys(str(e.get(key)) for e in environments if e.get(key)))
        if values:
            parts.append(f"{key} {', '.join(values)}")
    return "; ".join(parts) or "not recorded"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="*")
    parser.add_argument("--per_seed", action="store_true", help="Also print each run's values.")
    parser.add_argument("--output", default=None, help="Write the table into this markdown file (a section).")
    parser.add_argument("--title", default="results", help="The section's title in --output.")
    parser.add_argument("--regenerate", default=None, metavar="FILE",
                        help="Rerun the command of every section seed_table wrote into FILE.")
    args = parser.parse_args(argv)
    if args.regenerate:
        return "\n\n".join(main(command) for command in recorded_commands(Path(args.regenerate)))
    if not args.groups:
        parser.error("give at least one label=run_dir group, or --regenerate FILE")
    groups = {label: [load_results(run / "eval_results.json") for run in runs]
              for label, runs in parse_groups(args.groups).items()}
    columns = benchmark_columns([r for results in groups.values() for r in results])
    lines = ["| runs | n | " + " | ".join(name for name, _, _ in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    notes = []
    for (label, runs), results in zip(parse_groups(args.groups).items(), groups.values()):
        values = [[scale * r[key] for r in results] for _, key, scale in columns]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(mean_std(v) for v in values) + " |")
        if args.per_seed:
            lines += [f"| {run.name} | 1 | " + " | ".join(f"{v[i]:.1f}" for v in values) + " |"
                      for i, run in enumerate(runs)]
        command = group_command(runs)
        notes.append(f"- {label}: `{command}`" + f" ({provenance(results)})" if command else
                     f"- {label}: {provenance(results)}")
    table = "\n".join(lines + [""] + notes)
    print(table)
    if args.output:
        _write_section(Path(args.output), args.title, table, argv if argv is not None else sys.argv[1:])
    return table


def recorded_commands(path: Path) -> list[list[str]]:
    """The arguments of each seed_table command recorded in `path`'s sections, in order."""
    found = re.findall(r"<!-- seed_table: .*? -->\n\*Generated by\* `python utils/seed_table.py ([^`]*)`",
                       path.read_text(encoding="utf-8"))
    return [shlex.split(arguments) for arguments in found]


def _write_section(path: Path, title: str, table: str, argv: list[str]) -> None:
    start, end = f"<!-- seed_table: {title} -->", "<!-- /seed_table -->"
    command = shlex.join(["python", "utils/seed_table.py", *argv])
    section = f"{start}\n*Generated by* `{command}`\n\n{table}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text.lstrip("\n"), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
