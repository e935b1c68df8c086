"""Use a trained run: recommendations for a user or any history, every user at once, new items.

    python recommend.py --run_dir=out/ml-100k --user=196              # that user's top 10, with titles
    python recommend.py --run_dir=out/ml-100k --history=242,302,377   # the top 10 after any raw item ids
    python recommend.py --run_dir=out/ml-100k --all=true --out=recs.jsonl  # every user, one JSON line each
    torchrun --standalone --nproc_per_node=2 recommend.py --run_dir=out/ml-100k --all=true --out=recs.jsonl
    python recommend.py --run_dir=DIR --add_items=EMB.npy --item_ids=IDS.txt   # new items (cold start)

A run folder, as train.py writes it, holds all that is needed: config.json, checkpoint.pt (the
weights), the SID index (item_id2tokens.npy, tokens2item.pkl, opq.npz), data.npz (raw item and
user ids, a title per item, every user's sequence) and results.json (the ranker's weight).
`runs.load_run` reads them, counts the training transitions from data.npz, and refuses a folder
whose files disagree. Recommendations are the model's beam search over real SIDs, ranked as
evaluation ranks them: by the summed log-probability of each SID, plus a weight
times ln(1 + how often the history's last item came directly before the item in the run's
training data); the weight is the one training chose on validation, or --transition_weight.
Items the user has already seen are kept (as in evaluation) and flagged.

New items (`add_items`): the run's saved OPQ encodes their embeddings, collision resolution gives
them SIDs no other item has, and the index files are rewritten; old items keep their SIDs, so
the checkpoint still matches and constrained decoding can generate the new items at once. Only
a run whose SIDs came from an embeddings file alone can place items with no interactions. The
model has never generated an added item's code tuple, so `--new_share=0.1` (TIGER's rule) opens
up to a tenth of the list to added items that share a generated SID's first three codes.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import cli
import sid
from cli import Dist, atomic_write, init_distributed, parse_flags, pick_dtype, printable, run_main
from dataset import Split, check_id, check_ids, ragged_arange
from embeddings import read_item_emb
from evaluate import TransitionRanker, beam_batches, item_token_table, user_bucket_table
from runs import MANIFEST, RUN_FILES, TITLE_CHARS, RunFolder, TrainedRun, load_run, parse_run_data

# ----------------------------------------------------------------------------------------------
# Recommending: histories -> top items, in length-grouped batches
# ----------------------------------------------------------------------------------------------

def request_split(histories: list, max_history: int) -> Split:
    """Item-id sequences of any length -> a Split whose windows (cut per batch) are their last
    max_history items; each history is followed by a placeholder target that nothing reads."""
    lengths = np.array([len(h) for h in histories], np.int64)
    pos = np.cumsum(lengths + 1) - 1
    flat = np.concatenate([np.append(np.asarray(h, np.int64), 0) for h in histories]) if histories else np.zeros(0, np.int64)
    return Split(flat, pos - lengths, pos, np.arange(len(histories)), max_history)


def with_new_items(items: np.ndarray, codes: np.ndarray, index: sid.SIDIndex, first_new: int, n_new: int) -> np.ndarray:
    """TIGER's cold-start rule: after each generated SID, insert the items added since training
    (ids >= first_new) whose SID shares its first n_digit - 1 codes, at most n_new of them per
    user, and keep the list's length. The model has never generated such an item's last code, so
    without this they are seldom returned even when their prefix is.

    items (U, k) and codes (U, k, n_digit) from beam search, best first -> (U, k) item ids.
    """
    U, k = items.shape
    added = np.arange(first_new, index.n_items)
    if n_new <= 0 or len(added) == 0:
        return items
    prefix = lambda c: sid.pack_codes(np.concatenate([c[..., :-1], np.zeros_like(c[..., :1])], -1))
    added_keys = prefix(index.item_codes[added].astype(np.int64))
    order = np.argsort(added_keys, kind="stable")
    added, added_keys = added[order], added_keys[order]
    keys = prefix(np.maximum(codes, 0))                                    # (U, k); padding rows are masked below
    lo, hi = np.searchsorted(added_keys, keys, "left"), np.searchsorted(added_keys, keys, "right")
    count = np.where(items >= 0, hi - lo, 0).reshape(-1)
    slot = np.repeat(np.arange(U * k), count)                              # candidates, in (user, rank) order
    cand = added[np.repeat(lo.reshape(-1), count) + ragged_arange(count)]
    user, after = slot // k, slot % k
    fresh = ~(items[user] == cand[:, None]).any(1)                         # not generated already
    _, first = np.unique(user * index.n_items + cand, return_index=True)   # once, after its first match
    fresh[np.setdiff1d(np.arange(len(cand)), first)] = False
    user, after, cand = user[fresh], after[fresh], cand[fresh]
    nth = np.arange(len(user)) - np.searchsorted(user, user)               # rank among the user's candidates
    keep = nth < n_new
    # merge: every generated item at (rank, 0), every candidate right after the item it follows
    all_user = np.concatenate([np.repeat(np.arange(U), k), user[keep]])
    all_rank = np.concatenate([np.tile(np.arange(k), U), after[keep]])
    all_item = np.concatenate([items.reshape(-1), cand[keep]])
    inserted = np.concatenate([np.zeros(U * k, np.int64), 1 + nth[keep]])
    merged = np.lexsort((inserted, all_rank, all_user))
    position = np.arange(len(merged)) - np.searchsorted(all_user[merged], all_user[merged])
    out = np.full((U, k), -1, np.int64)
    take = merged[position < k]
    out[all_user[take], position[position < k]] = all_item[take]
    return out


@torch.no_grad()
def recommend(run: TrainedRun, histories: list, users: list, n_return: int = 10, beam_size: int | None = None,
              dtype: str = "fp32", batch_size: int = 256, dist: Dist | None = None,
              new_share: float = 0.0, transition_weight: float = -1.0, log=None) -> tuple[np.ndarray, np.ndarray]:
    """Top n_return items for each history (item ids, oldest first) of each raw user id.

    Returns (items (U, n_return) int64, scores (U, n_return) float32), best first. The beam search
    and its batches are evaluation's (evaluate.beam_batches), and so is the ranking: a score is the
    SID's summed log-probability plus the transition term of evaluate.TransitionRanker, with
    transition_weight (-1: the run's, chosen on validation when it was trained; 0: the model
    alone). The output is the same with several processes. `new_share` > 0 applies TIGER's
    cold-start rule (with_new_items) to at most round(new_share * n_return) slots; scores of
    inserted items are NaN. `log` (a print function): progress lines for a long list of histories.
    """
    if len(histories) != len(users):
        raise ValueError(f"histories and users: expected one user per history, got {len(histories)} and {len(users)}")
    if dtype not in ("fp32", "bf16", "auto"):
        raise ValueError(f"--dtype: expected fp32, bf16 or auto, got {dtype!r}")
    mcfg = run.model.config
    beam_size = beam_size or mcfg.beam_size
    if not 1 <= n_return <= beam_size:
        raise ValueError(f"--n_return: expected 1..beam_size ({beam_size}), got {n_return}")
    if any(len(h) == 0 for h in histories):
        raise ValueError("histories: every history needs at least one item")
    dist = dist or Dist(0, 1, next(run.model.parameters()).device)
    ranker = TransitionRanker(run.transitions, run.transition_weight if transition_weight == -1 else transition_weight)
    split = request_split(histories, mcfg.max_history)
    last = split.items[split.pos - 1]
    items = torch.zeros(len(histories), n_return, dtype=torch.long)
    scores = torch.zeros(len(histories), n_return)
    codes = torch.zeros(len(histories), n_return, mcfg.n_digit, dtype=torch.long)
    compute = dist.gather(pick_dtype(dtype, dist.device, mcfg.n_embd, mcfg.n_inner)[0])[0]   # rank 0's, everywhere
    for rows, beam_items, beam_scores, beam_sids in beam_batches(
            run.model, split, run.index, item_token_table(run.index, mcfg),
            user_bucket_table(users, mcfg.n_user_buckets), beam_size, batch_size, compute, dist, log):
        order, fused = ranker.rank(last[rows], beam_items, beam_scores)
        order = torch.from_numpy(order[:, :n_return])
        items[rows] = torch.from_numpy(beam_items).gather(1, order)
        scores[rows] = torch.from_numpy(fused[:, :n_return]).float()
        codes[rows] = beam_sids.gather(1, order[:, :, None].expand(-1, -1, mcfg.n_digit))
    items, scores, codes = dist.sum(items).numpy(), dist.sum(scores).numpy(), dist.sum(codes).numpy()
    if new_share > 0:
        mixed = with_new_items(items, codes, run.index, run.trained_items, round(new_share * n_return))
        same = mixed[:, :, None] == items[:, None, :]                       # (U, k, k): where each came from
        scores = np.where(same.any(2), np.take_along_axis(scores, same.argmax(2), 1), np.nan)
        items = mixed
    return items, scores


# ----------------------------------------------------------------------------------------------
# New items
# ----------------------------------------------------------------------------------------------

def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def add_items(folder: str, embeddings: np.ndarray, item_ids: list, titles: list | None = None,
              inputs: dict | None = None) -> int:
    """Give new items SIDs in a trained run, from their embeddings and the run's saved OPQ.

    embeddings (n_new, D) must be of the kind the run's SIDs came from (same D); item ids follow
    dataset.id_problem's rules. Old items keep their SIDs. The run folder's writer lock is held
    throughout (a second writer is refused), every check happens before the first write, and
    then the new index files and data.npz are published together (runs.RunFolder: one commit), so
    a kill leaves the old run or the new. `inputs` ({flag: path}): files read, never replaced.
    Returns how many new items collision resolution moved.
    """
    run_folder, titles = RunFolder(folder), titles or [""] * len(item_ids)
    with run_folder.lock("--run_dir"):
        run_folder.recover(inputs or {})                            # a killed writer's step finished or undone
        _, blobs = run_folder.read(("item_id2tokens.npy", "tokens2item.pkl", "data.npz"), optional=("opq.npz",))
        index = sid.SIDIndex.from_files(blobs, folder)
        run_data = parse_run_data(blobs["data.npz"], run_folder.file("data.npz"), index.n_items)
        check_new_items(folder, run_data, index, embeddings, item_ids, titles)
        cli.check_outputs([run_folder.file(n) for n in (MANIFEST, *RUN_FILES)], inputs or {})
        new_index, moved = index.add_items(np.asarray(embeddings))
        new_data = _npz_bytes(**{**run_data, "item_raw": np.concatenate([run_data["item_raw"], np.array(item_ids, str)]),
                                 "item_title": np.concatenate([run_data["item_title"], np.array(titles, str)])})
        run_folder.publish({**new_index.files(), "data.npz": new_data})
    return moved


def check_new_items(folder: str, run_data: dict, index: sid.SIDIndex, embeddings, item_ids: list, titles: list) -> None:
    """What add_items needs of a run and of the new items, or a ValueError saying what is wrong."""
    if not bool(run_data["content_sids"]):
        raise ValueError(f"{folder}: its SIDs were not built from an embeddings file alone (cf, text TF-IDF, or a "
                         "file joined with cf), so new items without interactions cannot be placed; train with "
                         "--item_emb=FILE (and --emb_source other than both)")
    if index.quantizer is None:
        raise ValueError(f"{folder}: no opq.npz, the quantiser that placed the items")
    embeddings = np.asarray(embeddings)
    width = index.quantizer.mean.shape[0]
    if embeddings.ndim != 2 or embeddings.shape[1] != width:
        raise ValueError(f"new item embeddings: expected shape [n, {width}] (the width the run's SIDs came from), "
                         f"got {embeddings.shape}")
    if len(item_ids) != len(embeddings) or len(titles) != len(item_ids):
        raise ValueError(f"new items: expected one id (and title) per embedding row, got {len(item_ids)} ids, "
                         f"{len(titles)} titles and {len(embeddings)} rows")
    if len(item_ids) == 0:
        raise ValueError("new items: expected at least one item id")
    check_ids(np.array(item_ids, str), "new items", "item")
    known = np.isin(np.array(item_ids, str), run_data["item_raw"])
    if known.any():
        raise ValueError(f"new items: item {item_ids[int(known.argmax())]!r} already exists in the run")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

@dataclass
class RecommendConfig:
    """Flags of recommend.py: one of --user, --history, --all=true, --add_items, on --run_dir."""
    run_dir: str = ""                # a run folder (train.py's out_dir)
    user: str = ""                   # a raw user id of the run's data: that user's top items
    history: str = ""                # raw item ids, oldest first, comma-separated: the top items after them
    all: bool = False                # every user of the run, one JSON line each, into --out
    out: str = ""                    # --all: the .jsonl file to write
    add_items: str = ""              # [n_new, D] .npy embeddings of new items, with --item_ids
    item_ids: str = ""               # one raw id per line, optionally a tab and a title
    n_return: int = 10               # items per list
    beam_size: int = 0               # 0: the model's beam_size
    batch_size: int = 256            # users per beam-search batch (--all)
    dtype: str = "fp32"              # fp32 (the dtype the presets train in on a CPU) | bf16 | auto (bf16 where faster)
    device: str = "cpu"              # cpu | cuda | mps | auto
    new_share: float = 0.0           # share of the list open to items added after training (TIGER's rule)
    transition_weight: float = -1.0  # -1: the run's (chosen on validation, in results.json); 0: the model alone
    overwrite: bool = False          # --all: replace an existing --out file (never one the run reads)

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("--run_dir: expected a run folder (train.py's out_dir)")
        modes = [m for m in ("user", "history", "all", "add_items") if getattr(self, m)]
        if len(modes) != 1:
            raise ValueError(f"expected exactly one of --user, --history, --all=true, --add_items; got {modes or 'none'}")
        if self.all and not self.out:
            raise ValueError("--all: expected --out=FILE.jsonl for the recommendations")
        if self.add_items and not self.item_ids:
            raise ValueError("--add_items: expected --item_ids=FILE (one raw id per line, optionally a tab and a title)")
        for name in ("n_return", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: expected a positive int, got {getattr(self, name)}")
        if self.beam_size < 0:
            raise ValueError(f"--beam_size: expected 0 (the model's) or a positive int, got {self.beam_size}")
        if not 0 <= self.new_share <= 1:
            raise ValueError(f"--new_share: expected a number in [0, 1], got {self.new_share}")
        if not (self.transition_weight == -1 or 0 <= self.transition_weight < math.inf):
            raise ValueError(f"--transition_weight: expected -1 (the run's) or a number >= 0, got {self.transition_weight}")
        if self.dtype not in ("fp32", "bf16", "auto"):
            raise ValueError(f"--dtype: expected fp32, bf16 or auto, got {self.dtype!r}")


def read_item_ids(path: str) -> tuple[list, list]:
    """IDS.txt: one raw item id per line, optionally followed by a tab and a title; the ids follow
    the rules of every id here (dataset.check_id), the line that breaks them is named."""
    try:
        text = cli.read_regular(path, 1 << 30).decode("utf-8")
    except (FileNotFoundError, UnicodeDecodeError) as e:
        raise ValueError(f"--item_ids: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    rows = [(n, line.removesuffix("\r").split("\t", 1) + [""]) for n, line in enumerate(text.split("\n"), 1)
            if line.strip()]
    ids = [check_id(f"--item_ids: {path}:{n}", "item", parts[0]) for n, parts in rows]
    return ids, [" ".join(parts[1].split())[:TITLE_CHARS] for _, parts in rows]


def show(run: TrainedRun, items: np.ndarray, scores: np.ndarray, seen: set) -> None:
    print(f"{'rank':>4}  {'item':>10}  {'score':>8}  title")
    for rank, (item, score) in enumerate(zip(items.tolist(), scores.tolist()), start=1):
        if item < 0:                                    # fewer items than n_return
            break
        flag = ("  (seen)" if item in seen else "") + ("  (added after training)" if item >= run.trained_items else "")
        print(f"{rank:>4}  {printable(run.item_raw[item]):>10}  {score:>8.3f}  {printable(run.item_title[item])}{flag}")


def new_share_note(run: TrainedRun, new_share: float, scores: np.ndarray) -> str:
    """Why --new_share inserted nothing, when it did not (inserted items are the NaN scores)."""
    if new_share == 0 or np.isnan(scores).any():
        return ""
    if run.trained_items == run.index.n_items:
        return "--new_share: nothing to insert: no item was added after training (recommend.py --add_items adds some)"
    return (f"--new_share: nothing inserted: none of the {run.index.n_items - run.trained_items} added items shares "
            "its first 3 codes with a generated SID")


def write_all(run: TrainedRun, args: RecommendConfig, dist: Dist) -> None:
    start = time.time()
    users = run.user_raw.tolist()
    histories = [run.items[run.offsets[u]:run.offsets[u + 1]] for u in range(len(users))]
    items, scores = recommend(run, histories, users, args.n_return, args.beam_size or None, args.dtype,
                              args.batch_size, dist=dist, new_share=args.new_share,
                              transition_weight=args.transition_weight, log=print if dist.is_main else None)
    seconds = time.time() - start
    if dist.is_main:
        lines = [json.dumps({"user": u, "items": run.item_raw[row[row >= 0]].tolist(),
                             "scores": [None if np.isnan(x) else round(float(x), 5) for x in sc[row >= 0]]})
                 for u, row, sc in zip(users, items, scores)]
        atomic_write(args.out, ("\n".join(lines) + "\n").encode())
        print(f"{len(users)} users in {seconds:.1f} s ({len(users) / seconds:.0f} users/s, {dist.world} process(es), "
              f"{args.dtype}); wrote {args.out}")
        if note := new_share_note(run, args.new_share, scores):
            print(note)


def check_out_file(path: str, run_dir: str, overwrite: bool) -> None:
    """--out: a new file, or an existing regular one with --overwrite=true; never inside a run
    folder (its writer owns it), never a file the run reads (its training data), whatever the flags."""
    if os.path.isdir(path):
        raise ValueError(f"--out: {path} is a folder; expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(os.path.join(parent, MANIFEST)) or os.path.isdir(run_dir) and os.path.samefile(parent, run_dir):
        raise ValueError(f"--out: {path} is inside a run folder ({parent}); choose a path outside it")
    manifest = RunFolder(run_dir).manifest() or {"data": None}
    cli.check_outputs([path], {"the run's training data": (manifest["data"] or {}).get("path", "")})
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"--out: {path} exists; choose another path, or replace it with --overwrite=true")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out: cannot write into {parent}")


def load_for(run_dir: str, dist: Dist) -> TrainedRun:
    """load_run in every process (each reads; none writes)."""
    try:
        return load_run(run_dir, dist.device)
    except ValueError as e:
        raise ValueError(f"--run_dir: {e}") from None


def main(argv: list) -> None:
    args = RecommendConfig(**parse_flags(argv, RecommendConfig, usage=__doc__))
    if args.all:
        check_out_file(args.out, args.run_dir, args.overwrite)
    if args.add_items:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--add_items: expected one process (python recommend.py ...), not torchrun's")
        ids, titles = read_item_ids(args.item_ids)
        emb = read_item_emb(args.add_items, len(ids), "--add_items")
        moved = add_items(args.run_dir, emb, ids, titles, {"--add_items": args.add_items, "--item_ids": args.item_ids})
        print(f"added {len(ids)} items to {args.run_dir} ({moved} moved by collision resolution)")
        return
    dist = init_distributed(args.device)
    try:
        run = load_for(args.run_dir, dist)
        if args.dtype != "fp32" and dist.is_main:                    # what bf16 costs here, measured
            print(pick_dtype(args.dtype, dist.device, run.model.config.n_embd, run.model.config.n_inner)[1])
        if args.all:
            write_all(run, args, dist)
            dist.barrier()
            return
        if args.user:
            history, who = run.sequence(args.user), f"user {printable(args.user)}"
        else:
            history = run.item_ids([h.strip() for h in args.history.split(",") if h.strip()])
            who = "the given history"
        start = time.time()
        items, scores = recommend(run, [history], [args.user], args.n_return, args.beam_size or None, args.dtype,
                                  new_share=args.new_share,
                                  transition_weight=args.transition_weight)
        weight = (f"{run.transition_weight:g} (the run's)" if args.transition_weight == -1 else
                  f"{args.transition_weight:g} (--transition_weight)")
        print(f"{who}: {len(history)} items, the model reads the last {min(len(history), run.model.config.max_history)}; "
              f"top {args.n_return} in {time.time() - start:.2f} s, ranked with transition weight {weight}")
        show(run, items[0], scores[0], set(history.tolist()))
        if note := new_share_note(run, args.new_share, scores):
            print(note)
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
