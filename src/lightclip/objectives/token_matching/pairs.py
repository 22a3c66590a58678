"""How the token scores form and score image-text pairs, chunk by chunk, and FILIP's late interaction.

Every method scores a pair from its similarity block A = P_i W_j^T (N patches x M words). `gather` forms the blocks
of the pairs one chunk scores, `scores_in_chunks` runs a method's chunk function over every pair or over the pairs
each query names, so at most one chunk's (c, K, N, M) tensor lives at a time. FILIP (the baseline method) lives here
because it is also the Hungarian method's hard-negative selector; `hard_keys` and `pooled_similarity` choose the
pairs of the bounded form (`token_num_negatives`).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import upcast


def full_precision(fn: Callable) -> Callable:
    """Run a token-score function with autocast off: bf16 would round the Sinkhorn iterations and the maxima."""

    @functools.wraps(fn)
    def wrapper(image_tokens: Tensor, *args, **kwargs):
        with torch.autocast(image_tokens.device.type, enabled=False):
            return fn(image_tokens, *args, **kwargs)

    return wrapper


def take(tokens: Tensor, index: Tensor | None) -> Tensor:
    """`tokens[index]` along dim 0; `index_select` is an order of magnitude faster than advanced indexing on CPU."""
    return tokens if index is None else tokens.index_select(0, index.flatten()).unflatten(0, index.shape)


def put(tokens: Tensor, index: Tensor | None, grad: Tensor) -> Tensor:
    """The backward pass of `take`: the gradient of a gathered block summed back onto the rows it came from."""
    if index is None:
        return grad
    return torch.zeros_like(tokens).index_add_(0, index.flatten(), grad.flatten(0, index.dim() - 1))


def layout(image_block: Tensor, text_block: Tensor) -> tuple[str, str]:
    """einsum subscripts of the three ways a chunk pairs its tokens (`gather`)."""
    layouts = {(3, 3): ("ind", "jmd"), (3, 4): ("ind", "ijmd"), (4, 3): ("ijnd", "imd")}
    return layouts[image_block.dim(), text_block.dim()]


def gather(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    image_index: Tensor | None = None,
    text_index: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Image block, text block and word mask of the pairs one chunk scores.

    No index: each of the c images (c, N, D) with every text (K, M, D). `text_index` (c, K): each image with its own K
    texts (c, K, M, D). `image_index` (c, K): each of the c texts (c, M, D) with its own K images (c, K, N, D). Only
    the pairs scored are ever formed, which keeps the per-query form linear in the batch.
    """
    image, text = take(image_tokens, image_index), take(text_tokens, text_index)
    mask = take(text_mask, text_index)
    if image_index is not None:
        mask = mask.unsqueeze(1)  # one text per row, shared by its K images
    return image, text, mask


def similarities(image: Tensor, text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """A (c, K, N, M) and the word mask (c, K, M) of the blocks `gather` returns."""
    image_sub, text_sub = layout(image, text)
    sim = torch.einsum(f"{image_sub},{text_sub}->ijnm", image, text)
    return sim, mask.expand(sim.shape[:2] + mask.shape[-1:])


def chunks(n: int, chunk_size: int) -> list[slice]:
    chunk_size = max(int(chunk_size), 1)
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def scores_in_chunks(
    score_chunk: Callable[..., Tensor],
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    chunk_size: int,
    keys: Tensor | None = None,
    dim: int = 1,
) -> Tensor:
    """Run `score_chunk(image, text, mask, image_index, text_index)` over chunks of `chunk_size` queries.

    `keys=None`: every image with every text, (B_img, B_txt). Otherwise only the pairs `keys` names, laid out as
    `scores.gather(dim, keys)`: (B_img, K) text indices per image row (`dim=1`) or (K, B_txt) image indices per text
    column (`dim=0`). A text without a single valid word carries no token information: it scores 0 with every image.
    """
    has_words = text_mask.any(-1)
    if keys is None:
        parts = chunks(len(image_tokens), chunk_size)
        scores = torch.cat([score_chunk(image_tokens[p], text_tokens, text_mask, None, None) for p in parts])
        has_words = has_words[None, :]
    elif dim == 1:
        parts = chunks(len(keys), chunk_size)
        scores = torch.cat([score_chunk(image_tokens[p], text_tokens, text_mask, None, keys[p]) for p in parts])
        has_words = has_words[keys]
    else:
        keys = keys.T  # one row per text query
        parts = chunks(len(keys), chunk_size)
        scores = torch.cat([score_chunk(image_tokens, text_tokens[p], text_mask[p], keys[p], None) for p in parts]).T
        has_words = has_words[None, :]
    return torch.where(has_words, scores, torch.zeros_like(scores))


def _filip_chunk(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    image_index: Tensor | None,
    text_index: Tensor | None,
) -> Tensor:
    sim, mask = similarities(*gather(image_tokens, text_tokens, text_mask, image_index, text_index))
    num_words = mask.sum(-1).clamp(min=1).to(sim.dtype)
    word_to_patch = sim.amax(dim=2)  # (c, K, M): best patch for each word
    text_side = (word_to_patch * mask).sum(-1) / num_words
    patch_to_word = sim.masked_fill(~mask.unsqueeze(2), float("-inf")).amax(dim=3)  # (c, K, N): best valid word
    image_side = patch_to_word.clamp(min=-1.0).mean(-1)  # clamp only touches texts without valid words (-inf)
    return 0.5 * (text_side + image_side)


@full_precision
def filip_pair_scores(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    chunk_size: int = 32,
    *,
    keys: Tensor | None = None,
    dim: int = 1,
) -> Tensor:
    """FILIP late-interaction score (B_img, B_txt): mean over valid words of the max over patches, and mean over
    patches of the max over valid words, averaged. Exact, computed in chunks of `chunk_size` queries; `keys` / `dim`
    as in `sinkhorn_pair_scores`."""
    (image_tokens, text_tokens), text_mask = upcast(image_tokens, text_tokens), text_mask.bool()
    return scores_in_chunks(_filip_chunk, image_tokens, text_tokens, text_mask, chunk_size, keys, dim)


def hard_keys(scores: Tensor, num_negatives: int, labels: Tensor | None, dim: int) -> Tensor:
    """Each query's positive and its `num_negatives` hardest negatives by `scores` (B_img, B_txt), positive first.

    Laid out for `scores.gather(dim, keys)`: (B_img, 1 + k) text indices when image rows are the queries (`dim=1`),
    (1 + k, B_txt) image indices when text columns are (`dim=0`). `labels`: each query's positive (default arange).
    """
    query_scores = scores.detach() if dim == 1 else scores.detach().T  # (queries, keys)
    num_queries, num_keys = query_scores.shape
    if labels is None:
        labels = torch.arange(num_queries, device=scores.device)
    hard = query_scores.scatter(1, labels[:, None], float("-inf"))
    k = min(num_negatives, num_keys - 1)
    keys = torch.cat([labels[:, None], hard.topk(k, dim=1).indices], dim=1)  # (queries, 1 + k)
    return keys if dim == 1 else keys.T


@full_precision
@torch.no_grad()
def pooled_similarity(image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
    """Cosine of the mean patch token and the mean valid word token of every image-text pair, (B_img, B_txt).

    Chooses the hard negatives of the per-query form: O(B^2 D) and no matching, in the token space whose matched
    scores fill the softmax, and from the tokens the loss already holds (the global CLIP embeddings would tie the
    token term to the clip objective and to extra inputs in every caller). Normalised means, so that a short caption
    (a mean over few words, hence longer) is not everyone's hardest negative. Detached.
    """
    (image_tokens, text_tokens), weights = upcast(image_tokens, text_tokens), text_mask.unsqueeze(-1)
    image = F.normalize(image_tokens.mean(1), dim=-1)
    text = F.normalize((text_tokens * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1)
    return image @ text.T


__all__ = ["chunks", "filip_pair_scores", "full_precision", "gather", "hard_keys", "layout", "pooled_similarity", "put",
           "scores_in_chunks", "similarities", "take"]
