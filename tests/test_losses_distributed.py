"""Two gloo processes give the same loss and the same DDP-averaged gradients as one process on the global batch: each
loss alone, and `LightClipForPreTraining` with every objective that needs no teacher (`all`, and SigLIP with the
others)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _dist_losses_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(Path(worker.__file__)), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("name", worker.CASES)
def test_two_processes_equal_one_process_on_the_global_batch(distributed_results, name):
    ref_loss, ref_grads = worker.run_case(name, slice(0, worker.GLOBAL_BATCH))
    got = distributed_results[name]
    torch.testing.assert_close(got["loss"], ref_loss, atol=1e-5, rtol=1e-5)
    assert ref_grads.keys() == got["grads"].keys()
    for key, grad in ref_grads.items():
        torch.testing.assert_close(got["grads"][key], grad, atol=1e-5, rtol=1e-5, msg=f"{name}: grad of {key}")
    assert any(g.abs().sum() > 1e-8 for g in ref_grads.values())


@pytest.mark.parametrize("name", ["clip", "siglip", "pretraining_all", "pretraining_siglip"])
def test_reference_is_not_the_average_of_independent_halves(name):
    """Guard against a vacuous check: without the gather, each half would see only its own 3 negatives."""
    full, grads = worker.run_case(name, slice(0, worker.GLOBAL_BATCH))
    halves = [worker.run_case(name, slice(r * 3, r * 3 + 3))[0] for r in range(worker.WORLD_SIZE)]
    assert not torch.allclose(full, sum(halves) / len(halves), atol=1e-5)
    if name.startswith("pretraining_"):  # every trainable parameter of the model takes part
        assert all(g.abs().sum() > 0 for g in grads.values())
