"""The transformers zero-shot image classification pipeline on a saved lightclip folder, with and without the
package (trust_remote_code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import context_length, random_rgb
from PIL import Image
from transformers import pipeline

TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis template
LABELS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def classifier(saved_dir):
    return pipeline("zero-shot-image-classification", model=saved_dir)


@pytest.fixture(scope="module")
def images():
    return [Image.fromarray(random_rgb(40, 52, seed=s)) for s in range(3)]


def reference_scores(model, processor, image, labels) -> dict[str, float]:
    """softmax over labels of `logits_per_image`, computed with the model and processor directly."""
    batch = processor(text=[TEMPLATE.format(label) for label in labels], images=image, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits_per_image[0]
    return dict(zip(labels, logits.softmax(-1).tolist()))


def as_dict(result) -> dict[str, float]:
    return {r["label"]: r["score"] for r in result}


def test_pipeline_loads_lightclip(classifier):
    assert type(classifier.model).__name__ == "LightClipModel"
    assert type(classifier.image_processor).__name__ == "LightClipImageProcessor"


def test_scores_equal_softmax_of_model_logits(classifier, model, processor, images):
    result = classifier(images[0], candidate_labels=LABELS)
    scores = as_dict(result)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert [r["score"] for r in result] == sorted(scores.values(), reverse=True)
    expected = reference_scores(model, processor, images[0], LABELS)
    for label in LABELS:
        assert scores[label] == pytest.approx(expected[label], abs=1e-6)


def test_batched_images(classifier, model, processor, images):
    results = classifier(images, candidate_labels=LABELS)
    assert len(results) == len(images)
    for image, result in zip(images, results):
        expected = reference_scores(model, processor, image, LABELS)
        assert as_dict(result) == pytest.approx(expected, abs=1e-6)
    # the three images are different: the scores must be too
    assert len({tuple(as_dict(r).values()) for r in results}) == len(images)


def test_label_longer_than_context(classifier, model, processor, images):
    long_label = "a photo of " + " ".join(["very"] * 2 * context_length()) + " large dog"
    assert len(processor.tokenizer(TEMPLATE.format(long_label))["input_ids"]) > context_length()
    labels = [long_label, "a cat"]
    scores = as_dict(classifier(images[1], candidate_labels=labels))
    assert scores == pytest.approx(reference_scores(model, processor, images[1], labels), abs=1e-6)


def test_numpy_and_rgba_inputs(classifier):
    rgba = Image.fromarray(np.zeros((20, 30, 4), dtype=np.uint8), mode="RGBA")
    for image in (rgba, Image.fromarray(random_rgb(64, 64)).convert("L")):
        scores = as_dict(classifier(image, candidate_labels=LABELS))
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-6)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockLightclip(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lightclip" or name.startswith("lightclip."):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, BlockLightclip())
    try:
        import lightclip  # noqa: F401
        raise SystemExit("the block did not work")
    except ImportError:
        pass

    from PIL import Image
    from transformers import pipeline

    folder, image_path, labels = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    result = classifier(Image.open(image_path), candidate_labels=labels)
    print(json.dumps({"module": type(classifier.model).__module__, "scores": {r["label"]: r["score"] for r in result},
                      "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "lightclip")}))
    """
)


def test_trust_remote_code_without_the_package(saved_dir, model, processor, images, tmp_path):
    image_path = tmp_path / "image.png"
    images[2].save(image_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, saved_dir, str(image_path), json.dumps(LABELS)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    assert report["loaded"] == []
    assert report["scores"] == pytest.approx(reference_scores(model, processor, images[2], LABELS), abs=1e-6)
