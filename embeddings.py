"""Item embeddings, the input of the SIDs: text TF-IDF + SVD, or co-occurrence PPMI + SVD (from
the train split only), or a file of any [n_items, D] embeddings.

    emb, name = item_embeddings(cfg, data, raw, splits["train"])   # what the SIDs are built from

Built with numpy and torch's sparse product alone: a sparse matrix (CSR), a randomised SVD, TF-IDF
over item text, co-occurrence counts within a window of training histories, and PPMI.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import torch

from dataset import Dataset, RawData, Split
from opq import load_embeddings

class CSR:
    """A sparse matrix in compressed-row form, just enough for a randomised SVD: `A @ X` for a
    dense X, and `A.T`. Built and held with numpy; the product runs in torch's sparse CSR kernel
    (float64, like the dense formula), which is much faster than numpy's alternatives (gathering
    rows of X per stored value and np.add.reduceat) and keeps a million items within minutes."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, shape: tuple,
                 symmetric: bool = False):
        """Row r's values are data[indptr[r]:indptr[r + 1]], in columns indices[...] (sorted within
        the row); `symmetric`: A.T is A (no transposed copy is made)."""
        self.indptr = np.asarray(indptr, np.int64)                     # (n_rows + 1,)
        self.indices = np.asarray(indices, np.int32)                   # (nnz,) column of each value
        self.data = np.asarray(data, np.float32)                       # (nnz,)
        self.shape, self.symmetric, self._torch = shape, symmetric, None

    @classmethod
    def from_triples(cls, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple) -> "CSR":
        """From (row, col, value) triples in any order (no duplicates)."""
        order = np.lexsort((cols, rows))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))])
        return cls(indptr, cols[order], vals[order], shape)

    def rows(self) -> np.ndarray:
        """(nnz,) the row of each stored value."""
        return np.repeat(np.arange(self.shape[0], dtype=np.int32), np.diff(self.indptr))

    @property
    def T(self) -> "CSR":
        return self if self.symmetric else CSR.from_triples(self.indices, self.rows(), self.data, self.shape[::-1])

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        """(n_rows, n_cols) @ (n_cols, k) -> (n_rows, k) float64."""
        if self._torch is None:
            index = np.int32 if len(self.data) < 2 ** 31 else np.int64
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                        # "sparse CSR support is in beta"
                self._torch = torch.sparse_csr_tensor(
                    torch.from_numpy(self.indptr.astype(index)), torch.from_numpy(self.indices.astype(index, copy=False)),
                    torch.from_numpy(self.data.astype(np.float64)), self.shape, check_invariants=False)
        if self.shape[0] == 0 or len(self.data) == 0:
            return np.zeros((self.shape[0], x.shape[1]))
        return (self._torch @ torch.from_numpy(np.ascontiguousarray(x, np.float64))).numpy()

    def toarray(self) -> np.ndarray:
        dense = np.zeros(self.shape, np.float32)
        dense[self.rows(), self.indices] = self.data
        return dense


def truncated_svd(matrix, k: int, seed: int = 0, n_power: int = 4):
    """Randomised SVD (Halko et al. 2011) of a dense array or a CSR: U (n, k), S (k,)."""
    rng = np.random.default_rng(seed)
    k = min(k, *matrix.shape)
    transposed = matrix.T
    q = matrix @ rng.standard_normal((matrix.shape[1], k + 10))
    for _ in range(n_power):
        q, _ = np.linalg.qr(matrix @ (transposed @ q))
    u, s, _ = np.linalg.svd((transposed @ q).T, full_matrices=False)
    return (q @ u)[:, :k], s[:k]


def text_embeddings(data: Dataset, item_text: dict, dim: int, seed: int) -> np.ndarray:
    """TF-IDF over title/genre/attribute words (words in >= 2 items), then a truncated SVD.
    The TF-IDF matrix is sparse (items x at most 8192 words)."""
    docs = [re.findall(r"[a-z0-9']+", item_text.get(i, "").lower()) for i in data.item_raw]
    df: dict = {}
    for doc in docs:                                   # text: tokenising is per item and per word
        for w in set(doc):
            df[w] = df.get(w, 0) + 1
    vocab = {w: k for k, w in enumerate(sorted(w for w, c in df.items() if c >= 2)[:8192])}
    if not vocab:
        raise ValueError("item text: no word occurs in two items; use --emb_source=cf or --item_emb")
    word_ids = [[vocab[w] for w in doc if w in vocab] for doc in docs]
    rows = np.repeat(np.arange(len(docs)), [len(ids) for ids in word_ids])
    cols = np.fromiter((w for ids in word_ids for w in ids), np.int64, len(rows))
    keys, tf = np.unique(rows * len(vocab) + cols, return_counts=True)    # term counts per (item, word)
    rows, cols = keys // len(vocab), keys % len(vocab)
    idf = np.log(len(docs) / np.array([df[w] for w in sorted(vocab, key=vocab.get)])) + 1.0
    vals = (tf * idf[cols]).astype(np.float32)
    norms = np.sqrt(np.bincount(rows, weights=vals.astype(np.float64) ** 2, minlength=len(docs))).astype(np.float32)
    vals /= np.maximum(norms[rows], 1e-12)
    u, s = truncated_svd(CSR.from_triples(rows, cols, vals, (len(docs), len(vocab))), dim, seed)
    return (u * s).astype(np.float32)


def cooccurrence(train: Split, n_items: int, window: int = 5, blocks: int = 8) -> CSR:
    """Symmetric item co-occurrence counts, sparse: each training example's target with each of the
    last `window` items before it (within its history window); C[a, b] = n(a, b) + n(b, a).
    Counted in `blocks` ranges of rows, so that the sort's memory is a fraction of the pairs', and
    kept as int32 columns and float32 counts (8 bytes per stored pair)."""
    offsets = range(1, min(window, train.max_history) + 1)              # <= 5, vectorised over examples
    has = [train.pos - w >= train.start for w in offsets]
    a = np.empty(sum(int(h.sum()) for h in has), np.int32)
    b = np.empty_like(a)
    at = 0
    for w, ok in zip(offsets, has):
        pos = train.pos[ok]
        a[at:at + len(pos)], b[at:at + len(pos)] = train.items[pos], train.items[pos - w]
        at += len(pos)
    del has
    row_counts, cols, counts = [], [], []
    bounds = np.linspace(0, n_items, blocks + 1).astype(np.int64)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mine_a, mine_b = (a >= lo) & (a < hi), (b >= lo) & (b < hi)    # both directions of each pair
        keys = np.concatenate([(a[mine_a] - lo).astype(np.int64) * n_items + b[mine_a],
                               (b[mine_b] - lo).astype(np.int64) * n_items + a[mine_b]])
        del mine_a, mine_b
        keys, n = np.unique(keys, return_counts=True)                  # sorted: by row, then column
        row_counts.append(np.bincount(keys // n_items, minlength=hi - lo))
        cols.append((keys % n_items).astype(np.int32)); counts.append(n.astype(np.float32))
        del keys, n
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_counts))])
    return CSR(indptr, np.concatenate(cols), np.concatenate(counts), (n_items, n_items), symmetric=True)


def ppmi(counts: CSR) -> CSR:
    """Positive pointwise mutual information of a symmetric count matrix, on its stored entries
    (an absent pair has PMI -inf, so 0 after clipping). float32, as the dense formula."""
    rows = counts.rows()
    row = np.bincount(rows, weights=counts.data, minlength=counts.shape[0]).astype(np.float32)  # exact: integers
    total = np.float32(row.sum(dtype=np.float64))
    pmi = np.log(counts.data * total / (row[rows] * row[counts.indices]))
    keep = pmi > 0
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=counts.shape[0]))])
    return CSR(indptr, counts.indices[keep], pmi[keep], counts.shape, symmetric=True)


def cf_embeddings(train: Split, n_items: int, dim: int, seed: int, window: int = 5) -> np.ndarray:
    """PPMI of item co-occurrence within `window` steps in TRAIN histories only, then an SVD.

    Each training example's last `window` history items co-occur with its target, so every
    counted pair comes from the train split (validation and test targets never appear). Sparse
    throughout: memory grows with the pairs, not with n_items squared.
    """
    u, s = truncated_svd(ppmi(cooccurrence(train, n_items, window)), dim, seed)
    return (u * np.sqrt(s)).astype(np.float32)


def read_item_emb(path: str, n_items: int, flag: str = "--item_emb") -> np.ndarray:
    """An [n_items, D] numeric .npy file -> float32 (opq.load_embeddings checks file and dtype)."""
    emb = load_embeddings(path, flag)
    if emb.shape[0] != n_items:
        raise ValueError(f"{flag}: expected shape [{n_items} items, D], got {emb.shape} from {path}")
    return emb.astype(np.float32)


EMB_DIM = 64   # width of the text and co-occurrence embeddings built here


def item_embeddings(cfg, data: Dataset, raw: RawData, train: Split) -> tuple[np.ndarray, str]:
    """The embeddings the SIDs are built from, and their name for the log (cfg: emb_source and
    seed, as in train.TrainConfig).

    An embeddings file (--item_emb, or found beside the data) is used alone, or with
    --emb_source=both joined with co-occurrence (LETTER: content + collaborative signal).
    Without a file: text TF-IDF, co-occurrence (cf), or both."""
    n_items, path = len(data.item_raw), raw.item_emb
    if path:
        emb = read_item_emb(path, n_items)
        if cfg.emb_source != "both":
            return emb, f"file {path}"
    if cfg.emb_source == "both" and not path and not raw.item_text:
        return cf_embeddings(train, n_items, EMB_DIM, cfg.seed), "cf (no item text nor embeddings file for 'both')"
    parts = []
    if path:                                                # emb_source "both": the file + cf
        parts.append(emb)
    elif cfg.emb_source in ("text", "both"):
        parts.append(text_embeddings(data, raw.item_text, EMB_DIM, cfg.seed))
    if cfg.emb_source in ("cf", "both"):
        parts.append(cf_embeddings(train, n_items, EMB_DIM, cfg.seed))
    parts = [p / max(np.linalg.norm(p, axis=1).mean(), 1e-12) for p in parts]  # equal weight in "both"
    name = f"file {path} + cf" if path else cfg.emb_source
    return np.concatenate(parts, axis=1), name


