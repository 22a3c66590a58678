"""ExecuTorch export (XNNPACK): the .pte towers of a shipped checkpoint pass the ONNX export's parity tests (imported
from test_export and run against them as they are: any batch and text length, padded or not, over-long text,
preprocessing.json), also above the programs' batch bound, and a ViT image tower exports as well. Skipped without the
`executorch` extra."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime", reason="ExecuTorch export needs the executorch extra: "
                                                  "pip install 'lightclip[executorch]'")

from conftest import load_script  # noqa: E402
from test_export import (  # noqa: E402,F401  (the test_* functions run here against the ExecuTorch programs)
    CHECKPOINTS,
    TOLERANCE,
    VIT,
    checkpoint_dir,
    max_diff,
    test_image_parity,
    test_long_text_truncated_as_preprocessing_json_says,
    test_preprocessing_json_reproduces_the_processor,
    test_text_parity,
)

from lightclip import LightClipModel, LightClipProcessor  # noqa: E402
from lightclip.export import OnnxClipForEvaluation  # noqa: E402
from lightclip.export_executorch import (  # noqa: E402
    EXECUTORCH_MAX_BATCH,
    ExecuTorchClip,
    export_towers_executorch,
)
from lightclip.shapes import evaluate_shapes, make_shapes_dataset  # noqa: E402

CNN = CHECKPOINTS[0]


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory) -> tuple:
    """The shipped CNN checkpoint through `examples/export_onnx.py --format executorch`, which verifies it too."""
    out = tmp_path_factory.mktemp(f"pte-{CNN}")
    result = load_script("examples/export_onnx.py").main(["--model", str(checkpoint_dir(CNN)), "--output", str(out),
                                                          "--format", "executorch"])
    return out, result


@pytest.fixture(scope="module")
def exported(cli_export) -> tuple:
    """test_export's `exported` for the ExecuTorch programs: (folder, out_dir, model, processor, clip)."""
    folder, out_dir = checkpoint_dir(CNN), cli_export[0]
    model = LightClipModel.from_pretrained(folder).eval()
    return folder, out_dir, model, LightClipProcessor.from_pretrained(folder), ExecuTorchClip(out_dir, threads=1)


def test_cli_writes_and_verifies_the_programs(cli_export):
    out, result = cli_export
    assert result["image_max_abs_diff"] < TOLERANCE and result["text_max_abs_diff"] < TOLERANCE
    spec = json.loads((out / "preprocessing.json").read_text())
    assert spec["files"] == {"image_encoder": "image_encoder.pte", "text_encoder": "text_encoder.pte"}
    assert spec["source"]["backend"] == "XNNPACK" and spec["source"]["max_batch_size"] == EXECUTORCH_MAX_BATCH
    assert {p.name for p in out.iterdir()} >= {"image_encoder.pte", "text_encoder.pte", "tokenizer.json",
                                                "preprocessor_config.json"}


def test_batch_above_the_bound_runs_in_slices(exported):
    _, _, model, _, clip = exported
    size = model.config.vision_config.image_size
    pixels = torch.randn(EXECUTORCH_MAX_BATCH + 3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.encode_image(pixels)
    out = clip.encode_image(pixels.numpy())
    assert out.shape == tuple(reference.shape)
    assert max_diff(out, reference) < TOLERANCE


def test_evaluation_adapter_takes_executorch(exported):
    """`OnnxClipForEvaluation` scores the ExecuTorch programs on the shapes benchmark as the eager model scores."""
    _, _, model, processor, clip = exported
    dataset = make_shapes_dataset("test", num_samples=100)
    eager = evaluate_shapes(model, processor, dataset=dataset)
    exported_results = evaluate_shapes(OnnxClipForEvaluation(clip), processor, dataset=dataset)
    for key, value in eager.items():
        assert exported_results[key] == pytest.approx(value, abs=1e-3), key


def test_vit_image_tower(tmp_path):
    """A ViT image tower alone (`towers`); its text tower is the CNN checkpoint's kind, tested above."""
    model = LightClipModel.from_pretrained(checkpoint_dir(VIT)).eval()
    paths = export_towers_executorch(model, tmp_path, towers=("image_encoder",))
    assert set(paths) == {"image_encoder"}
    clip = ExecuTorchClip(tmp_path)
    size = model.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.encode_image(pixels)
    assert max_diff(clip.encode_image(pixels.numpy()), reference) < TOLERANCE
    with pytest.raises(FileNotFoundError, match="text_encoder.pte"):
        clip.encode_text(np.ones((1, 3), dtype=np.int64), np.ones((1, 3), dtype=np.int64))


def test_export_arguments(tmp_path):
    model = LightClipModel.from_pretrained(checkpoint_dir(CNN)).eval()
    with pytest.raises(ValueError, match="towers"):
        export_towers_executorch(model, tmp_path, towers=("vision",))
    with pytest.raises(ValueError, match="max_batch_size"):
        export_towers_executorch(model, tmp_path, max_batch_size=1)
    with pytest.raises(SystemExit):
        load_script("examples/export_onnx.py").parse_args(["--model", "m", "--output", "o", "--format", "executorch",
                                                           "--int8"])
