"""Two-process gloo check of the losses of `lightclip.objectives`: run as `python _dist_losses_worker.py OUT.pt`.

Each rank runs a tiny shared "model" (linear maps, a learnable logit scale and bias) on its slice of a fixed global
batch, computes every loss with local rows against gathered columns, backpropagates, and averages loss and gradients
over the ranks as DDP does. Rank 0 saves the averages; `test_losses_distributed.py` compares them with `run_case` on
the whole batch in one process.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightclip.objectives.contrastive import ClipLoss, SoftClipLoss
from lightclip.objectives.distillation import AffinityDistillationLoss, FeatureDistillationLoss
from lightclip.objectives.neighbors import NeighborContrastiveLoss
from lightclip.objectives.siglip import SigLipLoss
from lightclip.objectives.token_matching import TokenMatchingLoss

WORLD_SIZE = 2
LOCAL_BATCH = 3
GLOBAL_BATCH = WORLD_SIZE * LOCAL_BATCH
CASES = ("clip", "soft", "siglip", "token_sinkhorn", "token_hungarian", "token_hungarian_hard", "token_filip",
         "token_sinkhorn_bounded", "token_hungarian_bounded", "token_filip_bounded", "nn", "kd", "kd_temperature",
         "fd_cosine", "fd_mse", "pretraining_all", "pretraining_siglip")
TEACHER_IMAGE_DIM, TEACHER_TEXT_DIM = 6, 5


def make_inputs() -> dict[str, torch.Tensor]:
    """The fixed global batch: raw inputs of the towers, word masks and constant neighbour (or teacher) targets."""
    g = torch.Generator().manual_seed(1234)
    b, d_in, n, m, d = GLOBAL_BATCH, 5, 4, 5, 4
    lengths = torch.randint(1, m + 1, (b,), generator=g)
    return {
        "image": torch.randn(b, d_in, generator=g, dtype=torch.float64),
        "text": torch.randn(b, d_in, generator=g, dtype=torch.float64),
        "image_tokens": torch.randn(b, n, d_in, generator=g, dtype=torch.float64),
        "text_tokens": torch.randn(b, m, d_in, generator=g, dtype=torch.float64),
        "text_mask": torch.arange(m)[None, :] < lengths[:, None],
        "image_targets": F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1),
        "text_targets": F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1),
    }


class TinyModel(nn.Module):
    """Linear towers and heads with a learnable log logit scale and a logit bias, the same weights on every rank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(5, 4, dtype=torch.float64)
        self.text = nn.Linear(5, 4, dtype=torch.float64)
        self.head = nn.Linear(4, 4, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))


def pretraining_inputs() -> dict:
    """A global batch for `LightClipForPreTraining`: pictures, captions of several lengths, a masked copy with one
    masked word per caption (the same count on every rank, so the per-rank MLM means average to the global one) and
    constant CLIP-PING targets."""
    g = torch.Generator().manual_seed(99)
    b, length = GLOBAL_BATCH, 7
    lengths = torch.tensor([7, 5, 6, 4, 7, 5])
    ids = torch.randint(10, 4096, (b, length), generator=g)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[torch.arange(b), lengths - 1] = 3  # end of text
    ids = ids * attention_mask
    positions = torch.tensor([1, 2, 1, 2, 3, 1])
    mlm_ids, labels = ids.clone(), torch.full_like(ids, -100)
    labels[torch.arange(b), positions] = ids[torch.arange(b), positions]
    mlm_ids[torch.arange(b), positions] = 4  # [MASK]
    unit = lambda dim: F.normalize(torch.randn(b, dim, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return {"input_ids": ids, "attention_mask": attention_mask, "mlm_input_ids": mlm_ids, "mlm_labels": labels,
            "pixel_values": torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64),
            "neighbor_targets": {"image_nn": unit(TEACHER_IMAGE_DIM), "text_nn": unit(TEACHER_TEXT_DIM),
                                 "image_xnn": unit(TEACHER_TEXT_DIM), "text_xnn": unit(TEACHER_IMAGE_DIM)}}


def run_pretraining(rows: slice, objectives: str = "all") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`LightClipForPreTraining` with objectives that need no distillation teacher (`all`: soft, token, mlm, nn,
    xnn; or siglip with those but soft) on `rows` of the global batch, in float64."""
    from lightclip import LightClipConfig, LightClipForPreTraining

    torch.manual_seed(0)
    config = LightClipConfig.from_preset("lightclip-xxs", objectives=objectives, teacher_image_dim=TEACHER_IMAGE_DIM,
                                         teacher_text_dim=TEACHER_TEXT_DIM, sinkhorn_iterations=5)
    model = LightClipForPreTraining(config).double().train()
    model.set_progress(0.6)
    data = pretraining_inputs()
    batch = {k: v[rows] for k, v in data.items() if k != "neighbor_targets"}
    targets = {k: v[rows] for k, v in data["neighbor_targets"].items()}
    out = model(**batch, neighbor_targets=targets)
    contrastive = "siglip_loss" if "siglip" in objectives else "contrastive_loss"
    assert {contrastive, "token_loss", "mlm_loss", "nn_loss", "xnn_loss"} <= set(out.losses), out.losses
    out.loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()
             if p.requires_grad}
    return out.loss.detach(), grads


def run_case(name: str, rows: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss on `rows` of the global batch and the gradients of every model parameter."""
    if name == "pretraining_all":
        return run_pretraining(rows)
    if name == "pretraining_siglip":
        return run_pretraining(rows, "siglip,token,mlm,nn,xnn")
    data = {k: v[rows] for k, v in make_inputs().items()}
    model = TinyModel()
    scale = model.log_scale.exp()
    img = F.normalize(model.image(data["image"]), dim=-1)
    txt = F.normalize(model.text(data["text"]), dim=-1)
    if name == "clip":
        loss = ClipLoss()(img, txt, scale)["contrastive_loss"]
    elif name == "siglip":
        loss = SigLipLoss()(img, txt, scale, model.logit_bias)["siglip_loss"]
    elif name == "soft":
        soft = SoftClipLoss(mode="similarity", alpha_max=0.5, temperature=0.5)
        soft.set_progress(0.7)
        loss = soft(img, txt, scale)["contrastive_loss"]
    elif name.startswith("token_"):
        img_tok = F.normalize(model.image(data["image_tokens"]), dim=-1)
        txt_tok = F.normalize(model.text(data["text_tokens"]), dim=-1)
        # "_hard": 2 hardest negatives matched, FILIP elsewhere; "_bounded": softmaxes over the positive and 2 negatives
        method, _, variant = name.removeprefix("token_").partition("_")
        matcher = TokenMatchingLoss(method, epsilon=0.1, iterations=8, num_negatives=2 if variant == "hard" else None,
                                    chunk_size=2, softmax_negatives=2 if variant == "bounded" else None)
        loss = matcher(img_tok, txt_tok, data["text_mask"], scale)["token_loss"]
    elif name == "nn":
        queries_i = F.normalize(model.head(img), dim=-1)
        queries_t = F.normalize(model.head(txt), dim=-1)
        loss = NeighborContrastiveLoss()(queries_i, queries_t, data["image_targets"], data["text_targets"], scale)[
            "nn_loss"
        ]
    elif name.startswith("kd"):  # the constant targets stand for the teacher's embeddings
        kd = AffinityDistillationLoss(temperature=0.1 if name == "kd_temperature" else None)
        loss = kd(img, txt, scale, data["image_targets"], data["text_targets"], torch.tensor(20.0))["kd_loss"]
    elif name.startswith("fd_"):
        fd = FeatureDistillationLoss(name.removeprefix("fd_"))
        loss = fd(model.head(img), model.head(txt), data["image_targets"], data["text_targets"])["fd_loss"]
    else:
        raise ValueError(name)
    loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
    return loss.detach(), grads


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for name in CASES:
            loss, grads = run_case(name, slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH))
            for t in (loss, *grads.values()):
                dist.all_reduce(t)  # DDP semantics: the mean over ranks
                t /= WORLD_SIZE
            results[name] = {"loss": loss, "grads": grads}
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def main(out_path: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, out_path), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main(sys.argv[1])
