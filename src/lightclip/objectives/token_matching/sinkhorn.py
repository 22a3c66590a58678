"""Entropic optimal transport between patches and words (`token_matching="sinkhorn"`, our reading): the
log-domain Sinkhorn iterations, their mat-vec fast path, and the pair score with a fixed-plan backward pass."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..base import upcast
from . import pairs

# stands in for log(0): finite, so that masked entries never produce inf - inf = nan in the backward pass
_LOG_ZERO = -1e9


def _log_sinkhorn(sim: Tensor, text_mask: Tensor, epsilon: float, iterations: int) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn for entropic OT maximising <Pi, sim>, batched over leading dims.

    sim (..., N, M); text_mask (..., M) bool. Marginals: 1/N per patch, 1/M_valid per valid word, zero mass on padding.
    Returns the log scalings (log_u (..., N), log_v (..., M)): log Pi = sim / epsilon + log_u + log_v on valid words.
    The last update fixes the word marginal exactly. Masked entries use a finite log(0), so the backward pass never
    meets inf - inf.
    """
    n = sim.shape[-2]
    log_kernel = torch.where(text_mask.unsqueeze(-2), sim / epsilon, torch.full_like(sim, _LOG_ZERO))
    log_b = _log_word_marginal(text_mask, sim.dtype)
    log_a = -math.log(n)
    log_v = torch.zeros_like(log_b)
    log_u = None
    for _ in range(max(iterations, 1)):
        log_u = log_a - torch.logsumexp(log_kernel + log_v.unsqueeze(-2), dim=-1)  # (..., N)
        log_v = log_b - torch.logsumexp(log_kernel + log_u.unsqueeze(-1), dim=-2)  # (..., M)
    return log_u, log_v


def _log_word_marginal(text_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """log(1 / M_valid) on valid words, a finite log(0) on padding."""
    num_words = text_mask.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    log_zero = torch.full(text_mask.shape, _LOG_ZERO, dtype=dtype, device=text_mask.device)
    return torch.where(text_mask, -torch.log(num_words), log_zero)


# the fast path is exact while exp(-(max - min) / epsilon) stays far from float32 underflow (exp(-87))
_FAST_SPREAD = 60.0


def _sinkhorn_fast(sim: Tensor, text_mask: Tensor, epsilon: float, iterations: int) -> tuple[Tensor, Tensor]:
    """The iterations of `_log_sinkhorn`, with every log-sum-exp written as a matrix-vector product.

    log sum_m exp(L_nm + g_m) = max L + max g + log(K @ exp(g - max g)) with K = exp(L - max L) computed once per pair,
    so an iteration costs two batched mat-vecs instead of two passes of exp over (N, M). Exact while the per-pair
    spread of L = sim / epsilon stays below `_FAST_SPREAD`; `_sinkhorn_potentials` checks that. Returns
    (log_u, log_v) up to constants that the normalisation removes.
    """
    n = sim.shape[-2]
    tiny = torch.finfo(sim.dtype).tiny
    logits = sim / epsilon
    mask = text_mask.unsqueeze(-2).expand_as(sim)
    top = logits.masked_fill(~mask, float("-inf")).amax((-2, -1), keepdim=True).clamp(min=-1e4)  # (..., 1, 1)
    kernel = torch.where(mask, (logits - top).exp(), torch.zeros_like(logits))  # (..., N, M), entries in [0, 1]
    log_b = _log_word_marginal(text_mask, sim.dtype)
    log_a = -math.log(n)
    top = top.squeeze(-1)  # (..., 1)
    kernel_t = kernel.transpose(-1, -2).contiguous()  # vector @ matrix is the fast batched form on CPU
    log_v = torch.zeros_like(log_b)
    log_u = None
    for _ in range(max(iterations, 1)):
        v_max = log_v.amax(-1, keepdim=True)
        row = ((log_v - v_max).exp().unsqueeze(-2) @ kernel_t).squeeze(-2)  # (..., N)
        log_u = log_a - top - v_max - row.clamp(min=tiny).log()
        u_max = log_u.amax(-1, keepdim=True)
        col = ((log_u - u_max).exp().unsqueeze(-2) @ kernel).squeeze(-2)  # (..., M)
        log_v = log_b - top - u_max - col.clamp(min=tiny).log()
    return log_u, log_v


def _sinkhorn_potentials(
    sim: Tensor, text_mask: Tensor, epsilon: float, iterations: int, fast: bool | None = None
) -> tuple[Tensor, Tensor]:
    """(f, g) with Pi / sum Pi = exp(sim / epsilon + f + g) on valid words; `fast=None` takes the mat-vec form
    whenever it is exact, the log-sum-exp loop otherwise."""
    if fast is None:
        valid = text_mask.unsqueeze(-2).expand_as(sim)
        high = sim.masked_fill(~valid, float("-inf")).amax((-2, -1))
        low = sim.masked_fill(~valid, float("inf")).amin((-2, -1))
        spread = (high - low).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        fast = sim.numel() == 0 or bool(spread.max() / epsilon < _FAST_SPREAD)
    log_u, log_v = (_sinkhorn_fast if fast else _log_sinkhorn)(sim, text_mask, epsilon, iterations)
    log_plan = _log_plan(sim, text_mask, epsilon, log_u, log_v)
    log_mass = torch.logsumexp(log_plan.flatten(-2), dim=-1).clamp(min=_LOG_ZERO)  # (...,)
    return log_u - log_mass.unsqueeze(-1), log_v


def _log_plan(sim: Tensor, text_mask: Tensor, epsilon: float, f: Tensor, g: Tensor) -> Tensor:
    log_plan = sim / epsilon + f.unsqueeze(-1) + g.unsqueeze(-2)
    return log_plan.masked_fill(~text_mask.unsqueeze(-2), float("-inf"))


def _sinkhorn_weights(
    sim: Tensor, text_mask: Tensor, epsilon: float, iterations: int, fast: bool | None = None
) -> Tensor:
    """Pi / sum Pi per pair, (..., N, M)."""
    f, g = _sinkhorn_potentials(sim, text_mask, epsilon, iterations, fast)
    return _log_plan(sim, text_mask, epsilon, f, g).exp()


@pairs.full_precision
def sinkhorn_plan(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor | None = None,
    epsilon: float = 0.05,
    iterations: int = 10,
) -> Tensor:
    """Transport plan between the patches of image k and the words of text k, for aligned pairs.

    image_tokens (N, D) or (B, N, D); text_tokens (M, D) or (B, M, D); returns (N, M) or (B, N, M), total mass 1
    per pair. As epsilon -> 0 (with enough iterations) it approaches an optimal matching: a permutation / N when
    N == M. Exposed for inspection and tests; the loss uses `sinkhorn_pair_scores`.
    """
    if text_mask is None:
        text_mask = torch.ones(text_tokens.shape[:-1], dtype=torch.bool, device=text_tokens.device)
    image_tokens, text_tokens = upcast(image_tokens, text_tokens)
    sim = image_tokens @ text_tokens.transpose(-1, -2)
    return _sinkhorn_weights(sim, text_mask.bool(), epsilon, iterations)


class _SinkhornScore(torch.autograd.Function):
    """S = sum W A over each pair with the plan W = Pi / sum Pi held constant in the backward pass.

    Saves only the inputs and the per-pair potentials ((N + M) numbers per pair, not N * M), and rebuilds W from them
    in the backward pass without re-running the iterations. Blocks of gathered tokens (`pairs.gather`) are formed
    inside, in the forward and again in the backward pass, so no gathered copy outlives its chunk.
    """

    @staticmethod
    def forward(ctx, image_tokens, text_tokens, text_mask, image_index, text_index, epsilon: float, iterations: int):
        sim, mask = pairs.similarities(*pairs.gather(image_tokens, text_tokens, text_mask, image_index, text_index))
        # on CPU, iterate over blocks that stay in cache: the iterations are memory-bound
        rows = max(1, _CPU_BLOCK // max(sim[0].numel(), 1)) if sim.device.type == "cpu" else len(sim)
        parts = [_sinkhorn_potentials(sim[p], mask[p], epsilon, iterations) for p in pairs.chunks(len(sim), rows)]
        f, g = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ctx.save_for_backward(image_tokens, text_tokens, text_mask, image_index, text_index, f, g)
        ctx.epsilon = epsilon
        return (_log_plan(sim, mask, epsilon, f, g).exp() * sim).sum((-2, -1))

    @staticmethod
    def backward(ctx, grad_scores: Tensor):
        image_tokens, text_tokens, text_mask, image_index, text_index, f, g = ctx.saved_tensors
        with torch.autocast(image_tokens.device.type, enabled=False):
            image, text, mask = pairs.gather(image_tokens, text_tokens, text_mask, image_index, text_index)
            sim, mask = pairs.similarities(image, text, mask)
            grad_sim = _log_plan(sim, mask, ctx.epsilon, f, g).exp() * grad_scores.to(sim.dtype)[..., None, None]
            image_sub, text_sub = pairs.layout(image, text)
            grad_image = torch.einsum(f"ijnm,{text_sub}->{image_sub}", grad_sim, text)
            grad_text = torch.einsum(f"ijnm,{image_sub}->{text_sub}", grad_sim, image)
        return (pairs.put(image_tokens, image_index, grad_image), pairs.put(text_tokens, text_index, grad_text),
                None, None, None, None, None)


def _sinkhorn_unrolled(epsilon: float, iterations: int, *blocks: Tensor | None) -> Tensor:
    """Scores differentiated through every iteration; `blocks`: the arguments of `pairs.gather`."""
    sim, mask = pairs.similarities(*pairs.gather(*blocks))
    return (_sinkhorn_weights(sim, mask, epsilon, iterations) * sim).sum((-2, -1))


def _sinkhorn_chunk(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    image_index: Tensor | None,
    text_index: Tensor | None,
    epsilon: float,
    iterations: int,
    unroll: bool,
) -> Tensor:
    blocks = (image_tokens, text_tokens, text_mask, image_index, text_index)
    if not unroll:
        return _SinkhornScore.apply(*blocks, epsilon, iterations)
    if torch.is_grad_enabled() and (image_tokens.requires_grad or text_tokens.requires_grad):
        return checkpoint(_sinkhorn_unrolled, epsilon, iterations, *blocks, use_reentrant=False)
    return _sinkhorn_unrolled(epsilon, iterations, *blocks)


# elements per Sinkhorn block on CPU (2 MiB of float32)
_CPU_BLOCK = 1 << 19


@pairs.full_precision
def sinkhorn_pair_scores(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    epsilon: float = 0.05,
    iterations: int = 10,
    chunk_size: int = 32,
    *,
    unroll: bool = False,
    keys: Tensor | None = None,
    dim: int = 1,
) -> Tensor:
    """Sinkhorn matching score S = sum Pi A / sum Pi of every image with every text, (B_img, B_txt).

    image_tokens (B_img, N, D), text_tokens (B_txt, M, D) L2-normalised; text_mask (B_txt, M) bool. With `keys`, only
    the pairs it names are scored, laid out as `scores.gather(dim, keys)`: (B_img, K) text indices per image row for
    `dim=1`, (K, B_txt) image indices per text column for `dim=0` (the per-query form of `TokenMatchingLoss`).

    Gradients: by default the plan is a constant of the backward pass (dS/dA = Pi / sum Pi, as the Hungarian method
    gathers A at its matched entries). That is a surrogate: it is the gradient of the entropy-regularised value
    <Pi, A> + eps H(Pi), not of S (`benchmarks/sinkhorn_gradient.py` compares the two). The backward pass rebuilds
    the plan from saved per-pair potentials and never re-runs or stores the iterations. `unroll=True`
    backpropagates through every iteration instead (exact for the unrolled loop, several times slower; each chunk is
    checkpointed). Memory: chunks of `chunk_size` queries, so only one chunk's (c, B_txt or K, N, M) tensors live at
    a time, in the forward and in the backward pass.
    """
    (image_tokens, text_tokens), text_mask = upcast(image_tokens, text_tokens), text_mask.bool()
    score_chunk = functools.partial(_sinkhorn_chunk, epsilon=epsilon, iterations=iterations, unroll=unroll)
    return pairs.scores_in_chunks(score_chunk, image_tokens, text_tokens, text_mask, chunk_size, keys, dim)


__all__ = ["sinkhorn_pair_scores", "sinkhorn_plan"]
