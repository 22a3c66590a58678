"""Inference throughput: image and text embeddings of `LightClipModel` vs transformers' `CLIPModel` of the same dims.

Both models run in eval mode under `torch.no_grad()` in one process, timed round-robin (see `_common.py`). Each
backend is a function `config, device, args -> Encoders` returning the two embedding callables, so another runtime
(ONNX Runtime, torch.compile) is one more entry in `BACKENDS`. A CNN preset has no `CLIPModel` counterpart: its
image tower runs eager in NCHW, eager as built (channels_last), eager fused (`LightClipModel.fuse`), in ONNX Runtime on
the exported graph of the same weights (`_common.image_encoders`) and, with the executorch extra installed, in
ExecuTorch's runtime on the XNNPACK program (`lightclip.export_executorch.export_towers_executorch`), side by side.

    python benchmarks/inference.py            # xxs at 32 and 64 px, xs at 64 and 224 px, the CNN presets at 224 px
    python benchmarks/inference.py --quick    # xxs 64 px and xs 64 px only, 3 rounds
    python benchmarks/inference.py --threads 1 --settings lightclip-mobilenetv2:224   # one CNN preset, batch 16
    python benchmarks/inference.py --threads 1 --batch-size 1 16 --settings lightclip-efficientnet-lite0:224
    python benchmarks/inference.py --device cuda --bf16 --batch-size 256
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


@dataclass
class Encoders:
    """The two embedding functions of one backend; each takes a `_common.make_batch` dict and returns embeddings."""

    image: Callable[[dict], torch.Tensor]
    text: Callable[[dict], torch.Tensor]


def lightclip_backend(config, device, args) -> Encoders:
    from lightclip import LightClipModel

    model = LightClipModel(config).eval().to(device)
    return Encoders(
        image=lambda b: model.encode_image(b["pixel_values"]),
        text=lambda b: model.encode_text(b["input_ids"], b["attention_mask"]),
    )


def hf_clip_backend(config, device, args) -> Encoders:
    model = _common.hf_clip_model(config).eval().to(device)
    normalize = torch.nn.functional.normalize
    return Encoders(
        image=lambda b: normalize(model.get_image_features(pixel_values=b["pixel_values"]).pooler_output, dim=-1),
        text=lambda b: normalize(
            model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output,
            dim=-1),
    )


def lightclip_full_backend(config, device, args) -> Encoders:
    """lightclip through the full tower forward (`get_*_features`, every token through every layer), the same work
    as `CLIPModel`: separates implementation speed from the pooled-only last layer of `encode_*`."""
    from lightclip import LightClipModel

    model = LightClipModel(config).eval().to(device)
    normalize = torch.nn.functional.normalize
    return Encoders(
        image=lambda b: normalize(model.get_image_features(b["pixel_values"]).pooler_output, dim=-1),
        text=lambda b: normalize(model.get_text_features(b["input_ids"], b["attention_mask"]).pooler_output, dim=-1),
    )


def onnxruntime_backend(config, device, args, int8: bool = False) -> Encoders | None:
    """The same `encode_*` computation exported to ONNX (`lightclip.export.export_towers`) and run by ONNX Runtime's
    CPU provider with as many intra-op threads as torch uses; `int8`: the dynamically quantised graphs. CPU only;
    None (skipped) elsewhere or without onnxruntime."""
    from lightclip import LightClipModel

    clip = _common.onnx_runtime(LightClipModel(config).eval(), device, int8=int8)
    if clip is None:
        return None
    return Encoders(
        image=lambda b: clip.encode_image(b["pixel_values"].numpy()),
        text=lambda b: clip.encode_text(b["input_ids"].numpy(), b["attention_mask"].numpy()),
    )


BACKENDS: dict[str, Callable] = {
    "lightclip encode_*": lightclip_backend,
    "lightclip get_*_features": lightclip_full_backend,
    "CLIPModel": hf_clip_backend,
    "ONNX Runtime": onnxruntime_backend,
    "ONNX Runtime int8": lambda config, device, args: onnxruntime_backend(config, device, args, int8=True),
}
REFERENCE = "CLIPModel"

# (preset, image size); the quick run keeps the first two; CNN presets run at their native size
DEFAULT_SETTINGS = [("lightclip-xxs", 64), ("lightclip-xs", 64), ("lightclip-xxs", 32), ("lightclip-xs", 224),
                    ("lightclip-mobilenetv2", 224), ("lightclip-efficientnet-b0", 224),
                    ("lightclip-efficientnet-lite0", 224)]


def measure(preset: str, image_size: int, args, device) -> list[dict]:
    """Items/s of every backend for both modalities at one setting, at each `--batch-size`."""
    config = _common.lightclip_config(preset, image_size)
    encoders = {name: build(config, device, args) for name, build in BACKENDS.items()}
    encoders = {name: e for name, e in encoders.items() if e is not None}
    rows = []
    for batch_size in args.batch_size or [32 if image_size >= 224 else 64]:
        batch = _common.make_batch(config, batch_size, device, seed=args.seed)
        for modality in ("image", "text"):
            fns = {name: (lambda e=e: getattr(e, modality)(batch)) for name, e in encoders.items()}
            with torch.no_grad(), _common.autocast(args, device):
                times = _common.time_interleaved(fns, device, args.warmup, args.repeats)
            for name in times:
                rows.append(dict(preset=preset, image_size=image_size, modality=modality, backend=name,
                                 batch=batch_size, items_per_s=batch_size / times.median(name),
                                 speedup=1 / times.ratio(name, REFERENCE)))
    return rows


EXECUTORCH = "ExecuTorch XNNPACK"


def executorch_image_encoder(model, device) -> Callable[[torch.Tensor], object] | None:
    """`encode_image` of `model` as the XNNPACK program of `lightclip.export_executorch.export_towers_executorch`
    (written to a temporary folder, default batch bound) in ExecuTorch's runtime, with as many threads as torch uses.
    CPU only; None (skipped) elsewhere or without executorch."""
    folder = _common.cpu_runtime_folder(device, "executorch.runtime")
    if folder is None:
        return None
    from lightclip.export_executorch import ExecuTorchClip, export_towers_executorch

    export_towers_executorch(model, folder, towers=("image_encoder",))
    clip = ExecuTorchClip(folder, threads=torch.get_num_threads())
    return lambda pixel_values: clip.encode_image(pixel_values.numpy())


def measure_cnn(preset: str, image_size: int, args, device) -> list[dict]:
    """Images/s of a CNN preset's `encode_image` in each way of `_common.image_encoders` (NCHW included) and in
    ExecuTorch (`executorch_image_encoder`), at each `--batch-size`, with each one's speed relative to eager NCHW and
    its time relative to ONNX Runtime fp32, paired in the same rounds."""
    from lightclip import LightClipModel

    config = _common.lightclip_config(preset, image_size)
    torch.manual_seed(args.seed)
    model = LightClipModel(config).eval().to(device)
    encoders = _common.image_encoders(model, device, nchw=True)
    pte_encoder = executorch_image_encoder(model, device)
    if pte_encoder is not None:
        encoders[EXECUTORCH] = pte_encoder
    rows = []
    nan = float("nan")
    for batch_size in args.batch_size or [16]:
        pixels = _common.make_batch(config, batch_size, device, seed=args.seed)["pixel_values"]
        fns = {name: (lambda f=f: f(pixels)) for name, f in encoders.items()}
        with torch.no_grad(), _common.autocast(args, device):
            times = _common.time_interleaved(fns, device, args.warmup, args.repeats)
        rows += [dict(preset=preset, image_size=image_size, batch=batch_size, backend=name,
                      items_per_s=batch_size / times.median(name),
                      vs_nchw=times.ratio(_common.EAGER_NCHW, name),
                      vs_onnx=times.ratio(name, _common.ONNX_FP32) if _common.ONNX_FP32 in times else nan)
                 for name in times]
    return rows


def cnn_table(rows: list[dict]) -> str:
    out = ["| preset | image px | batch | backend | images/s | speed vs eager NCHW | time vs ONNX Runtime fp32 |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['backend']} | {r['items_per_s']:,.1f} | "
                   f"{r['vs_nchw']:.2f}x | {r['vs_onnx']:.2f}x |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| preset | image px | embedding | batch | backend | items/s | speed vs CLIPModel |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['preset']} | {r['image_size']} | {r['modality']} | {r['batch']} | {r['backend']} | "
                   f"{r['items_per_s']:,.0f} | {r['speedup']:.2f}x |")
    return "\n".join(out)


def onnx_summary(rows: list[dict], eager: str = "lightclip encode_*") -> str:
    """Items/s of the ONNX Runtime backends relative to eager PyTorch (`encode_*`, the computation they export)."""
    base = {(r["preset"], r["image_size"], r["modality"]): r["items_per_s"] for r in rows if r["backend"] == eager}
    out = [f"| preset | image px | embedding | backend | items/s | vs eager `{eager}` |", "|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["preset"], r["image_size"], r["modality"])
        if r["backend"].startswith("ONNX Runtime") and key in base:
            out.append(f"| {r['preset']} | {r['image_size']} | {r['modality']} | {r['backend']} | "
                       f"{r['items_per_s']:,.0f} | {r['items_per_s'] / base[key]:.2f}x |")
    return "\n".join(out) if len(out) > 2 else ""


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0], "Runs xxs and xs at 64 px only.")
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="one or more batch sizes, each timed in its own rounds (default: 64, or 32 at 224 px, for "
                        "ViT presets; 16 for CNN presets)")
    p.add_argument("--settings", nargs="*", default=None, metavar="PRESET:PX",
                   help="e.g. lightclip-xs:224 lightclip-mobilenetv2:224 (default: xxs:64 xs:64 xxs:32 xs:224, then "
                        "mobilenetv2, efficientnet-b0 and efficientnet-lite0 at 224)")
    args = p.parse_args()
    device = _common.setup(args, default_repeats=5, quick_repeats=3)
    if args.settings:
        settings = [(s.split(":")[0], int(s.split(":")[1])) for s in args.settings]
    else:
        settings = DEFAULT_SETTINGS[:2] if args.quick else DEFAULT_SETTINGS
    rows, cnn_rows = [], []
    for preset, size in settings:
        if _common.lightclip_config(preset).vision_config.backbone == "vit":
            rows += measure(preset, size, args, device)
        else:
            cnn_rows += measure_cnn(preset, size, args, device)
        print(f"done {preset} @ {size}px", file=sys.stderr, flush=True)
    print(_common.machine(args))
    if rows:
        print()
        print(table(rows))
        print()
        print("items/s: median round; speed vs CLIPModel: median over rounds of the paired time ratio (same round).")
        summary = onnx_summary(rows)
        if summary:
            print()
            print(summary)
    if cnn_rows:
        print()
        print(cnn_table(cnn_rows))
        print()
        print("CNN image towers, encode_image: eager (default) runs channels_last, eager fused adds "
              "LightClipModel.fuse(); ONNX Runtime runs the export_towers graph, ExecuTorch XNNPACK the "
              "export_towers_executorch program. Ratios: median over rounds of the paired time ratio (same round).")


if __name__ == "__main__":
    main()
