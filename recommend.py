"""Use a trained run: recommendations for a user or any history, every user at once, new items.

    python recommend.py --run=out/ml-100k --user=196              # that user's top 10, with titles
    python recommend.py --run=out/ml-100k --history=242,302,377   # the top 10 after any raw item ids
    python recommend.py --run=out/ml-100k --all --out=recs.jsonl  # every user, one JSON line each
    torchrun --standalone --nproc_per_node=2 recommend.py --run_dir=out/ml-100k --all --out=recs.jsonl
    python recommend.py --run=DIR --add_items=EMB.npy --item_ids=IDS.txt   # new items (cold start)

(`--run_dir` is another name for `--run`: torchrun takes `--run=...` for an abbreviation of its own
`--run-path` and refuses it.)

A run folder, as train.py writes it, holds all that is needed: config.json, checkpoint.pt (the
weights), the SID index (item_id2tokens.npy, tokens2item.pkl, opq.npz) and data.npz (raw item
and user ids, a title per item, every user's sequence). `load_run` reads them, rebuilds nothing,
and refuses a folder whose files disagree. Recommendations are the model's beam search over real
SIDs, best first, with the summed log-probability of each SID as its score; items the user has
already seen are kept (as in evaluation) and flagged.

New items (`add_items`): the run's saved OPQ encodes their embeddings, collision resolution gives
them SIDs no other item has, and the index files are rewritten; old items keep their SIDs, so
the checkpoint still matches and constrained decoding can generate the new items at once. Only
a run whose SIDs came from an embeddings file alone can place items with no interactions.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import beam
import sid
import train
from rpg_ed import RPG_ED, RPGEDConfig

RUN_FILES = ("config.json", "checkpoint.pt", "item_id2tokens.npy", "data.npz")
DATA_KEYS = ("item_raw", "user_raw", "item_title", "offsets", "items", "content_sids")


@dataclass
class TrainedRun:
    """A finished run, loaded from its folder."""
    folder: str
    config: dict                     # config.json: {"train": {...}, "model": {...}}
    model: RPG_ED                    # the best checkpoint's weights, eval mode
    index: sid.SIDIndex
    item_raw: np.ndarray             # (n_items,) str: raw id of item id i
    item_title: np.ndarray           # (n_items,) str: start of the item's text, "" when none
    user_raw: np.ndarray             # (n_users,) str
    offsets: np.ndarray              # (n_users + 1,) int64: user u's items are items[offsets[u]:offsets[u + 1]]
    items: np.ndarray                # (n_interactions,) int32 item ids, oldest first per user
    content_sids: bool               # SIDs from an embeddings file alone: new items can be placed

    def __post_init__(self):
        self.item_id = {raw: i for i, raw in enumerate(self.item_raw.tolist())}
        self.user_id = {raw: u for u, raw in enumerate(self.user_raw.tolist())}

    def sequence(self, user_raw: str) -> np.ndarray:
        """A user's items in the run's data, oldest first; ValueError for an unknown user."""
        if user_raw not in self.user_id:
            raise ValueError(f"--user: {user_raw!r} is not a user of {self.folder} ({len(self.user_raw)} users, "
                             f"e.g. {', '.join(map(repr, self.user_raw[:3].tolist()))})")
        u = self.user_id[user_raw]
        return self.items[self.offsets[u]:self.offsets[u + 1]].astype(np.int64)

    def item_ids(self, raw_ids: list) -> np.ndarray:
        """Raw item ids -> item ids; ValueError naming the first unknown one."""
        unknown = [r for r in raw_ids if r not in self.item_id]
        if unknown:
            raise ValueError(f"item {unknown[0]!r} is not an item of {self.folder} ({len(self.item_raw)} items)")
        return np.array([self.item_id[r] for r in raw_ids], np.int64)


def _read_data(folder: str) -> dict:
    path = os.path.join(folder, "data.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:   # missing, truncated, or holding pickled objects
        raise ValueError(f"{path}: not a readable run data file ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: expected the arrays {list(DATA_KEYS)}, missing {missing}")
    if len(data["item_title"]) != len(data["item_raw"]) or len(data["offsets"]) != len(data["user_raw"]) + 1 \
            or data["offsets"][-1] != len(data["items"]):
        raise ValueError(f"{path}: its arrays disagree in length (item ids, titles, users, offsets, sequences)")
    return data


def load_run(folder: str, device: str | torch.device = "cpu") -> TrainedRun:
    """A run folder -> TrainedRun: the model with the best weights, its SIDs and id maps, from the
    folder's files alone. A missing file, or files that disagree, give a ValueError naming them."""
    missing = [f for f in RUN_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ValueError(f"{folder}: not a finished run folder, missing {missing} (train.py writes them)")
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        mcfg = RPGEDConfig(**config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder}/config.json: not a run config ({type(e).__name__}: {e})") from None
    index = sid.SIDIndex.load(folder)
    data = _read_data(folder)
    if len(data["item_raw"]) != index.n_items:
        raise ValueError(f"{folder}: the SID index has {index.n_items} items, data.npz maps {len(data['item_raw'])}; "
                         "the files come from different runs or an interrupted update")
    if data["items"].size and int(data["items"].max()) >= index.n_items:
        raise ValueError(f"{folder}/data.npz: a sequence holds item {int(data['items'].max())}, the index has "
                         f"{index.n_items} items")
    if (mcfg.n_digit, mcfg.codebook_size) != (index.item_codes.shape[1], sid.CODEBOOK_SIZE):
        raise ValueError(f"{folder}: the model has {mcfg.n_digit} digits of {mcfg.codebook_size} codes, the index "
                         f"{index.item_codes.shape[1]} of {sid.CODEBOOK_SIZE}")
    path = os.path.join(folder, "checkpoint.pt")
    state = train.load_checkpoint(path)
    trained_items = state.get("sids_items", index.n_items)             # items added later keep the digest
    if trained_items > index.n_items:
        raise ValueError(f"{path}: trained on {trained_items} items, the index has only {index.n_items}")
    train.check_checkpoint(state, path, config, train.sids_digest(index, trained_items), to_resume=False)
    model = RPG_ED(mcfg)
    model.load_state_dict(state["model"])
    return TrainedRun(folder, config, model.to(device).eval(), index, data["item_raw"], data["item_title"],
                      data["user_raw"], data["offsets"], data["items"], bool(data["content_sids"]))


# ----------------------------------------------------------------------------------------------
# Recommending: histories -> top items, in length-grouped batches
# ----------------------------------------------------------------------------------------------

def history_matrix(histories: list, max_history: int) -> np.ndarray:
    """Item-id sequences -> (U, max_history) of their last max_history items, left-padded with -1."""
    out = np.full((len(histories), max_history), -1, np.int64)
    lengths = np.array([min(len(h), max_history) for h in histories], np.int64)
    if lengths.sum():
        rows = np.repeat(np.arange(len(histories)), lengths)
        cols = max_history - lengths[rows] + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        out[rows, cols] = np.concatenate([np.asarray(h[len(h) - n:], np.int64) for h, n in zip(histories, lengths)])
    return out


@torch.no_grad()
def recommend(run: TrainedRun, histories: list, users: list, n_return: int = 10, beam_size: int | None = None,
              dtype: str = "fp32", batch_size: int = 256, batch_tokens: int = 0,
              dist: train.Dist | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top n_return items for each history (item ids, oldest first) of each raw user id.

    Returns (items (U, n_return) int64, scores (U, n_return) float32), best first. Users are
    grouped by history length into batches of at most batch_size rows and batch_tokens history
    positions (train.length_batches, as in evaluation). With several processes, batch j runs on
    rank j % world and the results are summed over processes, so each batch is the one a single
    process runs and the output is identical.
    """
    if len(histories) != len(users):
        raise ValueError(f"histories and users: expected one user per history, got {len(histories)} and {len(users)}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype: expected fp32 or bf16, got {dtype!r}")
    mcfg = run.model.config
    beam_size = beam_size or mcfg.beam_size
    if not 1 <= n_return <= beam_size:
        raise ValueError(f"--n_return: expected 1..beam_size ({beam_size}), got {n_return}")
    if any(len(h) == 0 for h in histories):
        raise ValueError("histories: every history needs at least one item")
    dist = dist or train.Dist(0, 1, next(run.model.parameters()).device)
    split = train.Split(history_matrix(histories, mcfg.max_history), np.zeros(len(histories), np.int64),
                        np.arange(len(histories)))
    item_tokens = torch.cat([torch.from_numpy(sid.codes_to_tokens(run.index.item_codes, mcfg.n_user_buckets)),
                             torch.full((1, mcfg.n_digit), sid.PAD)])
    buckets = torch.tensor([sid.user_bucket(u, mcfg.n_user_buckets) for u in users], dtype=torch.long)
    items = torch.zeros(len(histories), n_return, dtype=torch.long)
    scores = torch.zeros(len(histories), n_return)
    compute = torch.bfloat16 if dtype == "bf16" else torch.float32
    batches = train.length_batches(train.history_lengths(split), batch_size, batch_tokens or batch_size * mcfg.max_history)
    for j, rows in enumerate(batches):
        if j % dist.world != dist.rank:
            continue
        batch = train.make_batch(split, rows, item_tokens, buckets, dist.device, with_target=False)
        with train.autocast(dist.device, compute):
            result = beam.beam_search(run.model, batch, beam_size, n_return, run.index)
        items[rows], scores[rows] = result.items.cpu(), result.scores.float().cpu()
    return dist.sum(items).numpy(), dist.sum(scores).numpy()


# ----------------------------------------------------------------------------------------------
# New items
# ----------------------------------------------------------------------------------------------

def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def add_items(folder: str, embeddings: np.ndarray, item_ids: list, titles: list | None = None) -> int:
    """Give new items SIDs in a trained run, from their embeddings and the run's saved OPQ.

    embeddings (n_new, D) must be of the kind the run's SIDs came from (same D). Old items keep
    their SIDs; the index files and data.npz are rewritten (each atomically), nothing else changes.
    Every check happens before the first write. Returns how many new items collision resolution moved.
    """
    run_data, index = _read_data(folder), sid.SIDIndex.load(folder)
    if len(run_data["item_raw"]) != index.n_items:
        raise ValueError(f"{folder}: the SID index has {index.n_items} items, data.npz maps {len(run_data['item_raw'])}")
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
    titles = titles or [""] * len(item_ids)
    if len(item_ids) != len(embeddings) or len(titles) != len(item_ids):
        raise ValueError(f"new items: expected one id (and title) per embedding row, got {len(item_ids)} ids, "
                         f"{len(titles)} titles and {len(embeddings)} rows")
    if len(item_ids) == 0:
        raise ValueError("new items: expected at least one item id")
    known = set(run_data["item_raw"].tolist())
    seen = set()
    for raw in item_ids:
        if not raw or raw != raw.strip():
            raise ValueError(f"new items: expected non-empty ids without surrounding spaces, got {raw!r}")
        if raw in known or raw in seen:
            raise ValueError(f"new items: item {raw!r} already exists" + (" in the run" if raw in known else " (twice)"))
        seen.add(raw)
    new_index, moved = index.add_items(embeddings)
    new_index.save(folder)
    sid._atomic_write(os.path.join(folder, "data.npz"), _npz_bytes(
        **{**run_data, "item_raw": np.concatenate([run_data["item_raw"].astype(str), np.array(item_ids, dtype=str)]),
           "item_title": np.concatenate([run_data["item_title"].astype(str), np.array(titles, dtype=str)])}))
    return moved


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

OPTIONS = {"run": "", "user": "", "history": "", "all": "false", "out": "", "dtype": "fp32", "beam_size": "0",
           "n_return": "10", "batch_size": "256", "device": "cpu", "add_items": "", "item_ids": ""}


def parse(argv: list) -> dict:
    opts = dict(OPTIONS)
    for arg in argv:
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if arg == "--all":
            key, eq, value = "all", "=", "true"
        key = "run" if key == "run_dir" else key             # torchrun claims --run= (see the top)
        if not eq or key not in OPTIONS:
            raise ValueError(f"argument {arg!r}: expected --key=value with key in {sorted(OPTIONS)} (or run_dir)")
        opts[key] = value
    for key in ("beam_size", "n_return", "batch_size"):
        try:
            opts[key] = int(opts[key])
        except ValueError:
            raise ValueError(f"--{key}: expected an int, got {opts[key]!r}") from None
    if opts["all"] not in ("true", "false"):
        raise ValueError(f"--all: expected true or false, got {opts['all']!r}")
    opts["all"] = opts["all"] == "true"
    if not opts["run"]:
        raise ValueError("--run: expected a run folder (train.py's out_dir)")
    modes = [m for m in ("user", "history", "all", "add_items") if opts[m]]
    if len(modes) != 1:
        raise ValueError(f"expected exactly one of --user, --history, --all, --add_items; got {modes or 'none'}")
    if opts["all"] and not opts["out"]:
        raise ValueError("--all: expected --out=FILE.jsonl for the recommendations")
    if opts["add_items"] and not opts["item_ids"]:
        raise ValueError("--add_items: expected --item_ids=FILE (one raw id per line, optionally a tab and a title)")
    return opts


def read_item_ids(path: str) -> tuple[list, list]:
    """IDS.txt: one raw item id per line, optionally followed by a tab and a title."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--item_ids: cannot read {path} ({e})") from None
    parts = [line.split("\t", 1) + [""] for line in lines]
    return [p[0] for p in parts], [" ".join(p[1].split())[:train.TITLE_CHARS] for p in parts]


def show(run: TrainedRun, items: np.ndarray, scores: np.ndarray, seen: set) -> None:
    print(f"{'rank':>4}  {'item':>10}  {'score':>8}  title")
    for rank, (item, score) in enumerate(zip(items.tolist(), scores.tolist()), start=1):
        flag = "  (seen)" if item in seen else ""
        print(f"{rank:>4}  {run.item_raw[item]:>10}  {score:>8.3f}  {run.item_title[item]}{flag}")


def write_all(run: TrainedRun, opts: dict, dist: train.Dist) -> None:
    start = time.time()
    users = run.user_raw.tolist()
    histories = [run.items[run.offsets[u]:run.offsets[u + 1]] for u in range(len(users))]
    items, scores = recommend(run, histories, users, opts["n_return"], opts["beam_size"] or None, opts["dtype"],
                              opts["batch_size"], dist=dist)
    seconds = time.time() - start
    if dist.is_main:
        lines = [json.dumps({"user": u, "items": run.item_raw[row].tolist(), "scores": [round(float(s), 5) for s in sc]})
                 for u, row, sc in zip(users, items, scores)]
        sid._atomic_write(opts["out"], ("\n".join(lines) + "\n").encode())
        print(f"{len(users)} users in {seconds:.1f} s ({len(users) / seconds:.0f} users/s, {dist.world} process(es), "
              f"{opts['dtype']}); wrote {opts['out']}")


def main(argv: list) -> None:
    opts = parse(argv)
    if opts["add_items"]:
        ids, titles = read_item_ids(opts["item_ids"])
        emb = train.read_item_emb(opts["add_items"], len(ids), "--add_items")
        moved = add_items(opts["run"], emb, ids, titles)
        print(f"added {len(ids)} items to {opts['run']} ({moved} moved by collision resolution)")
        return
    dist = train.init_distributed(opts["device"])
    try:
        run = load_run(opts["run"], dist.device)
        if opts["all"]:
            write_all(run, opts, dist)
            dist.barrier()
            return
        if opts["user"]:
            history, who = run.sequence(opts["user"]), f"user {opts['user']}"
        else:
            history = run.item_ids([h.strip() for h in opts["history"].split(",") if h.strip()])
            who = "the given history"
        start = time.time()
        items, scores = recommend(run, [history], [opts["user"] or ""], opts["n_return"],
                                  opts["beam_size"] or None, opts["dtype"])
        print(f"{who}: {len(history)} items, the model reads the last {min(len(history), run.model.config.max_history)}; "
              f"top {opts['n_return']} in {time.time() - start:.2f} s")
        show(run, items[0], scores[0], set(history.tolist()))
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        raise SystemExit(f"error: {e}")
