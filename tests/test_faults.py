"""Nothing lost, nothing silent: output folders, bad validation data and default splits under faults."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretrain_script import run_script

from lightclip.collate import SkipCounter
from lightclip.data import default_validation_split, keep_readable_images, load_image_text_dataset
from lightclip.trainer_utils import prepare_output_dir, run_outputs


def _picture_folder(root, names: list[str], corrupt: tuple[str, ...] = ()) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        if name in corrupt:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
        else:
            Image.fromarray(np.full((16, 16, 3), (40 * k) % 256, dtype=np.uint8)).save(root / name)
    rows = [{"file_name": name, "text": f"picture number {k}"} for k, name in enumerate(names)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _a_finished_run(folder) -> None:
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "train_log.jsonl", "train_config.json", "run.yaml"):
        (folder / name).write_text("{}" if name != "train_config.json" else json.dumps({"config_file": "x/run.yaml"}))
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_text('{"step": 4}')
    (folder / "neighbors").mkdir()
    (folder / "neighbors" / "bank.json").write_text("{}")
    (folder / "my_notes.txt").write_text("mine")


def test_a_used_output_folder_is_refused(tmp_path):
    _a_finished_run(tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest.*--overwrite_output_dir"):
        prepare_output_dir(tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").exists()
    prepare_output_dir(tmp_path / "run", resume=True)  # resuming continues the run in place
    assert (tmp_path / "run" / "checkpoint-4").exists()
    prepare_output_dir(tmp_path / "fresh")  # a new or empty folder is fine
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").unlink()  # no complete checkpoint: no resume hint
    with pytest.raises(FileExistsError, match="no checkpoint to resume from. Pass --overwrite_output_dir") as error:
        prepare_output_dir(tmp_path / "run")
    assert "--resume_from_checkpoint" not in str(error.value)
    (tmp_path / "only_a_bank" / "neighbors").mkdir(parents=True)
    prepare_output_dir(tmp_path / "only_a_bank")


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    run = tmp_path / "run"
    _a_finished_run(run)
    assert {p.name for p in run_outputs(run)} == {"model.safetensors", "config.json", "train_log.jsonl",
                                                  "train_config.json", "run.yaml", "checkpoint-4"}
    prepare_output_dir(run, overwrite=True, clear=False)  # the check of the other processes removes nothing
    assert (run / "model.safetensors").exists()
    prepare_output_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["my_notes.txt", "neighbors"]
    assert (run / "neighbors" / "bank.json").exists()


def test_unreadable_validation_images_are_counted_not_fatal(tmp_path):
    _picture_folder(tmp_path / "val", ["a.png", "b.png", "c.png"], corrupt=("b.png",))
    dataset = load_image_text_dataset(str(tmp_path / "val"), "train")
    skips = SkipCounter()
    kept = keep_readable_images(dataset, skips)
    assert len(kept) == 2 and kept["captions"] == [["picture number 0"], ["picture number 2"]]
    assert skips.summary() == {"validation: unreadable image": 1}


def test_a_local_folder_validates_on_its_train_split_by_default(tmp_path):
    _picture_folder(tmp_path / "flat", ["a.png", "b.png"])
    assert default_validation_split(str(tmp_path / "flat")) == "train"
    _picture_folder(tmp_path / "split" / "validation", ["a.png"])
    assert default_validation_split(str(tmp_path / "split")) == "validation"
    assert default_validation_split("shapes") == "test"
    assert default_validation_split("someone/dataset") == "validation"
    assert len(load_image_text_dataset(str(tmp_path / "flat"), default_validation_split(str(tmp_path / "flat")))) == 2


def test_bad_validation_data_keeps_the_trained_model(tmp_path):
    _picture_folder(tmp_path / "val", ["a.png", "b.png", "c.png", "d.png"], corrupt=("c.png",))
    out = tmp_path / "out"
    run_script(["--output_dir", str(out), "--max_train_steps", "1", "--objectives", "clip",
                "--validation_data", str(tmp_path / "val"), "--eval_steps", "0"])
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    results = json.loads((out / "eval_results.json").read_text())
    assert results["skipped"] == {"validation: unreadable image": 1}
    assert results["num_images"] == 3
    with pytest.raises(AssertionError, match="already holds a training run"):
        run_script(["--output_dir", str(out), "--max_train_steps", "1", "--objectives", "clip"])


def test_soft_labels_are_computed_in_float32():
    import torch
    import torch.nn.functional as F

    from lightclip.objectives.contrastive import SoftClipLoss

    g = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(16, 32, generator=g), dim=-1) for _ in range(2))
    loss = SoftClipLoss(alpha_max=0.3)
    loss.set_progress(1.0)
    reference = loss(image.double(), text.double(), torch.tensor(30.0, dtype=torch.float64))["contrastive_loss"]
    low = loss(image.bfloat16(), text.bfloat16(), torch.tensor(30.0, dtype=torch.bfloat16))["contrastive_loss"]
    assert low.dtype == torch.float32
    assert abs(low.item() - reference.item()) < 0.05 * abs(reference.item())


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    proc = run_script(["--output_dir", str(tmp_path / "out"), "--max_train_steps", "8", "--objectives", "clip",
                       "--learning_rate", "1e30", "--max_nonfinite_steps", "2", "--eval_steps", "0"], check=False)
    assert proc.returncode != 0
    assert "2 steps in a row had a non-finite loss or gradient" in proc.stdout + proc.stderr
    assert "optimiser step skipped" in proc.stdout + proc.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_finite_step_finds_one_bad_gradient_entry(bad):
    """One non-finite entry in one gradient (or none) decides the step; a huge finite gradient is still finite."""
    from accelerate import Accelerator
    from conftest import load_script

    pretrain = load_script("examples/pretrain.py")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for p in model.parameters():
        p.grad = torch.full_like(p, 3e38)
    model[1].weight.grad[1, 2] = 1.0 if bad is None else bad
    model[0].bias.grad = None  # parameters without a gradient are left out
    accelerator = Accelerator(cpu=True)
    assert pretrain.finite_step(model, torch.tensor(1.0), accelerator) is (bad is None)
    assert pretrain.finite_step(model, torch.tensor(float("nan")), accelerator) is False


def test_gradient_clipping_option_runs(tmp_path):
    run_script(["--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--objectives", "clip",
                "--max_grad_norm", "0.5", "--eval_steps", "0"])
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(r.get("nonfinite_steps", 0) == 0 for r in log if "loss" in r)


def test_boolean_typos_are_rejected():
    from conftest import load_script

    pretrain = load_script("examples/pretrain.py")
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--sinkhorn_unroll", "ture"])
    assert pretrain.parse_args(["--sinkhorn_unroll", "yes"]).sinkhorn_unroll is True
    assert pretrain.parse_args(["--lock_image"]).lock_image is True


def test_a_truncated_checkpoint_names_its_folder(tmp_path):
    from lightclip import LightClipConfig, LightClipModel

    LightClipModel(LightClipConfig.from_preset("lightclip-xxs")).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=r"safetensors weights cannot be read .*truncated or corrupt") as error:
        LightClipModel.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_a_bad_metadata_line_names_the_file_and_line(tmp_path):
    _picture_folder(tmp_path / "data", ["a.png", "b.png"])
    metadata = tmp_path / "data" / "metadata.jsonl"
    metadata.write_text(metadata.read_text() + '{"file_name": "c.png", "text": oops}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 3: not a JSON object"):
        load_image_text_dataset(str(tmp_path / "data"))


def test_an_unreachable_hub_gives_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    from lightclip import LightClipConfig, LightClipModel, LightClipProcessor
    from lightclip.hub import push_folder, write_model_card

    config = LightClipConfig.from_preset("lightclip-xxs")
    LightClipModel(config).save_pretrained(tmp_path)
    LightClipProcessor.from_config(config).save_pretrained(tmp_path)
    write_model_card(tmp_path)

    class OfflineApi:
        def create_repo(self, *args, **kwargs):
            raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    with pytest.raises(RuntimeError, match=r"could not push .* to the Hub repository org/x: OfflineModeIsEnabled"):
        push_folder(tmp_path, "org/x", token="hf_test", api=OfflineApi())


@pytest.mark.skipif(not __import__("torch").distributed.is_gloo_available(), reason="needs gloo")
def test_two_processes_report_every_skip(tmp_path):
    """One epoch over 64 pairs (8 unreadable) on 2 processes: every unreadable image is counted once, whichever rank
    met it, and the rows cut to equalise the ranks' batches are counted too."""
    import sys

    names = [f"{k:02d}.png" for k in range(64)]
    _picture_folder(tmp_path / "train", names, corrupt=tuple(names[3::8]))
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "0", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_script(["--output_dir", str(out), "--train_data", str(tmp_path / "train"), "--max_train_steps", "4",
                "--per_device_train_batch_size", "8", "--objectives", "clip", "--eval_steps", "0"], launcher)
    skipped = json.loads((out / "eval_results.json").read_text())["skipped"]
    assert skipped["unreadable image"] == 8
    trained = 64 - 8 - skipped.get("cut to equalise batch sizes across processes", 0)
    assert trained % 2 == 0  # both ranks trained the same number of rows


def test_a_streamed_corrupt_image_is_skipped_and_counted(tmp_path):
    from lightclip import LightClipConfig, LightClipProcessor
    from lightclip.collate import ImageTextCollator

    _picture_folder(tmp_path / "data", ["a.png", "b.png", "c.png"], corrupt=("b.png",))
    dataset = load_image_text_dataset(str(tmp_path / "data"), "train", streaming=True)
    rows = list(dataset)  # iterating the stream never decodes
    assert len(rows) == 3
    processor = LightClipProcessor.from_config(LightClipConfig.from_preset("lightclip-xxs"))
    collator = ImageTextCollator(processor, train=True, image_size=32)
    batch = collator(rows)
    assert batch["index"].tolist() == [0, 2]
    assert collator.skip_counter.summary() == {"unreadable image": 1}


def _final_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_is_exact_when_whole_batches_are_skipped(tmp_path, streaming):
    """Three pictures in four are unreadable, so some batches of 2 are empty and skipped: resuming from the step-3
    checkpoint must continue from the same data position (batches consumed, not steps) and end with the same
    weights as the uninterrupted run; streamed data resumes at the same position too."""
    import shutil

    import torch

    names = [f"{k:02d}.png" for k in range(24)]
    _picture_folder(tmp_path / "train", names, corrupt=tuple(n for k, n in enumerate(names) if k % 4))
    common = ["--train_data", str(tmp_path / "train"), "--max_train_steps", "6", "--per_device_train_batch_size", "2",
              "--objectives", "clip", "--eval_steps", "0", "--checkpointing_steps", "3",
              "--checkpoints_total_limit", "3"] + (["--streaming"] if streaming else [])
    run_script(common + ["--output_dir", str(tmp_path / "full")])
    state = json.loads((tmp_path / "full" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["epoch_batches"] > 3  # some batches were empty
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed / "checkpoint-3")
    run_script(common + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    full, again = _final_weights(tmp_path / "full"), _final_weights(resumed)
    for name in full:
        torch.testing.assert_close(again[name], full[name], rtol=0, atol=1e-6, msg=name)


def test_option_values_are_checked_before_any_work():
    from conftest import load_script

    pretrain = load_script("examples/pretrain.py")
    for argv, message in [(["--push_to_hub"], "hub_model_id"), (["--token_matching", "bogus"], "token_matching"),
                          (["--objectives", "clip,typo"], "unknown objective"), (["--max_train_steps", "0"],
                                                                                  "max_train_steps")]:
        with pytest.raises(ValueError, match=message):
            pretrain.validate_args(pretrain.parse_args(argv))
    pretrain.validate_args(pretrain.parse_args([]))  # the defaults are valid
    # the script checks them first: a bad value is reported, not the data source that does not exist
    proc = run_script(["--token_matching", "bogus", "--train_data", "/nonexistent/data.csv", "--output_dir",
                       "/nonexistent/out"], check=False)
    assert proc.returncode != 0 and "token_matching" in proc.stderr and "nonexistent" not in proc.stderr


class _Payload:
    """Unpickling it creates `marker`: proof that a file was unpickled with code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_resume_runs_no_code_planted_in_a_checkpoint(tmp_path):
    """Every file of a checkpoint in turn, and an extra pickled custom state, replaced by a pickle that runs code:
    resuming refuses or resumes, and never runs it."""
    import shutil

    from conftest import load_script

    pretrain = load_script("examples/pretrain.py")
    base = ["--model", "lightclip-xxs-cnn", "--shapes_train_size", "32", "--shapes_test_size", "16",
            "--shapes_image_size", "32", "--per_device_train_batch_size", "8", "--objectives", "clip",
            "--eval_steps", "0", "--max_train_steps", "2", "--checkpointing_steps", "1", "--max_eval_samples", "16"]
    source = tmp_path / "source"
    pretrain.main(base + ["--output_dir", str(source)])
    checkpoint = source / "checkpoint-2"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json", "process_state_0.json"} <= set(files)
    assert not any(name.startswith("custom_checkpoint") for name in files)
    for name in [*files, "custom_checkpoint_0.pkl"]:
        run = tmp_path / f"run-{name}"
        run.mkdir()
        shutil.copytree(checkpoint, run / "checkpoint-2")
        marker = tmp_path / f"ran-{name}"
        torch.save(_Payload(str(marker)), run / "checkpoint-2" / name)
        try:
            pretrain.main(base + ["--output_dir", str(run), "--resume_from_checkpoint", "latest"])
        except Exception as error:  # a refusal is fine
            if name == "custom_checkpoint_0.pkl":
                assert "pickled state" in str(error)
        assert not marker.exists(), f"resuming ran code planted in {name}"


def test_latest_without_a_checkpoint_refuses_and_changes_nothing(tmp_path):
    from conftest import load_script

    pretrain = load_script("examples/pretrain.py")
    _a_finished_run(tmp_path / "run")
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint.*--overwrite_output_dir"):
        pretrain.main(["--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", "latest"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_torn_log_line_is_dropped_with_a_warning(tmp_path, caplog):
    from lightclip.trainer_utils import JsonlLog, truncate_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in JsonlLog(log).read()] == [1, 2]
    truncate_log(log, 2)
    assert "line 3 is not a JSON record" in caplog.text
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def _saved_folder(root) -> None:
    root.mkdir()
    (root / "config.json").write_text('{"old": true}')
    (root / "model.safetensors").write_bytes(b"old weights")
    (root / "checkpoint-3").mkdir()
    (root / "checkpoint-3" / "trainer_state.json").write_text('{"step": 3}')


def _save_new(folder) -> None:
    (folder / "config.json").write_text('{"new": true}')
    (folder / "model.safetensors").write_bytes(b"new weights")


def _contents(root) -> dict:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def test_a_full_disk_at_the_final_save_keeps_the_folder_and_says_why(tmp_path):
    import errno

    from lightclip.trainer_utils import save_model_folder

    root = tmp_path / "run"
    _saved_folder(root)
    before = _contents(root)

    def full_disk(folder):
        (folder / "config.json").write_text('{"new": true}')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="no space left on device. the folder keeps its previous contents; the last "
                                      "good checkpoint is .*checkpoint-3"):
        save_model_folder(root, full_disk)
    assert _contents(root) == before and sorted(p.name for p in root.iterdir()) == sorted([*before, "checkpoint-3"])
    save_model_folder(root, _save_new)
    assert _contents(root) == {"config.json": b'{"new": true}', "model.safetensors": b"new weights"}


_KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import lightclip.fileio as fileio
root, when = Path(sys.argv[1]), sys.argv[2]
def kill():
    os.kill(os.getpid(), signal.SIGKILL)
def save(folder):
    (folder / "config.json").write_text('{"new": true}')
    if when == "writing":
        kill()
    (folder / "model.safetensors").write_bytes(b"new weights")
if when == "renaming":
    replace, moved = os.replace, []
    def replace_then_kill(a, b):
        replace(a, b)
        moved.append(b)
        if len(moved) == 1:
            kill()
    fileio.os.replace = replace_then_kill
fileio.save_into_folder(root, save)
"""


@pytest.mark.parametrize("when", ["writing", "renaming"])
def test_a_kill_during_the_final_save_leaves_the_old_model_or_the_new_one(tmp_path, when):
    import subprocess
    import sys

    root = tmp_path / "run"
    _saved_folder(root)
    old = _contents(root)
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(root), when], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    prepare_output_dir(root, resume=True)  # the next run's first step completes or drops the interrupted save
    new = {"config.json": b'{"new": true}', "model.safetensors": b"new weights"}
    assert _contents(root) == (old if when == "writing" else new)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-3", "config.json", "model.safetensors"]


def test_a_full_disk_while_checkpointing_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lightclip import fileio
    from lightclip.trainer_utils import save_checkpoint

    root = tmp_path / "run"
    _saved_folder(root)

    def save_state(folder):
        (tmp_path / "run" / ".tmp-checkpoint-6").mkdir()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 32")

    accelerator = SimpleNamespace(is_main_process=True, process_index=0, wait_for_everyone=lambda: None,
                                  save_state=save_state)
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024, total=2**30))
    with pytest.raises(OSError, match="saving checkpoint-6 failed: no space left on device.*checkpoint-3"):
        save_checkpoint(accelerator, root, 6, {"step": 6})
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-3", "config.json", "model.safetensors"]
