#!/usr/bin/env python
"""Export a saved lightclip model's two towers (image, text) with their preprocessing, as ONNX graphs or ExecuTorch.

    python examples/export_onnx.py --model checkpoints/lightclip-xxs-lite0-shapes \
        --output exported/lightclip-xxs-lite0-shapes
    python examples/export_onnx.py --model checkpoints/lightclip-xxs-lite0-shapes --output exported/xxs-pte \
        --format executorch
    python examples/export_onnx.py --model checkpoints/lightclip-xxs-lite0-shapes --output exported/xxs --int8 \
        --evaluate --threads 1
    python examples/export_onnx.py --model runs/my-model --output exported/my-model --int8 --calibration_data my_images/

Writes image_encoder.onnx, text_encoder.onnx, preprocessing.json and the tokenizer / image processor files; with
--verify (default on) it also runs both graphs in onnxruntime on random inputs and prints the largest absolute
difference from eager PyTorch. --int8 adds quantised graphs (static for a CNN image tower, calibrated on the first
--num_calibration_images images of --calibration_data, by default of the training data named in the model's
train_config.json, else of the shapes train split with a warning; dynamic otherwise; `--int8 dynamic` or
`--int8 static` to choose). --evaluate scores eager PyTorch, the float32 graphs and the int8 graphs on the shapes test
split with the protocol of `lightclip.shapes.evaluate_shapes` and times the float32 and int8 image graphs side by side.
`--format executorch` writes image_encoder.pte and text_encoder.pte (lowered to XNNPACK, batch up to
--max_batch_size; needs `pip install 'lightclip[executorch]'`) with the same preprocessing files, and verifies them in
ExecuTorch's runtime. See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

FORMATS = ("onnx", "executorch")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved lightclip folder (or a hub id in the local cache)")
    parser.add_argument("--output", required=True, help="folder for the exported files")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="onnx (default): ONNX graphs for onnxruntime; executorch: .pte programs lowered to "
                             "XNNPACK, for ExecuTorch's phone runtimes")
    parser.add_argument("--max_batch_size", type=int, default=None,
                        help="executorch: the largest batch the programs take (default 32: "
                             "lightclip.export_executorch.EXECUTORCH_MAX_BATCH)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    parser.add_argument("--no_verify", action="store_true",
                        help="skip the parity check (in onnxruntime, or ExecuTorch's runtime)")
    parser.add_argument("--int8", nargs="?", const="auto", default=None, choices=["auto", "static", "dynamic"],
                        help="also write int8 graphs (*.int8.onnx); alone: static for a CNN image tower, dynamic "
                             "otherwise")
    parser.add_argument("--calibration_data", default=None,
                        help="static int8: calibration images, any source --train_data takes (an image folder, a "
                             ".csv/.jsonl file, tar shards, a hub dataset name, 'shapes'; captions not needed). "
                             "Default: the training data named in the model's train_config.json when it loads "
                             "offline, else the shapes train split (with a warning)")
    parser.add_argument("--num_calibration_images", type=int, default=None,
                        help="static int8: the first this many images calibrate (default 256: "
                             "lightclip.export.CALIBRATION_SIZE)")
    parser.add_argument("--evaluate", action="store_true",
                        help="zero-shot and retrieval on the shapes test split: eager PyTorch vs the ONNX graphs")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="--evaluate: test pictures (default: the whole split, 500)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: all)")
    parser.add_argument("--repeats", type=int, default=20, help="--evaluate: timed rounds of the image graphs")
    args = parser.parse_args(argv)
    if args.calibration_data is not None and not args.int8:
        parser.error("--calibration_data calibrates int8 graphs: add --int8")
    if args.num_calibration_images is not None and args.num_calibration_images < 1:
        parser.error("--num_calibration_images must be at least 1")
    if args.format == "executorch" and (args.int8 or args.evaluate):
        parser.error("--int8 and --evaluate apply to ONNX graphs (--format onnx)")
    if args.max_batch_size is not None and args.format != "executorch":
        parser.error("--max_batch_size bounds ExecuTorch programs: add --format executorch")
    return args


# (column, evaluate_shapes key): the numbers --evaluate prints
METRICS = (
    ("shape top-1", "shapes/shape/acc1"),
    ("colour top-1", "shapes/colour/acc1"),
    ("I→T R@1", "shapes/retrieval/text_retrieval_recall@1"),
    ("T→I R@1", "shapes/retrieval/image_retrieval_recall@1"),
)


def evaluate(model_dir: str, output_dir: str, dataset, int8: bool, threads: int | None = None
             ) -> dict[str, dict[str, float]]:
    """`evaluate_shapes` of eager PyTorch, the float32 graphs and (with `int8`) the int8 graphs on `dataset`."""
    from lightclip import LightClipModel, LightClipProcessor
    from lightclip.export import OnnxClip, OnnxClipForEvaluation
    from lightclip.shapes import evaluate_shapes

    processor = LightClipProcessor.from_pretrained(model_dir)
    models = {"eager PyTorch": LightClipModel.from_pretrained(model_dir).eval(),
              "ONNX fp32": OnnxClipForEvaluation(OnnxClip(output_dir, threads=threads))}
    if int8:
        models["ONNX int8"] = OnnxClipForEvaluation(OnnxClip(output_dir, threads=threads, int8=True))
    return {name: evaluate_shapes(model, processor, dataset=dataset) for name, model in models.items()}


def accuracy_table(results: dict[str, dict[str, float]]) -> str:
    """The METRICS in percent per backend, and the int8 - fp32 difference in points."""
    rows = {name: {key: f"{100 * metrics[key]:.1f}" for _, key in METRICS} for name, metrics in results.items()}
    if "ONNX int8" in results:
        rows["int8 − fp32"] = {key: f"{100 * (results['ONNX int8'][key] - results['ONNX fp32'][key]):+.1f}"
                               for _, key in METRICS}
    lines = ["| | " + " | ".join(column for column, _ in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells[key] for _, key in METRICS) + " |" for name, cells in rows.items()]
    return "\n".join(lines)


def time_image_graphs(output_dir: str, pixel_values, threads: int | None, repeats: int) -> dict[str, float]:
    """Seconds per batch of the float32 and int8 image graphs, run in alternating order round by round so that a
    drifting machine load hits both alike; `int8_speedup` is the median over rounds of fp32 time / int8 time."""
    from lightclip.export import OnnxClip

    graphs = {"fp32": OnnxClip(output_dir, threads=threads), "int8": OnnxClip(output_dir, threads=threads, int8=True)}
    seconds = {name: [] for name in graphs}
    for round_index in range(repeats + 1):
        order = list(graphs) if round_index % 2 == 0 else list(graphs)[::-1]
        for name in order:
            start = time.perf_counter()
            graphs[name].encode_image(pixel_values)
            if round_index:  # the first round warms up
                seconds[name].append(time.perf_counter() - start)
    speedup = statistics.median(a / b for a, b in zip(seconds["fp32"], seconds["int8"]))
    return {"fp32": statistics.median(seconds["fp32"]), "int8": statistics.median(seconds["int8"]),
            "int8_speedup": speedup}


def verify(model_dir: str, output_dir: str, batch: int = 3, export_format: str = "onnx") -> dict[str, float]:
    """Max abs difference of the exported towers' embeddings (ONNX Runtime, or ExecuTorch for `export_format`
    "executorch") from `LightClipModel.encode_*` on random inputs."""
    import torch

    from lightclip import LightClipModel, LightClipProcessor
    from lightclip.export import OnnxClip
    from lightclip.export_executorch import ExecuTorchClip

    model = LightClipModel.from_pretrained(model_dir).eval()
    tokenizer = LightClipProcessor.from_pretrained(model_dir).tokenizer
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    texts = ["a shape", "a small red circle above a large blue square", "a green star"][:batch]
    text = tokenizer(texts, padding=True, return_tensors="pt")
    clip = ExecuTorchClip(output_dir) if export_format == "executorch" else OnnxClip(output_dir)
    with torch.no_grad():
        image_ref = model.encode_image(pixels).numpy()
        text_ref = model.encode_text(text["input_ids"], text["attention_mask"]).numpy()
    image = clip.encode_image(pixels.numpy())
    text_out = clip.encode_text(text["input_ids"].numpy(), text["attention_mask"].numpy())
    return {"image_max_abs_diff": float(abs(image - image_ref).max()),
            "text_max_abs_diff": float(abs(text_out - text_ref).max())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import json

    import torch

    import lightclip  # noqa: F401  (registers the model type)
    from lightclip.export import CALIBRATION_SIZE, export_onnx
    from lightclip.export_executorch import EXECUTORCH_MAX_BATCH, export_executorch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.format == "executorch":
        paths = export_executorch(args.model, args.output, max_batch_size=args.max_batch_size or EXECUTORCH_MAX_BATCH)
    else:
        paths = export_onnx(args.model, args.output, opset=args.opset, int8=args.int8 or False,
                            calibration_data=args.calibration_data,
                            num_calibration_images=args.num_calibration_images or CALIBRATION_SIZE)
    for name, path in paths.items():
        print(f"{name:15s} {path} ({path.stat().st_size / 1e6:.2f} MB)")
    result = {name: str(path) for name, path in paths.items()}
    if args.int8:
        with open(paths["preprocessing"], encoding="utf-8") as f:
            result["quantization"] = json.load(f)["quantization"]
        print("int8: " + ", ".join(f"{name} {q['method']}" for name, q in result["quantization"].items()))
        calibration = result["quantization"]["image_encoder"].get("calibration")
        if calibration:
            print(f"int8 image graph calibrated on {calibration['num_images']} images of {calibration['data']} "
                  f"(split {calibration['split']}; {calibration['chosen_by']})")
    if not args.no_verify:
        diffs = verify(args.model, args.output, export_format=args.format)
        runtime = "ExecuTorch" if args.format == "executorch" else "onnxruntime"
        print(f"{runtime} vs PyTorch: image max abs diff {diffs['image_max_abs_diff']:.2e}, "
              f"text max abs diff {diffs['text_max_abs_diff']:.2e}")
        result.update(diffs)
        if max(diffs.values()) > 1e-4:
            print("parity check FAILED (> 1e-4)", file=sys.stderr)
            sys.exit(1)
    if args.evaluate:
        result.update(evaluate_and_time(args))
    return result


def evaluate_and_time(args: argparse.Namespace, batch_size: int = 16) -> dict:
    """--evaluate: the accuracy table and, with int8 graphs, the image graphs' speed on `batch_size` test pictures."""
    from lightclip import LightClipProcessor
    from lightclip.images import load_rgb_image
    from lightclip.shapes import make_shapes_dataset

    dataset = make_shapes_dataset("test", num_samples=args.num_samples)
    evaluation = evaluate(args.model, args.output, dataset, int8=bool(args.int8), threads=args.threads)
    print(f"\nshapes test split, {len(dataset)} pictures (percent):\n" + accuracy_table(evaluation))
    result = {"evaluation": evaluation}
    if args.int8:
        images = [load_rgb_image(image) for image in dataset[:batch_size]["image"]]
        pixels = LightClipProcessor.from_pretrained(args.model)(images=images, return_tensors="np")["pixel_values"]
        timing = time_image_graphs(args.output, pixels, args.threads, args.repeats)
        print(f"\nimage graph, batch {len(images)}, {args.threads or 'default'} thread(s), {args.repeats} rounds: fp32 "
              f"{1e3 * timing['fp32']:.1f} ms, int8 {1e3 * timing['int8']:.1f} ms per batch; int8 runs at "
              f"{timing['int8_speedup']:.2f}x the fp32 speed")
        result["timing"] = timing
    return result


if __name__ == "__main__":
    main()
