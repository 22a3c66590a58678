"""LightClipForPreTraining: objective composition, loss weighting, gradients, soft-label schedule, saving."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CAPTIONS, context_length, make_config, random_pixels

from lightclip import LightClipConfig, LightClipForPreTraining, LightClipModel

TEACHER_IMAGE_DIM, TEACHER_TEXT_DIM = 24, 40
DISTILL_TEACHER_DIM = 48  # the distillation teacher's width, not the student's 64: fd trains projections
WEIGHTS = dict(token_weight=0.7, mlm_weight=1.3, nn_weight=0.5, xnn_weight=2.0, kd_weight=0.8, fd_weight=1.7)
LOSS_KEY = {"clip": "contrastive_loss", "soft": "contrastive_loss", "siglip": "siglip_loss", "token": "token_loss",
            "mlm": "mlm_loss", "nn": "nn_loss", "xnn": "xnn_loss", "kd": "kd_loss", "fd": "fd_loss"}
WEIGHT_OF = {"contrastive_loss": None, "siglip_loss": None, "token_loss": "token_weight", "mlm_loss": "mlm_weight",
             "nn_loss": "nn_weight", "xnn_loss": "xnn_weight", "kd_loss": "kd_weight", "fd_loss": "fd_weight"}
# parameter owners each objective adds next to the inner `lightclip` model, in its own `objectives.<name>` module
MODULES = {"clip": set(), "soft": set(), "siglip": {"objectives.siglip.logit_scale", "objectives.siglip.logit_bias"},
           "token": {"objectives.token.image_proj", "objectives.token.text_proj", "objectives.token.logit_scale"},
           "mlm": {"objectives.mlm.fusion"},
           "nn": {"objectives.nn.image_head", "objectives.nn.text_head", "objectives.nn.logit_scale"},
           "xnn": {"objectives.xnn.image_head", "objectives.xnn.text_head", "objectives.xnn.logit_scale"},
           "kd": set(), "fd": {"objectives.fd.image_proj", "objectives.fd.text_proj"}}

CASES = {
    "clip": dict(objectives="clip"),
    "soft": dict(objectives="soft"),
    "siglip": dict(objectives="siglip"),
    "siglip_all_kd_fd": dict(objectives="siglip,token,mlm,nn,xnn,kd,fd"),
    "token": dict(objectives="token"),
    "mlm": dict(objectives="mlm"),
    "nn": dict(objectives="nn"),
    "xnn": dict(objectives="xnn"),
    "kd": dict(objectives="kd"),
    "fd": dict(objectives="fd"),
    "lightclip": dict(objectives="lightclip"),
    "clip-ping": dict(objectives="clip-ping"),
    "all": dict(objectives="all"),
    "all_kd_fd": dict(objectives="all,kd,fd", kd_temperature=0.05, fd_loss="mse"),
    "hungarian": dict(objectives="token", token_matching="hungarian"),
    "filip": dict(objectives="token", token_matching="filip"),
    "token_bounded": dict(objectives="token", token_num_negatives=1),
    "additive": dict(objectives="mlm", fusion_type="additive"),
    "left_context_mlm": dict(objectives="mlm", fusion_word_attention=False),
    "multiscale": dict(objectives="mlm", fusion_image_source="multiscale"),
    "teacher_to_student": dict(objectives="clip-ping", neighbor_direction="teacher_to_student"),
    "mlp_head": dict(objectives="clip-ping", neighbor_head="mlp"),
    # a transformers CNN tower: feature-map tokens for matching, its own stages for multiscale fusion
    "cnn_all_multiscale": dict(objectives="all", fusion_image_source="multiscale",
                               vision_config=dict(backbone="mobilenetv2", image_size=64)),
}


def pretraining_config(**overrides) -> LightClipConfig:
    return make_config(teacher_image_dim=TEACHER_IMAGE_DIM, teacher_text_dim=TEACHER_TEXT_DIM,
                       distill_teacher_dim=DISTILL_TEACHER_DIM, **{**WEIGHTS, **overrides})


def build(seed: int = 0, **overrides) -> LightClipForPreTraining:
    torch.manual_seed(seed)
    return LightClipForPreTraining(pretraining_config(**overrides))


def neighbor_targets(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    dims = {"image_nn": TEACHER_IMAGE_DIM, "text_nn": TEACHER_TEXT_DIM,
            "image_xnn": TEACHER_TEXT_DIM, "text_xnn": TEACHER_IMAGE_DIM}  # XNN targets come from the other modality
    return {k: torch.randn(batch, d, generator=g) for k, d in dims.items()}


def teacher_targets(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    image, text = (F.normalize(torch.randn(batch, DISTILL_TEACHER_DIM, generator=g), dim=-1) for _ in range(2))
    return {"image_embeds": image, "text_embeds": text, "logit_scale": torch.tensor(30.0)}


def inputs(text_batch, with_mlm: bool = True, image_size: int = 32) -> dict:
    batch = dict(text_batch)
    n = batch["input_ids"].shape[0]
    batch.update(pixel_values=random_pixels(n, size=image_size), neighbor_targets=neighbor_targets(n),
                 teacher_targets=teacher_targets(n))
    if with_mlm:  # mask the second token of every caption (a word), deterministically
        mlm_input_ids = batch["input_ids"].clone()
        labels = torch.full_like(mlm_input_ids, -100)
        labels[:, 1] = mlm_input_ids[:, 1]
        mlm_input_ids[:, 1] = 4
        batch.update(mlm_input_ids=mlm_input_ids, mlm_labels=labels)
    return batch


def expected_keys(objectives: list[str]) -> set[str]:
    return {LOSS_KEY[o] for o in objectives}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, text_batch):
    """(name, model, output) of one forward + backward, shared by the checks below."""
    model = build(**CASES[request.param]).train()
    out = model(**inputs(text_batch, image_size=model.config.vision_config.image_size))
    out.loss.backward()
    return request.param, model, out


def test_losses_have_exactly_the_active_keys(case):
    name, model, out = case
    assert set(out.losses) == expected_keys(model.config.pretraining_config.objectives)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.losses.values())


def test_total_is_weighted_sum(case):
    _, model, out = case
    settings = model.config.pretraining_config
    assert {k: getattr(settings, k) for k in WEIGHTS} == WEIGHTS  # non-default weights: a dropped one shows
    weights = {k: 1.0 if WEIGHT_OF[k] is None else WEIGHTS[WEIGHT_OF[k]] for k in out.losses}
    total = sum(weights[k] * v.item() for k, v in out.losses.items())
    assert out.loss.item() == pytest.approx(total, rel=1e-6)


def test_inactive_objectives_build_nothing(case):
    _, model, _ = case
    owners = {"lightclip" if name.startswith("lightclip.") else ".".join(name.split(".")[:3])
              for name, _ in model.named_parameters()}
    expected = {"lightclip"}.union(*(MODULES[o] for o in model.config.pretraining_config.objectives))
    assert owners == expected
    assert list(model.objectives) == model.config.pretraining_config.objectives
    (contrastive,) = [name for name, objective in model.objectives.items() if objective.replaces_contrastive]
    loss_class = {"soft": "SoftClipLoss", "siglip": "SigLipLoss"}.get(contrastive, "ClipLoss")
    assert type(model.objectives[contrastive].loss).__name__ == loss_class


def test_every_parameter_gets_a_gradient(case):
    """Every trainable parameter; the model's own logit scale is frozen when no objective reads it (siglip alone),
    since DDP refuses a trainable parameter without a gradient."""
    _, model, _ = case
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ([] if model.needs("needs_logit_scale") else ["lightclip.logit_scale"])
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and (not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert bad == []


def test_the_registry_serves_every_objective_name():
    from lightclip.configuration_lightclip import CONTRASTIVE_OBJECTIVES, OBJECTIVES
    from lightclip.objectives import OBJECTIVE_CLASSES

    assert tuple(OBJECTIVE_CLASSES) == OBJECTIVES
    # the inference config names the contrastive terms without importing the registry: the two must agree
    assert tuple(n for n, cls in OBJECTIVE_CLASSES.items() if cls.replaces_contrastive) == CONTRASTIVE_OBJECTIVES
    assert {cls.loss_key for cls in OBJECTIVE_CLASSES.values()} == set(LOSS_KEY.values())
    assert {cls.weight_field for cls in OBJECTIVE_CLASSES.values()} - {None} == set(WEIGHTS)


@pytest.mark.parametrize("vision", [{}, dict(backbone="convnet")])
def test_pooled_only_towers_give_the_full_forward_loss_and_gradients(text_batch, vision):
    """With no objective reading per-token states, both towers run their pooled-only forward (the last ViT / text
    layer for the pooled token alone): the same losses and gradients as the full forward, in float64."""
    def run(full: bool):
        model = build(objectives="soft,nn,xnn,kd,fd", vision_config=vision).double().train()
        if full:  # an instance flag shadows the class's: this model runs the towers' full forward
            model.objectives["soft"].needs_image_tokens = model.objectives["soft"].needs_text_tokens = True
        calls = []
        for tower in (model.lightclip.vision_model, model.lightclip.text_model):
            original = tower.forward_pooled
            tower.forward_pooled = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
        batch = inputs(text_batch, with_mlm=False, image_size=model.config.vision_config.image_size)
        batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        batch["neighbor_targets"] = {k: v.double() for k, v in batch["neighbor_targets"].items()}
        batch["teacher_targets"] = {k: v.double() for k, v in batch["teacher_targets"].items()}
        out = model(**batch)
        out.loss.backward()
        return out, dict(model.named_parameters()), len(calls)

    (pooled, pooled_params, pooled_calls), (full, full_params, full_calls) = run(False), run(True)
    assert (pooled_calls, full_calls) == (2, 0)
    assert set(pooled.losses) == {"contrastive_loss", "nn_loss", "xnn_loss", "kd_loss", "fd_loss"}
    for key, value in full.losses.items():
        torch.testing.assert_close(pooled.losses[key], value, rtol=1e-10, atol=1e-12)
    for name, param in full_params.items():
        torch.testing.assert_close(pooled_params[name].grad, param.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_every_logit_scale_is_clamped_after_a_step():
    model = build(objectives="all")
    scales = [model.lightclip.logit_scale] + [o.logit_scale for o in model.objectives.values()
                                              if o.logit_scale_init is not None]
    assert len(scales) == 4  # CLIP, token, nn, xnn
    with torch.no_grad():
        for k, scale in enumerate(scales):
            scale.fill_(model.config.logit_scale_max + 1.0 if k % 2 else -1.0)
    model.clamp_logit_scales_()
    for k, scale in enumerate(scales):
        assert scale.item() == pytest.approx(model.config.logit_scale_max if k % 2 else 0.0)


def test_missing_neighbor_targets_is_a_clear_error(text_batch):
    model = build(objectives="nn")
    batch = inputs(text_batch, with_mlm=False)
    del batch["neighbor_targets"]
    with pytest.raises(ValueError, match=r"nn objective needs neighbor_targets.*image_nn"):
        model(**batch)
    batch["neighbor_targets"] = {"image_nn": torch.randn(len(CAPTIONS), TEACHER_IMAGE_DIM)}
    with pytest.raises(ValueError, match="text_nn"):
        model(**batch)


def test_neighbor_objectives_need_teacher_dims():
    with pytest.raises(ValueError, match="teacher_image_dim"):
        LightClipForPreTraining(make_config(objectives="clip-ping"))


def test_mlm_masks_by_itself(text_batch):
    torch.manual_seed(0)
    model = build(objectives="mlm", mlm_probability=0.5)
    out = model(**inputs(text_batch, with_mlm=False))
    assert out.losses["mlm_loss"].item() > 0  # something was masked and predicted
    assert out.losses["mlm_loss"].item() == pytest.approx(math.log(4096), rel=0.3)  # near chance at init


def _masked_word_logits(model, ids: torch.Tensor, pixels: torch.Tensor, position: int) -> torch.Tensor:
    """The fusion module's logits at `position` of `ids` (already masked there)."""
    inner, fusion = model.lightclip, model.objectives["mlm"].fusion
    vision = inner.vision_model(pixels)
    mask = torch.ones_like(ids)
    states = inner.text_model(ids, mask, output_hidden_states=True).hidden_states
    sources = [torch.cat([vision.pooler_output[:, None], vision.patch_tokens], dim=1)]
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, position] = True
    return fusion(states, sources, inner.text_model.embeddings.token_embedding.weight, positions=positions,
                  attention_mask=mask)


@pytest.mark.parametrize("source", ["last", "multiscale"])
@pytest.mark.parametrize("detach", [False, True])
def test_mlm_loss_alone_trains_the_image_tower_unless_detached(text_batch, source, detach):
    """The contrastive loss also reaches the image tower, so only the MLM loss is backpropagated here."""
    model = build(objectives="mlm", fusion_image_source=source, fusion_detach_image=detach).train()
    model(**inputs(text_batch)).losses["mlm_loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("lightclip.vision_model.")]
    reached = sum(0.0 if g is None else float(g.abs().sum()) for g in grads)
    assert (reached == 0.0) if detach else (reached > 0.0)
    assert model.objectives["mlm"].fusion.image_proj[0].weight.grad.abs().sum() > 0  # the fusion trains either way


@pytest.mark.parametrize("word_attention", [True, False])
def test_mlm_reads_the_words_on_both_sides(word_attention):
    """ALBEF-style MLM: a masked word's logits depend on the words to its right (the text tower is causal, so only
    the fusion blocks' word attention can bring them); without word attention they cannot."""
    model = build(objectives="mlm", fusion_word_attention=word_attention).eval()
    ids = torch.tensor([[2, 4, 40, 41, 42, 3]])  # [CLS] [MASK] w w w [SEP]
    changed = ids.clone()
    changed[0, 3] = 77  # a word to the right of the mask
    pixels = random_pixels(1)
    with torch.no_grad():
        before, after = _masked_word_logits(model, ids, pixels, 1), _masked_word_logits(model, changed, pixels, 1)
    difference = (before - after).abs().max().item()
    assert difference > 1e-4 if word_attention else difference == 0.0


@pytest.mark.parametrize("word_attention", [True, False])
def test_mlm_fusion_on_the_masked_words_only_is_exact(word_attention):
    """`positions` runs the vocabulary head (and, without word attention, every block; with it, the last block's
    outputs) on the masked words only: logits and gradients equal the all-words pass read at those words."""
    model = build(objectives="mlm", fusion_word_attention=word_attention).double().eval()
    inner, fusion = model.lightclip, model.objectives["mlm"].fusion
    ids = torch.tensor([[2, 4, 40, 41, 4, 3, 0], [2, 40, 4, 41, 42, 43, 3]])
    mask = (ids != 0).long()
    positions = ids == 4
    pixels = random_pixels(2).double()
    embedding = inner.text_model.embeddings.token_embedding.weight

    def logits_and_grads(select: bool):
        model.zero_grad()
        vision = inner.vision_model(pixels)
        sources = [torch.cat([vision.pooler_output[:, None], vision.patch_tokens], dim=1)]
        states = inner.text_model(ids, mask, output_hidden_states=True).hidden_states
        logits = fusion(states, sources, embedding, positions=positions if select else None, attention_mask=mask)
        logits = logits if select else logits[positions]
        logits.square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (selected, selected_grads), (full, full_grads) = logits_and_grads(True), logits_and_grads(False)
    torch.testing.assert_close(selected, full, rtol=0, atol=1e-10)
    assert len(selected_grads) == len(full_grads) > 0
    for a, b in zip(selected_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_mlm_word_attention_ignores_padding():
    model = build(objectives="mlm").eval()
    ids = torch.tensor([[2, 4, 40, 41, 3, 0, 0]])
    padded = ids.clone()
    padded[0, 5:] = torch.tensor([55, 66])  # other ids where the attention mask is 0
    inner, fusion = model.lightclip, model.objectives["mlm"].fusion
    mask = (ids != 0).long()
    pixels = random_pixels(1)
    with torch.no_grad():
        vision = inner.vision_model(pixels)
        sources = [torch.cat([vision.pooler_output[:, None], vision.patch_tokens], dim=1)]
        positions = torch.zeros_like(ids, dtype=torch.bool)
        positions[0, 1] = True
        logits = [fusion(inner.text_model(x, mask, output_hidden_states=True).hidden_states, sources,
                         inner.text_model.embeddings.token_embedding.weight, positions=positions, attention_mask=mask)
                  for x in (ids, padded)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("select", [True, False])
@pytest.mark.parametrize("word_attention", [True, False])
def test_mlm_fusion_of_a_padded_batch_equals_each_caption_alone(word_attention, select):
    """The fusion blocks run on packed words: a padded batch gives each caption the logits it gets alone, and zeros
    at padding when every word's logits come out."""
    model = build(objectives="mlm", fusion_word_attention=word_attention).double().eval()
    inner, fusion = model.lightclip, model.objectives["mlm"].fusion
    embedding = inner.text_model.embeddings.token_embedding.weight
    rows = [[2, 4, 40, 3], [2, 40, 4, 41, 42, 4, 43, 3], [2, 41, 4, 3]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = (ids != 0).long()
    pixels = random_pixels(3).double()

    def logits(ids, mask, pixels):
        vision = inner.vision_model(pixels)
        sources = [torch.cat([vision.pooler_output[:, None], vision.patch_tokens], dim=1)]
        states = inner.text_model(ids, mask, output_hidden_states=True).hidden_states
        return fusion(states, sources, embedding, positions=(ids == 4) if select else None, attention_mask=mask)

    with torch.no_grad():
        batch = logits(ids, mask, pixels)
        alone = [logits(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), pixels[b:b + 1])
                 for b, r in enumerate(rows)]
    if select:
        torch.testing.assert_close(batch, torch.cat(alone), rtol=0, atol=1e-10)
    else:
        for b, r in enumerate(rows):
            torch.testing.assert_close(batch[b, :len(r)], alone[b][0], rtol=0, atol=1e-10)
            assert not batch[b, len(r):].any()


def test_mlm_fusion_projects_a_shared_image_source_once():
    """With one source and one projection ("last") every stage reads one projected copy: the same logits and
    gradients as projecting it again at each stage (the source given once per stage), one projection call."""
    model = build(objectives="mlm").double().train()
    inner, fusion = model.lightclip, model.objectives["mlm"].fusion
    assert len(fusion.image_proj) == 1 and len(fusion.blocks) > 1
    ids = torch.tensor([[2, 4, 40, 41, 3, 0], [2, 40, 4, 41, 42, 3]])
    mask, pixels = (ids != 0).long(), random_pixels(2).double()
    calls = []
    fusion.image_proj[0].register_forward_hook(lambda *_: calls.append(1))

    def logits_and_grads(copies: int):
        model.zero_grad()
        calls.clear()
        vision = inner.vision_model(pixels)
        source = torch.cat([vision.pooler_output[:, None], vision.patch_tokens], dim=1)
        states = inner.text_model(ids, mask, output_hidden_states=True).hidden_states
        logits = fusion(states, [source] * copies, inner.text_model.embeddings.token_embedding.weight,
                        positions=ids == 4, attention_mask=mask)
        logits.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), len(calls), grads

    (shared, shared_calls, shared_grads) = logits_and_grads(1)
    (again, again_calls, again_grads) = logits_and_grads(len(fusion.blocks))
    assert (shared_calls, again_calls) == (1, len(fusion.blocks))
    torch.testing.assert_close(shared, again, rtol=0, atol=1e-12)
    assert shared_grads.keys() == again_grads.keys()
    for name in shared_grads:
        torch.testing.assert_close(shared_grads[name], again_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_mlm_never_targets_or_draws_the_unknown_token(tokenizer):
    """[UNK] is a special id: never an MLM target, never a random replacement (it once was both)."""
    model = build(objectives="mlm", mlm_probability=1.0)
    unk = tokenizer.unk_token_id
    ids = tokenizer(["a \u2603 red \u2603 circle \u2603"] * 64, return_tensors="pt")
    assert (ids["input_ids"] == unk).sum() == 3 * 64
    masked, labels = model.objectives["mlm"].mask_text(ids["input_ids"], ids["attention_mask"],
                                                       generator=torch.Generator().manual_seed(0))
    assert not (labels == unk).any()
    assert (labels != -100).any()
    replaced = (masked != ids["input_ids"]) & (masked != model.config.text_config.mask_token_id)
    assert replaced.any() and not (masked[replaced] == unk).any()


def manual_contrastive(logits_per_image: torch.Tensor, alpha: float) -> float:
    """Symmetric soft-label cross-entropy: target (1 - alpha) on the diagonal, alpha spread over the negatives in
    proportion to softmax of the detached logits (mode "similarity", temperature 1)."""
    def side(logits):
        n = logits.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        negatives = logits.masked_fill(eye, float("-inf")).softmax(-1)
        target = (1 - alpha) * eye.double() + alpha * negatives
        return -(target * logits.log_softmax(-1)).sum(-1).mean()

    logits = logits_per_image.detach().double()
    return (0.5 * (side(logits) + side(logits.T))).item()


def test_set_progress_drives_the_soft_labels(text_batch):
    soft = build(objectives="soft", soft_alpha_max=0.4, soft_mode="similarity")
    clip = build(objectives="clip")
    batch = inputs(text_batch, with_mlm=False)
    with torch.no_grad():
        clip_out = clip(**batch)
        soft.set_progress(0.0)
        start = soft(**batch)
        soft.set_progress(1.0)
        end = soft(**batch)
        soft.set_progress(0.5)
        middle = soft(**batch)
    torch.testing.assert_close(start.losses["contrastive_loss"], clip_out.losses["contrastive_loss"])
    assert start.losses["contrastive_loss"].item() == pytest.approx(manual_contrastive(start.logits_per_image, 0.0),
                                                                    rel=1e-5)
    assert end.losses["contrastive_loss"].item() == pytest.approx(manual_contrastive(end.logits_per_image, 0.4),
                                                                  rel=1e-5)
    assert middle.losses["contrastive_loss"].item() == pytest.approx(
        manual_contrastive(middle.logits_per_image, 0.2), rel=1e-5)
    assert abs(end.losses["contrastive_loss"].item() - start.losses["contrastive_loss"].item()) > 1e-3


def test_over_long_text_is_truncated_for_every_objective(tokenizer):
    model = build(objectives="all")
    long = " ".join(["word"] * 2 * context_length())
    batch = dict(tokenizer([long, "a dog", "a cat"], padding=True, return_tensors="pt"))
    assert batch["input_ids"].shape[1] > context_length()
    out = model(**batch, pixel_values=random_pixels(3), neighbor_targets=neighbor_targets(3))
    assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------------------------------------
# saving: only the inference model


@pytest.fixture(scope="module")
def saved_all(tmp_path_factory, text_batch):
    model = build(objectives="all").eval()
    path = tmp_path_factory.mktemp("pretraining-all")
    model.save_pretrained(path)
    return model, str(path)


def test_saved_pretraining_loads_as_plain_model(saved_all, text_batch):
    pretraining, path = saved_all
    loaded, info = LightClipModel.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    inner = pretraining.lightclip
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in inner.parameters())
    assert sum(p.numel() for p in pretraining.parameters()) > sum(p.numel() for p in inner.parameters())
    pixels = random_pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(**text_batch), inner.encode_text(**text_batch), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_image(pixels), inner.encode_image(pixels), rtol=0, atol=0)


def test_pretraining_resumes_from_plain_checkpoint(saved_all, text_batch):
    """Training-only modules are absent from the folder: they must start from their init, not from garbage."""
    pretraining, path = saved_all
    resumed = LightClipForPreTraining.from_pretrained(path).eval()
    for name, tensor in pretraining.lightclip.state_dict().items():
        torch.testing.assert_close(resumed.lightclip.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    config = resumed.config
    assert resumed.objectives["token"].logit_scale.item() == pytest.approx(config.logit_scale_init_value)
    nn_init = config.pretraining_config.neighbor_logit_scale_init_value
    assert resumed.objectives["nn"].logit_scale.item() == pytest.approx(nn_init)
    assert torch.count_nonzero(resumed.objectives["mlm"].fusion.head_bias) == 0
    for name, p in resumed.named_parameters():
        assert torch.isfinite(p).all() and p.abs().max() < 100, name
    out = resumed(**inputs(text_batch))
    assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------------------------------------
# SigLIP and the contract the trainer reads


def test_siglip_starts_at_its_own_scale_and_bias_also_when_loaded(tmp_path, text_batch):
    """Zhai et al.'s start, t = 10 and b = -10, on a fresh model and on one `from_pretrained` builds on the meta
    device (the objective's `init_weights`); its scale is clamped like every other."""
    model = build(objectives="siglip")
    siglip = model.objectives["siglip"]
    assert (siglip.scale().item(), siglip.logit_bias.item()) == (pytest.approx(10.0), -10.0)
    model.save_pretrained(tmp_path)
    loaded = LightClipForPreTraining.from_pretrained(tmp_path).objectives["siglip"]
    assert (loaded.scale().item(), loaded.logit_bias.item()) == (pytest.approx(10.0), -10.0)
    with torch.no_grad():
        siglip.logit_scale.fill_(model.config.logit_scale_max + 2.0)
    model.clamp_logit_scales_()
    assert siglip.logit_scale.item() == pytest.approx(model.config.logit_scale_max)
    out = model(**inputs(text_batch, with_mlm=False))
    assert set(out.losses) == {"siglip_loss"} and set(model.log_values()) == {"siglip_logit_scale",
                                                                             "siglip_logit_bias"}


def test_sample_inputs_draw_the_masked_caption_only_for_an_objective_that_needs_it(text_batch):
    ids, mask = text_batch["input_ids"], text_batch["attention_mask"]
    assert build(objectives="siglip,token").sample_inputs(ids, mask, torch.Generator().manual_seed(0)) == {}
    model = build(objectives="siglip,mlm")
    drawn = [model.sample_inputs(ids, mask, torch.Generator().manual_seed(0)) for _ in range(2)]
    assert set(drawn[0]) == {"mlm_input_ids", "mlm_labels"}
    assert all(torch.equal(drawn[0][k], drawn[1][k]) for k in drawn[0])  # the generator decides the draw
    assert (drawn[0]["mlm_labels"] != -100).any()
