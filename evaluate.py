"""Evaluation: the model's batches from a split (training's too), the one beam-ranking loop,
metrics, baselines, and the reports' contents.

    item_tokens, user_buckets = item_token_table(index, mcfg), user_bucket_table(user_raw, n_buckets)
    for rows, items, scores, sids in beam_batches(model, split, index, item_tokens, user_buckets, ...):
        order, fused = ranker.rank(last_items[rows], items, scores)     # best first
    metrics = evaluate_split(model, split, ..., rankers)                # Recall/NDCG@5/10 per ranker

Training's validation and test, and recommend.py's lists, all run `beam_batches`: users grouped
by history length, one beam search per batch over real SIDs. The beam search does not know how
its results are ranked: a ranker does (whisper's SequenceRanker). `TransitionRanker` ranks a
beam by its summed log-probability plus weight * ln(1 + n), n = how often the user's last item
came directly before the item in training; weight 0 is the model alone, the protocol's ranking.

Baselines on the same split: popularity and the first-order Markov chain, both fitted on the
training split only. The results table and the training curves (an SVG) are made here; train.py
writes them.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass

import numpy as np
import torch

import beam
import cli
import sid
from dataset import Dataset, Split, ragged_arange
from rpg_ed import RPG_ED, RPGEDConfig

TRANSITION_WEIGHTS = (0.0, 1.0, 2.0, 3.0, 5.0)   # the ranker's weights a run chooses among, on validation
EVAL_BATCH_SIZE = 256                             # most users in one beam-search batch

# ----------------------------------------------------------------------------------------------
# Ranking a beam: the training transitions, counted, and the ranker that uses them
# ----------------------------------------------------------------------------------------------

@dataclass
class Transitions:
    """How often item a came directly before item b in training: each training target and the item
    before it, counted (so no pair reaches a validation or test target). Stored as sorted keys
    a * n_items + b, so a lookup is one searchsorted."""
    keys: np.ndarray                 # (P,) int64, sorted and unique
    counts: np.ndarray               # (P,) int64, > 0
    n_items: int

    @classmethod
    def fit(cls, train: Split, n_items: int) -> "Transitions":
        if np.any(train.pos <= train.start) or (len(train.pos) and train.items.max() >= n_items):
            raise ValueError(f"Transitions.fit: expected training targets with an item before each and item "
                             f"ids below n_items={n_items}")
        before, target = train.items[train.pos - 1], train.items[train.pos]
        keys, counts = np.unique(before.astype(np.int64) * n_items + target, return_counts=True)
        return cls(keys, counts.astype(np.int64), n_items)

    def count(self, last: np.ndarray, items: np.ndarray) -> np.ndarray:
        """last (U,) and items (U, K) item ids, -1 = none -> (U, K) int64: times last -> item in training."""
        last, items = np.asarray(last, np.int64), np.asarray(items, np.int64)
        if not len(self.keys):
            return np.zeros(items.shape, np.int64)
        key = last[:, None] * self.n_items + items
        at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        real = (last[:, None] >= 0) & (items >= 0) & (self.keys[at] == key)
        return np.where(real, self.counts[at], 0)


@dataclass
class TransitionRanker:
    """Orders a beam by fused = score + weight * ln(1 + n), n = transitions.count(last item, item):
    the order of p_model(item) * (1 + n) ** weight. Weight 0 keeps the beam's own order (the model
    alone); ties keep beam order; padding (score -inf) stays last."""
    transitions: Transitions
    weight: float

    def rank(self, last: np.ndarray, items: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """last (B,), items and scores (B, K) of a beam -> (order, fused), (B, K): positions in the
        beam, best first, and their fused scores."""
        fused = scores + self.weight * np.log1p(self.transitions.count(last, items))
        order = np.argsort(-fused, axis=1, kind="stable")
        return order, np.take_along_axis(fused, order, 1)


# ----------------------------------------------------------------------------------------------
# Batches: rows of a split -> the model's batch, grouped by history length
# ----------------------------------------------------------------------------------------------

def length_batches(lengths: np.ndarray, batch_size: int, batch_tokens: int,
                   generator: torch.Generator | None = None) -> list:
    """Dynamic batches: rows of one history length together, so a batch pads (almost) nothing.

    Each batch holds rows of a single length l, at most batch_size of them and at most
    batch_tokens // l (the encoder reads rows x l history positions). With a generator, rows are
    shuffled within each length and the batches among themselves; without one they come in
    length order (evaluation). The batch sizes depend on the lengths alone, so every epoch has
    the same number of steps. Returns a list of row-index arrays covering each row once.
    """
    n = len(lengths)
    order = np.arange(n) if generator is None else torch.randperm(n, generator=generator).numpy()
    order = order[np.argsort(lengths[order], kind="stable")]          # by length, shuffled within
    sorted_lengths = lengths[order]
    batches = []
    for length in np.unique(sorted_lengths):                          # at most max_history + 1 groups
        lo, hi = np.searchsorted(sorted_lengths, [length, length + 1])
        rows = max(1, min(batch_size, batch_tokens // max(int(length), 1)))
        batches.extend(order[start:min(start + rows, hi)] for start in range(lo, hi, rows))
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def item_token_table(index: sid.SIDIndex, mcfg: RPGEDConfig) -> torch.Tensor:
    """(n_items + 1, n_digit) SID tokens of each item; the last row is PAD (make_batch's padding)."""
    return torch.cat([torch.from_numpy(sid.codes_to_tokens(index.item_codes, mcfg.n_user_buckets)),
                      torch.full((1, mcfg.n_digit), sid.PAD)])


def user_bucket_table(user_raw: list, n_user_buckets: int) -> torch.Tensor:
    """(n_users,) the user-token bucket of each raw user id; zeros when there is no user token."""
    if n_user_buckets == 0:
        return torch.zeros(len(user_raw), dtype=torch.long)
    return torch.tensor([sid.user_bucket(u, n_user_buckets) for u in user_raw], dtype=torch.long)


def make_batch(split: Split, rows: np.ndarray, item_tokens: torch.Tensor, user_buckets: torch.Tensor,
               device: torch.device, with_target: bool = True) -> dict:
    """Rows of a split -> the model's batch. History is trimmed to the longest real one in the batch
    (left padding, right-aligned positions: trimming leading padding changes nothing)."""
    history = torch.from_numpy(split.windows(rows))                            # (b, H), -1 = padding
    real = history >= 0
    width = int(real.sum(1).max()) if len(rows) else 0
    history = history[:, history.shape[1] - width:]
    n_items = item_tokens.shape[0] - 1
    if history.numel() and int(history.max()) >= n_items:
        raise ValueError(f"history: item {int(history.max())} has no SID (the index has {n_items} items)")
    batch = {"user_ids": user_buckets[split.user[rows]],
             "history_sid": item_tokens[torch.where(history >= 0, history, n_items)]}  # (b, w, 4)
    if with_target:
        target = item_tokens[torch.from_numpy(split.target[rows])]            # (b, 4)
        b = len(rows)
        batch["decoder_input_ids"] = torch.cat([torch.full((b, 1), sid.BOS), target], 1)
        batch["decoder_labels"] = torch.cat([target, torch.full((b, 1), sid.EOS)], 1)
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# The one loop: beam search over every row of a split
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def beam_batches(model: RPG_ED, split: Split, index: sid.SIDIndex, item_tokens: torch.Tensor,
                 user_buckets: torch.Tensor, beam_size: int, batch_size: int, dtype: torch.dtype, dist: cli.Dist,
                 log=None):
    """Yields (rows, items, scores, sids) for each batch of `split`'s rows, users grouped by history
    length: the beam's items and summed log-probabilities (b, beam_size) in numpy, best first, and
    their SIDs (b, beam_size, n_digit) as a tensor. With several processes batch j runs on rank
    j % world: each batch is the one a single process runs, so summed results are identical. `log`
    (a print function): a progress line every 30 s or so, for a long search."""
    model.eval()
    batches = length_batches(split.lengths(), batch_size, batch_size * model.config.max_history)
    progress, done = cli.Progress(len(split.pos)), 0
    for j, rows in enumerate(batches):
        done += len(rows)
        if j % dist.world != dist.rank:
            continue
        batch = make_batch(split, rows, item_tokens, user_buckets, dist.device, with_target=False)
        with cli.autocast(dist.device, dtype):
            result = beam.beam_search(model, batch, beam_size, beam_size, index)
        yield rows, result.items.cpu().numpy(), result.scores.float().cpu().numpy(), result.sids.cpu()
        if log and progress.due():
            log(f"beam search: {progress.line(done, 'users')}", flush=True)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def hit_ranks(ranked: np.ndarray, target: np.ndarray) -> np.ndarray:
    """ranked (U, k) item ids best first, target (U,) -> 1-based rank of the target, 0 = not found."""
    hits = ranked == target[:, None]
    return np.where(hits.any(1), hits.argmax(1) + 1, 0)


def metrics_from_ranks(rank: np.ndarray, ks=(5, 10)) -> dict:
    """Mean Recall@k and NDCG@k (one relevant item: 1 / log2(rank + 1) when rank <= k)."""
    out = {}
    for k in ks:
        hit = (rank >= 1) & (rank <= k)
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.maximum(rank, 1) + 1.0), 0.0).mean())
    return out


def rank_metrics(ranked: np.ndarray, target: np.ndarray, ks=(5, 10)) -> dict:
    return metrics_from_ranks(hit_ranks(ranked, target), ks)


def evaluate_split(model: RPG_ED, split: Split, index: sid.SIDIndex, item_tokens: torch.Tensor,
                   user_buckets: torch.Tensor, rankers: list, beam_size: int, dtype: torch.dtype,
                   dist: cli.Dist, batch_size: int = EVAL_BATCH_SIZE, log=None) -> list:
    """Beam search over real SIDs for every target of `split`; the whole beam ranked by each of
    `rankers` -> metrics of its top 10, one dict per ranker. With 10 beams a ranker reorders the
    same 10 items: only @5 and NDCG can move. Each user's target rank is filled in by exactly one
    process and summed over processes (zeros elsewhere): the metrics of a single process."""
    training = model.training                                                  # beam_batches sets eval mode
    target, last = split.target, split.items[split.pos - 1]                     # every history has an item
    rank = np.zeros((len(rankers), len(target)), np.int64)                      # 0 = not in the top 10
    for rows, items, scores, _ in beam_batches(model, split, index, item_tokens, user_buckets, beam_size,
                                               batch_size, dtype, dist, log):
        for r, ranker in enumerate(rankers):
            top = np.take_along_axis(items, ranker.rank(last[rows], items, scores)[0][:, :10], 1)
            rank[r, rows] = hit_ranks(top, target[rows])
    model.train(training)
    return [metrics_from_ranks(r) for r in dist.sum(torch.from_numpy(rank)).numpy()]


def evaluation_seconds(model: RPG_ED, split: Split, index: sid.SIDIndex, item_tokens: torch.Tensor,
                       user_buckets: torch.Tensor, beam_size: int, dtype: torch.dtype, dist: cli.Dist) -> float:
    """About how long evaluate_split takes on `split`: three of its batches (short, middle and long
    histories), timed, scaled to all its users and shared among the processes."""
    batches = length_batches(split.lengths(), EVAL_BATCH_SIZE, EVAL_BATCH_SIZE * model.config.max_history)
    if not batches:
        return 0.0
    rows = np.concatenate([batches[j] for j in np.unique(np.linspace(0, len(batches) - 1, 3).astype(int))])
    part = Split(split.items, split.start[rows], split.pos[rows], split.user[rows], split.max_history)
    tick = time.time()
    evaluate_split(model, part, index, item_tokens, user_buckets, [], beam_size, dtype, cli.Dist(0, 1, dist.device))
    return (time.time() - tick) * len(split.pos) / len(rows) / dist.world


def best_of(valid: list) -> int:
    """The position of the best validation NDCG@10 in a list of metrics (the first one on a tie)."""
    return int(np.argmax([m["ndcg@10"] for m in valid]))


# ----------------------------------------------------------------------------------------------
# Baselines: popularity and the first-order Markov chain
# ----------------------------------------------------------------------------------------------

def markov_top(transitions: Transitions, pop: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """For each of `items`, the k most frequent successors in `transitions`, popularity then item
    id breaking ties, filled up from the popularity order: (len(items), k)."""
    n_items, keys, counts = transitions.n_items, transitions.keys, transitions.counts
    succ_src, succ = keys // n_items, keys % n_items
    # successors of each source, best first: count desc, popularity desc, item id asc
    order = np.lexsort((succ, -pop[succ], -counts, succ_src))
    succ_src, succ = succ_src[order], succ[order]
    first = np.searchsorted(succ_src, np.arange(n_items + 1))
    rank = np.arange(len(succ)) - first[succ_src]
    top = np.full((n_items, k), -1, np.int64)
    top[succ_src[rank < k], rank[rank < k]] = succ[rank < k]
    wanted = np.unique(items)
    table = top[wanted]                                                 # (W, k), -1 = to fill
    n_succ = np.minimum(first[wanted + 1] - first[wanted], k)
    by_pop = np.argsort(-pop, kind="stable")[:2 * k]                    # fill from here, skipping successors
    is_succ = np.isin(wanted[:, None] * n_items + by_pop[None, :], keys)
    fill_rank = np.cumsum(~is_succ, axis=1) - 1                         # position among the non-successors
    slot = n_succ[:, None] + fill_rank
    use = ~is_succ & (slot < k)
    table[np.nonzero(use)[0], slot[use]] = np.broadcast_to(by_pop, use.shape)[use]
    return table[np.searchsorted(wanted, items)]


def baseline_rankings(data: Dataset, splits: dict, which: str, k: int = 10) -> dict:
    """Popularity and first-order Markov (last-item transition counts, popularity breaks ties).

    Both are fitted on the training split only, like the model; the test ranking starts from
    each user's validation item, which is the last item of the test history.
    """
    n_items = len(data.item_raw)
    lengths = data.lengths
    local = ragged_arange(lengths)                                                    # position within the user
    in_train = local < np.repeat(lengths - 2, lengths)                                 # train parts
    pop = np.bincount(data.items[in_train], minlength=n_items).astype(np.float64)
    by_pop = np.argsort(-pop, kind="stable")
    split = splits[which]
    last = split.items[split.pos - 1]                                   # item before the target
    markov = markov_top(Transitions.fit(splits["train"], n_items), pop, last, k)
    target = split.target
    return {"popularity": rank_metrics(np.tile(by_pop[:k], (len(target), 1)), target),
            "markov": rank_metrics(markov, target)}


# ----------------------------------------------------------------------------------------------
# Reports: the results table, the training curves
# ----------------------------------------------------------------------------------------------

def curves_svg(progress: dict, title: str) -> str:
    """Two plots side by side, as an SVG document: the training loss (mean over each logging interval)
    and validation NDCG@10, both against training examples seen. No plotting library: a polyline
    and a few labels per plot."""
    width, height, pad = 360, 240, 48
    plots = [("training loss", [(p["examples"], p["loss"]) for p in progress["loss_history"]]),
             ("validation NDCG@10", [(p["examples"], p["ndcg@10"]) for p in progress["valid_history"]])]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height + 24}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{width}" y="14" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for k, (name, points) in enumerate(plots):
        x0, y0, w, h = k * width + pad, 24 + 16, width - pad - 16, height - pad - 16   # plot area
        parts.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
        parts.append(f'<text x="{x0 + w / 2}" y="{y0 - 4}" text-anchor="middle">{name}</text>')
        parts.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 30}" text-anchor="middle">training examples seen</text>')
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_hi, y_lo, y_hi = max(max(xs), 1), min(ys), max(ys)
        y_lo, y_hi = (y_lo - 0.5, y_hi + 0.5) if y_hi == y_lo else (y_lo, y_hi)
        px = [x0 + w * x / x_hi for x in xs]                                          # data -> pixels
        py = [y0 + h - h * (y - y_lo) / (y_hi - y_lo) for y in ys]
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(px, py))
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        if name.startswith("validation"):                                             # few points: mark each
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#1f77b4"/>' for x, y in zip(px, py)]
        for y, label in ((y0 + h, y_lo), (y0, y_hi)):                                 # axis labels
            parts.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{label:.3g}</text>')
        parts.append(f'<text x="{x0}" y="{y0 + h + 14}" text-anchor="middle">0</text>')
        parts.append(f'<text x="{x0 + w}" y="{y0 + h + 14}" text-anchor="middle">{x_hi:,}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def print_table(results: dict) -> None:
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    print(f"\n| model | split | {' | '.join(k.replace('recall', 'R').replace('ndcg', 'N') for k in keys)} |")
    print("|---|---|" + "---|" * len(keys))
    for split in ("valid", "test"):
        rows = [("RPG_ED", results[split])]
        rows += [(f"RPG_ED, {key[4:]} beams", results[key][split]) for key in results if key.startswith("beam")]
        for key in [key for key in results if key.startswith("transitions")]:      # transitions[_beamN]
            beams = key.removeprefix("transitions").removeprefix("_beam")
            rows.append((f"RPG_ED + transitions (weight {results[key]['weight']:g}, chosen on validation)" +
                         (f", {beams} beams" if beams else ""), results[key][split]))
        rows += [(n, m) for n, m in results["baselines"][split].items()]
        for name, m in rows:
            print(f"| {name} | {split} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")


