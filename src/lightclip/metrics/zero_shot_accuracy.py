"""Zero-shot top-k accuracy: class scores per image against its true class, ties counting against the true class."""

from __future__ import annotations

import evaluate
import numpy as np

from .ranking import hits_at_k, score_rows_info

_DESCRIPTION = """
Top-k accuracy of zero-shot classification: an image scores a hit at k when fewer than k other classes score greater
than or equal to its true class (ties count against the true class; NaN scores rank last). A k is reported only
when there are at least k classes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row of class scores per image (e.g. cosine similarities to the class embeddings), `(N, C)`.
    references: the true class index of each image, `(N,)`.
    topk: the k values, default (1, 5).
Returns:
    `top<k>`: the share of images hit at k, in [0, 1].
Example:
    >>> metric = evaluate.load("src/lightclip/metrics/zero_shot_accuracy.py")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.2]], references=[0, 1], topk=(1,))
    {'top1': 0.5}
"""


class ZeroShotAccuracy(evaluate.Metric):
    """Top-k accuracy from class scores, ties counted against the true class."""

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
        return {f"top{k}": float(hits.mean()) for k, hits in hits_at_k(scores, positive, ks).items()}
