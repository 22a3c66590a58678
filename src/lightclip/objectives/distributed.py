"""Data parallelism inside the losses, as open_clip's `local_loss=True, gather_with_grad=True`.

Every process scores its local rows against the all-gathered columns of the global batch, with labels offset by
`rank * B_local`. Averaging the per-rank losses, and the per-rank gradients as DDP does, gives exactly the loss and
the gradients of one process on the global batch (docs/method.md, "Distributed training"). Everything here is the
identity on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


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


def global_labels(batch_size: int, device: torch.device) -> Tensor:
    """Column index of each local row's positive in the gathered batch."""
    rank, _ = world_info()
    return torch.arange(batch_size, device=device) + rank * batch_size


__all__ = ["gather_no_grad", "gather_with_grad", "global_labels", "world_info"]
