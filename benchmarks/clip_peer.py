#!/usr/bin/env python
"""The peer a user would pick instead: transformers' own `CLIPModel` with the ViT dims of a lightclip preset, trained
from scratch with the CLIP loss on the same data as `examples/pretrain.py`, then scored on the same benchmark.

    python benchmarks/clip_peer.py --train_data openclipart --seed 0 --output_dir runs/oc/clipmodel-xs-seed0

It reads the data through the training script's own path (the same source, cache, augmentation, caption choice and
tokenizer: `lightclip.data`), with pretrain.py's batch size, optimiser (AdamW 0.9 / 0.98, eps 1e-6, weight decay 0.1
off norms and biases), learning rate, cosine schedule with 5 % warm-up and step count; only the shuffle is its own
(a seeded `torch.Generator`, not Accelerate's sampler). It writes `eval_results.json` (the benchmark, training time,
samples/s, commit and machine) and `train_config.json` (with the command) like a pretrain.py run, so
`utils/seed_table.py` tabulates it beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from lightclip import LightClipConfig, LightClipProcessor  # noqa: E402
from lightclip.collate import ImageTextCollator  # noqa: E402
from lightclip.data import (  # noqa: E402
    DataArguments,
    builtin_benchmark,
    decode_images_once,
    load_datasets_from_args,
)
from lightclip.evaluation import save_results  # noqa: E402
from lightclip.trainer_utils import cosine_with_warmup, param_groups, run_environment  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_data", default="openclipart")
    parser.add_argument("--preset", default="lightclip-xs", help="a ViT preset whose dims the CLIPModel copies")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--per_device_train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/clip_peer.py", *(sys.argv[1:] if argv is None else argv)])
    (out / "train_config.json").write_text(json.dumps({**vars(args), "command": command}, indent=2, sort_keys=True))
    environment = run_environment()

    config = LightClipConfig.from_preset(args.preset, vision_config={"image_size": args.image_size})
    processor = LightClipProcessor.from_config(config)  # the tokenizer and image processing lightclip trains with
    data_args = DataArguments(train_data=args.train_data)
    train, validation = load_datasets_from_args(data_args)
    collator = ImageTextCollator(processor, train=True, image_size=args.image_size,
                                 max_length=config.text_config.max_position_embeddings, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        decode_images_once(train, data_args.max_decoded_images_mb * 2**20), batch_size=args.per_device_train_batch_size,
        shuffle=True, drop_last=True, collate_fn=collator, generator=torch.Generator().manual_seed(args.seed))

    torch.manual_seed(args.seed)
    model = _common.CLIPModelEncoders(_common.hf_clip_model(config), config).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, args.learning_rate), lr=args.learning_rate,
                                  betas=(0.9, 0.98), eps=1e-6, foreach=True)
    scheduler = cosine_with_warmup(optimizer, int(0.05 * args.max_train_steps), args.max_train_steps)
    step, epoch, samples, start = 0, 0, 0, time.perf_counter()
    while step < args.max_train_steps:
        collator.set_epoch(epoch)
        for batch in loader:
            loss = _common.clip_step(model, optimizer, scheduler, batch["pixel_values"], batch["input_ids"],
                                     batch["attention_mask"])
            step, samples = step + 1, samples + len(batch["input_ids"])
            if step % 50 == 0:
                print(f"step {step}: loss {loss.item():.3f}", flush=True)
            if step >= args.max_train_steps:
                break
        epoch += 1
    runtime = time.perf_counter() - start

    model.eval()
    results = builtin_benchmark(args.train_data).evaluate_benchmark(model, processor, dataset=validation,
                                                                     train_dataset=train)
    results.update(step=step, train_runtime=round(runtime, 3), train_samples_per_second=round(samples / runtime, 1),
                   environment=environment)
    save_results(results, out / "eval_results.json")
    print(json.dumps({k: v for k, v in results.items() if k.endswith(("acc1", "recall@1"))}, indent=2))
    return results


if __name__ == "__main__":
    main()
