"""Feature banks and nearest-neighbour mining for CLIP-PING (docs/method.md, "Banks and neighbours" and "A-CLIP-PING").

A bank is one folder, written once by `build_feature_bank` and read by every process of every run:

- `features.safetensors`: `image` (N, D_I) and `text` (N, D_T), L2-normalised fp16 teacher features;
- `neighbors.safetensors`: `image_nn` (N, k) top-k neighbours in the image teacher space, `text_nn` (N, k) in the
  text teacher space (int32 when N < 2³¹, else int64, best first, -1 where fewer than k candidates exist) and their
  cosine scores `image_nn_scores`, `text_nn_scores` (float32);
- `bank.json`: format version, N, k, the teachers (spec + dim), the dataset fingerprint and how it was computed.

`FeatureBank.lookup(indices)` turns a batch of dataset indices into the constant NN / XNN targets. The XNN
targets are derived from the two unimodal neighbour lists (no cross-modal search): see `FeatureBank.lookup`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .tables import (
    ImageTextTables,
    check_built_from,
    dataset_identity,
    gather_rows,
    iter_rows,
    load_safetensors,
    read_folder_metadata,
    read_matching_metadata,
    renormalize_fp16_,
    row_caption,
    write_table_folder,
)

if TYPE_CHECKING:
    from .configuration_lightclip import LightClipPretrainingConfig

FORMAT_VERSION = 1
FEATURES_FILE = "features.safetensors"
NEIGHBORS_FILE = "neighbors.safetensors"
METADATA_FILE = "bank.json"

__all__ = [
    "ActiveTeacherNeighbors",
    "FeatureBank",
    "build_feature_bank",
    "duplicate_groups",
    "mine_neighbors",
]


# ----------------------------------------------------------------------------------------------------------------
# Mining
# ----------------------------------------------------------------------------------------------------------------


def duplicate_groups(features: torch.Tensor, block_size: int = 16384) -> torch.Tensor:
    """(N,) int64 group ids: rows with identical feature values share an id, every other row has its own.

    Rows are hashed blockwise (64-bit hash of the float32 bit patterns, -0.0 counted as 0.0), then rows that share a
    hash are compared exactly, so two rows share an id only if they are equal.
    """
    n = features.shape[0]
    weights = torch.randint(-(2**62), 2**62, (features.shape[1],), generator=torch.Generator().manual_seed(0))
    hashes = torch.empty(n, dtype=torch.int64)
    for start in range(0, n, block_size):
        block = features[start:start + block_size].float() + 0.0
        hashes[start:start + block_size] = (block.view(torch.int32).long() * weights).sum(-1)
    _, groups, counts = torch.unique(hashes, return_inverse=True, return_counts=True)
    shared = torch.nonzero(counts[groups] > 1).squeeze(1)
    if shared.numel():
        # exact check of the rows that share a hash: each must equal the first row of its hash group
        order = shared[torch.argsort(groups[shared], stable=True)]
        first = {}
        next_id = int(groups.max()) + 1
        for row in order.tolist():
            g = int(groups[row])
            if g not in first:
                first[g] = row
            elif not torch.equal(features[row].float() + 0.0, features[first[g]].float() + 0.0):
                groups[row] = next_id  # hash collision between different rows
                next_id += 1
    return groups


def _merge_topk(scores_a, idx_a, scores_b, idx_b, k):
    """Top-k of the union of two candidate lists, ordered by score descending, then index ascending."""
    scores = torch.cat([scores_a, scores_b], dim=1)
    idx = torch.cat([idx_a, idx_b], dim=1)
    order = torch.argsort(idx, dim=1, stable=True)  # index ascending ...
    scores, idx = scores.gather(1, order), idx.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]  # ... then score descending
    return scores.gather(1, order), idx.gather(1, order)


def _block_topk(sim: torch.Tensor, k: int, offset: int):
    """Exact top-k of each row of `sim` with lowest-index tie-breaking; indices shifted by `offset`."""
    kk = min(k + 1, sim.shape[1])
    values, idx = torch.topk(sim, kk, dim=1)
    if kk > k:
        tied = torch.nonzero(values[:, k - 1] == values[:, k]).squeeze(1)  # rows whose k-th place is a tie
        values, idx = values[:, :k].clone(), idx[:, :k].clone()
        for row in tied.tolist():
            candidates = torch.nonzero(sim[row] >= values[row, k - 1]).squeeze(1)  # ascending index
            order = torch.argsort(sim[row, candidates], descending=True, stable=True)[:k]
            values[row], idx[row] = sim[row, candidates[order]], candidates[order]
    return values, idx + offset


def _mine_exact(queries, keys, k, block_size, self_index, query_groups, key_groups):
    nq, nk = queries.shape[0], keys.shape[0]
    best_scores = torch.full((nq, k), -math.inf)
    best_idx = torch.full((nq, k), -1, dtype=torch.int64)
    if nq == 0 or nk == 0:
        return best_scores, best_idx
    needs_dense = None
    if query_groups is not None:
        # a query needs the dense group comparison only if some key other than itself shares its features
        counts = torch.bincount(key_groups, minlength=int(max(key_groups.max(), query_groups.max())) + 1)
        matching = counts[query_groups]
        if self_index is not None:
            matching = matching - (key_groups[self_index.clamp(0, nk - 1)] == query_groups).long()
        needs_dense = matching > 0
    # few queries (A-CLIP-PING batches): wider key blocks, same block_size² buffer
    q_block = min(nq, block_size)
    k_block = min(nk, max(block_size, block_size * block_size // max(q_block, 1)))
    sim = torch.empty(q_block, k_block, dtype=torch.float32)
    converted = None  # fp16 keys of a small key set: convert once, not once per query block
    if keys.dtype != torch.float32 and nk <= 4 * k_block and nq > q_block:
        converted = [keys[s:s + k_block].float() for s in range(0, nk, k_block)]
    for qs in range(0, nq, q_block):
        q = queries[qs:qs + q_block].float()
        rows = q.shape[0]
        run_s, run_i = best_scores[qs:qs + rows], best_idx[qs:qs + rows]
        q_self = None if self_index is None else self_index[qs:qs + rows]
        q_group = None if query_groups is None else query_groups[qs:qs + rows]
        q_dense = None if needs_dense is None else needs_dense[qs:qs + rows]
        for b, ks in enumerate(range(0, nk, k_block)):
            kb = converted[b] if converted is not None else keys[ks:ks + k_block].float()
            cols = kb.shape[0]
            s = torch.mm(q, kb.t(), out=sim[:rows, :cols])
            if q_self is not None:
                inside = (q_self >= ks) & (q_self < ks + cols)
                r = torch.nonzero(inside).squeeze(1)
                if r.numel():
                    sim.view(-1).index_fill_(0, r * s.stride(0) + (q_self.index_select(0, r) - ks), -math.inf)
            if q_group is not None:
                r = torch.nonzero(q_dense).squeeze(1)
                if r.numel():
                    same = q_group[r, None] == key_groups[None, ks:ks + cols]
                    s[r] = s[r].masked_fill(same, -math.inf)
            bs, bi = _block_topk(s, k, ks)
            run_s, run_i = _merge_topk(run_s, run_i, bs, bi, k)
        best_scores[qs:qs + rows], best_idx[qs:qs + rows] = run_s, run_i
    best_idx[torch.isneginf(best_scores)] = -1
    return best_scores, best_idx


def _mine_faiss(queries, keys, k, self_index, query_groups, key_groups, nlist, nprobe, extra, train_size, seed,
                chunk: int = 16384):
    import faiss

    n, d = keys.shape
    # One fp32 buffer serves every chunk of keys and queries: a fresh fp32 copy per chunk fragments the heap, which
    # then keeps 0.35 GB of freed copies at N = 1M.
    buffer = np.empty((min(chunk, max(n, queries.shape[0])), d), dtype=np.float32)

    def as_f32(rows: torch.Tensor) -> np.ndarray:
        out = buffer[:rows.shape[0]]
        torch.from_numpy(out).copy_(rows)  # any float dtype, bf16 included
        return out

    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(d)
    # vectors stored fp16 (the bank's own precision): half the memory of IVF-Flat, no loss against the bank
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(n, size=min(n, train_size or 40 * nlist), replace=False))
    index.cp.niter = 10  # k-means iterations of the coarse quantizer (faiss' default is 25)
    index.train(np.ascontiguousarray(keys[torch.from_numpy(train_rows)].float().numpy()))
    # Every row is assigned to its list first and each list is sized once (appends would reallocate a list as it
    # grows, up to twice its final size); `add_core` then stores the rows as `add` would.
    assign = np.concatenate([quantizer.assign(as_f32(keys[s:s + chunk]), 1).ravel() for s in range(0, n, chunk)])
    lists = faiss.downcast_InvertedLists(index.invlists)
    if isinstance(lists, faiss.ArrayInvertedLists):
        for list_no, size in enumerate(np.bincount(assign, minlength=nlist).tolist()):
            lists.resize(list_no, size)  # std::vector keeps the capacity when shrunk back
            lists.resize(list_no, 0)
    for s in range(0, n, chunk):
        rows, rows_assign = as_f32(keys[s:s + chunk]), np.ascontiguousarray(assign[s:s + chunk])
        index.add_core(len(rows), faiss.swig_ptr(rows), None, faiss.swig_ptr(rows_assign))
    del assign
    index.nprobe = nprobe
    search_k = min(n, k + 1 + extra)
    nq, kept = queries.shape[0], min(k, search_k)
    best_scores = torch.empty(nq, kept)
    best_idx = torch.empty(nq, kept, dtype=torch.int64)
    for s in range(0, nq, chunk):  # each chunk's candidates are cut to k at once: memory O(chunk · search_k)
        scores, idx = (torch.from_numpy(a) for a in index.search(as_f32(queries[s:s + chunk]), search_k))
        invalid = idx < 0
        if self_index is not None:
            invalid |= idx == self_index[s:s + chunk, None]
        if query_groups is not None:
            invalid |= key_groups[idx.clamp(min=0)] == query_groups[s:s + chunk, None]
        scores = scores.masked_fill_(invalid, -math.inf)
        idx = idx.masked_fill_(invalid, n)  # sorts after every valid index
        best_scores[s:s + chunk], best_idx[s:s + chunk] = _merge_topk(scores, idx, scores[:, :0], idx[:, :0], k)
    best_idx[torch.isneginf(best_scores)] = -1
    return best_scores, best_idx


def mine_neighbors(
    queries: torch.Tensor,
    keys: torch.Tensor | None = None,
    k: int = 1,
    block_size: int = 4096,
    exclude_self: bool = True,
    exclude_duplicates: bool = True,
    *,
    query_indices: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    backend: str = "exact",
    nlist: int | None = None,
    nprobe: int = 32,
    faiss_extra: int = 8,
    faiss_train_size: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner-product neighbours of each query row among the key rows (cosine for normalised features).

    Args:
        queries: (Nq, D) features, any float dtype (fp16 banks are read block by block; products accumulate in fp32).
        keys: (Nk, D) features; `None` mines the queries against themselves.
        k: neighbours per query.
        block_size: rows per query block and per key block (key blocks widen to block_size² / Nq when there are
            fewer queries); memory is O(block_size² + Nq · k), never O(N²).
        exclude_self: drop the query itself: key i for query i when `keys is None`, else key `query_indices[i]`.
        exclude_duplicates: also drop keys whose features are identical to the query's own: to its bank row when
            `query_indices` is given (or `keys is None`), else to the query row itself. A duplicated image or caption
            is thus never its own neighbour.
        query_indices: (Nq,) index of each query's own row among the keys (A-CLIP-PING: the batch's dataset indices).
        key_groups: precomputed `duplicate_groups(keys)`, to skip hashing the keys on every call.
        backend: "exact" (blockwise matrix products) or "faiss" (approximate: an IVF index with inner product and
            vectors stored fp16, `IndexIVFScalarQuantizer(QT_fp16)`,
            `nlist` lists, default 4·sqrt(N), trained with 10 k-means iterations on `faiss_train_size` rows, default
            40·nlist; `nprobe` lists searched; `k + 1 + faiss_extra` candidates are fetched so self and duplicates
            can be removed; a query left with fewer than k gets -1 slots).

    Returns:
        (scores, indices): float32 (Nq, k) and int64 (Nq, k), best first. Ties are broken deterministically: for equal
        scores the lowest key index wins (exact backend). Slots without a candidate hold score -inf and index -1.
    """
    if queries.ndim != 2:
        raise ValueError(f"queries must be (N, D), got {tuple(queries.shape)}")
    same = keys is None
    keys = queries if same else keys
    if keys.shape[1] != queries.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but keys have dim {keys.shape[1]}")
    queries, keys = queries.detach().cpu(), keys.detach().cpu()
    if same:
        keys = queries
    self_index = None
    if exclude_self:
        if query_indices is not None:
            self_index = torch.as_tensor(query_indices, dtype=torch.long).cpu().reshape(-1)
        elif same:
            self_index = torch.arange(queries.shape[0])
    query_groups = None
    if exclude_duplicates:
        if self_index is not None and not same:
            # queries are fresh features of bank rows: exclude the keys identical to each query's own bank row
            key_groups = duplicate_groups(keys) if key_groups is None else key_groups.cpu()
            query_groups = key_groups[self_index]
        elif same:
            key_groups = duplicate_groups(keys) if key_groups is None else key_groups.cpu()
            query_groups = key_groups
        else:
            # external queries: exclude the keys identical to the query itself
            groups = duplicate_groups(torch.cat([keys.float(), queries.float()]))
            key_groups, query_groups = groups[: keys.shape[0]], groups[keys.shape[0]:]
    else:
        key_groups = None
    if backend == "exact":
        return _mine_exact(queries, keys, k, block_size, self_index, query_groups, key_groups)
    if backend == "faiss":
        return _mine_faiss(queries, keys, k, self_index, query_groups, key_groups, nlist, nprobe, faiss_extra,
                           faiss_train_size, seed)
    raise ValueError(f"backend must be 'exact' or 'faiss', got {backend!r}")


# ----------------------------------------------------------------------------------------------------------------
# Bank files
# ----------------------------------------------------------------------------------------------------------------


def _as_teacher(teacher, modality: str, device=None):
    """A `Teacher` as it is, or a spec (str or None for the default) loaded with `load_teacher`."""
    if teacher is None or isinstance(teacher, (str, os.PathLike)):
        from .teachers import load_teacher

        return load_teacher(None if teacher is None else str(teacher), modality, device=device)
    return teacher


def _teacher_meta(teacher) -> dict:
    return {"spec": teacher.name, "dim": teacher.dim}


class FeatureBank(ImageTextTables):
    """A frozen feature bank with its neighbour lists, read-only and shared by every process (no all-gather).

    >>> bank = FeatureBank.load("banks/shapes")                       # doctest: +SKIP
    >>> targets = bank.lookup(batch["index"])                         # doctest: +SKIP
    >>> targets["image_nn"].shape, targets["image_xnn"].shape         # doctest: +SKIP
    (torch.Size([64, 208]), torch.Size([64, 384]))

    A `TargetSource` of `lightclip.objectives`: the trainer reads each batch's `neighbor_targets` through
    `batch_targets`.
    """

    target_key = "neighbor_targets"

    def __init__(self, image_features: torch.Tensor, text_features: torch.Tensor, image_nn: torch.Tensor,
                 text_nn: torch.Tensor, metadata: dict | None = None, path: str | None = None, seed: int = 0):
        if not (len(image_features) == len(text_features) == len(image_nn) == len(text_nn)):
            raise ValueError("bank tensors must all have N rows")
        self.image_features, self.text_features = image_features, text_features
        self.image_nn, self.text_nn = image_nn, text_nn
        self.metadata = metadata or {}
        self.path = path
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def load(cls, path: str, mmap: bool = True, seed: int = 0) -> "FeatureBank":
        """Open a bank folder. With mmap=True the features are memory-mapped (nothing is read until looked up)."""
        metadata = read_folder_metadata(path, METADATA_FILE, FORMAT_VERSION, "feature bank",
                                        "examples/build_neighbors.py")
        features = load_safetensors(os.path.join(path, FEATURES_FILE), mmap)
        neighbors = load_safetensors(os.path.join(path, NEIGHBORS_FILE), mmap)
        return cls(features["image"], features["text"], neighbors["image_nn"], neighbors["text_nn"], metadata,
                   path, seed)

    @property
    def k(self) -> int:
        return self.image_nn.shape[1]

    def check_dataset(self, dataset, image_teacher=None, text_teacher=None,
                      rebuild: str = "Rebuild it with examples/build_neighbors.py --overwrite, or choose another "
                                     "folder.") -> None:
        """Raise `ValueError` unless the bank was built from `dataset` (one pass over its rows, no image decoded)
        and with each teacher given (a `Teacher` or a spec; None accepts the bank's own): a bank of other rows
        would train on another dataset's neighbours, or fail on the first index it lacks."""
        expected = dataset_identity(dataset, self.metadata.get("caption_index", 0))
        teachers = {modality: _teacher_meta(_as_teacher(teacher, modality))
                    for modality, teacher in (("image", image_teacher), ("text", text_teacher)) if teacher is not None}
        if teachers:
            expected["teachers"] = teachers
        check_built_from(self.metadata, expected, self.path, "feature bank", rebuild)

    def _pick(self, table: torch.Tensor, indices: torch.Tensor, top_k: int, generator) -> torch.Tensor:
        if top_k > table.shape[1]:
            raise ValueError(f"top_k={top_k} but the bank stores only k={table.shape[1]} neighbours; rebuild with "
                             f"--k {top_k}")
        candidates = gather_rows(table, indices)
        if top_k == 1:
            return candidates[:, 0]
        column = torch.randint(top_k, (len(indices),), generator=generator or self.generator)
        picked = candidates.gather(1, column[:, None]).squeeze(1)
        return torch.where(picked >= 0, picked, candidates[:, 0])  # fewer than top_k candidates: take the best

    def lookup(self, indices: torch.Tensor, xnn_mode: str = "x2", top_k: int = 1,
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               neighbors: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Constant float32 targets for a batch of dataset indices (B,).

        With n_I = image neighbour and n_T = text neighbour of each index (top-1, or drawn uniformly from the top_k
        with `generator`, else the bank's own seeded generator):
        - `image_nn`  = z̃_I[n_I]  (image head target, image teacher space);
        - `text_nn`   = z̃_T[n_T]  (text head target, text teacher space);
        - `image_xnn` (text teacher space):  x2 -> z̃_T[n_I], x1 -> z̃_T[n_T];
        - `text_xnn`  (image teacher space): x2 -> z̃_I[n_T], x1 -> z̃_I[n_I];
        - `image_nn_index`, `text_nn_index`: n_I, n_T (int64).
        `neighbors=(n_I, n_T)` overrides the stored lists (used by `ActiveTeacherNeighbors`).
        Outputs are on `device` (default: the device of `indices`).
        """
        if xnn_mode not in ("x1", "x2"):
            raise ValueError(f"xnn_mode must be 'x1' or 'x2', got {xnn_mode!r}")
        device = device if device is not None else (indices.device if isinstance(indices, torch.Tensor) else "cpu")
        indices = torch.as_tensor(indices, dtype=torch.long).cpu().reshape(-1)
        if neighbors is None:
            n_i = self._pick(self.image_nn, indices, top_k, generator)
            n_t = self._pick(self.text_nn, indices, top_k, generator)
        else:
            n_i, n_t = (n.long().cpu() for n in neighbors)
        for name, found in (("image", n_i), ("text", n_t)):
            missing = indices[found < 0]
            if len(missing):  # -1 would silently read the bank's last row
                raise ValueError(
                    f"the {name} bank has no neighbour for dataset row(s) {missing[:5].tolist()}"
                    f"{' ...' if len(missing) > 5 else ''}: every other sample is excluded as its duplicate. Rebuild "
                    "the bank from data with distinct samples, or drop the nn/xnn objectives."
                )
        z_i = lambda n: gather_rows(self.image_features, n).float()  # noqa: E731  (float32 already on CPU)
        z_t = lambda n: gather_rows(self.text_features, n).float()  # noqa: E731
        out = {
            "image_nn": z_i(n_i),
            "text_nn": z_t(n_t),
            "image_xnn": z_t(n_i) if xnn_mode == "x2" else z_t(n_t),
            "text_xnn": z_i(n_t) if xnn_mode == "x2" else z_i(n_i),
            "image_nn_index": n_i,
            "text_nn_index": n_t,
        }
        return {key: value.to(device) for key, value in out.items()}

    def batch_targets(self, batch: Mapping[str, Any], settings: LightClipPretrainingConfig,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """`lookup` of a collated batch's `index`, with the run's `xnn_mode` and `neighbor_top_k`."""
        return self.lookup(batch["index"], xnn_mode=settings.xnn_mode, top_k=settings.neighbor_top_k, device=device)

    def state_dict(self) -> dict:
        """The sampling RNG state, so `accelerator.register_for_checkpointing(bank)` resumes top-k sampling."""
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])

    def __repr__(self) -> str:
        teachers = self.metadata.get("teachers", {})
        return (f"FeatureBank(n={len(self)}, k={self.k}, image_dim={self.image_dim}, text_dim={self.text_dim}, "
                f"image_teacher={teachers.get('image', {}).get('spec')!r}, "
                f"text_teacher={teachers.get('text', {}).get('spec')!r}, path={self.path!r})")


def _encode_dataset(dataset, n, image_teacher, text_teacher, batch_size, caption_index, show_progress):
    from tqdm.auto import tqdm

    image = torch.empty(n, image_teacher.dim, dtype=torch.float16)
    text = torch.empty(n, text_teacher.dim, dtype=torch.float16)
    seen = torch.zeros(n, dtype=torch.bool)
    rows = iter_rows(dataset, batch_size, decode=not image_teacher.needs_indices)
    bar = tqdm(total=n, desc="teacher features", unit="pair", disable=not show_progress)
    position = 0
    while position < n:
        batch = [next(rows) for _ in range(min(batch_size, n - position))]
        idx = torch.tensor([int(r.get("index", position + j)) for j, r in enumerate(batch)], dtype=torch.long)
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"dataset 'index' values must lie in [0, {n}), got {idx.min()}..{idx.max()}")
        images = None if image_teacher.needs_indices else [r["image"] for r in batch]
        texts = [row_caption(r, caption_index) for r in batch]
        image[idx] = image_teacher.encode(images or [None] * len(idx), indices=idx).cpu().half()
        text[idx] = text_teacher.encode(texts, indices=idx).cpu().half()
        seen[idx] = True
        position += len(batch)
        bar.update(len(batch))
    bar.close()
    if not bool(seen.all()):
        raise ValueError("dataset 'index' values are not a permutation of 0..N-1; the bank needs row i = index i")
    for table in (image, text):
        renormalize_fp16_(table)
    return image, text


def _mine_bank(image, text, k, backend, block_size, nprobe, show_progress):
    out = {}
    index_dtype = torch.int32 if len(image) < 2**31 else torch.int64
    for name, feats in (("image", image), ("text", text)):
        if show_progress:
            print(f"mining top-{k} {name} neighbours of {len(feats)} rows ({backend})", flush=True)
        scores, idx = mine_neighbors(feats, k=k, block_size=block_size, backend=backend, nprobe=nprobe)
        out[f"{name}_nn"] = idx.to(index_dtype).contiguous()
        out[f"{name}_nn_scores"] = scores.float().contiguous()
    return out


def build_feature_bank(
    dataset,
    image_teacher=None,
    text_teacher=None,
    out_dir: str = "feature_bank",
    k: int = 8,
    batch_size: int = 256,
    *,
    caption_index: int = 0,
    backend: str = "exact",
    block_size: int = 4096,
    nprobe: int = 32,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> FeatureBank:
    """Encode a dataset with two frozen teachers, mine top-k neighbours in each teacher space, write one folder.

    Args:
        dataset: a `datasets.Dataset` or `IterableDataset` (tar shards, streaming; read twice: once for the
            fingerprint, once for the features) or a sequence of dicts, with the standard lightclip columns `image`,
            `captions` (list[str]) and `index` (row i of the bank = dataset index i; must cover 0..N-1). The caption
            encoded for row i is `captions[caption_index]` (the first caption by default; the last one when a row has
            fewer).
        image_teacher, text_teacher: `Teacher` objects or specs for `load_teacher` (None = the default teacher).
        out_dir: the bank folder. An existing bank is reused when the dataset (N and fingerprint), the teachers (spec
            and dim) and the caption index match; a mismatch raises `ValueError` naming it unless `overwrite=True`.
            When only k or the backend differ, the stored features are re-mined without running the teachers. The
            folder is written whole (`write_table_folder`): of two builders of one bank, the second to finish reads
            the first's.
        k, backend, block_size, nprobe: see `mine_neighbors`.
    Returns:
        the loaded `FeatureBank`.
    """
    image_teacher = _as_teacher(image_teacher, "image", device)
    text_teacher = _as_teacher(text_teacher, "text", device)
    expected = {
        **dataset_identity(dataset, caption_index),
        "teachers": {"image": _teacher_meta(image_teacher), "text": _teacher_meta(text_teacher)},
        "caption_index": caption_index,
    }
    n = expected["n"]
    meta_path = os.path.join(out_dir, METADATA_FILE)
    existed = os.path.isfile(meta_path)
    features = None
    found = None if overwrite else read_matching_metadata(meta_path, expected, FORMAT_VERSION, "feature bank")
    if found is not None:
        if found.get("k") == k and found.get("backend") == backend:
            return FeatureBank.load(out_dir)
        bank = FeatureBank.load(out_dir, mmap=False)
        features = {"image": bank.image_features, "text": bank.text_features}
    if features is None:
        image, text = _encode_dataset(dataset, n, image_teacher, text_teacher, batch_size, caption_index,
                                      show_progress)
        features = {"image": image.contiguous(), "text": text.contiguous()}
    neighbors = _mine_bank(features["image"], features["text"], k, backend, block_size, nprobe, show_progress)
    metadata = {
        "format_version": FORMAT_VERSION,
        "k": k,
        "backend": backend,
        **expected,
        "fingerprint_method": "sha256(N, captions[caption_index], image path or sha256(image bytes)) per row",
        "datasets_fingerprint": getattr(dataset, "_fingerprint", None),
        "features": {"dtype": "float16", "normalized": True},
        "neighbors": {"dtype": str(neighbors["image_nn"].dtype).removeprefix("torch."),
                      "exclude_self": True, "exclude_duplicates": True, "tie_break": "lowest index"},
    }
    tables = {FEATURES_FILE: features, NEIGHBORS_FILE: neighbors}
    if not write_table_folder(out_dir, tables, METADATA_FILE, metadata, replace=existed):
        # another builder finished this bank first: use it if it was built from the same data and teachers
        read_matching_metadata(meta_path, expected, FORMAT_VERSION, "feature bank")
    return FeatureBank.load(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# A-CLIP-PING
# ----------------------------------------------------------------------------------------------------------------


class ActiveTeacherNeighbors:
    """A-CLIP-PING (docs/method.md, our reading): the teachers run online on the batch's own (augmented) inputs;
    each query's nearest neighbour is searched in the frozen bank, in the teacher's space, excluding the sample's
    own bank row and rows identical to it. Targets are then read from the bank exactly as `FeatureBank.lookup`.

    Costs one forward pass of each teacher plus a (B × N) product per modality per step (see
    benchmarks/RESULTS.md (section 6)). The search runs on CPU, blockwise, against fp32 copies of the bank when both
    fit in `max_cache_bytes` (2 GiB by default), else against the (memory-mapped) fp16 bank.
    """

    target_key = "neighbor_targets"

    def __init__(self, bank: FeatureBank, image_teacher, text_teacher, block_size: int = 4096,
                 max_cache_bytes: int = 2 * 2**30):
        self.bank = bank
        self.image_teacher = _as_teacher(image_teacher, "image")
        self.text_teacher = _as_teacher(text_teacher, "text")
        for teacher, dim, name in ((self.image_teacher, bank.image_dim, "image"),
                                   (self.text_teacher, bank.text_dim, "text")):
            if teacher.dim != dim:
                raise ValueError(f"{name} teacher {teacher.name!r} has dim {teacher.dim}, the bank has {dim}")
        self.block_size = block_size
        # fp32 copies of the bank avoid an fp16 -> fp32 conversion of all N rows on every step, if they fit
        fits = (bank.image_features.numel() + bank.text_features.numel()) * 4 <= max_cache_bytes
        self.image_keys = bank.image_features.float() if fits else bank.image_features
        self.text_keys = bank.text_features.float() if fits else bank.text_features
        self.image_groups = duplicate_groups(bank.image_features)
        self.text_groups = duplicate_groups(bank.text_features)
        self.rows_searched = 0  # batch rows whose neighbours came from the online teachers, for the train log

    def search(self, queries: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor, indices: torch.Tensor,
               top_k: int, generator) -> torch.Tensor:
        _, idx = mine_neighbors(queries, keys, k=top_k, block_size=self.block_size, query_indices=indices,
                                key_groups=groups)
        if top_k == 1:
            return idx[:, 0]
        column = torch.randint(top_k, (len(idx),), generator=generator or self.bank.generator)
        picked = idx.gather(1, column[:, None]).squeeze(1)
        return torch.where(picked >= 0, picked, idx[:, 0])

    def lookup(self, indices: torch.Tensor, images, texts, xnn_mode: str = "x2", top_k: int = 1,
               generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
        """Like `FeatureBank.lookup`, but n_I, n_T come from the teachers' features of `images` / `texts` (lists of
        PIL images or strings, or image tensors (B, 3, H, W) in [0, 1]) searched against the bank."""
        device = device if device is not None else (indices.device if isinstance(indices, torch.Tensor) else "cpu")
        indices = torch.as_tensor(indices, dtype=torch.long).cpu().reshape(-1)
        q_i = self.image_teacher.encode(images, indices=indices).cpu()
        q_t = self.text_teacher.encode(texts, indices=indices).cpu()
        n_i = self.search(q_i, self.image_keys, self.image_groups, indices, top_k, generator)
        n_t = self.search(q_t, self.text_keys, self.text_groups, indices, top_k, generator)
        self.rows_searched += len(indices)
        return self.bank.lookup(indices, xnn_mode=xnn_mode, device=device, neighbors=(n_i, n_t))

    def batch_targets(self, batch: Mapping[str, Any], settings: LightClipPretrainingConfig,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """`lookup` of a collated batch's `index` and raw `images` / `texts` (`ImageTextCollator(...,
        return_raw=True)`), with the run's `xnn_mode` and `neighbor_top_k`."""
        return self.lookup(batch["index"], batch["images"], batch["texts"], xnn_mode=settings.xnn_mode,
                           top_k=settings.neighbor_top_k, device=device)

    def state_dict(self) -> dict:
        return self.bank.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state)
