"""Semantic IDs (SIDs) for items: OPQ codes, collision-free, with forward/inverted indexes.

Each item becomes a tuple of `n_digit` (4) codes in 0..255. The pipeline is:

    item embeddings [N, D]
      -> OPQ (opq.py): a learned rotation, then a 256-centroid k-means in each of 4 subspaces
      -> codes [N, 4]: each item's nearest centroid in each subspace
      -> collision resolution: two items never share a SID
      -> SIDIndex: forward index (item -> codes, uint8, 4 bytes per item), inverted index
         (codes -> item), prefix constraints (which next codes lead to a real item)

The token-id layout shared with the model (one vocabulary, no overlapping ranges):

    0 PAD | 1 BOS | 2 EOS | 3 .. 3+U-1 user buckets | 3+U + d*256 + c for digit d, code c

Files of an index folder: item_id2tokens.npy is the forward index [n_items, 4] uint8,
tokens2item.pkl the inverted index {(c0, c1, c2, c3): item_id}, opq.npz the quantiser (to encode
new items). Both index files hold codes 0..255, not token ids; their names are kept for
compatibility with the original design.

Only numpy and opq.py are needed; torch tensors are accepted (and returned) by `SIDIndex.prefix_mask`
and `SIDIndex.lookup` so the beam search can hand its tensors over directly.

    python sid.py --emb=items.npy --out=DIR   # build and save an index from any [N, D] matrix

The command line alone uses cli.py (flags, --help, errors as one line); copied with opq.py and
without cli.py, the module still imports and does everything else.

The file reads top-down: the SIDs (token ids, packed keys), the index (SIDIndex, its files,
build_index), collision resolution, command line.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import time
from dataclasses import dataclass

import numpy as np

if __package__:                  # copied into a package: mypkg/sid.py beside mypkg/opq.py
    from .opq import CODEBOOK_SIZE, OPQ, check_embeddings, load_embeddings, read_npy, read_npz, train_opq
else:                            # a flat folder, as here
    from opq import CODEBOOK_SIZE, OPQ, check_embeddings, load_embeddings, read_npy, read_npz, train_opq

# ----------------------------------------------------------------------------------------------
# Constants: the token-id layout and the shape of a SID
# ----------------------------------------------------------------------------------------------

PAD, BOS, EOS = 0, 1, 2          # special token ids
N_SPECIAL = 3                    # number of special tokens: user-bucket ids start here
N_DIGIT = 4                      # codes per SID
INDEX_VERSION = 1                # format of opq.npz; load refuses any other version


# ----------------------------------------------------------------------------------------------
# SIDs: token ids and user buckets, packed uint32 keys, checks of the inputs
# ----------------------------------------------------------------------------------------------

def _as_int_array(values, name: str) -> np.ndarray:
    """Integer numpy view of `values` (numpy, torch or list); floats and bools are an error."""
    array = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer array, got dtype {array.dtype}")
    return array


def _check_range(array: np.ndarray, low: int, high: int, name: str) -> None:
    """Raise unless every value is in [low, high)."""
    if array.size and (array.min() < low or array.max() >= high):
        bad = array[(array < low) | (array >= high)].ravel()[0]
        raise ValueError(f"{name}: expected values in [{low}, {high}), got {int(bad)}")


def codes_to_tokens(codes, n_user_buckets: int, codebook_size: int = CODEBOOK_SIZE) -> np.ndarray:
    """SID codes [..., n_digit] in 0..codebook_size-1 -> token ids [..., n_digit] (int64)."""
    codes = _as_int_array(codes, "codes").astype(np.int64)
    _check_range(codes, 0, codebook_size, "codes")
    digit = np.arange(codes.shape[-1], dtype=np.int64)
    return N_SPECIAL + n_user_buckets + digit * codebook_size + codes


def tokens_to_codes(tokens, n_user_buckets: int, codebook_size: int = CODEBOOK_SIZE) -> np.ndarray:
    """Token ids [..., n_digit] -> SID codes [..., n_digit] (int64). Each digit has its own range."""
    tokens = _as_int_array(tokens, "tokens").astype(np.int64)
    digit = np.arange(tokens.shape[-1], dtype=np.int64)
    codes = tokens - (N_SPECIAL + n_user_buckets + digit * codebook_size)
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        bad = np.argwhere((codes < 0) | (codes >= codebook_size))[0]
        raise ValueError(f"tokens: digit {bad[-1]} expects ids in "
                         f"[{N_SPECIAL + n_user_buckets + bad[-1] * codebook_size}, "
                         f"{N_SPECIAL + n_user_buckets + (bad[-1] + 1) * codebook_size}), "
                         f"got {int(tokens[tuple(bad)])}")
    return codes


def user_bucket(raw_user_id, n_user_buckets: int) -> int:
    """Stable hash of a raw user id (hashed by its str form) into [0, n_user_buckets).

    Python's hash() of a str is salted per process, so it would give every process, and every
    run, different buckets. blake2b is the same everywhere.
    """
    if n_user_buckets <= 0:
        raise ValueError(f"n_user_buckets: expected a positive int, got {n_user_buckets}")
    digest = hashlib.blake2b(str(raw_user_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_user_buckets


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """[..., 4] codes in 0..255 -> [...] uint32 keys, c0 in the high byte (sorts like the tuple)."""
    codes = codes.astype(np.uint32)
    return (codes[..., 0] << 24) | (codes[..., 1] << 16) | (codes[..., 2] << 8) | codes[..., 3]


def unpack_keys(keys) -> np.ndarray:
    """pack_codes undone: [...] packed keys -> [..., 4] int64 codes."""
    return (np.asarray(keys, np.int64)[..., None] >> np.array([24, 16, 8, 0])) & 255


# ----------------------------------------------------------------------------------------------
# The index: lookups and prefix constraints, its files, and build_index (embeddings -> index)
# ----------------------------------------------------------------------------------------------

class SIDIndex:
    """Forward index (item -> codes), inverted index (codes -> item) and prefix constraints.

    item_codes : uint8 array, shape = (n_items, n_digit); row i is item i's SID (4 bytes/item).
    Built from the forward index alone: a sorted array of packed uint32 keys for lookup, and for
    each prefix length l a packed bitmap of the codes that extend each prefix to a real item.
    """

    def __init__(self, item_codes, quantizer: OPQ | None = None):
        item_codes = _as_int_array(item_codes, "item_codes")
        if item_codes.ndim != 2 or item_codes.shape[1] != N_DIGIT or item_codes.shape[0] == 0:
            raise ValueError(f"item_codes: expected shape [n_items>0, {N_DIGIT}], got {item_codes.shape}")
        _check_range(item_codes, 0, CODEBOOK_SIZE, "item_codes")
        self.item_codes = item_codes.astype(np.uint8)
        self.quantizer = quantizer
        keys = pack_codes(self.item_codes)
        order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[order]                               # [N] uint32
        self.sorted_items = order.astype(np.int64)                   # [N]
        if (np.diff(self.sorted_keys) == 0).any():
            dup = self.sorted_keys[1:][np.diff(self.sorted_keys) == 0][0]
            raise ValueError(f"item_codes: two items share the SID with key {int(dup)}; SIDs must be unique")
        # prefix_keys[l]: sorted unique packed l-digit prefixes; children[l]: [n_prefix, 32] uint8,
        # bit c of row p set when prefix p followed by code c starts some real item.
        self.prefix_keys, self.children = [], []
        for length in range(N_DIGIT):
            prefix = (keys >> np.uint32(8 * (N_DIGIT - length))).astype(np.int64) if length else np.zeros_like(keys, np.int64)
            uniq, row = np.unique(prefix, return_inverse=True)
            bits = np.zeros((len(uniq), CODEBOOK_SIZE), bool)
            bits[row, self.item_codes[:, length]] = True
            self.prefix_keys.append(uniq)
            self.children.append(np.packbits(bits, axis=1, bitorder="little"))

    @property
    def n_items(self) -> int:
        return self.item_codes.shape[0]

    def lookup(self, codes):
        """codes [..., 4] in 0..255 -> item ids [...] (int64), -1 where no item has that SID."""
        as_torch = hasattr(codes, "detach")
        array = _as_int_array(codes, "codes")
        if array.shape[-1:] != (N_DIGIT,):
            raise ValueError(f"codes: expected shape [..., {N_DIGIT}], got {tuple(array.shape)}")
        _check_range(array, 0, CODEBOOK_SIZE, "codes")
        keys = pack_codes(array)
        pos = np.minimum(np.searchsorted(self.sorted_keys, keys), self.n_items - 1)
        items = np.where(self.sorted_keys[pos] == keys, self.sorted_items[pos], -1)
        return _like(items, codes) if as_torch else items

    def prefix_mask(self, prefixes):
        """prefixes [N, l] codes, l in 0..3 -> bool [N, 256]: codes that extend to a real item."""
        as_torch = hasattr(prefixes, "detach")
        array = _as_int_array(prefixes, "prefixes")
        if array.ndim != 2 or array.shape[1] >= N_DIGIT:
            raise ValueError(f"prefixes: expected shape [N, l] with l in 0..{N_DIGIT - 1}, "
                             f"got {tuple(array.shape)}")
        _check_range(array, 0, CODEBOOK_SIZE, "prefixes")
        length = array.shape[1]
        packed = np.zeros(array.shape[0], np.int64)
        for d in range(length):  # loop over digits (at most 3), vectorised over prefixes
            packed = (packed << 8) | array[:, d].astype(np.int64)
        table = self.prefix_keys[length]
        pos = np.minimum(np.searchsorted(table, packed), len(table) - 1)
        rows = self.children[length][pos]                             # [N, 32] packed bits
        mask = np.unpackbits(rows, axis=1, bitorder="little").astype(bool)
        mask &= (table[pos] == packed)[:, None]                       # unknown prefix: nothing
        return _like(mask, prefixes) if as_torch else mask

    def add_items(self, embeddings) -> tuple["SIDIndex", int]:
        """Encode new items with the trained quantiser; existing items keep their SIDs.

        Returns (extended index, number of new items moved to resolve collisions). New items get
        ids n_items, n_items+1, ...
        """
        if self.quantizer is None:
            raise ValueError("add_items needs the trained quantiser (opq.npz); this index has none")
        embeddings = check_embeddings(embeddings)
        new_codes, moved = resolve_collisions(self.quantizer.encode(embeddings),
                                              lambda rows: self.quantizer.distances(embeddings[rows]),
                                              self.sorted_keys)
        return SIDIndex(np.concatenate([self.item_codes, new_codes.astype(np.uint8)]), self.quantizer), moved

    def inverted_dict(self) -> dict:
        """The inverted index as saved in tokens2item.pkl: {(c0, c1, c2, c3): item_id}, plain ints."""
        return {tuple(int(c) for c in row): i for i, row in enumerate(self.item_codes.tolist())}

    # -- files ----------------------------------------------------------------------------------
    def files(self) -> dict:
        """{file name: bytes}: item_id2tokens.npy, tokens2item.pkl and (if trained here) opq.npz."""
        buf = io.BytesIO()
        np.save(buf, self.item_codes, allow_pickle=False)
        out = {"item_id2tokens.npy": buf.getvalue(), "tokens2item.pkl": pickle.dumps(self.inverted_dict(), protocol=4)}
        if self.quantizer is not None:
            q = self.quantizer
            buf = io.BytesIO()
            books = np.zeros((q.n_digit, CODEBOOK_SIZE, q.codebooks[0].shape[1]), np.float32)
            for d, book in enumerate(q.codebooks):
                books[d, : len(book)] = book
            np.savez(buf, version=INDEX_VERSION, mean=q.mean, rotation=q.rotation, codebooks=books,
                     n_centroids=np.array([len(b) for b in q.codebooks]), errors=np.array(q.errors),
                     placed_items=np.array(q.placed[0]), placed_sha256=np.array(q.placed[1]))
            out["opq.npz"] = buf.getvalue()
        return out

    def save(self, folder: str) -> None:
        """The files() into `folder`, each written whole (a temporary file renamed over the name)."""
        os.makedirs(folder, exist_ok=True)
        files = self.files()
        tmp = {name: os.path.join(folder, f".tmp-{os.getpid()}-{name}") for name in files}
        try:                                      # every file whole first (a full disk fails here), then renamed
            for name, data in files.items():
                with open(tmp[name], "wb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
        except OSError as e:
            for path in tmp.values():             # this process's own temporary files, and only them
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise OSError(e.errno, e.strerror, os.path.join(folder, name)) from None
        for name in files:
            os.replace(tmp[name], os.path.join(folder, name))

    @classmethod
    def load(cls, folder: str) -> "SIDIndex":
        """An index folder (what save() wrote): each file read once, then from_files."""
        files = {}
        for name in ("item_id2tokens.npy", "tokens2item.pkl", "opq.npz"):
            with contextlib.suppress(FileNotFoundError):
                with open(os.path.join(folder, name), "rb") as f:
                    files[name] = f.read()
        return cls.from_files(files, folder)

    @classmethod
    def from_files(cls, files: dict, folder: str) -> "SIDIndex":
        """{file name: bytes} as files() gives them -> the index, parsed without executing pickled
        code; the three files must agree. `folder`: for messages."""
        fwd, opq_path, inv = (os.path.join(folder, n) for n in ("item_id2tokens.npy", "opq.npz", "tokens2item.pkl"))
        for path in (fwd, inv):
            if os.path.basename(path) not in files:
                raise ValueError(f"{path}: missing; an index folder holds item_id2tokens.npy and tokens2item.pkl "
                                 "(and opq.npz); rebuild the index")
        codes = read_npy(files["item_id2tokens.npy"], fwd)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != N_DIGIT:
            raise ValueError(f"{fwd}: expected a uint8 [n_items, {N_DIGIT}] array, got {codes.dtype} {codes.shape}")
        quantizer = _load_opq(files["opq.npz"], opq_path) if "opq.npz" in files else None
        n, digest = quantizer.placed if quantizer is not None else (0, "")
        if digest and (len(codes) < n or hashlib.sha256(codes[:n].tobytes()).hexdigest() != digest):
            raise ValueError(f"{opq_path}: belongs to another index (it placed {n} items whose SIDs differ from "
                             f"the first {min(n, len(codes))} of {fwd}); keep an index's files together")
        try:
            index = cls(codes, quantizer)
        except ValueError as e:
            raise ValueError(f"{fwd}: {e}") from None
        try:
            table = _RefuseGlobals(io.BytesIO(files["tokens2item.pkl"])).load()
        except Exception as e:                # a refused global, or not a pickle: truncated, corrupt, nested
            raise ValueError(f"{inv}: not a plain pickle ({type(e).__name__}: {str(e)[:200]})") from None
        if table != index.inverted_dict():
            raise ValueError(f"{inv}: does not match {fwd}; rebuild the index")
        return index


def _load_opq(blob: bytes, path: str) -> OPQ:
    """opq.npz's bytes -> the quantiser, its arrays' kinds and shapes checked."""
    z = read_npz(blob, path)
    missing = [k for k in ("version", "mean", "rotation", "codebooks", "n_centroids", "errors") if k not in z]
    if missing or int(z["version"]) != INDEX_VERSION:
        raise ValueError(f"{path}: index version {z.get('version')}, this code reads {INDEX_VERSION} (missing: "
                         f"{missing}); rebuild the index")
    mean, rotation, books, counts = z["mean"], z["rotation"], z["codebooks"], z["n_centroids"]
    width = rotation.shape[0] if rotation.ndim == 2 else 0
    placed = [z[k].dtype.kind for k in ("placed_items", "placed_sha256") if k in z]
    if not all(a.dtype.kind == "f" and np.isfinite(a).all() for a in (mean, rotation, books)) \
            or counts.dtype.kind not in "iu" or placed not in ([], ["i", "U"], ["u", "U"]):
        raise ValueError(f"{path}: expected finite float arrays and integer counts, got "
                         f"{[str(a.dtype) for a in (mean, rotation, books, counts)]}")
    if not (mean.ndim == 1 and 0 < len(mean) <= width and rotation.shape == (width, width)
            and books.shape == (N_DIGIT, CODEBOOK_SIZE, width // N_DIGIT) and width % N_DIGIT == 0
            and counts.shape == (N_DIGIT,) and ((1 <= counts) & (counts <= CODEBOOK_SIZE)).all()):
        raise ValueError(f"{path}: shapes disagree: mean {mean.shape}, rotation {rotation.shape}, codebooks "
                         f"{books.shape}, n_centroids {counts.shape}")
    return OPQ(mean=mean, rotation=rotation, errors=list(z["errors"]),
               codebooks=[books[d, :k] for d, k in enumerate(counts)],
               placed=(int(z["placed_items"]), str(z["placed_sha256"])) if placed else (0, ""))


def _like(array: np.ndarray, reference):
    """numpy result -> torch tensor on `reference`'s device (torch imported only here)."""
    import torch
    return torch.from_numpy(array).to(reference.device)


class _RefuseGlobals(pickle.Unpickler):
    """Unpickler for plain dict/tuple/int data: every class or function reference is refused,
    so a crafted file cannot run code (its __reduce__ needs a global such as os.system)."""

    def find_class(self, module, name):
        raise ValueError(f"refusing to load {module}.{name}; only a plain {{(c0, c1, c2, c3): item_id}} dict "
                         "is allowed")


def build_index(embeddings, seed: int = 0, n_iter: int = 10, kmeans_iter: int = 5,
                codebook_size: int = CODEBOOK_SIZE, verbose: bool = False) -> tuple[SIDIndex, int]:
    """Embeddings [N, D] -> (collision-free SIDIndex, number of items moved by resolution)."""
    opq = train_opq(embeddings, N_DIGIT, codebook_size, n_iter, kmeans_iter, seed)
    embeddings = check_embeddings(embeddings)
    codes, moved = resolve_collisions(opq.encode(embeddings), lambda rows: opq.distances(embeddings[rows]))
    opq.placed = (len(codes), hashlib.sha256(codes.astype(np.uint8).tobytes()).hexdigest())
    if verbose:
        print(f"OPQ error per iteration: {' '.join(f'{e:.4g}' for e in opq.errors)}")
        print(f"collisions resolved: {moved} of {len(codes)} items moved to their nearest free SID")
    return SIDIndex(codes, opq), moved


# ----------------------------------------------------------------------------------------------
# Collision resolution: items whose nearest SID is taken move to the cheapest free one
# ----------------------------------------------------------------------------------------------

_BAND_LIMIT = 1 << 16   # most rank tuples one cost band may list at once (bounds memory) before it is narrowed
_FREE_LIST = 1 << 16    # once at most this many SIDs of real centroids are free, list them and price each one


def resolve_collisions(codes: np.ndarray, distances_of, taken_keys: np.ndarray | None = None):
    """Give every item a SID of its own. Returns (codes [N, 4] int64, number of moved items).

    codes [N, 4] are the nearest codes; distances_of(item_ids [M]) returns those items' squared
    distances to every code, [M, 4, 256], +inf for a code without a centroid (asked in blocks of
    the items that must move, so memory stays small); `taken_keys` are packed SIDs already in use
    (when adding items).

    The rule:
      1. Of the items that share a nearest SID, the one with the lowest id keeps it, unless the SID
         is in `taken_keys`. Every kept SID is reserved before any item moves.
      2. The other items (the movers) go one at a time, in increasing id. Each takes, among all
         free code tuples (not in `taken_keys`, not kept, not taken by an earlier mover), the one
         of least cost = dist[0, c0] + dist[1, c1] + dist[2, c2] + dist[3, c3] (float64, summed in
         that order), i.e. the least added quantization error.
      3. Equal costs go to the smallest tuple of ranks, compared digit 0 first; a code's rank is
         its place among its digit's codes sorted by distance (a stable sort: equal distances rank
         by code). A code without a centroid costs +inf, so a tuple using one is taken only once
         every tuple of real centroids is used, and then the ranks alone decide.
    So each mover gets what a best-first search gives that pops (cost, ranks) from a heap, one
    tuple at a time from its nearest tuple, until a free one comes up. Each choice changes which
    tuples are free for the next mover, so the order matters. The cost bands, the free list, the
    near-duplicate start hints and the rank pass below are only a faster way to the same answer.

    Time: one pass over the movers; each search costs about the number of used SIDs cheaper than
    its answer (vectorised), and once every SID made of real centroids is used, a pass down the
    four digits that skips full prefixes (`_first_free_in_rank_order`).
    """
    codes = codes.astype(np.int64).copy()
    keys = pack_codes(codes)
    taken_keys = np.zeros(0, np.uint32) if taken_keys is None else taken_keys
    keeps = _keepers(keys, taken_keys)
    movers = np.flatnonzero(~keeps)
    if len(taken_keys) + len(keys) > CODEBOOK_SIZE ** codes.shape[1]:
        raise ValueError(f"too many items: {len(taken_keys) + len(keys)} for "
                         f"{CODEBOOK_SIZE ** codes.shape[1]} SIDs")
    if movers.size == 0:
        return codes, 0
    taken, last = None, {}            # last: nearest SID -> (dist, cost, band width) of its last mover
    for block in np.array_split(movers, -(-len(movers) // 4096)):
        dist = distances_of(block).astype(np.float64)                    # [m, 4, 256]
        has_centroid = np.isfinite(dist[0])
        if not (np.isfinite(dist) == has_centroid).all():
            raise ValueError("distances: every item must have +inf for the same codes (those without a centroid)")
        if taken is None:
            taken = _TakenSIDs(has_centroid)
            taken.add(np.concatenate([taken_keys, keys[keeps]]))
        _place_movers(block, dist, has_centroid, codes, keys, taken, last)
    return codes, len(movers)


def _keepers(keys: np.ndarray, taken_keys: np.ndarray) -> np.ndarray:
    """[N] bool: the item keeps its nearest SID (lowest id at that SID, and the SID not in use)."""
    _, first = np.unique(keys, return_index=True)
    keeps = np.zeros(len(keys), bool)
    keeps[first] = True
    keeps &= ~np.isin(keys, taken_keys)
    return keeps


def _place_movers(block: np.ndarray, dist: np.ndarray, has_centroid: np.ndarray, codes: np.ndarray,
                  keys: np.ndarray, taken: _TakenSIDs, last: dict) -> None:
    """Move the items `block` (ids, increasing) one at a time, writing their new SIDs into `codes`
    and marking them in `taken`. dist [m, 4, 256] are their distances; `last` carries start hints."""
    order = np.argsort(dist, axis=2, kind="stable")                 # [m, 4, 256] codes, nearest first
    sorted_dist = np.take_along_axis(dist, order, 2)
    for item, item_dist, item_order, item_sorted in zip(block, dist, order, sorted_dist):  # id order
        if taken.finite_free == 0:
            codes[item] = _first_free_in_rank_order(item_order, taken)
        else:
            lo, width = _search_start(item_dist, has_centroid, last.get(keys[item]))
            codes[item], cost, width = _cheapest_free(item_dist, item_order, item_sorted, taken, lo, width)
            last[keys[item]] = (item_dist, cost, width)
        taken.add(pack_codes(codes[item][None]))


def _search_start(item_dist: np.ndarray, has_centroid: np.ndarray, hint):
    """(lo, band width) to start a search from: every SID costing <= lo is known to be used.

    Near-duplicates search the same region one after another. If the last mover from this item's
    nearest SID (hint = its (dist, cost, band width)) found every SID cheaper than `cost` used, then
    for this item every SID cheaper than cost - eps is used (eps bounds how much any SID's cost
    differs between the two), so its search may start there. No hint: start from scratch.
    """
    if hint is None:
        return -np.inf, None
    prev_dist, prev_cost, width = hint
    change = np.subtract(item_dist, prev_dist, where=has_centroid, out=np.zeros_like(item_dist))
    eps = np.abs(change).max(1).sum()
    lo = np.nextafter(prev_cost - eps - 1e-9 * (abs(prev_cost) + eps), -np.inf)  # < cost: ties stay in
    return lo, width


class _TakenSIDs:
    """The SIDs in use, with O(1) updates and vectorised questions about them.

    count1 [256] and count2 [65536] count used SIDs per 1- and 2-code prefix; a 3-code prefix gets a
    row of `used` [rows, 256] (which last codes are taken) the first time one of its SIDs is used,
    found through `slot` [2**24] (-1: none used). So memory is fixed (`slot`: 2**24 int32) plus 256
    bytes per 3-code prefix in use. `has_centroid` [4, 256] says which codes are real centroids: a
    SID made of those only is "finite", and `finite_free` counts the finite SIDs still free.
    """

    def __init__(self, has_centroid: np.ndarray):
        self.has_centroid = has_centroid
        self.count1 = np.zeros(1 << 8, np.int64)
        self.count2 = np.zeros(1 << 16, np.int64)
        self.slot = np.full(1 << 24, -1, np.int32)
        self.used = np.zeros((1024, CODEBOOK_SIZE), bool)
        self.row_count = np.zeros(1024, np.int64)
        self.n_rows = 0
        self.n_finite = int(np.prod(has_centroid.sum(1), dtype=np.int64))   # SIDs of real centroids only
        self.finite_free = self.n_finite
        self.free = None                 # sorted [F] free finite SIDs, listed once they are few
        self.alive = None                # [F] bool, False once taken

    def free_finite(self):
        """The free finite SIDs as packed keys, or None while there are too many to list."""
        if self.free is None and self.finite_free <= _FREE_LIST and self.n_finite <= 1 << 24:
            codes = [np.flatnonzero(h) for h in self.has_centroid]
            grid = np.stack(np.meshgrid(*codes, indexing="ij"), -1).reshape(-1, 4)  # every finite SID
            keys = pack_codes(grid).astype(np.int64)
            self.free = np.sort(keys[~self.is_used(keys)])
            self.alive = np.ones(len(self.free), bool)
        return None if self.free is None else self.free[self.alive]

    def _rows(self, prefix3: np.ndarray) -> np.ndarray:
        """Rows of `used` for these distinct 3-code prefixes, made where missing."""
        new = prefix3[self.slot[prefix3] < 0]
        if new.size:
            while self.n_rows + new.size > len(self.used):           # grow by doubling
                self.used = np.concatenate([self.used, np.zeros_like(self.used)])
                self.row_count = np.concatenate([self.row_count, np.zeros_like(self.row_count)])
            self.slot[new] = np.arange(self.n_rows, self.n_rows + new.size)
            self.n_rows += new.size
        return self.slot[prefix3]

    def add(self, keys: np.ndarray) -> None:
        """Mark distinct packed SIDs [n] as used (none of them may be used already)."""
        keys = keys.astype(np.int64)
        np.add.at(self.count1, keys >> 24, 1)
        np.add.at(self.count2, keys >> 16, 1)
        prefix3, inverse = np.unique(keys >> 8, return_inverse=True)
        rows = self._rows(prefix3)[inverse]
        self.used[rows, keys & 255] = True
        np.add.at(self.row_count, rows, 1)
        self.finite_free -= int(self.has_centroid[np.arange(4), unpack_keys(keys)].all(1).sum())
        if self.free is not None:
            at = np.minimum(np.searchsorted(self.free, keys), len(self.free) - 1)
            self.alive[at[self.free[at] == keys]] = False

    def is_used(self, keys: np.ndarray) -> np.ndarray:
        """[n] packed SIDs -> [n] bool."""
        rows = self.slot[keys >> 8]
        return (rows >= 0) & self.used[np.maximum(rows, 0), keys & 255]

    def prefix_full(self, prefixes: np.ndarray, length: int) -> np.ndarray:
        """[n] packed prefixes of `length` codes -> [n] bool: every SID below it is used."""
        if length == 1:
            return self.count1[prefixes] == 1 << 24
        if length == 2:
            return self.count2[prefixes] == 1 << 16
        rows = self.slot[prefixes]
        return (rows >= 0) & (self.row_count[np.maximum(rows, 0)] == CODEBOOK_SIZE)


def _cheapest_free(dist: np.ndarray, order: np.ndarray, sorted_dist: np.ndarray, taken: _TakenSIDs,
                   lo: float = -np.inf, width: float | None = None):
    """The free finite SID of least total distance, ties to the smallest tuple of ranks.

    dist [4, 256] is one item's float64 distance to every code (+inf: no centroid), order [4, 256]
    its codes nearest first and sorted_dist [4, 256] = dist in that order. The caller may know that
    every SID costing <= lo is used. Returns (codes [4], their cost, the band width that found it).

    When few finite SIDs are free, each is priced. Otherwise tuples are listed in bands of cost
    (lo, hi], cheapest band first, each built digit by digit in numpy (a prefix is extended only by
    ranks that can still fit under hi); the first band holding a free SID holds the answer. So the
    work is about the number of used SIDs that cost between lo and the answer, vectorised.
    """
    free = taken.free_finite()
    if free is not None:                                                 # few left: price each of them
        best_codes, best_cost = _cheapest_listed(free, dist, order)
        return best_codes, best_cost, width
    finite = [d[np.isfinite(d)] for d in sorted_dist]                    # 4 sorted arrays
    # least[d] / most[d]: the cheapest / dearest cost of digits d..3 (least[0]: the cheapest SID)
    least = np.concatenate([np.cumsum([f[0] for f in finite][::-1])[::-1], [0.0]])
    most = np.concatenate([np.cumsum([f[-1] for f in finite][::-1])[::-1], [0.0]])
    floor = (most[0] - least[0]) * 2.0 ** -40 or 1.0                     # bands never get thinner
    if width is None:
        width = min([f[1] - f[0] for f in finite if len(f) > 1 and f[1] > f[0]], default=1.0)
    width = max(width, floor)
    hi, narrowed = (least[0] if lo < least[0] else lo + width), 0
    while True:
        # A band too big to list at once is narrowed. One that cannot be (the first, which holds the
        # ties of the cheapest cost, or one still too big after 30 tries) holds equal costs: it is
        # listed whole. Only an item equidistant from millions of code tuples makes that large.
        limit = _BAND_LIMIT if narrowed < 30 and lo >= least[0] else np.inf
        band = _tuples_in_band(finite, least, most, lo, hi, limit)
        if band is None:
            width, narrowed = max(width / 8, floor), narrowed + 1
            hi = lo + width
            continue
        cost, ranks = band
        codes = order[np.arange(4), ranks]                                # [m, 4]
        free = ~taken.is_used(pack_codes(codes).astype(np.int64))
        if free.any():
            cheapest = np.flatnonzero(free & (cost == cost[free].min()))
            best = cheapest[np.lexsort(ranks[cheapest].T[::-1])[0]]
            return codes[best], cost[best], width / 4 if len(cost) > 4096 else width  # next time: narrower
        if hi > most[0] + 1e-9 * abs(most[0]):                              # past the dearest: rounding aside
            raise RuntimeError("no free finite SID found although one is counted free (a bug)")
        lo, hi, width, narrowed = hi, hi + width, width * 4, 0


def _cheapest_listed(free: np.ndarray, dist: np.ndarray, order: np.ndarray):
    """The cheapest of the free SIDs `free` [F] (packed keys), ties to the smallest tuple of ranks.
    Returns (codes [4], their cost)."""
    codes = unpack_keys(free)                                            # [F, 4]
    # summed in digit order, as the bands sum, so that equal costs compare equal
    cost = dist[0, codes[:, 0]] + dist[1, codes[:, 1]] + dist[2, codes[:, 2]] + dist[3, codes[:, 3]]
    cheapest = np.flatnonzero(cost == cost.min())
    ranks = np.argsort(order, axis=1)[np.arange(4), codes[cheapest]]      # [c, 4] rank of each code
    best = cheapest[np.lexsort(ranks.T[::-1])[0]]
    return codes[best], cost[best]


def _tuples_in_band(finite: list, least: np.ndarray, most: np.ndarray, lo: float, hi: float, limit: float):
    """All rank tuples whose cost is in (lo, hi]: (cost [m], ranks [m, 4]), or None if a step would
    list more than `limit`. A prefix is extended only by the ranks that leave it some completion
    inside the band: its cheapest completion (least[d + 1] more) must be <= hi and its dearest > lo."""
    slack = 1e-9 * (abs(lo) if np.isfinite(lo) else 0.0) + 1e-9 * abs(hi)  # rounding: never drop one that fits
    cost, ranks = np.zeros(1), np.zeros((1, 0), np.int64)                 # [m], [m, digits so far]
    for d, f in enumerate(finite):
        first = np.searchsorted(f, lo - cost - most[d + 1] - slack, side="right")
        stop = np.searchsorted(f, hi - cost - least[d + 1] + slack, side="right")
        n_fit = np.maximum(stop - first, 0)                               # ranks first..stop-1, per prefix
        if n_fit.sum() > limit:
            return None
        parent = np.repeat(np.arange(len(cost)), n_fit)
        rank = np.arange(len(parent)) - np.repeat(np.cumsum(n_fit) - n_fit - first, n_fit)
        cost, ranks = cost[parent] + f[rank], np.concatenate([ranks[parent], rank[:, None]], 1)
    keep = (cost > lo) & (cost <= hi)
    return cost[keep], ranks[keep]


def _first_free_in_rank_order(order: np.ndarray, taken: _TakenSIDs) -> np.ndarray:
    """The free SID whose tuple of ranks is smallest (lexicographically); order [4, 256] lists one
    item's codes per digit, nearest first. Used once every finite SID is taken: all costs are
    then +inf and the ranks alone decide. A prefix that is not full has a free SID below it, so
    one pass down the digits finds it, skipping full prefixes 256 at a time."""
    prefix = 0
    for length in range(1, 5):
        keys = (prefix << 8) | order[length - 1]                          # [256], in rank order
        blocked = taken.is_used(keys) if length == 4 else taken.prefix_full(keys, length)
        prefix = int(keys[np.argmin(blocked)])                            # first one not blocked
    return unpack_keys(prefix)


# ----------------------------------------------------------------------------------------------
# Command line (cli.py's flag parser, imported here only: the rest of this file needs no other module)
# ----------------------------------------------------------------------------------------------

@dataclass
class IndexConfig:
    """python sid.py --emb=E.npy --out=DIR: build a SID index from any [n_items, D] embeddings"""
    emb: str = ""                    # [n_items, D] float .npy file
    out: str = ""                    # folder for item_id2tokens.npy, tokens2item.pkl, opq.npz
    seed: int = 0                    # seeds k-means++ (the same seed gives the same SIDs)
    n_iter: int = 10                 # OPQ iterations
    overwrite: bool = False          # replace an index already in --out

    def __post_init__(self):
        for name in ("emb", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name}: expected a path, got nothing")
        if self.seed < 0 or self.n_iter < 1:
            raise ValueError(f"--seed, --n_iter: expected seed >= 0 and n_iter >= 1, got {self.seed}, {self.n_iter}")


def main(argv: list) -> None:
    from cli import check_outputs, exclusive, parse_flags
    args = IndexConfig(**parse_flags(argv, IndexConfig, usage=__doc__))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out: {args.out} is a file; expected a folder")
    with exclusive(args.out, "--out"):                                # one writer at a time, checks included
        if os.path.lexists(os.path.join(args.out, "run.json")):     # never under a trained model's feet
            raise ValueError(f"--out: {args.out} is a run folder (train.py's); its SIDs belong to its model")
        names = [os.path.join(args.out, f) for f in ("item_id2tokens.npy", "tokens2item.pkl", "opq.npz")]
        check_outputs(names, {"--emb": args.emb})                     # never the embeddings being read
        if any(os.path.lexists(name) for name in names) and not args.overwrite:
            raise ValueError(f"--out: {args.out} already holds an index; choose another folder or pass "
                             "--overwrite=true")
        emb = load_embeddings(args.emb, "--emb")
        start = time.perf_counter()
        index, _ = build_index(emb.astype(np.float32), seed=args.seed, n_iter=args.n_iter, verbose=True)
        index.save(args.out)
    print(f"{index.n_items} items, {time.perf_counter() - start:.1f} s, saved to {args.out}")


if __name__ == "__main__":
    from cli import run_main
    run_main(main)
