#!/usr/bin/env python
"""Check that the README's main command gives back the README's numbers.

    python utils/check_readme_numbers.py                 # runs the main command (seed 0) in a temporary folder
    python utils/check_readme_numbers.py --run runs/lightclip-lite0-56px-shapes   # checks a finished run

The README's results table gives the main command's mean ± std over seeds (the row marked "(the default)"); a run
passes when each of its accuracy and recall columns reaches at least mean − 2 std (at least 1 point below the mean
for columns whose seeds agree to a decimal): a result that lands lower than the seeds' spread says the table no
longer describes the code. The main command is the last `accelerate launch` of the README's first
bash block, run with this interpreter's `accelerate` and a temporary `--output_dir`. Exit status 1 names every
column outside its range.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_table import COLUMNS  # noqa: E402

from lightclip.evaluation import load_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STDS = 2.0
MIN_MARGIN = 1.0
DEFAULT_ROW = "(the default)"


def readme_floors(readme: str) -> dict[str, float]:
    """{column: lowest accepted value} from the README's default row, for every shapes column seed_table knows."""
    known = {name: key for name, key, _ in COLUMNS["shapes"]}
    rows = [line for line in readme.splitlines() if line.startswith("|")]
    for header_index, line in enumerate(rows):
        headers = [cell.strip() for cell in line.strip("|").split("|")]
        if not set(headers) & set(known):
            continue
        for row in rows[header_index + 1:]:
            cells = [cell.strip().strip("*") for cell in row.strip("|").split("|")]
            if DEFAULT_ROW in row:
                floors = {}
                for header, cell in zip(headers, cells):
                    found = re.fullmatch(r"([\d.]+)\s*±\s*([\d.]+)", cell.replace("*", ""))
                    if header in known and found:
                        mean, std = float(found[1]), float(found[2])
                        floors[header] = mean - max(STDS * std, MIN_MARGIN)
                if floors:
                    return floors
    raise SystemExit(f"no results table with a row marked {DEFAULT_ROW!r} and 'mean ± std' cells in the README")


def main_command(readme: str) -> list[str]:
    """The README's main command: the last `accelerate launch` of its first bash block, as arguments."""
    block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL)
    found = re.search(r"accelerate (launch [^\n&]*)", block[1] if block else "")
    if found is None:
        raise SystemExit("the README's first bash block has no `accelerate launch` command")
    return [str(Path(sys.executable).parent / "accelerate"), *found[1].split()]


def check(results: dict, floors: dict[str, float]) -> tuple[list[str], list[str]]:
    """(every column's line, the lines of the columns below their floor), each naming the value and the floor."""
    keys = {name: (key, scale) for name, key, scale in COLUMNS["shapes"]}
    lines, failures = [], []
    for column, floor in floors.items():
        key, scale = keys[column]
        value = scale * results[key]
        lines.append(f"{column}: {value:.1f} (the README's table: at least {floor:.1f})")
        if value < floor:
            failures.append(lines[-1])
    return lines, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="A finished run folder (default: run the main command now).")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args(argv)
    readme = Path(args.readme).read_text(encoding="utf-8")
    floors = readme_floors(readme)
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(args.run) if args.run else Path(scratch) / "run"
        if args.run is None:
            command = [*main_command(readme), "--output_dir", str(run)]
            print("running the README's main command:", " ".join(command[1:]), flush=True)
            subprocess.run(command, cwd=ROOT, check=True)
        results = load_results(run / "eval_results.json")
    lines, failures = check(results, floors)
    print("\n".join(lines))
    if failures:
        print("the README's numbers did not come back:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("the README's numbers came back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
