"""Tests of lightclip.evaluation: metrics on hand-built embeddings, the prompt ensemble, the linear probe, runners."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from torch import nn

from lightclip.evaluation import (
    DEFAULT_TEMPLATES,
    OPENAI_IMAGENET_TEMPLATES,
    evaluate_linear_probe,
    evaluate_retrieval,
    evaluate_zero_shot,
    linear_probe,
    load_results,
    retrieval_metrics,
    save_results,
    zero_shot_accuracy,
    zero_shot_classifier,
)

REPO = Path(__file__).resolve().parents[1]


def random_rotation(dim: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal matrix: rotating every embedding by it leaves all cosine similarities unchanged."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


# ---------------------------------------------------------------------------------------------------------------
# zero-shot accuracy
# ---------------------------------------------------------------------------------------------------------------


def test_zero_shot_accuracy_acc1_miss_acc5_hit():
    classifier = torch.eye(6)  # class c is the basis vector e_c
    descending = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # ranks class 0 first, class 5 last
    image_embeds = torch.stack([torch.eye(6)[0], descending, descending])
    labels = torch.tensor([0, 2, 5])
    # image 0: class 0 ranked 1st -> acc1 and acc5 hit; image 1: class 2 ranked 3rd -> acc5 hit only;
    # image 2: class 5 ranked 6th -> miss both. One image per class: mean per-class recall = acc1.
    rotation = random_rotation(6)
    result = zero_shot_accuracy(image_embeds @ rotation, classifier @ rotation, labels)
    assert result == pytest.approx({"acc1": 1 / 3, "acc5": 2 / 3, "mean_per_class_recall": 1 / 3})


def test_zero_shot_accuracy_accepts_numpy_and_drops_acc5_below_five_classes():
    result = zero_shot_accuracy(np.eye(3), np.eye(3), np.array([0, 1, 0]))
    # class 0: 1 of 2 images right, class 1: 1 of 1 (class 2 has no image and does not count)
    assert result == pytest.approx({"acc1": 2 / 3, "mean_per_class_recall": (1 / 2 + 1) / 2})


def test_zero_shot_acc1_acc5_match_brute_force_ranking():
    gen = torch.Generator().manual_seed(0)
    image_embeds, classifier = torch.randn(50, 8, generator=gen), torch.randn(12, 8, generator=gen)
    labels = torch.randint(0, 12, (50,), generator=gen).tolist()
    scores = nn.functional.normalize(image_embeds, dim=-1) @ nn.functional.normalize(classifier, dim=-1).T
    ranked = [row.argsort(descending=True).tolist() for row in scores]  # no ties among random floats
    expected = {f"acc{k}": np.mean([label in row[:k] for row, label in zip(ranked, labels)]) for k in (1, 5)}
    expected["mean_per_class_recall"] = np.mean([
        np.mean([row[0] == label for row, label in zip(ranked, labels) if label == c]) for c in set(labels)
    ])
    assert zero_shot_accuracy(image_embeds, classifier, labels) == pytest.approx(expected)


def test_zero_shot_accuracy_ties_count_against_the_true_class():
    # an image equally similar to all classes is never credited
    result = zero_shot_accuracy(torch.ones(2, 4), torch.eye(4), torch.tensor([0, 3]), topk=(1, 3, 4))
    assert result == {"acc1": 0.0, "acc3": 0.0, "acc4": 1.0, "mean_per_class_recall": 0.0}


# ---------------------------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------------------------


def _unit(*coords: float) -> list[float]:
    """A unit vector in R^4 with the given first three coordinates."""
    return [*coords, math.sqrt(1 - sum(c * c for c in coords))]


def test_retrieval_metrics_several_captions_per_image():
    images = torch.eye(4)[:3]  # image i = e_i, so sim(image i, caption j) = caption j's i-th coordinate
    captions = torch.tensor(
        [
            _unit(0.1, 0.7, 0.2),  # image 0; own image ranked 3rd
            _unit(0.9, 0.3, 0.1),  # image 0; own image ranked 1st
            _unit(0.5, 0.4, 0.3),  # image 1; 2nd
            _unit(0.2, 0.3, 0.6),  # image 1; 2nd
            _unit(0.1, 0.2, 0.8),  # image 2; 1st
            _unit(0.3, 0.5, 0.05),  # image 2; 3rd
        ]
    )
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    # text -> image: hits @1 = captions 1, 4; @2 adds 2, 3; @3 all.
    # image -> text, by column: image 0 -> caption 1 (0.9) is first: only its 2nd caption is retrieved, a hit @1.
    # image 1 -> captions 0 (0.7) and 5 (0.5) outrank its best caption 2 (0.4): a hit only @3.
    # image 2 -> caption 4 (0.8) first: a hit @1.
    expected = {
        "image_retrieval_recall@1": 2 / 6,
        "image_retrieval_recall@2": 4 / 6,
        "image_retrieval_recall@3": 6 / 6,
        "text_retrieval_recall@1": 2 / 3,
        "text_retrieval_recall@2": 2 / 3,
        "text_retrieval_recall@3": 3 / 3,
    }
    rotation = random_rotation(4, seed=1)
    assert retrieval_metrics(images @ rotation, captions @ rotation, text_to_image, ks=(1, 2, 3)) == pytest.approx(
        expected
    )
    # the order of the captions does not matter, and the embeddings need not be normalised
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = retrieval_metrics(3 * images, captions[perm] * 0.5, text_to_image[perm], ks=(1, 2, 3))
    assert shuffled == pytest.approx(expected)


def test_retrieval_metrics_skips_images_without_captions_in_image_to_text():
    images = torch.eye(3)
    texts = torch.eye(3)[:2]
    result = retrieval_metrics(images, texts, torch.tensor([0, 1]), ks=(1,))
    assert result == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


def test_nan_embeddings_score_zero_not_one():
    nan = torch.full((3, 4), float("nan"))
    assert zero_shot_accuracy(nan, torch.eye(4), torch.tensor([0, 1, 2]), topk=(1,)) == {
        "acc1": 0.0, "mean_per_class_recall": 0.0}
    result = retrieval_metrics(nan, nan, torch.tensor([0, 1, 2]), ks=(1,))
    assert result == {"image_retrieval_recall@1": 0.0, "text_retrieval_recall@1": 0.0}


def test_retrieval_metrics_rejects_bad_indices():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))


# ---------------------------------------------------------------------------------------------------------------
# fakes: a model and processor that expose the lightclip interface
# ---------------------------------------------------------------------------------------------------------------

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
DIM = 8


def text_vector(text: str) -> torch.Tensor:
    """An unnormalised embedding: 3x the one-hot of the colour named in `text`, plus text-specific noise."""
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    vector = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    for i, colour in enumerate(COLOURS):
        if colour in text:
            vector[i] += 3.0
    return vector


class FakeProcessor:
    """images -> mean RGB in [0, 1] as `pixel_values` (B, 3); texts -> one id per text."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, images=None, text=None, padding=False, truncation=False, return_tensors=None):
        out = {}
        if images is not None:
            means = [np.asarray(image, dtype=np.float32).mean((0, 1)) / 255 for image in images]
            out["pixel_values"] = torch.tensor(np.stack(means))
        if text is not None:
            out["input_ids"] = torch.tensor([[self.vocab.setdefault(t, len(self.vocab))] for t in text])
            out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out


class FakeModel(nn.Module):
    def __init__(self, processor: FakeProcessor):
        super().__init__()
        self.processor = processor
        self.image_projection = nn.Linear(3, DIM, bias=False)
        with torch.no_grad():
            self.image_projection.weight.copy_(torch.eye(DIM, 3))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.modes_seen: list[bool] = []

    def encode_image(self, pixel_values, normalize=True):
        self.modes_seen.append(self.training)
        embeds = self.image_projection(pixel_values)
        return nn.functional.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(self, input_ids, attention_mask=None, normalize=True):
        self.modes_seen.append(self.training)
        assert attention_mask is not None and not torch.is_grad_enabled()
        texts = {i: t for t, i in self.processor.vocab.items()}
        embeds = torch.stack([text_vector(texts[int(i)]) for i in input_ids[:, 0]])
        return nn.functional.normalize(embeds, dim=-1) if normalize else embeds


@pytest.fixture
def fake():
    processor = FakeProcessor()
    return FakeModel(processor), processor


def colour_dataset(per_colour: int = 4):
    from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    rows = {"image": [], "label": [], "captions": [], "seen": []}
    for i in range(per_colour):
        for label, (name, rgb) in enumerate(COLOURS.items()):
            rows["image"].append(PILImage.new("RGB", (8, 8), rgb))
            rows["label"].append(label)
            rows["captions"].append([f"a {name} thing number {i}", f"something {name} #{i}"])
            rows["seen"].append(i % 2 == 0)
    features = Features(
        image=Image(), label=ClassLabel(names=list(COLOURS)), captions=Sequence(Value("string")), seen=Value("bool")
    )
    return Dataset.from_dict(rows, features=features)


# ---------------------------------------------------------------------------------------------------------------
# prompt ensemble
# ---------------------------------------------------------------------------------------------------------------


def test_zero_shot_classifier_is_renormalised_mean_of_normalised_prompts(fake):
    model, processor = fake
    classnames, templates = ["red", "blue"], ["a photo of a {}.", "{} art", "the {c}, a {c}"]
    classifier = zero_shot_classifier(model, processor, classnames, templates, batch_size=4)
    prompts = {
        "red": ["a photo of a red.", "red art", "the red, a red"],
        "blue": ["a photo of a blue.", "blue art", "the blue, a blue"],
    }
    for row, name in zip(classifier, classnames):
        unit = [v / v.norm() for v in map(text_vector, prompts[name])]
        mean = torch.stack(unit).mean(0)
        torch.testing.assert_close(row, mean / mean.norm())
    assert set(processor.vocab) == {p for ps in prompts.values() for p in ps}


def test_openai_imagenet_templates_are_the_published_80():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(OPENAI_IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 and t.count("{") == 1 and t.count("}") == 1 for t in OPENAI_IMAGENET_TEMPLATES)
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert "itap of a {}." in OPENAI_IMAGENET_TEMPLATES and "a {} in a video game." in OPENAI_IMAGENET_TEMPLATES
    assert set(DEFAULT_TEMPLATES) - set(OPENAI_IMAGENET_TEMPLATES) == {"a {}."}


def test_templates_by_name_equal_the_list(fake):
    model, processor = fake
    classnames = ["red", "green", "blue"]
    by_name = zero_shot_classifier(model, processor, classnames, "openai")
    torch.testing.assert_close(by_name, zero_shot_classifier(model, processor, classnames, OPENAI_IMAGENET_TEMPLATES))
    assert len(processor.vocab) == 3 * 80  # every class with every template
    torch.testing.assert_close(zero_shot_classifier(model, processor, classnames, "default"),
                               zero_shot_classifier(model, processor, classnames, DEFAULT_TEMPLATES))
    dataset = colour_dataset(per_colour=2)
    assert evaluate_zero_shot(model, processor, dataset, classnames, "openai", "label", progress=False) == \
        evaluate_zero_shot(model, processor, dataset, classnames, list(OPENAI_IMAGENET_TEMPLATES), "label",
                           progress=False)
    for bad in ("imagenet", "a photo of a {}."):  # an unknown set; a lone template is not split into characters
        with pytest.raises(ValueError, match="template set"):
            zero_shot_classifier(model, processor, classnames, bad)


# ---------------------------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------------------------


def test_linear_probe_separable_problem_is_solved():
    gen = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(3, 16, generator=gen)

    def sample(n):
        labels = torch.arange(n) % 3
        return centres[labels] + 0.5 * torch.randn(n, 16, generator=gen), labels

    (train_x, train_y), (test_x, test_y) = sample(150), sample(90)
    weight_decays = (1e-4, 1e-2, 1.0)
    result = linear_probe(train_x, train_y, test_x, test_y, weight_decays=weight_decays)
    assert result["acc1"] == 1.0
    assert result["weight_decay"] in weight_decays and result["val_acc1"] == 1.0


def test_linear_probe_random_labels_are_near_chance():
    gen = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(400, 32, generator=gen), torch.randn(2000, 32, generator=gen)
    train_y = torch.randint(0, 4, (400,), generator=gen)
    test_y = torch.randint(0, 4, (2000,), generator=gen)
    result = linear_probe(train_x.numpy(), train_y.numpy(), test_x, test_y, seed=3)
    assert 0.19 < result["acc1"] < 0.31
    assert result["val_acc1"] < 0.45


def test_linear_probe_single_weight_decay_skips_selection():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([0, 0, 1, 1])
    result = linear_probe(x, y, x, y, weight_decays=(1e-3,))
    assert result["acc1"] == 1.0 and result["weight_decay"] == 1e-3 and math.isnan(result["val_acc1"])


# ---------------------------------------------------------------------------------------------------------------
# runners with the fake model
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_zero_shot_with_groups_restores_training_mode(fake):
    model, processor = fake
    model.train()
    model.image_projection.eval()  # a frozen submodule must stay in eval mode
    dataset = colour_dataset()
    result = evaluate_zero_shot(
        model, processor, dataset, list(COLOURS), ["a photo of a {}.", "a {} object."], "label",
        batch_size=5, group_column="seen", progress=False,
    )
    assert result == {
        "acc1": 1.0, "mean_per_class_recall": 1.0, "acc1_seen": 1.0, "acc1_unseen": 1.0, "num_images": 12,
        "num_images_seen": 6, "num_images_unseen": 6,
    }
    assert model.training and not model.image_projection.training
    assert model.modes_seen and not any(model.modes_seen)


def test_evaluate_retrieval_matches_metrics_on_embeddings(fake):
    model, processor = fake
    dataset = colour_dataset(per_colour=2)
    result = evaluate_retrieval(model, processor, dataset, batch_size=4, progress=False)
    # recompute from the fake's embeddings
    images = torch.stack([torch.eye(DIM, 3) @ (torch.tensor(rgb, dtype=torch.float32) / 255)
                          for _ in range(2) for rgb in COLOURS.values()])
    texts = [c for captions in dataset["captions"] for c in captions]
    expected = retrieval_metrics(images, torch.stack([text_vector(t) for t in texts]), torch.arange(12) // 2)
    assert result == pytest.approx({**expected, "num_images": 6, "num_texts": 12})
    # every image has a same-colour twin, so each caption ties at best with one other image: R@1 = 0, R@5 = 1
    assert result["image_retrieval_recall@1"] == 0.0 and result["image_retrieval_recall@5"] == 1.0


def test_evaluate_linear_probe_on_colours(fake):
    model, processor = fake
    dataset = colour_dataset(per_colour=6)
    result = evaluate_linear_probe(model, processor, dataset, dataset, "label", batch_size=7, progress=False)
    assert result["acc1"] == 1.0 and result["num_train"] == result["num_test"] == 18


def test_save_results_sorted_rounded_json(tmp_path):
    path = tmp_path / "sub" / "results.json"
    save_results({"b": 1 / 3, "a": torch.tensor(0.5), "c": float("nan"), "n": np.int64(7)}, path)
    text = path.read_text()
    assert json.loads(text) == {"a": 0.5, "b": 0.333333, "c": None, "n": 7}
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')


def test_load_results_reads_old_top_k_keys_as_acc(tmp_path):
    """A results file written with the former `top<k>` names loads exactly as the same file under the current names."""
    old = {
        "shapes/shape/top1": 0.968, "shapes/shape/top5": 1.0, "shapes/shape/top1_seen": 0.991489,
        "shapes/shape/top1_unseen": 0.94717, "shapes/retrieval/text_retrieval_recall@1": 0.368,
        "shapes/num_images": 500, "step": 500, "skipped": {"unreadable image": 1},
        "metrics": {"top1": 0.5, "val_top1": 0.25, "weight_decay": 0.001},
    }
    new = {
        "shapes/shape/acc1": 0.968, "shapes/shape/acc5": 1.0, "shapes/shape/acc1_seen": 0.991489,
        "shapes/shape/acc1_unseen": 0.94717, "shapes/retrieval/text_retrieval_recall@1": 0.368,
        "shapes/num_images": 500, "step": 500, "skipped": {"unreadable image": 1},
        "metrics": {"acc1": 0.5, "val_acc1": 0.25, "weight_decay": 0.001},
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    save_results(new, tmp_path / "new.json")
    assert load_results(tmp_path / "old.json") == load_results(tmp_path / "new.json") == new
    # a file holding both spellings keeps the current one
    (tmp_path / "both.json").write_text(json.dumps({"eval/top1": 0.1, "eval/acc1": 0.2}))
    assert load_results(tmp_path / "both.json") == {"eval/acc1": 0.2}


# ---------------------------------------------------------------------------------------------------------------
# the real model and the shapes benchmark (once lightclip provides them)
# ---------------------------------------------------------------------------------------------------------------


def _tiny_lightclip():
    lightclip = pytest.importorskip("lightclip")
    if not all(hasattr(lightclip, name) for name in ("LightClipModel", "LightClipProcessor")):
        pytest.skip("LightClipModel / LightClipProcessor not available yet")
    torch.manual_seed(0)
    model = lightclip.LightClipModel(lightclip.LightClipConfig.from_preset("lightclip-xxs"))
    return model, lightclip.LightClipProcessor.from_preset("lightclip-xxs")


def test_runners_with_tiny_lightclip_model():
    model, processor = _tiny_lightclip()
    dataset = colour_dataset(per_colour=2)
    zero_shot = evaluate_zero_shot(model, processor, dataset, list(COLOURS), ["a {} photo."], "label", progress=False)
    assert set(zero_shot) == {"acc1", "mean_per_class_recall", "num_images"} and 0.0 <= zero_shot["acc1"] <= 1.0
    retrieval = evaluate_retrieval(model, processor, dataset, progress=False)
    assert all(0.0 <= retrieval[f"{d}_retrieval_recall@{k}"] <= 1.0 for d in ("image", "text") for k in (1, 5, 10))
    assert retrieval["text_retrieval_recall@10"] == 1.0  # 6 images: every image is in the top 10


SHAPES_KEYS = {
    *(f"shapes/{task}/{m}" for task in ("shape", "colour")
      for m in ("acc1", "acc1_seen", "acc1_unseen", "mean_per_class_recall")),
    *(f"shapes/retrieval/{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)),
    "shapes/num_images", "shapes/num_images_seen", "shapes/num_images_unseen", "shapes/retrieval/num_texts",
}


def test_evaluate_shapes_keys():
    pytest.importorskip("lightclip.shapes")
    from lightclip.shapes import evaluate_shapes

    model, processor = _tiny_lightclip()
    result = evaluate_shapes(model, processor, num_samples=40, batch_size=16)
    assert SHAPES_KEYS <= set(result)
    assert set(result) - SHAPES_KEYS <= {"shapes/shape/acc5", "shapes/colour/acc5"}
    assert result["shapes/num_images"] == 40
    assert result["shapes/num_images_seen"] + result["shapes/num_images_unseen"] == 40
    assert all(0.0 <= v <= 1.0 for k, v in result.items() if "num_" not in k)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny random lightclip model saved to disk, and the example CLI loaded as a module."""
    model, processor = _tiny_lightclip()
    path = tmp_path_factory.mktemp("cli") / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return load_script("examples/run_evaluation.py"), str(path)


@pytest.mark.parametrize("streaming", [False, True])
def test_evaluate_shapes_on_loader_output(streaming):
    """The trainer passes `lightclip.data.load_image_text_dataset("shapes", ...)`: undecoded images, maybe streamed."""
    data = pytest.importorskip("lightclip.data")
    from lightclip.shapes import evaluate_shapes

    model, processor = _tiny_lightclip()
    dataset = data.load_image_text_dataset("shapes", "test", shapes_size=24, streaming=streaming)
    result = evaluate_shapes(model, processor, dataset=dataset)
    assert SHAPES_KEYS <= set(result) and result["shapes/num_images"] == 24


def test_cli_shapes_task(cli_model, tmp_path):
    pytest.importorskip("lightclip.shapes")
    cli, model = cli_model
    output = tmp_path / "results.json"
    cli.main(["--model", model, "--task", "shapes", "--num_samples", "30", "--output", str(output)])
    results = json.loads(output.read_text())
    assert results["task"] == "shapes" and results["model"] == model
    assert SHAPES_KEYS <= set(results["metrics"])


def test_cli_zero_shot_and_retrieval_on_imagefolder(cli_model, tmp_path):
    cli, model = cli_model
    rows = []
    for i, row in enumerate(colour_dataset(per_colour=2)):
        name = list(COLOURS)[row["label"]]
        for root in ("classes", "captions"):  # class sub-folders; a flat folder with metadata.jsonl captions
            folder = tmp_path / root / "test" / (name if root == "classes" else "")
            folder.mkdir(parents=True, exist_ok=True)
            row["image"].save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": row["captions"][0]})
    (tmp_path / "captions" / "test" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    zero_shot = cli.main(["--model", model, "--task", "zero_shot", "--data", str(tmp_path / "classes")])
    assert zero_shot["metrics"]["num_images"] == 6 and "acc5" not in zero_shot["metrics"]
    retrieval = cli.main(["--model", model, "--task", "retrieval", "--data", str(tmp_path / "captions")])
    assert retrieval["metrics"]["num_texts"] == 6  # read from the "text" column of metadata.jsonl


def test_cli_templates_option(tmp_path):
    """--templates names the set for class names without prompts; the task's own templates otherwise."""
    cli = load_script("examples/run_evaluation.py")
    dataset = colour_dataset(per_colour=1)

    def prompts(*flags: str, data: str = str(tmp_path), label_column: str = "label"):
        args = cli.parse_args(["--model", "unused", "--task", "zero_shot", "--data", data, *flags])
        return cli.zero_shot_prompts(args, dataset, label_column)

    openai = list(OPENAI_IMAGENET_TEMPLATES)
    assert prompts() == (list(COLOURS), DEFAULT_TEMPLATES)
    assert prompts("--templates", "openai") == (list(COLOURS), openai)
    spec = tmp_path / "classes.json"
    spec.write_text(json.dumps({"classnames": ["tench", "goldfish"], "templates": "openai"}))
    assert prompts("--classnames_json", str(spec)) == (["tench", "goldfish"], openai)
    spec.write_text(json.dumps({"classnames": ["tench", "goldfish"], "templates": ["a {} fish"]}))
    assert prompts("--classnames_json", str(spec))[1] == ["a {} fish"]
    assert prompts("--classnames_json", str(spec), "--templates", "openai")[1] == openai
    shape_templates = prompts(data="shapes", label_column="shape")[1]  # the shapes task keeps its own prompts
    assert shape_templates != openai and "a {} shape." in shape_templates
    with pytest.raises(ValueError, match="template set"):
        prompts("--templates", "imagenet")


def test_cli_linear_probe_on_shapes(cli_model):
    pytest.importorskip("lightclip.shapes")
    cli, model = cli_model
    results = cli.main(["--model", model, "--task", "linear_probe", "--num_samples", "40", "--label_column", "colour"])
    assert set(results["metrics"]) >= {"acc1", "weight_decay", "val_acc1", "num_train", "num_test"}


def test_cli_retrieval_on_shapes_reads_undecoded_images(cli_model):
    pytest.importorskip("lightclip.data")
    cli, model = cli_model
    results = cli.main(["--model", model, "--task", "retrieval", "--num_samples", "20"])
    assert results["metrics"]["num_images"] == 20 and results["metrics"]["num_texts"] >= 20
