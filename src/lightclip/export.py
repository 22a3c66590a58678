"""ONNX export of a lightclip dual encoder: one graph per tower, plus everything a runtime needs to preprocess.

`export_onnx(model_dir, output_dir)` writes

- `image_encoder.onnx`: `pixel_values` `(batch, 3, S, S)` float32 -> `image_embeds` `(batch, D)`, L2-normalised;
- `text_encoder.onnx`: `input_ids`, `attention_mask` `(batch, length)` int64 -> `text_embeds` `(batch, D)`,
  L2-normalised; `length` may be anything from 1 to the context length;
- `preprocessing.json`: image size, resize / crop, rescale, mean / std, tokenizer file, context length, special ids,
  how over-long text is cut (keeping the end-of-text token), and the logit scale;
- the tokenizer (`tokenizer.json`, `tokenizer_config.json`) and image processor (`preprocessor_config.json`) files;
- with `int8`, quantised copies of both graphs (`*.int8.onnx`): a CNN image graph statically (calibrated on real
  preprocessed images, see `calibration_images_for`), a ViT image graph and the text graph dynamically;
  `preprocessing.json` records which, and the calibration images.

Both graphs compute `LightClipModel.encode_image` / `encode_text` (the last layer runs for the pooled token only).
torch 2.13's default exporter (`dynamo=True`) needs `onnxscript`, which lightclip does not depend on; the TorchScript
exporter (`dynamo=False`) needs nothing beyond torch and gives graphs that match eager PyTorch to ~1e-6. The text
graph is traced on a padded batch, so its attention masking is always in the graph (an unpadded batch gives the same
result through it).

The same two towers as ExecuTorch programs for phones: `lightclip.export_executorch`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
PREPROCESSING_FILE = "preprocessing.json"
INT8_SUFFIX = ".int8.onnx"
DEFAULT_OPSET = 17
INT8_MODES = ("auto", "static", "dynamic")
# Calibration images for static quantisation: a few hundred settle the activation ranges of the shipped CNN towers.
CALIBRATION_SIZE = 256
TRAIN_CONFIG_FILE = "train_config.json"  # the training arguments, written by examples/pretrain.py
TOWERS = ("image_encoder", "text_encoder")

logger = logging.getLogger(__name__)


class ImageEncoder(nn.Module):
    """`pixel_values -> encode_image(pixel_values)` as a module to trace."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextEncoder(nn.Module):
    """`(input_ids, attention_mask) -> encode_text(input_ids, attention_mask)` as a module to trace."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


def preprocessing_spec(model, processor) -> dict:
    """What a runtime must do to turn a picture and a string into the graphs' inputs (written as preprocessing.json)."""
    image_processor = processor.image_processor
    text = model.config.text_config
    size = image_processor.size
    crop = image_processor.crop_size
    return {
        "image": {
            "input_name": "pixel_values",
            "layout": "NCHW float32, RGB",
            "image_size": model.config.vision_config.image_size,
            "convert_rgb": "8-bit RGB; transparency composited on white (lightclip.processing_lightclip.to_rgb8)",
            "resize_shortest_edge": size.get("shortest_edge"),
            "resample": "bicubic" if int(image_processor.resample) == 3 else int(image_processor.resample),
            "center_crop": [crop["height"], crop["width"]] if image_processor.do_center_crop else None,
            "rescale_factor": image_processor.rescale_factor,
            "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std),
            "order": "convert_rgb -> resize shortest edge -> center crop -> x * rescale_factor -> (x - mean) / std",
        },
        "text": {
            "input_names": ["input_ids", "attention_mask"],
            "dtype": "int64",
            "tokenizer_file": "tokenizer.json",
            "context_length": text.max_position_embeddings,
            "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id,
            "pad_token_id": text.pad_token_id,
            "lowercase": True,
            "padding": "right, with pad_token_id and attention_mask 0",
            "truncation": (
                f"at most context_length tokens, end-of-text kept: tokenize with truncation to context_length "
                f"(tokenizer.json's post-processor adds [CLS] ... [SEP] after cutting), i.e. a text longer than "
                f"context_length becomes its first context_length - 1 tokens followed by eos_token_id "
                f"{text.eos_token_id}, as LightClipModel does inside. The graph rejects longer input."
            ),
            "pooling": "hidden state at the first eos_token_id",
        },
        "outputs": {
            "image_embeds": "(batch, projection_dim) L2-normalised",
            "text_embeds": "(batch, projection_dim) L2-normalised",
            "projection_dim": model.config.projection_dim,
            "logit_scale": float(model.logit_scale_exp().detach()),
            "zero_shot": "softmax(logit_scale * image_embeds @ text_embeds.T, axis=-1)",
        },
        "files": {"image_encoder": IMAGE_FILE, "text_encoder": TEXT_FILE},
    }


def example_text(config, tokenizer=None) -> dict[str, torch.Tensor]:
    """Two texts of different lengths, padded: the traced graph then carries the masking path."""
    text = config.text_config
    if tokenizer is not None:
        texts = ["a red circle", "two small blue squares to the left of a large green star on a white background"]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=text.max_position_embeddings,
                          return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
    else:
        ids = torch.tensor([[text.bos_token_id, 10, 11, 12, text.eos_token_id],
                            [text.bos_token_id, 13, text.eos_token_id, text.pad_token_id, text.pad_token_id]])
        mask = (torch.arange(5)[None] < torch.tensor([[5], [3]])).long()
    if bool(mask.all()):
        raise AssertionError("the example text batch must contain padding")
    return {"input_ids": ids, "attention_mask": mask}


def example_pixels(config) -> torch.Tensor:
    """A batch of two random pictures at the tower's size (more than one, so the batch axis stays symbolic)."""
    vision = config.vision_config
    return torch.randn(2, vision.num_channels, vision.image_size, vision.image_size,
                       generator=torch.Generator().manual_seed(0))


def inference_copy(model, memory_format: torch.memory_format | None = None):
    """A float32, eval-mode, fused copy of `model` to export (`LightClipModel.fuse`: no BatchNorm or Pad nodes in a
    CNN graph), so the caller's model stays trainable and savable; `memory_format` re-lays a CNN tower's weights."""
    model = copy.deepcopy(model).float().eval().fuse()
    if memory_format is not None and model.config.vision_config.backbone != "vit":
        model.vision_model.memory_format = memory_format
        model.vision_model.to(memory_format=memory_format)
    return model


def int8_methods(config, int8: bool | str) -> dict[str, str]:
    """The quantisation method of each graph ("static" or "dynamic"; empty when `int8` is False).

    `int8=True` or "auto": a CNN image graph static, everything else dynamic. Dynamic quantisation of a CNN's
    convolutions (activation ranges taken per tensor at run time, through every depthwise stage) bent the shipped
    EfficientNet-Lite0 embeddings to cosine 0.86, so "dynamic" keeps a CNN's convolutions in float32 and quantises its
    projection only. "static" is for CNN image towers only: the ViT and the text tower stay dynamic (their matrix
    products quantise well at run time and need no calibration data)."""
    if int8 is False or int8 is None:
        return {}
    mode = "auto" if int8 is True else int8
    if mode not in INT8_MODES:
        raise ValueError(f"int8 must be a bool or one of {INT8_MODES}, not {int8!r}")
    cnn = config.vision_config.backbone != "vit"
    if mode == "static" and not cnn:
        raise ValueError("int8='static' quantises CNN image towers; a ViT is quantised dynamically (int8='auto')")
    return {"image_encoder": "static" if cnn and mode != "dynamic" else "dynamic", "text_encoder": "dynamic"}


def _quantize_dynamic(source: Path, target: Path, cnn_image: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"] if cnn_image else None  # a CNN keeps its convolutions float (see `int8_methods`)
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=ops)


def _quantize_static(source: Path, target: Path, pixel_values: np.ndarray, batch_size: int = 32) -> None:
    """QDQ int8 with per-channel weights; activation ranges from `pixel_values` (MinMax).

    Weights use 7 bits (`reduce_range`): on x86 CPUs without VNNI, onnxruntime multiplies uint8 activations by int8
    weights through int16 pair sums that saturate. With full-range weights the Lite0 image embeddings of the shipped
    checkpoint fell to a minimum cosine of 0.65 to float32 on the shapes test split; with 7-bit weights, 0.93."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(pixel_values[i : i + batch_size] for i in range(0, len(pixel_values), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"pixel_values": batch}

    quantize_static(
        str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )


def export_towers(model, output_dir: str | os.PathLike, opset: int = DEFAULT_OPSET, tokenizer=None,
                  check: bool = True, int8: bool | str = False, calibration: Any = None) -> dict[str, Path]:
    """Write `image_encoder.onnx` and `text_encoder.onnx` for an in-memory `LightClipModel` (exported from a float32,
    eval-mode, fused copy; `model` itself is left as it is).

    `tokenizer` only supplies a realistic traced example; any padded batch gives the same graph. With `int8` (True,
    "auto", "static" or "dynamic", see `int8_methods`), also `image_encoder.int8.onnx` and `text_encoder.int8.onnx`,
    no longer bit-close to PyTorch: measure their accuracy (`examples/export_onnx.py --evaluate`). Static quantisation
    needs `calibration`: preprocessed `pixel_values` `(N, 3, S, S)` of real images like those the model will see."""
    if opset < 17:
        raise ValueError("opset must be >= 17 (LayerNormalization is an ONNX op from 17 on)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = inference_copy(model)
    pixels = example_pixels(model.config)
    text = example_text(model.config, tokenizer)
    paths = {"image_encoder": output_dir / IMAGE_FILE, "text_encoder": output_dir / TEXT_FILE}
    common = dict(dynamo=False, opset_version=opset, do_constant_folding=True)
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter's deprecation notice and its tracer warnings about Python-side shape checks
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ImageEncoder(model), (pixels,), str(paths["image_encoder"]), input_names=["pixel_values"],
            output_names=["image_embeds"], dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            **common,
        )
        torch.onnx.export(
            TextEncoder(model), (text["input_ids"], text["attention_mask"]), str(paths["text_encoder"]),
            input_names=["input_ids", "attention_mask"], output_names=["text_embeds"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "text_embeds": {0: "batch"}},
            **common,
        )
    if check:
        import onnx

        for path in paths.values():
            onnx.checker.check_model(str(path))
    cnn = model.config.vision_config.backbone != "vit"
    for name, method in int8_methods(model.config, int8).items():
        target = output_dir / (name + INT8_SUFFIX)
        if method == "static":
            if calibration is None:
                raise ValueError("static int8 needs calibration pixel_values (or int8='dynamic')")
            _quantize_static(paths[name], target, np.asarray(calibration, dtype=np.float32))
        else:
            _quantize_dynamic(paths[name], target, cnn_image=cnn and name == "image_encoder")
        paths[name + "_int8"] = target
    return paths


def load_calibration_images(source: str, num_images: int = CALIBRATION_SIZE, *, split: str = "train",
                            config_name: str | None = None, image_column: str | None = None,
                            shapes_image_size: int = 64) -> list:
    """The first `num_images` images of a data source, as RGB images; unreadable ones are skipped (and logged).

    `source` is anything `--train_data` takes (`lightclip.data.load_image_text_dataset`: "shapes", an image folder, a
    .csv / .jsonl file, tar shards, a hub dataset name); captions are not needed. For "shapes", the pictures of a
    `num_images`-picture train split."""
    from .data import load_image_text_dataset
    from .images import UnreadableImageError, load_rgb_image

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, not {num_images}")
    dataset = load_image_text_dataset(source, split, config_name=config_name, image_column=image_column,
                                      max_samples=num_images, shapes_size=num_images,
                                      shapes_image_size=shapes_image_size, require_captions=False)
    images, unreadable = [], 0
    for row in dataset:
        try:
            images.append(load_rgb_image(row["image"]))
        except UnreadableImageError:
            unreadable += 1
    if unreadable:
        logger.warning("calibration: %d unreadable images of %s skipped", unreadable, source)
    if not images:
        raise ValueError(f"no readable calibration images in {source!r} (split {split!r})")
    return images


def training_data(model_dir: str | os.PathLike) -> dict | None:
    """The training data source of a saved model, from the `train_config.json` of its folder (or of its hub repository
    in the local cache) as `load_calibration_images` keywords, or None."""
    path = Path(model_dir) / TRAIN_CONFIG_FILE
    if not path.is_file():
        if os.path.isdir(model_dir):
            return None
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(model_dir), TRAIN_CONFIG_FILE)
        except ValueError:  # not a repository id
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    args = json.loads(path.read_text(encoding="utf-8"))
    if not args.get("train_data"):
        return None
    return {"source": args["train_data"], "split": args.get("train_split") or "train",
            "config_name": args.get("dataset_config_name"), "image_column": args.get("image_column"),
            "shapes_image_size": args.get("shapes_image_size") or 64}


@contextlib.contextmanager
def _hub_offline():
    """`datasets` and `huggingface_hub` in offline mode (their `HF_HUB_OFFLINE`, read once at import): a hub dataset
    loads from the local cache or fails; nothing is downloaded."""
    from unittest import mock

    import datasets
    import huggingface_hub

    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
            mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
        yield


def calibration_images_for(model_dir: str | os.PathLike, calibration_data: str | None = None,
                           num_images: int = CALIBRATION_SIZE) -> tuple[list, dict]:
    """(images, record) to calibrate the static int8 image graph of the model saved in `model_dir`.

    The images come from `calibration_data` (any `--train_data` source) when given; else from the training data named
    in the folder's `train_config.json` (written by examples/pretrain.py) when it loads offline; else, with a WARNING,
    from the shapes train split, which suits the shipped checkpoints only. `record` (the "calibration" of the image
    graph's "quantization" entry in preprocessing.json) names the data, split, number of images and why."""
    if calibration_data is not None:
        return _calibration(num_images, "calibration_data", source=calibration_data)
    training = training_data(model_dir)
    if training is None:
        problem = f"{model_dir} has no {TRAIN_CONFIG_FILE} naming its training data"
    else:
        try:
            with _hub_offline():
                return _calibration(num_images, TRAIN_CONFIG_FILE, **training)
        except Exception as error:  # missing files, a hub dataset not in the cache, no readable image, ...
            problem = f"its training data {training['source']!r} ({TRAIN_CONFIG_FILE}) does not load offline: {error}"
    logger.warning(
        "static int8: the image graph's activation ranges come from the lightclip-shapes train pictures, because %s. "
        "They suit the shipped shapes checkpoints only: for a model trained on other data, pass a few hundred images "
        "of its domain with examples/export_onnx.py --calibration_data DATA (anything --train_data takes; "
        "export_onnx(calibration_data=...) from Python).", problem)
    return _calibration(num_images, f"fallback: {problem}", source="shapes")


def _calibration(num_images: int, chosen_by: str, **spec) -> tuple[list, dict]:
    images = load_calibration_images(num_images=num_images, **spec)
    return images, {"data": spec["source"], "split": spec.get("split", "train"), "num_images": len(images),
                    "chosen_by": chosen_by}


def quantization_spec(config, methods: dict[str, str], calibration: dict | None = None) -> dict[str, dict]:
    """How each `*.int8.onnx` graph was quantised (the "quantization" entry of preprocessing.json)."""
    spec = {}
    for name, method in methods.items():
        entry = {"file": name + INT8_SUFFIX, "method": method}
        if method == "static":
            entry.update(format="QDQ", weights="int8, per output channel, 7-bit range",
                         activations="uint8, per tensor, MinMax ranges of the calibration images",
                         calibration=calibration)
        else:
            entry.update(weights="int8, per tensor", activations="uint8, range of each batch at run time")
            if name == "image_encoder" and config.vision_config.backbone != "vit":
                entry["quantized_ops"] = "MatMul, Gemm (the convolutions stay float32)"
        spec[name] = entry
    return spec


def export_onnx(model_dir: str | os.PathLike, output_dir: str | os.PathLike, opset: int = DEFAULT_OPSET,
                check: bool = True, int8: bool | str = False, calibration_images: Sequence | None = None,
                calibration_data: str | None = None, num_calibration_images: int = CALIBRATION_SIZE
                ) -> dict[str, Path]:
    """Export both towers of a saved lightclip folder to ONNX (see the module docstring). Returns the written paths.

    Static int8 (`int8` True or "auto" for a CNN image tower, or "static") calibrates on `calibration_images` (PIL
    images), else on the first `num_calibration_images` images of `calibration_data` (anything `--train_data`
    takes), else of the model's training data (`calibration_images_for`), all preprocessed by the folder's processor.
    """
    from . import LightClipModel, LightClipProcessor

    if opset < 17:
        raise ValueError("opset must be >= 17 (LayerNormalization is an ONNX op from 17 on)")
    model = LightClipModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = LightClipProcessor.from_pretrained(model_dir)
    methods = int8_methods(model.config, int8)
    pixel_values, calibration = None, None
    if calibration_data is not None and "static" not in methods.values():
        logger.warning("calibration_data %r unused: no graph is quantised statically (int8=%r)", calibration_data, int8)
    if "static" in methods.values():
        if calibration_images is None:
            calibration_images, calibration = calibration_images_for(model_dir, calibration_data,
                                                                     num_calibration_images)
        else:
            calibration = {"data": "calibration_images passed to export_onnx", "num_images": len(calibration_images)}
        pixel_values = processor(images=list(calibration_images), return_tensors="np")["pixel_values"]
    paths = export_towers(model, output_dir, opset=opset, tokenizer=processor.tokenizer, check=check, int8=int8,
                          calibration=pixel_values)
    output_dir = Path(output_dir)
    spec = preprocessing_spec(model, processor)
    spec["source"] = {"model": str(model_dir), "opset": opset, "torch": torch.__version__}
    if methods:
        spec["files"].update(image_encoder_int8=IMAGE_FILE[:-5] + INT8_SUFFIX,
                             text_encoder_int8=TEXT_FILE[:-5] + INT8_SUFFIX)
        spec["quantization"] = quantization_spec(model.config, methods, calibration)
    paths["preprocessing"] = save_preprocessing(spec, processor, output_dir)
    return paths


def save_preprocessing(spec: dict, processor, output_dir: Path) -> Path:
    """Write preprocessing.json and the tokenizer and image processor files beside the exported towers."""
    path = output_dir / PREPROCESSING_FILE
    path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    processor.tokenizer.save_pretrained(output_dir)
    processor.image_processor.save_pretrained(output_dir)
    return path


class OnnxClip:
    """Both exported towers in onnxruntime, with numpy in and out.

    Example:

    ```python
    >>> clip = OnnxClip("exported/")                                    # doctest: +SKIP
    >>> clip.encode_image(pixel_values).shape                           # doctest: +SKIP
    (2, 64)
    ```
    """

    def __init__(self, export_dir: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None,
                 int8: bool = False):
        import onnxruntime as ort

        export_dir = Path(export_dir)
        image_file, text_file = (IMAGE_FILE, TEXT_FILE) if not int8 else (
            IMAGE_FILE[:-5] + INT8_SUFFIX, TEXT_FILE[:-5] + INT8_SUFFIX)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.image_session = ort.InferenceSession(str(export_dir / image_file), options, providers=providers)
        self.text_session = ort.InferenceSession(str(export_dir / text_file), options, providers=providers)
        spec = export_dir / PREPROCESSING_FILE
        self.preprocessing = json.loads(spec.read_text(encoding="utf-8")) if spec.is_file() else None

    def encode_image(self, pixel_values):
        return self.image_session.run(None, {"pixel_values": np.asarray(pixel_values, dtype=np.float32)})[0]

    def encode_text(self, input_ids, attention_mask):
        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.text_session.run(None, feed)[0]


class OnnxClipForEvaluation:
    """An `OnnxClip` (or `ExecuTorchClip`) behind `LightClipModel`'s `encode_image` / `encode_text` (tensors in and
    out), so that `lightclip.evaluation` and `lightclip.shapes.evaluate_shapes` score exported graphs with the code and
    protocol they score the eager model with.

    Example:

    ```python
    >>> from lightclip.shapes import evaluate_shapes
    >>> evaluate_shapes(OnnxClipForEvaluation(OnnxClip("exported/", int8=True)), processor)  # doctest: +SKIP
    ```
    """

    def __init__(self, clip: OnnxClip | Any):  # or `export_executorch.ExecuTorchClip`: the same interface
        self.clip = clip

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if not normalize:
            raise ValueError("the exported image graph returns L2-normalised embeddings only")
        return torch.from_numpy(self.clip.encode_image(pixel_values.cpu().numpy()))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        if not normalize:
            raise ValueError("the exported text graph returns L2-normalised embeddings only")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return torch.from_numpy(self.clip.encode_text(input_ids.cpu().numpy(), attention_mask.cpu().numpy()))


__all__ = [
    "OnnxClip", "OnnxClipForEvaluation", "calibration_images_for", "export_onnx", "export_towers", "int8_methods",
    "load_calibration_images", "preprocessing_spec", "quantization_spec", "training_data",
]
