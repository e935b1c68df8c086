"""Use a trained run: recommendations for a user or any history, every user at once, new items.

    python recommend.py --run=out/ml-100k --user=196              # that user's top 10, with titles
    python recommend.py --run=out/ml-100k --history=242,302,377   # the top 10 after any raw item ids
    python recommend.py --run=out/ml-100k --all --out=recs.jsonl  # every user, one JSON line each
    torchrun --standalone --nproc_per_node=2 recommend.py --run_dir=out/ml-100k --all --out=recs.jsonl
    python recommend.py --run=DIR --add_items=EMB.npy --item_ids=IDS.txt   # new items (cold start)
    python recommend.py --cold_start=PATH/Beauty.txt --out=out/cold        # the cold-start experiment
    python recommend.py --continue_experiment=true --out=out/continue      # continued training, ML-100K

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
a run whose SIDs came from an embeddings file alone can place items with no interactions. The
model has never generated an added item's code tuple, so `--new_share=0.1` (TIGER's rule) opens
up to a tenth of the list to added items that share a generated SID's first three codes.
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
import data as data_py  # data.py (the name `data` is taken by datasets here)
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
    trained_items: int               # items the model was trained with; ids from here on were added later

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
                      data["user_raw"], data["offsets"], data["items"], bool(data["content_sids"]), trained_items)


# ----------------------------------------------------------------------------------------------
# Recommending: histories -> top items, in length-grouped batches
# ----------------------------------------------------------------------------------------------

def request_split(histories: list, max_history: int) -> data_py.Split:
    """Item-id sequences of any length -> a Split whose windows (cut per batch) are their last
    max_history items; each history is followed by a placeholder target that nothing reads."""
    lengths = np.array([len(h) for h in histories], np.int64)
    pos = np.cumsum(lengths + 1) - 1
    flat = np.concatenate([np.append(np.asarray(h, np.int64), 0) for h in histories]) if histories else np.zeros(0, np.int64)
    return data_py.Split(flat, pos - lengths, pos, np.arange(len(histories)), max_history)


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
    cand = added[np.repeat(lo.reshape(-1), count) + data_py.ragged_arange(count)]
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
              dtype: str = "fp32", batch_size: int = 256, batch_tokens: int = 0,
              dist: train.Dist | None = None, new_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Top n_return items for each history (item ids, oldest first) of each raw user id.

    Returns (items (U, n_return) int64, scores (U, n_return) float32), best first. Users are
    grouped by history length into batches of at most batch_size rows and batch_tokens history
    positions (train.length_batches, as in evaluation). With several processes, batch j runs on
    rank j % world and the results are summed over processes, so each batch is the one a single
    process runs and the output is identical. `new_share` > 0 applies TIGER's cold-start rule
    (with_new_items) to at most round(new_share * n_return) slots; scores of inserted items are NaN.
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
    split = request_split(histories, mcfg.max_history)
    item_tokens = train.item_token_table(run.index, mcfg)
    buckets = torch.tensor([sid.user_bucket(u, mcfg.n_user_buckets) for u in users], dtype=torch.long)
    items = torch.zeros(len(histories), n_return, dtype=torch.long)
    scores = torch.zeros(len(histories), n_return)
    codes = torch.zeros(len(histories), n_return, mcfg.n_digit, dtype=torch.long)
    compute = torch.bfloat16 if dtype == "bf16" else torch.float32
    batches = train.length_batches(split.lengths(), batch_size, batch_tokens or batch_size * mcfg.max_history)
    for j, rows in enumerate(batches):
        if j % dist.world != dist.rank:
            continue
        batch = train.make_batch(split, rows, item_tokens, buckets, dist.device, with_target=False)
        with train.autocast(dist.device, compute):
            result = beam.beam_search(run.model, batch, beam_size, n_return, run.index)
        items[rows], scores[rows], codes[rows] = result.items.cpu(), result.scores.float().cpu(), result.sids.cpu()
    items, scores, codes = dist.sum(items).numpy(), dist.sum(scores).numpy(), dist.sum(codes).numpy()
    if new_share > 0:
        mixed = with_new_items(items, codes, run.index, run.trained_items, round(new_share * n_return))
        scores = np.where(mixed == items, scores, np.nan)
        items = mixed
    return items, scores


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
    sid.atomic_write(os.path.join(folder, "data.npz"), _npz_bytes(
        **{**run_data, "item_raw": np.concatenate([run_data["item_raw"].astype(str), np.array(item_ids, dtype=str)]),
           "item_title": np.concatenate([run_data["item_title"].astype(str), np.array(titles, dtype=str)])}))
    return moved


# ----------------------------------------------------------------------------------------------
# Experiment: cold start (TIGER, section 4.4) -- items never seen in training, added afterwards
# ----------------------------------------------------------------------------------------------

NEW_SHARES = (0.0, 0.1, 0.3)   # cold start: shares of the top 10 open to added items (TIGER's epsilon)


def cold_start(data_path: str, out: str, fraction: float = 0.05, seed: int = 0, train_args: list = ()) -> dict:
    """Hold out `fraction` of the items, with every interaction of theirs; train on the rest with
    SIDs from the content embeddings beside the data (file alone); add the held-out items through
    add_items; score the users whose last item is held out, by their whole history before it.

    Writes OUT/warm/NAME.txt (user item item ..., the kept interactions in time order, users with
    at least 3), OUT/warm/NAME_content.npy (their items' rows), OUT/run, and OUT/cold_start.json.
    """
    cfg = train.TrainConfig(data=data_path)
    raw = data_py.load_data(cfg)
    if not raw.item_emb:
        raise ValueError(f"--cold_start: expected content embeddings beside {data_path} (NAME_*.npy), found none")
    data = data_py.prepare(raw, not raw.time_ordered)
    emb = data_py.read_item_emb(raw.item_emb, len(data.item_raw))
    rng = np.random.default_rng(seed)
    n_items = len(data.item_raw)
    cold = np.zeros(n_items, bool)
    cold[rng.choice(n_items, max(1, round(fraction * n_items)), replace=False)] = True
    warm_dir = os.path.join(out, "warm")
    os.makedirs(warm_dir, exist_ok=True)
    stem = os.path.basename(data_path).split(".")[0]
    lines = []
    for user, seq in zip(data.user_raw, data.sequences):          # data preparation, once per user
        kept = seq[~cold[seq]]
        if len(kept) >= 3:
            lines.append(" ".join([user] + [data.item_raw[i] for i in kept]))
    sid.atomic_write(os.path.join(warm_dir, stem + ".txt"), ("\n".join(lines) + "\n").encode())
    warm_items = {i for line in lines for i in line.split()[1:]}
    warm_items = sorted(warm_items, key=data_py.sort_key(warm_items))       # the warm run's item order
    row = {raw_id: k for k, raw_id in enumerate(data.item_raw)}
    buf = io.BytesIO()
    np.save(buf, emb[[row[i] for i in warm_items]])
    sid.atomic_write(os.path.join(warm_dir, stem + "_content.npy"), buf.getvalue())
    run_dir = os.path.join(out, "run")
    train.main([f"--data={os.path.join(warm_dir, stem + '.txt')}", "--format=s3rec", "--emb_source=text",
                f"--out_dir={run_dir}", f"--seed={seed}"] + list(train_args))

    run = load_run(run_dir)
    new = [i for i in range(n_items) if cold[i] and data.item_raw[i] not in run.item_id]
    add_items(run_dir, emb[new], [data.item_raw[i] for i in new])
    return score_cold_start(out, data, new, seed)


def score_cold_start(out: str, data: data_py.Dataset, new: list, seed: int = 0) -> dict:
    """The users of `data` whose last item is one of `new` (added to OUT/run after training):
    the model with 0, 1 or 3 of the top 10 open to added items, random and popularity rankings."""
    run_dir, rng = os.path.join(out, "run"), np.random.default_rng(seed + 1)
    run, cold = load_run(run_dir), np.isin(np.arange(len(data.item_raw)), new)
    users = [u for u, seq in enumerate(data.sequences) if cold[seq[-1]] and len(seq) > 1]
    histories = [run.item_ids([data.item_raw[i] for i in data.sequences[u][:-1]]) for u in users]
    target = run.item_ids([data.item_raw[data.sequences[u][-1]] for u in users])
    popular = np.argsort(-np.bincount(run.items, minlength=run.index.n_items), kind="stable")[:10]
    random_top = np.argsort(rng.random((len(users), run.index.n_items)), axis=1)[:, :10]
    results = {"held_out_items": len(new), "users": len(users), "items": run.index.n_items,
               "random": train.rank_metrics(random_top, target),
               "popularity": train.rank_metrics(np.tile(popular, (len(users), 1)), target)}
    is_new = run.item_ids([data.item_raw[i] for i in new])
    for share in NEW_SHARES:
        items, _ = recommend(run, histories, [data.user_raw[u] for u in users], new_share=share)
        results[f"model, new_share {share}"] = {**train.rank_metrics(items, target),
                                                "held_out_slots": float(np.isin(items, is_new).mean())}
    sid.atomic_write(os.path.join(out, "cold_start.json"), json.dumps(results, indent=2).encode())
    print(f"\ncold start: {len(new)} held-out items added to {run_dir}; {len(users)} users whose last item is one")
    print("| ranking | R@5 | N@5 | R@10 | N@10 | top-10 slots given to held-out items |\n|---|---|---|---|---|---|")
    for name in [f"model, new_share {share}" for share in NEW_SHARES] + ["random", "popularity"]:
        m = results[name]
        print(f"| {name} | {m['recall@5']:.4f} | {m['ndcg@5']:.4f} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | "
              f"{m.get('held_out_slots', float('nan')):.3f} |")
    return results


# ----------------------------------------------------------------------------------------------
# Experiment: continued training on a time split -- new interactions and new items arrive
# ----------------------------------------------------------------------------------------------

def _write_inter(path: str, rows: list) -> None:
    text = "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{t!r}\n" for u, i, t in rows)
    sid.atomic_write(path, text.encode())


def _text_emb_file(path: str, data: data_py.Dataset, vectors: dict) -> None:
    buf = io.BytesIO()
    np.save(buf, np.stack([vectors[i] for i in data.item_raw]))
    sid.atomic_write(path, buf.getvalue())


def continue_experiment(out: str, cut: float = 0.8, train_args: list = (), continue_args: list = (),
                        data_path: str = "ml-100k") -> dict:
    """MovieLens-100K (or `data_path`) cut at the `cut` quantile of time. base: trained on what came before the cut.
    continued: --init_from=base on all the data (new items added by their text embeddings).
    scratch: trained on all the data from nothing. All three build SIDs from the same text embeddings
    (TF-IDF of title and genres, fitted on the whole catalogue: content, no interactions), because a
    run must place items it never saw. Scores both final runs on every test user and on the later
    period's (test item after the cut); writes OUT/continue.json."""
    raw = data_py.load_data(train.TrainConfig(data=data_path))          # timestamps and item text
    cut_time = float(np.quantile(raw.times, cut))
    rows = list(zip(raw.users, raw.items, raw.times))
    early = [r for r in rows if r[2] < cut_time]
    data = {"early": data_py.prepare(data_py.RawData(*map(list, zip(*early)))),
            "all": data_py.prepare(data_py.RawData(list(raw.users), list(raw.items), list(raw.times)))}
    catalogue = data_py.Dataset.from_sequences([], [], data["all"].item_raw)
    vectors = dict(zip(catalogue.item_raw, data_py.text_embeddings(catalogue, raw.item_text, 64, 0)))
    runs = {}
    for name, part in (("early", early), ("all", rows)):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        _write_inter(os.path.join(out, name, f"{name}.inter"), part)
        _text_emb_file(os.path.join(out, name, f"{name}_text.npy"), data[name], vectors)
    common = ["--emb_source=text", "--report_beam_size=0"] + list(train_args)
    for name, args in (("base", [f"--data={out}/early/early.inter"]),
                       ("continued", [f"--data={out}/all/all.inter", f"--init_from={out}/base"] + list(continue_args)),
                       ("scratch", [f"--data={out}/all/all.inter"])):
        start = time.time()
        runs[name] = {"results": train.main(args + common + [f"--out_dir={out}/{name}"]),
                      "minutes": round((time.time() - start) / 60, 2)}
    time_of = {(u, i): t for u, i, t in rows}          # ML-100K: a user rates an item once
    results = {"cut_time": cut_time, "interactions": {"early": len(early), "all": len(rows)}}
    for name in ("continued", "scratch"):
        run = load_run(os.path.join(out, name))
        seqs = [run.items[run.offsets[u]:run.offsets[u + 1]] for u in range(len(run.user_raw))]
        later = np.array([time_of[(run.user_raw[u], run.item_raw[s[-1]])] >= cut_time for u, s in enumerate(seqs)])
        items, _ = recommend(run, [s[:-1] for s in seqs], run.user_raw.tolist())
        target = np.array([s[-1] for s in seqs])
        results[name] = {"minutes": runs[name]["minutes"], "test": runs[name]["results"]["test"],
                         "later_users": int(later.sum()), "later": train.rank_metrics(items[later], target[later])}
    results["base_minutes"] = runs["base"]["minutes"]
    sid.atomic_write(os.path.join(out, "continue.json"), json.dumps(results, indent=2).encode())
    print(f"\ncut at {cut:.0%} of interactions by time; later-period test users: {results['scratch']['later_users']}")
    print("| run | minutes | test R@10 | test N@10 | later R@10 | later N@10 |\n|---|---|---|---|---|---|")
    for name in ("continued", "scratch"):
        r = results[name]
        print(f"| {name} | {r['minutes']} | {r['test']['recall@10']:.4f} | {r['test']['ndcg@10']:.4f} | "
              f"{r['later']['recall@10']:.4f} | {r['later']['ndcg@10']:.4f} |")
    print(f"(base, on the early part: {results['base_minutes']} min)")
    return results


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

OPTIONS = {"run": "", "user": "", "history": "", "all": "false", "out": "", "dtype": "fp32", "beam_size": "0",
           "n_return": "10", "batch_size": "256", "device": "cpu", "add_items": "", "item_ids": "", "cold_start": "",
           "train_args": "", "continue_experiment": "false", "continue_args": "", "new_share": "0"}


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
    try:
        opts["new_share"] = float(opts["new_share"])
    except ValueError:
        raise ValueError(f"--new_share: expected a number in [0, 1], got {opts['new_share']!r}") from None
    if not 0 <= opts["new_share"] <= 1:
        raise ValueError(f"--new_share: expected a number in [0, 1], got {opts['new_share']}")
    if opts["all"] not in ("true", "false"):
        raise ValueError(f"--all: expected true or false, got {opts['all']!r}")
    opts["all"] = opts["all"] == "true"
    if opts["continue_experiment"] == "true":
        if not opts["out"]:
            raise ValueError("--continue_experiment: expected --out=FOLDER for the experiment's data and runs")
        return opts
    if opts["cold_start"]:
        if not opts["out"]:
            raise ValueError("--cold_start: expected --out=FOLDER for the experiment's data, run and results")
        return opts
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
    return [p[0] for p in parts], [" ".join(p[1].split())[:data_py.TITLE_CHARS] for p in parts]


def show(run: TrainedRun, items: np.ndarray, scores: np.ndarray, seen: set) -> None:
    print(f"{'rank':>4}  {'item':>10}  {'score':>8}  title")
    for rank, (item, score) in enumerate(zip(items.tolist(), scores.tolist()), start=1):
        if item < 0:                                    # fewer items than n_return
            break
        flag = ("  (seen)" if item in seen else "") + ("  (added after training)" if item >= run.trained_items else "")
        print(f"{rank:>4}  {run.item_raw[item]:>10}  {score:>8.3f}  {run.item_title[item]}{flag}")


def write_all(run: TrainedRun, opts: dict, dist: train.Dist) -> None:
    start = time.time()
    users = run.user_raw.tolist()
    histories = [run.items[run.offsets[u]:run.offsets[u + 1]] for u in range(len(users))]
    items, scores = recommend(run, histories, users, opts["n_return"], opts["beam_size"] or None, opts["dtype"],
                              opts["batch_size"], dist=dist, new_share=opts["new_share"])
    seconds = time.time() - start
    if dist.is_main:
        lines = [json.dumps({"user": u, "items": run.item_raw[row[row >= 0]].tolist(),
                             "scores": [None if np.isnan(x) else round(float(x), 5) for x in sc[row >= 0]]})
                 for u, row, sc in zip(users, items, scores)]
        sid.atomic_write(opts["out"], ("\n".join(lines) + "\n").encode())
        print(f"{len(users)} users in {seconds:.1f} s ({len(users) / seconds:.0f} users/s, {dist.world} process(es), "
              f"{opts['dtype']}); wrote {opts['out']}")


def main(argv: list) -> None:
    opts = parse(argv)
    if opts["cold_start"]:
        cold_start(opts["cold_start"], opts["out"], train_args=opts["train_args"].split())
        return
    if opts["continue_experiment"] == "true":
        continue_experiment(opts["out"], train_args=opts["train_args"].split(),
                            continue_args=opts["continue_args"].split())
        return
    if opts["add_items"]:
        ids, titles = read_item_ids(opts["item_ids"])
        emb = data_py.read_item_emb(opts["add_items"], len(ids), "--add_items")
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
                                  opts["beam_size"] or None, opts["dtype"], new_share=opts["new_share"])
        print(f"{who}: {len(history)} items, the model reads the last {min(len(history), run.model.config.max_history)}; "
              f"top {opts['n_return']} in {time.time() - start:.2f} s")
        show(run, items[0], scores[0], set(history.tolist()))
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:          # bad input or a file system problem: one line, status 1
        raise SystemExit(f"error: {e}")
