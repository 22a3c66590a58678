"""ONNX export of a lightclip dual encoder: one graph per tower, plus everything a runtime needs to preprocess.

`export_onnx(model_dir, output_dir)` writes

- `image_encoder.onnx`: `pixel_values` `(batch, 3, S, S)` float32 -> `image_embeds` `(batch, D)`, L2-normalised;
- `text_encoder.onnx`: `input_ids`, `attention_mask` `(batch, length)` int64 -> `text_embeds` `(batch, D)`,
  L2-normalised; `length` may be anything from 1 to the context length;
- `preprocessing.json`: image size, resize / crop, rescale, mean / std, tokenizer file, context length, special ids,
  how over-long text is cut (keeping the end-of-text token), and the logit scale;
- the tokenizer (`tokenizer.json`, `tokenizer_config.json`) and image processor (`preprocessor_config.json`) files;
- with `int8=True`, dynamically quantised copies of both graphs (`*.int8.onnx`, about 2x faster on CPU).

Both graphs compute `LightClipModel.encode_image` / `encode_text` (the last layer runs for the pooled token only).
torch 2.13's default exporter (`dynamo=True`) needs `onnxscript`, which lightclip does not depend on; the TorchScript
exporter (`dynamo=False`) needs nothing beyond torch and gives graphs that match eager PyTorch to ~1e-6. The text
graph is traced on a padded batch, so its attention masking is always in the graph (an unpadded batch gives the same
result through it).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
PREPROCESSING_FILE = "preprocessing.json"
INT8_SUFFIX = ".int8.onnx"
DEFAULT_OPSET = 17


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
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
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


def _example_text(config, tokenizer=None) -> dict[str, torch.Tensor]:
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


def export_towers(model, output_dir: str | os.PathLike, opset: int = DEFAULT_OPSET, tokenizer=None,
                  check: bool = True, int8: bool = False) -> dict[str, Path]:
    """Write `image_encoder.onnx` and `text_encoder.onnx` for an in-memory `LightClipModel` (exported from a float32,
    eval-mode, fused copy; `model` itself is left as it is).

    `tokenizer` only supplies a realistic traced example; any padded batch gives the same graph. With `int8=True`,
    also `image_encoder.int8.onnx` and `text_encoder.int8.onnx`: onnxruntime's dynamic quantisation (int8 weights,
    activations quantised per batch at run time), about 2x faster on CPU and no longer bit-close to PyTorch. A CNN
    image tower keeps its convolutions in float32 (only its projection is quantised)."""
    if opset < 17:
        raise ValueError("opset must be >= 17 (LayerNormalization is an ONNX op from 17 on)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # a fused copy (`LightClipModel.fuse`): no BatchNorm or Pad nodes in a CNN graph, and the caller's model stays
    # trainable and savable
    model = copy.deepcopy(model).float().eval().fuse()
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, model.config.vision_config.num_channels, size, size,
                         generator=torch.Generator().manual_seed(0))
    text = _example_text(model.config, tokenizer)
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
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Dynamic quantisation of a CNN's convolutions (activations quantised per tensor at run time, through every
        # depthwise stage) bent the shipped EfficientNet-Lite0 embeddings to cosine 0.86: a CNN tower keeps them float.
        cnn = model.config.vision_config.backbone != "vit"
        for name in ("image_encoder", "text_encoder"):
            target = output_dir / (name + INT8_SUFFIX)
            ops = ["MatMul", "Gemm"] if cnn and name == "image_encoder" else None
            quantize_dynamic(str(paths[name]), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=ops)
            paths[name + "_int8"] = target
    return paths


def export_onnx(model_dir: str | os.PathLike, output_dir: str | os.PathLike, opset: int = DEFAULT_OPSET,
                check: bool = True, int8: bool = False) -> dict[str, Path]:
    """Export both towers of a saved lightclip folder to ONNX (see the module docstring). Returns the written paths."""
    from . import LightClipModel, LightClipProcessor

    if opset < 17:
        raise ValueError("opset must be >= 17 (LayerNormalization is an ONNX op from 17 on)")
    model = LightClipModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = LightClipProcessor.from_pretrained(model_dir)
    paths = export_towers(model, output_dir, opset=opset, tokenizer=processor.tokenizer, check=check, int8=int8)
    output_dir = Path(output_dir)
    spec = preprocessing_spec(model, processor)
    spec["source"] = {"model": str(model_dir), "opset": opset, "torch": torch.__version__}
    if int8:
        spec["files"].update(image_encoder_int8=IMAGE_FILE[:-5] + INT8_SUFFIX, text_encoder_int8=TEXT_FILE[:-5] + INT8_SUFFIX)
    paths["preprocessing"] = output_dir / PREPROCESSING_FILE
    paths["preprocessing"].write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    processor.tokenizer.save_pretrained(output_dir)
    processor.image_processor.save_pretrained(output_dir)
    return paths


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
        import numpy as np

        return self.image_session.run(None, {"pixel_values": np.asarray(pixel_values, dtype=np.float32)})[0]

    def encode_text(self, input_ids, attention_mask):
        import numpy as np

        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.text_session.run(None, feed)[0]


__all__ = ["OnnxClip", "export_onnx", "export_towers", "preprocessing_spec"]
