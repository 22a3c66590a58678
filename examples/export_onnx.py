#!/usr/bin/env python
"""Export a saved lightclip model to two ONNX graphs (image tower, text tower) with their preprocessing.

    python examples/export_onnx.py --model checkpoints/lightclip-xxs-lite0-shapes --output exported/lightclip-xxs-lite0-shapes

Writes image_encoder.onnx, text_encoder.onnx, preprocessing.json and the tokenizer / image processor files; with
--verify (default on) it also runs both graphs in onnxruntime on random inputs and prints the largest absolute
difference from eager PyTorch. See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved lightclip folder (or a hub id in the local cache)")
    parser.add_argument("--output", required=True, help="folder for the ONNX files")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    parser.add_argument("--no_verify", action="store_true", help="skip the onnxruntime parity check")
    parser.add_argument("--int8", action="store_true",
                        help="also write dynamically quantised graphs (*.int8.onnx): ~2x faster on CPU, cosine ~0.999")
    return parser.parse_args(argv)


def verify(model_dir: str, output_dir: str, batch: int = 3) -> dict[str, float]:
    """Max abs difference of the ONNX Runtime embeddings from `LightClipModel.encode_*` on random inputs."""
    import torch

    from lightclip import LightClipModel, LightClipProcessor
    from lightclip.export import OnnxClip

    model = LightClipModel.from_pretrained(model_dir).eval()
    tokenizer = LightClipProcessor.from_pretrained(model_dir).tokenizer
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    texts = ["a shape", "a small red circle above a large blue square", "a green star"][:batch]
    text = tokenizer(texts, padding=True, return_tensors="pt")
    clip = OnnxClip(output_dir)
    with torch.no_grad():
        image_ref = model.encode_image(pixels).numpy()
        text_ref = model.encode_text(text["input_ids"], text["attention_mask"]).numpy()
    image = clip.encode_image(pixels.numpy())
    text_out = clip.encode_text(text["input_ids"].numpy(), text["attention_mask"].numpy())
    return {"image_max_abs_diff": float(abs(image - image_ref).max()),
            "text_max_abs_diff": float(abs(text_out - text_ref).max())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import lightclip  # noqa: F401  (registers the model type)
    from lightclip.export import export_onnx

    paths = export_onnx(args.model, args.output, opset=args.opset, int8=args.int8)
    for name, path in paths.items():
        print(f"{name:15s} {path} ({path.stat().st_size / 1e6:.2f} MB)")
    result = {name: str(path) for name, path in paths.items()}
    if not args.no_verify:
        diffs = verify(args.model, args.output)
        print(f"onnxruntime vs PyTorch: image max abs diff {diffs['image_max_abs_diff']:.2e}, "
              f"text max abs diff {diffs['text_max_abs_diff']:.2e}")
        result.update(diffs)
        if max(diffs.values()) > 1e-4:
            print("parity check FAILED (> 1e-4)", file=sys.stderr)
            sys.exit(1)
    return result


if __name__ == "__main__":
    main()
