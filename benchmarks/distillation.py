"""One training step with affinity distillation (`clip,kd`) against a `clip` step: the teacher run online against
its embeddings precomputed and looked up, side by side in the same rounds.

    python benchmarks/distillation.py --threads 1
    python benchmarks/distillation.py --teacher runs/my-teacher --student lightclip-xxs-lite0

The student (default: the training default `lightclip-xxs-lite0`, EfficientNet-Lite0 at 64 px) takes one AdamW step
on a fixed batch of shapes pictures and their captions. `online`: `DistillationTeacher.embed` on the same batch (the
teacher's forward on the re-normalised crops and the raw captions) before the step; `precomputed`: a
`TeacherEmbeddingStore.lookup` of the batch's rows from a store written for the first pictures of the shapes train
split. The teacher is `--teacher` (a folder or hub id), or by default a `lightclip-efficientnet-lite0` model at the
student's input size with random weights (the cost of a forward does not depend on the weights).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from train_step import make_step  # noqa: E402


def default_teacher(folder: str, image_size: int) -> str:
    from lightclip import LightClipConfig, LightClipModel, LightClipProcessor

    config = LightClipConfig.from_preset("lightclip-efficientnet-lite0", vision_config={"image_size": image_size})
    LightClipModel(config).save_pretrained(folder)
    LightClipProcessor.from_config(config).save_pretrained(folder)
    return folder


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--student", default="lightclip-xxs-lite0")
    p.add_argument("--teacher", default=None,
                   help="A folder or hub id (default: a random lightclip-efficientnet-lite0)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    device = _common.setup(args, default_repeats=7, quick_repeats=3)

    from lightclip import LightClipConfig, LightClipForPreTraining, LightClipProcessor
    from lightclip.collate import ImageTextCollator
    from lightclip.distillation import DistillationTeacher, build_teacher_embeddings
    from lightclip.shapes import make_shapes_dataset

    student = LightClipConfig.from_preset(args.student)
    processor = LightClipProcessor.from_config(student)
    scratch = tempfile.mkdtemp()
    teacher = DistillationTeacher.from_pretrained(
        args.teacher or default_teacher(os.path.join(scratch, "teacher"), student.vision_config.image_size),
        processor.image_processor, device=device)
    data = make_shapes_dataset("train", num_samples=args.batch_size)
    store = build_teacher_embeddings(data, teacher, processor, os.path.join(scratch, "store"), show_progress=False)
    collate = ImageTextCollator(processor, train=True, image_size=student.vision_config.image_size, return_raw=True)
    batch = collate([data[i] for i in range(args.batch_size)])
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values")}

    def step_fn(objectives: str, targets: Callable[[], dict] | None) -> Callable[[], None]:
        config = LightClipConfig.from_preset(args.student, objectives=objectives,
                                             distill_teacher_dim=store.image_dim)
        model = LightClipForPreTraining(config).train().to(device)
        return make_step(model, lambda: model(**inputs, **({} if targets is None else
                                                           {"teacher_targets": targets()})).loss, args, device)

    def online() -> dict:
        image, text, scale = teacher.embed(batch)
        return {"image_embeds": image, "text_embeds": text, "logit_scale": scale}

    def precomputed() -> dict:
        image, text = store.lookup(batch["index"], device=device)
        return {"image_embeds": image, "text_embeds": text, "logit_scale": store.logit_scale.to(device)}

    steps = {"clip": step_fn("clip", None), "clip,kd precomputed": step_fn("clip,kd", precomputed),
             "clip,kd online": step_fn("clip,kd", online)}
    times = _common.time_interleaved(steps, device, args.warmup, args.repeats)
    print(_common.machine(args))
    label = args.teacher or f"lightclip-efficientnet-lite0 at {student.vision_config.image_size} px, random weights"
    print(f"- student {args.student}, batch {args.batch_size}, AdamW; teacher {label}")
    print("- step: median round; vs clip: median over rounds of the paired time ratio (same round)")
    print()
    print("| objectives | teacher | step (s) | vs clip |")
    print("|---|---|---|---|")
    for name in steps:
        objectives, _, source = name.partition(" ")
        print(f"| {objectives} | {source or '-'} | {times.median(name):.3f} | {times.ratio(name, 'clip'):.2f}x |")


if __name__ == "__main__":
    main()
