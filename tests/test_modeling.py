"""LightClipModel: save/load, Auto classes, meta-device loading, pooling, truncation, outputs, loss, CNN towers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CAPTIONS, context_length, make_model, random_pixels
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lightclip import LightClipConfig, LightClipImageProcessor, LightClipModel, LightClipProcessor
from lightclip.modeling_lightclip import LightClipVisionModelOutput

EOS, BOS, PAD = 3, 2, 0


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def embeddings_of(model, text_batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_text(**text_batch), model.encode_image(random_pixels(3, seed=1))


def assert_same_embeddings(a, b, text_batch):
    for x, y in zip(embeddings_of(a, text_batch), embeddings_of(b, text_batch)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def assert_clean_load(info):
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()


# --------------------------------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(saved_dir, model, text_batch):
    loaded, info = LightClipModel.from_pretrained(saved_dir, output_loading_info=True)
    assert_clean_load(info)
    assert_same_embeddings(model, loaded.eval(), text_batch)
    torch.testing.assert_close(loaded.logit_scale, model.logit_scale)


def test_meta_device_load_rebuilds_buffers(saved_dir):
    loaded = LightClipModel.from_pretrained(saved_dir)
    text_positions = loaded.text_model.embeddings.position_ids
    vision_positions = loaded.vision_model.embeddings.position_ids
    assert torch.equal(text_positions, torch.arange(context_length())[None])
    assert torch.equal(vision_positions, torch.arange((32 // 8) ** 2 + 1)[None])
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())


def test_missing_logit_scale_is_initialised_not_garbage(tmp_path, model):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["logit_scale"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = LightClipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"logit_scale"}
    assert loaded.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_auto_classes_round_trip(saved_dir, model, text_batch):
    config = AutoConfig.from_pretrained(saved_dir)
    assert type(config) is LightClipConfig
    assert {**config.to_dict(), "_name_or_path": ""} == {**model.config.to_dict(), "_name_or_path": ""}
    for auto in (AutoModel, AutoModelForZeroShotImageClassification):
        loaded, info = auto.from_pretrained(saved_dir, output_loading_info=True)
        assert type(loaded) is LightClipModel
        assert_clean_load(info)
        assert_same_embeddings(model, loaded.eval(), text_batch)
    assert isinstance(AutoProcessor.from_pretrained(saved_dir), LightClipProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(saved_dir), LightClipImageProcessor)
    assert AutoTokenizer.from_pretrained(saved_dir)(CAPTIONS[1])["input_ids"][-1] == EOS


def test_saved_config_maps_auto_classes_for_remote_code(saved_dir):
    import json
    import os

    with open(os.path.join(saved_dir, "config.json")) as f:
        auto_map = json.load(f)["auto_map"]
    assert auto_map["AutoModel"] == auto_map["AutoModelForZeroShotImageClassification"] == \
        "modeling_lightclip.LightClipModel"
    # with the modules it imports, the CNN towers' included, whichever tower this model has
    for name in ("modeling_lightclip.py", "modeling_lightclip_convnet.py", "modeling_lightclip_outputs.py"):
        assert os.path.exists(os.path.join(saved_dir, name)), name


# --------------------------------------------------------------------------------------------------------------------
# text tower: padding, truncation, pooling


@pytest.mark.parametrize("causal", [True, False])
def test_text_embedding_alone_equals_padded_in_batch(causal):
    model = make_model(text_config=dict(causal=causal))
    short = [BOS, 40, 41, EOS]
    batch = ids(short + [PAD] * 5, [BOS] + list(range(50, 57)) + [EOS])
    mask = (batch != PAD).long()
    with torch.no_grad():
        alone = model.encode_text(ids(short))
        in_batch = model.encode_text(batch, mask)
        unmasked = model.encode_text(batch)
    torch.testing.assert_close(in_batch[:1], alone, rtol=1e-6, atol=1e-6)
    if not causal:  # the mask is what keeps the padding out: without it the bidirectional tower sees it
        assert (unmasked[0] - alone[0]).abs().max() > 1e-4


def test_all_ones_mask_equals_no_mask(model, text_batch):
    row = text_batch["input_ids"][:1]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(row, torch.ones_like(row)), model.encode_text(row))


def test_truncation_keeps_eos_and_matches_manual_truncation(model):
    limit = model.config.text_config.max_position_embeddings
    long = [BOS] + list(range(100, 100 + 2 * limit)) + [EOS]
    manual = long[: limit - 1] + [EOS]
    with torch.no_grad():
        out = model.get_text_features(ids(long), output_hidden_states=True)
        reference = model.encode_text(ids(manual))
    assert out.last_hidden_state.shape[1] == limit
    torch.testing.assert_close(F.normalize(out.pooler_output, dim=-1), reference, rtol=1e-6, atol=1e-6)


def test_truncation_in_padded_batch_leaves_short_rows_alone(model):
    limit = model.config.text_config.max_position_embeddings
    long = [BOS] + list(range(100, 100 + limit + 5)) + [EOS]
    short = [BOS, 60, 61, EOS]
    batch = ids(long, short + [PAD] * (len(long) - len(short)))
    with torch.no_grad():
        embeds = model.encode_text(batch, (batch != PAD).long())
        expected_long = model.encode_text(ids(long[: limit - 1] + [EOS]))
        expected_short = model.encode_text(ids(short))
    torch.testing.assert_close(embeds[0], expected_long[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(embeds[1], expected_short[0], rtol=1e-6, atol=1e-6)


def test_pooling_at_first_eos():
    model = make_model()
    tower = model.text_model
    batch = ids([BOS, 40, EOS, 41, EOS, PAD], [BOS, 40, 41, 42, 43, 44], [BOS, 40, 41, PAD, PAD, PAD])
    mask = (batch != PAD).long()
    assert tower.pool_index(batch, mask).tolist() == [2, 5, 2]  # first eos; else the last real token
    with torch.no_grad():
        out = tower(batch, mask)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[[0, 1, 2], [2, 5, 2]])


def test_pooling_uses_configured_eos_id():
    model = make_model(text_config=dict(eos_token_id=7))
    row = ids([BOS, 40, 7, 41, EOS, 42])
    assert model.text_model.pool_index(row, None).tolist() == [2]
    with torch.no_grad():
        base = model.encode_text(row)
        after_eos_changed = model.encode_text(ids([BOS, 40, 7, 55, 56, 57]))  # causal: nothing after pooling counts
        before_eos_changed = model.encode_text(ids([BOS, 41, 7, 41, EOS, 42]))
    torch.testing.assert_close(after_eos_changed, base, rtol=1e-6, atol=1e-6)
    assert (before_eos_changed - base).abs().max() > 1e-4


def test_truncation_uses_configured_eos_id():
    model = make_model(text_config=dict(eos_token_id=7, max_position_embeddings=8))
    truncated, _ = model.text_model.truncate(ids(list(range(10, 22))), None)
    assert truncated.tolist() == [[10, 11, 12, 13, 14, 15, 16, 7]]


# --------------------------------------------------------------------------------------------------------------------
# text tower: padding is packed out, not computed


def ragged_batch(pad_id: int = PAD, left: bool = False) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    rows = [[BOS, 40, EOS], [BOS] + list(range(50, 58)) + [EOS], [BOS, 41, 42, 43, EOS]]
    width = max(map(len, rows))
    padded = [([pad_id] * (width - len(r)) + r) if left else (r + [pad_id] * (width - len(r))) for r in rows]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r))) for r in rows]
    return rows, torch.tensor(padded), torch.tensor(mask)


def run_unpacked(monkeypatch) -> None:
    """From here on the text tower computes the whole padded grid (`PackedTokens.of` packs nothing): the reference."""
    from lightclip.modeling_lightclip import PackedTokens

    monkeypatch.setattr(PackedTokens, "of", classmethod(lambda cls, attention_mask: None))


@pytest.mark.parametrize("causal", [True, False])
def test_padded_batch_equals_each_row_alone_in_every_hidden_state(causal):
    """Packing is exact: each row's states at its real positions, and its pooled output, are those of the row run
    alone without padding; padding positions hold zeros."""
    tower = make_model(text_config=dict(causal=causal)).text_model
    rows, batch, mask = ragged_batch()
    with torch.no_grad():
        out = tower(batch, mask, output_hidden_states=True)
        for b, row in enumerate(rows):
            alone = tower(ids(row), output_hidden_states=True)
            n = len(row)
            torch.testing.assert_close(out.pooler_output[b], alone.pooler_output[0], rtol=1e-5, atol=1e-5)
            for got, expected in zip(out.hidden_states + (out.last_hidden_state,),
                                     alone.hidden_states + (alone.last_hidden_state,)):
                torch.testing.assert_close(got[b, :n], expected[0], rtol=1e-5, atol=1e-5)
                assert not got[b, n:].any()
        torch.testing.assert_close(tower.forward_pooled(batch, mask), out.pooler_output, rtol=1e-5, atol=1e-5)


def test_padding_never_reaches_the_per_token_layers():
    tower = make_model().text_model
    rows, batch, mask = ragged_batch()
    seen = []
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
             for layer in tower.encoder.layers]
    with torch.no_grad():
        tower(batch, mask)
    for hook in hooks:
        hook.remove()
    assert seen == [sum(map(len, rows))] * len(tower.encoder.layers)


def test_packed_gradients_equal_the_padded_grid(monkeypatch):
    """The same loss through packed rows and through the full padded grid gives the same gradient everywhere."""
    _, batch, mask = ragged_batch()

    def grads(model):
        out = model.text_model(batch, mask)
        (out.pooler_output.square().sum() + (out.last_hidden_state * mask[..., None]).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed = grads(make_model().train())
    run_unpacked(monkeypatch)
    grid = grads(make_model().train())
    assert packed.keys() == grid.keys() and len(packed) > 10
    for name in packed:
        torch.testing.assert_close(packed[name], grid[name], rtol=1e-5, atol=1e-6, msg=name)


def test_left_padding_packs_as_the_padded_grid_computes(monkeypatch):
    """Left padding moves the real tokens' positions (as in CLIP), so the reference is the unpacked padded grid."""
    _, batch, mask = ragged_batch(left=True)
    model = make_model()
    with torch.no_grad():
        packed = model.text_model(batch, mask)
        pooled = model.text_model.forward_pooled(batch, mask)
        run_unpacked(monkeypatch)
        grid = model.text_model(batch, mask)
    torch.testing.assert_close(packed.last_hidden_state, grid.last_hidden_state * mask[..., None], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(packed.pooler_output, grid.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, grid.pooler_output, rtol=1e-5, atol=1e-5)


def test_padding_with_the_end_of_text_id_pools_at_the_real_one():
    """CLIP's tokenizer pads with end-of-text: only an unmasked end-of-text token is one."""
    model = make_model()
    rows, batch, mask = ragged_batch(pad_id=EOS)
    no_eos = [BOS, 44, 45]  # a row truncated before its end of text pools at its last real token
    batch = torch.cat([batch, torch.tensor([no_eos + [EOS] * (batch.shape[1] - 3)])])
    mask = torch.cat([mask, torch.tensor([[1] * 3 + [0] * (batch.shape[1] - 3)])])
    assert model.text_model.pool_index(batch, mask).tolist() == [2, 9, 4, 2]
    with torch.no_grad():
        in_batch = model.encode_text(batch, mask)
        for b, row in enumerate(rows + [no_eos]):
            torch.testing.assert_close(in_batch[b], model.encode_text(ids(row))[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# outputs


def test_get_features_return_projected_pooler_output(model, text_batch):
    pixels = random_pixels(2)
    with torch.no_grad():
        text_out = model.get_text_features(**text_batch)
        image_out = model.get_image_features(pixels)
    assert isinstance(text_out, BaseModelOutputWithPooling)
    assert isinstance(image_out, LightClipVisionModelOutput)

    eos_index = (text_batch["input_ids"] == EOS).int().argmax(-1)
    text_pooled = text_out.last_hidden_state[torch.arange(len(CAPTIONS)), eos_index]
    torch.testing.assert_close(text_out.pooler_output, text_pooled @ model.text_projection.weight.T)

    norm = model.vision_model.post_layernorm
    cls = F.layer_norm(image_out.last_hidden_state[:, 0], (64,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(image_out.pooler_output, cls @ model.visual_projection.weight.T)
    assert image_out.patch_tokens.shape == (2, 16, 64)
    assert text_out.pooler_output.shape == (len(CAPTIONS), 64) and image_out.pooler_output.shape == (2, 64)


def test_encode_is_normalised_projection(model, text_batch):
    pixels = random_pixels(2)
    with torch.no_grad():
        text = model.encode_text(**text_batch)
        image = model.encode_image(pixels)
        raw_text = model.get_text_features(**text_batch).pooler_output
        raw_image = model.get_image_features(pixels).pooler_output
        out = model(**text_batch, pixel_values=pixels)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(CAPTIONS)))
    torch.testing.assert_close(text, raw_text / raw_text.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(image, raw_image / raw_image.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(out.text_embeds, text)
    torch.testing.assert_close(out.image_embeds, image)
    assert (raw_text.norm(dim=-1) - 1).abs().max() > 1e-3  # the features really are unnormalised


@pytest.mark.parametrize("overrides", [{}, dict(causal=False), dict(num_hidden_layers=1), dict(eos_token_id=7)],
                         ids=["causal", "bidirectional", "one-layer", "eos-7"])
def test_encode_helpers_equal_full_forward(overrides):
    """encode_* may take a shortcut for the pooled token; it must give the full forward's embedding."""
    model = make_model(text_config=overrides)
    limit = model.config.text_config.max_position_embeddings
    eos = model.config.text_config.eos_token_id
    rows = [[BOS, 40, 41, eos], [BOS, 40, eos, 50, 51, eos], [BOS, 60, 61, 62],  # eos mid-text; no eos at all
            [BOS] + list(range(100, 100 + limit)) + [eos]]  # over-long: truncated inside the model
    batch = ids(*[r + [PAD] * (limit + 2 - len(r)) for r in rows])
    mask = (torch.arange(batch.shape[1]) < torch.tensor([len(r) for r in rows])[:, None]).long()
    pixels = random_pixels(3)
    with torch.no_grad():
        full_text = model.get_text_features(batch, mask).pooler_output
        full_image = model.get_image_features(pixels).pooler_output
        torch.testing.assert_close(model.encode_text(batch, mask, normalize=False), full_text, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_text(batch, mask), F.normalize(full_text, dim=-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), full_image, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, dict(causal=False)], ids=["causal", "bidirectional"])
def test_eager_attention_equals_sdpa(overrides, monkeypatch):
    """Both implementations on padded text, over-long text and images, full forward and pooled-only paths alike."""
    sdpa = make_model(text_config=overrides)
    eager = make_model(text_config=overrides, attn_implementation="eager")
    assert [c._attn_implementation for c in (sdpa.config.text_config, sdpa.config.vision_config)] == ["sdpa"] * 2
    assert [c._attn_implementation for c in (eager.config.text_config, eager.config.vision_config)] == ["eager"] * 2
    limit = sdpa.config.text_config.max_position_embeddings
    rows = [[BOS, 40, 41, EOS], [BOS, 60, 61, 62], [BOS] + list(range(100, 100 + limit)) + [EOS]]
    batch = ids(*[r + [PAD] * (limit + 2 - len(r)) for r in rows])
    mask = (batch != PAD).long()
    pixels = random_pixels(3)

    def outputs(model):
        out = model(input_ids=batch, attention_mask=mask, pixel_values=pixels)
        return (out.text_embeds, out.image_embeds, model.encode_text(batch, mask), model.encode_text(batch[:2, :4]),
                model.encode_image(pixels))

    with torch.no_grad():
        expected = outputs(sdpa)
        monkeypatch.setattr(F, "scaled_dot_product_attention", None)  # eager must not reach it
        for actual, reference in zip(outputs(eager), expected, strict=True):
            torch.testing.assert_close(actual, reference, rtol=0, atol=1e-5)


def test_from_pretrained_honours_attn_implementation(saved_dir, model, text_batch):
    for implementation in ("eager", "sdpa"):
        loaded = LightClipModel.from_pretrained(saved_dir, attn_implementation=implementation).eval()
        configs = (loaded.config, loaded.config.text_config, loaded.config.vision_config)
        assert [c._attn_implementation for c in configs] == [implementation] * 3
        for x, y in zip(embeddings_of(loaded, text_batch), embeddings_of(model, text_batch)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    loaded = LightClipModel.from_pretrained(saved_dir)
    assert loaded.config.text_config._attn_implementation == loaded.config.vision_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="Flash Attention"):
        LightClipModel.from_pretrained(saved_dir, attn_implementation="flash_attention_2")


def test_return_dict_false_gives_tuple(model, text_batch):
    pixels = random_pixels(2)
    with torch.no_grad():
        as_tuple = model(**text_batch, pixel_values=pixels, return_dict=False)
        as_output = model(**text_batch, pixel_values=pixels)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.logits_per_image)
    torch.testing.assert_close(as_tuple[1], as_output.logits_per_text)


@pytest.mark.parametrize("stored, expected_scale", [(1.0, math.e), (math.log(100.0), 100.0), (10.0, 100.0)])
def test_logits_are_clamped_scale_times_cosine(text_batch, stored, expected_scale):
    model = make_model()
    with torch.no_grad():
        model.logit_scale.fill_(stored)
        pixels = random_pixels(3)
        out = model(**text_batch, pixel_values=pixels)
        cosine = model.encode_image(pixels) @ model.encode_text(**text_batch).T
    assert out.logits_per_image.shape == (3, len(CAPTIONS))
    torch.testing.assert_close(out.logits_per_image, expected_scale * cosine, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)


def test_clamp_logit_scale_in_place():
    model = make_model()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def manual_clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy with the diagonal as positives, written out with log-softmax."""
    n = logits_per_image.shape[0]
    image_to_text = -logits_per_image.log_softmax(dim=1)[range(n), range(n)].mean()
    text_to_image = -logits_per_image.log_softmax(dim=0)[range(n), range(n)].mean()
    return (image_to_text + text_to_image) / 2


def test_return_loss_is_symmetric_cross_entropy(model, text_batch):
    with torch.no_grad():
        out = model(**text_batch, pixel_values=random_pixels(len(CAPTIONS)), return_loss=True)
    assert out.loss.item() == pytest.approx(manual_clip_loss(out.logits_per_image).item(), rel=1e-6)
    assert model(**text_batch, pixel_values=random_pixels(len(CAPTIONS))).loss is None


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (2, 1, 32, 32), (3, 32, 32), (2, 3, 32, 16)])
def test_wrong_pixel_values_shape_raises(model, shape):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 32, 32\)"):
        model.encode_image(torch.zeros(shape))


def test_forward_needs_both_modalities(model, text_batch):
    with pytest.raises(ValueError, match="pixel_values"):
        model(**text_batch)


# --------------------------------------------------------------------------------------------------------------------
# training


def loss_and_grads(model, text_batch, pixels):
    model.zero_grad()
    loss = model(**text_batch, pixel_values=pixels, return_loss=True).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_gives_same_loss_and_grads(text_batch):
    model = make_model().train()
    pixels = random_pixels(len(CAPTIONS))
    loss, grads = loss_and_grads(model, text_batch, pixels)
    model.gradient_checkpointing_enable()
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing for m in layers)
    loss_ckpt, grads_ckpt = loss_and_grads(model, text_batch, pixels)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_forward_backward_batch_8_trains_every_parameter(tokenizer):
    model = make_model().train()
    texts = [f"a photo of {n} {c} things" for n, c in zip(range(8), "abcdefgh")]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pixels = random_pixels(8)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(**batch, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------------------------------------
# CNN towers (transformers MobileNetV2 / EfficientNet, the native EfficientNet-Lite), at 64 px


@pytest.fixture(scope="module", params=["lightclip-mobilenetv2", "lightclip-efficientnet-b0",
                                        "lightclip-efficientnet-lite0"])
def cnn_model(request):
    torch.manual_seed(0)
    # the preset's CNN at 64 px; a small text tower, which these tests do not exercise, keeps them fast
    small_text = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2)
    config = LightClipConfig.from_preset(request.param, vision_config=dict(image_size=64), text_config=small_text)
    return LightClipModel(config).eval()


def test_cnn_tower_outputs(cnn_model):
    pixels = random_pixels(3, size=64)
    with torch.no_grad():
        out = cnn_model.get_image_features(pixels, output_hidden_states=True)
        embeds = cnn_model.encode_image(pixels)
    # stride 32: a 64 px image gives a 2 x 2 map of 1280 channels
    assert out.last_hidden_state.shape == (3, 4, 1280)
    assert out.patch_tokens.shape == (3, 4, 1280)
    assert out.pooler_output.shape == (3, 256)
    mean_token = out.patch_tokens.mean(dim=1)
    torch.testing.assert_close(out.pooler_output, mean_token @ cnn_model.visual_projection.weight.T)
    assert len(out.hidden_states) > 2 and all(h.dim() == 3 and h.shape[0] == 3 for h in out.hidden_states)
    assert torch.isfinite(embeds).all()
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3))  # features far above F.normalize's eps
    cosine = embeds @ embeds.T
    assert cosine[~torch.eye(3, dtype=torch.bool)].max() < 0.99  # different images, different embeddings
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        cnn_model.encode_image(random_pixels(1, size=32))


def test_cnn_save_load_round_trip(cnn_model, tmp_path, tokenizer):
    cnn_model.save_pretrained(tmp_path)
    loaded, info = LightClipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert_clean_load(info)
    pixels = random_pixels(2, size=64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(pixels), cnn_model.encode_image(pixels))
