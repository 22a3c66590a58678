"""Image-text retrieval recall@k in both directions, from caption-to-image scores and each caption's image."""

from __future__ import annotations

import evaluate
import numpy as np

from .ranking import hits_at_k, score_rows_info

# Query rows ranked at once, to bound the memory of the boolean masks on large benchmarks.
_QUERY_CHUNK = 1024

_DESCRIPTION = """
Retrieval recall@k with CLIP_benchmark's names. `image_retrieval_recall@k` is text -> image: a caption scores a hit
when its own image is among its k most similar images (mean over captions). `text_retrieval_recall@k` is
image -> text: an image scores a hit when any of its captions is among its k most similar captions (mean over the
images that have a caption). Ties count against the target; NaN scores rank last.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row per caption, its scores against every image (e.g. cosine similarities), `(N_texts, N_images)`.
    references: the index of each caption's image, `(N_texts,)`; an image may have several captions, or none.
    ks: the k values, default (1, 5, 10).
Returns:
    `image_retrieval_recall@<k>` and `text_retrieval_recall@<k>`, in [0, 1].
Example:
    >>> metric = evaluate.load("src/lightclip/metrics/retrieval_recall.py")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.8, 0.3]], references=[0, 1], ks=(1,))
    {'image_retrieval_recall@1': 0.5, 'text_retrieval_recall@1': 1.0}
"""


class RetrievalRecall(evaluate.Metric):
    """Recall@k for text -> image and image -> text retrieval, several captions per image allowed."""

    def _info(self) -> evaluate.MetricInfo:
        return score_rows_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, ks=(1, 5, 10)) -> dict[str, float]:
        scores = np.asarray(predictions, dtype=np.float32)
        text_to_image = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or 0 in scores.shape:
            raise ValueError("retrieval_recall needs at least one image and one caption")
        num_texts, num_images = scores.shape
        if text_to_image.min() < 0 or text_to_image.max() >= num_images:
            raise ValueError(f"references hold image indices outside [0, {num_images})")
        images = np.arange(num_images)

        text_hits = {k: 0 for k in ks}  # text -> image: one target image per caption
        for start in range(0, num_texts, _QUERY_CHUNK):
            positive = text_to_image[start : start + _QUERY_CHUNK, None] == images
            for k, hits in hits_at_k(scores[start : start + _QUERY_CHUNK], positive, ks).items():
                text_hits[k] += int(hits.sum())

        image_hits = {k: 0 for k in ks}  # image -> text: the best-scored caption of the image decides
        for start in range(0, num_images, _QUERY_CHUNK):
            positive = text_to_image[None, :] == images[start : start + _QUERY_CHUNK, None]
            for k, hits in hits_at_k(scores[:, start : start + _QUERY_CHUNK].T, positive, ks).items():
                image_hits[k] += int(hits.sum())
        num_queries = len(np.unique(text_to_image))  # images with at least one caption

        results = {f"image_retrieval_recall@{k}": text_hits[k] / num_texts for k in ks}
        results.update({f"text_retrieval_recall@{k}": image_hits[k] / num_queries for k in ks})
        return results
