"""Zero-shot classification scores named as CLIP_benchmark names them (`acc<k>`, `mean_per_class_recall`): class
scores per image against its true class, ties counting against the true class."""

from __future__ import annotations

import evaluate
import numpy as np

from .ranking import hits_at_k, score_rows_info

_DESCRIPTION = """
Top-k accuracy of zero-shot classification: an image scores a hit at k when fewer than k other classes score greater
than or equal to its true class (ties count against the true class; NaN scores rank last). A k is reported only
when there are at least k classes. Mean per-class recall averages the top-1 hit rate of each class present in the
references, so that a large class does not hide a class the model never gets right.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row of class scores per image (e.g. cosine similarities to the class embeddings), `(N, C)`.
    references: the true class index of each image, `(N,)`.
    topk: the k values, default (1, 5).
Returns:
    `acc<k>`: the share of images hit at k, in [0, 1]; `mean_per_class_recall`: the share of each class's images hit
    at 1, averaged over the classes present in `references`.
Example:
    >>> metric = evaluate.load("src/lightclip/metrics/zero_shot_accuracy.py")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.2], [0.3, 0.8]], references=[0, 1, 1], topk=(1,))
    {'acc1': 0.6666666666666666, 'mean_per_class_recall': 0.75}
"""


class ZeroShotAccuracy(evaluate.Metric):
    """Top-k accuracy and mean per-class recall from class scores, ties counted against the true class."""

    def _info(self) -> evaluate.MetricInfo:
        return score_rows_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, topk=(1, 5)) -> dict[str, float]:
        scores = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] == 0:
            raise ValueError("zero_shot_accuracy needs a score row for at least one image")
        if labels.min() < 0 or labels.max() >= scores.shape[1]:
            raise ValueError(f"references hold class indices outside [0, {scores.shape[1]})")
        ks = [k for k in topk if k <= scores.shape[1]]
        positive = labels[:, None] == np.arange(scores.shape[1])
        hits = hits_at_k(scores, positive, sorted({*ks, 1}))
        results = {f"acc{k}": float(hits[k].mean()) for k in ks}
        results["mean_per_class_recall"] = float(np.mean([hits[1][labels == c].mean() for c in np.unique(labels)]))
        return results
