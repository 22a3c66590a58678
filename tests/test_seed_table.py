import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "utils"))
import seed_table  # noqa: E402


def write_run(path: Path, shape: float, colour: float) -> Path:
    path.mkdir()
    results = {f"shapes/{k}": 0.5 for k in ["shape/acc1_unseen", "colour/acc1_unseen",
                                             "retrieval/text_retrieval_recall@1", "retrieval/image_retrieval_recall@1"]}
    (path / "eval_results.json").write_text(json.dumps({**results, "shapes/shape/acc1": shape,
                                                        "shapes/colour/acc1": colour}))
    return path


def test_groups_give_mean_and_sample_std(tmp_path):
    a0, a1, a2 = (write_run(tmp_path / f"a{i}", shape, 0.9) for i, shape in enumerate([0.8, 0.9, 1.0]))
    b = write_run(tmp_path / "b", 0.5, 0.25)
    table = seed_table.main([f"x={a0},{a1}", str(a2), f"y={b}"]).splitlines()
    assert table[2].startswith("| x | 3 | 90.0 ± 10.0 | 50.0 ± 0.0 | 90.0 ± 0.0 |")
    assert table[3].startswith("| y | 1 | 50.0 | 50.0 | 25.0 |")


def test_a_repeated_label_adds_runs_as_shell_braces_expand(tmp_path):
    """`x=runs/seed{0,1,2}` reaches the script as `x=runs/seed0 x=runs/seed1 x=runs/seed2`: one group of three."""
    runs = [write_run(tmp_path / f"a{i}", shape, 0.9) for i, shape in enumerate([0.8, 0.9, 1.0])]
    table = seed_table.main([f"x={run}" for run in runs]).splitlines()
    assert len(table) == 3 and table[2].startswith("| x | 3 | 90.0 ± 10.0 |")


def test_a_run_before_any_label_is_an_error(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="before any label"):
        seed_table.main([str(tmp_path)])
