"""Speed and memory of RPG_ED, each figure next to a baseline measured in the same run.

    python bench.py                 # the seed config's model; a few minutes on a 2-core CPU
    python bench.py --quick=true    # every section on tiny sizes (CI runs this; it asserts nothing)

Sections: 1 decoding (cache vs no cache, FLOP/s vs measured matmul peak), 2 training step
(vs torch.nn.Transformer of the same shape, and vs the same step with the batch checks that
generate() runs), 3 history compression (50 vs 200 encoder tokens),
4 decoding-cache memory, 5 SID index at scale (5b: collision resolution against the plain search), 6 dynamic batches and bf16
on Beauty-shaped histories, 7 (`--scale`) train.py's data path on up to 20M synthetic interactions
and 1M items (peak memory, seconds per stage). Times are medians of several runs after warm-up.

    python bench.py --scale=true    # section 7 alone: 1M, 5M and 20M interactions
"""
from __future__ import annotations

import heapq
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

import beam
import cli
import dataset
import evaluate
import opq
import sid
import train
from rpg_ed import RPG_ED, RPGEDConfig


def recipe_model() -> RPGEDConfig:
    """The model `python train.py` trains on Beauty-like data: train.py's `sparse` preset."""
    return train.make_configs({"preset": "sparse"})[1]


def sync() -> None:
    """Wait for the GPU, if any: its work is asynchronous, and a timer must not stop before it ends."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_times(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median times of fn_a and fn_b, run alternately, so that a noisy machine slows both alike."""
    fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def table(title: str, rows: list) -> None:
    print(f"\n## {title}\n\n| figure | value | baseline | ratio | target |\n|---|---|---|---|---|")
    for name, value, baseline, ratio, target in rows:
        print(f"| {name} | {value} | {baseline} | {ratio} | {target} |")


def matmul_peak_gflops(n: int, device: torch.device) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / median_time(lambda: a @ b, 5) / 1e9


def random_batch(model: RPG_ED, index: sid.SIDIndex, B: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    c = model.config
    history = index.item_codes[rng.integers(0, index.n_items, (B, c.max_history))].astype(np.int64)
    target = index.item_codes[rng.integers(0, index.n_items, B)].astype(np.int64)
    history_sid = torch.from_numpy(history) + model.digit_offsets
    tokens = torch.from_numpy(target) + model.digit_offsets
    return {"user_ids": torch.from_numpy(rng.integers(0, max(c.n_user_buckets, 1), B)), "history_sid": history_sid,
            "decoder_input_ids": torch.cat([torch.ones(B, 1, dtype=torch.long), tokens], 1),
            "decoder_labels": torch.cat([tokens, torch.full((B, 1), 2)], 1)}


# ----------------------------------------------------------------------------------------------
# FLOP counts (multiply-add = 2 FLOPs; matmuls only, which is where the time goes)
# ----------------------------------------------------------------------------------------------

def encoder_flops(c: RPGEDConfig, B: int, L: int) -> float:
    d, S = c.n_embd, L + 1
    history_mlp = B * L * 2 * (2 * d * c.n_inner)
    per_layer = B * S * 2 * (4 * d * d + 2 * d * c.n_inner) + B * 2 * 2 * S * S * d
    return history_mlp + c.encoder_n_layer * per_layer


def decode_flops(c: RPGEDConfig, B: int, beam_size: int, S: int, cached: bool) -> float:
    """Decoder work for 4 generated digits, per batch."""
    d, N, total = c.n_embd, B * beam_size, 0.0
    for t in range(c.n_digit):
        new = 1 if cached else t + 1                                 # tokens run through the decoder
        per_layer = N * new * 2 * (4 * d * d + 2 * d * d + 2 * d * c.n_inner)   # self qkv+out, cross q+out, MLP
        per_layer += N * new * 2 * 2 * (t + 1 + S) * d              # attention scores and values
        if not cached:
            per_layer += N * 2 * 2 * d * d * S                      # cross K/V recomputed for every beam
        total += c.decoder_n_layer * per_layer + N * 2 * d * c.codebook_size
    if cached:
        total += c.decoder_n_layer * B * 2 * 2 * d * d * S          # cross K/V once per user
    return total


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

def bench_decoding(c: RPGEDConfig, n_items: int, B: int, beam_size: int, repeats: int, peak: float,
                   device: torch.device):
    torch.manual_seed(0)
    model = RPG_ED(c).eval()
    index, _ = sid.build_index(np.random.default_rng(0).standard_normal((n_items, 32)).astype(np.float32), n_iter=2)
    batch = {k: v.to(device) for k, v in random_batch(model, index, B).items()}
    model.to(device)
    cached = median_time(lambda: beam.beam_search(model, batch, beam_size, beam_size, index), repeats)
    uncached = median_time(lambda: beam.beam_search(model, batch, beam_size, beam_size, index, use_cache=False), repeats)
    S = c.max_history + 1
    flops = encoder_flops(c, B, c.max_history) + decode_flops(c, B, beam_size, S, True)
    flops_uncached = encoder_flops(c, B, c.max_history) + decode_flops(c, B, beam_size, S, False)
    free = beam.beam_search(model, batch, beam_size, beam_size, index, constrained=False)
    print(f"\nFLOP count (matmuls): cached {flops / 1e9:.2f} GFLOP per batch "
          f"(encoder {encoder_flops(c, B, c.max_history) / 1e9:.2f}), uncached {flops_uncached / 1e9:.2f}; "
          f"FLOP ratio {flops_uncached / flops:.2f}x, decoder-only ratio "
          f"{decode_flops(c, B, beam_size, S, False) / decode_flops(c, B, beam_size, S, True):.2f}x")
    table(f"1. Decoding: batch {B}, beam {beam_size}, {n_items:,}-item catalogue", [
        ("time per batch", f"{cached:.3f} s (cache)", f"{uncached:.3f} s (no cache)", f"{uncached / cached:.2f}x faster", ">= 4x"),
        ("users/s", f"{B / cached:.1f}", f"{B / uncached:.1f}", "", ""),
        ("achieved GFLOP/s", f"{flops / cached / 1e9:.1f}", f"peak {peak:.1f}", f"{flops / cached / 1e9 / peak:.0%} of peak", ">= 25%"),
        ("unconstrained invalid-SID rate", f"{free.invalid_rate:.1%}", "0% (constrained)", "", ""),
    ])


class BuiltinSeq2Seq(nn.Module):
    """The same embeddings, history compression and tied digit logits around torch.nn.Transformer."""

    def __init__(self, model: RPG_ED):
        super().__init__()
        c = model.config
        self.model = model                     # borrows embeddings, positions and the compressor
        self.core = nn.Transformer(c.n_embd, c.n_head, c.encoder_n_layer, c.decoder_n_layer, c.n_inner,
                                   c.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(c.n_digit + 1))

    def forward(self, batch: dict) -> torch.Tensor:
        m, c = self.model, self.model.config
        items = m.history_compressor(m.token_emb(batch["history_sid"]))        # (B, L, E)
        user = m.token_emb(3 + batch["user_ids"])[:, None]                    # the user token is on
        src = torch.cat([user, items], 1) + m.encoder_pos.weight[: items.shape[1] + 1]
        tgt = m.token_emb(batch["decoder_input_ids"]) + m.decoder_pos.weight
        pad = torch.cat([torch.zeros_like(batch["history_sid"][:, :1, 0], dtype=torch.bool),
                         batch["history_sid"][:, :, 0] == 0], 1)
        hidden = self.core(src, tgt, tgt_mask=self.causal, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        weight = m.token_emb.weight[c.sid_offset:].view(c.n_digit, c.codebook_size, c.n_embd)
        logits = torch.einsum("btd,tcd->btc", hidden[:, : c.n_digit], weight)
        targets = batch["decoder_labels"][:, : c.n_digit] - m.digit_offsets
        return nn.functional.cross_entropy(logits.reshape(-1, c.codebook_size), targets.reshape(-1))


def bench_training(c: RPGEDConfig, B: int, repeats: int, peak: float, device: torch.device):
    torch.manual_seed(0)
    ours = RPG_ED(c).train()
    builtin = BuiltinSeq2Seq(RPG_ED(c)).train().to(device)
    index = sid.SIDIndex(np.random.default_rng(0).integers(0, 256, (5000, 4)))
    keys = sid.pack_codes(index.item_codes)
    index = sid.SIDIndex(index.item_codes[np.unique(keys, return_index=True)[1]])
    batch = {k: v.to(device) for k, v in random_batch(ours, index, B).items()}
    ours.to(device)

    def step_fn(module):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

        def step():
            loss = module(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    ours_s = median_time(step_fn(ours), repeats)
    builtin_s = median_time(step_fn(builtin), repeats)
    flops = 3 * (encoder_flops(c, B, c.max_history) + c.decoder_n_layer * B * (c.n_digit + 1) * 2 *
                 (6 * c.n_embd ** 2 + 2 * c.n_embd * c.n_inner) + c.decoder_n_layer * B * 4 * c.n_embd ** 2 * (c.max_history + 1))
    table(f"2. Training step: batch {B}, forward + backward + AdamW", [
        ("examples/s", f"{B / ours_s:.1f} (RPG_ED)", f"{B / builtin_s:.1f} (nn.Transformer)", f"{builtin_s / ours_s:.2f}x", ">= 0.9x"),
        ("step time", f"{ours_s:.2f} s", f"{builtin_s:.2f} s", "", ""),
        ("model FLOP utilisation", f"{flops / ours_s / 1e9 / peak:.0%}", f"{flops / builtin_s / 1e9 / peak:.0%}", "", f"peak {peak:.1f} GFLOP/s"),
    ])
    with torch.profiler.profile() as prof:
        step_fn(ours)()
    print("\nWhere an RPG_ED training step spends its time (top 5 ops by self CPU time):\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=5))


def bench_batch_checks(configs: list, B: int, repeats: int):
    """The training step with and without check_batch, which forward() ran on every batch before
    batches were checked where they are made; timed alternately."""
    rows = []
    for name, c in configs:
        torch.manual_seed(0)
        model = RPG_ED(c).train()
        index = sid.SIDIndex(np.unique(np.random.default_rng(0).integers(0, 256, (5000, 4)), axis=0))
        batch = random_batch(model, index, B)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(check: bool):
            if check:
                model.check_batch(batch)
            train.train_step(model, opt, batch, 1.0, 1e-4, torch.device("cpu"), torch.float32)
        unchecked_s, checked_s = paired_median_times(lambda: step(False), lambda: step(True), repeats)
        check_s = median_time(lambda: model.check_batch(batch), 5 * repeats)
        rows.append((f"step time, {name}", f"{unchecked_s * 1e3:.1f} ms (checks at the boundary)",
                     f"{checked_s * 1e3:.1f} ms (check_batch in every step)", f"{checked_s / unchecked_s:.3f}x", ""))
        rows.append((f"check_batch alone, {name}", f"{check_s * 1e3:.2f} ms", "", f"{check_s / unchecked_s:.2%} of a step", ""))
    table(f"2b. Batch checks out of the training step: batch {B}, forward + backward + AdamW", rows)


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward: the activation memory of fn()."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def bench_history(c: RPGEDConfig, B: int, repeats: int):
    torch.manual_seed(0)
    model = RPG_ED(c).train()
    index = sid.SIDIndex(np.unique(np.random.default_rng(1).integers(0, 256, (3000, 4)), axis=0))
    batch = random_batch(model, index, B)

    def compressed():
        return model.encode(batch["user_ids"], batch["history_sid"])[0].sum()

    def all_tokens():
        """The alternative: every SID token is its own encoder position (1 + 200 tokens)."""
        x = model.token_emb(torch.cat([3 + batch["user_ids"][:, None], batch["history_sid"].flatten(1)], 1))
        pos = nn.functional.embedding(torch.arange(x.shape[1]) % model.encoder_pos.num_embeddings, model.encoder_pos.weight)
        x = x + pos
        mask = torch.ones(x.shape[:2], dtype=torch.bool)[:, None, None, :]
        for block in model.encoder:
            x = block(x, mask)
        return model.ln_encoder(x).sum()

    ours = median_time(lambda: compressed().backward(), repeats)
    full = median_time(lambda: all_tokens().backward(), repeats)
    mem_ours, mem_full = saved_activation_bytes(compressed), saved_activation_bytes(all_tokens)
    table(f"3. History compression: encoder forward + backward, batch {B}", [
        ("time per example", f"{ours / B * 1e3:.2f} ms (50 tokens + user)", f"{full / B * 1e3:.2f} ms (200 tokens + user)", f"{full / ours:.2f}x faster", ""),
        ("activation memory per example", f"{mem_ours / B / 1e6:.2f} MB", f"{mem_full / B / 1e6:.2f} MB", f"{mem_full / mem_ours:.2f}x smaller", ""),
    ])


def bench_cache_memory(c: RPGEDConfig, B: int, beam_size: int):
    model = RPG_ED(c).eval()
    index = sid.SIDIndex(np.unique(np.random.default_rng(2).integers(0, 256, (3000, 4)), axis=0))
    batch = random_batch(model, index, B)
    with torch.no_grad():
        memory, mask = model.encode(batch["user_ids"], batch["history_sid"])
        cache = model.new_cache(memory, mask, beam_size)
    S, hd, L = memory.shape[1], c.head_dim, c.decoder_n_layer
    self_bytes = cache.self_kv.numel() * cache.self_kv.element_size() / B
    cross_bytes = sum(t.numel() * t.element_size() for kv in cache.cross_kv for t in kv) / B
    self_formula = L * 2 * beam_size * c.n_head * (c.n_digit + 1) * hd * 4
    cross_formula = L * 2 * c.n_head * S * hd * 4
    table(f"4. Decoding cache per user, beam {beam_size}, float32", [
        ("self-attention K/V", f"{self_bytes / 1024:.1f} KiB", f"formula L*2*beam*H*T*hd*4 = {self_formula / 1024:.1f} KiB", "", ""),
        ("cross-attention K/V (once per user)", f"{cross_bytes / 1024:.1f} KiB", f"formula L*2*H*S*hd*4 = {cross_formula / 1024:.1f} KiB", "", ""),
        ("cross K/V if copied per beam", f"{cross_bytes * beam_size / 1024:.1f} KiB", "", f"{beam_size}x more", "stored once"),
        ("total per user", f"{(self_bytes + cross_bytes) / 1024:.1f} KiB", f"{(self_bytes + cross_bytes * beam_size) / 1024:.1f} KiB (per-beam copies)", "", ""),
    ])


def bench_index(n_items: int, dim: int, n_lookup: int, n_prefix: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_items, dim)).astype(np.float32)
    dup = rng.choice(n_items, n_items // 10, replace=False)
    x[dup] = x[rng.choice(n_items, len(dup))]                                  # 10% exact duplicates
    start = time.perf_counter()
    index, moved = sid.build_index(x)
    build = time.perf_counter() - start
    shared = n_items - len(np.unique(sid.pack_codes(index.item_codes)))
    queries = rng.integers(0, 256, (n_lookup, 4))
    queries[: n_lookup // 2] = index.item_codes[rng.integers(0, n_items, n_lookup // 2)]
    lookup = median_time(lambda: index.lookup(queries), 3)
    rows = [("OPQ build + collision resolution", f"{build:.1f} s", f"{moved:,} items moved, {shared} shared SIDs", "", "< 30 s"),
            (f"lookup of {n_lookup:,} SIDs", f"{lookup:.3f} s", "", "", "< 0.5 s")]
    for length in range(4):
        prefixes = index.item_codes[rng.integers(0, n_items, n_prefix), :length].astype(np.int64)
        rows.append((f"prefix mask, {n_prefix:,} prefixes of length {length}",
                     f"{median_time(lambda: index.prefix_mask(prefixes), 5):.4f} s", "", "", "< 0.05 s"))
    inverted = len(pickle.dumps(index.inverted_dict(), protocol=4))
    in_memory = index.sorted_keys.nbytes + index.sorted_items.nbytes
    rows += [("forward index bytes per item", f"{index.item_codes.nbytes / n_items:.0f}", "int32 seed layout: 16", "", "4"),
             ("inverted index bytes per item", f"{in_memory / n_items:.0f} in memory (uint32 key + int64 id)",
              f"{inverted / n_items:.0f} as tokens2item.pkl", "", "")]
    table(f"5. SID index: {n_items:,} x {dim}-d items", rows)


def beauty_shaped_lengths(n_users: int, max_history: int, seed: int = 0) -> np.ndarray:
    """History lengths of the training examples of a Beauty-like data set: 5-core user sequences
    with a heavy tail (5 + Lomax(2, 4.2): mean about 9, as Beauty's 8.9), each train position
    1..n-3 a target (the protocol), capped at max_history. Beauty itself: mean history 6.7 items,
    and random batches of 512 pad the encoder to about 3.0 times the real items."""
    rng = np.random.default_rng(seed)
    n = 5 + np.floor(rng.pareto(2.0, n_users) * 4.2).astype(int)                # sequence lengths, >= 5
    return np.minimum(np.concatenate([np.arange(1, k - 2) for k in n]), max_history)


def bench_dynamic_batches_and_bf16(c: RPGEDConfig, B: int, n_users: int, beam_B: int, repeats: int):
    """Training on Beauty-shaped histories, fixed random vs length-grouped batches; then training and
    beam search in bf16 vs fp32 autocast."""
    torch.manual_seed(0)
    lengths = beauty_shaped_lengths(n_users, c.max_history)
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 256, (3000, 4)), axis=0)
    index = sid.SIDIndex(codes)
    history = np.where(np.arange(c.max_history)[None, :] >= c.max_history - lengths[:, None],
                       rng.integers(0, index.n_items, (len(lengths), c.max_history)), -1)
    split = dataset.Split.from_windows(history, rng.integers(0, index.n_items, len(lengths)), np.zeros(len(lengths), np.int64))
    item_tokens = evaluate.item_token_table(index, c)
    user_buckets = torch.zeros(1, dtype=torch.long)
    cpu = torch.device("cpu")
    cfg = train.TrainConfig(batch_size=B)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).numpy()
    fixed = [order[start:start + B] for start in range(0, len(order), B)]       # random rows, any lengths
    dynamic = evaluate.length_batches(lengths, B, B * c.max_history, torch.Generator().manual_seed(1))
    padded = sum(len(r) * lengths[r].max() for r in fixed) / sum(lengths[r].sum() for r in fixed)

    def examples_per_s(batches: list, dtype: torch.dtype) -> float:
        model = RPG_ED(c).train()
        opt = train.make_optimizer(model, cfg)
        made = [evaluate.make_batch(split, rows, item_tokens, user_buckets, cpu) for rows in batches]

        def epoch(part=made):
            for batch in part:
                train.train_step(model, opt, batch, 1.0, 1e-4, cpu, dtype)
        epoch(made[:2])                                                          # warm-up
        return sum(map(len, batches)) / median_time(epoch, 1, warmup=0)

    fixed_fp32, dynamic_fp32 = examples_per_s(fixed, torch.float32), examples_per_s(dynamic, torch.float32)
    dtype, why = cli.pick_dtype("auto", cpu, c.n_embd, c.n_inner)             # emulated bf16 would crawl: not run
    if dtype != torch.bfloat16:
        return table(f"6. Dynamic batches; bf16 not timed: {why}", [("training examples/s, fp32", f"{dynamic_fp32:.0f} "
                     f"(dynamic)", f"{fixed_fp32:.0f} (fixed random)", f"{dynamic_fp32 / fixed_fp32:.2f}x", ">= 2x")])
    fixed_bf16, dynamic_bf16 = examples_per_s(fixed, torch.bfloat16), examples_per_s(dynamic, torch.bfloat16)

    rows = np.flatnonzero(lengths == min(c.max_history, 8))[:beam_B]               # one length, like an eval batch
    batch = evaluate.make_batch(split, rows, item_tokens, user_buckets, cpu, with_target=False)
    fp32_s, bf16_s, same = beam_search_in_bf16(RPG_ED(c).eval(), batch, index, repeats)
    table(f"6. Dynamic batches and bf16: Beauty-shaped histories (mean {lengths.mean():.1f}, max {c.max_history}), "
          f"{len(lengths):,} examples, d {c.n_embd}, MLP {c.n_inner}, {c.encoder_n_layer}+{c.decoder_n_layer} layers, "
          f"batch {B}", [
        ("training examples/s, fp32", f"{dynamic_fp32:.0f} (dynamic)", f"{fixed_fp32:.0f} (fixed random)",
         f"{dynamic_fp32 / fixed_fp32:.2f}x", ">= 2x"),
        ("encoder positions / real history items", "about 1.0 (dynamic)", f"{padded:.2f} (fixed random)", "", ""),
        ("training examples/s, dynamic batches", f"{dynamic_bf16:.0f} (bf16)", f"{dynamic_fp32:.0f} (fp32)",
         f"{dynamic_bf16 / dynamic_fp32:.2f}x", ""),
        ("training examples/s, fixed batches", f"{fixed_bf16:.0f} (bf16)", f"{fixed_fp32:.0f} (fp32)",
         f"{fixed_bf16 / fixed_fp32:.2f}x", ""),
        (f"beam search users/s (beam {c.beam_size}, {len(rows)} users)", f"{len(rows) / bf16_s:.0f} (bf16)",
         f"{len(rows) / fp32_s:.0f} (fp32)", f"{fp32_s / bf16_s:.2f}x", ""),
        ("users whose bf16 top items equal fp32's", f"{same:.0%}", "", "", ""),
    ])


def beam_search_in_bf16(model: RPG_ED, batch: dict, index: sid.SIDIndex, repeats: int) -> tuple:
    """Beam search on the CPU in fp32 and in bf16 autocast: (fp32 seconds, bf16 seconds, the share
    of users whose top items are the same in both)."""
    def search(dtype):
        def run():
            with cli.autocast(torch.device("cpu"), dtype):
                return beam.beam_search(model, batch, model.config.beam_size, model.config.beam_size, index)
        return run
    fp32_s, bf16_s = median_time(search(torch.float32), repeats), median_time(search(torch.bfloat16), repeats)
    return fp32_s, bf16_s, (search(torch.float32)().items == search(torch.bfloat16)().items).all(1).float().mean()


def best_first_collisions(codes: np.ndarray, distances_of, taken_keys: np.ndarray | None = None):
    """The baseline of sid.resolve_collisions: its rule as the plain search its docstring describes
    (the lowest id at each nearest SID keeps it; each other item, in id order, takes the free SID
    of least (cost, ranks), popped from a heap one tuple at a time). Same results, other cost."""
    codes = codes.astype(np.int64)
    keys = sid.pack_codes(codes)
    taken_keys = np.zeros(0, np.uint32) if taken_keys is None else taken_keys
    keeps = np.zeros(len(keys), bool)
    keeps[np.unique(keys, return_index=True)[1]] = True                  # the lowest id at each SID
    keeps &= ~np.isin(keys, taken_keys)
    taken = set(taken_keys.tolist()) | set(keys[keeps].tolist())
    movers = np.flatnonzero(~keeps)
    for block in np.array_split(movers, -(-len(movers) // 4096)) if len(movers) else []:
        dist = distances_of(block).astype(np.float64)                     # [m, 4, 256]
        order = np.argsort(dist, axis=2, kind="stable")                   # codes by rank, nearest first
        for item, codes_by_rank, dist_by_rank in zip(block, order.tolist(), np.take_along_axis(dist, order, 2).tolist()):
            cost = lambda r: sum(dist_by_rank[d][r[d]] for d in range(4))
            heap, seen = [(cost((0, 0, 0, 0)), (0, 0, 0, 0))], {(0, 0, 0, 0)}
            while True:
                _, r = heapq.heappop(heap)                                # ties: smallest ranks first
                key = (codes_by_rank[0][r[0]] << 24 | codes_by_rank[1][r[1]] << 16 | codes_by_rank[2][r[2]] << 8
                       | codes_by_rank[3][r[3]])                          # the packed SID, as sid.pack_codes
                if key not in taken:
                    break
                for d in range(4):                                        # one digit one rank further
                    nxt = r[:d] + (r[d] + 1,) + r[d + 1:]
                    if r[d] + 1 < sid.CODEBOOK_SIZE and nxt not in seen:
                        seen.add(nxt)
                        heapq.heappush(heap, (cost(nxt), nxt))
            codes[item] = sid.unpack_keys(key)
            taken.add(key)
    return codes, len(movers)


def bench_collisions(sizes: tuple, hard: int) -> None:
    """sid.resolve_collisions against best_first_collisions on the same codes: `sizes` items of
    64 dimensions with 10% exact duplicates (bench_index's input), and `hard` items of 2 dimensions,
    whose last two digits get a single centroid each, so many items must move."""
    rows = []
    for n_items, dim in [(n, 64) for n in sizes] + [(hard, 2)]:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n_items, dim)).astype(np.float32)
        if dim > 2:
            dup = rng.choice(n_items, n_items // 10, replace=False)
            x[dup] = x[rng.choice(n_items, len(dup))]
        quantizer = opq.train_opq(x, seed=0)
        codes = quantizer.encode(x)
        seconds, results = [], []
        for rule in (sid.resolve_collisions, best_first_collisions):
            start = time.perf_counter()
            results.append(rule(codes, lambda items: quantizer.distances(x[items])))
            seconds.append(time.perf_counter() - start)
        if not (np.array_equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]):
            raise AssertionError(f"the two collision rules disagree on {n_items} x {dim}-d items")
        rows.append((f"{n_items:,} x {dim}-d items, {results[0][1]:,} move: sid.resolve_collisions",
                     f"{seconds[0]:.2f} s", f"best-first heap {seconds[1]:.2f} s",
                     f"{seconds[1] / seconds[0]:.2f}x", "same SIDs"))
    table("5b. Collision resolution alone (one run each), the fast rule vs the plain best-first search", rows)


# ----------------------------------------------------------------------------------------------
# 7 (--scale): the data path at a million items, on synthetic interactions
# ----------------------------------------------------------------------------------------------

def synthetic_interactions(n_users: int, n_items: int, per_user: float, seed: int = 0, n_successors: int = 3,
                           follow: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, timestamp) int arrays with learnable structure, deterministic by seed.

    Item popularity follows a power law (p ~ rank^-0.5: a long tail that still survives 5-core).
    Each item has `n_successors` likely successors; the next item is one of the current item's
    successors with probability `follow`, else a popularity draw. History lengths are 5 plus a
    geometric draw, so the mean is about `per_user`. Rows come user by user, oldest first.
    """
    rng = np.random.default_rng(seed)
    lengths = 4 + rng.geometric(1 / max(per_user - 4, 1.0), n_users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    by_rank = rng.permutation(n_items)                                     # the item at each popularity rank
    cdf = np.cumsum(np.arange(1, n_items + 1) ** -0.5)
    draw = lambda n: by_rank[np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), n_items - 1)]
    successors = rng.integers(0, n_items, (n_items, n_successors))
    items = np.empty(offsets[-1], np.int32)
    current, users = draw(n_users), np.arange(n_users)
    for t in range(int(lengths.max())):                                   # positions; vectorised over users
        users, current = users[lengths[users] > t], current[lengths[users] > t]
        items[offsets[users] + t] = current
        follows = rng.random(len(users)) < follow
        current = np.where(follows, successors[current, rng.integers(0, n_successors, len(users))], draw(len(users)))
    user = np.repeat(np.arange(n_users), lengths)
    return user, items, np.arange(offsets[-1]) - offsets[user]


def write_csv(path: str, user: np.ndarray, item: np.ndarray, time_: np.ndarray, chunk: int = 1_000_000) -> None:
    with open(path, "w") as f:
        f.write("user,item,timestamp\n")
        for lo in range(0, len(user), chunk):                              # chunks of rows, joined in C
            rows = zip(user[lo:lo + chunk].tolist(), item[lo:lo + chunk].tolist(), time_[lo:lo + chunk].tolist())
            f.write("".join(f"u{u},i{i},{t}\n" for u, i, t in rows))


def run_measured(argv: list) -> tuple[int, float, str]:
    """Run a command; return (exit status, its peak resident memory in GB, its output)."""
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        log.seek(0)
        return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024 ** 2, log.read()


def bench_scale(sizes: list, steps: int, eval_users: int) -> None:
    """`python train.py` on synthetic CSVs of growing size: peak memory and seconds per stage."""
    rows = []
    for n_interactions, n_users, n_items in sizes:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            user, item, time_ = synthetic_interactions(n_users, n_items, n_interactions / n_users)
            path = os.path.join(folder, "synthetic.csv")
            write_csv(path, user, item, time_)
            made = time.perf_counter() - start
            del user, item, time_
            status, peak_gb, out = run_measured(
                [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
                 f"--data={path}", f"--out_dir={folder}/run", "--preset=cpu", f"--max_steps={steps}",
                 f"--eval_users={eval_users}", "--report_beam_size=0", "--log_every=50"])
            if status != 0:
                raise SystemExit(f"train.py failed on {n_interactions:,} interactions:\n{out[-3000:]}")
            with open(os.path.join(folder, "run", "results.json")) as f:
                results = json.load(f)
        sec, data = results["seconds"], results["dataset"]
        before = sec["load"] + sec["split"] + sec["embeddings"] + sec["sids"]
        rows.append((f"{data['interactions']:,}", f"{data['users']:,}", f"{data['items']:,}", f"{peak_gb:.2f}",
                     *(f"{sec[k]:.1f}" for k in ("load", "split", "embeddings", "sids")), f"{before:.0f}",
                     f"{sec['train']:.1f}", f"{sec['eval_valid_and_test'] / 2:.1f}", f"{made:.0f}"))
    print(f"\n## 7 Scale: train.py on synthetic CSVs ({steps} training steps, the cpu preset, evaluation of "
          f"{eval_users:,} users)\n")
    print("| interactions | users | items | peak RSS GB | load s | split s | embeddings s | SIDs s | before training s "
          f"| {steps} steps s | evaluation s (one split) | generate+write s |\n|" + "---|" * 12)
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\ntargets at 20M interactions / 1M items: peak RSS at most 8 GB, before training at most 600 s")


@dataclass
class BenchConfig:
    """Which sections of the benchmark to run."""
    quick: bool = False              # tiny sizes, to check that every section runs
    device: str = "cpu"              # sections 1-2 (decoding, training step) run here: cpu | cuda | mps | auto
    only: int = 0                    # run one section (1-6); 0 = all
    scale: bool = False              # only section 7: train.py on 1M, 5M, 20M synthetic interactions

    def __post_init__(self):
        if not 0 <= self.only <= 7:
            raise ValueError(f"--only: expected a section 1..7 or 0 (all), got {self.only}")


def main(argv: list) -> None:
    args = BenchConfig(**cli.parse_flags(argv, BenchConfig, usage=__doc__))
    if args.scale:
        bench_scale([(1_000_000, 50_000, 50_000), (5_000_000, 250_000, 250_000), (20_000_000, 1_000_000, 1_000_000)],
                    steps=100, eval_users=10_000)
        return
    if args.quick:
        c = RPGEDConfig(n_user_buckets=100, max_history=10, encoder_n_layer=1, decoder_n_layer=1, n_head=2,
                        n_embd=32, n_inner=64)
        sizes = dict(n_items=500, B=8, beam=5, repeats=1, train_B=16, index=(3000, 16, 10_000, 1000), peak_n=256,
                     collisions=((3000,), 2000),
                     dynamic=(c, 16, 100, 8))
    else:
        c = RPGEDConfig()
        sizes = dict(n_items=10_000, B=64, beam=10, repeats=3, train_B=256, index=(100_000, 128, 1_000_000, 10_000), peak_n=2048,
                     collisions=((100_000, 1_000_000), 30_000),
                     dynamic=(recipe_model(), 512, 3000, 256))
    print(f"# bench.py{' --quick=true' if args.quick else ''}\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU {platform.processor() or platform.machine()} ({_cpu_name()}), numpy {np.__version__}")
    device = cli.pick_device(args.device)
    peak = matmul_peak_gflops(sizes["peak_n"], device)
    print(f"measured fp32 matmul peak ({sizes['peak_n']}x{sizes['peak_n']} a@b) on {device}: {peak:.1f} GFLOP/s; "
          f"sections 1-2 run on {device}, the others on the CPU")
    sections = [lambda: bench_decoding(c, sizes["n_items"], sizes["B"], sizes["beam"], sizes["repeats"], peak, device),
                lambda: (bench_training(c, sizes["train_B"], sizes["repeats"], peak, device),
                         bench_batch_checks([("the cpu preset", train.make_configs({"preset": "cpu"})[1]),
                                             ("this section's model", c)], sizes["train_B"], 3 * sizes["repeats"])),
                lambda: bench_history(c, sizes["B"], sizes["repeats"]),
                lambda: bench_cache_memory(c, sizes["B"], sizes["beam"]),
                lambda: (bench_index(*sizes["index"]), bench_collisions(*sizes["collisions"])),
                lambda: bench_dynamic_batches_and_bf16(*sizes["dynamic"], sizes["repeats"])]
    for number, section in enumerate(sections, 1):
        if args.only in (0, number):
            section()
    if args.quick and args.only in (0, 7):
        bench_scale([(20_000, 1_000, 1_000)], steps=5, eval_users=100)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    cli.run_main(main)
