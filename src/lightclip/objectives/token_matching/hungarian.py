"""Hungarian matching with patch capacity (`token_matching="hungarian"`, our reading of a strict matching with
relaxed capacity): assignments solved by scipy on detached similarities, scores that gather the live ones."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import Tensor

from ..base import upcast
from . import pairs


def _capacity_matching(sim: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Each word to one patch, each patch to at most `capacity` words, maximising the summed similarity.

    sim (N, M) for the valid words only; returns (patch indices, word indices) of the matched entries. With more words
    than N * capacity, the extra words stay unmatched (`hungarian_pair_scores` warns).
    """
    from scipy.optimize import linear_sum_assignment

    n = sim.shape[0]
    tiled = np.tile(sim.T, (1, capacity))  # (M, capacity * N): column k * N + p is copy k of patch p
    words, columns = linear_sum_assignment(tiled, maximize=True)
    return columns % n, words


def _warn_if_over_capacity(text_mask: Tensor, num_patches: int, capacity: int) -> None:
    """Words beyond the patches' capacity cannot be matched; say so rather than drop them silently.

    The message depends only on N and the capacity, so Python's default filter shows it once per run.
    """
    limit = num_patches * capacity
    if text_mask.numel() and int(text_mask.sum(-1).max()) > limit:
        warnings.warn(
            f"Hungarian matching: a caption has more valid words than patches x capacity ({num_patches} x {capacity} "
            f"= {limit}); its extra words are left unmatched and its score averages the matched words only. "
            "Raise hungarian_capacity to match every word.",
            UserWarning,
            stacklevel=3,
        )


def _hungarian_chunk(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    image_index: Tensor | None,
    text_index: Tensor | None,
    capacity: int,
) -> Tensor:
    """Capacity-matched scores of the (c, K) pairs of one chunk.

    The assignments are solved on a detached copy; the scores gather the live similarities at the matched entries in
    one indexing op, so the backward pass costs one scatter per chunk rather than one graph node per pair.
    """
    sim, mask = pairs.similarities(*pairs.gather(image_tokens, text_tokens, text_mask, image_index, text_index))
    sim_np, mask_np = sim.detach().cpu().numpy(), mask.cpu().numpy()
    pair_i, pair_j, patch, word, weight = [], [], [], [], []
    for i, j in np.ndindex(*mask_np.shape[:2]):
        words = np.flatnonzero(mask_np[i, j])
        if len(words) == 0:
            continue
        patches, picked = _capacity_matching(sim_np[i, j][:, words], capacity)
        pair_i.append(np.full(len(picked), i))
        pair_j.append(np.full(len(picked), j))
        patch.append(patches)
        word.append(words[picked])
        weight.append(np.full(len(picked), 1.0 / len(picked)))
    scores = sim.new_zeros(sim.shape[:2])
    if not pair_i:
        return scores
    i, j, p, w = (torch.as_tensor(np.concatenate(a), device=sim.device) for a in (pair_i, pair_j, patch, word))
    values = sim[i, j, p, w] * torch.as_tensor(np.concatenate(weight), dtype=sim.dtype, device=sim.device)
    return scores.index_put((i, j), values, accumulate=True)


@pairs.full_precision
def hungarian_pair_scores(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    capacity: int = 2,
    num_negatives: int | None = None,
    labels: Tensor | None = None,
    dim: int = 1,
    chunk_size: int = 32,
    *,
    keys: Tensor | None = None,
) -> Tensor:
    """Hungarian-with-capacity score of every image with every text, (B_img, B_txt).

    The assignment is solved with scipy on detached similarities; the score gathers the live similarities at the
    matched entries (mean over matched words), so gradients flow. Words beyond N * capacity stay unmatched (warned).

    `num_negatives=None` (default) matches every pair, so all scores of a row share one scale. An integer k matches
    only each query's positive and its k hardest in-batch negatives (by FILIP score) and keeps FILIP scores elsewhere:
    cheaper, but two scales meet in one softmax (matched pairs score above their FILIP value; docs/method.md has the
    measured gap). Queries run along `dim`: `dim=1` means each image row is a query over the text columns, `dim=0`
    each text column a query over the image rows; `labels` gives each query's positive index along the other axis
    (default arange). Selecting per query keeps a local block of rows or columns equal to the same global block.
    `keys` scores only the pairs it names, as in `sinkhorn_pair_scores` (then `num_negatives` must be None).
    """
    (image_tokens, text_tokens), text_mask = upcast(image_tokens, text_tokens), text_mask.bool()
    _warn_if_over_capacity(text_mask, image_tokens.shape[1], capacity)
    score_chunk = functools.partial(_hungarian_chunk, capacity=capacity)
    if num_negatives is None:
        return pairs.scores_in_chunks(score_chunk, image_tokens, text_tokens, text_mask, chunk_size, keys, dim)
    if keys is not None:
        raise ValueError("num_negatives chooses the matched pairs itself: pass keys or num_negatives, not both")
    filip = pairs.filip_pair_scores(image_tokens, text_tokens, text_mask, chunk_size)
    keys = pairs.hard_keys(filip, num_negatives, labels, dim)
    matched = pairs.scores_in_chunks(score_chunk, image_tokens, text_tokens, text_mask, chunk_size, keys, dim)
    return filip.scatter(dim, keys, matched)


__all__ = ["hungarian_pair_scores"]
