import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "utils"))
import check_readme_numbers  # noqa: E402
from seed_table import COLUMNS  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_states_a_range_for_every_shapes_column_and_its_main_command():
    floors = check_readme_numbers.readme_floors(README)
    assert list(floors) == [name for name, _, _ in COLUMNS["shapes"]]
    assert all(0 < floor < 100 for floor in floors.values())
    assert check_readme_numbers.main_command(README)[1:] == ["launch", "examples/pretrain.py"]


def write_run(folder: Path, floors: dict, shift: dict[str, float]) -> Path:
    folder.mkdir()
    keys = {name: (key, scale) for name, key, scale in COLUMNS["shapes"]}
    results = {keys[c][0]: (floor + shift.get(c, 0.5)) / keys[c][1] for c, floor in floors.items()}
    (folder / "eval_results.json").write_text(json.dumps(results))
    return folder


def test_a_run_above_the_floors_passes_and_one_column_below_fails(tmp_path, capsys):
    floors = check_readme_numbers.readme_floors(README)
    inside = write_run(tmp_path / "inside", floors, {})
    assert check_readme_numbers.main(["--run", str(inside)]) == 0
    outside = write_run(tmp_path / "outside", floors, {"colour top-1 unseen": -0.5})
    assert check_readme_numbers.main(["--run", str(outside)]) == 1
    error = capsys.readouterr().err
    assert "colour top-1 unseen" in error and "shape top-1:" not in error


def test_the_floor_is_two_stds_below_the_mean_and_at_least_a_point(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("| `--objectives` | shape top-1 | colour top-1 | train s |\n|---|---|---|---|\n"
                      "| `clip` (the default) | 80.0 ± 5.0 | **99.0 ± 0.2** | 100 |\n")
    assert check_readme_numbers.readme_floors(readme.read_text()) == {"shape top-1": 70.0, "colour top-1": 98.0}


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    test_command = next(block.strip() for block in blocks if "pytest" in block)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == test_command and "utils/check_readme_numbers.py" in test_command
