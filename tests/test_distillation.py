"""Distillation from a frozen CLIP teacher: the kd / fd losses against brute-force references, the online teacher
(a transformers `CLIPModel` folder built here, offline; a lightclip checkpoint), and the precomputed store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CAPTIONS, load_script, make_config, make_model, save_clip_teacher
from PIL import Image
from safetensors import safe_open
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from lightclip import LightClipForPreTraining, LightClipModel
from lightclip.collate import ImageTextCollator
from lightclip.distillation import DistillationTeacher, TeacherEmbeddingStore, build_teacher_embeddings
from lightclip.objectives.distillation import AffinityDistillationLoss, FeatureDistillationLoss

STUDENT_SIZE = 32  # the lightclip-xxs preset of conftest


# ---------------------------------------------------------------------------------------------------------- helpers


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def make_rows(n: int = 7, seed: int = 0) -> list[dict]:
    """Standardised rows: PIL images of assorted sizes, captions, index."""
    rng = np.random.default_rng(seed)
    return [{"image": Image.fromarray(rng.integers(0, 256, (30 + 3 * i, 40 - 2 * i, 3), dtype=np.uint8)),
             "captions": [CAPTIONS[i % len(CAPTIONS)] + f" {i}"], "index": i} for i in range(n)]


def eval_batch(processor, rows: list[dict]) -> dict:
    return ImageTextCollator(processor, train=False, image_size=STUDENT_SIZE, return_raw=True)(rows)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return save_clip_teacher(tmp_path_factory.mktemp("clip-teacher"))


@pytest.fixture(scope="module")
def teacher(clip_dir, processor) -> DistillationTeacher:
    return DistillationTeacher.from_pretrained(clip_dir, processor.image_processor, local_files_only=True)


# ---------------------------------------------------------------------------------------------------------- losses


def brute_force_kd(img, txt, scale, t_img, t_txt, t_scale) -> float:
    """1/2 (CE(teacher i->t, student i->t) + CE(teacher t->i, student t->i)), with plain loops."""
    img, txt, t_img, t_txt = (x.numpy() for x in (img, txt, t_img, t_txt))
    b = len(img)

    def ce(student_rows, student_cols, teacher_rows, teacher_cols, s, t):
        total = 0.0
        for i in range(b):
            s_logits = [s * float(np.dot(student_rows[i], student_cols[j])) for j in range(b)]
            t_logits = [t * float(np.dot(teacher_rows[i], teacher_cols[j])) for j in range(b)]
            s_log_norm = math.log(sum(math.exp(v) for v in s_logits))
            t_norm = sum(math.exp(v) for v in t_logits)
            total -= sum(math.exp(t_logits[j]) / t_norm * (s_logits[j] - s_log_norm) for j in range(b))
        return total / b

    return 0.5 * (ce(img, txt, t_img, t_txt, scale, t_scale) + ce(txt, img, t_txt, t_img, scale, t_scale))


@pytest.mark.parametrize("temperature", [None, 0.07])
def test_kd_loss_matches_brute_force(temperature):
    img, txt, t_img, t_txt = unit(5, 8, seed=0), unit(5, 8, seed=1), unit(5, 6, seed=2), unit(5, 6, seed=3)
    loss = AffinityDistillationLoss(temperature)(img, txt, torch.tensor(12.0, dtype=torch.float64), t_img, t_txt,
                                                 torch.tensor(30.0))["kd_loss"]
    t_scale = 30.0 if temperature is None else 1.0 / temperature
    assert loss.item() == pytest.approx(brute_force_kd(img, txt, 12.0, t_img, t_txt, t_scale), rel=1e-8)


def test_kd_loss_needs_a_teacher_scale_or_a_temperature():
    img = unit(3, 4, seed=0)
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        AffinityDistillationLoss()(img, img, torch.tensor(10.0), img, img)
    with pytest.raises(ValueError, match="temperature"):
        AffinityDistillationLoss(temperature=0.0)


def test_student_identical_to_the_teacher_has_zero_kl():
    """At matched scale the cross-entropy is the teacher distribution's entropy, and its gradient vanishes."""
    t_img, t_txt, scale = unit(6, 8, seed=4), unit(6, 8, seed=5), 17.0
    img, txt = t_img.clone().requires_grad_(True), t_txt.clone().requires_grad_(True)
    loss = AffinityDistillationLoss()(img, txt, torch.tensor(scale, dtype=torch.float64), t_img, t_txt,
                                      torch.tensor(scale))["kd_loss"]
    entropy = 0.0
    for logits in (scale * t_img @ t_txt.T, scale * t_txt @ t_img.T):
        p = logits.softmax(-1).numpy()
        entropy += 0.5 * float(-(p * np.log(p)).sum(-1).mean())
    assert loss.item() == pytest.approx(entropy, rel=1e-10)
    loss.backward()
    assert img.grad.abs().max() < 1e-12 and txt.grad.abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_fd_loss_matches_brute_force(kind):
    img, txt = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)  # not normalised
    t_img, t_txt = unit(4, 6, seed=6), unit(4, 6, seed=7)
    loss = FeatureDistillationLoss(kind)(img, txt, t_img, t_txt)["fd_loss"]

    def distance(student, target):
        total = 0.0
        for s, t in zip(student.numpy(), target.numpy()):
            s = s / np.sqrt((s * s).sum())
            total += (1.0 - float((s * t).sum())) if kind == "cosine" else float(((s - t) ** 2).mean())
        return total / len(student)

    assert loss.item() == pytest.approx(0.5 * (distance(img, t_img) + distance(txt, t_txt)), rel=1e-10)
    with pytest.raises(ValueError, match="cosine"):
        FeatureDistillationLoss("l1")


# ---------------------------------------------------------------------------------------------------------- teacher


def test_clip_folder_works_as_a_teacher_offline(teacher, clip_dir, processor):
    """A transformers CLIPModel folder: the student's crops, moved into the teacher's size and normalisation, embed
    as the teacher's own processor makes them embed; captions go through the teacher's tokenizer."""
    batch = eval_batch(processor, make_rows(4))
    image, text, scale = teacher.embed(batch)
    assert image.shape == text.shape == (4, 24) and image.dtype == text.dtype == torch.float32
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    assert scale.item() == pytest.approx(20.0, rel=1e-5)

    reference = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    own = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    pixels = own(images=batch["images"], return_tensors="pt")["pixel_values"]  # 32 px crops, resized by PIL
    ours = teacher.teacher_pixels(batch["pixel_values"])
    assert ours.shape == pixels.shape == (4, 3, 48, 48)
    std = torch.tensor(own.image_processor.image_std).view(1, 3, 1, 1)
    assert ((ours - pixels) * std * 255).abs().mean() < 1.0  # under one 8-bit level on average (PIL rounds)
    tokens = own.tokenizer(batch["texts"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected_text = F.normalize(reference.get_text_features(**tokens).pooler_output, dim=-1)
        expected_image = F.normalize(reference.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(text, expected_text, rtol=1e-5, atol=1e-6)
    assert F.cosine_similarity(image, expected_image).min() > 0.999


def test_teacher_at_the_student_size_sees_exactly_the_student_pixels(tmp_path, processor):
    """No resize when the sizes agree: only the normalisation changes, exactly."""
    folder = save_clip_teacher(tmp_path / "clip32", image_size=STUDENT_SIZE)
    teacher = DistillationTeacher.from_pretrained(folder, processor.image_processor, local_files_only=True)
    batch = eval_batch(processor, make_rows(3))
    expected = teacher.image_processor(images=batch["images"], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(teacher.teacher_pixels(batch["pixel_values"]), expected, rtol=0, atol=1e-5)


def test_lightclip_checkpoint_works_as_a_teacher(saved_dir, model, processor):
    """A lightclip folder loads through the package's Auto registration; as its own student it gives zero KL."""
    teacher = DistillationTeacher.from_pretrained(saved_dir, processor.image_processor, local_files_only=True)
    assert isinstance(teacher.model, LightClipModel)
    batch = eval_batch(processor, make_rows(4))
    image, text, scale = teacher.embed(batch)
    with torch.no_grad():
        student_image = model.encode_image(batch["pixel_values"])
        student_text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        student_scale = model.logit_scale_exp()
    torch.testing.assert_close(image, student_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, student_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale, student_scale)


def test_teacher_gets_no_gradient_and_is_never_saved(teacher, processor, tmp_path):
    """Steps of kd + fd on a student: the teacher's weights get no gradient and do not move; a module holding the
    teacher has none of its tensors in its state dict; the saved student holds only its own tensors."""

    class Holder(nn.Module):  # what an objective holding the teacher looks like
        def __init__(self):
            super().__init__()
            self.student = make_model(seed=1).train()
            self.projection = nn.Linear(self.student.config.projection_dim, 24)
            self.teacher = teacher

    holder = Holder()
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    collator = ImageTextCollator(processor, train=True, image_size=STUDENT_SIZE, return_raw=True)
    optimizer = torch.optim.AdamW(holder.parameters(), lr=1e-2)
    kd, fd = AffinityDistillationLoss(), FeatureDistillationLoss()
    start = {k: v.clone() for k, v in holder.student.state_dict().items()}
    for epoch in range(3):
        collator.set_epoch(epoch)
        batch = collator(make_rows(6))
        t_image, t_text, t_scale = teacher.embed(batch)
        image = holder.student.encode_image(batch["pixel_values"])
        text = holder.student.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = (kd(image, text, holder.student.logit_scale_exp(), t_image, t_text, t_scale)["kd_loss"]
                + fd(holder.projection(image), holder.projection(text), t_image, t_text)["fd_loss"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(v, start[k]) for k, v in holder.student.state_dict().items())  # the student moved

    assert not any(k.startswith("teacher") for k in holder.state_dict())
    assert sum(p.numel() for p in holder.parameters()) == sum(
        p.numel() for m in (holder.student, holder.projection) for p in m.parameters())
    holder.student.save_pretrained(tmp_path / "student")
    with safe_open(str(tmp_path / "student" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert saved == set(holder.student.state_dict())


def test_embed_needs_the_raw_captions(teacher, processor):
    batch = ImageTextCollator(processor, train=False, image_size=STUDENT_SIZE)(make_rows(2))
    with pytest.raises(KeyError, match="return_raw=True"):
        teacher.embed(batch)


# ---------------------------------------------------------------------------------------------------------- store


def test_online_and_precomputed_teachers_agree(teacher, processor, tmp_path):
    """On the same un-augmented batch the stored embeddings equal the online ones (to fp16), and so does kd."""
    rows = make_rows(7)
    rows[5] = dict(rows[5], image={"bytes": b"not an image", "path": None})  # skipped by the collator
    store = build_teacher_embeddings(rows, teacher, processor, str(tmp_path / "store"), batch_size=3,
                                     show_progress=False)
    assert len(store) == 7 and store.metadata["present"] == 6 and store.image_dim == store.text_dim == 24
    batch = eval_batch(processor, [rows[i] for i in (4, 0, 6, 2)])
    online_image, online_text, online_scale = teacher.embed(batch)
    stored_image, stored_text = store.lookup(batch["index"])
    assert stored_image.dtype == torch.float32 and stored_image.shape == online_image.shape
    torch.testing.assert_close(stored_image, online_image, rtol=0, atol=2e-3)
    torch.testing.assert_close(stored_text, online_text, rtol=0, atol=2e-3)
    torch.testing.assert_close(store.logit_scale, online_scale)

    student_image, student_text = unit(4, 8, seed=8).float(), unit(4, 8, seed=9).float()
    kd = AffinityDistillationLoss()
    online = kd(student_image, student_text, torch.tensor(15.0), online_image, online_text, online_scale)
    stored = kd(student_image, student_text, torch.tensor(15.0), stored_image, stored_text, store.logit_scale)
    torch.testing.assert_close(stored["kd_loss"], online["kd_loss"], rtol=0, atol=1e-3)

    with pytest.raises(ValueError, match=r"row\(s\) \[5\]"):
        store.lookup(torch.tensor([1, 5]))
    reopened = TeacherEmbeddingStore.load(str(tmp_path / "store"), mmap=False)
    torch.testing.assert_close(reopened.lookup([4, 0, 6, 2])[0], stored_image)


def test_store_fingerprint_rejects_another_dataset_or_teacher(teacher, processor, tmp_path, monkeypatch):
    rows = make_rows(5)
    folder = str(tmp_path / "store")
    build_teacher_embeddings(rows, teacher, processor, folder, show_progress=False)

    def no_forward(batch):
        raise AssertionError("a matching store is reused without running the teacher")

    monkeypatch.setattr(teacher, "embed", no_forward)
    assert len(build_teacher_embeddings(rows, teacher, processor, folder, show_progress=False)) == 5
    monkeypatch.undo()

    changed = [dict(r) for r in rows]
    changed[2]["captions"] = ["another caption"]
    with pytest.raises(ValueError, match="another dataset(.|\n)*fingerprint(.|\n)*--overwrite"):
        build_teacher_embeddings(changed, teacher, processor, folder, show_progress=False)
    with pytest.raises(ValueError, match="another dataset"):
        TeacherEmbeddingStore.load(folder).check_dataset(changed)
    TeacherEmbeddingStore.load(folder).check_dataset(rows)

    other = DistillationTeacher.from_pretrained(save_clip_teacher(tmp_path / "other", seed=1),
                                                processor.image_processor, local_files_only=True)
    with pytest.raises(ValueError, match="teacher(.|\n)*weights"):
        build_teacher_embeddings(rows, other, processor, folder, show_progress=False)
    rebuilt = build_teacher_embeddings(rows, other, processor, folder, overwrite=True, show_progress=False)
    assert rebuilt.metadata["teacher"]["weights"] == other.metadata()["weights"] != teacher.metadata()["weights"]


def test_precompute_script_on_shapes(clip_dir, tmp_path):
    script = load_script("examples/precompute_teacher.py")
    store = script.main(["--train_data", "shapes", "--shapes_train_size", "6", "--shapes_image_size", "32",
                         "--model", "lightclip-xxs", "--distill_model", clip_dir, "--output_dir",
                         str(tmp_path / "emb"), "--batch_size", "4"])
    assert len(store) == 6 and store.metadata["present"] == 6
    assert store.metadata["view"]["image_size"] == STUDENT_SIZE
    image, text = store.lookup(torch.arange(6))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(6))


# ---------------------------------------------------------------------------------------------------------- objectives


def distill_model(objectives: str, teacher_dim: int | None = 24, **settings) -> LightClipForPreTraining:
    torch.manual_seed(0)
    return LightClipForPreTraining(make_config(objectives=objectives, distill_teacher_dim=teacher_dim, **settings))


def teacher_targets(batch: int, dim: int = 24) -> dict[str, torch.Tensor]:
    return {"image_embeds": unit(batch, dim, seed=10).float(), "text_embeds": unit(batch, dim, seed=11).float(),
            "logit_scale": torch.tensor(25.0)}


def student_batch(tokenizer) -> dict:
    batch = dict(tokenizer(CAPTIONS, padding=True, return_tensors="pt"))
    batch["pixel_values"] = torch.randn(len(CAPTIONS), 3, STUDENT_SIZE, STUDENT_SIZE,
                                        generator=torch.Generator().manual_seed(3))
    return batch


@pytest.mark.parametrize("temperature", [None, 0.05])
def test_kd_objective_is_the_loss_on_the_model_features(tokenizer, temperature):
    model = distill_model("clip,kd", kd_temperature=temperature, kd_weight=0.3)
    targets = teacher_targets(len(CAPTIONS))
    out = model(**student_batch(tokenizer), teacher_targets=targets)
    expected = AffinityDistillationLoss(temperature)(out.image_embeds, out.text_embeds,
                                                     model.lightclip.logit_scale_exp(), targets["image_embeds"],
                                                     targets["text_embeds"], targets["logit_scale"])["kd_loss"]
    torch.testing.assert_close(out.losses["kd_loss"], expected)
    torch.testing.assert_close(out.loss, out.losses["contrastive_loss"] + 0.3 * expected)
    assert [n for n, _ in model.named_parameters() if n.startswith("objectives.")] == []  # kd trains nothing of its own


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_fd_objective_is_the_loss_on_the_projected_features(tokenizer, kind):
    model = distill_model("clip,fd", fd_loss=kind)
    targets = teacher_targets(len(CAPTIONS))
    out = model(**student_batch(tokenizer), teacher_targets=targets)
    fd = model.objectives["fd"]
    expected = FeatureDistillationLoss(kind)(fd.image_proj(out.image_embeds), fd.text_proj(out.text_embeds),
                                             targets["image_embeds"], targets["text_embeds"])["fd_loss"]
    torch.testing.assert_close(out.losses["fd_loss"], expected)


def test_fd_projection_exists_only_when_the_widths_differ(tokenizer):
    width = distill_model("clip").config.projection_dim
    projected = distill_model("clip,fd", teacher_dim=24)
    assert {n for n, _ in projected.named_parameters() if n.startswith("objectives.")} == {
        "objectives.fd.image_proj.weight", "objectives.fd.image_proj.bias", "objectives.fd.text_proj.weight",
        "objectives.fd.text_proj.bias"}
    assert projected.objectives["fd"].image_proj.weight.shape == (24, width)
    same = distill_model("clip,fd", teacher_dim=width)
    assert [n for n, _ in same.named_parameters() if n.startswith("objectives.")] == []
    targets = teacher_targets(len(CAPTIONS), dim=width)
    out = same(**student_batch(tokenizer), teacher_targets=targets)
    expected = FeatureDistillationLoss()(out.image_embeds, out.text_embeds, targets["image_embeds"],
                                         targets["text_embeds"])["fd_loss"]
    torch.testing.assert_close(out.losses["fd_loss"], expected)


def test_distillation_objectives_need_their_teacher(tokenizer):
    with pytest.raises(ValueError, match="distill_teacher_dim"):
        distill_model("clip,fd", teacher_dim=None)
    model = distill_model("clip,kd,fd")
    with pytest.raises(ValueError, match="kd objective needs teacher_targets.*--distill_model.*--distill_embeddings"):
        model(**student_batch(tokenizer))
    with pytest.raises(ValueError, match="2 image and 2 text rows for a batch of 4"):
        model(**student_batch(tokenizer), teacher_targets=teacher_targets(2))


def test_distillation_card_rows_name_the_teacher_and_weights():
    from lightclip.objectives import OBJECTIVE_CLASSES

    settings = distill_model("clip,kd,fd", kd_weight=0.5, fd_weight=2.0, fd_loss="mse",
                             distill_teacher="org/teacher").config.pretraining_config.settings_dict()
    assert OBJECTIVE_CLASSES["kd"].card_row(settings) == (
        "kd: affinity distillation from `org/teacher`", "0.5 (teacher's own logit scale)")
    assert OBJECTIVE_CLASSES["fd"].card_row(settings) == (
        "fd: feature distillation from `org/teacher`", "2.0 (mse, teacher width 24)")


# ------------------------------------------------------------------------------------------------- training script


def test_pretrain_checks_the_distillation_options(teacher, processor, tmp_path):
    """kd / fd need exactly one teacher source and a source needs kd or fd; a store must match the student's image
    size and the training data, and gives the config the teacher's name and width."""
    import types

    pretrain = load_script("examples/pretrain.py")
    for argv, message in [
        (["--objectives", "clip,kd"], "kd objective.*exactly one teacher.*--distill_model.*--distill_embeddings.*"
                                      "neither"),
        (["--objectives", "lightclip,fd", "--distill_model", "a", "--distill_embeddings", "b"],
         "fd objective.*--distill_model and --distill_embeddings"),
        (["--objectives", "clip", "--distill_model", "a"], "--distill_model is given but no distillation objective"),
    ]:
        with pytest.raises(ValueError, match=message):
            pretrain.validate_args(pretrain.parse_args(argv))
    pretrain.validate_args(pretrain.parse_args(["--objectives", "all,kd", "--distill_embeddings", "b"]))

    rows, folder = make_rows(6), str(tmp_path / "store")
    build_teacher_embeddings(rows, teacher, processor, folder, show_progress=False)
    args = pretrain.parse_args(["--model", "lightclip-xxs", "--objectives", "clip,fd", "--distill_embeddings", folder])
    config, student_processor = pretrain.build_config_and_processor(args)
    accelerator = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, device="cpu")
    store = pretrain.load_distillation_teacher(args, config, student_processor, rows, accelerator)
    assert isinstance(store, TeacherEmbeddingStore) and len(store) == 6
    settings = config.pretraining_config
    assert (settings.distill_teacher, settings.distill_teacher_dim) == (teacher.name, 24)
    with pytest.raises(ValueError, match="another dataset"):
        pretrain.load_distillation_teacher(args, config, student_processor, rows[:5], accelerator)
    config.vision_config.image_size = 64
    with pytest.raises(ValueError, match="saw 32 px crops, the student is trained at 64 px"):
        pretrain.load_distillation_teacher(args, config, student_processor, rows, accelerator)
