"""Nothing lost, nothing silent, on the data side: banks and stores know what they were built from, huge pictures
stay small in memory, and bad metadata or tar shards say which file is at fault."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import types

import numpy as np
import pytest
import torch
from conftest import load_script, save_clip_teacher
from PIL import Image
from test_data import FakeProcessor
from test_distillation import make_rows
from test_neighbors import _tiny_dataset
from test_pretrain_script import run_script

from lightclip import neighbors
from lightclip.collate import ImageTextCollator, SkipCounter
from lightclip.data import decode_images_once, load_image_text_dataset
from lightclip.distillation import DistillationTeacher, build_teacher_embeddings
from lightclip.images import load_rgb_image
from lightclip.neighbors import FeatureBank, build_feature_bank

# ---------------------------------------------------------------------------------------------- banks and stores


@pytest.fixture
def text_npy(tmp_path):
    path = tmp_path / "text.npy"
    np.save(path, torch.nn.functional.normalize(torch.randn(24, 6, generator=torch.Generator().manual_seed(0)),
                                                dim=-1).numpy())
    return str(path)


def _bank_args(folder, **options):
    defaults = dict(objectives="clip-ping", neighbors=str(folder), output_dir=str(folder.parent / "run"),
                    image_teacher=None, text_teacher=None, active_teacher=False)
    return types.SimpleNamespace(**{**defaults, **options})


MAIN_PROCESS = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)


def test_the_training_script_refuses_a_bank_of_other_data_or_teachers(tmp_path, text_npy):
    pretrain = load_script("examples/pretrain.py")
    folder = tmp_path / "bank"
    dataset = _tiny_dataset(24)
    build_feature_bank(dataset, "descriptor:color-hog", text_npy, str(folder), k=2, show_progress=False)
    assert len(pretrain.load_or_build_bank(_bank_args(folder), dataset, MAIN_PROCESS)) == 24
    for other, rows in [(dataset.select(range(20)), 20), (_tiny_dataset(30), 30),
                        (_tiny_dataset(24, caption_prefix="a drawing"), 24)]:
        with pytest.raises(ValueError, match=rf"built on 24 rows \(fingerprint \w+\) of another dataset; this data "
                                             rf"has {rows} rows \(fingerprint \w+\)(.|\n)*Remove the folder or pass a "
                                             r"new --neighbors folder"):
            pretrain.load_or_build_bank(_bank_args(folder), other, MAIN_PROCESS)
    image_npy = tmp_path / "image.npy"
    np.save(image_npy, np.eye(24, 5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"image teacher: built with 'descriptor:color-hog' \(208-d\), requested "
                                         rf"'{image_npy}' \(5-d\)"):
        pretrain.load_or_build_bank(_bank_args(folder, image_teacher=str(image_npy)), dataset, MAIN_PROCESS)
    bank = pretrain.load_or_build_bank(_bank_args(folder, image_teacher="descriptor:color-hog", text_teacher=text_npy),
                                       dataset, MAIN_PROCESS)
    assert (bank.image_dim, bank.text_dim) == (208, 6)


def test_a_bank_that_records_no_dataset_is_refused(tmp_path, text_npy):
    folder = tmp_path / "bank"
    dataset = _tiny_dataset(24)
    build_feature_bank(dataset, "descriptor:color-hog", text_npy, str(folder), k=2, show_progress=False)
    metadata = json.loads((folder / "bank.json").read_text())
    assert metadata["n"] == 24 and metadata["teachers"]["text"] == {"spec": text_npy, "dim": 6}
    del metadata["n"], metadata["fingerprint"]
    (folder / "bank.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="built on rows it does not record of another dataset; this data has 24 rows"):
        FeatureBank.load(str(folder)).check_dataset(dataset)


def test_a_second_builder_finishing_first_keeps_its_bank(tmp_path, text_npy, monkeypatch):
    """Two builders of one folder: the one that finishes first writes it, the other reads it (the same data and
    teachers) or refuses it (other data), and neither leaves a half-written or temporary folder behind."""
    dataset = _tiny_dataset(24)
    mine = neighbors._mine_bank

    def other_builder_first(winner_data, winner_k, folder=tmp_path / "bank"):
        """The next bank build, once its features are encoded, waits for another builder to write `folder`."""
        def mine_after_the_other_builder(*args, **kwargs):
            monkeypatch.setattr(neighbors, "_mine_bank", mine)
            build_feature_bank(winner_data, "descriptor:color-hog", text_npy, str(folder), k=winner_k,
                               show_progress=False)
            return mine(*args, **kwargs)

        monkeypatch.setattr(neighbors, "_mine_bank", mine_after_the_other_builder)

    other_builder_first(dataset, winner_k=3)
    bank = build_feature_bank(dataset, "descriptor:color-hog", text_npy, str(tmp_path / "bank"), k=2,
                              show_progress=False)
    assert bank.k == 3  # the first to finish wrote the folder
    assert sorted(os.listdir(tmp_path)) == ["bank", "text.npy"]

    other_builder_first(dataset.select(range(20)), winner_k=2, folder=tmp_path / "bank2")
    with pytest.raises(ValueError, match="built on 20 rows .* of another dataset; this data has 24 rows"):
        build_feature_bank(dataset, "descriptor:color-hog", text_npy, str(tmp_path / "bank2"), k=2,
                           show_progress=False)
    assert json.loads((tmp_path / "bank2" / "bank.json").read_text())["n"] == 20  # left as its builder wrote it
    assert sorted(os.listdir(tmp_path)) == ["bank", "bank2", "text.npy"]


def test_a_teacher_store_names_the_rows_it_was_built_on(tmp_path, processor):
    teacher = DistillationTeacher.from_pretrained(save_clip_teacher(tmp_path / "clip"), processor.image_processor,
                                                  local_files_only=True)
    rows, folder = make_rows(5), str(tmp_path / "store")
    store = build_teacher_embeddings(rows, teacher, processor, folder, show_progress=False)
    assert store.metadata["n"] == 5 and store.metadata["dims"] == {"image": 24, "text": 24}
    assert store.metadata["teacher"]["spec"] == teacher.name
    store.check_dataset(rows)
    with pytest.raises(ValueError, match=r"built on 5 rows \(fingerprint \w+\) of another dataset; this data has 4 "
                                         r"rows(.|\n)*--distill_embeddings"):
        store.check_dataset(rows[:4], rebuild="Pass another --distill_embeddings folder.")
    pretrain = load_script("examples/pretrain.py")
    args = pretrain.parse_args(["--model", "lightclip-xxs", "--objectives", "clip,kd", "--distill_embeddings", folder])
    config, student_processor = pretrain.build_config_and_processor(args)
    accelerator = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, device="cpu")
    with pytest.raises(ValueError, match="this data has 6 rows(.|\n)*examples/precompute_teacher.py(.|\n)*"
                                         "--distill_embeddings"):
        pretrain.load_distillation_teacher(args, config, student_processor, make_rows(6), accelerator)


# ---------------------------------------------------------------------------------------------- pictures


def test_a_huge_picture_is_kept_at_a_bounded_size(tmp_path):
    from lightclip.images import MAX_IMAGE_SIDE, _open_image

    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(tmp_path / "huge.png")
    Image.new("RGB", (6000, 4000), (30, 200, 30)).save(tmp_path / "huge.jpg", quality=90)
    Image.new("RGB", (40, 30), (30, 30, 200)).save(tmp_path / "small.png")
    (tmp_path / "pairs.csv").write_text("file_name,text\nhuge.png,a red field\nhuge.jpg,a green field\n"
                                        "small.png,a blue card\n")
    dataset = load_image_text_dataset(str(tmp_path / "pairs.csv"))
    decoded = decode_images_once(dataset, max_bytes=2**30)
    sizes = [decoded[i]["image"].size for i in range(3)]
    assert sizes == [(MAX_IMAGE_SIDE, 683), (MAX_IMAGE_SIDE, 683), (40, 30)]
    assert max(len(decoded[i]["image"].tobytes()) for i in range(3)) <= MAX_IMAGE_SIDE ** 2 * 3
    assert decoded[0]["image"].getpixel((500, 300)) == (200, 30, 30)
    assert _open_image(str(tmp_path / "huge.jpg"), MAX_IMAGE_SIDE).size == (1500, 1000)  # decoded at 1/4 scale
    assert load_rgb_image(str(tmp_path / "huge.png")).size == (6000, 4000)  # unbounded unless asked
    # the collator decodes the same bounded pictures, so kept and undecoded data give the same batches
    batches = [ImageTextCollator(FakeProcessor(), train=True, image_size=16, seed=1)([rows[i] for i in range(3)])
               for rows in (dataset, decoded)]
    assert torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])


# ---------------------------------------------------------------------------------------------- metadata and shards


def test_a_non_utf8_metadata_line_names_the_file_and_line(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "a cat"}\n'
                                            b'{"file_name": "b.png", "text": "a caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 2: not UTF-8 \(byte 0xe9"):
        load_image_text_dataset(str(folder))


def _png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value, 100, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path, first: int, count: int) -> None:
    with tarfile.open(path, "w") as tar:
        for k in range(first, first + count):
            for extension, payload in (("png", _png_bytes(k)), ("txt", f"picture {k}".encode())):
                info = tarfile.TarInfo(f"{k:04d}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _cut(path, keep_samples: int) -> None:
    """Cut a shard inside the image of sample `keep_samples` (0-based): the samples before it stay whole."""
    with tarfile.open(path) as tar:
        image = [m for m in tar.getmembers() if m.name.endswith(".png")][keep_samples]
    data = path.read_bytes()
    path.write_bytes(data[: image.offset_data + image.size // 2])


def test_a_truncated_shard_warns_and_counts_its_lost_tail(tmp_path, caplog):
    from lightclip.collate import TRUNCATED_SHARD

    _shard(tmp_path / "part-0.tar", 0, 8)
    _shard(tmp_path / "part-1.tar", 8, 4)
    _cut(tmp_path / "part-0.tar", keep_samples=5)
    with caplog.at_level(logging.WARNING, logger="lightclip.shards"):
        dataset = load_image_text_dataset(str(tmp_path / "part-{0..1}.tar"))
    assert "part-0.tar is cut short or corrupt after 5 samples" in caplog.text
    rows = list(dataset)
    assert [r["index"] for r in rows] == list(range(9))
    assert [r["captions"] for r in rows][4:6] == [["picture 4"], ["picture 8"]]
    counter = SkipCounter()
    batch = ImageTextCollator(FakeProcessor(), train=False, image_size=16, skip_counter=counter)(rows)
    assert batch["index"].tolist() == list(range(9))  # every whole sample is used
    assert counter.summary() == {TRUNCATED_SHARD: 1}
    assert counter.examples[TRUNCATED_SHARD] == [str(tmp_path / "part-0.tar")]


def test_a_truncated_shard_is_counted_in_the_results_of_a_run(tmp_path):
    _shard(tmp_path / "part-0.tar", 0, 6)
    _shard(tmp_path / "part-1.tar", 6, 4)
    _cut(tmp_path / "part-0.tar", keep_samples=4)
    out = tmp_path / "out"
    proc = run_script(["--output_dir", str(out), "--train_data", str(tmp_path / "part-{0..1}.tar"),
                       "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--objectives", "clip",
                       "--eval_steps", "0"])
    assert "part-0.tar is cut short or corrupt after 4 samples" in proc.stdout + proc.stderr
    skipped = json.loads((out / "eval_results.json").read_text())["skipped"]
    assert skipped == {"lost tail of a truncated tar shard": 1}


def test_an_unreadable_tar_names_its_file(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar archive " * 64)
    with pytest.raises(tarfile.ReadError, match=r"junk.tar is not a readable tar shard"):
        load_image_text_dataset(str(tmp_path / "junk.tar"))
    _shard(tmp_path / "cut.tar", 0, 3)
    _cut(tmp_path / "cut.tar", keep_samples=0)
    with pytest.raises(tarfile.ReadError, match=r"cut.tar is cut short or corrupt before its first whole sample"):
        load_image_text_dataset(str(tmp_path / "cut.tar"))
