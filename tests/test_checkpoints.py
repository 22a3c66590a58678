"""The shipped checkpoints: complete folders, a few MB, ready to push, loading and classifying through the pipeline as
the model does (the smoke test), zero-shot accuracy well above chance (computed here, never read from a file), and
loading by repo id from a local Hugging Face cache with the Hub switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_pipeline_matches_model
from huggingface_hub import ModelCard
from PIL import Image

import lightclip  # noqa: F401
from lightclip import LightClipModel, LightClipProcessor, openclipart
from lightclip.data import builtin_benchmark
from lightclip.hub import (
    CARD_KEYS,
    PICKLE_SUFFIXES,
    REMOTE_CODE_FILES,
    add_remote_code,
    validate_folder,
    weight_summary,
)
from lightclip.shapes import evaluate_shapes, make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 200  # test pictures rendered for the shapes accuracy check (the full split has 500)
CHANCE = 1 / 8
# name: (benchmark, max size of model.safetensors in MB, stored dtype, {metric: minimum}). Measured by this test's
# computation (docs/checkpoints.md); the minimums are those numbers minus about 0.1 and above 4x chance (shapes: 1/8
# for colour and shape, about 1/200 for recall@1). The Open Clip Art checkpoints are scored on the four pictures of
# examples/images (zero-shot over the 15 categories: the number right, measured 2 of 4, where chance is 4/15), and,
# when the Debian packages are installed, on the whole test split: category top-1 at least 3x its chance (1/15).
CHECKPOINTS = {
    "lightclip-xxs-lite0-shapes": ("shapes", 9.0, "F16", {"shapes/colour/acc1": 0.89,
                                                          "shapes/retrieval/text_retrieval_recall@1": 0.54,
                                                          "shapes/shape/acc1": 0.84}),
    "lightclip-lite0-clipart": ("openclipart", 16.0, "F16", {"examples right": 2, "openclipart/category/acc1": 0.2}),
}
# examples/images: (file, its category in the zero-shot task)
EXAMPLE_PICTURES = [("pig.png", "animals"), ("cherry.png", "food"), ("bus.png", "transportation"),
                    ("norway_flag.png", "signs and symbols")]
# the category task's class names, as the benchmark builds them for release 0.18 (the fifteen top-level folders)
CATEGORY_CLASSNAMES = ["animals", "buildings", "computer", "education", "electronics", "food", "geography", "office",
                       "people", "plants", "recreation", "shapes", "signs and symbols", "tools", "transportation"]
OPENCLIPART_INSTALLED = os.path.isdir(os.path.join(openclipart.DEFAULT_ROOT, "svg"))
FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
         "README.md", "eval_results.json", "training_curves.png")


def checkpoint_dir(name: str) -> Path:
    path = ROOT / "checkpoints" / name
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"shipped checkpoint {path} is missing: build it with utils/train_checkpoints.py")
    return path


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_folder(name):
    folder = checkpoint_dir(name)
    benchmark, max_mb, dtype, _ = CHECKPOINTS[name]
    assert [f for f in FILES if not (folder / f).is_file()] == []
    assert not any(p.name.endswith(PICKLE_SUFFIXES) or p.is_dir() for p in folder.iterdir())
    assert (folder / "model.safetensors").stat().st_size < max_mb * 1e6
    assert [d for d in weight_summary(folder)["dtypes"] if d.startswith("F")] == [dtype]  # BatchNorm counters: I64
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert all(data.get(key) for key in CARD_KEYS)
    assert data["datasets"] == [builtin_benchmark(benchmark).DATASET_ID] and data["model-index"]
    if benchmark == "shapes":
        assert "not a general-purpose CLIP" in card.text
    else:
        assert "Open Clip Art Library 0.18" in card.text and "Chance level is 1/15" in card.text
    report = validate_folder(folder)  # push_folder's check before upload: the pipeline, the card
    assert "model.safetensors" in dict(report["files"])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_shipped_folder_smoke(name):
    """The folder as a user loads it: `LightClipModel.from_pretrained` in float32 with finite embeddings, and the
    zero-shot pipeline scoring a test picture of its benchmark exactly as the model does."""
    folder = checkpoint_dir(name)
    model = LightClipModel.from_pretrained(folder).eval()
    processor = LightClipProcessor.from_pretrained(folder)
    assert model.dtype == torch.float32
    if CHECKPOINTS[name][0] == "shapes":
        image = make_shapes_dataset("test", num_samples=1)[0]["image"]
    else:
        image = Image.open(ROOT / "examples" / "images" / "pig.png")
    with torch.no_grad():
        embeds = model.encode_image(processor(images=[image], return_tensors="pt")["pixel_values"])
    assert torch.isfinite(embeds).all()
    assert_pipeline_matches_model(model, processor, folder, image)


SHAPES_CHECKPOINTS = [name for name, (benchmark, *_) in CHECKPOINTS.items() if benchmark == "shapes"]
CLIPART_CHECKPOINTS = [name for name, (benchmark, *_) in CHECKPOINTS.items() if benchmark == "openclipart"]


def load_checkpoint(name: str):
    folder = checkpoint_dir(name)
    model = LightClipModel.from_pretrained(folder).eval()
    assert model.dtype == torch.float32
    return model, LightClipProcessor.from_pretrained(folder), CHECKPOINTS[name][3]


@pytest.mark.parametrize("name", SHAPES_CHECKPOINTS)
def test_zero_shot_accuracy(name):
    model, processor, minimum = load_checkpoint(name)
    results = evaluate_shapes(model, processor, num_samples=NUM_SAMPLES, batch_size=100)
    print(f"{name}: shape acc1 {results['shapes/shape/acc1']:.4f}, colour acc1 {results['shapes/colour/acc1']:.4f}, "
          f"image->text recall@1 {results['shapes/retrieval/text_retrieval_recall@1']:.4f}")
    assert results["shapes/num_images"] == NUM_SAMPLES
    assert results["shapes/colour/acc1"] >= minimum["shapes/colour/acc1"] > 4 * CHANCE
    assert results["shapes/retrieval/text_retrieval_recall@1"] >= minimum[
        "shapes/retrieval/text_retrieval_recall@1"] > 20 / NUM_SAMPLES
    assert results["shapes/shape/acc1"] >= minimum["shapes/shape/acc1"] > 4 * CHANCE


@pytest.mark.parametrize("name", CLIPART_CHECKPOINTS)
def test_clipart_examples_zero_shot(name):
    """Zero-shot over the 15 Open Clip Art categories, with the benchmark's names and prompts, on the four real
    pictures of examples/images (from the test split)."""
    from lightclip.evaluation import zero_shot_classifier

    model, processor, minimum = load_checkpoint(name)
    names = CATEGORY_CLASSNAMES
    classifier = zero_shot_classifier(model, processor, names, openclipart.ZERO_SHOT_TEMPLATES)
    images = [Image.open(ROOT / "examples" / "images" / file) for file, _ in EXAMPLE_PICTURES]
    with torch.no_grad():
        embeds = model.encode_image(processor(images=images, return_tensors="pt")["pixel_values"])
    predicted = [names[i] for i in (embeds @ classifier.T).argmax(1).tolist()]
    right = sum(p == label for p, (_, label) in zip(predicted, EXAMPLE_PICTURES))
    print(f"{name}: {dict(zip([f for f, _ in EXAMPLE_PICTURES], predicted))}")
    assert right >= minimum["examples right"] >= 2


@pytest.mark.skipif(not OPENCLIPART_INSTALLED, reason="the Open Clip Art packages are not installed")
@pytest.mark.parametrize("name", CLIPART_CHECKPOINTS)
def test_clipart_benchmark_accuracy(name):
    model, processor, minimum = load_checkpoint(name)
    results = openclipart.evaluate_openclipart(model, processor, final=False, batch_size=128)
    print(f"{name}: category acc1 {results['openclipart/category/acc1']:.4f}, sub-folder acc1 "
          f"{results['openclipart/subcategory/acc1']:.4f}")
    assert results["openclipart/category/acc1"] >= minimum["openclipart/category/acc1"] >= 3 / 15


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    socket.socket.connect = no_network
    socket.create_connection = no_network
    try:  # the block works: nothing below can reach the network, HF_HUB_OFFLINE or not
        socket.create_connection(("127.0.0.1", 9))
        raise SystemExit("socket block failed")
    except AssertionError:
        pass

    import torch
    from PIL import Image
    from transformers import AutoModel, pipeline

    repo_id, folder, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    image = Image.new("RGB", (64, 64), "white")
    labels = ["a red circle", "a blue square"]
    if mode == "package":
        import lightclip
        from lightclip import LightClipModel, LightClipProcessor

        model = LightClipModel.from_pretrained(repo_id).eval()
        local = LightClipModel.from_pretrained(folder).eval()
        processor = LightClipProcessor.from_pretrained(repo_id)
        classifier = pipeline("zero-shot-image-classification", model=repo_id)
    else:  # transformers alone, the code shipped in the repository
        model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
        local = None
        classifier = pipeline("zero-shot-image-classification", model=repo_id, trust_remote_code=True)
    size = model.config.vision_config.image_size
    pixels = pixels[:, :, :size, :size]
    with torch.no_grad():
        embeds = model.encode_image(pixels)
        diff = None if local is None else float((embeds - local.encode_image(pixels)).abs().max())
    scores = {r["label"]: r["score"] for r in classifier(image, candidate_labels=labels)}
    print(json.dumps({"class": type(model).__module__, "dtype": str(model.dtype), "diff": diff,
                      "embeds": embeds.tolist(), "scores": scores,
                      "lightclip_loaded": any(m.split(".")[0] == "lightclip" for m in sys.modules)}))
    """
)


def hf_cache_with(folder: Path, hf_home: Path, repo_id: str,
                  revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """Place `folder` in the standard hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def run_offline(script_args: list[str], hf_home: Path, cwd: Path, block_package: bool = False) -> dict:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, *script_args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_load_by_repo_id_offline(tmp_path):
    folder = checkpoint_dir("lightclip-xxs-lite0-shapes")
    repo_id = "lightclip-test/lightclip-xxs-lite0-shapes"
    hf_home = tmp_path / "hf"
    add_remote_code(hf_cache_with(folder, hf_home, repo_id))  # as push_folder uploads it
    with_package = run_offline([repo_id, str(folder), "package"], hf_home, tmp_path)
    assert with_package["class"] == "lightclip.modeling_lightclip"
    assert with_package["dtype"] == "torch.float32"
    assert with_package["diff"] == 0.0
    assert sum(with_package["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    # the same embeddings as loading the folder in this process
    model = LightClipModel.from_pretrained(folder).eval()
    torch.manual_seed(0)
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, 64, 64)[:, :, :size, :size]
    with torch.no_grad():
        expected = model.encode_image(pixels)
    torch.testing.assert_close(torch.tensor(with_package["embeds"]), expected, rtol=0, atol=1e-6)

    remote = run_offline([repo_id, str(folder), "remote"], hf_home, tmp_path)
    assert remote["class"].startswith("transformers_modules.") and not remote["lightclip_loaded"]
    torch.testing.assert_close(torch.tensor(remote["embeds"]), expected, rtol=0, atol=1e-6)
    assert remote["scores"] == pytest.approx(with_package["scores"], abs=1e-6)



@pytest.mark.parametrize("name", CHECKPOINTS)
def test_shipped_checkpoints_carry_no_code_copies(name, tmp_path):
    """The package is the single source of the remote code: shipped folders hold none, and `add_remote_code` (run by
    `push_folder`) copies the package's current files next to the `auto_map` that points at them."""
    folder = checkpoint_dir(name)
    assert not list(folder.glob("*.py"))
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert {v.split(".")[0] + ".py" for v in auto_map.values()} <= set(REMOTE_CODE_FILES)
    add_remote_code(tmp_path)
    for file in REMOTE_CODE_FILES:
        assert (tmp_path / file).read_text() == (ROOT / "src" / "lightclip" / file).read_text(), file
