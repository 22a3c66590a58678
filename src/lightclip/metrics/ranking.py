"""What both metric modules share: their inputs (a row of scores per query, the index of its target) and the ranking
rule (ties count against the target, NaN scores rank last).

Kept beside the metric scripts because `evaluate.load` copies a script together with the files it imports
relatively from its own folder, and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np


def score_rows_info(description: str, inputs_description: str) -> evaluate.MetricInfo:
    """`MetricInfo` of a metric whose predictions are score rows and whose references are target indices."""
    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=inputs_description,
        features=datasets.Features({
            "predictions": datasets.Sequence(datasets.Value("float32")),
            "references": datasets.Value("int64"),
        }),
    )


def hits_at_k(scores: np.ndarray, positive: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Boolean hit vectors per k for query rows of `scores` `(Q, N)` with `positive` `(Q, N)` marking their targets.

    A query hits at k when fewer than k non-targets score greater than *or equal to* its best-scored target, so a
    model that scores every candidate alike gets no hit; NaN scores (a diverged model) rank below everything. A query
    without a target never hits.
    """
    scores = np.nan_to_num(scores, nan=-np.inf)
    best_positive = np.where(positive, scores, -np.inf).max(1, initial=-np.inf)
    negatives_above = ((scores >= best_positive[:, None]) & ~positive).sum(1)
    has_target = positive.any(1)
    return {k: (negatives_above < k) & has_target for k in ks}
