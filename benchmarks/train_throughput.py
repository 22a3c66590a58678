"""Training throughput from disk: `examples/pretrain.py`'s data loader feeding `LightClipForPreTraining` ("clip"),
against the same model and transformers' `CLIPModel` fed by pre-decoded tensors, and the data loader alone.

The data is read as a run reads it: `pretrain.load_data` (the shapes train split by default), then
`pretrain.build_train_loader` (decode, augment and tokenise in the collator) and `Accelerator.prepare`. Arms, in one
process with the same threads, interleaved round by round; a round gives every arm `--steps` consecutive steps (by
default one pass over the data), and each round of a loader-fed arm starts a fresh pass, as an epoch does:

- lightclip, from disk: `LightClipForPreTraining` fed by the loader (one arm per `--num_workers` value);
- lightclip, tensors: the same model fed by the batches of one pass, collated once up front;
- CLIPModel, tensors: transformers' `CLIPModel` of the same dims on those tensors (ViT image towers only);
- data loader alone: the loader's batches with no model.

Same batch, AdamW (lr 1e-4, weight decay 0.1), the CLIP loss. The data-loading share of a loader-fed arm is the time
spent waiting for the loader's next batch over the round's time. Other options are passed to `pretrain.py`'s parser
(e.g. `--max_decoded_images_mb 0`, `--shapes_image_size 32`, `--train_data ...`).

    python benchmarks/train_throughput.py                      # lightclip-xxs ViT, 32 px, batch 64, torch's threads
    python benchmarks/train_throughput.py --num_workers 0 1 2  # one loader-fed arm per worker count
    python benchmarks/train_throughput.py --max_decoded_images_mb 0     # decode every image at every step
    python benchmarks/train_throughput.py --model lightclip-xxs-lite0 --steps 20  # no CLIPModel arm (CNN tower)
    python benchmarks/train_throughput.py --steps 3 --repeats 1 --warmup 0 --threads 1  # smoke run
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from itertools import islice

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import _common  # noqa: E402
import pretrain  # noqa: E402
import train_step  # noqa: E402

from lightclip import LightClipForPreTraining  # noqa: E402
from lightclip.collate import SkipCounter  # noqa: E402
from lightclip.data import DecodedImageTextDataset  # noqa: E402

CLIP_TENSORS, LIGHTCLIP_TENSORS, LOADER = "CLIPModel, tensors", "lightclip, tensors", "data loader alone"
NOT_MODEL_INPUTS = ("index", "skip_counts", "images", "texts")


def disk_arm(workers: int) -> str:
    return f"lightclip, from disk, {workers} workers"


def loader_arm(workers: int) -> str:
    return f"{LOADER}, {workers} workers"


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


class Passes:
    """A loader's batches pass after pass, each pass a new epoch of the sampler and of the augmentation, as
    `pretrain.train` sets them; the epoch count carries over from round to round."""

    def __init__(self, loader, collator):
        self.loader, self.collator, self.epoch = loader, collator, 0

    def batches(self) -> Iterator[dict]:
        """Closing this generator ends the pass under way, and its workers with it."""
        while True:
            self.loader.set_epoch(self.epoch)
            self.collator.set_epoch(self.epoch)
            self.epoch += 1
            yield from self.loader


def loader_block(passes: Passes, steps: int, waits: list[float], step: Callable[[dict], None] | None = None
                 ) -> Callable[[], None]:
    """One round of a loader-fed arm: a fresh pass, `steps` batches, each trained on by `step` (none: the loader
    alone); the time spent in `next()` is appended to `waits`."""

    def block() -> None:
        batches = passes.batches()
        waited = 0.0
        for _ in range(steps):
            start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - start
            if step is not None:
                step(model_inputs(batch))
        batches.close()
        waits.append(waited)

    return block


def tensor_block(tensors: list[dict], steps: int, step: Callable[[dict], None]) -> Callable[[], None]:
    """One round of a tensor-fed arm: `steps` steps cycling through the pre-collated batches."""

    def block() -> None:
        for i in range(steps):
            step(tensors[i % len(tensors)])

    return block


def trainer(model: torch.nn.Module, loss: Callable[[torch.nn.Module, dict], torch.Tensor], args, device
            ) -> Callable[[dict], None]:
    """A step function `batch -> None`: forward, backward and AdamW on `model` (`train_step.make_step`)."""
    current: dict = {}
    step = train_step.make_step(model, lambda: loss(model, current["batch"]), args, device)

    def run(batch: dict) -> None:
        current["batch"] = batch
        step()

    return run


def lightclip_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def clip_model_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch, return_loss=True).loss


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="lightclip-xxs", help="a preset or config folder, as pretrain.py's --model")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="steps per arm and round (default: one pass over the data)")
    p.add_argument("--num_workers", type=int, nargs="+", default=None,
                   help="data loader workers, one loader-fed arm per value (default: pretrain.py's)")
    p.set_defaults(warmup=1)
    args, pretrain_options = p.parse_known_args()
    device = _common.setup(args, default_repeats=5, quick_repeats=3)
    run_args = pretrain.parse_args([
        "--model", args.model, "--objectives", "clip", "--per_device_train_batch_size", str(args.batch_size),
        "--seed", str(args.seed), *pretrain_options])
    if args.num_workers is None:
        args.num_workers = [run_args.dataloader_num_workers]
    accelerator = pretrain.build_accelerator(run_args, cpu=device.type == "cpu")
    train_dataset, _, _, _ = pretrain.load_data(run_args, accelerator)
    config, processor = pretrain.build_config_and_processor(run_args)

    passes = {}
    for workers in args.num_workers:
        worker_args = copy.copy(run_args)
        worker_args.dataloader_num_workers = workers
        collator, loader = pretrain.build_train_loader(worker_args, train_dataset, processor, config, SkipCounter(),
                                                       pin_memory=device.type == "cuda")
        passes[workers] = Passes(accelerator.prepare(loader), collator)
    first = passes[args.num_workers[0]]
    per_pass = len(first.loader)
    args.steps = args.steps or per_pass
    batches = first.batches()
    tensors = [model_inputs(batch) for batch in islice(batches, min(args.steps, per_pass))]
    batches.close()

    torch.manual_seed(args.seed)
    lightclip = LightClipForPreTraining(config).train().to(device)
    fns, waits = {}, {}
    for workers, worker_passes in passes.items():
        waits[disk_arm(workers)] = []
        model = copy.deepcopy(lightclip)
        fns[disk_arm(workers)] = loader_block(worker_passes, args.steps, waits[disk_arm(workers)],
                                              trainer(model, lightclip_loss, args, device))
    fns[LIGHTCLIP_TENSORS] = tensor_block(tensors, args.steps, trainer(lightclip, lightclip_loss, args, device))
    if config.vision_config.backbone == "vit":
        clip = _common.hf_clip_model(config).train().to(device)
        fns[CLIP_TENSORS] = tensor_block(tensors, args.steps, trainer(clip, clip_model_loss, args, device))
    for workers, worker_passes in passes.items():
        waits[loader_arm(workers)] = []
        fns[loader_arm(workers)] = loader_block(worker_passes, args.steps, waits[loader_arm(workers)])
    times = _common.time_interleaved(fns, device, args.warmup, args.repeats)

    references = [name for name in (CLIP_TENSORS, LIGHTCLIP_TENSORS) if name in fns]
    decoded = isinstance(first.loader.dataset, DecodedImageTextDataset)
    print(_common.machine(args))
    print(f"- model: {args.model} dims, {config.vision_config.image_size} px, batch {args.batch_size}, objectives "
          f"clip, AdamW; {args.steps} steps per arm and round")
    print(f"- data: {run_args.train_data} ({run_args.train_split}), {len(train_dataset)} samples, {per_pass} batches "
          f"per pass; images decoded once and kept in memory: {'yes' if decoded else 'no'}")
    if CLIP_TENSORS not in fns:
        print("- no CLIPModel arm: the image tower is not a ViT")
    print("- step: median round / steps; speeds: medians over rounds of paired ratios; data-loading share: time "
          "waiting for the loader / round time, median over rounds")
    print()
    print("| arm | images/s | batches/s | step (ms) | " + " | ".join(f"speed vs {r}" for r in references)
          + " | data-loading share |")
    print("|---|---|---|---|" + "---|" * len(references) + "---|")
    records = []
    for name in fns:
        seconds = times.median(name) / args.steps
        trains = not name.startswith(LOADER)
        speeds = {r: 1 / times.ratio(name, r) if trains else None for r in references}
        share = statistics.median(w / t for w, t in zip(waits[name][-args.repeats:], times[name])) if (
            trains and name in waits) else None
        print(f"| {name} | {args.batch_size / seconds:,.1f} | {1 / seconds:,.2f} | {seconds * 1000:.1f} | "
              + " | ".join("" if v is None else f"{v:.2f}x" for v in speeds.values())
              + f" | {'' if share is None else f'{share:.0%}'} |")
        records.append({
            "benchmark": "train_throughput", "arm": name, "model": args.model,
            "image_size": config.vision_config.image_size, "batch_size": args.batch_size, "steps": args.steps,
            "rounds": args.repeats, "images_per_s": round(args.batch_size / seconds, 1),
            "batches_per_s": round(1 / seconds, 2), "step_ms": round(seconds * 1000, 2),
            **{"speed_vs_" + ("clipmodel" if r == CLIP_TENSORS else "lightclip") + "_tensors":
               None if v is None else round(v, 3) for r, v in speeds.items()},
            "data_loading_share": None if share is None else round(share, 3), "decoded_once": decoded,
            "device": str(device), "threads": torch.get_num_threads(),
        })
    print()
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
