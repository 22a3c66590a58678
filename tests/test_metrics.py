"""The package's `evaluate` metric modules (lightclip/metrics): each against a brute-force count on random scores with
ties and NaNs, and loading with `evaluate.load` from the files alone, offline, with the network blocked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lightclip.evaluation import METRICS_DIR, load_metric

KS = (1, 2, 5, 10)


def random_scores(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """Scores on a coarse grid (many ties), a few of them NaN."""
    scores = rng.integers(-3, 4, size=(rows, columns)).astype(np.float32)
    scores[rng.random((rows, columns)) < 0.05] = np.nan
    return scores


def ranked_within(score: float, others: list[float], k: int) -> bool:
    """Brute force: fewer than k of `others` score at least `score`; NaN ranks below everything."""
    score = -math.inf if math.isnan(score) else score
    return sum(1 for other in others if not math.isnan(other) and other >= score) < k


def reference_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> list[bool]:
    return [ranked_within(row[label], [s for c, s in enumerate(row) if c != label], k)
            for row, label in zip(scores.tolist(), labels.tolist())]


def reference_mean_per_class_recall(scores: np.ndarray, labels: np.ndarray) -> float:
    """The top-1 hit rate of each class that has images, averaged over those classes."""
    hits = reference_hits(scores, labels, 1)
    recalls = [np.mean([h for h, label in zip(hits, labels) if label == c]) for c in set(labels.tolist())]
    return float(np.mean(recalls))


def reference_recalls(scores: np.ndarray, text_to_image: np.ndarray, k: int) -> tuple[float, float]:
    """(text -> image, image -> text) recall@k; an image is found when any of its captions ranks within k of the
    other images' captions."""
    rows, owners = scores.tolist(), text_to_image.tolist()
    text_hits = [ranked_within(row[owner], [s for i, s in enumerate(row) if i != owner], k)
                 for row, owner in zip(rows, owners)]
    image_hits = []
    for image in sorted(set(owners)):
        column = [row[image] for row in rows]
        negatives = [s for s, owner in zip(column, owners) if owner != image]
        image_hits.append(any(ranked_within(s, negatives, k) for s, owner in zip(column, owners) if owner == image))
    return sum(text_hits) / len(text_hits), sum(image_hits) / len(image_hits)


@pytest.mark.parametrize("seed", range(4))
def test_zero_shot_accuracy_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 12))
    scores = random_scores(rng, 60, num_classes)
    labels = rng.integers(0, num_classes, size=60)
    result = load_metric("zero_shot_accuracy").compute(predictions=scores, references=labels, topk=KS)
    assert result == {
        **{f"acc{k}": pytest.approx(np.mean(reference_hits(scores, labels, k)), abs=1e-12)
           for k in KS if k <= num_classes},
        "mean_per_class_recall": pytest.approx(reference_mean_per_class_recall(scores, labels), abs=1e-12),
    }


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_images = int(rng.integers(2, 30))
    text_to_image = rng.integers(0, num_images, size=int(rng.integers(num_images, 3 * num_images)))
    scores = random_scores(rng, len(text_to_image), num_images)
    metric = load_metric("retrieval_recall")
    for start in range(0, len(scores), 7):  # fed in batches, as lightclip.evaluation does
        metric.add_batch(predictions=scores[start : start + 7], references=text_to_image[start : start + 7])
    result = metric.compute(ks=KS)
    expected = {}
    for k in KS:
        text_to_image_recall, image_to_text_recall = reference_recalls(scores, text_to_image, k)
        expected[f"image_retrieval_recall@{k}"] = pytest.approx(text_to_image_recall, abs=1e-12)
        expected[f"text_retrieval_recall@{k}"] = pytest.approx(image_to_text_recall, abs=1e-12)
    assert result == expected


def test_metric_rejects_out_of_range_references_and_stays_usable():
    metric = load_metric("retrieval_recall")
    with pytest.raises(ValueError, match="outside"):
        metric.compute(predictions=[[0.5, 0.1]], references=[2], ks=(1,))
    assert metric.compute(predictions=[[0.5, 0.1]], references=[0], ks=(1,)) == {
        "image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


OFFLINE_SCRIPT = textwrap.dedent("""
    import json, socket, sys

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    socket.socket.connect = no_network
    socket.create_connection = no_network

    import evaluate

    metrics_dir = sys.argv[1]
    accuracy = evaluate.load(metrics_dir + "/zero_shot_accuracy.py")
    recall = evaluate.load(metrics_dir + "/retrieval_recall.py")
    print(json.dumps({
        "accuracy": accuracy.compute(predictions=[[0.9, 0.1], [0.2, 0.2]], references=[0, 1], topk=(1,)),
        "recall": recall.compute(predictions=[[0.9, 0.1], [0.8, 0.3]], references=[0, 1], ks=(1,)),
    }))
""")


def test_metrics_load_offline_from_the_package_files(tmp_path):
    """A fresh cache (nothing loaded before), the Hub and evaluate switched offline, and every socket refused."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    for name in ("HF_MODULES_CACHE", "HF_METRICS_CACHE", "HF_HUB_CACHE"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(METRICS_DIR)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "accuracy": {"acc1": 0.5, "mean_per_class_recall": 0.5},  # the tie of image 1 counts against it
        "recall": {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 1.0},
    }
