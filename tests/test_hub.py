"""lightclip.hub: model cards, validation, upload through a fake HfApi, the push CLI, and safetensors-only loading.

Nothing here reaches the Hub: uploads go to a fake client injected at the `HfApi` boundary, and the token is a
made-up string that must never appear in what the code prints or logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script, make_model
from huggingface_hub import ModelCard

import lightclip  # noqa: F401
from lightclip import LightClipModel
from lightclip.hub import CARD_KEYS, REMOTE_CODE_FILES, push_folder, upload_files, write_model_card

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_lightclipTestSecret0123456789abcdef"
EVAL = {"shapes/shape/acc1": 0.4321, "shapes/shape/acc1_unseen": 0.3456, "shapes/colour/acc1": 0.8765,
        "shapes/retrieval/text_retrieval_recall@1": 0.1111, "shapes/num_images": 500, "step": 600, "skipped": {}}
TRAIN = {"model": "lightclip-xxs", "train_data": "shapes", "max_train_steps": 600, "per_device_train_batch_size": 64,
         "gradient_accumulation_steps": 1, "seed": 7, "learning_rate": 0.002, "weight_decay": 0.1}
COMMAND = "python examples/pretrain.py --model lightclip-xxs --max_train_steps 600 --seed 7"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, processor) -> Path:
    """A folder as examples/pretrain.py leaves it: model, processor, configs, results, a log and a sub-folder."""
    folder = tmp_path_factory.mktemp("run") / "lightclip-xxs-test"
    model = make_model(seed=3, objectives=["lightclip"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps(EVAL))
    (folder / "train_config.json").write_text(json.dumps(TRAIN))
    (folder / "train_log.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (folder / "checkpoints" / "step_600").mkdir(parents=True)
    (folder / "checkpoints" / "step_600" / "optimizer.bin").write_bytes(b"not uploaded")
    write_model_card(folder, command=COMMAND)
    return folder


@pytest.fixture()
def folder(run_folder, tmp_path) -> Path:
    """A private copy of `run_folder` that a test may change."""
    return Path(shutil.copytree(run_folder, tmp_path / run_folder.name))


class FakeHfApi:
    """Records the calls `push_folder` makes on the Hub client."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

    def upload_folder(self, *args, **kwargs):
        self.calls.append(("upload_folder", args, kwargs))
        return argparse.Namespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abc")


class ExplodingApi:
    def __getattr__(self, name):
        raise AssertionError(f"HfApi.{name} called during a dry run")


# ------------------------------------------------------------------------------------------------------------------
# model card
# ------------------------------------------------------------------------------------------------------------------


def test_card_metadata(run_folder):
    card = ModelCard.load(run_folder / "README.md")
    data = card.data.to_dict()
    assert all(data.get(key) for key in CARD_KEYS)
    assert "synthetic-data" in data["tags"]
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "zero-shot-image-classification"
    assert data["license"] == "apache-2.0"
    assert "lightclip" in data["tags"]
    assert data["datasets"] == ["lightclip-shapes"]
    metrics = {m["name"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics["zero-shot shape top-1 accuracy"] == EVAL["shapes/shape/acc1"]
    assert metrics["zero-shot colour top-1 accuracy"] == EVAL["shapes/colour/acc1"]
    assert metrics["zero-shot shape top-1 accuracy, held-out compositions"] == EVAL["shapes/shape/acc1_unseen"]
    assert len(data["model-index"][0]["results"]) == 1  # one task and dataset holding the three metrics


def test_card_body(run_folder):
    text = ModelCard.load(run_folder / "README.md").text
    model = LightClipModel.from_pretrained(run_folder)
    image = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision_model", "visual_projection")))
    text_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("text_model", "text_projection")))
    total = sum(p.numel() for p in model.parameters())
    for count in (image, text_params, total):
        assert f"{count:,}" in text
    assert COMMAND in text
    assert "| zero-shot shape top-1 | 0.4321 |" in text
    assert "| seed | 7 |" in text and "| steps | 600 |" in text and "| skipped samples | none |" in text
    assert "soft: InfoNCE" in text and "token: patch-word" in text and "mlm:" in text
    assert "not a general-purpose CLIP" in text
    assert "trust_remote_code=True" in text and "LightClipModel.from_pretrained" in text
    assert "`model.safetensors`" in text and "optimizer.bin" not in text and "train_log.jsonl" not in text


def test_card_from_old_top1_keys_is_unchanged(run_folder, folder):
    """An `eval_results.json` with the former `top1` names makes the same card, metadata included."""
    old = {key.replace("/acc1", "/top1"): value for key, value in EVAL.items()}
    assert old != EVAL
    (folder / "eval_results.json").write_text(json.dumps(old))
    write_model_card(folder, command=COMMAND)
    assert (folder / "README.md").read_text() == (run_folder / "README.md").read_text()


def test_card_names_skipped_samples(folder):
    results = {**EVAL, "skipped": {"unreadable image": 3, "truncated caption": 2}}
    (folder / "eval_results.json").write_text(json.dumps(results))
    write_model_card(folder, command=COMMAND)
    text = ModelCard.load(folder / "README.md").text
    assert "| skipped samples | truncated caption: 2, unreadable image: 3 |" in text


def test_card_without_training_files(run_folder, tmp_path):
    folder = Path(shutil.copytree(run_folder, tmp_path / "bare"))
    (folder / "train_config.json").unlink()
    (folder / "eval_results.json").unlink()
    write_model_card(folder, repo_id="someone/bare")
    card = ModelCard.load(folder / "README.md")
    assert "training budget is not recorded" in card.text
    assert "No `eval_results.json`" in card.text
    assert 'from_pretrained("someone/bare")' in card.text
    assert "model-index" not in card.data.to_dict()
    assert "synthetic" not in card.text  # nothing says what it was trained on, so the card claims nothing


def test_card_for_other_training_data(run_folder, tmp_path):
    """A run on other data (a hub dataset id, retrieval results) gets no shapes claims and its own metrics."""
    folder = Path(shutil.copytree(run_folder, tmp_path / "captions"))
    (folder / "train_config.json").write_text(json.dumps({**TRAIN, "train_data": "someone/captions"}))
    (folder / "eval_results.json").write_text(json.dumps({"image_retrieval_recall@1": 0.25, "step": 10}))
    write_model_card(folder, command=COMMAND)
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["datasets"] == ["someone/captions"] and "synthetic-data" not in data["tags"]
    assert "model-index" not in data
    assert "| image_retrieval_recall@1 | 0.2500 |" in card.text
    assert "lightclip-shapes" not in card.text and "Chance level" not in card.text
    assert "Trained from scratch on someone/captions" in card.text


# ------------------------------------------------------------------------------------------------------------------
# upload
# ------------------------------------------------------------------------------------------------------------------


def test_upload_file_selection(run_folder):
    files, skipped = upload_files(run_folder)
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "processor_config.json",
            "modeling_lightclip.py", "configuration_lightclip.py", "eval_results.json"} <= set(files)
    assert "checkpoints/" in skipped and "train_log.jsonl" in skipped
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)


def test_push_calls_create_repo_then_upload_folder(folder, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    api = FakeHfApi()
    with caplog.at_level(logging.DEBUG):
        report = push_folder(folder, "org/lightclip-test", private=True, api=api, commit_message="first upload")
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    _, args, kwargs = api.calls[0]
    assert args == ("org/lightclip-test",)
    assert kwargs == {"private": True, "exist_ok": True, "repo_type": "model", "token": SECRET}
    _, args, kwargs = api.calls[1]
    assert kwargs["folder_path"] == str(folder) and kwargs["repo_id"] == "org/lightclip-test"
    assert kwargs["repo_type"] == "model" and kwargs["commit_message"] == "first upload"
    assert kwargs["token"] == SECRET
    assert sorted(kwargs["allow_patterns"]) == sorted(upload_files(folder)[0])
    assert report["commit_url"].endswith("/commit/0123abc")
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err + caplog.text
    assert "model.safetensors" in out.out


def test_push_explicit_token_wins(folder, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_other")
    api = FakeHfApi()
    push_folder(folder, "org/x", token=SECRET, api=api)
    assert api.calls[0][2]["private"] is False
    assert all(call[2]["token"] == SECRET for call in api.calls)
    assert SECRET not in "".join(capsys.readouterr())


def test_push_without_token_uploads_nothing(folder, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    api = FakeHfApi()
    with pytest.raises(RuntimeError, match="HF_TOKEN"):
        push_folder(folder, "org/x", api=api)
    assert api.calls == []


def test_dry_run_validates_and_lists(folder, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    report = push_folder(folder, "org/x", dry_run=True, api=ExplodingApi())
    out = capsys.readouterr().out
    assert "would upload" in out
    for name, size in report["files"]:
        assert name in out
        assert size == (folder / name).stat().st_size
    assert "checkpoints/" in out  # listed as left out
    assert sum(s["score"] for s in report["pipeline"]) == pytest.approx(1.0, abs=1e-5)
    assert SECRET not in out


@pytest.mark.parametrize("breakage, message", [
    ("no_card", "missing README.md"),
    ("no_weights", "missing model.safetensors"),
    ("pickle", "pickled files"),
    ("card_metadata", "model card metadata lacks"),
])
def test_validation_refuses_broken_folders(folder, breakage, message):
    if breakage == "no_card":
        (folder / "README.md").unlink()
    elif breakage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif breakage == "pickle":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    else:
        (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a card without the other keys\n")
    api = FakeHfApi()
    with pytest.raises(ValueError, match=message):
        push_folder(folder, "org/x", token=SECRET, api=api)
    assert api.calls == []


def test_push_cli(folder, monkeypatch, capsys):
    script = load_script("examples/push_to_hub.py")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    report = script.main(["--folder", str(folder), "--repo_id", "org/cli", "--dry_run"], api=ExplodingApi())
    assert report["files"]
    api = FakeHfApi()
    script.main(["--folder", str(folder), "--repo_id", "org/cli", "--private", "--commit_message", "hello",
                 "--write_card"], api=api)
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["commit_message"] == "hello"
    assert 'from_pretrained("org/cli")' in (folder / "README.md").read_text()
    assert SECRET not in "".join(capsys.readouterr())


def test_training_script_push_calls_push_folder(monkeypatch, tmp_path):
    pretrain = load_script("examples/pretrain.py")
    calls = []
    monkeypatch.setattr("lightclip.hub.push_folder", lambda *a, **k: calls.append((a, k)))
    pretrain._push(tmp_path, argparse.Namespace(hub_model_id="org/run", hub_private=True))
    assert calls == [((tmp_path, "org/run"), {"private": True})]
    with pytest.raises(ValueError, match="hub_model_id"):
        pretrain._push(tmp_path, argparse.Namespace(hub_model_id=None, hub_private=False))


def test_package_checkpoint_float16(run_folder, tmp_path):
    package_checkpoint = load_script("utils/train_checkpoints.py").package_checkpoint
    out = package_checkpoint(run_folder, tmp_path / "packaged", dtype="float16", train_command=COMMAND, evaluate=False)
    # everything the run would upload, except the code copies: push_folder adds the package's current code
    expected = [name for name in upload_files(run_folder)[0] if name not in REMOTE_CODE_FILES]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert (out / "model.safetensors").stat().st_size < 0.55 * (run_folder / "model.safetensors").stat().st_size
    reference = LightClipModel.from_pretrained(run_folder)
    packaged = LightClipModel.from_pretrained(out)
    assert packaged.dtype == torch.float32  # config.json keeps float32: loads upcast
    for (name, a), (_, b) in zip(reference.state_dict().items(), packaged.state_dict().items()):
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0, msg=name)
    assert "F16 safetensors" in (out / "README.md").read_text()


# ------------------------------------------------------------------------------------------------------------------
# loading reads safetensors only
# ------------------------------------------------------------------------------------------------------------------


def test_pickle_only_folder_is_refused_unopened(run_folder, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(run_folder / "config.json", folder)
    torch.save(LightClipModel.from_pretrained(run_folder).state_dict(), folder / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    from transformers import AutoModel, pipeline

    for load in (LightClipModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError, match=r"pytorch_model\.bin.*safetensors only.*never unpickles"):
            load(folder)
    with pytest.raises(ValueError, match="safetensors only"):  # the pipeline wraps the loader's error
        pipeline("zero-shot-image-classification", model=str(folder))
    with pytest.raises(ValueError, match="use_safetensors=False"):
        LightClipModel.from_pretrained(run_folder, use_safetensors=False)


# ------------------------------------------------------------------------------------------------------------------
# remote code
# ------------------------------------------------------------------------------------------------------------------

REMOTE_CNN_SCRIPT = """
import importlib.abc, json, sys

class BlockLightclip(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lightclip" or name.startswith("lightclip."):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, BlockLightclip())
import torch
from transformers import AutoModel

folder, inputs = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
report = {}
for name, kwargs in {"plain": {}, "fused": {"fuse": True}, "eager": {"attn_implementation": "eager"}}.items():
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()
    with torch.no_grad():
        report[name] = {"image": model.encode_image(inputs["pixels"]).tolist(),
                        "text": model.encode_text(inputs["input_ids"], inputs["attention_mask"]).tolist(),
                        "tower": type(model.vision_model).__module__, "fused": model.vision_model.is_fused,
                        "attn": model.config.text_config._attn_implementation}
report["lightclip_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] == "lightclip")
print(json.dumps(report))
"""


def test_cnn_checkpoint_loads_with_remote_code_alone(tmp_path):
    """A CNN tower's checkpoint carries the CNN module beside the weights and loads, fuses and switches attention
    with transformers alone, the package unimportable, giving the package's embeddings."""
    import subprocess
    import sys

    from lightclip import LightClipConfig

    torch.manual_seed(2)
    model = LightClipModel(LightClipConfig.from_preset("lightclip-xxs-cnn"))
    with torch.no_grad():
        for seed in range(2):  # BatchNorm statistics from training batches, so fusing folds something
            model.train().vision_model(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    model.eval().save_pretrained(tmp_path / "model")
    saved = {path.name for path in (tmp_path / "model").iterdir()}
    assert {"modeling_lightclip_convnet.py", "modeling_lightclip_outputs.py"} <= saved
    inputs = {"pixels": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
              "input_ids": torch.tensor([[2, 40, 41, 3, 0], [2, 50, 51, 52, 3]])}
    inputs["attention_mask"] = (inputs["input_ids"] != 0).long()
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", REMOTE_CNN_SCRIPT, str(tmp_path / "model"),
                           str(tmp_path / "inputs.pt")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report.pop("lightclip_loaded") == []
    with torch.no_grad():
        image = model.encode_image(inputs["pixels"])
        text = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    for name, loaded in report.items():
        assert loaded["tower"].startswith("transformers_modules.") and loaded["tower"].endswith(
            ".modeling_lightclip_convnet"), name
        assert loaded["fused"] == (name == "fused") and loaded["attn"] == ("eager" if name == "eager" else "sdpa")
        torch.testing.assert_close(torch.tensor(loaded["image"]), image, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(torch.tensor(loaded["text"]), text, rtol=0, atol=1e-5, msg=name)
