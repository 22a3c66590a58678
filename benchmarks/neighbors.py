#!/usr/bin/env python
"""Benchmark of CLIP-PING neighbour mining (lightclip.neighbors) on random features, and of a feature-bank build.

    python benchmarks/neighbors.py                                  # exact top-1, N = 100k, 384-d
    python benchmarks/neighbors.py --n 1000000 --exact_queries 20000 --faiss   # 1M: exact timed on a query subset
    python benchmarks/neighbors.py --n 100000 --no-exact --active   # A-CLIP-PING cost per step vs bank lookup
    python benchmarks/neighbors.py --no-exact --bank_build          # build_feature_bank on 1000 shapes pictures
    python benchmarks/neighbors.py --no-exact --bank_build --bank_images 4000 --bank_image_teachers efficientnet-lite0

Reports, as one JSON line per measurement:
- exact: wall time, achieved FLOP/s (2·Nq·N·D) as a fraction of the fp32 matmul FLOP/s of one block product
  (block_size × D @ D × block_size) measured in the same run, and memory (peak RSS during mining, and its increase
  over the RSS before mining, sampled every 5 ms from /proc/self/status);
- faiss: IVF build + search time for all N queries, top-1 recall against the exact search on sampled queries;
- active: per-step cost of `FeatureBank.lookup` vs `ActiveTeacherNeighbors` search, and apart from it the forward
  of each teacher on one batch of rendered lightclip-shapes pictures (64 px) and their captions, after one warm-up
  call: `descriptor:color-hog`, `efficientnet-lite0` (EfficientNet-Lite0 on ImageNet-1k, 224 px) and all-MiniLM-L6-v2;
  a teacher whose package is not installed gets a `<name>_forward: "skipped: ..."` note instead of a time;
- bank-build: `build_feature_bank` on the lightclip-shapes train split (`--bank_images` pictures), one record per image
  teacher (`--bank_image_teachers`) with the default MiniLM text teacher (loaded once, shared by the records),
  written into a temporary folder: seconds per 1,000 images for the whole build (fingerprint, decoding, both
  teachers, mining, writing; the image teacher starts cold), and for `teacher.encode` alone on the same pictures /
  captions in batches of the builder's default batch size (timed after the build, i.e. warm), plus peak RSS of the
  process (teacher weights included; process-wide, so a later record also holds what earlier ones left resident:
  pass one image teacher per run for a clean figure).

Features (exact, faiss, active) are a mixture of 1000 Gaussian clusters on the sphere (an unstructured uniform cloud
has no meaningful nearest neighbour in 384-d and makes IVF recall meaningless), L2-normalised and stored fp16 as in a
bank.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import tempfile
import threading
import time

import torch
from torch.nn import functional as F


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak resident set size while the block runs, sampled by a background thread."""

    def __enter__(self):
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def clustered_features(n: int, dim: int, clusters: int = 1000, noise: float = 0.6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(clusters, dim, generator=g), dim=-1)
    out = torch.empty(n, dim, dtype=torch.float16)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        assign = torch.randint(clusters, (m,), generator=g)
        x = centers[assign] + noise / dim**0.5 * torch.randn(m, dim, generator=g)
        out[s:s + m] = F.normalize(x, dim=-1).half()
    return out


def matmul_flops(block: int, dim: int, repeats: int = 7) -> float:
    a, b = torch.randn(block, dim), torch.randn(dim, block)
    out = torch.empty(block, block)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t)
    return 2 * block * block * dim / sorted(times)[len(times) // 2]


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_1min": os.getloadavg()[0]}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def shapes_train_split(n: int):
    """The lightclip-shapes train split of n rows (64 px renders), its decoded pictures and the caption a bank encodes
    for each row (the first: caption_index=0)."""
    from lightclip.shapes import make_shapes_dataset

    dataset = make_shapes_dataset("train", num_samples=n)
    return dataset, list(dataset["image"]), [captions[0] for captions in dataset["captions"]]


def load_teacher_or_note(spec: str | None, modality: str):
    """(teacher, seconds to load it, None), or (None, None, "skipped: <why>") when its package is not installed."""
    from lightclip.teachers import load_teacher

    t = time.perf_counter()
    try:
        teacher = load_teacher(spec, modality)
    except ImportError as e:
        return None, None, f"skipped: {e}"
    return teacher, time.perf_counter() - t, None


def encode_seconds(teacher, items, batch_size: int | None = None) -> float:
    """Wall time of `teacher.encode` over `items`, in batches of `batch_size` (one batch when None)."""
    batch_size = batch_size or len(items)
    total = 0.0
    for s in range(0, len(items), batch_size):
        batch = items[s:s + batch_size]
        t = time.perf_counter()
        teacher.encode(batch)
        total += time.perf_counter() - t
    return total


def bench_exact(feats, args):
    from lightclip.neighbors import mine_neighbors

    n, dim = feats.shape
    nq = min(args.exact_queries or n, n)
    queries = feats[:nq]
    before = matmul_flops(args.block_size, dim)
    with PeakMemory() as mem:
        t = time.perf_counter()
        if nq == n:
            mine_neighbors(feats, k=args.k, block_size=args.block_size)
        else:  # a subset of queries against all N keys (their own row excluded), to extrapolate
            mine_neighbors(queries, feats, k=args.k, block_size=args.block_size, query_indices=torch.arange(nq))
        seconds = time.perf_counter() - t
    after = matmul_flops(args.block_size, dim)
    peak_ref = max(before, after)
    achieved = 2 * nq * n * dim / seconds
    emit({"what": "exact", "n": n, "queries": nq, "dim": dim, "k": args.k, "block_size": args.block_size,
          "seconds": round(seconds, 2), "extrapolated_seconds_all_queries": round(seconds * n / nq, 1),
          "achieved_gflops": round(achieved / 1e9, 1), "matmul_gflops_before": round(before / 1e9, 1),
          "matmul_gflops_after": round(after / 1e9, 1), "fraction_of_matmul": round(achieved / peak_ref, 3),
          "peak_rss_gb": round(mem.peak / 2**30, 3), "rss_increase_gb": round((mem.peak - mem.before) / 2**30, 3),
          "features_gb": round(feats.numel() * feats.element_size() / 2**30, 3)})


def bench_faiss(feats, args):
    import faiss

    from lightclip.neighbors import mine_neighbors

    faiss.omp_set_num_threads(torch.get_num_threads())
    n, dim = feats.shape
    with PeakMemory() as mem:
        t = time.perf_counter()
        _, approx = mine_neighbors(feats, k=args.k, backend="faiss", nlist=args.nlist, nprobe=args.nprobe)
        seconds = time.perf_counter() - t
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: args.recall_queries]
    t = time.perf_counter()
    _, exact = mine_neighbors(feats[sample], feats, k=1, block_size=args.block_size, query_indices=sample)
    exact_seconds = time.perf_counter() - t
    recall = (approx[sample, 0] == exact[:, 0]).float().mean().item()
    emit({"what": "faiss-ivf", "n": n, "dim": dim, "k": args.k, "nlist": args.nlist or "4*sqrt(N)",
          "nprobe": args.nprobe, "seconds": round(seconds, 1), "recall_at_1": round(recall, 4),
          "recall_queries": len(sample), "exact_seconds_for_recall_queries": round(exact_seconds, 1),
          "peak_rss_gb": round(mem.peak / 2**30, 3), "rss_increase_gb": round((mem.peak - mem.before) / 2**30, 3)})


def bench_active(feats, args):
    from lightclip.neighbors import ActiveTeacherNeighbors, FeatureBank
    from lightclip.teachers import Teacher

    n = feats.shape[0]
    text = clustered_features(n, 384, seed=2)
    # the cost of a lookup does not depend on which rows the lists name: random lists stand in for mined ones
    lists = torch.randint(n, (2, n, 1), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    bank = FeatureBank(feats, text, lists[0], lists[1])

    class Lookup(Teacher):  # stands in for a teacher whose forward is timed apart: returns the bank row + noise
        def __init__(self, table, modality):
            super().__init__(f"noisy-bank-{modality}", modality, table.shape[1])
            self.table = table
            self.needs_indices = True

        def _encode(self, batch, indices):
            return self.table[indices].float() + 0.01 * torch.randn(len(indices), self.dim)

    active = ActiveTeacherNeighbors(bank, Lookup(feats, "image"), Lookup(text, "text"),
                                    block_size=args.block_size)
    gen = torch.Generator().manual_seed(0)
    timings = {"lookup": [], "active": []}
    for _ in range(args.steps):
        idx = torch.randint(n, (args.batch,), generator=gen)
        t = time.perf_counter()
        bank.lookup(idx)
        timings["lookup"].append(time.perf_counter() - t)
        t = time.perf_counter()
        active.lookup(idx, [None] * args.batch, [None] * args.batch)
        timings["active"].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    record = {"what": "active-vs-lookup", "n": n, "batch": args.batch, "lookup_ms": round(med["lookup"] * 1e3, 2),
              "active_search_ms": round(med["active"] * 1e3, 1)}
    # teacher forward on one batch (not included above), after one warm-up call: the steady per-step cost
    _, images, texts = shapes_train_split(args.batch)
    for key, spec, modality, batch in (("descriptor", "descriptor:color-hog", "image", images),
                                       ("efficientnet_lite0", "efficientnet-lite0", "image", images),
                                       ("minilm", None, "text", texts)):
        teacher, _, note = load_teacher_or_note(spec, modality)
        if teacher is None:
            record[f"{key}_forward"] = note
            continue
        encode_seconds(teacher, batch[:2])
        record[f"{key}_forward_ms"] = round(encode_seconds(teacher, batch) * 1e3, 1)
    emit(record)


def bench_bank_build(args):
    from lightclip.neighbors import build_feature_bank

    batch_size = inspect.signature(build_feature_bank).parameters["batch_size"].default
    dataset, images, captions = shapes_train_split(args.bank_images)
    n = len(dataset)
    base = {"what": "bank-build", "images": n, "image_px": images[0].size[0] if n else None, "batch_size": batch_size}
    text_teacher, text_load, note = load_teacher_or_note(None, "text")
    if text_teacher is None:
        emit({**base, "text_teacher": "default", "note": note})
        return

    def per_1k(seconds):
        return round(seconds * 1000 / max(n, 1), 2)

    for spec in args.bank_image_teachers:
        record = {**base, "image_teacher": spec, "text_teacher": text_teacher.name}
        with PeakMemory() as mem:
            image_teacher, image_load, note = load_teacher_or_note(spec, "image")
            if image_teacher is None:
                emit({**record, "note": note})
                continue
            with tempfile.TemporaryDirectory() as out_dir:
                t = time.perf_counter()
                build_feature_bank(dataset, image_teacher, text_teacher, out_dir, show_progress=False)
                build = time.perf_counter() - t
            image_seconds = encode_seconds(image_teacher, images, batch_size)
            text_seconds = encode_seconds(text_teacher, captions, batch_size)
        record.update({
            "image_teacher": image_teacher.name, "build_seconds": round(build, 2),
            "build_s_per_1k": per_1k(build), "image_encode_s_per_1k": per_1k(image_seconds),
            "text_encode_s_per_1k": per_1k(text_seconds),
            "image_teacher_load_seconds": round(image_load, 2), "text_teacher_load_seconds": round(text_load, 2),
            "peak_rss_gb": round(mem.peak / 2**30, 3), "rss_before_gb": round(mem.before / 2**30, 3)})
        emit(record)
        del image_teacher


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: torch's).")
    parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--exact_queries", type=int, default=None,
                        help="Time only this many queries against all N keys and extrapolate (for N = 1M).")
    parser.add_argument("--faiss", action="store_true", help="Also run the faiss IVF backend.")
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--recall_queries", type=int, default=10_000)
    parser.add_argument("--active", action="store_true", help="A-CLIP-PING cost per step vs bank lookup.")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bank_build", action="store_true",
                        help="Time build_feature_bank on the lightclip-shapes train split, per image teacher.")
    parser.add_argument("--bank_images", type=int, default=1000)
    parser.add_argument("--bank_image_teachers", nargs="+", default=["descriptor:color-hog", "efficientnet-lite0"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    emit({"what": "machine", **machine()})
    if args.exact or args.faiss or args.active:
        feats = clustered_features(args.n, args.dim)
    if args.exact:
        bench_exact(feats, args)
    if args.faiss:
        bench_faiss(feats, args)
    if args.active:
        bench_active(feats, args)
    if args.bank_build:
        bench_bank_build(args)


if __name__ == "__main__":
    main()
