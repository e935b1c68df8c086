"""Property tests for RPG_ED: each fast path is checked against a slow, obviously correct oracle.

    python test_rpg_ed.py            # everything, this file and test_operations.py (what CI runs)
    python -m pytest test_rpg_ed.py test_operations.py -m "not slow"   # skip the end-to-end runs

This file holds the oracles, module by module (opq and sid, the model, beam search, the data,
evaluation), then what holds for the whole repository (copies of a module, the README's examples,
the layers). Process and file operations (runs, kills, torchrun, bad input, command lines) are in
test_operations.py.

Sizes are tiny and seeded; hypothesis generates shapes, catalogues, lengths and padding.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import gzip
import heapq
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import beam
import cli
import dataset
import embeddings
import evaluate
import opq
import rpg_ed
import sid
import train


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def re_escape(text: str) -> str:
    return re.escape(text)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, eps: float = 1e-5) -> None:
    """Equal up to float32 rounding relative to the values' scale: |actual - expected| at most eps
    times the largest finite |expected| (at least 1); infinities must match exactly."""
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=eps * scale)


# ----------------------------------------------------------------------------------------------
# opq.py and sid.py: k-means, OPQ, collision-free SIDs, token layout, prefix masks, adding items, flags
# ----------------------------------------------------------------------------------------------

@st.composite
def catalogues(draw, max_items: int = 60):
    """Random item embeddings, often with many exact duplicate rows (forced collisions)."""
    n_items = draw(st.integers(1, max_items))
    dim = draw(st.integers(1, 9))
    n_distinct = draw(st.integers(1, n_items))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    distinct = rng.standard_normal((n_distinct, dim)).astype(np.float32)
    return distinct[rng.integers(0, n_distinct, n_items)] if n_distinct < n_items else distinct


def small_index(x: np.ndarray, seed: int = 0):
    return sid.build_index(x, seed=seed, n_iter=3, kmeans_iter=3)


@FAST
@given(catalogues())
def test_round_trip_and_unique_sids(x):
    index, moved = small_index(x)
    codes = index.item_codes
    assert codes.dtype == np.uint8 and codes.shape == (len(x), 4)
    assert len(np.unique(sid.pack_codes(codes))) == len(x)              # a bijection
    assert np.array_equal(index.lookup(codes), np.arange(len(x)))       # items -> SIDs -> items
    assert np.array_equal(index.item_codes[index.lookup(codes)], codes)  # SIDs -> items -> SIDs
    assert moved >= len(x) - len(np.unique(x, axis=0))                   # every duplicate moved


@FAST
@given(catalogues(), st.integers(0, 3))
def test_collision_resolution_is_deterministic(x, seed):
    a, moved_a = small_index(x, seed)
    b, moved_b = small_index(x, seed)
    assert np.array_equal(a.item_codes, b.item_codes) and moved_a == moved_b


def test_collision_moves_to_cheapest_free_tuple():
    """Brute force over all tuples: the mover gets the free tuple of least total distance."""
    rng = np.random.default_rng(0)
    dist = rng.random((3, 4, 256)).astype(np.float32)
    codes = np.tile(dist[0].argmin(1), (3, 1))                           # all three collide
    resolved, moved = sid.resolve_collisions(codes, lambda rows: dist[rows])
    assert moved == 2
    taken = {tuple(resolved[0])}
    for item in (1, 2):
        # cheapest tuple overall is the argmin; the best free one differs from it in one digit
        # or more, so compare against the exact minimum over single- and double-digit changes
        best = None
        for d1 in range(4):
            for c1 in range(256):
                cand = list(dist[item].argmin(1))
                cand[d1] = c1
                for d2 in range(4):
                    for c2 in (range(256) if d2 > d1 else [None]):
                        full = list(cand)
                        if c2 is not None:
                            full[d2] = c2
                        if tuple(full) in taken:
                            continue
                        cost = dist[item][np.arange(4), full].sum()
                        if best is None or cost < best[0]:
                            best = (cost, tuple(full))
        assert np.isclose(dist[item][np.arange(4), resolved[item]].sum(), best[0])
        taken.add(tuple(resolved[item]))


def best_first_resolve(codes: np.ndarray, dist: np.ndarray, taken_keys: np.ndarray) -> np.ndarray:
    """The slow oracle (sid.py's earlier algorithm). The first item at each nearest SID keeps it
    (unless already used); then per mover, in id order, a best-first search over (cost, tuple of
    ranks) from its nearest tuple, stepping past used SIDs one at a time."""
    codes = codes.astype(np.int64).copy()
    keys = sid.pack_codes(codes).tolist()
    taken = set(taken_keys.tolist())
    keepers = {key: item for item, key in reversed(list(enumerate(keys))) if key not in taken}
    taken |= set(keepers)
    for item in range(len(codes)):
        if keepers.get(keys[item]) == item:
            continue
        order = np.argsort(dist[item], axis=1, kind="stable")
        sorted_dist = np.take_along_axis(dist[item], order, 1).astype(np.float64)
        start = (0, 0, 0, 0)
        heap, seen = [(float(sorted_dist[:, 0].sum()), start)], {start}
        while True:
            cost, ranks = heapq.heappop(heap)
            tup = [int(order[d, r]) for d, r in enumerate(ranks)]
            key = (tup[0] << 24) | (tup[1] << 16) | (tup[2] << 8) | tup[3]
            if key not in taken:
                break
            for d in range(4):
                if ranks[d] + 1 < 256:
                    nxt = ranks[:d] + (ranks[d] + 1,) + ranks[d + 1:]
                    if nxt not in seen:
                        seen.add(nxt)
                        step = sorted_dist[d, ranks[d] + 1]
                        heapq.heappush(heap, (np.inf if np.isinf(step) else cost + step - sorted_dist[d, ranks[d]], nxt))
        codes[item] = tup
        taken.add(key)
    return codes


@st.composite
def collision_problems(draw):
    """Distances [n, 4, 256] of items to codes: few or all codes with a centroid (the rest +inf),
    integer values (many ties) or floats, rows copied from a few prototypes with or without noise
    (near-duplicates), and some SIDs already in use."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 40))
    n_centroids = draw(st.sampled_from([(256,) * 4, tuple(draw(st.lists(st.integers(1, 4), min_size=4, max_size=4)))]))
    # values 0..2 tie a lot; with 256 real codes they would tie millions of tuples at the cheapest cost
    high = draw(st.sampled_from([100] if n_centroids[0] == 256 else [3, 100]))
    prototypes = rng.integers(0, high, (draw(st.integers(1, n)), 4, 256)).astype(np.float32)
    dist = prototypes[rng.integers(0, len(prototypes), n)]
    dist = dist + np.float32(draw(st.sampled_from([0.0, 1e-3, 0.5]))) * rng.random(dist.shape, dtype=np.float32)
    for d, k in enumerate(n_centroids):
        dist[:, d, k:] = np.inf
    codes = dist.argmin(2)
    taken = np.unique(sid.pack_codes(rng.integers(0, 4, (draw(st.integers(0, 12)), 4))))
    return codes, dist, taken


@FAST
@given(collision_problems(), st.booleans())
def test_collision_resolution_equals_best_first_search(problem, price_free_list):
    """The fast resolution (bands of cost, free-list pricing, near-duplicate hints, the rank pass once
    real-centroid SIDs run out) places every mover where the one-at-a-time search does."""
    codes, dist, taken = problem
    expected = best_first_resolve(codes, dist, taken)
    old = sid._FREE_LIST
    sid._FREE_LIST = old if price_free_list else -1                     # -1: always list bands
    try:
        got, moved = sid.resolve_collisions(codes, lambda rows: dist[rows], taken)
    finally:
        sid._FREE_LIST = old
    assert np.array_equal(got, expected)
    assert moved == int((got != codes).any(1).sum())                     # a mover never keeps its SID
    all_keys = np.concatenate([taken, sid.pack_codes(got)])
    assert len(np.unique(all_keys)) == len(all_keys)                     # a bijection, clear of used SIDs


@FAST
@given(st.integers(1, 50), st.integers(1, 256), st.integers(1, 6), st.integers(0, 2**16))
def test_token_layout_is_the_same_in_sid_and_the_model(n_user_buckets, codebook_size, n_digit, seed):
    """sid.py and rpg_ed.py each define the vocabulary (so each can be copied alone); they must agree."""
    config = rpg_ed.RPGEDConfig(n_user_buckets=n_user_buckets, codebook_size=codebook_size, n_digit=n_digit,
                                n_embd=8, n_head=2, n_inner=8, encoder_n_layer=1, decoder_n_layer=1)
    assert (sid.PAD, sid.BOS, sid.EOS, sid.N_SPECIAL) == (rpg_ed.PAD, rpg_ed.BOS, rpg_ed.EOS, rpg_ed.N_SPECIAL)
    codes = np.random.default_rng(seed).integers(0, codebook_size, (5, n_digit))
    tokens = sid.codes_to_tokens(codes, n_user_buckets, codebook_size)
    model_tokens = rpg_ed.RPG_ED(config).digit_offsets.numpy() + codes   # the model's own layout
    assert np.array_equal(tokens, model_tokens)
    assert np.array_equal(sid.tokens_to_codes(tokens, n_user_buckets, codebook_size), codes)
    assert tokens.max() < config.vocab_size


@FAST
@given(catalogues(), st.data())
def test_prefix_mask_equals_brute_force(x, data):
    index, _ = small_index(x)
    codes = index.item_codes.astype(np.int64)
    for length in range(4):
        existing = codes[:, :length]
        n_random = data.draw(st.integers(0, 5))
        random = np.array(data.draw(st.lists(st.integers(0, 255), min_size=n_random * length,
                                             max_size=n_random * length)), dtype=np.int64).reshape(n_random, length)
        prefixes = np.concatenate([existing, random])
        mask = index.prefix_mask(prefixes)
        expected = np.zeros((len(prefixes), 256), bool)
        for row, prefix in enumerate(prefixes):  # the slow oracle: scan the catalogue
            for item_codes in codes:
                if tuple(item_codes[:length]) == tuple(prefix):
                    expected[row, item_codes[length]] = True
        assert np.array_equal(mask, expected)


def test_prefix_mask_and_lookup_accept_torch():
    index, _ = small_index(np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32))
    prefixes = torch.from_numpy(index.item_codes[:5, :2].astype(np.int64))
    assert torch.equal(index.prefix_mask(prefixes), torch.from_numpy(index.prefix_mask(prefixes.numpy())))
    codes = torch.from_numpy(index.item_codes.astype(np.int64))
    assert torch.equal(index.lookup(codes), torch.arange(40))


@FAST
@given(catalogues(max_items=40), catalogues(max_items=20))
def test_adding_items_keeps_old_sids(old, new):
    if old.shape[1] != new.shape[1]:
        new = np.resize(new, (len(new), old.shape[1])).astype(np.float32)
    new = np.concatenate([new, old[: len(new) // 2]])                  # some duplicate old items
    index, _ = small_index(old)
    bigger, _ = index.add_items(new)
    assert np.array_equal(bigger.item_codes[: len(old)], index.item_codes)
    assert len(np.unique(sid.pack_codes(bigger.item_codes))) == len(old) + len(new)
    assert np.array_equal(bigger.lookup(bigger.item_codes), np.arange(len(old) + len(new)))


@FAST
@given(st.integers(0, 2**16), st.integers(2, 6))
def test_opq_error_is_non_increasing(seed, n_iter):
    x = np.random.default_rng(seed).standard_normal((300, 12)).astype(np.float32)
    errors = opq.train_opq(x, codebook_size=16, n_iter=n_iter, kmeans_iter=2, seed=seed).errors
    assert len(errors) == n_iter
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:])), errors


def test_opq_beats_pq_on_rotated_anisotropic_data():
    rng = np.random.default_rng(0)
    scales = np.array([8, 8, 6, 6, 1, 1, 0.5, 0.5, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.02, 0.02])
    x = rng.standard_normal((2000, 16)) * scales
    rotation, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    x = (x @ rotation).astype(np.float32)
    pq = opq.train_opq(x, codebook_size=16, n_iter=8, kmeans_iter=4, rotate=False).errors[-1]
    rotated = opq.train_opq(x, codebook_size=16, n_iter=8, kmeans_iter=4).errors[-1]
    assert rotated < 0.9 * pq, (rotated, pq)


def test_kmeans_beats_random_assignment_and_handles_small_inputs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((200, 2)) + c for c in ([0, 0], [10, 0], [0, 10])]).astype(np.float32)
    centroids, codes = opq.kmeans(x, 3, seed=0)
    err = ((x - centroids[codes]) ** 2).sum(1).mean()
    random_codes = rng.integers(0, 3, len(x))
    random_centroids = np.stack([x[random_codes == k].mean(0) for k in range(3)])
    assert err < 0.2 * ((x - random_centroids[random_codes]) ** 2).sum(1).mean()
    # fewer distinct points than centroids: one centroid per distinct point, codes in range, no NaN
    few = np.repeat(rng.standard_normal((3, 4)).astype(np.float32), 5, axis=0)
    centroids, codes = opq.kmeans(few, 256, seed=0)
    assert centroids.shape == (3, 4) and np.isfinite(centroids).all() and codes.max() < 3
    assert np.allclose(centroids[codes], few)
    a, b = opq.kmeans(x, 8, seed=5), opq.kmeans(x, 8, seed=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_lloyd_reseeds_empty_clusters():
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    centroids = np.concatenate([x[:3], np.full((2, 3), 1e3, np.float32)])  # two far, empty clusters
    out, codes, _ = opq.lloyd(x, centroids, 3)
    assert np.isfinite(out).all() and len(np.unique(codes)) == 5


def test_save_load_round_trip(tmp_path):
    x = np.random.default_rng(2).standard_normal((80, 10)).astype(np.float32)
    index, _ = small_index(x)
    index.save(str(tmp_path))
    loaded = sid.SIDIndex.load(str(tmp_path))
    assert np.array_equal(loaded.item_codes, index.item_codes)
    assert loaded.inverted_dict() == index.inverted_dict()
    with open(tmp_path / "tokens2item.pkl", "rb") as f:
        assert pickle.load(f) == {tuple(int(c) for c in row): i for i, row in enumerate(index.item_codes)}
    more, _ = loaded.add_items(x[:3])                                   # the quantiser came back too
    assert more.n_items == 83


class _Bomb:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickle_is_refused(tmp_path):
    index, _ = small_index(np.random.default_rng(3).standard_normal((20, 4)).astype(np.float32))
    index.save(str(tmp_path))
    target = tmp_path / "pwned"
    with open(tmp_path / "tokens2item.pkl", "wb") as f:
        pickle.dump({(0, 0, 0, 0): _Bomb(str(target))}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        sid.SIDIndex.load(str(tmp_path))
    assert not target.exists()


@pytest.mark.parametrize("make, fragment", [
    (lambda: sid.build_index(np.array([[0.0, np.nan]])), "finite"),
    (lambda: sid.build_index(np.array([[0.0, np.inf]])), "finite"),
    (lambda: sid.build_index(np.zeros(5)), "2-D"),
    (lambda: sid.build_index(np.zeros((0, 4))), "at least one item"),
    (lambda: sid.SIDIndex(np.array([[0, 0, 0, 256]])), "[0, 256)"),
    (lambda: sid.SIDIndex(np.array([[1, 2, 3, 4], [1, 2, 3, 4]])), "share the SID"),
    (lambda: sid.SIDIndex(np.zeros((3, 4))), "integer"),
    (lambda: sid.SIDIndex(np.array([[1, 2, 3, 4]])).lookup(np.array([[1, 2, 3, 300]])), "[0, 256)"),
    (lambda: sid.SIDIndex(np.array([[1, 2, 3, 4]])).prefix_mask(np.zeros((2, 4), int)), "l in 0..3"),
    (lambda: sid.codes_to_tokens(np.array([[1, 2, 3, 256]]), 10), "[0, 256)"),
    (lambda: sid.tokens_to_codes(np.array([[13, 13, 269, 525]]), 10), "digit 1"),
    (lambda: sid.user_bucket("u1", 0), "positive"),
])
def test_sid_bad_input(make, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace(")", r"\)").replace(".", r"\.")):
        make()


@FAST
@given(st.lists(st.integers(0, 255), min_size=4, max_size=4), st.integers(1, 50))
def test_token_layout_round_trip(codes, n_buckets):
    tokens = sid.codes_to_tokens(np.array([codes]), n_buckets)
    low = 3 + n_buckets + 256 * np.arange(4)                            # each digit has its own range
    assert ((tokens[0] >= low) & (tokens[0] < low + 256)).all()
    assert np.array_equal(sid.tokens_to_codes(tokens, n_buckets)[0], codes)


def test_user_bucket_is_stable_across_processes():
    ids = ["A1B2", "42", 42, "user-é"]
    here = [sid.user_bucket(u, 10000) for u in ids]
    code = f"import sid; print([sid.user_bucket(u, 10000) for u in {ids!r}])"
    for salt in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": salt}, check=True).stdout
        assert out.strip() == str(here)
    assert all(0 <= b < 10000 for b in here)


@pytest.mark.parametrize("argv, fragment", [
    (["--emb=a.npy", "out"], "argument 'out': expected --key=value"),
    (["--emb"], "argument '--emb': expected --key=value"),
    (["--nope=1"], "unknown option --nope"),
    (["--seed=x"], "--seed: expected int, got 'x'"),
    (["--overwrite=yes"], "--overwrite: expected bool, got 'yes'"),
])
def test_parse_flags_refuses_what_it_cannot_read(argv, fragment):
    with pytest.raises(ValueError, match=re_escape(fragment)):
        cli.parse_flags(argv, sid.IndexConfig)


def test_parse_flags_types_values_and_the_last_one_wins():
    given = cli.parse_flags(["--emb=a.npy", "--seed=3", "--overwrite=true", "--seed=4"], sid.IndexConfig)
    assert given == {"emb": "a.npy", "seed": 4, "overwrite": True}


# ----------------------------------------------------------------------------------------------
# rpg_ed.py: attention, cached and uncached decoding, padding, checked batches
# ----------------------------------------------------------------------------------------------

TINY = dict(n_user_buckets=7, max_history=6, encoder_n_layer=2, decoder_n_layer=2, n_head=2,
            n_embd=16, n_inner=32)


def tiny_model(seed: int = 0, **overrides) -> rpg_ed.RPG_ED:
    torch.manual_seed(seed)
    model = rpg_ed.RPG_ED(rpg_ed.RPGEDConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # GPT-2 init barely separates users; larger weights make every input matter
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "emb" in name or "pos" in name else 0.25)
    return model.eval()


def make_batch(model, lengths, width=None, seed=0, targets=None):
    """Left-padded batch: row i has lengths[i] real items in a history of `width` slots."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    width = max(lengths, default=0) if width is None else width
    codes = torch.randint(0, c.codebook_size, (len(lengths), width, c.n_digit), generator=g)
    history = codes + model.digit_offsets
    for row, n in enumerate(lengths):
        history[row, : width - n] = rpg_ed.PAD
    if targets is None:
        targets = torch.randint(0, c.codebook_size, (len(lengths), c.n_digit), generator=g)
    tokens = targets + model.digit_offsets
    return dict(user_ids=torch.randint(0, max(c.n_user_buckets, 1), (len(lengths),), generator=g),
                history_sid=history,
                decoder_input_ids=torch.cat([torch.full((len(lengths), 1), rpg_ed.BOS), tokens], 1),
                decoder_labels=torch.cat([tokens, torch.full((len(lengths), 1), rpg_ed.EOS)], 1))


def trim(batch, row):
    """Row `row` alone, with only its real history items (no padding at all)."""
    history = batch["history_sid"][row:row + 1]
    real = history[0, :, 0] != rpg_ed.PAD
    return {k: (history[:, real] if k == "history_sid" else v[row:row + 1]) for k, v in batch.items()}


histories = st.lists(st.integers(0, TINY["max_history"]), min_size=1, max_size=4)


def test_no_user_token_means_no_user_rows_and_user_ids_unread():
    model = tiny_model(0, n_user_buckets=0)
    assert model.token_emb.weight.shape[0] == rpg_ed.N_SPECIAL + 4 * 256 == model.config.vocab_size
    batch = make_batch(model, [3, 0, 6])
    with torch.no_grad():
        memory, mask = model.encode(batch["user_ids"], batch["history_sid"])
        again, _ = model.encode(batch["user_ids"] + 12345, batch["history_sid"])
    assert memory.shape[1] == batch["history_sid"].shape[1] and torch.equal(memory, again)
    assert torch.equal(evaluate.user_bucket_table(["a", "b"], 0), torch.zeros(2, dtype=torch.long))


@FAST
@given(histories, st.integers(1, 3), st.integers(0, 1000), st.booleans())
def test_cached_decoding_equals_full_forward(lengths, n_beams, seed, user_token):
    model = tiny_model(seed, n_user_buckets=TINY["n_user_buckets"] if user_token else 0)
    batch = make_batch(model, lengths, seed=seed)
    with torch.no_grad():
        memory, memory_mask = model.encode(batch["user_ids"], batch["history_sid"])
        tokens = batch["decoder_input_ids"].repeat_interleave(n_beams, 0)         # (B*beams, 5)
        codes = tokens[:, 1:] - model.digit_offsets
        full = model.decode(tokens, memory, memory_mask)                        # one uncached pass
        cache = model.new_cache(memory, memory_mask, n_beams)
        for pos in range(4):
            step = model.step(codes[:, pos - 1] if pos else None, cache, pos)
            assert_close(step, model.code_logits(full[:, pos], pos))
            assert_close(step, model.step_uncached(codes[:, :pos], memory, memory_mask))


@FAST
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(0, 1000))
def test_attention_matches_reference_and_sdpa(B, H, Tq, Tk, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, 8, generator=g) for n in (Tq, Tk, Tk))
    mask = torch.rand(B, 1, Tq, Tk, generator=g) < 0.6
    mask[..., 0] |= torch.rand(B, 1, Tq, generator=g) < 0.7               # most rows see something
    out = rpg_ed.attention(q, k, v, mask)
    scores = q @ k.transpose(-2, -1) / 8 ** 0.5 + torch.where(mask, 0.0, float("-inf"))
    reference = torch.softmax(scores, -1) @ v
    visible = mask.any(-1, keepdim=True).expand(B, H, Tq, 1)
    assert_close(out, torch.where(visible, reference, 0.0))
    assert not out.isnan().any() and (out[~visible.expand_as(out)] == 0).all()   # blind rows: zeros
    rows = visible[0, 0, :, 0]
    if rows.any():
        sdpa = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask[:, :, rows])
        assert_close(out[:, :, rows], sdpa)


@FAST
@given(histories, st.integers(0, 1000), st.integers(0, 4))
def test_padding_is_invisible(lengths, seed, t):
    model = tiny_model(seed)
    batch = make_batch(model, lengths, width=TINY["max_history"], seed=seed)
    with torch.no_grad():
        before = model.logits(batch)
        model.token_emb.weight[rpg_ed.PAD].normal_(0, 5.0)                   # what padded slots hold
        assert_close(model.logits(batch), before)
        narrower = dict(batch, history_sid=batch["history_sid"][:, TINY["max_history"] - max(lengths):])
        assert_close(model.logits(narrower), before)    # less padding, same result
        later = batch["decoder_input_ids"].clone()
        later[:, t + 1:] = torch.randint(0, 256, later[:, t + 1:].shape) + model.digit_offsets[t:]
        changed = model.logits(dict(batch, decoder_input_ids=later))
        assert_close(changed[:, : t + 1], before[:, : t + 1])


@FAST
@given(histories, st.integers(0, 1000))
def test_rows_are_independent(lengths, seed):
    model = tiny_model(seed)
    batch = make_batch(model, lengths, seed=seed)
    with torch.no_grad():
        together = model.logits(batch)
        for row in range(len(lengths)):
            assert_close(model.logits(trim(batch, row))[0], together[row])


@FAST
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(0, 1000))
def test_cache_reorder_equals_permuted_inputs(B, n_beams, pos, seed):
    model = tiny_model(seed)
    batch = make_batch(model, [3] * B, seed=seed)
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 256, (B * n_beams, pos), generator=g)
    # a random parent for every beam, always within its own user's block of beams
    index = (torch.arange(B)[:, None] * n_beams + torch.randint(0, n_beams, (B, n_beams), generator=g)).flatten()
    nxt = torch.randint(0, 256, (B * n_beams,), generator=g)
    with torch.no_grad():
        memory, memory_mask = model.encode(batch["user_ids"], batch["history_sid"])
        cache = model.new_cache(memory, memory_mask, n_beams)
        for p in range(pos):
            model.step(prefix[:, p - 1] if p else None, cache, p)
        cache.reorder(index)
        model.step(prefix[index, pos - 1], cache, pos)                    # the parent's last code
        got = model.step(nxt, cache, pos + 1) if pos < 3 else None
        permuted = torch.cat([prefix[index], nxt[:, None]], 1)
        if got is not None:
            assert_close(got, model.step_uncached(permuted, memory, memory_mask))


def test_tiny_model_memorises_a_batch():
    torch.manual_seed(0)
    model = rpg_ed.RPG_ED(rpg_ed.RPGEDConfig(**{**TINY, "n_embd": 32, "n_inner": 64}, dropout=0.0, attn_pdrop=0.0))
    batch = make_batch(model, [6, 3, 0, 5, 6, 1, 2, 4], seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch).item()
    for _ in range(300):
        loss = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 < first, (first, loss.item())


def _bad(key, value):
    model = tiny_model()
    batch = make_batch(model, [2, 3])
    return lambda: model.check_batch(dict(batch, **{key: value(batch[key])}))


@pytest.mark.parametrize("make, fragment", [
    (_bad("history_sid", lambda h: h[:, :, :3]), "history_sid: expected shape"),
    (_bad("history_sid", lambda h: torch.cat([h] * 3, 1)), "L<=6"),
    (_bad("history_sid", lambda h: h.float()), "dtype torch.float32"),
    (_bad("history_sid", lambda h: torch.where(h > 0, h + 256, h)), "history_sid[0, 1]"),
    (_bad("history_sid", lambda h: h.index_put((torch.tensor(1), torch.tensor(0), torch.tensor(2)), torch.tensor(12))),
     "history_sid[1, 0]"),
    (_bad("user_ids", lambda u: u + 7), "user_ids: expected bucket indices in [0, 7)"),
    (_bad("user_ids", lambda u: u.float()), "user_ids: expected integer ids"),
    (_bad("decoder_input_ids", lambda d: torch.cat([d[:, :2], d[:, 2:] + 5000], 1)), "decoder_input_ids[0]"),
    (_bad("decoder_input_ids", lambda d: d[:, :4]), "decoder_input_ids: expected shape [2, 5]"),
    (_bad("decoder_labels", lambda d: d + 1), "decoder_labels[0]: expected [s0, s1, s2, s3, EOS]"),
    (lambda: rpg_ed.RPGEDConfig(n_embd=30, n_head=8), "divisible by n_head"),
    (lambda: rpg_ed.RPGEDConfig(attn_pdrop=1.0), "attn_pdrop"),
    (lambda: rpg_ed.RPGEDConfig(n_head=0), "n_head: expected a positive int"),
    (lambda: rpg_ed.RPGEDConfig(n_embd=4.5), "n_embd: expected int"),
])
def test_model_bad_input(make, fragment):
    with pytest.raises(ValueError, match=re_escape(fragment)):
        make()


def test_seed_config():
    config = rpg_ed.RPGEDConfig()
    assert config.vocab_size == 11027 and config.sid_offset == 10003


# ----------------------------------------------------------------------------------------------
# beam.py: constrained beam search against brute force
# ----------------------------------------------------------------------------------------------

@st.composite
def sid_catalogues(draw, max_items: int = 24):
    """Unique random SIDs over a small alphabet, so items share prefixes."""
    alphabet = draw(st.integers(2, 5))
    n_items = draw(st.integers(1, max_items))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    codes = np.unique(rng.integers(0, alphabet, (n_items, 4)) * rng.integers(1, 50, 4), axis=0)
    return sid.SIDIndex(codes[rng.permutation(len(codes))])


def brute_force_scores(model, batch, index) -> torch.Tensor:
    """(B, n_items): every item's summed log-probability by teacher forcing (the slow oracle)."""
    codes = torch.from_numpy(index.item_codes.astype(np.int64))                # (I, 4)
    tokens = torch.cat([torch.full((len(codes), 1), rpg_ed.BOS), codes + model.digit_offsets], 1)
    with torch.no_grad():
        memory, memory_mask = model.encode(batch["user_ids"], batch["history_sid"])
        out = []
        for user in range(len(memory)):  # the oracle may loop: it is slow on purpose
            hidden = model.decode(tokens, memory[user:user + 1].expand(len(codes), -1, -1),
                                  memory_mask[user:user + 1].expand(len(codes), -1))
            logp = torch.stack([torch.log_softmax(model.code_logits(hidden[:, d], d), -1) for d in range(4)], 1)
            out.append(logp.gather(2, codes[:, :, None])[..., 0].sum(1))
        return torch.stack(out)


@FAST
@given(sid_catalogues(), histories, st.integers(0, 1000), st.integers(0, 3))
def test_beam_search_is_exact_with_a_wide_beam(index, lengths, seed, extra):
    model = tiny_model(seed)
    batch = make_batch(model, lengths, seed=seed)
    beam_size = index.n_items + extra
    result = beam.beam_search(model, batch, beam_size, beam_size, index)
    expected = brute_force_scores(model, batch, index)
    order = torch.sort(expected, dim=1, descending=True, stable=True)
    n = index.n_items
    assert torch.equal(result.items[:, :n], order.indices)
    assert_close(result.scores[:, :n], order.values)
    assert (result.items[:, n:] == -1).all() and torch.isneginf(result.scores[:, n:]).all()   # padding
    assert (result.sids[:, n:] == -1).all()


@FAST
@given(sid_catalogues(), histories, st.integers(0, 1000), st.integers(1, 6), st.booleans())
def test_every_result_is_real_unique_and_sorted(index, lengths, seed, beam_size, use_cache):
    model = tiny_model(seed)
    batch = make_batch(model, lengths, seed=seed)
    result = beam.beam_search(model, batch, beam_size, beam_size, index, use_cache=use_cache)
    for row_items, row_sids, row_scores in zip(result.items, result.sids, result.scores):
        real = row_items >= 0
        assert real.sum() == min(beam_size, index.n_items)                 # padding only when needed
        assert len(set(row_items[real].tolist())) == int(real.sum())       # unique
        assert torch.equal(torch.from_numpy(index.item_codes[row_items[real].numpy()].astype(np.int64)),
                           row_sids[real])                                  # SIDs match their items
        assert (row_scores[:-1] >= row_scores[1:]).all()


def with_real_history(batch, index, model):
    """The batch with each real history slot replaced by the SID of a random item of `index`."""
    history = batch["history_sid"]
    real = history[..., 0] != rpg_ed.PAD
    pick = torch.randint(0, index.n_items, real.shape, generator=torch.Generator().manual_seed(0))
    codes = torch.from_numpy(index.item_codes.astype(np.int64))[pick] + model.digit_offsets
    return {**batch, "history_sid": torch.where(real[..., None], codes, history)}


def item_model(seed: int, index, item_ids: bool = True):
    """tiny_model with an item-id embedding for each item of `index` (or none)."""
    if not item_ids:
        return tiny_model(seed)
    model = tiny_model(seed, n_items=index.n_items)
    model.set_items(torch.from_numpy(index.item_codes.astype(np.int64)))
    return model


def some_real_history(batch, index, model, seed):
    """The batch with about half of its real history slots holding the SID of an item of `index`."""
    real = with_real_history(batch, index, model)["history_sid"]
    pick = torch.rand(real.shape[:2], generator=torch.Generator().manual_seed(seed)) < 0.5
    return {**batch, "history_sid": torch.where(pick[..., None], real, batch["history_sid"])}


@FAST
@given(sid_catalogues(), histories, st.integers(0, 1000))
def test_item_rows_are_the_item_of_each_sid_or_the_shared_row(index, lengths, seed):
    model = item_model(seed, index)
    history = some_real_history(make_batch(model, lengths, seed=seed), index, model, seed)["history_sid"]
    item_of = {tuple(codes): item for item, codes in enumerate(index.item_codes.tolist())}
    expected = [[item_of.get(tuple((np.array(slot) - model.digit_offsets.numpy()).tolist()), index.n_items)
                 for slot in row] for row in history.tolist()]                   # PAD: no item either
    assert model.item_rows(history).tolist() == expected
    model.train()                     # training: a `dropout` share of the positions take the shared row
    dropped = model.item_rows(history)
    assert ((dropped == torch.tensor(expected)) | (dropped == index.n_items)).all()


def test_set_items_refuses_shared_or_out_of_range_sids_and_unset_keys_match_nothing():
    model = tiny_model(0, n_items=3)
    codes = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5], [0, 0, 0, 0]])
    assert (model.item_rows(codes[None] + model.digit_offsets) == 3).all()    # before set_items: the shared row
    for bad, fragment in ((codes[[0, 0, 2]], "a SID shared by two items"), (codes[:2], "expected shape [3, 4]"),
                          (codes + 255, "values in [0, 256), got shape (3, 4), values in [255, 260]"),
                          (codes[:0], "got shape (0, 4)")):
        with pytest.raises(ValueError, match=re_escape(fragment)):
            model.set_items(bad)
    with pytest.raises(ValueError, match="config.n_items = 0"):
        tiny_model(0).set_items(codes)


@FAST
@given(sid_catalogues(), histories, st.integers(0, 1000), st.integers(1, 5), st.booleans())
def test_beam_rows_are_independent(index, lengths, seed, beam_size, item_ids):
    model = item_model(seed, index, item_ids)
    batch = some_real_history(make_batch(model, lengths, seed=seed), index, model, seed)
    together = beam.beam_search(model, batch, beam_size, beam_size, index)
    for row in range(len(lengths)):
        alone = beam.beam_search(model, trim(batch, row), beam_size, beam_size, index)
        assert torch.equal(alone.items[0], together.items[row])
        assert_close(alone.scores[0], together.scores[row])


@FAST
@given(sid_catalogues(), histories, st.integers(0, 1000), st.integers(1, 5), st.booleans(), st.booleans())
def test_beam_cache_equals_no_cache(index, lengths, seed, beam_size, constrained, item_ids):
    model = item_model(seed, index, item_ids)
    batch = some_real_history(make_batch(model, lengths, seed=seed), index, model, seed)
    cached = beam.beam_search(model, batch, beam_size, beam_size, index, constrained=constrained)
    uncached = beam.beam_search(model, batch, beam_size, beam_size, index, use_cache=False, constrained=constrained)
    assert torch.equal(cached.items, uncached.items) and torch.equal(cached.sids, uncached.sids)
    assert_close(cached.scores, uncached.scores)


@FAST
@given(sid_catalogues(), histories, st.integers(0, 1000))
def test_greedy_is_the_constrained_argmax_chain(index, lengths, seed):
    model = tiny_model(seed)
    batch = make_batch(model, lengths, seed=seed)
    greedy = beam.beam_search(model, batch, 1, 1, index)
    with torch.no_grad():
        memory, memory_mask = model.encode(batch["user_ids"], batch["history_sid"])
        prefix = torch.zeros(len(lengths), 0, dtype=torch.long)
        total = torch.zeros(len(lengths))
        for pos in range(4):
            logp = torch.log_softmax(model.step_uncached(prefix, memory, memory_mask), -1)
            logp = logp.masked_fill(~index.prefix_mask(prefix), float("-inf"))
            best = logp.argmax(-1)
            total += logp.gather(1, best[:, None])[:, 0]
            prefix = torch.cat([prefix, best[:, None]], 1)
    assert torch.equal(greedy.sids[:, 0], prefix)
    assert torch.equal(greedy.items[:, 0], index.lookup(prefix))
    assert_close(greedy.scores[:, 0], total)


def test_unconstrained_reports_invalid_rate_and_generate_shape():
    model = tiny_model(3)
    index = sid.SIDIndex(np.array([[1, 2, 3, 4], [1, 2, 3, 5], [9, 9, 9, 9]]))
    random_history = make_batch(model, [2, 6, 0], seed=3)
    with pytest.raises(ValueError, match="no item has"):                  # a history item with no SID
        model.generate(random_history, index)
    batch = with_real_history(random_history, index, model)
    free = beam.beam_search(model, batch, 4, 4, index, constrained=False)
    assert free.invalid_rate == float((free.items < 0).float().mean()) and free.invalid_rate > 0
    items = model.generate(batch, index, beam_size=5)
    assert items.shape == (3, 5, 1) and (items[:, 3:] == -1).all() and (items[:, :3] >= 0).all()
    assert model.generate(batch, index, beam_size=3, n_return=2).shape == (3, 2, 1)
    with pytest.raises(ValueError, match="n_return"):
        model.generate(batch, index, beam_size=2, n_return=3)
    with pytest.raises(ValueError, match="beam_size"):
        model.generate(batch, index, beam_size=0)


# ----------------------------------------------------------------------------------------------
# dataset.py and embeddings.py: loaders, fuzzed files, 5-core, leave-one-out, sparse PPMI and TF-IDF
# ----------------------------------------------------------------------------------------------

def interactions(seed: int = 0, n_users: int = 12, n_items: int = 9):
    """(user, item, time) rows in a shuffled file order, with many equal timestamps; each user
    sees an item at most once, so any target found in its own history is a leak."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.permutation(n_items)[: rng.integers(5, n_items + 1)]
        times = np.sort(rng.integers(0, 4, len(items)))                      # ties on purpose
        rows += [(f"u{u}", str(100 + i), int(t)) for i, t in zip(items, times)]
    return rows


def write_formats(tmp_path, rows):
    """The same interactions in every supported format."""
    paths = {}
    paths["inter"] = tmp_path / "d.inter"
    paths["inter"].write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" +
                              "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in rows))
    paths["csv"] = tmp_path / "d.csv"
    paths["csv"].write_text("user,item,rating,timestamp\n" + "".join(f"{u},{i},4,{t}\n" for u, i, t in rows))
    paths["tsv"] = tmp_path / "d.tsv"
    paths["tsv"].write_text("userId\tmovieId\ttimestamp\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    lines = "".join(json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5}) + "\n" for u, i, t in rows)
    paths["amazon"] = tmp_path / "d.json"
    paths["amazon"].write_text(lines)
    paths["amazon_gz"] = tmp_path / "d.json.gz"
    with gzip.open(paths["amazon_gz"], "wt") as f:
        f.write(lines)
    return paths


INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"


def _write(folder, name: str, content) -> str:
    path = os.path.join(str(folder), name)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return path


def test_every_loader_reads_the_same_data(tmp_path):
    rows = interactions()
    paths = write_formats(tmp_path, rows)
    prepared = []
    for name, path in paths.items():
        cfg = train.TrainConfig(data=str(path))
        raw = dataset.load_data(cfg)
        prepared.append(dataset.prepare(raw, five_core=False))
    # S3Rec: the time-ordered sequences written out, one user per line
    ref = prepared[0]
    s3 = tmp_path / "seq.txt"
    s3.write_text("".join(f"{u} " + " ".join(ref.item_raw[i] for i in seq) + "\n"
                          for u, seq in zip(ref.user_raw, ref.sequences)))
    prepared.append(dataset.prepare(dataset.load_data(train.TrainConfig(data=str(s3))), five_core=False))
    for other in prepared[1:]:
        assert other.user_raw == ref.user_raw and other.item_raw == ref.item_raw
        assert all(np.array_equal(a, b) for a, b in zip(other.sequences, ref.sequences))


def test_ids_are_stripped_in_every_format(tmp_path):
    spaced = dataset.load_data(train.TrainConfig(data=_write(tmp_path, "a.csv", "user,item,timestamp\n u0 , i0 ,5\nu0,i1, 6\n")))
    assert spaced.users == ["u0", "u0"] and spaced.items == ["i0", "i1"] and list(spaced.times) == [5.0, 6.0]


def test_timestamps_are_exact_integers(tmp_path):
    base = 1_700_000_000_000_000_000                                       # nanoseconds: beyond float64's 2**53
    rows = "".join(f"u\ti{k}\t{base + (3 - k)}\n" for k in range(4)) + "u\ti9\t" + str(base + 9) + "\n"
    data = dataset.prepare(dataset.load_data(train.TrainConfig(data=_write(tmp_path, "d.inter", INTER_HEADER + rows))), False)
    assert [data.item_raw[i] for i in data.items] == ["i3", "i2", "i1", "i0", "i9"]     # 1 ns apart, in time order
    mixed = dataset.load_data(train.TrainConfig(data=_write(tmp_path, "m.inter", INTER_HEADER + "u\ti\t5\nu\tj\t5.5\n")))
    assert mixed.times.typecode == "d" and list(mixed.times) == [5.0, 5.5]   # a fraction: the file is float64


def test_stable_time_sort_keeps_file_order_on_ties():
    raw = dataset.RawData(users=["a"] * 4, items=["3", "1", "2", "0"], times=[5.0, 1.0, 5.0, 1.0])
    data = dataset.prepare(raw, five_core=False)
    assert [data.item_raw[i] for i in data.sequences[0]] == ["1", "0", "3", "2"]   # not sorted by id


def test_item_order_does_not_depend_on_pythonhashseed(tmp_path):
    rows = "".join(f"u{u}\t{i}\t{t}\n" for u in range(6) for t, i in enumerate(["7", "07", "007", "8", "08", "9"]))
    path = _write(tmp_path, "d.inter", INTER_HEADER + rows)
    code = ("import sys, train, dataset; d = dataset.prepare(dataset.load_data(train.TrainConfig(data=sys.argv[1])), False); "
            "print(d.item_raw, d.items.tolist())")
    outs = {subprocess.run([sys.executable, "-c", code, path], cwd=HERE, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, timeout=120).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1 and "['007', '07', '7', '08', '8', '9']" in outs.pop()   # by (int, str)


def test_five_core_matches_slow_filter():
    rng = np.random.default_rng(0)
    rows = [(f"u{rng.integers(30)}", f"i{rng.integers(25)}", float(t)) for t in range(400)]
    data = dataset.prepare(dataset.RawData(*map(list, zip(*rows))), five_core=True)
    kept = list(rows)
    while True:  # the obvious loop
        users = {u: sum(r[0] == u for r in kept) for u, _, _ in kept}
        items = {i: sum(r[1] == i for r in kept) for _, i, _ in kept}
        smaller = [r for r in kept if users[r[0]] >= 5 and items[r[1]] >= 5]
        if len(smaller) == len(kept):
            break
        kept = smaller
    assert data.n_interactions == len(kept)
    assert sorted(data.user_raw) == sorted({r[0] for r in kept})
    assert all(len(s) >= 5 for s in data.sequences)


def _valid_files() -> dict:
    """One small valid file per loader: (file name, format, bytes)."""
    rows = interactions(4, n_users=6, n_items=7)
    users = sorted({u for u, _, _ in rows})
    return {
        "inter": ("d.inter", "inter", INTER_HEADER + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)),
        "csv": ("d.csv", "csv", "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)),
        "amazon": ("d.json", "amazon", "".join(json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t}) + "\n"
                                             for u, i, t in rows)),
        "s3rec": ("d.txt", "s3rec", "".join(f"{u} " + " ".join(i for v, i, _ in rows if v == u) + "\n" for u in users)),
        "item": ("d.item", "text", "item_id:token\ttitle:token_seq\n" + "".join(f"{100 + i}\tfilm {i}\n" for i in range(7))),
        "meta": ("m.jsonl", "text", "".join(json.dumps({"asin": str(100 + i), "title": f"film {i}"}) + "\n" for i in range(7))),
    }


VALID_FILES = _valid_files()


def _parse(folder, name: str, fmt: str, content):
    """Rows (or the item-text dict) of a file; prepare() runs too, so it is fuzzed as well."""
    path = _write(folder, name, content)
    if fmt == "text":
        return sorted(dataset.read_file(path, dataset.load_item_text).items())
    raw = dataset.load_data(train.TrainConfig(data=path, format=fmt))
    dataset.prepare(raw, five_core=True)
    if raw.time_ordered:                                 # s3rec times are file positions
        return sorted(zip(raw.users, raw.items))
    return sorted(zip(raw.users, raw.items, raw.times))


def _contains(big: list, small: list) -> bool:
    return not (Counter(small) - Counter(big))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(VALID_FILES)), st.data())
def test_fuzzed_lines_parse_the_rest_unchanged_or_raise_value_error(kind, data):
    """A corrupted line: ValueError, or a parse that keeps every other line's rows unchanged."""
    name, fmt, text = VALID_FILES[kind]
    lines = text.encode().splitlines(keepends=True)
    k = data.draw(st.integers(0, len(lines) - 1), label="line")
    line = lines[k].removesuffix(b"\n")                  # corrupt the content, keep the line break
    how = data.draw(st.sampled_from(["flip", "delete", "insert", "drop", "random"]), label="how")
    pos = data.draw(st.integers(0, len(line)), label="pos")
    junk = data.draw(st.binary(min_size=1, max_size=8), label="junk")
    corrupted = {"flip": line[:pos] + junk[:1] + line[pos + 1:], "delete": line[:pos] + line[pos + 1:],
                 "insert": line[:pos] + junk + line[pos:], "drop": None, "random": junk}[how]
    corrupted = b"" if corrupted is None else corrupted + b"\n"
    with tempfile.TemporaryDirectory() as folder:
        try:
            parsed = _parse(folder, name, fmt, b"".join(lines[:k] + [corrupted] + lines[k + 1:]))
        except ValueError:
            return
        if corrupted == lines[k]:
            assert parsed == _parse(folder, name, fmt, text)
        try:
            rest = _parse(folder, name, fmt, b"".join(lines[:k] + lines[k + 1:]))
        except ValueError:
            return                                        # e.g. the header was the corrupted line
        if kind == "s3rec":                               # a line is a whole user: compare per user
            rest = [r for r in rest if r[0] != lines[k].split()[0].decode()]
        assert _contains(parsed, rest)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["auto", "inter", "csv", "amazon", "s3rec"]),
       st.sampled_from(["d.inter", "d.csv", "d.json", "d.json.gz", "d.txt"]))
def test_random_bytes_raise_only_value_error(content, fmt, name):
    with tempfile.TemporaryDirectory() as folder:
        try:
            _parse(folder, name, fmt, content)
        except ValueError:
            pass


@FAST
@given(st.integers(0, 2**16), st.integers(1, 6))
def test_no_target_leaks_into_its_history(seed, max_history):
    data = dataset.prepare(dataset.RawData(*map(list, zip(*interactions(seed)))), five_core=False)
    splits = dataset.leave_one_out(data, max_history)
    for name, split in splits.items():
        for history, target, user in zip(split.history, split.target, split.user):
            assert target not in history                                      # items are unique per user
    for user, seq in enumerate(data.sequences):
        n = len(seq)
        assert splits["test"].target[user] == seq[-1] and splits["valid"].target[user] == seq[-2]
        valid_hist = splits["valid"].history[user]
        assert list(valid_hist[valid_hist >= 0]) == list(seq[:-2][-max_history:])   # ends before valid item
        test_hist = splits["test"].history[user]
        assert list(test_hist[test_hist >= 0]) == list(seq[:-1][-max_history:])     # includes valid item
        targets = splits["train"].target[splits["train"].user == user]
        assert list(targets) == list(seq[1:n - 2])                             # every train position


@FAST
@given(st.integers(0, 2**16), st.integers(1, 7))
def test_windows_cut_per_batch_equal_the_materialised_ones(seed, max_history):
    data = dataset.prepare(dataset.RawData(*map(list, zip(*interactions(seed, n_users=9, n_items=8)))), five_core=False)
    sequences = data.sequences
    for split in dataset.leave_one_out(data, max_history).values():
        rows = np.random.default_rng(seed).permutation(len(split.pos))[: max(1, len(split.pos) // 2)]
        for row, window in zip(rows, split.windows(rows)):
            seq = sequences[split.user[row]]
            t = split.pos[row] - split.start[row]                           # the target's index in seq
            expected = seq[max(0, t - max_history):t]
            assert window.tolist() == [-1] * (max_history - len(expected)) + expected.tolist()
            assert split.target[row] == seq[t]


def test_item_files_beside_the_data_are_found_unless_none(tmp_path):
    """NAME_*.npy and NAME_items.jsonl beside NAME.txt are used; "none" skips each; two .npy need a choice."""
    (tmp_path / "shop.txt").write_text("".join(f"u{u} " + " ".join(str(i) for i in range(1, 6)) + "\n" for u in range(3)))
    np.save(tmp_path / "shop_text.npy", np.ones((5, 3), np.float32))
    (tmp_path / "shop_items.jsonl").write_text('{"item_id": "1", "title": "soap"}\n')
    cfg = train.TrainConfig(data=str(tmp_path / "shop.txt"))
    found = dataset.load_data(cfg)
    assert found.item_emb == str(tmp_path / "shop_text.npy") and found.item_text.keys() == {"1"}
    assert dataset.load_data(dataclasses.replace(cfg, item_emb="none")).item_emb == ""
    assert dataset.load_data(dataclasses.replace(cfg, item_text="none")).item_text == {}
    np.save(tmp_path / "shop_image.npy", np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match="found several item-embedding files"):
        dataset.load_data(cfg)
    chosen = str(tmp_path / "shop_image.npy")                                   # an explicit file wins
    assert dataset.load_data(dataclasses.replace(cfg, item_emb=chosen)).item_emb == chosen


def test_both_joins_the_embeddings_file_with_cf(tmp_path):
    data = dataset.prepare(dataset.RawData(*map(list, zip(*interactions(2, n_users=20, n_items=9)))), five_core=False)
    split = dataset.leave_one_out(data, 5)["train"]
    content = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
    np.save(tmp_path / "e.npy", content)
    raw = dataset.RawData([], [], [], item_emb=str(tmp_path / "e.npy"))
    cfg = train.TrainConfig(emb_source="both")
    joined, name = embeddings.item_embeddings(cfg, data, raw, split)
    cf = embeddings.cf_embeddings(split, 9, embeddings.EMB_DIM, cfg.seed)
    norm = lambda x: x / np.linalg.norm(x, axis=1).mean()                    # equal weight for each part
    assert name.endswith("+ cf") and np.allclose(joined, np.concatenate([norm(content), norm(cf)], 1), atol=1e-6)
    alone, name = embeddings.item_embeddings(dataclasses.replace(cfg, emb_source="cf"), data, raw, split)
    assert np.array_equal(alone, content) and name.startswith("file")
    fallback, name = embeddings.item_embeddings(cfg, data, dataset.RawData([], [], []), split)   # no text, no file
    assert np.allclose(fallback, cf) and name.startswith("cf")


def dense_cf_embeddings(history: np.ndarray, target: np.ndarray, n_items: int, dim: int, seed: int, window: int = 5):
    """The dense formula (n_items x n_items counts), as train.py computed it before it went sparse."""
    hist = history[:, -window:]
    pairs_a, pairs_b = np.repeat(target, hist.shape[1]), hist.reshape(-1)
    real = pairs_b >= 0
    counts = np.zeros((n_items, n_items), np.float32)
    np.add.at(counts, (pairs_a[real], pairs_b[real]), 1.0)
    counts += counts.T
    total, row = counts.sum(), counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts * total / np.outer(row, row))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)
    u, s = embeddings.truncated_svd(ppmi, dim, seed)
    return counts, ppmi, (u * np.sqrt(s)).astype(np.float32)


@FAST
@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 8))
def test_sparse_ppmi_and_svd_equal_the_dense_ones(seed, max_history, dim):
    rows = interactions(seed, n_users=15, n_items=12)
    data = dataset.prepare(dataset.RawData(*map(list, zip(*rows))), five_core=False)
    split = dataset.leave_one_out(data, max_history)["train"]
    n_items = len(data.item_raw)
    counts, ppmi, emb = dense_cf_embeddings(split.history, split.target, n_items, dim, seed)
    sparse_counts = embeddings.cooccurrence(split, n_items, blocks=3)
    assert np.array_equal(sparse_counts.toarray(), counts)
    np.testing.assert_allclose(embeddings.ppmi(sparse_counts).toarray(), ppmi, rtol=1e-6, atol=0)
    np.testing.assert_allclose(embeddings.cf_embeddings(split, n_items, dim, seed), emb, rtol=1e-4, atol=1e-5)


@FAST
@given(st.integers(0, 2**16), st.integers(1, 30), st.integers(1, 20), st.integers(1, 5))
def test_csr_products_equal_dense_ones(seed, n_rows, n_cols, k):
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_rows, n_cols)) < 0.3, rng.standard_normal((n_rows, n_cols)), 0).astype(np.float32)
    r, c = np.nonzero(dense)
    shuffle = rng.permutation(len(r))                                    # any order of triples
    matrix = embeddings.CSR.from_triples(r[shuffle], c[shuffle], dense[r, c][shuffle], dense.shape)
    x, y = rng.standard_normal((n_cols, k)), rng.standard_normal((n_rows, k))
    np.testing.assert_allclose(matrix @ x, dense.astype(np.float64) @ x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(matrix.T @ y, dense.T.astype(np.float64) @ y, rtol=1e-9, atol=1e-9)
    assert np.array_equal(matrix.toarray(), dense)


def test_sparse_tfidf_embeddings_equal_the_dense_ones():
    words = ["red", "blue", "green", "film", "noir", "comedy", "drama", "war"]
    rng = np.random.default_rng(0)
    item_raw = [str(i) for i in range(30)]
    text = {i: " ".join(rng.choice(words, rng.integers(0, 6))) for i in item_raw}
    data = dataset.Dataset.from_sequences([], [], item_raw)
    docs = [re.findall(r"[a-z0-9']+", text[i].lower()) for i in item_raw]   # the dense formula
    df = {w: sum(w in d for d in docs) for w in set(w for d in docs for w in d)}
    vocab = sorted(w for w, c in df.items() if c >= 2)
    tfidf = np.array([[d.count(w) for w in vocab] for d in docs], np.float32)
    tfidf *= np.log(len(docs) / np.array([df[w] for w in vocab])) + 1.0
    tfidf /= np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-12)
    u, s = embeddings.truncated_svd(tfidf, 4, 0)
    np.testing.assert_allclose(embeddings.text_embeddings(data, text, 4, 0), u * s, rtol=1e-4, atol=1e-5)


def test_a_fifo_gives_the_same_dataset_as_the_file(tmp_path):
    paths = write_formats(tmp_path, interactions(4, n_users=20, n_items=9))
    for fmt in ("inter", "csv", "amazon_gz"):
        path = str(paths[fmt])
        fifo = str(tmp_path / ("pipe." + os.path.basename(path).split(".", 1)[1]))
        os.mkfifo(fifo)
        writer = subprocess.Popen(["sh", "-c", f"cat '{path}' > '{fifo}'"])
        from_fifo = dataset.load_data(train.TrainConfig(data=fifo, item_emb="none"))
        writer.wait(timeout=60)
        from_file = dataset.load_data(train.TrainConfig(data=path, item_emb="none"))
        assert (from_fifo.users, from_fifo.items, list(from_fifo.times)) == \
            (from_file.users, from_file.items, list(from_file.times)), fmt
        assert {k: v for k, v in from_fifo.fingerprint.items() if k != "path"} == \
            {k: v for k, v in from_file.fingerprint.items() if k != "path"}
        os.remove(fifo)
    (tmp_path / "s.txt").write_text("u1 a b c d e\nu2 b c d e f\nu3 a c e f b\n")   # found by its first line
    os.mkfifo(tmp_path / "pipe")
    writer = subprocess.Popen(["sh", "-c", f"cat '{tmp_path / 's.txt'}' > '{tmp_path / 'pipe'}'"])
    from_fifo = dataset.load_data(train.TrainConfig(data=str(tmp_path / "pipe"), item_emb="none"))
    writer.wait(timeout=60)
    assert from_fifo.users == ["u1"] * 5 + ["u2"] * 5 + ["u3"] * 5 and from_fifo.source.startswith("read s3rec")


def test_a_folder_holding_one_compressed_data_file_finds_it(tmp_path):
    rows = interactions(5, n_users=15, n_items=9)
    (tmp_path / "data").mkdir()
    with gzip.open(tmp_path / "data" / "a.csv.gz", "wt") as f:
        f.write("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    raw = dataset.load_data(train.TrainConfig(data=str(tmp_path / "data")))
    assert raw.path.endswith("a.csv.gz") and len(raw.users) == len(rows)


def test_a_line_without_end_is_refused_with_its_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "MAX_LINE_BYTES", 5000)
    path = tmp_path / "d.csv"
    path.write_bytes(b"user,item,time\nu1,i1,1\n" + b"x" * (3 << 20))            # a block boundary inside
    with pytest.raises(ValueError, match=re_escape(f"{path}:3: a line longer than 5,000 bytes")):
        dataset.load_data(train.TrainConfig(data=str(path)))
    monkeypatch.setattr(dataset, "MAX_LINE_BYTES", 1 << 20)
    with pytest.raises(ValueError, match=re_escape("/dev/zero:1: a line longer than 1,048,576 bytes")):
        dataset.load_data(train.TrainConfig(data="/dev/zero", format="csv"))


# ----------------------------------------------------------------------------------------------
# evaluate.py: metrics, baselines, transitions and the ranker, batches by length, evaluation by batch
# ----------------------------------------------------------------------------------------------


def test_metrics_against_hand_computed_values():
    ranked = np.array([[7, 3, 5, 1, 2, 8, 9, 4, 6, 0],
                       [1, 2, 3, 4, 5, 6, 7, 8, 9, 0],
                       [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]])
    target = np.array([5, 0, 42])                      # rank 3, rank 10, miss
    m = evaluate.rank_metrics(ranked, target)
    assert m["recall@5"] == pytest.approx(1 / 3) and m["recall@10"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 / np.log2(4)) / 3)                  # 0.5 / 3
    assert m["ndcg@10"] == pytest.approx((0.5 + 1 / np.log2(11)) / 3)


def test_markov_baseline_by_hand():
    # user a: train 0 1 2 0 1 | valid 2 | test 9: transitions 0->1 twice, 1->2 once, 2->0 once
    data = dataset.Dataset.from_sequences([np.array([0, 1, 2, 0, 1, 2, 9]), np.array([3, 4, 5, 6, 7, 8, 9])],
                                        user_raw=["a", "b"], item_raw=[str(i) for i in range(10)])
    splits = dataset.leave_one_out(data, 5)
    valid = evaluate.baseline_rankings(data, splits, "valid")
    # a: last train item 1, only transition 1->2, target 2 -> rank 1.
    # b: last train item 7 has no transitions -> popularity order 0 1 (twice) 2 3 4 5 6 7, then 8 -> rank 9.
    assert valid["markov"]["recall@5"] == pytest.approx(0.5) and valid["markov"]["recall@10"] == pytest.approx(1.0)
    assert valid["markov"]["ndcg@10"] == pytest.approx((1 + 1 / np.log2(10)) / 2)


def loop_markov(data: dataset.Dataset, last: np.ndarray, k: int = 10) -> np.ndarray:
    """The first-order Markov ranking one user at a time, as train.py computed it before (the oracle)."""
    n_items = len(data.item_raw)
    seqs = [s[:-2] for s in data.sequences]
    pop = np.bincount(np.concatenate(seqs), minlength=n_items).astype(np.float64)
    counts = np.zeros((n_items, n_items))
    for s in seqs:
        np.add.at(counts, (s[:-1], s[1:]), 1)
    tiebreak = pop / (pop.max() + 1.0)
    return np.stack([np.argsort(-(tiebreak + counts[i]), kind="stable")[:k] for i in last])


@FAST
@given(st.integers(0, 2**16), st.integers(1, 12))
def test_vectorised_markov_baseline_equals_the_per_user_loop(seed, k):
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(2, 25))
    rows = [(f"u{u}", str(int(i)), t) for u in range(int(rng.integers(1, 12)))
            for t, i in enumerate(rng.integers(0, n_items, rng.integers(3, 12)))]   # repeats allowed
    data = dataset.prepare(dataset.RawData(*map(list, zip(*rows))), five_core=False)
    n_items = len(data.item_raw)
    splits = dataset.leave_one_out(data, 5)
    last = splits["test"].history[:, -1]
    lengths = data.lengths
    local = np.arange(data.n_interactions) - np.repeat(data.offsets[:-1], lengths)
    in_train = local < np.repeat(lengths - 2, lengths)
    pop = np.bincount(data.items[in_train], minlength=n_items).astype(np.float64)
    fast = evaluate.markov_top(evaluate.Transitions.fit(splits["train"], n_items), pop, last, k)
    slow = loop_markov(data, last, k)
    assert np.array_equal(fast[:, :slow.shape[1]], slow)
    assert (fast[:, slow.shape[1]:] == -1).all()                          # fewer items than k: padding


@FAST
@given(st.integers(0, 2**16))
def test_transition_counts_equal_a_counter_of_each_users_training_pairs(seed):
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(2, 15))
    seqs = [rng.integers(0, n_items, rng.integers(3, 12)) for _ in range(rng.integers(1, 8))]
    data = dataset.Dataset.from_sequences(seqs, user_raw=[f"u{u}" for u in range(len(seqs))],
                                        item_raw=[str(i) for i in range(n_items)])
    training = dataset.leave_one_out(data, 5)["train"]
    pairs = Counter((int(a), int(b)) for s in seqs for a, b in zip(s[:-3], s[1:-2]))   # within s[:-2]
    last, items = rng.integers(-1, n_items, 9), rng.integers(-1, n_items, (9, 6))      # -1: no item
    expected = [[pairs[(a, b)] if a >= 0 and b >= 0 else 0 for b in row] for a, row in zip(last, items)]
    assert evaluate.Transitions.fit(training, n_items).count(last, items).tolist() == expected
    rebuilt = dataset.train_split(data.offsets, data.items, 5)          # what load_run builds from data.npz
    assert all(np.array_equal(getattr(rebuilt, f), getattr(training, f)) for f in ("start", "pos", "user"))


@FAST
@given(st.integers(0, 2**16), st.sampled_from([0.0, 0.5, 2.0, 100.0]))
def test_ranker_sorts_each_beam_by_score_plus_weighted_log_count(seed, weight):
    rng = np.random.default_rng(seed)
    B, K = int(rng.integers(1, 5)), int(rng.integers(1, 9))
    scores = -np.sort(rng.choice([0.5, 1.0, 1.5, 3.0], (B, K)), axis=1)     # non-increasing, with ties
    scores[np.arange(K)[None, :] >= K - rng.integers(0, K + 1, (B, 1))] = -np.inf       # padding at the end
    counts = np.where(np.isfinite(scores), rng.integers(0, 4, (B, K)), 0)
    class Counted:                                                        # a Transitions that returns `counts`
        def count(self, last, items):
            return counts
    order, fused = evaluate.TransitionRanker(Counted(), weight).rank(np.zeros(B), np.zeros((B, K)), scores)
    for b in range(B):
        value = [scores[b, j] + weight * np.log1p(counts[b, j]) for j in range(K)]
        by_hand = sorted(range(K), key=lambda j: (-value[j], j))              # ties keep the beam's order
        assert order[b].tolist() == by_hand and fused[b].tolist() == [value[j] for j in by_hand]
    if weight == 0:
        assert (order == np.arange(K)).all()


def _step_setup():
    """A tiny model without dropout, its optimiser and a small training split (the same in every process)."""
    torch.manual_seed(0)
    model = rpg_ed.RPG_ED(rpg_ed.RPGEDConfig(**{**TINY, "dropout": 0.0, "attn_pdrop": 0.0}))
    optimizer = train.make_optimizer(model, train.TrainConfig())
    rng = np.random.default_rng(0)
    history = np.where(rng.random((13, 6)) < 0.3, -1, rng.integers(0, 9, (13, 6)))
    history = np.sort(history, axis=1)                                   # padding (-1) on the left
    split = dataset.Split.from_windows(history=history, target=rng.integers(0, 9, 13), user=rng.integers(0, 5, 13))
    codes = np.unique(rng.integers(0, 256, (40, 4)), axis=0)[:9]
    item_tokens = torch.cat([torch.from_numpy(sid.codes_to_tokens(codes, TINY["n_user_buckets"])),
                             torch.full((1, 4), sid.PAD)])
    return model, optimizer, split, item_tokens, torch.arange(5) % TINY["n_user_buckets"]


STEPS = [np.arange(10), np.arange(10, 13)]   # a global batch of 2b = 10 rows, then 3 rows (split 2 + 1)


def _run_steps(model, optimizer, split, item_tokens, buckets, net, dist):
    for rows in STEPS:
        local, weight = dist.shard(rows)
        batch = evaluate.make_batch(split, local, item_tokens, buckets, torch.device("cpu"))
        train.train_step(net, optimizer, batch, weight, lr=1e-2,
                         device=torch.device("cpu"), dtype=torch.float32)


def test_shard_covers_the_batch_once():
    for n in range(1, 9):
        rows = np.arange(100, 100 + n)
        parts = [cli.Dist(r, 3, torch.device("cpu")).shard(rows) for r in range(3)]
        real = [local for local, weight in parts if weight > 0]
        assert sorted(np.concatenate(real).tolist()) == rows.tolist()
        assert sum(w for _, w in parts) == pytest.approx(3.0)             # weights average to 1


@FAST
@given(st.lists(st.integers(0, 12), min_size=1, max_size=80), st.integers(1, 9), st.integers(12, 60),
       st.integers(0, 1000))
def test_length_batches_cover_each_row_once_within_budget(lengths, batch_size, batch_tokens, seed):
    lengths = np.array(lengths)
    batches = evaluate.length_batches(lengths, batch_size, batch_tokens, torch.Generator().manual_seed(seed))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))    # every row once
    for rows in batches:
        assert len(set(lengths[rows].tolist())) == 1                                  # one length a batch
        assert 1 <= len(rows) <= batch_size and len(rows) * max(lengths[rows[0]], 1) <= batch_tokens
    again = evaluate.length_batches(lengths, batch_size, batch_tokens, torch.Generator().manual_seed(seed))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))                  # pure function of the seed
    other = evaluate.length_batches(lengths, batch_size, batch_tokens, torch.Generator().manual_seed(seed + 1))
    assert sorted(map(len, other)) == sorted(map(len, batches))                       # same steps every epoch
    in_order = evaluate.length_batches(lengths, batch_size, batch_tokens)                 # evaluation: by length
    assert np.all(np.diff(lengths[np.concatenate(in_order)]) >= 0)


@FAST
@given(st.integers(0, 1000), st.integers(1, 5), st.integers(6, 40))
def test_batch_loss_does_not_depend_on_grouping(seed, batch_size, batch_tokens):
    """The mean loss over a set of rows, in one padded batch or in length groups weighted by size."""
    model, _, split, item_tokens, buckets = _step_setup()
    model.eval()
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, 13)
    split = dataset.Split.from_windows(np.where(np.arange(6)[None, :] >= 6 - lengths[:, None], split.history.clip(0), -1),
                                     split.target, split.user)
    rows = np.arange(13)
    cpu = torch.device("cpu")
    whole = model(evaluate.make_batch(split, rows, item_tokens, buckets, cpu)).item()
    groups = evaluate.length_batches(lengths, batch_size, batch_tokens, torch.Generator().manual_seed(seed))
    grouped = sum(model(evaluate.make_batch(split, g, item_tokens, buckets, cpu)).item() * len(g) for g in groups) / 13
    assert grouped == pytest.approx(whole, abs=1e-5)


def test_evaluation_does_not_depend_on_grouping():
    """Beam-search metrics do not depend on how users are cut into length-grouped batches."""
    data = dataset.prepare(dataset.RawData(*map(list, zip(*interactions(3, n_users=30, n_items=12)))), five_core=False)
    splits = dataset.leave_one_out(data, 6)
    index, _ = sid.build_index(np.random.default_rng(0).normal(size=(len(data.item_raw), 8)), seed=0)
    item_tokens = torch.cat([torch.from_numpy(sid.codes_to_tokens(index.item_codes, TINY["n_user_buckets"])),
                             torch.full((1, 4), sid.PAD)])
    buckets = torch.arange(len(data.user_raw)) % TINY["n_user_buckets"]
    model = tiny_model(3)
    transitions = evaluate.Transitions.fit(splits["train"], len(data.item_raw))
    results = []
    for size in (256, 3, 7, 1):
        rankers = [evaluate.TransitionRanker(transitions, w) for w in (0.0, 2.0)]
        results.append(evaluate.evaluate_split(model, splits["test"], index, item_tokens, buckets, rankers, 10,
                                               torch.float32, cli.Dist(0, 1, torch.device("cpu")), batch_size=size))
    assert results[0][0]["ndcg@10"] > 0 and all(r == results[0] for r in results[1:])
    # The oracle: each user alone, the beam sorted by hand with the transitions counted by hand
    test, ranks = splits["test"], []
    pairs = Counter((int(a), int(b)) for s in data.sequences for a, b in zip(s[:-3], s[1:-2]))
    for u in range(len(test.pos)):
        batch = evaluate.make_batch(test, np.array([u]), item_tokens, buckets, torch.device("cpu"), with_target=False)
        result = beam.beam_search(model.eval(), batch, 10, 10, index)
        items, scores = result.items[0].tolist(), result.scores[0].tolist()
        last = int(test.items[test.pos[u] - 1])
        value = [sc + 2.0 * np.log1p(pairs[(last, it)]) for it, sc in zip(items, scores)]
        ranked = [items[j] for j in sorted(range(10), key=lambda j: (-value[j], j))]
        ranks.append(ranked.index(test.target[u]) + 1 if test.target[u] in ranked else 0)
    assert results[0][1] == pytest.approx(evaluate.metrics_from_ranks(np.array(ranks)))
    assert results[0][1] != results[0][0]                              # the transitions changed some ranks


# ----------------------------------------------------------------------------------------------
# The whole repository: modules copied alone or into a package, README examples, layers
# ----------------------------------------------------------------------------------------------


def run_alone(tmp_path, files: list, code: str) -> str:
    """Copy `files` into an empty folder and run `code` there, without PYTHONPATH: the script's
    folder is the only project folder on sys.path, so only the copies can be imported."""
    for name in files:
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    script = tmp_path / "use_it.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-s", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_rpg_ed_and_beam_copied_alone_generate_with_a_hand_made_constraint(tmp_path):
    out = run_alone(tmp_path, ["rpg_ed.py", "beam.py"], """
import sys, torch, rpg_ed
assert not any(m in sys.modules for m in ("sid", "train", "dataset")), "imported a project module it should not need"

class FiveItems:                                     # a hand-made constraint: 5 SIDs, brute force
    codes = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4], [0, 5, 0, 0], [7, 7, 7, 7], [2, 0, 1, 3]])
    def prefix_mask(self, prefix):
        l = prefix.shape[1]
        ok = (self.codes[None, :, :l] == prefix[:, None, :]).all(-1)                  # (N, 5)
        mask = torch.zeros(len(prefix), 8, dtype=torch.bool)
        for item in range(5):                        # 5 items: a loop is the plainest oracle
            mask[ok[:, item], self.codes[item, l]] = True
        return mask
    def lookup(self, codes):
        same = (codes[:, None, :] == self.codes[None]).all(-1)
        return torch.where(same.any(1), same.float().argmax(1), -1)

torch.manual_seed(0)
config = rpg_ed.RPGEDConfig(codebook_size=8, n_user_buckets=3, max_history=4, encoder_n_layer=1, decoder_n_layer=1,
                            n_head=2, n_embd=16, n_inner=32, beam_size=10)
model = rpg_ed.RPG_ED(config).eval()
history = FiveItems.codes[torch.tensor([[0, 2, 3], [4, 4, 1]])] + model.digit_offsets
batch = {"user_ids": torch.tensor([0, 2]), "history_sid": history}
items = model.generate(batch, FiveItems(), beam_size=10, n_return=10)[..., 0]
assert items.shape == (2, 10)
for row in items.tolist():
    real = [i for i in row if i >= 0]
    assert sorted(real) == [0, 1, 2, 3, 4] and row[5:] == [-1] * 5, row    # every item once, then padding
print("ok", items.tolist())
""")
    assert out.startswith("ok")


def test_rpg_ed_copied_without_beam_trains_and_scores(tmp_path):
    out = run_alone(tmp_path, ["rpg_ed.py"], """
import torch, rpg_ed
config = rpg_ed.RPGEDConfig(codebook_size=8, n_user_buckets=3, max_history=4, encoder_n_layer=1, decoder_n_layer=1,
                            n_head=2, n_embd=16, n_inner=32)
model = rpg_ed.RPG_ED(config)
codes = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
batch = {"user_ids": torch.tensor([0, 1]), "history_sid": (codes + model.digit_offsets)[:, None].repeat(1, 3, 1),
         "decoder_input_ids": torch.cat([torch.full((2, 1), rpg_ed.BOS), codes.flip(0) + model.digit_offsets], 1),
         "decoder_labels": torch.cat([codes.flip(0) + model.digit_offsets, torch.full((2, 1), rpg_ed.EOS)], 1)}
loss = model(batch)
loss.backward()
print("ok", round(loss.item(), 3))
""")
    assert out.startswith("ok")


def test_beam_copied_alone_runs_a_toy_model_and_equals_brute_force(tmp_path):
    out = run_alone(tmp_path, ["beam.py"], """
import itertools, torch, beam

class Config:
    n_digit, codebook_size = 3, 4

class Cache:
    def __init__(self, n): self.rows = torch.arange(n)
    def reorder(self, rows): self.rows = self.rows[rows]

class Toy:
    '''Logits depend on the user and the digit only, so the best SIDs are known in closed form.'''
    config = Config()
    def __init__(self): self.table = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    def encode(self, user_ids, history_sid): return user_ids.float()[:, None], torch.ones(len(user_ids), 1, dtype=torch.bool)
    def new_cache(self, memory, memory_mask, beam_size):
        cache = Cache(len(memory) * beam_size); cache.user = memory[:, 0].long().repeat_interleave(beam_size); return cache
    def step(self, prev_codes, cache, digit): return self.table[cache.user, digit]

class Everything:
    def prefix_mask(self, prefix): return torch.ones(len(prefix), 4, dtype=torch.bool)
    def lookup(self, codes): return codes[:, 0] * 16 + codes[:, 1] * 4 + codes[:, 2]

toy = Toy()
result = beam.beam_search(toy, {"user_ids": torch.tensor([0, 1]), "history_sid": None}, 64, 5, Everything())
logp = torch.log_softmax(toy.table, -1)                                   # (user, digit, code)
for user in range(2):
    scores = sorted(((sum(logp[user, d, c].item() for d, c in enumerate(sid)), sid)
                     for sid in itertools.product(range(4), repeat=3)), key=lambda t: -t[0])[:5]
    expected = [s[0] * 16 + s[1] * 4 + s[2] for _, s in scores]
    assert result.items[user].tolist() == expected, (result.items[user].tolist(), expected)
print("ok")
""")
    assert out.startswith("ok")


def test_sid_copied_with_opq_alone_builds_saves_loads_and_adds_items(tmp_path):
    out = run_alone(tmp_path, ["sid.py", "opq.py"], """
import sys, numpy as np, sid
assert "torch" not in sys.modules, "sid.py imported torch"
rng = np.random.default_rng(0)
emb = rng.standard_normal((300, 8)).astype(np.float32)
emb[10:20] = emb[0]                                     # duplicates: they must move
index, moved = sid.build_index(emb, n_iter=2, kmeans_iter=2)
index.save("idx")
loaded = sid.SIDIndex.load("idx")
assert np.array_equal(loaded.item_codes, index.item_codes) and moved >= 10
bigger, _ = loaded.add_items(rng.standard_normal((20, 8)).astype(np.float32))
keys = sid.pack_codes(bigger.item_codes)
assert bigger.n_items == 320 and len(np.unique(keys)) == 320
assert np.array_equal(bigger.lookup(bigger.item_codes), np.arange(320))
print("ok")
""")
    assert out.startswith("ok")


GENERATE_WITH_SIDS = """
import sys, numpy as np, torch
{imports}
rng = np.random.default_rng(0)
index, _ = sid.build_index(rng.standard_normal((60, 8)).astype(np.float32), n_iter=2, kmeans_iter=2)
config = rpg_ed.RPGEDConfig(n_user_buckets=3, max_history=4, encoder_n_layer=1, decoder_n_layer=1, n_head=2,
                            n_embd=16, n_inner=32, beam_size=10)
model = rpg_ed.RPG_ED(config).eval()
history = torch.from_numpy(sid.codes_to_tokens(index.item_codes[[[0, 5, 7], [1, 1, 2]]], 3))
items = model.generate({{"user_ids": torch.tensor([0, 2]), "history_sid": history}}, index)[..., 0]
assert items.shape == (2, 10) and ((items >= 0) & (items < 60)).all()
assert all(len(set(row)) == 10 for row in items.tolist())               # real items, each once
assert "{beam}" in sys.modules and "{opq}" in sys.modules and "{absent}" not in sys.modules, sorted(sys.modules)
print("ok")
"""


@pytest.mark.parametrize("layout", ["flat", "package"])
def test_rpg_ed_beam_and_sid_copied_flat_or_into_a_package_generate(tmp_path, layout):
    """The core files, copied beside each other or into mypkg/ (with __init__.py): generate finds
    beam.py beside rpg_ed.py, and sid.py finds opq.py, either way."""
    if layout == "flat":
        code = GENERATE_WITH_SIDS.format(imports="import rpg_ed, sid", beam="beam", opq="opq", absent="mypkg")
        out = run_alone(tmp_path, ["rpg_ed.py", "beam.py", "sid.py", "opq.py"], code)
    else:
        (tmp_path / "mypkg").mkdir()
        (tmp_path / "mypkg" / "__init__.py").write_text("")
        for name in ("rpg_ed.py", "beam.py", "sid.py", "opq.py"):
            shutil.copy(os.path.join(HERE, name), tmp_path / "mypkg" / name)
        code = GENERATE_WITH_SIDS.format(imports="from mypkg import rpg_ed, sid", beam="mypkg.beam", opq="mypkg.opq", absent="beam")
        out = run_alone(tmp_path, [], code)
    assert out.startswith("ok")


TOY_DIGITS, TOY_CODES, TOY_BEAM = 2, 3, 2          # the README's worked beam search
TOY_CATALOGUE = [(0, 0), (0, 2), (2, 1), (2, 2)]                  # item id i has SID TOY_CATALOGUE[i]
P_DIGIT0 = [0.30, 0.50, 0.20]                                   # p(c0)
P_DIGIT1 = {0: [0.25, 0.60, 0.15], 1: [0.10, 0.10, 0.80], 2: [0.05, 0.90, 0.05]}   # p(c1 | c0)


class ToyCache:
    """Holds, per beam row, the codes the toy decoder has read (a real KV cache holds their K/V)."""

    def __init__(self, n_rows: int):
        self.codes_read = torch.zeros(n_rows, 0, dtype=torch.long)    # (N, steps so far)
        self.reorders = []

    def reorder(self, rows: torch.Tensor) -> None:
        self.reorders.append(rows.tolist())
        self.codes_read = self.codes_read[rows]


class ToyModel:
    """Fixed probabilities: p(c0) for digit 0, p(c1 | c0) for digit 1; logits = log p."""

    config = SimpleNamespace(n_digit=TOY_DIGITS, codebook_size=TOY_CODES)

    def __init__(self):
        self.logits_seen = []                                         # (N, K) per step

    def encode(self, user_ids: torch.Tensor, history_sid: torch.Tensor):
        B = user_ids.shape[0]
        return torch.zeros(B, 1, 1), torch.ones(B, 1, dtype=torch.bool)   # memory, memory_mask

    def new_cache(self, memory: torch.Tensor, memory_mask: torch.Tensor, beam_size: int) -> ToyCache:
        self.cache = ToyCache(memory.shape[0] * beam_size)
        return self.cache

    def step(self, prev_codes, cache: ToyCache, digit: int) -> torch.Tensor:
        n_rows = cache.codes_read.shape[0]
        if digit == 0:
            probs = torch.tensor([P_DIGIT0] * n_rows)
        else:
            cache.codes_read = torch.cat([cache.codes_read, prev_codes[:, None]], 1)
            probs = torch.tensor([P_DIGIT1[int(c)] for c in cache.codes_read[:, -1]])
        logits = probs.log()
        self.logits_seen.append(logits)
        return logits


class ToyCatalogue:
    """The constraint: the 4 SIDs of TOY_CATALOGUE, searched by brute force; records each prefix mask."""

    def __init__(self):
        self.codes = torch.tensor(TOY_CATALOGUE)                          # (n_items, TOY_DIGITS)
        self.masks = []                                               # (prefixes, mask) per step

    def prefix_mask(self, prefix: torch.Tensor) -> torch.Tensor:
        l = prefix.shape[1]
        match = (self.codes[None, :, :l] == prefix[:, None, :]).all(-1)              # (N, n_items)
        nxt = torch.nn.functional.one_hot(self.codes[:, l], TOY_CODES).bool()          # (n_items, K)
        mask = (match[:, :, None] & nxt[None]).any(1)                                 # (N, K)
        self.masks.append((prefix.clone(), mask.clone()))
        return mask

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        same = (codes[:, None, :] == self.codes[None]).all(-1)
        return torch.where(same.any(1), same.float().argmax(1), -1)


def fmt_score(x: float) -> str:
    return "  -inf" if x == float("-inf") else f"{x:6.3f}"


def sid_text(codes) -> str:
    return "(" + ",".join(str(int(c)) for c in codes) + ")" if len(codes) else "()"


def worked_beam_example() -> str:
    """Run beam.beam_search on the toy model and describe every step; returns the README's text."""
    model, catalogue = ToyModel(), ToyCatalogue()
    batch = {"user_ids": torch.zeros(1, dtype=torch.long), "history_sid": torch.zeros(1, 1, TOY_DIGITS, dtype=torch.long)}
    result = beam.beam_search(model, batch, beam_size=TOY_BEAM, n_return=TOY_BEAM, constraint=catalogue)

    lines = [f"{len(TOY_CATALOGUE)} items of {TOY_DIGITS} digits, {TOY_CODES} codes per digit: "
             + ", ".join(f"item {i} {sid_text(s)}" for i, s in enumerate(TOY_CATALOGUE)) + f"; beam size {TOY_BEAM}"]
    beam_scores = [0.0] + [float("-inf")] * (TOY_BEAM - 1)        # as beam_search starts
    for digit in range(TOY_DIGITS):
        prefixes, mask = catalogue.masks[digit]
        log_probs = torch.log_softmax(model.logits_seen[digit], -1)
        lines.append("")
        lines.append((f"step {digit}: digit {digit}        " + "".join(f"  code {c:<3}" for c in range(TOY_CODES))).rstrip())
        candidates = []
        for j in range(TOY_BEAM):
            prefix = prefixes[j].tolist()
            row = []
            for c in range(TOY_CODES):
                total = beam_scores[j] + float(log_probs[j, c]) if mask[j, c] else float("-inf")
                row.append(total)
                candidates.append((total, j, c))
            if beam_scores[j] == float("-inf"):                       # not live: a copy of beam 0
                lines.append(f"beam {j} {sid_text(prefix):<6} score -inf: not live, so every candidate is -inf")
                continue
            lines.append(f"beam {j} {sid_text(prefix):<6} score {fmt_score(beam_scores[j]).strip()}")
            lines.append("  log p(code)          " + "".join(f"  {fmt_score(float(v)):>8}" for v in log_probs[j]))
            lines.append("  leads to an item?    " + "".join(f"  {'yes' if m else 'no':>8}" for m in mask[j]))
            lines.append("  score + log p, masked" + "".join(f"  {fmt_score(v):>8}" for v in row))
        # beam_search keeps the TOY_BEAM best by a stable sort: ties keep (parent, code) order
        kept = sorted(candidates, key=lambda t: -t[0])[:TOY_BEAM]
        parents = [j for _, j, _ in kept]
        lines.append(f"keep the best {TOY_BEAM}: " + ", ".join(
            f"{sid_text(prefixes[j].tolist() + [c])} {fmt_score(s).strip()} from beam {j}" for s, j, c in kept))
        if digit < TOY_DIGITS - 1:
            assert model.cache.reorders[digit] == parents, (model.cache.reorders, parents)
            lines.append(f"parents {parents} -> cache.reorder({parents}): new beam j takes the cache row of beam parents[j]")
        else:
            lines.append(f"parents {parents}: the SIDs are reordered; no step follows, so no cache.reorder")
        beam_scores = [s for s, _, _ in kept]

    assert [round(s, 5) for s in beam_scores] == [round(float(s), 5) for s in result.scores[0]]
    lines.append("")
    lines.append("result, best first: " + ", ".join(
        f"item {int(i)} {sid_text(s.tolist())} {float(v):.3f}"
        for i, s, v in zip(result.items[0], result.sids[0], result.scores[0])))
    exact = sorted(((math.log(P_DIGIT0[a]) + math.log(P_DIGIT1[a][b]), i) for i, (a, b) in enumerate(TOY_CATALOGUE)),
                   reverse=True)
    lines.append("exact, every item:  " + ", ".join(f"item {i} {s:.3f}" for s, i in exact))
    return "\n".join(lines) + "\n"


def readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_worked_beam_example_matches_readme():
    assert worked_beam_example() in readme()


def test_python_rpg_ed_prints_the_readme_walk_through():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rpg_ed.shape_demo()
    assert out.getvalue() in readme()


LAYERS = [("opq", "beam"), ("sid",), ("rpg_ed",), ("dataset",), ("embeddings",), ("evaluate",), ("runs",), ("train",),
          ("recommend",), ("experiments", "bench")]                     # lowest first; cli.py beside them all


def project_imports(path: str) -> list:
    """(line, module, at top level) for each import of a project module in a file, including
    imports inside functions."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else \
            [node.module.split(".")[0]] if isinstance(node, ast.ImportFrom) and node.module else []
        found += [(node.lineno, n, id(node) in top) for n in names if os.path.exists(os.path.join(HERE, n + ".py"))]
    return found


def test_no_module_imports_one_above_it():
    """Each module imports only modules of lower layers (opq and beam none at all), even inside a
    function; cli.py imports none, and any module may use it, but sid.py only for its command
    line (inside a function), so that sid.py still copies alone. Every module has a layer."""
    layer = {name: k for k, group in enumerate(LAYERS) for name in group}
    modules = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")}
    assert modules == set(layer) | {"cli"}, f"modules without a layer: {modules - set(layer) - {'cli'}}"
    for name in sorted(modules):
        for line, imported, top_level in project_imports(os.path.join(HERE, name + ".py")):
            if imported == "cli":
                assert name != "cli" and not (name == "sid" and top_level), f"{name}.py:{line} imports cli"
                continue
            assert name != "cli" and layer[imported] < layer[name] and name not in ("opq", "beam"), \
                f"{name}.py:{line} imports {imported}, which is not in a lower layer"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, os.path.join(HERE, "test_operations.py"), "-q"] + sys.argv[1:]))
