"""The quantiser behind the semantic IDs: k-means and OPQ, with numpy alone.

    opq = train_opq(embeddings)            # [N, D] -> a rotation and 4 codebooks of 256 centroids
    codes = opq.encode(embeddings)         # [N, 4]: each item's nearest centroid in each subspace
    dist = opq.distances(embeddings)       # [N, 4, 256]: squared distance to every centroid

OPQ (Ge et al., CVPR 2013, the non-parametric version): center the embeddings, zero-pad D to a
multiple of 4, then alternate a k-means per subspace (k-means++ seeding, Lloyd steps) with a
rotation update by orthogonal Procrustes (an SVD). The rotation starts at the identity; the 4
subspaces are parallel, none coarser than another. sid.py turns the codes into collision-free
semantic IDs.
"""
from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass, field

import numpy as np

CODEBOOK_SIZE = 256              # most centroids per subspace: a code is one byte (0..255)

# ----------------------------------------------------------------------------------------------
# k-means: squared distances, k-means++ seeding, Lloyd steps (used per subspace by OPQ)
# ----------------------------------------------------------------------------------------------

def _partial_distance_blocks(x: np.ndarray, centroids: np.ndarray, chunk_rows: int = 8192):
    """Yield (start, block) with block = |c|^2 - 2 x.c for rows start:start+chunk_rows.

    |x - c|^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 does not change which centroid is nearest, so it
    is added only where a distance is reported. Chunks bound memory to chunk_rows * K floats.
    """
    c_sq = (centroids * centroids).sum(1)
    minus_two_c = -2.0 * centroids.T                                   # [D, K]
    for start in range(0, x.shape[0], chunk_rows):  # loop over chunks only
        block = x[start:start + chunk_rows] @ minus_two_c
        block += c_sq
        yield start, block


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared distances x [N, D] to centroids [K, D] -> [N, K], clipped at 0 (rounding)."""
    out = np.empty((x.shape[0], centroids.shape[0]), dtype=x.dtype)
    x_sq = (x * x).sum(1, keepdims=True)
    for start, block in _partial_distance_blocks(x, centroids):
        out[start:start + len(block)] = np.maximum(block + x_sq[start:start + len(block)], 0.0)
    return out


def _assign(x: np.ndarray, centroids: np.ndarray):
    """Nearest centroid per row [N] and its squared distance [N], without building [N, K]."""
    codes = np.empty(x.shape[0], dtype=np.int64)
    dist = (x * x).sum(1)
    for start, block in _partial_distance_blocks(x, centroids):
        best = block.argmin(1)
        codes[start:start + len(block)] = best
        dist[start:start + len(block)] += np.take_along_axis(block, best[:, None], 1)[:, 0]
    return codes, np.maximum(dist, 0.0)


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007). Needs k <= number of distinct rows.

    Distances are kept in float64 so that distinct points keep a positive chance of being drawn.
    """
    x64 = x.astype(np.float64)
    x_sq = (x64 * x64).sum(1)
    picks = [int(rng.integers(x.shape[0]))]
    closest = np.maximum(x_sq - 2.0 * x64 @ x64[picks[0]] + x_sq[picks[0]], 0.0)
    for _ in range(1, k):  # sequential by definition; each step is vectorised over points
        cumulative = np.cumsum(closest)
        if cumulative[-1] > 0:  # draw with probability proportional to the squared distance
            pick = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(x) - 1)
        else:
            pick = int(rng.integers(x.shape[0]))
        picks.append(pick)
        np.minimum(closest, np.maximum(x_sq - 2.0 * x64 @ x64[pick] + x_sq[pick], 0.0), out=closest)
    return x[picks].copy()


def lloyd(x: np.ndarray, centroids: np.ndarray, n_iter: int):
    """n_iter Lloyd steps from the given centroids. Returns (centroids, codes, mean sq. error).

    A step assigns every point to its nearest centroid, then moves each centroid to its cluster's
    mean; neither half can raise the error. The returned codes are the last assignment and the
    error is measured against the moved centroids, so (codes, centroids) is always a consistent
    quantisation. An empty cluster is re-seeded at the point farthest from its centroid (never NaN).
    """
    centroids = centroids.copy()
    k = centroids.shape[0]
    codes = np.zeros(len(x), np.int64)
    for _ in range(max(n_iter, 1)):
        codes, dist = _assign(x, centroids)
        counts = np.bincount(codes, minlength=k)
        # Cluster sums in one pass: sort rows by cluster, then add each contiguous run.
        order = np.argsort(codes, kind="stable")
        filled = counts > 0
        starts = (np.cumsum(counts) - counts)[filled]
        centroids[filled] = np.add.reduceat(x[order], starts, axis=0) / counts[filled, None]
        empty = np.flatnonzero(~filled)
        if empty.size:  # an empty centroid is far from every point: moving it changes nobody's cost
            far = np.argsort(-dist, kind="stable")[: empty.size]
            far = far[dist[far] > 0]  # a point already on a centroid cannot help
            centroids[empty[: far.size]] = x[far]
    residual = x - centroids[codes]
    return centroids, codes, float((residual * residual).sum(1).mean())


def training_sample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most n rows of x, a seeded subsample in the original order (as faiss trains k-means)."""
    return x if x.shape[0] <= n else x[np.sort(rng.choice(x.shape[0], n, replace=False))]


def kmeans(x: np.ndarray, k: int, n_iter: int = 20, seed: int = 0, max_points_per_centroid: int = 256):
    """k-means++ then Lloyd. Returns (centroids [k', D], codes [N]) with k' = min(k, distinct rows).

    Training uses at most `max_points_per_centroid * k` rows (a seeded subsample, as faiss does);
    every row is then encoded.
    """
    x = check_embeddings(x, "kmeans input")
    if k <= 0:
        raise ValueError(f"k: expected a positive int, got {k}")
    rng = np.random.default_rng(seed)
    train = training_sample(x, max_points_per_centroid * k, rng)
    k = min(k, np.unique(train, axis=0).shape[0])
    centroids, _, _ = lloyd(train, kmeans_plusplus(train, k, rng), n_iter)
    codes, _ = _assign(x, centroids)
    return centroids, codes


# ----------------------------------------------------------------------------------------------
# OPQ: a rotation, then one k-means codebook per subspace; an item's codes are its nearest centroids
# ----------------------------------------------------------------------------------------------

@dataclass
class OPQ:
    """A trained OPQ quantiser: x -> ((x - mean) padded) @ rotation, split into n_digit subspaces.

    codebooks[d] is [n_centroids[d], dsub]; codes n_centroids[d]..255 have no centroid.
    """
    mean: np.ndarray                 # [D] training mean, subtracted first
    rotation: np.ndarray             # [D', D'] orthogonal, D' = D rounded up to n_digit
    codebooks: list                  # n_digit arrays [k_d, dsub]
    errors: list = field(default_factory=list)  # mean squared error after each OPQ iteration
    placed: tuple = (0, "")          # (n, sha256 of the codes it gave items 0..n-1): which index it belongs to

    @property
    def n_digit(self) -> int:
        return len(self.codebooks)

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """[N, D] -> [N, D'] centered, zero-padded and rotated (float32)."""
        x = check_embeddings(x)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"embeddings: expected dim {self.mean.shape[0]}, got {x.shape[1]}")
        centered = _pad_to(x.astype(np.float64) - self.mean, self.rotation.shape[0])
        return (centered @ self.rotation).astype(np.float32)

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Squared distance of every item to every code of every digit: [N, n_digit, 256].

        Codes with no centroid get +inf, so they are chosen only when nothing else is free.
        """
        subspaces = split_subspaces(self.rotate(x), self.n_digit)
        out = np.full((len(subspaces[0]), self.n_digit, CODEBOOK_SIZE), np.inf, dtype=np.float32)
        for d, book in enumerate(self.codebooks):  # loop over the 4 digits only
            out[:, d, : book.shape[0]] = squared_distances(subspaces[d], book)
        return out

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Nearest codes, [N, n_digit] int64 (collisions not resolved)."""
        subspaces = split_subspaces(self.rotate(x), self.n_digit)
        return np.stack([_assign(sub, book)[0] for sub, book in zip(subspaces, self.codebooks)], axis=1)


def split_subspaces(z: np.ndarray, n_digit: int) -> list:
    """[N, D'] -> n_digit contiguous [N, D'/n_digit] blocks (contiguous: matmuls run faster)."""
    return [np.ascontiguousarray(block) for block in np.split(z, n_digit, axis=1)]


def _pad_to(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad columns up to `dim` (OPQ needs D divisible by n_digit; zeros add no error)."""
    return x if x.shape[1] == dim else np.pad(x, ((0, 0), (0, dim - x.shape[1])))


def train_opq(x, n_digit: int = 4, codebook_size: int = 256, n_iter: int = 10,
              kmeans_iter: int = 5, seed: int = 0, max_points_per_centroid: int = 256,
              rotate: bool = True) -> OPQ:
    """Non-parametric OPQ. `rotate=False` gives plain PQ (rotation stays the identity).

    Per iteration: a few warm-started Lloyd steps per subspace (error cannot rise), then
    R = U Vt from svd(Xᵀ Ŷ) (orthogonal Procrustes: the best rotation for the current codes, so
    the error cannot rise either). The reported error is therefore non-increasing.
    """
    x = check_embeddings(x)
    if not 1 <= codebook_size <= 256:
        raise ValueError(f"codebook_size: expected 1..256 (codes are uint8), got {codebook_size}")
    rng = np.random.default_rng(seed)
    mean = x.mean(0, dtype=np.float64)
    train = training_sample(x, max_points_per_centroid * codebook_size, rng)
    dim = -(-x.shape[1] // n_digit) * n_digit
    centered = _pad_to(train.astype(np.float64) - mean, dim)          # [n, D']
    rotation = np.eye(dim)
    codebooks = []
    for sub in split_subspaces(centered.astype(np.float32), n_digit):
        k = min(codebook_size, np.unique(sub, axis=0).shape[0])  # at most one centroid per distinct point
        codebooks.append(kmeans_plusplus(sub, k, rng))
    errors = []
    for _ in range(n_iter):
        subspaces = split_subspaces((centered @ rotation).astype(np.float32), n_digit)
        codes, err = [], 0.0
        for d, sub in enumerate(subspaces):
            codebooks[d], digit_codes, digit_err = lloyd(sub, codebooks[d], kmeans_iter)
            codes.append(digit_codes)
            err += digit_err
        errors.append(err)  # mean squared error per item, summed over digits
        if rotate:
            recon = np.concatenate([book[c] for book, c in zip(codebooks, codes)], 1)  # Ŷ [n, D']
            u, _, vt = np.linalg.svd(centered.T @ recon.astype(np.float64))
            rotation = u @ vt
    return OPQ(mean=mean, rotation=rotation, codebooks=codebooks, errors=errors)


# ----------------------------------------------------------------------------------------------
# Input checks: an embeddings matrix, or an .npy file of one
# ----------------------------------------------------------------------------------------------

def check_embeddings(x, name: str = "embeddings") -> np.ndarray:
    """x as a numpy [N, D] array, checked: numeric, finite, non-empty and of a usable scale."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [n_items, dim], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one item and one dimension, got shape {x.shape}")
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name}: expected a numeric array, got dtype {x.dtype} (floats or ints; not bool, "
                         "complex or strings)")
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise ValueError(f"{name}: expected finite values, got NaN or inf in row {row}")
    scale = float(np.abs(x).max())
    if scale > 1e15 or 0 < scale < 1e-15:      # squared distances would overflow or underflow float32
        raise ValueError(f"{name}: expected values of a usable scale (largest |value| between 1e-15 and 1e15), "
                         f"got {scale:.3g}; rescale the embeddings")
    return x


def read_npy(blob: bytes, name: str) -> np.ndarray:
    """A .npy file's bytes -> its array, never a pickle, and only after its header's shape and dtype
    are seen to fit in the bytes there (a 200-byte file cannot ask for terabytes)."""
    f = io.BytesIO(blob)
    try:
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(np.lib.format.read_magic(f),
                                                                        np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError("it holds Python objects, which are never loaded")
        if math.prod(shape) * dtype.itemsize > len(blob):                   # exact ints: no overflow
            raise ValueError(f"its header asks for {shape} of {dtype}, more than its {len(blob):,} bytes hold")
        return np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise ValueError(f"{name}: not a readable .npy array ({str(e)[:200]})") from None


def read_npz(blob: bytes, name: str) -> dict:
    """An uncompressed .npz archive's bytes (what np.savez writes) -> {key: array}: no member may be
    larger than the archive (no decompression bomb), and each is read by read_npy."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            big = [i.filename for i in z.infolist() if i.file_size > len(blob) or not i.filename.endswith(".npy")]
            if big:
                raise ValueError(f"{name}: {big[0]} is not an .npy array stored whole (np.savez) in the archive")
            return {i.filename[:-4]: read_npy(z.read(i), f"{name}: {i.filename}") for i in z.infolist()}
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise ValueError(f"{name}: not a readable .npz archive ({type(e).__name__}: {str(e)[:200]})") from None


def load_embeddings(path: str, name: str = "embeddings") -> np.ndarray:
    """An [N, D] numeric .npy file, read once (a FIFO works), checked: never a pickle, never a .npz archive."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ValueError(f"{name}: {path} is not a readable .npy array ({e.strerror or e})") from None
    if blob[:4] == b"PK\x03\x04":                                       # a zip: np.savez's .npz archive
        raise ValueError(f"{name}: expected one .npy array, got a .npz archive ({path}); save the array with np.save")
    if blob[:6] != b"\x93NUMPY":
        raise ValueError(f"{name}: {path} is not a .npy file (it does not start with the .npy header); "
                         "save the [n_items, D] array with np.save")
    emb = read_npy(blob, f"{name}: {path}")
    return check_embeddings(emb, f"{name} ({path})")
