"""Each loss of `lightclip.objectives` against a brute-force reference written here with loops and dense formulas."""

from __future__ import annotations

import functools
import itertools
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from lightclip.objectives import distributed
from lightclip.objectives.contrastive import ClipLoss, SoftClipLoss
from lightclip.objectives.mlm import MaskedLanguageModelingLoss, mask_tokens
from lightclip.objectives.neighbors import NeighborContrastiveLoss
from lightclip.objectives.siglip import SigLipLoss
from lightclip.objectives.token_matching import (
    TokenMatchingLoss,
    filip_pair_scores,
    hungarian_pair_scores,
    sinkhorn,
    sinkhorn_pair_scores,
    sinkhorn_plan,
)
from lightclip.objectives.token_matching import pairs as token_pairs

DTYPE = torch.float64  # references are compared at float64 precision


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=DTYPE), dim=-1)


def tokens(b: int = 5, n: int = 6, m: int = 5, d: int = 8, seed: int = 0):
    """Patch and word tokens with ragged text masks (every text keeps at least one word)."""
    img, txt = unit(b, n, d, seed=seed), unit(b, m, d, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    lengths = torch.randint(1, m + 1, (b,), generator=g)
    mask = torch.arange(m)[None, :] < lengths[:, None]
    return img, txt, mask


# ---------------------------------------------------------------------------------------------------- references


def ref_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j q_ij log softmax_j, written as python loops."""
    total = 0.0
    for i in range(logits.shape[0]):
        log_z = torch.log(sum(torch.exp(logits[i, j]) for j in range(logits.shape[1])))
        total = total + sum(-targets[i, j] * (logits[i, j] - log_z) for j in range(logits.shape[1]))
    return total / logits.shape[0]


def ref_soft_targets(logits: torch.Tensor, alpha: float, mode: str, tau: float) -> torch.Tensor:
    b = logits.shape[0]
    q = torch.zeros_like(logits)
    for i in range(b):
        others = [j for j in range(b) if j != i]
        if mode == "uniform":
            weights = {j: 1.0 / (b - 1) for j in others}
        else:
            z = sum(math.exp(logits[i, j].item() / tau) for j in others)
            weights = {j: math.exp(logits[i, j].item() / tau) / z for j in others}
        q[i, i] = 1 - alpha
        for j in others:
            q[i, j] = alpha * weights[j]
    return q


def ref_sinkhorn_score(a: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Plain (non-log) Sinkhorn on one pair's valid similarities (N, M_j); differentiable end to end."""
    n, m = a.shape
    kernel = torch.exp(a / epsilon)
    u, v = torch.ones(n, dtype=a.dtype), torch.ones(m, dtype=a.dtype)
    for _ in range(iterations):
        u = (1.0 / n) / (kernel @ v)
        v = (1.0 / m) / (kernel.T @ u)
    plan = u[:, None] * kernel * v[None, :]
    return (plan * a).sum() / plan.sum(), plan


def ref_filip(p: torch.Tensor, w: torch.Tensor) -> float:
    a = [[float(p[n] @ w[m]) for m in range(len(w))] for n in range(len(p))]
    text_side = sum(max(a[n][m] for n in range(len(p))) for m in range(len(w))) / len(w)
    image_side = sum(max(a[n][m] for m in range(len(w))) for n in range(len(p))) / len(p)
    return 0.5 * (text_side + image_side)


def ref_capacity_score(a: torch.Tensor, capacity: int) -> float:
    """Best mean similarity over all maps word -> patch that use each patch at most `capacity` times."""
    n, m = a.shape
    best = -math.inf
    for assignment in itertools.product(range(n), repeat=m):
        if max(assignment.count(p) for p in range(n)) <= capacity:
            best = max(best, sum(float(a[assignment[k], k]) for k in range(m)) / m)
    return best


def ref_pooled_cosine(p: torch.Tensor, w: torch.Tensor) -> float:
    """Cosine of the mean patch and the mean valid word of one pair: the hard-negative ranking."""
    a, b = sum(p.detach()) / len(p), sum(w.detach()) / len(w)
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def ref_bounded_token_loss(img, txt, mask, scale, k: int, eps: float, iters: int, unroll: bool) -> torch.Tensor:
    """Each image row and each text column: a softmax over its positive and its k hardest negatives by pooled cosine,
    every logit a Sinkhorn score of that pair alone; the two directions averaged."""
    b = len(img)

    def score(i: int, j: int) -> torch.Tensor:
        a = img[i] @ txt[j, mask[j]].T
        value, plan = ref_sinkhorn_score(a, eps, iters)
        return value if unroll else ((plan / plan.sum()).detach() * a).sum()

    directions = []
    for pair in (lambda q, key: (q, key), lambda q, key: (key, q)):  # image rows, then text columns
        rows = []
        for q in range(b):
            cosine = {key: ref_pooled_cosine(img[pair(q, key)[0]], txt[pair(q, key)[1], mask[pair(q, key)[1]]])
                      for key in range(b) if key != q}
            hardest = sorted(cosine, key=cosine.get, reverse=True)[:k]
            rows.append(torch.stack([scale * score(*pair(q, key)) for key in [q, *hardest]]))
        logits = torch.stack(rows)
        directions.append(ref_ce(logits, F.one_hot(torch.zeros(b, dtype=torch.long), k + 1).to(logits.dtype)))
    return 0.5 * (directions[0] + directions[1])


# ---------------------------------------------------------------------------------------------------- instance level


def test_clip_loss_matches_manual_cross_entropy():
    img, txt = unit(6, 4, seed=1), unit(6, 4, seed=2)
    scale = torch.tensor(7.0)
    logits = scale * img @ txt.T
    eye = torch.eye(dtype=DTYPE, n=6)
    expected = 0.5 * (ref_ce(logits, eye) + ref_ce(logits.T, eye))
    out = ClipLoss()(img, txt, scale)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], expected)


@pytest.mark.parametrize("mode", ["similarity", "uniform"])
def test_soft_clip_loss_matches_manual_soft_targets(mode):
    img, txt = unit(5, 4, seed=3).requires_grad_(), unit(5, 4, seed=4).requires_grad_()
    scale, tau = torch.tensor(5.0), 0.7
    loss = SoftClipLoss(mode=mode, alpha_max=0.5, temperature=tau)
    loss.set_progress(0.6)
    assert loss.alpha == pytest.approx(0.3)
    logits = (scale * img @ txt.T).detach()
    expected = 0.5 * (
        ref_ce(logits, ref_soft_targets(logits, 0.3, mode, tau))
        + ref_ce(logits.T, ref_soft_targets(logits.T, 0.3, mode, tau))
    )
    value = loss(img, txt, scale)["contrastive_loss"]
    torch.testing.assert_close(value, expected)
    # the targets are stop-gradient: the gradient is that of CE against fixed q, not of a loss through q
    live = scale * img @ txt.T
    fixed = 0.5 * (
        ref_ce(live, ref_soft_targets(logits, 0.3, mode, tau))
        + ref_ce(live.T, ref_soft_targets(logits.T, 0.3, mode, tau))
    )
    torch.testing.assert_close(torch.autograd.grad(value, img), torch.autograd.grad(fixed, img))
    assert not torch.allclose(value, ClipLoss()(img, txt, scale)["contrastive_loss"])


@pytest.mark.parametrize("mode", ["similarity", "uniform"])
def test_soft_clip_loss_at_alpha_zero_equals_clip(mode):
    img, txt, scale = unit(7, 3, seed=5), unit(7, 3, seed=6), torch.tensor(11.0)
    soft = SoftClipLoss(mode=mode, alpha_max=0.0)
    soft.set_progress(1.0)
    assert soft.alpha == 0.0
    assert torch.equal(soft(img, txt, scale)["contrastive_loss"], ClipLoss()(img, txt, scale)["contrastive_loss"])
    soft = SoftClipLoss(mode=mode, alpha_max=0.2)  # progress 0 at construction
    assert torch.equal(soft(img, txt, scale)["contrastive_loss"], ClipLoss()(img, txt, scale)["contrastive_loss"])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_soft_schedule_endpoints_and_monotone(schedule):
    loss = SoftClipLoss(alpha_max=0.5, schedule=schedule)
    values = []
    for p in torch.linspace(0, 1, 101).tolist():
        loss.set_progress(p)
        values.append(loss.alpha)
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.5)
    assert all(b >= a for a, b in zip(values, values[1:]))
    loss.set_progress(0.25)
    expected = 0.125 if schedule == "linear" else 0.5 * 0.5 * (1 - math.cos(math.pi / 4))
    assert loss.alpha == pytest.approx(expected)
    loss.set_progress(-3.0)
    assert loss.alpha == 0.0
    loss.set_progress(7.0)
    assert loss.alpha == pytest.approx(0.5)


def test_soft_clip_loss_rejects_bad_arguments():
    with pytest.raises(ValueError):
        SoftClipLoss(mode="nope")
    with pytest.raises(ValueError):
        SoftClipLoss(schedule="step")


def ref_siglip(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """-(1/N) sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)), z = +1 on the diagonal, written as a double loop."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * sum(img[i, d] * txt[j, d] for d in range(img.shape[1])) + bias
            total = total - torch.log(1 / (1 + torch.exp(-z * logit)))
    return total / n


def test_siglip_loss_matches_the_double_loop_with_gradients():
    img, txt = unit(5, 4, seed=41).requires_grad_(), unit(5, 4, seed=42).requires_grad_()
    scale = torch.tensor(3.0, dtype=DTYPE, requires_grad=True)
    bias = torch.tensor(-2.5, dtype=DTYPE, requires_grad=True)
    out = SigLipLoss()(img, txt, scale, bias)
    assert set(out) == {"siglip_loss"}
    expected = ref_siglip(img, txt, scale, bias)
    torch.testing.assert_close(out["siglip_loss"], expected)
    inputs = (img, txt, scale, bias)
    for got, want in zip(torch.autograd.grad(out["siglip_loss"], inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want)
        assert got.abs().sum() > 0


def test_siglip_loss_at_the_initial_scale_and_bias_and_in_bf16():
    """At t = 10, b = -10 (Zhai et al.'s start) the positives dominate: about -log sigmoid(10 cos - 10) per image.
    Under bf16 autocast the logits and their sum stay float32."""
    img, txt = unit(8, 16, seed=43), unit(8, 16, seed=44)
    scale, bias = torch.tensor(10.0, dtype=DTYPE), torch.tensor(-10.0, dtype=DTYPE)
    loss = SigLipLoss()(img, txt, scale, bias)["siglip_loss"]
    torch.testing.assert_close(loss, ref_siglip(img, txt, scale, bias))
    positives = -F.logsigmoid(10 * (img * txt).sum(-1) - 10).mean()
    assert positives <= loss <= positives + 7 * math.log(2)  # each of the 7 negatives adds at most log 2 (cos <= 1)
    low = SigLipLoss()(img.bfloat16(), txt.bfloat16(), scale.float(), bias.float())["siglip_loss"]
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), loss, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------- token level


@pytest.mark.parametrize("unroll", [False, True])
def test_sinkhorn_pair_scores_match_dense_per_pair_loop(unroll):
    img, txt, mask = tokens(b=4, n=5, m=6, seed=7)
    img.requires_grad_()
    txt.requires_grad_()
    eps, iters = 0.1, 15
    scores = sinkhorn_pair_scores(img, txt, mask, eps, iters, chunk_size=3, unroll=unroll)
    expected = torch.zeros(4, 4, dtype=DTYPE)
    for i in range(4):
        for j in range(4):
            a = img[i] @ txt[j, mask[j]].T
            score, plan = ref_sinkhorn_score(a, eps, iters)
            if unroll:
                expected[i, j] = score
            else:  # plan held constant in the backward pass
                weights = (plan / plan.sum()).detach()
                expected[i, j] = (weights * a).sum()
    torch.testing.assert_close(scores, expected)
    upstream = unit(4, 4, seed=8)
    got = torch.autograd.grad((scores * upstream).sum(), (img, txt))
    want = torch.autograd.grad((expected * upstream).sum(), (img, txt))
    torch.testing.assert_close(got, want)
    # the two gradient modes really differ
    other = sinkhorn_pair_scores(img, txt, mask, eps, iters, unroll=not unroll)
    assert not torch.allclose(torch.autograd.grad((other * upstream).sum(), img)[0], got[0])


def test_sinkhorn_fast_path_equals_log_domain_path():
    img, txt, mask = tokens(b=3, n=7, m=6, seed=9)
    sim = torch.einsum("ind,jmd->ijnm", img, txt)
    mask4 = mask.unsqueeze(0).expand(3, 3, 6)
    for eps in (0.5, 0.05):
        fast = sinkhorn._sinkhorn_weights(sim, mask4, eps, 12, fast=True)
        slow = sinkhorn._sinkhorn_weights(sim, mask4, eps, 12, fast=False)
        torch.testing.assert_close(fast, slow)
    # the automatic choice falls back to the log domain where exp would underflow
    tiny_eps = sinkhorn._sinkhorn_weights(sim, mask4, 1e-3, 50)
    assert torch.isfinite(tiny_eps).all()
    torch.testing.assert_close(tiny_eps.sum((-2, -1)), torch.ones(3, 3, dtype=DTYPE))


def test_sinkhorn_plan_marginals_and_padding():
    img, txt = unit(6, 4, seed=10), unit(5, 4, seed=11)
    mask = torch.tensor([True, True, False, True, False])
    plan = sinkhorn_plan(img, txt, mask, epsilon=0.1, iterations=200)
    torch.testing.assert_close(plan.sum(0)[mask], torch.full((3,), 1 / 3, dtype=DTYPE))  # words: exact
    torch.testing.assert_close(plan.sum(1), torch.full((6,), 1 / 6, dtype=DTYPE), atol=1e-6, rtol=0)
    assert plan[:, ~mask].abs().max() == 0


def test_sinkhorn_approaches_permutation_and_hungarian_score():
    n = 4
    img, txt = unit(n, 3, seed=12), unit(n, 3, seed=13)
    a = img @ txt.T
    ranked = sorted((sum(float(a[k, perm[k]]) for k in range(n)), perm) for perm in itertools.permutations(range(n)))
    (best_value, best), (second_value, _) = ranked[-1], ranked[-2]
    assert best_value - second_value > 1e-3, "the optimum must be unique"
    target = torch.zeros(n, n, dtype=DTYPE)
    target[torch.arange(n), torch.tensor(best)] = 1.0 / n
    hungarian = best_value / n
    errors, gaps = [], []
    for eps in (0.3, 0.1, 0.03, 0.01):
        plan = sinkhorn_plan(img, txt, epsilon=eps, iterations=3000)
        errors.append(float((plan - target).abs().sum()))
        score = sinkhorn_pair_scores(img[None], txt[None], torch.ones(1, n, dtype=torch.bool), eps, 3000)
        gaps.append(abs(float(score) - hungarian))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-2 and gaps[-1] < 1e-3, (errors, gaps)


def test_filip_pair_scores_match_dense_loops():
    img, txt, mask = tokens(b=5, n=4, m=6, seed=14)
    scores = filip_pair_scores(img, txt, mask, chunk_size=2)
    for i in range(5):
        for j in range(5):
            assert float(scores[i, j]) == pytest.approx(ref_filip(img[i], txt[j, mask[j]]), abs=1e-10)


def test_hungarian_with_capacity_matches_brute_force_on_every_pair():
    """By default every pair of a row is capacity-matched: one score scale in each softmax."""
    img, txt, mask = tokens(b=6, n=3, m=5, d=6, seed=15)
    for capacity in (1, 2):
        if capacity * 3 < 5:  # every word must be matched
            mask = mask & (torch.arange(5) < 3)
        scores = hungarian_pair_scores(img, txt, mask, capacity=capacity)
        for i in range(6):
            for j in range(6):
                expected = ref_capacity_score(img[i] @ txt[j, mask[j]].T, capacity)
                assert float(scores[i, j]) == pytest.approx(expected, abs=1e-10)


def test_hungarian_warns_when_a_caption_exceeds_the_patches_capacity():
    img, txt, mask = tokens(b=3, n=2, m=5, d=6, seed=14)
    mask[:] = True
    mask[1, 3:] = False  # 3 words: within 2 patches x capacity 2
    with pytest.warns(UserWarning, match=r"\(2 x 2 = 4\)"):
        scores = hungarian_pair_scores(img, txt, mask, capacity=2)
    # the fifth word stays unmatched: the score is the best mean over 4 of the 5 words
    best = max(ref_capacity_score(img[0] @ txt[0, list(keep)].T, 2) for keep in itertools.combinations(range(5), 4))
    assert float(scores[0, 0]) == pytest.approx(best, abs=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hungarian_pair_scores(img, txt, mask, capacity=3)


def test_hungarian_only_positives_and_hardest_negatives_are_matched():
    img, txt, mask = tokens(b=6, n=3, m=4, seed=16)
    filip = filip_pair_scores(img, txt, mask)
    scores = hungarian_pair_scores(img, txt, mask, capacity=2, num_negatives=1)
    for i in range(6):
        negatives = [j for j in range(6) if j != i]
        hardest = max(negatives, key=lambda j: float(filip[i, j]))
        for j in range(6):
            matched = ref_capacity_score(img[i] @ txt[j, mask[j]].T, 2)
            expected = matched if j in (i, hardest) else float(filip[i, j])
            assert float(scores[i, j]) == pytest.approx(expected, abs=1e-10)
    # column queries (dim=0): each text's hardest image instead
    scores_t = hungarian_pair_scores(img, txt, mask, capacity=2, num_negatives=1, dim=0)
    for j in range(6):
        hardest = max((i for i in range(6) if i != j), key=lambda i: float(filip[i, j]))
        assert float(scores_t[hardest, j]) == pytest.approx(ref_capacity_score(img[hardest] @ txt[j, mask[j]].T, 2))


@pytest.mark.parametrize("num_negatives", [None, 1])
def test_hungarian_gradients_are_those_of_the_matched_entries(num_negatives):
    """With the matching fixed, the score is linear in the matched similarities: finite differences agree."""
    img, txt, mask = tokens(b=3, n=3, m=3, d=4, seed=17)
    img.requires_grad_()
    txt.requires_grad_()
    scores = functools.partial(hungarian_pair_scores, text_mask=mask, capacity=1, num_negatives=num_negatives)
    assert torch.autograd.gradcheck(lambda a, b: scores(a, b, chunk_size=2), (img, txt))


@pytest.mark.parametrize("method", ["sinkhorn", "filip", "hungarian"])
def test_chunking_does_not_change_scores(method):
    img, txt, mask = tokens(b=7, n=4, m=5, seed=18)
    full = TokenMatchingLoss(method, chunk_size=100).pair_scores(img, txt, mask)
    for chunk in (1, 2, 3, 5):
        torch.testing.assert_close(TokenMatchingLoss(method, chunk_size=chunk).pair_scores(img, txt, mask), full)


@pytest.mark.parametrize("method", ["sinkhorn", "filip", "hungarian"])
@pytest.mark.parametrize("bounded", [False, True])
def test_padding_tokens_change_nothing(method, bounded):
    img, txt, mask = tokens(b=4, n=4, m=5, seed=19)
    loss = TokenMatchingLoss(method, num_negatives=None if bounded else 2, softmax_negatives=2 if bounded else None)
    base = loss(img, txt, mask, torch.tensor(10.0))["token_loss"]
    garbage = torch.where(mask[..., None], txt, unit(4, 5, 8, seed=99))  # padded slots hold other vectors
    extra = torch.cat([garbage, unit(4, 3, 8, seed=98)], dim=1)  # and three more padded slots
    extra_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(loss(img, extra, extra_mask, torch.tensor(10.0))["token_loss"], base)


def test_token_loss_is_symmetric_infonce_on_pair_scores():
    img, txt, mask = tokens(b=4, seed=20)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(3.0, requires_grad=True)
    out = TokenMatchingLoss("sinkhorn")(img, txt, mask, scale)
    assert set(out) == {"token_loss"}
    s = scale * sinkhorn_pair_scores(img, txt, mask)
    eye = torch.eye(dtype=DTYPE, n=4)
    torch.testing.assert_close(out["token_loss"], 0.5 * (ref_ce(s, eye) + ref_ce(s.T, eye)))
    grads = torch.autograd.grad(out["token_loss"], (img, txt, scale))
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("unroll", [False, True])
def test_bounded_token_loss_matches_brute_force_reference(unroll):
    img, txt, mask = tokens(b=6, n=4, m=5, seed=30)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(4.0, dtype=DTYPE, requires_grad=True)
    eps, iters, k = 0.1, 12, 2
    loss = TokenMatchingLoss(epsilon=eps, iterations=iters, chunk_size=4, unroll=unroll, softmax_negatives=k)
    out = loss(img, txt, mask, scale)["token_loss"]
    expected = ref_bounded_token_loss(img, txt, mask, scale, k, eps, iters, unroll)
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out, (img, txt, scale))
    want = torch.autograd.grad(expected, (img, txt, scale))
    torch.testing.assert_close(got, want)
    assert all(g.abs().sum() > 0 for g in got)
    # the bound is real: the every-pair loss differs
    every_pair = TokenMatchingLoss(epsilon=eps, iterations=iters)(img, txt, mask, scale)["token_loss"]
    assert not torch.allclose(every_pair, out)


@pytest.mark.parametrize("method", ["sinkhorn", "filip", "hungarian"])
def test_bounded_token_loss_with_every_negative_equals_every_pair(method):
    img, txt, mask = tokens(b=5, n=4, m=5, seed=31)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(6.0, dtype=DTYPE)
    full = TokenMatchingLoss(method, chunk_size=2)(img, txt, mask, scale)["token_loss"]
    full_grads = torch.autograd.grad(full, (img, txt))
    for k in (4, 9):
        bounded = TokenMatchingLoss(method, chunk_size=2, softmax_negatives=k)(img, txt, mask, scale)["token_loss"]
        torch.testing.assert_close(bounded, full)
        torch.testing.assert_close(torch.autograd.grad(bounded, (img, txt)), full_grads)


@pytest.mark.parametrize("method", ["sinkhorn", "filip", "hungarian"])
@pytest.mark.parametrize("dim", [1, 0])
def test_pair_scores_of_keys_are_the_gathered_full_scores(method, dim):
    """Scoring only the pairs `keys` names gives `full.gather(dim, keys)`, values and gradients (repeated keys too)."""
    img, txt, mask = tokens(b=5, n=4, m=5, seed=32)
    img.requires_grad_()
    txt.requires_grad_()
    keys = torch.randint(0, 5, (5, 3) if dim == 1 else (3, 5), generator=torch.Generator().manual_seed(0))
    loss = TokenMatchingLoss(method, epsilon=0.1, chunk_size=2)
    got = loss.pair_scores(img, txt, mask, dim=dim, keys=keys)
    want = loss.pair_scores(img, txt, mask).gather(dim, keys)
    torch.testing.assert_close(got, want)
    upstream = unit(*keys.shape, seed=33)
    torch.testing.assert_close(torch.autograd.grad((got * upstream).sum(), (img, txt)),
                               torch.autograd.grad((want * upstream).sum(), (img, txt)))


@pytest.mark.parametrize("method", ["sinkhorn", "filip", "hungarian"])
def test_bounded_token_loss_scores_a_linear_number_of_pairs(method, monkeypatch):
    """Every chunk scores (c, 1 + k) pairs: 2 B (1 + k) in all, against B^2 for every pair."""
    blocks = []
    pair_similarities = token_pairs.similarities

    def counted(*args):
        sim, mask = pair_similarities(*args)
        blocks.append(tuple(sim.shape[:2]))
        return sim, mask

    monkeypatch.setattr(token_pairs, "similarities", counted)
    k = 3
    for b in (8, 16):
        img, txt, mask = tokens(b=b, n=4, m=5, seed=34)
        for negatives, pairs in ((k, 2 * b * (1 + k)), (None, b * b)):
            blocks.clear()
            with torch.no_grad():
                TokenMatchingLoss(method, chunk_size=3, softmax_negatives=negatives)(img, txt, mask, torch.tensor(5.0))
            assert sum(c * keys for c, keys in blocks) == pairs
            assert {keys for _, keys in blocks} == {1 + k if negatives else b}


def test_bounded_token_loss_rejects_zero_negatives_and_overrides_hungarians():
    with pytest.raises(ValueError, match="softmax_negatives"):
        TokenMatchingLoss(softmax_negatives=0)
    img, txt, mask = tokens(b=5, n=3, m=4, seed=35)
    both = TokenMatchingLoss("hungarian", num_negatives=1, softmax_negatives=2)(img, txt, mask, torch.tensor(5.0))
    bounded = TokenMatchingLoss("hungarian", softmax_negatives=2)(img, txt, mask, torch.tensor(5.0))
    torch.testing.assert_close(both, bounded)


@pytest.mark.parametrize("method", ["sinkhorn", "filip"])
def test_token_scores_ignore_bf16_autocast(method):
    img, txt, mask = (x.float() if x.is_floating_point() else x for x in tokens(b=4, seed=21))
    img.requires_grad_()
    plain = TokenMatchingLoss(method).pair_scores(img, txt, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = TokenMatchingLoss(method).pair_scores(img, txt, mask)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain)
    (grad,) = torch.autograd.grad(autocast.sum(), img)
    torch.testing.assert_close(grad, torch.autograd.grad(plain.sum(), img)[0])


_PEAK_RSS_SCRIPT = """
import resource, sys, torch, torch.nn.functional as F
from lightclip.objectives.token_matching import TokenMatchingLoss
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
img = F.normalize(torch.randn(256, 49, 256, generator=g), dim=-1).requires_grad_()
txt = F.normalize(torch.randn(256, 32, 256, generator=g), dim=-1).requires_grad_()
mask = torch.rand(256, 32, generator=g) < 0.7
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
negatives = None if sys.argv[2] == "None" else int(sys.argv[2])
out = TokenMatchingLoss(sys.argv[1], softmax_negatives=negatives)(img, txt, mask, torch.tensor(14.0))["token_loss"]
out.backward()
assert torch.isfinite(out) and img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
"""


@pytest.mark.parametrize(("method", "negatives"), [("sinkhorn", "None"), ("hungarian", "None"), ("sinkhorn", "15")])
def test_token_loss_peak_memory_at_batch_256(method, negatives):
    """B=256, N=49, M=32, D=256 forward + backward in float32 grow peak RSS by about 0.25 GiB: chunks keep at most one
    (32, 256, 49, 32) similarity tensor alive, or with 15 negatives one (32, 16) block of gathered tokens. A fresh
    process, so an earlier test's peak cannot hide the growth."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, method, negatives], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown = float(proc.stdout.split()[-1])
    assert grown < 0.75, f"{method}: peak RSS grew by {grown:.2f} GiB"


# ---------------------------------------------------------------------------------------------------- MLM


SPECIALS = (0, 1, 2, 3, 4)  # pad, unk, bos, eos, mask


def caption_batch(rows: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (rows, length), generator=g)
    lengths = torch.randint(2, length + 1, (rows,), generator=g)
    attention = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 2
    ids[torch.arange(rows), lengths - 1] = 3
    ids[attention == 0] = 0
    return ids, attention


def test_mask_tokens_never_touches_special_or_padding():
    ids, attention = caption_batch(64, 12, seed=1)
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(
        ids, attention, mask_token_id=4, vocab_size=100, special_token_ids=SPECIALS, probability=0.5, generator=g
    )
    protected = (attention == 0) | torch.isin(ids, torch.tensor(SPECIALS))
    assert torch.equal(masked[protected], ids[protected])
    assert (labels[protected] == -100).all()
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    random_replaced = chosen & (masked != ids) & (masked != 4)
    assert not torch.isin(masked[random_replaced], torch.tensor(SPECIALS)).any()
    maskable_rows = (~protected).any(-1)
    assert chosen[maskable_rows].any(-1).all(), "every row with a maskable token gets at least one"
    assert not chosen[~maskable_rows].any()


def test_mask_tokens_rates_and_determinism():
    ids = torch.randint(5, 1000, (400, 64), generator=torch.Generator().manual_seed(2))
    attention = torch.ones_like(ids)
    kwargs = dict(mask_token_id=4, vocab_size=1000, special_token_ids=SPECIALS)
    masked, labels = mask_tokens(ids, attention, generator=torch.Generator().manual_seed(3), **kwargs)
    again, labels_again = mask_tokens(ids, attention, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(masked, again) and torch.equal(labels, labels_again)
    chosen = labels != -100
    total = chosen.sum().item()  # about 3840
    assert abs(total / ids.numel() - 0.15) < 0.01
    to_mask = (masked[chosen] == 4).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()  # random ids equal the original 0.1 % of the time
    assert abs(to_mask - 0.8) < 0.02
    assert abs(kept - 0.1) < 0.015
    assert abs(1 - to_mask - kept - 0.1) < 0.015


def test_mlm_loss_ignores_unlabelled_positions():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 7, 2, 9
    out = MaskedLanguageModelingLoss()(logits, labels)
    picked = [(0, 1), (1, 3), (1, 4)]
    expected = sum(-torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b, t in picked) / 3
    torch.testing.assert_close(out["mlm_loss"], expected)
    (grad,) = torch.autograd.grad(out["mlm_loss"], logits)
    assert grad[0, 0].abs().sum() == 0 and grad[0, 1].abs().sum() > 0


def test_mlm_loss_is_zero_with_graph_when_nothing_is_masked():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    out = MaskedLanguageModelingLoss()(logits, torch.full((2, 3), -100))["mlm_loss"]
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert logits.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------------- CLIP-PING


def test_neighbor_contrastive_loss_matches_manual_and_targets_get_no_gradient():
    qi, qt = unit(5, 6, seed=21).requires_grad_(), unit(5, 6, seed=22).requires_grad_()
    ti, tt = unit(5, 6, seed=23).requires_grad_(), unit(5, 6, seed=24).requires_grad_()
    scale = torch.tensor(4.0, requires_grad=True)
    out = NeighborContrastiveLoss("xnn")(qi, qt, ti, tt, scale)
    assert set(out) == {"xnn_loss"}
    eye = torch.eye(dtype=DTYPE, n=5)
    expected = 0.5 * (ref_ce(scale * qi @ ti.T, eye) + ref_ce(scale * qt @ tt.T, eye))
    torch.testing.assert_close(out["xnn_loss"], expected)
    out["xnn_loss"].backward()
    assert qi.grad.abs().sum() > 0 and qt.grad.abs().sum() > 0 and scale.grad.abs() > 0
    assert ti.grad is None and tt.grad is None
    assert NeighborContrastiveLoss()(qi, qt, ti, tt, scale).keys() == {"nn_loss"}


def test_gradients_reach_both_towers_and_the_scale():
    img, txt, scale = unit(4, 3, seed=25).requires_grad_(), unit(4, 3, seed=26).requires_grad_(), torch.tensor(
        2.0, requires_grad=True
    )
    for loss in (ClipLoss(), SoftClipLoss(alpha_max=0.3)):
        if isinstance(loss, SoftClipLoss):
            loss.set_progress(1.0)
        grads = torch.autograd.grad(loss(img, txt, scale)["contrastive_loss"], (img, txt, scale))
        assert all(g.abs().sum() > 0 for g in grads)


def test_world_info_without_process_group():
    assert distributed.world_info() == (0, 1)
    x = torch.randn(3, 2)
    assert distributed.gather_with_grad(x) is x


@pytest.mark.parametrize("method", ["sinkhorn", "filip", "hungarian"])
@pytest.mark.parametrize("bounded", [False, True])
def test_text_without_valid_words_scores_zero_with_finite_gradients(method, bounded):
    img, txt, mask = tokens(b=3, seed=27)
    img.requires_grad_()
    txt.requires_grad_()
    mask[1] = False
    loss = TokenMatchingLoss(method, num_negatives=None if bounded else 2, softmax_negatives=1 if bounded else None)
    out = loss(img, txt, mask, torch.tensor(5.0))["token_loss"]
    grads = torch.autograd.grad(out, (img, txt))
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)
    assert (TokenMatchingLoss(method, num_negatives=2).pair_scores(img, txt, mask)[:, 1] == 0).all()
