"""The default inference path of a CNN image tower: an eval-mode forward without autograd runs a cached fused copy of
the tower (`LightClipConvVisionTower.inference_tower`) that nothing else sees, and follows every change of the
weights; training, gradients, the state dict and checkpoints see the unfused layers only. Also the glibc malloc
thresholds that inference sets once per process (`keep_freed_memory_in_heap`)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_pixels, random_rgb
from PIL import Image
from test_fuse import TOWERS, assert_close_to_scale, tower_config, trained_looking
from torch import nn

import lightclip.modeling_lightclip_convnet as convnet
from lightclip import LightClipModel, LightClipProcessor


def fast(name: str) -> tuple[LightClipModel, torch.Tensor]:
    """(a trained-looking model with the default inference path, pixels) for one CNN tower."""
    model = trained_looking(tower_config(name))
    del model.vision_model.auto_fuse  # back to the class default
    return model, random_pixels(3, size=model.config.vision_config.image_size, seed=9)


def unfused_reference(model: LightClipModel, pixels: torch.Tensor, output_hidden_states: bool = False):
    """`get_image_features` through the model's own layers (autograd on, so no fused copy is used or built)."""
    cached = fused_copy(model)
    with torch.enable_grad():
        out = model.get_image_features(pixels, output_hidden_states)
    assert fused_copy(model) is cached
    return out


def fused_copy(model: LightClipModel) -> nn.Module | None:
    cached = model.vision_model.__dict__.get("_fused_copy")
    return cached[1] if cached else None


@pytest.mark.parametrize("name", list(TOWERS))
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_inference_runs_a_fused_copy_equal_to_the_layers(name, context):
    model, pixels = fast(name)
    reference = unfused_reference(model, pixels, output_hidden_states=True)
    with context():
        out = model.get_image_features(pixels, output_hidden_states=True)
        embeds = model.encode_image(pixels)
    tower = fused_copy(model)
    assert tower is not None and tower.is_fused and not model.vision_model.is_fused
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tower.modules())
    torch.testing.assert_close(embeds, nn.functional.normalize(reference.pooler_output.detach(), dim=-1),
                               rtol=0, atol=1e-5)
    assert_close_to_scale(out.pooler_output, reference.pooler_output.detach(), 1e-4)
    for state, expected in zip(out.hidden_states, reference.hidden_states, strict=True):
        assert_close_to_scale(state, expected.detach(), 1e-4)
    with torch.no_grad():
        model.encode_image(pixels)
    assert fused_copy(model) is tower  # cached while nothing changes


def test_the_fused_copy_is_not_part_of_the_model(tmp_path):
    model, pixels = fast("mobilenetv2")
    untouched = copy.deepcopy(model)
    with torch.no_grad():
        model.encode_image(pixels)
    assert fused_copy(model) is not None
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in untouched.named_parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in untouched.named_modules()]
    state, expected = model.state_dict(), untouched.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    model.save_pretrained(tmp_path / "used")
    untouched.save_pretrained(tmp_path / "untouched")
    files = sorted(p.name for p in (tmp_path / "used").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "untouched").iterdir())
    for file in files:
        assert (tmp_path / "used" / file).read_bytes() == (tmp_path / "untouched" / file).read_bytes(), file
    assert fused_copy(copy.deepcopy(model)) is None


def test_gradients_and_training_run_the_real_layers():
    model, pixels = fast("efficientnet-lite")
    model.encode_image(pixels).sum().backward()  # eval mode, autograd on
    assert fused_copy(model) is None
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    conv = next(m for m in model.vision_model.modules() if isinstance(m, nn.Conv2d))
    assert norm.weight.grad is not None and conv.weight.grad is not None
    with torch.no_grad():
        model.encode_image(pixels)
    assert fused_copy(model) is not None
    model.train()
    assert fused_copy(model) is None  # dropped on a change of mode
    steps = int(norm.num_batches_tracked)
    with torch.no_grad():
        model.encode_image(pixels)  # training mode: BatchNorm normalises the batch and counts it
    assert int(norm.num_batches_tracked) == steps + 1 and fused_copy(model) is None


@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", "double", "train and eval"])
def test_the_fused_copy_follows_the_weights(change):
    model, pixels = fast("mobilenetv2")
    with torch.no_grad():
        before = model.encode_image(pixels)
    first = fused_copy(model)
    if change == "optimizer step":  # fine-tuning in eval mode: BatchNorm statistics fixed, weights move
        model.encode_image(pixels).sum().backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    elif change == "load_state_dict":
        model.load_state_dict(trained_looking(model.config, seed=1).state_dict())
    elif change == "double":
        model.double()
        pixels = pixels.double()
    else:
        with torch.no_grad():
            next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).running_mean.data += 1.0
        model.train().eval()  # a write through `.data` bypasses version counters; a mode switch drops the copy
    expected = nn.functional.normalize(unfused_reference(model, pixels).pooler_output.detach(), dim=-1)
    with torch.no_grad():
        after = model.encode_image(pixels)
    assert fused_copy(model) is not first
    if change == "double":
        assert after.dtype == torch.float64
    else:
        assert (after - before).abs().max() > 1e-3  # the change is visible ...
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)  # ... and the copy has it


def test_auto_fuse_off_and_fuse_in_place():
    model, pixels = fast("efficientnet")
    model.vision_model.auto_fuse = False
    with torch.no_grad():
        model.encode_image(pixels)
    assert fused_copy(model) is None
    model.vision_model.auto_fuse = True
    with torch.no_grad():
        expected = model.encode_image(pixels)
        assert fused_copy(model) is not None
        model.fuse()  # the in-place fusion needs no copy
        assert fused_copy(model) is None
        torch.testing.assert_close(model.encode_image(pixels), expected, rtol=0, atol=1e-6)
    assert fused_copy(model) is None


def test_a_model_built_in_inference_mode():
    with torch.inference_mode():
        model, pixels = fast("convnet")
        reference = model.vision_model._run_backbone(pixels, False)[0]
        tokens = model.vision_model.forward_features(pixels)[0]
    assert fused_copy(model) is not None
    assert_close_to_scale(tokens, reference, 1e-4)


def test_zero_shot_pipeline_runs_the_fused_copy(tmp_path):
    from transformers import pipeline

    model, _ = fast("mobilenetv2")
    model.save_pretrained(tmp_path)
    LightClipProcessor.from_config(model.config).save_pretrained(tmp_path)
    image, labels = Image.fromarray(random_rgb(70, 90, seed=2)), ["a red circle", "a blue square", "a dog"]
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path))
    scores = {r["label"]: r["score"] for r in classifier(image, candidate_labels=labels)}
    assert fused_copy(classifier.model) is not None and not classifier.model.vision_model.is_fused
    processor = LightClipProcessor.from_pretrained(tmp_path)
    batch = processor(text=[f"This is a photo of {label}." for label in labels], images=image, padding=True,
                      truncation=True, return_tensors="pt")
    with torch.enable_grad():  # the unfused layers
        expected = model(**batch).logits_per_image[0].softmax(-1).detach()
    torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), expected, rtol=1e-4, atol=1e-5)


def test_inference_sets_the_malloc_thresholds_once(monkeypatch):
    calls = []
    monkeypatch.setattr(convnet, "_malloc_tuned", None)
    monkeypatch.setattr(convnet, "_set_glibc_malloc_thresholds", lambda threshold: calls.append(threshold) or True)
    model, pixels = fast("convnet")
    model.encode_image(pixels)  # autograd on: the layers themselves, nothing set
    assert not calls
    with torch.no_grad():
        model.encode_image(pixels)
        model.encode_image(pixels)
    assert calls == [convnet.MALLOC_THRESHOLD]


@pytest.mark.parametrize("environment", [{"LIGHTCLIP_NO_MALLOPT": "1"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                                         {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_the_malloc_thresholds_leave_a_chosen_setting_alone(monkeypatch, environment):
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert not convnet._set_glibc_malloc_thresholds(convnet.MALLOC_THRESHOLD)


FAULTS_SCRIPT = """
import resource, torch
import lightclip.modeling_lightclip_convnet as convnet
print(convnet.keep_freed_memory_in_heap())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(3):
    start = faults()
    torch.ones(64 << 18).sum()  # a 64 MiB block, above glibc's largest dynamic mmap threshold, freed after the call
    counts.append(faults() - start)
print(counts[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_the_malloc_thresholds_spare_the_page_faults():
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    runs = {}
    for opt_out in ("0", "1"):
        result = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, check=True,
                                env={**environment, "LIGHTCLIP_NO_MALLOPT": opt_out})
        runs[opt_out] = result.stdout.split()
    if runs["0"][0] != "True":
        pytest.skip("not glibc")
    assert runs["1"][0] == "False"
    assert int(runs["1"][1]) > 10_000  # 64 MiB of 4 KiB pages mapped afresh
    assert int(runs["0"][1]) < 1_000
