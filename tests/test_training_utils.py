"""Gradient accumulation with cached features, optimizer groups, schedule and atomic checkpoints."""

import json
import math

import pytest
import torch

from lightclip import LightClipConfig, LightClipForPreTraining, LightClipModel
from lightclip.modeling_lightclip_convnet import LightClipFrozenBatchNorm2d, freeze_batch_norm_2d
from lightclip.pretraining import merge_features
from lightclip.trainer_utils import (
    cosine_with_warmup,
    list_checkpoints,
    lock_image_tower,
    lock_text_tower,
    param_groups,
    plot_log,
    resolve_checkpoint,
)


def _batch(seed: int, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 4096, (size, 12), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[: size // 2, 8:], ids[: size // 2, 7] = 0, 3  # half the rows are shorter (padded)
    targets = {"image_nn": torch.randn(size, 16, generator=g), "text_nn": torch.randn(size, 24, generator=g),
               "image_xnn": torch.randn(size, 24, generator=g), "text_xnn": torch.randn(size, 16, generator=g)}
    teacher = {"image_embeds": torch.nn.functional.normalize(torch.randn(size, 20, generator=g), dim=-1),
               "text_embeds": torch.nn.functional.normalize(torch.randn(size, 20, generator=g), dim=-1),
               "logit_scale": torch.tensor(40.0)}
    return dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=torch.randn(size, 3, 32, 32, generator=g),
                neighbor_targets=targets, teacher_targets=teacher)


@pytest.mark.parametrize("objectives", ["clip", "soft,token,nn,xnn", "clip,kd,fd"])
def test_accumulated_gradients_equal_the_full_batch(objectives):
    """Two micro-batches of 4 (different text lengths) with cached features == one batch of 8."""
    torch.manual_seed(0)
    config = LightClipConfig.from_preset("lightclip-xxs", objectives=objectives, teacher_image_dim=16,
                                         teacher_text_dim=24, distill_teacher_dim=20)
    model = LightClipForPreTraining(config).eval()
    model.set_progress(0.6)
    batch = _batch(1)
    full = model(**batch)
    full.loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    def micro(rows: slice, length: int) -> dict:
        return dict(input_ids=batch["input_ids"][rows, :length], attention_mask=batch["attention_mask"][rows, :length],
                    pixel_values=batch["pixel_values"][rows],
                    neighbor_targets={k: v[rows] for k, v in batch["neighbor_targets"].items()},
                    teacher_targets={k: v[rows] if v.dim() else v for k, v in batch["teacher_targets"].items()})

    parts = [micro(slice(0, 4), 8), micro(slice(4, 8), 12)]
    with torch.no_grad():
        cached = [model(**p, return_features=True) for p in parts]
    for i, part in enumerate(parts):
        live = model(**part, return_features=True)
        out = model.compute_losses(merge_features(cached[:i] + [live] + cached[i + 1:], i))
        out.loss.backward()
        assert torch.allclose(out.loss, full.loss, atol=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, reference[name], atol=2e-5, rtol=1e-4), name


def test_param_groups_exclude_norms_biases_and_logit_scales():
    model = LightClipForPreTraining(LightClipConfig.from_preset("lightclip-xxs", objectives="token"))
    decay, no_decay = param_groups(model, 0.1, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "lightclip.logit_scale" in no_decay_names and "objectives.token.logit_scale" in no_decay_names
    assert all(n.endswith(("bias", "logit_scale", "class_embedding")) or "norm" in n for n in no_decay_names)
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["lr"] == no_decay["lr"] == 1e-3


def test_param_groups_scale_the_image_tower_learning_rate():
    model = LightClipForPreTraining(LightClipConfig.from_preset("lightclip-xxs-cnn", objectives="clip"))
    groups = param_groups(model, 0.1, 1e-3, image_tower_lr_scale=0.1)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lr) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name, param in model.named_parameters():
        expected = 1e-4 if name.startswith("lightclip.vision_model.") else 1e-3
        assert lr[id(param)] == pytest.approx(expected), name
    assert lr[id(model.lightclip.visual_projection.weight)] == pytest.approx(1e-3)


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    expected = [0.5 * (1 + math.cos(math.pi * (s - 4) / 10)) for s in range(4, 14)]
    assert lrs[4:] == pytest.approx(expected)


def test_latest_checkpoint_ignores_incomplete_ones(tmp_path):
    for step, complete in [(2, True), (4, True), (6, False)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / ".tmp-checkpoint-8").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-4"
    assert resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "checkpoint-6"), tmp_path)


@pytest.mark.parametrize("unlocked", [0, 2])
def test_lock_image_tower_freezes_all_but_the_last_groups_and_their_statistics(unlocked):
    config = LightClipConfig.from_preset("lightclip-efficientnet-lite0", objectives="clip",
                                         vision_config=dict(image_size=32))
    model = LightClipForPreTraining(config)
    groups = model.lightclip.vision_model.backbone.groups()
    frozen = lock_image_tower(model, unlocked_groups=unlocked, freeze_bn_stats=True)
    locked = groups[:len(groups) - unlocked]
    assert frozen == sum(p.numel() for g in locked for p in g.parameters())
    stats = {k: v.clone() for g in locked for k, v in g.state_dict().items() if "running" in k}
    model.train()  # the locked groups must stay in eval mode
    assert all(not m.training for g in locked for m in g.modules())
    assert all(m.training for g in groups[len(locked):] for m in g.modules())
    batch = dict(pixel_values=torch.randn(4, 3, 32, 32), input_ids=torch.randint(5, 100, (4, 6)))
    model(**batch).loss.backward()
    assert all(p.grad is None for g in locked for p in g.parameters())
    assert all(p.grad is not None for g in groups[len(locked):] for p in g.parameters())
    assert model.lightclip.text_model.embeddings.token_embedding.weight.grad is not None
    after = {k: v for g in locked for k, v in g.state_dict().items() if "running" in k}
    assert all(torch.equal(stats[k], after[k]) for k in stats)
    assert all(p.requires_grad for group in param_groups(model, 0.1, 1e-3) for p in group["params"])


def _locked_lite0(unlocked: int = 2) -> tuple[LightClipForPreTraining, list[torch.nn.Module], list[torch.nn.Module]]:
    """An EfficientNet-Lite0 model at 32 px, drop-connect on, with BatchNorm statistics from a few training batches,
    locked with frozen BatchNorm: (model in train mode, locked groups, trainable groups)."""
    torch.manual_seed(0)
    config = LightClipConfig.from_preset("lightclip-efficientnet-lite0", objectives="clip",
                                         vision_config=dict(image_size=32, backbone_kwargs=dict(drop_connect_rate=0.2)))
    model = LightClipForPreTraining(config).train()
    with torch.no_grad():
        for seed in range(2):
            model.lightclip.vision_model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    groups = model.lightclip.vision_model.backbone.groups()
    lock_image_tower(model, unlocked_groups=unlocked, freeze_bn_stats=True)
    return model, groups[:len(groups) - unlocked], groups[len(groups) - unlocked:]


def test_frozen_batch_norm_keeps_batch_norm_state_and_eval_output():
    norm = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(), norm(torch.randn(8, 6, 5, 5) * 3 + 1)
    frozen = LightClipFrozenBatchNorm2d.from_batch_norm(norm.eval())
    assert not list(frozen.parameters())
    assert frozen.state_dict().keys() == norm.state_dict().keys()
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in norm.state_dict().items())
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(frozen.train()(x), norm(x), rtol=0, atol=0)  # training mode changes nothing
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in norm.state_dict().items())
    fresh = torch.nn.BatchNorm2d(6)
    fresh.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(fresh.eval()(x), norm(x), rtol=0, atol=0)
    sequential = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), norm)
    assert freeze_batch_norm_2d(sequential) is sequential and isinstance(sequential[1], LightClipFrozenBatchNorm2d)


def test_locked_groups_keep_weights_and_statistics_through_training_steps():
    model, locked, trainable = _locked_lite0()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for g in locked for m in g.modules())
    assert any(isinstance(m, LightClipFrozenBatchNorm2d) for g in locked for m in g.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for g in trainable for m in g.modules())
    before = [{k: v.clone() for k, v in g.state_dict().items()} for g in (*locked, *trainable)]
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, 1e-2), lr=1e-2)
    locked[0].train()  # even a locked group put in training mode by hand keeps its statistics
    for seed in range(2):
        batch = _batch(seed, size=4)
        optimizer.zero_grad()
        model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).loss.backward()
        assert all(p.grad is None and not p.requires_grad for g in locked for p in g.parameters())
        assert not any(b.requires_grad for g in locked for b in g.buffers())
        optimizer.step()
        model.train()
    after = [g.state_dict() for g in (*locked, *trainable)]
    for old, new in zip(before[:len(locked)], after):
        assert all(torch.equal(old[k], new[k]) for k in old)
    moved = [k for old, new in zip(before[len(locked):], after[len(locked):]) for k in old
             if k.endswith(("weight", "running_mean")) and not torch.equal(old[k], new[k])]
    assert moved  # the unlocked groups train, their statistics included


def test_locked_model_saves_a_checkpoint_that_a_fresh_model_loads(tmp_path):
    model, locked, _ = _locked_lite0()
    batch = _batch(3, size=4)
    model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"]).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    inner = model.lightclip.eval()
    model.save_pretrained(tmp_path)
    loaded, info = LightClipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not any(isinstance(m, LightClipFrozenBatchNorm2d) for m in loaded.modules())  # plain BatchNorm again
    state, reloaded = inner.state_dict(), loaded.state_dict()
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(pixels), inner.encode_image(pixels), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(batch["input_ids"]), inner.encode_text(batch["input_ids"]),
                                   rtol=0, atol=0)


def test_lock_image_tower_needs_a_tower_with_groups():
    model = LightClipForPreTraining(LightClipConfig.from_preset("lightclip-xxs", objectives="clip"))
    with pytest.raises(ValueError, match="layer groups"):
        lock_image_tower(model)
    cnn = LightClipForPreTraining(LightClipConfig.from_preset("lightclip-xxs-cnn", objectives="clip"))
    with pytest.raises(ValueError, match="unlocked_groups"):
        lock_image_tower(cnn, unlocked_groups=4)


@pytest.mark.parametrize("unlocked, freeze_layer_norm", [(0, True), (1, False)])
def test_lock_text_tower_freezes_all_but_the_last_layers(unlocked, freeze_layer_norm):
    model = LightClipForPreTraining(LightClipConfig.from_preset("lightclip-xxs-cnn", objectives="clip"))
    text = model.lightclip.text_model
    groups = [text.embeddings, *text.encoder.layers, text.final_layer_norm]
    locked = groups[:len(groups) - unlocked]
    frozen = lock_text_tower(model, unlocked_layers=unlocked, freeze_layer_norm=freeze_layer_norm)

    def is_norm(group, name):
        owner = group.get_submodule(name.rpartition(".")[0]) if "." in name else group
        return isinstance(owner, torch.nn.LayerNorm)

    expected = [p for g in locked for n, p in g.named_parameters() if freeze_layer_norm or not is_norm(g, n)]
    assert frozen == sum(p.numel() for p in expected) > 0
    model(pixel_values=torch.randn(4, 3, 32, 32), input_ids=torch.randint(5, 100, (4, 6))).loss.backward()
    assert all(p.grad is None for p in expected)
    trainable = [p for p in model.parameters() if all(p is not q for q in expected)]
    assert trainable and all(p.grad is not None for p in trainable if p.requires_grad)
    assert model.lightclip.text_projection.weight.grad is not None
    assert (text.final_layer_norm.weight.grad is not None) == (unlocked > 0 or not freeze_layer_norm)
    with pytest.raises(ValueError, match="unlocked_layers"):
        lock_text_tower(model, unlocked_layers=len(groups) + 1)


def test_plot_log_reads_old_accuracy_keys_as_acc1(tmp_path, monkeypatch):
    """A log that a resumed run continued holds `eval/.../top1` before and `eval/.../acc1` after: one curve."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    records = [{"step": 1, "loss": 2.0}, {"step": 1, "eval/shapes/shape/top1": 0.2, "eval/shapes/shape/top5": 0.6},
               {"step": 2, "loss": 1.0}, {"step": 2, "eval/shapes/shape/acc1": 0.4, "eval/shapes/shape/acc5": 0.9}]
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_log(log, tmp_path / "curves.png")
    (curve,) = figures[0].axes[1].get_lines()
    assert curve.get_label() == "shapes/shape/acc1"
    assert list(curve.get_xdata()) == [1, 2] and list(curve.get_ydata()) == [0.2, 0.4]
