"""The README preset table: parameters of `LightClipModel` (total, image tower, text tower) and CPU images/s.

Inference images/s: `encode_image`, eval, no_grad, batch 32 at the preset's native image size, eager as built
(channels_last for a CNN tower), eager fused (`LightClipModel.fuse`, CNN towers) and ONNX Runtime fp32 on the
`export_towers` graph, timed side by side (`_common.image_encoders`). Training images/s (`--train`): one "clip" step
(forward, backward, AdamW) with batch 32 and full-length text.

    python benchmarks/presets.py            # inference only (about 1-2 minutes on 2 cores)
    python benchmarks/presets.py --train    # adds training images/s (a few minutes more)
    python benchmarks/presets.py --quick    # parameter counts and 1 timed round
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from train_step import make_step  # noqa: E402


def preset_row(name: str, args, device) -> dict:
    from lightclip import LightClipForPreTraining, LightClipModel

    config = _common.lightclip_config(name, objectives="clip")
    torch.manual_seed(args.seed)
    model = LightClipModel(config).eval().to(device)
    row = dict(
        preset=name, backbone=config.vision_config.backbone, image_size=config.vision_config.image_size,
        total=_common.num_params(model),
        image=_common.num_params(model.vision_model) + _common.num_params(model.visual_projection),
        text=_common.num_params(model.text_model) + _common.num_params(model.text_projection),
    )
    batch = _common.make_batch(config, args.batch_size, device, seed=args.seed)
    infer = {name: (lambda f=f: f(batch["pixel_values"])) for name, f in _common.image_encoders(model, device).items()}
    with _common.autocast(args, device):
        with torch.no_grad():
            times = _common.time_interleaved(infer, device, args.warmup, args.repeats)
        row["infer"] = {name: args.batch_size / times.median(name) for name in times}
        if args.train:
            trainer = LightClipForPreTraining(config).train().to(device)
            step = make_step(trainer, lambda: trainer(**batch).loss, args, device)
            row["train"] = args.batch_size / _common.time_interleaved(
                {"train": step}, device, args.warmup, max(1, args.repeats // 2)).median("train")
    return row


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train", action="store_true", help="also time a training step")
    p.add_argument("--presets", nargs="+", default=None, help="Only these presets (default: all).")
    args = p.parse_args()
    device = _common.setup(args, default_repeats=3, quick_repeats=1)
    from lightclip import list_presets

    rows = [preset_row(name, args, device) for name in args.presets or list_presets()]
    print(_common.machine(args))
    print()
    ways = (_common.EAGER, _common.EAGER_FUSED, _common.ONNX_FP32)
    head = ("| preset | image tower | px | params (total) | image tower | text tower | "
            + " | ".join(f"CPU infer images/s (batch {args.batch_size}), {way}" for way in ways) + " |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if args.train:
        head += f" CPU train images/s (batch {args.batch_size}) |"
        sep += "---|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['preset']} | {r['backbone']} | {r['image_size']} | {r['total'] / 1e6:.2f} M | "
                f"{r['image'] / 1e6:.2f} M | {r['text'] / 1e6:.2f} M | "
                + " | ".join(f"{r['infer'][way]:,.0f}" if way in r["infer"] else "-" for way in ways) + " |")
        if args.train:
            line += f" {r['train']:,.1f} |"
        print(line)
    print()
    print("Image/text tower counts include their projection; the total adds the logit scale. eager (default): "
          "channels_last for a CNN tower; eager fused: LightClipModel.fuse() (a ViT has nothing to fuse).")


if __name__ == "__main__":
    main()
