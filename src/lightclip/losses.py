"""Training objectives of lightclip, in the shape of open_clip's `loss.py`.

One small `nn.Module` per objective. Each `forward` takes features (never raw batches), handles data parallelism
itself and returns a dict whose keys end in `_loss`, so a trainer can sum them with its own weights.

Distribution follows open_clip's `local_loss=True, gather_with_grad=True`: every process scores its local rows
against the all-gathered columns of the global batch, with labels offset by `rank * B_local`. Averaging the per-rank
losses, and the per-rank gradients as DDP does, gives exactly the loss and the gradients of one process on the
global batch (see `docs/method.md`, "Distributed training").

This module is training-only: the inference model never imports it.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# stands in for log(0): finite, so that masked entries never produce inf - inf = nan in the backward pass
_LOG_ZERO = -1e9

__all__ = [
    "world_info",
    "gather_with_grad",
    "gather_no_grad",
    "ClipLoss",
    "SoftClipLoss",
    "soft_negative_weights",
    "TokenMatchingLoss",
    "sinkhorn_plan",
    "sinkhorn_pair_scores",
    "hungarian_pair_scores",
    "filip_pair_scores",
    "mask_tokens",
    "MaskedLanguageModelingLoss",
    "NeighborContrastiveLoss",
    "AffinityDistillationLoss",
    "FeatureDistillationLoss",
]


# ---------------------------------------------------------------------------------------------------------------------
# distribution helpers


def world_info() -> tuple[int, int]:
    """`(rank, world_size)`; `(0, 1)` when torch.distributed is not initialised, so every loss runs unchanged."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_autograd(x: Tensor) -> Tensor:
    """All-gather along dim 0 with a backward pass (sum of the gradients of every rank's copy)."""
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None)  # the name torch >= 2.13 recommends
    if gather is not None:
        return gather(x.contiguous(), 0, dist.group.WORLD)
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_with_grad(x: Tensor) -> Tensor:
    """Rank-ordered concatenation of `x` from every process (rank 0 rows first), differentiable.

    The backward pass sends each rank the gradient that every process computed for its rows, which is what makes
    local loss + DDP averaging equal the global-batch loss. Identity on a single process.
    """
    _, world_size = world_info()
    if world_size == 1:
        return x
    return _all_gather_autograd(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Rank-ordered concatenation of `x` without autograd: for constants such as feature-bank targets."""
    _, world_size = world_info()
    if world_size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _global_labels(batch_size: int, device: torch.device) -> Tensor:
    """Column index of each local row's positive in the gathered batch."""
    rank, _ = world_info()
    return torch.arange(batch_size, device=device) + rank * batch_size


def _symmetric_ce(logits_per_image: Tensor, logits_per_text: Tensor, labels: Tensor) -> Tensor:
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


# ---------------------------------------------------------------------------------------------------------------------
# instance level


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP over the global batch (open_clip `local_loss=True, gather_with_grad=True`).

    Example:

    ```python
    >>> import torch, torch.nn.functional as F
    >>> from lightclip.losses import ClipLoss
    >>> img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    >>> sorted(ClipLoss()(img, txt, torch.tensor(14.3)))
    ['contrastive_loss']
    ```
    """

    def logits(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
        """Local image rows against all texts, and local text rows against all images: (B_local, B_global) each."""
        all_image = gather_with_grad(image_features)
        all_text = gather_with_grad(text_features)
        return logit_scale * image_features @ all_text.T, logit_scale * text_features @ all_image.T

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> dict[str, Tensor]:
        """`image_features`, `text_features`: L2-normalised (B_local, D); `logit_scale`: the exponentiated scale."""
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        labels = _global_labels(image_features.shape[0], image_features.device)
        return {"contrastive_loss": _symmetric_ce(logits_per_image, logits_per_text, labels)}


def soft_negative_weights(logits: Tensor, labels: Tensor, mode: str = "similarity", temperature: float = 1.0
                          ) -> Tensor:
    """r of `SoftClipLoss`: each row's weights over its negatives (0 at the positive `labels`), summing to 1."""
    positive = F.one_hot(labels, logits.shape[-1]).bool()
    if mode == "uniform":
        return (~positive).to(logits.dtype) / (logits.shape[-1] - 1)
    return (logits.detach() / temperature).masked_fill(positive, float("-inf")).softmax(dim=-1)


def _soft_ce(logits: Tensor, labels: Tensor, alpha: float, mode: str, temperature: float) -> Tensor:
    """Cross-entropy against q = (1 - alpha) onehot + alpha r, r spread over the negatives of each row, in float32
    at least (bf16 logits would round the soft targets and the sum)."""
    (logits,) = _upcast(logits)
    log_probs = F.log_softmax(logits, dim=-1)
    positive = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    target = (1.0 - alpha) * positive + alpha * soft_negative_weights(logits, labels, mode, temperature)
    return -(target * log_probs).sum(dim=-1).mean()


class SoftClipLoss(ClipLoss):
    """CLIP loss with progressively softened negative labels (LightCLIP, instance level; docs/method.md).

    Image-text pairs are not strictly one-to-one, so part of each target row moves from the positive to the
    negatives: q_i = (1 - alpha) onehot(i) + alpha r_i. `mode="similarity"` (our reading of the paper) weights the
    negatives by the model's own detached similarities, r_ij = softmax_{j != i}(sg(s_ij) / temperature);
    `mode="uniform"` spreads alpha evenly, r_ij = 1 / (B_global - 1). alpha rises from 0 to `alpha_max` with training
    progress, because early similarities are noise; at alpha = 0 the loss equals `ClipLoss` exactly.
    """

    def __init__(
        self,
        mode: str = "similarity",
        alpha_max: float = 0.2,
        schedule: str = "linear",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in ("similarity", "uniform"):
            raise ValueError(f"mode must be 'similarity' or 'uniform', got {mode!r}")
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.mode = mode
        self.alpha_max = alpha_max
        self.schedule = schedule
        self.temperature = temperature
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        """Training progress `step / total_steps`, set by the trainer every step; clamped to [0, 1]."""
        self.progress = min(max(float(progress), 0.0), 1.0)

    @property
    def alpha(self) -> float:
        """Current softening: 0 at the start, `alpha_max` at the end, monotone in between."""
        p = self.progress
        ramp = p if self.schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * p))
        return self.alpha_max * ramp

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, alpha_max={self.alpha_max}, schedule={self.schedule!r}, alpha={self.alpha:.4f}"

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> dict[str, Tensor]:
        alpha = self.alpha
        if alpha == 0.0:
            return super().forward(image_features, text_features, logit_scale)
        logits_per_image, logits_per_text = self.logits(image_features, text_features, logit_scale)
        labels = _global_labels(image_features.shape[0], image_features.device)
        loss = 0.5 * (
            _soft_ce(logits_per_image, labels, alpha, self.mode, self.temperature)
            + _soft_ce(logits_per_text, labels, alpha, self.mode, self.temperature)
        )
        return {"contrastive_loss": loss}


# ---------------------------------------------------------------------------------------------------------------------
# token level: relaxed bipartite matching between patches and words


def _full_precision(fn: Callable) -> Callable:
    """Run a token-score function with autocast off: bf16 would round the Sinkhorn iterations and the maxima."""

    @functools.wraps(fn)
    def wrapper(image_tokens: Tensor, *args, **kwargs):
        with torch.autocast(image_tokens.device.type, enabled=False):
            return fn(image_tokens, *args, **kwargs)

    return wrapper


def _upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Token scores run in float32 at least (bf16 / fp16 autocast would round the iterations), float64 stays."""
    return tuple(t if t.dtype == torch.float64 else t.float() for t in tensors)


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


@_full_precision
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
    image_tokens, text_tokens = _upcast(image_tokens, text_tokens)
    sim = image_tokens @ text_tokens.transpose(-1, -2)
    return _sinkhorn_weights(sim, text_mask.bool(), epsilon, iterations)


def _take(tokens: Tensor, index: Tensor | None) -> Tensor:
    """`tokens[index]` along dim 0; `index_select` is an order of magnitude faster than advanced indexing on CPU."""
    return tokens if index is None else tokens.index_select(0, index.flatten()).unflatten(0, index.shape)


def _put(tokens: Tensor, index: Tensor | None, grad: Tensor) -> Tensor:
    """The backward pass of `_take`: the gradient of a gathered block summed back onto the rows it came from."""
    if index is None:
        return grad
    return torch.zeros_like(tokens).index_add_(0, index.flatten(), grad.flatten(0, index.dim() - 1))


def _layout(image_block: Tensor, text_block: Tensor) -> tuple[str, str]:
    """einsum subscripts of the three ways a chunk pairs its tokens (`_gather_pairs`)."""
    layouts = {(3, 3): ("ind", "jmd"), (3, 4): ("ind", "ijmd"), (4, 3): ("ijnd", "imd")}
    return layouts[image_block.dim(), text_block.dim()]


def _gather_pairs(
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
    image, text = _take(image_tokens, image_index), _take(text_tokens, text_index)
    mask = _take(text_mask, text_index)
    if image_index is not None:
        mask = mask.unsqueeze(1)  # one text per row, shared by its K images
    return image, text, mask


def _pair_similarities(image: Tensor, text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """A (c, K, N, M) and the word mask (c, K, M) of the blocks `_gather_pairs` returns."""
    image_sub, text_sub = _layout(image, text)
    sim = torch.einsum(f"{image_sub},{text_sub}->ijnm", image, text)
    return sim, mask.expand(sim.shape[:2] + mask.shape[-1:])


class _SinkhornScore(torch.autograd.Function):
    """S = sum W A over each pair with the plan W = Pi / sum Pi held constant in the backward pass.

    Saves only the inputs and the per-pair potentials ((N + M) numbers per pair, not N * M), and rebuilds W from them
    in the backward pass without re-running the iterations. Blocks of gathered tokens (`_gather_pairs`) are formed
    inside, in the forward and again in the backward pass, so no gathered copy outlives its chunk.
    """

    @staticmethod
    def forward(ctx, image_tokens, text_tokens, text_mask, image_index, text_index, epsilon: float, iterations: int):
        sim, mask = _pair_similarities(*_gather_pairs(image_tokens, text_tokens, text_mask, image_index, text_index))
        # on CPU, iterate over blocks that stay in cache: the iterations are memory-bound
        rows = max(1, _CPU_BLOCK // max(sim[0].numel(), 1)) if sim.device.type == "cpu" else len(sim)
        parts = [_sinkhorn_potentials(sim[p], mask[p], epsilon, iterations) for p in _chunks(len(sim), rows)]
        f, g = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ctx.save_for_backward(image_tokens, text_tokens, text_mask, image_index, text_index, f, g)
        ctx.epsilon = epsilon
        return (_log_plan(sim, mask, epsilon, f, g).exp() * sim).sum((-2, -1))

    @staticmethod
    def backward(ctx, grad_scores: Tensor):
        image_tokens, text_tokens, text_mask, image_index, text_index, f, g = ctx.saved_tensors
        with torch.autocast(image_tokens.device.type, enabled=False):
            image, text, mask = _gather_pairs(image_tokens, text_tokens, text_mask, image_index, text_index)
            sim, mask = _pair_similarities(image, text, mask)
            grad_sim = _log_plan(sim, mask, ctx.epsilon, f, g).exp() * grad_scores.to(sim.dtype)[..., None, None]
            image_sub, text_sub = _layout(image, text)
            grad_image = torch.einsum(f"ijnm,{text_sub}->{image_sub}", grad_sim, text)
            grad_text = torch.einsum(f"ijnm,{image_sub}->{text_sub}", grad_sim, image)
        return (_put(image_tokens, image_index, grad_image), _put(text_tokens, text_index, grad_text),
                None, None, None, None, None)


def _sinkhorn_unrolled(epsilon: float, iterations: int, *pairs: Tensor | None) -> Tensor:
    """Scores differentiated through every iteration; `pairs`: the arguments of `_gather_pairs`."""
    sim, mask = _pair_similarities(*_gather_pairs(*pairs))
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
    pairs = (image_tokens, text_tokens, text_mask, image_index, text_index)
    if not unroll:
        return _SinkhornScore.apply(*pairs, epsilon, iterations)
    if torch.is_grad_enabled() and (image_tokens.requires_grad or text_tokens.requires_grad):
        return checkpoint(_sinkhorn_unrolled, epsilon, iterations, *pairs, use_reentrant=False)
    return _sinkhorn_unrolled(epsilon, iterations, *pairs)


# elements per Sinkhorn block on CPU (2 MiB of float32)
_CPU_BLOCK = 1 << 19


def _chunks(n: int, chunk_size: int) -> list[slice]:
    chunk_size = max(int(chunk_size), 1)
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _scores_in_chunks(
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
        parts = _chunks(len(image_tokens), chunk_size)
        scores = torch.cat([score_chunk(image_tokens[p], text_tokens, text_mask, None, None) for p in parts])
        has_words = has_words[None, :]
    elif dim == 1:
        parts = _chunks(len(keys), chunk_size)
        scores = torch.cat([score_chunk(image_tokens[p], text_tokens, text_mask, None, keys[p]) for p in parts])
        has_words = has_words[keys]
    else:
        keys = keys.T  # one row per text query
        parts = _chunks(len(keys), chunk_size)
        scores = torch.cat([score_chunk(image_tokens, text_tokens[p], text_mask[p], keys[p], None) for p in parts]).T
        has_words = has_words[None, :]
    return torch.where(has_words, scores, torch.zeros_like(scores))


@_full_precision
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
    (image_tokens, text_tokens), text_mask = _upcast(image_tokens, text_tokens), text_mask.bool()
    score_chunk = functools.partial(_sinkhorn_chunk, epsilon=epsilon, iterations=iterations, unroll=unroll)
    return _scores_in_chunks(score_chunk, image_tokens, text_tokens, text_mask, chunk_size, keys, dim)


def _filip_chunk(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor,
    image_index: Tensor | None,
    text_index: Tensor | None,
) -> Tensor:
    sim, mask = _pair_similarities(*_gather_pairs(image_tokens, text_tokens, text_mask, image_index, text_index))
    num_words = mask.sum(-1).clamp(min=1).to(sim.dtype)
    word_to_patch = sim.amax(dim=2)  # (c, K, M): best patch for each word
    text_side = (word_to_patch * mask).sum(-1) / num_words
    patch_to_word = sim.masked_fill(~mask.unsqueeze(2), float("-inf")).amax(dim=3)  # (c, K, N): best valid word
    image_side = patch_to_word.clamp(min=-1.0).mean(-1)  # clamp only touches texts without valid words (-inf)
    return 0.5 * (text_side + image_side)


@_full_precision
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
    (image_tokens, text_tokens), text_mask = _upcast(image_tokens, text_tokens), text_mask.bool()
    return _scores_in_chunks(_filip_chunk, image_tokens, text_tokens, text_mask, chunk_size, keys, dim)


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
    sim, mask = _pair_similarities(*_gather_pairs(image_tokens, text_tokens, text_mask, image_index, text_index))
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


def _hard_keys(scores: Tensor, num_negatives: int, labels: Tensor | None, dim: int) -> Tensor:
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


@_full_precision
@torch.no_grad()
def _pooled_similarity(image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
    """Cosine of the mean patch token and the mean valid word token of every image-text pair, (B_img, B_txt).

    Chooses the hard negatives of the per-query form: O(B^2 D) and no matching, in the token space whose matched
    scores fill the softmax, and from the tokens the loss already holds (the global CLIP embeddings would tie the
    token term to the clip objective and to extra inputs in every caller). Normalised means, so that a short caption
    (a mean over few words, hence longer) is not everyone's hardest negative. Detached.
    """
    (image_tokens, text_tokens), weights = _upcast(image_tokens, text_tokens), text_mask.unsqueeze(-1)
    image = F.normalize(image_tokens.mean(1), dim=-1)
    text = F.normalize((text_tokens * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1)
    return image @ text.T


@_full_precision
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
    (image_tokens, text_tokens), text_mask = _upcast(image_tokens, text_tokens), text_mask.bool()
    _warn_if_over_capacity(text_mask, image_tokens.shape[1], capacity)
    score_chunk = functools.partial(_hungarian_chunk, capacity=capacity)
    if num_negatives is None:
        return _scores_in_chunks(score_chunk, image_tokens, text_tokens, text_mask, chunk_size, keys, dim)
    if keys is not None:
        raise ValueError("num_negatives chooses the matched pairs itself: pass keys or num_negatives, not both")
    filip = filip_pair_scores(image_tokens, text_tokens, text_mask, chunk_size)
    keys = _hard_keys(filip, num_negatives, labels, dim)
    matched = _scores_in_chunks(score_chunk, image_tokens, text_tokens, text_mask, chunk_size, keys, dim)
    return filip.scatter(dim, keys, matched)


class TokenMatchingLoss(nn.Module):
    """Patch-word relaxed bipartite matching (LightCLIP, token level; docs/method.md).

    The pair score S_tok(i, j) = sum Pi A / sum Pi aligns the patches of image i with the valid words of text j under a
    matching Pi: entropic OT (`"sinkhorn"`, our reading, default), Hungarian matching with patch capacity
    (`"hungarian"`; every pair by default, or the positives and `num_negatives` hardest negatives with FILIP scores
    elsewhere), or FILIP's independent max (`"filip"`, baseline). The loss is a symmetric InfoNCE over the global
    batch on S_tok, scaled by its own learnable temperature `logit_scale` (exponentiated, owned by the caller).

    `softmax_negatives=k` (our reading; any method) bounds the cost: each image row and each text column is a softmax
    over its positive and its k hardest negatives only, chosen by the cosine of mean-pooled tokens (no matching), and
    only those 1 + k pairs per query are matched: B (1 + k) pairs per direction instead of B^2, linear in the batch.
    Every logit of a softmax is then a matched score (one scale), unlike Hungarian's `num_negatives`, which it
    overrides.
    """

    def __init__(
        self,
        method: str = "sinkhorn",
        epsilon: float = 0.05,
        iterations: int = 10,
        capacity: int = 2,
        num_negatives: int | None = None,
        chunk_size: int = 32,
        unroll: bool = False,
        softmax_negatives: int | None = None,
    ) -> None:
        super().__init__()
        if method not in ("sinkhorn", "hungarian", "filip"):
            raise ValueError(f"method must be 'sinkhorn', 'hungarian' or 'filip', got {method!r}")
        if softmax_negatives is not None and softmax_negatives < 1:
            raise ValueError(f"softmax_negatives must be a positive integer or None, got {softmax_negatives}")
        self.method = method
        self.epsilon = epsilon
        self.iterations = iterations
        self.capacity = capacity
        self.num_negatives = num_negatives
        self.chunk_size = chunk_size
        self.unroll = unroll
        self.softmax_negatives = softmax_negatives

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, epsilon={self.epsilon}, iterations={self.iterations}, "
                f"softmax_negatives={self.softmax_negatives}")

    def pair_scores(
        self,
        image_tokens: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        labels: Tensor | None = None,
        dim: int = 1,
        keys: Tensor | None = None,
    ) -> Tensor:
        """S_tok of every image with every text, or of the pairs `keys` names, laid out as `scores.gather(dim, keys)`;
        without keys, `labels` / `dim` choose the Hungarian method's hard negatives."""
        if self.method == "sinkhorn":
            return sinkhorn_pair_scores(image_tokens, text_tokens, text_mask, self.epsilon, self.iterations,
                                        self.chunk_size, unroll=self.unroll, keys=keys, dim=dim)
        if self.method == "hungarian":
            num_negatives = self.num_negatives if keys is None else None
            return hungarian_pair_scores(image_tokens, text_tokens, text_mask, self.capacity, num_negatives, labels,
                                         dim, self.chunk_size, keys=keys)
        return filip_pair_scores(image_tokens, text_tokens, text_mask, self.chunk_size, keys=keys, dim=dim)

    def hard_keys(
        self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor, labels: Tensor, dim: int
    ) -> Tensor:
        """Each query's positive and its `softmax_negatives` hardest negatives, positive first (see `pair_scores`).

        A query's keys depend only on its own row (`dim=1`) or column (`dim=0`), so a rank's local queries against
        the gathered batch pick what one process picks on the global batch.
        """
        similarity = _pooled_similarity(image_tokens, text_tokens, text_mask)
        return _hard_keys(similarity, self.softmax_negatives, labels, dim)

    def forward(
        self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor, logit_scale: Tensor
    ) -> dict[str, Tensor]:
        """image_tokens (B, N, D) and text_tokens (B, M, D) L2-normalised; text_mask (B, M) bool, True = valid word."""
        labels = _global_labels(image_tokens.shape[0], image_tokens.device)
        _, world_size = world_info()
        hungarian_hard = self.method == "hungarian" and self.num_negatives is not None
        per_query = hungarian_hard or self.softmax_negatives is not None  # pairs chosen per row / column
        if world_size == 1 and not per_query:
            scores = self.pair_scores(image_tokens, text_tokens, text_mask)
            return {"token_loss": _symmetric_ce(logit_scale * scores, logit_scale * scores.T, labels)}
        # local image rows against all texts, and all images against the local text columns
        all_image = gather_with_grad(image_tokens)
        all_text = gather_with_grad(text_tokens)
        all_mask = gather_no_grad(text_mask)
        image_keys = text_keys = None
        if self.softmax_negatives is not None:
            image_keys = self.hard_keys(image_tokens, all_text, all_mask, labels, dim=1)  # (B_local, 1 + k)
            text_keys = self.hard_keys(all_image, text_tokens, text_mask, labels, dim=0)  # (1 + k, B_local)
        per_image = self.pair_scores(image_tokens, all_text, all_mask, labels, dim=1, keys=image_keys)
        per_text = self.pair_scores(all_image, text_tokens, text_mask, labels, dim=0, keys=text_keys)
        if image_keys is not None:
            labels = torch.zeros_like(labels)  # the keys put each query's positive first
        return {"token_loss": _symmetric_ce(logit_scale * per_image, logit_scale * per_text.T, labels)}


# ---------------------------------------------------------------------------------------------------------------------
# masked language modelling


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: list[int] | tuple[int, ...] | set[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: returns `(masked_input_ids, labels)`.

    `probability` of the non-special, non-padding tokens are chosen; of those 80 % become `mask_token_id`, 10 % a
    random non-special token, 10 % stay. `labels` holds the original id at chosen positions and -100 elsewhere.
    Every row with at least one maskable token gets at least one chosen token (one drawn uniformly when the coin
    flips chose none): short captions would otherwise often give the masked pass nothing to predict.
    """
    device = input_ids.device
    gen_device = generator.device if generator is not None else device

    def rand(shape: torch.Size) -> Tensor:
        return torch.rand(shape, generator=generator, device=gen_device).to(device)

    specials = torch.tensor(sorted(set(special_token_ids) | {mask_token_id}), device=device, dtype=input_ids.dtype)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, specials)
    chosen = maskable & (rand(input_ids.shape) < probability)
    # rows that drew nothing but could: pick one maskable position uniformly
    empty = maskable.any(-1) & ~chosen.any(-1)
    pick = (rand(input_ids.shape) * maskable).argmax(-1)
    chosen[empty, pick[empty]] = True

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = rand(input_ids.shape)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[specials[(specials >= 0) & (specials < vocab_size)]] = False
    allowed_ids = allowed.nonzero().squeeze(-1).to(input_ids.dtype)
    random_ids = allowed_ids[(rand(input_ids.shape) * len(allowed_ids)).long().clamp(max=len(allowed_ids) - 1)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


class MaskedLanguageModelingLoss(nn.Module):
    """Cross-entropy over the masked positions only (labels != -100)."""

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """logits (B, L, V), labels (B, L). A batch with nothing masked gives 0, still attached to the graph, so
        every rank runs the same backward under DDP."""
        selected = labels != -100
        if not selected.any():
            return {"mlm_loss": logits.sum() * 0.0}
        return {"mlm_loss": F.cross_entropy(logits[selected].float(), labels[selected])}


# ---------------------------------------------------------------------------------------------------------------------
# CLIP-PING neighbour guidance


class NeighborContrastiveLoss(nn.Module):
    """In-batch InfoNCE of mapped student embeddings against frozen neighbour targets (CLIP-PING NN / XNN; see
    docs/method.md).

    NCE(a, b) is one-directional: rows are the local queries, columns the gathered targets of the global batch, the
    label is the query's own target. Targets are constants (feature banks or frozen teachers): they are detached and
    gathered without autograd. With `detach_targets=False` (teacher features projected into the student space by a
    trainable head) they keep their gradient and are gathered with it. One instance per term; `name` sets the output
    key (`"nn"` -> `"nn_loss"`).
    """

    def __init__(self, name: str = "nn", detach_targets: bool = True) -> None:
        super().__init__()
        self.name = name
        self.detach_targets = detach_targets

    def extra_repr(self) -> str:
        return f"name={self.name!r}, detach_targets={self.detach_targets}"

    def nce(self, queries: Tensor, targets: Tensor, logit_scale: Tensor) -> Tensor:
        """One-directional InfoNCE of local query rows against the global batch of targets."""
        targets = targets.to(queries.dtype)
        all_targets = gather_no_grad(targets.detach()) if self.detach_targets else gather_with_grad(targets)
        logits = logit_scale * queries @ all_targets.T
        return F.cross_entropy(logits, _global_labels(queries.shape[0], queries.device))

    def forward(
        self,
        image_queries: Tensor,
        text_queries: Tensor,
        image_targets: Tensor,
        text_targets: Tensor,
        logit_scale: Tensor,
    ) -> dict[str, Tensor]:
        """Queries (B_local, D_t) L2-normalised, already mapped by the caller's heads; targets (B_local, D_t)
        L2-normalised. Returns `{f"{name}_loss": 0.5 * (NCE(image) + NCE(text))}`."""
        loss = 0.5 * (
            self.nce(image_queries, image_targets, logit_scale) + self.nce(text_queries, text_targets, logit_scale)
        )
        return {f"{self.name}_loss": loss}


# ---------------------------------------------------------------------------------------------------------------------
# distillation from a frozen CLIP teacher (docs/distillation.md)


def _soft_target_ce(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over rows of -sum_j softmax(teacher)_j log softmax(student)_j, in float32 at least."""
    student_logits, teacher_logits = _upcast(student_logits, teacher_logits)
    return -(teacher_logits.softmax(dim=-1) * F.log_softmax(student_logits, dim=-1)).sum(dim=-1).mean()


class AffinityDistillationLoss(ClipLoss):
    """Affinity distillation (`kd`): the student's image->text and text->image distributions over the global batch
    are pulled to the teacher's (open_clip `DistillClipLoss`, TinyCLIP's affinity mimicking).

    loss = 1/2 (CE(softmax(T_i2t), S_i2t) + CE(softmax(T_t2i), S_t2i)), with S = s * img @ txt.T from the student's
    own scale s and T = t * timg @ ttxt.T from the teacher's scale t, or 1 / `temperature` when one is set. The
    cross-entropy, not the KL divergence, is returned (same gradient; it equals the teacher distribution's entropy,
    not 0, when the student matches the teacher). Teacher features are constants, gathered without autograd; the
    student's columns are gathered with gradients, so local rows against global columns average to the one-process
    loss under DDP, as `ClipLoss`.
    """

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be positive or None, got {temperature}")
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        teacher_image_features: Tensor,
        teacher_text_features: Tensor,
        teacher_logit_scale: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        """Student features (B_local, D_s) and teacher features (B_local, D_t), all L2-normalised; `logit_scale`
        and `teacher_logit_scale` exponentiated. `teacher_logit_scale` is ignored when a temperature is set."""
        if self.temperature is not None:
            teacher_logit_scale = 1.0 / self.temperature
        elif teacher_logit_scale is None:
            raise ValueError("AffinityDistillationLoss needs teacher_logit_scale when no temperature is set")
        student_per_image, student_per_text = self.logits(image_features, text_features, logit_scale)
        # the targets in float32 at least, autocast off: bf16 would round the teacher's distribution
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        teacher_image, teacher_text = (t.detach().to(dtype) for t in (teacher_image_features, teacher_text_features))
        teacher_logit_scale = torch.as_tensor(teacher_logit_scale).detach().to(teacher_image)
        with torch.autocast(teacher_image.device.type, enabled=False):
            teacher_per_image = teacher_logit_scale * teacher_image @ gather_no_grad(teacher_text).T
            teacher_per_text = teacher_logit_scale * teacher_text @ gather_no_grad(teacher_image).T
        loss = 0.5 * (
            _soft_target_ce(student_per_image, teacher_per_image) + _soft_target_ce(student_per_text, teacher_per_text)
        )
        return {"kd_loss": loss}


class FeatureDistillationLoss(nn.Module):
    """Feature distillation (`fd`, CLIP-KD's FD): each student embedding is pulled to its own sample's teacher
    embedding, image and text alike.

    Both sides are L2-normalised here. `loss="cosine"`: mean of 1 - cos; `loss="mse"`: `F.mse_loss`, the mean over
    rows and dimensions as CLIP-KD, which on unit vectors equals 2 (1 - cos) / D (the same pull, D / 2 times
    weaker). When the widths differ, the caller maps the student embeddings into the teacher's width first (a
    training-only projection it owns). Per-sample, so it needs no gather: the mean of the local means is the
    global mean under DDP.
    """

    def __init__(self, loss: str = "cosine") -> None:
        super().__init__()
        if loss not in ("cosine", "mse"):
            raise ValueError(f"loss must be 'cosine' or 'mse', got {loss!r}")
        self.loss = loss

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}"

    def distance(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Mean distance of the (projected) student rows to the teacher rows, (B, D_t) each."""
        (student,) = _upcast(student)
        student = F.normalize(student, dim=-1)
        teacher = F.normalize(teacher.detach().to(student.dtype), dim=-1)
        if self.loss == "mse":
            return F.mse_loss(student, teacher)
        return (1.0 - (student * teacher).sum(dim=-1)).mean()

    def forward(
        self, image_features: Tensor, text_features: Tensor, teacher_image_features: Tensor,
        teacher_text_features: Tensor,
    ) -> dict[str, Tensor]:
        """Student features (B_local, D_t), already projected to the teacher's width; teacher features
        (B_local, D_t). Returns `{"fd_loss": 1/2 (d(image) + d(text))}`."""
        loss = 0.5 * (
            self.distance(image_features, teacher_image_features) + self.distance(text_features, teacher_text_features)
        )
        return {"fd_loss": loss}
