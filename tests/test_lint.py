"""The repository passes `ruff check` with the configuration in pyproject.toml.

ruff is in the `dev` extra, so a missing ruff fails this test rather than skipping it: a skip would let an
environment without the linter pass while the code drifts from the house style.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"
