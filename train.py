"""Train and evaluate RPG_ED end to end: data -> item embeddings -> SIDs -> model -> Recall/NDCG.

    python train.py                                   # MovieLens-100K, CPU preset (<= 10 min)
    python train.py --data=../shared/data/amazon-beauty/Beauty.txt \\
        --item_emb=../shared/data/amazon-beauty/Beauty_minilm.f16.npy --preset=seed
    python train.py --key=value ...                   # any field of TrainConfig or RPGEDConfig

Evaluation follows PROTOCOL.md: stable time sort, 5-core, leave-one-out (last item test,
second-to-last validation), every earlier train position a training example, history = the
last `max_history` items before the target, full ranking with beam search over real SIDs,
Recall/NDCG@5/10, model selection on validation NDCG@10. Writes into out_dir: config.json,
item_id2tokens.npy, tokens2item.pkl, opq.npz, checkpoint.pt, results.json.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

import beam
import sid
from rpg_ed import RPG_ED, RPGEDConfig

ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}


@dataclass
class TrainConfig:
    data: str = "ml-100k"            # "ml-100k" or a path (file, or folder with one data file)
    format: str = "auto"             # auto | inter | csv | amazon | s3rec
    item_text: str = ""              # optional item-text file (.item, .jsonl, Amazon metadata)
    item_emb: str = ""               # optional [n_items, D] .npy; rows in sorted original-id order
    emb_source: str = "cf"           # embeddings when no item_emb: text | cf | both
    emb_dim: int = 64                # width of built embeddings
    out_dir: str = ""                # default out/<dataset>
    preset: str = "cpu"              # cpu | seed
    seed: int = 0
    device: str = "auto"             # auto (cuda, mps, cpu) | cpu | cuda | mps
    compile: bool = False            # torch.compile the model
    epochs: int = 6                  # maximum epochs
    batch_size: int = 256
    lr: float = 3e-3                 # peak learning rate
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05       # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 2              # epochs between validation runs (and the last epoch)
    patience: int = 3                # validation runs without improvement before stopping
    eval_batch_size: int = 256       # users per beam-search batch
    log_every: int = 100             # steps between log lines
    five_core: bool = True           # 5-core filtering (never for the s3rec format)


PRESETS = {
    # sized for `python train.py` to finish within 10 minutes on a 2-core CPU. No user token:
    # on ML-100K validation NDCG@10 was 0.0710 without it and 0.0653 with it (README, ablations).
    "cpu": dict(n_embd=64, n_head=4, n_inner=256, encoder_n_layer=2, decoder_n_layer=1, max_history=20,
                attn_pdrop=0.0, use_user_token=False),
    # the seed's architecture (RPGEDConfig's defaults), for a GPU
    "seed": dict(epochs=200, eval_every=5, patience=4, lr=1e-3, warmup_steps=2000),
}


# ----------------------------------------------------------------------------------------------
# Command line: --key=value for every field of TrainConfig and RPGEDConfig
# ----------------------------------------------------------------------------------------------

def _parse_value(name: str, text: str, kind: str):
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return {"int": int, "float": float, "str": str}[kind](text)
    except ValueError:
        raise ValueError(f"--{name}: expected {kind}, got {text!r}") from None


def parse_args(argv: list) -> tuple[TrainConfig, RPGEDConfig]:
    """--key=value pairs -> (TrainConfig, RPGEDConfig). Preset first, then explicit values."""
    kinds = {f.name: f.type for cls in (TrainConfig, RPGEDConfig) for f in dataclasses.fields(cls)}
    given = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected --key=value (keys: {', '.join(sorted(kinds))})")
        key, text = arg[2:].split("=", 1)
        if key not in kinds:
            raise ValueError(f"unknown option --{key}; known: {', '.join(sorted(kinds))}")
        given[key] = _parse_value(key, text, kinds[key])
    preset = given.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **given}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in values.items() if k in train_keys})
    mcfg = RPGEDConfig(**{k: v for k, v in values.items() if k not in train_keys})
    for name, allowed in (("format", ("auto", "inter", "csv", "amazon", "s3rec")),
                          ("emb_source", ("text", "cf", "both")), ("device", ("auto", "cpu", "cuda", "mps"))):
        if getattr(tcfg, name) not in allowed:
            raise ValueError(f"--{name}: expected one of {allowed}, got {getattr(tcfg, name)!r}")
    return tcfg, mcfg


# ----------------------------------------------------------------------------------------------
# Data: loaders for each format -> (user, item, timestamp) rows in file order
# ----------------------------------------------------------------------------------------------

@dataclass
class RawData:
    users: list                      # raw user id per interaction (str)
    items: list                      # raw item id per interaction (str)
    times: list                      # timestamp per interaction (float); file position for s3rec
    time_ordered: bool = False       # s3rec: file order is time order, already 5-core
    item_text: dict = field(default_factory=dict)   # raw item id -> text
    source: str = ""


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def fetch_ml100k(folder: str = "data/ml-100k") -> tuple[str, str]:
    """data/ml-100k/ if present, else extract it from the recbole==1.2.1 wheel on PyPI (no import)."""
    paths = {name: os.path.join(folder, name) for name in ML100K_SHA256}
    if all(os.path.exists(p) for p in paths.values()):
        source = f"read from {folder}/"
    else:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "recbole==1.2.1",
                            "-d", tmp], check=True)
            wheel = os.path.join(tmp, next(f for f in os.listdir(tmp) if f.endswith(".whl")))
            with zipfile.ZipFile(wheel) as z:
                for name, path in paths.items():
                    sid._atomic_write(path, z.read(f"recbole/dataset_example/ml-100k/{name}"))
        source = f"extracted from the PyPI wheel recbole==1.2.1 into {folder}/"
    for name, path in paths.items():
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != ML100K_SHA256[name]:
            raise ValueError(f"{path}: sha256 {digest}, expected {ML100K_SHA256[name]} (PROTOCOL.md)")
    return paths["ml-100k.inter"], source


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    if name.endswith(".inter"):
        return "inter"
    if name.endswith(".json") or name.endswith(".jsonl"):
        return "amazon"
    if name.endswith(".csv") or name.endswith(".tsv"):
        return "csv"
    with _open_text(path) as f:
        first = f.readline()
    if first.lstrip().startswith("{"):
        return "amazon"
    if re.fullmatch(r"\S+( \S+)+\s*", first):
        return "s3rec"
    raise ValueError(f"{path}: cannot detect the format from its name or first line; pass --format")


def _float(value: str, where: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"{where}: expected a numeric timestamp, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{where}: expected a finite timestamp, got {value!r}")
    return out


def load_inter(path: str) -> RawData:
    """RecBole atomic file: a header of name:type fields, tab-separated."""
    users, items, times = [], [], []
    with _open_text(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        names = [h.split(":")[0] for h in header]
        for need in ("user_id", "item_id", "timestamp"):
            if need not in names:
                raise ValueError(f"{path}:1: expected a {need} column in the header, got {header}")
        u, i, t = (names.index(n) for n in ("user_id", "item_id", "timestamp"))
        for line_no, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != len(names):
                raise ValueError(f"{path}:{line_no}: expected {len(names)} tab-separated fields, got {len(parts)}")
            users.append(parts[u]); items.append(parts[i]); times.append(_float(parts[t], f"{path}:{line_no}"))
    return RawData(users, items, times)


def load_csv(path: str) -> RawData:
    """CSV or TSV with a header naming user, item and timestamp columns."""
    aliases = {"user": ("user", "user_id", "userid", "reviewerid"),
               "item": ("item", "item_id", "itemid", "movieid", "asin"),
               "time": ("timestamp", "time", "ts", "unixreviewtime")}
    users, items, times = [], [], []
    with _open_text(path) as f:
        first = f.readline()
        delimiter = "\t" if "\t" in first else ","
        header = [h.strip().lower().split(":")[0] for h in next(csv.reader([first], delimiter=delimiter))]
        cols = {}
        for key, names in aliases.items():
            found = [header.index(n) for n in names if n in header]
            if not found:
                raise ValueError(f"{path}:1: expected a {key} column (one of {names}), got {header}")
            cols[key] = found[0]
        for line_no, row in enumerate(csv.reader(f, delimiter=delimiter), start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line_no}: expected {len(header)} fields, got {len(row)}")
            users.append(row[cols["user"]]); items.append(row[cols["item"]])
            times.append(_float(row[cols["time"]], f"{path}:{line_no}"))
    return RawData(users, items, times)


def load_amazon(path: str) -> RawData:
    """Amazon 2014 reviews: one JSON object per line with reviewerID, asin, unixReviewTime."""
    users, items, times = [], [], []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                review = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
            if not isinstance(review, dict) or any(k not in review for k in ("reviewerID", "asin", "unixReviewTime")):
                raise ValueError(f"{path}:{line_no}: expected keys reviewerID, asin, unixReviewTime")
            users.append(str(review["reviewerID"])); items.append(str(review["asin"]))
            times.append(_float(str(review["unixReviewTime"]), f"{path}:{line_no}"))
    return RawData(users, items, times)


def load_s3rec(path: str) -> RawData:
    """`user item item ...` per line, oldest first (the S3Rec / ICLRec files): no timestamps."""
    users, items, times = [], [], []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{line_no}: expected `user item item ...`, got {line.strip()!r}")
            users.extend([parts[0]] * (len(parts) - 1)); items.extend(parts[1:])
            times.extend(range(len(times), len(times) + len(parts) - 1))
    return RawData(users, items, [float(t) for t in times], time_ordered=True)


def load_item_text(path: str) -> dict:
    """Raw item id -> text, from a RecBole .item file, an items .jsonl, or Amazon metadata."""
    text = {}
    with _open_text(path) as f:
        if path.removesuffix(".gz").endswith(".item"):
            header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                if len(row) == len(header):
                    fields_ = dict(zip(header, row))
                    text[fields_.pop("item_id")] = " ".join(fields_.values())
            return text
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                try:
                    obj = ast.literal_eval(line)  # the 2014 metadata is Python literals; literal_eval runs no code
                except (ValueError, SyntaxError):
                    raise ValueError(f"{path}:{line_no}: not a JSON object or Python literal") from None
            key = str(obj.get("item_id", obj.get("asin", "")))
            parts = [str(obj.get("title", "")), str(obj.get("brand", ""))]
            for extra in (obj.get("attributes", []), obj.get("categories", [])):
                parts.extend(str(x) for x in extra)
            text[key] = " ".join(parts)
    return text


def load_data(cfg: TrainConfig) -> RawData:
    if cfg.data == "ml-100k":
        path, source = fetch_ml100k()
        raw = load_inter(path)
        raw.item_text = load_item_text(path.replace(".inter", ".item"))
        raw.source = source
        return raw
    path = cfg.data
    if os.path.isdir(path):
        candidates = sorted(f for f in os.listdir(path) if f.endswith((".inter", ".csv", ".tsv", ".txt", ".json", ".json.gz")))
        if len(candidates) != 1:
            raise ValueError(f"{path}: expected exactly one data file in the folder, found {candidates}")
        path = os.path.join(path, candidates[0])
    if not os.path.exists(path):
        raise ValueError(f"--data: {path} does not exist")
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    raw = {"inter": load_inter, "csv": load_csv, "amazon": load_amazon, "s3rec": load_s3rec}[fmt](path)
    item_text = cfg.item_text
    if not item_text:  # look beside the data file: name.item, or *_items.jsonl
        folder = os.path.dirname(path)
        stem = os.path.basename(path).split(".")[0]
        for candidate in (os.path.join(folder, stem + ".item"), os.path.join(folder, stem + "_items.jsonl")):
            if os.path.exists(candidate):
                item_text = candidate
    if item_text:
        raw.item_text = load_item_text(item_text)
    raw.source = f"read {fmt} from {path}" + (f", item text from {item_text}" if item_text else "")
    return raw


# ----------------------------------------------------------------------------------------------
# Preparation: time order, 5-core, id maps, leave-one-out split
# ----------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    sequences: list                  # per user: item ids (int64 array), oldest first
    user_raw: list                   # raw user id of each user
    item_raw: list                   # raw item id of each item
    n_interactions: int


def _sorted_ids(raw_ids) -> list:
    """Unique raw ids in sorted order: numeric order when every id is an integer."""
    uniq = set(raw_ids)
    if all(re.fullmatch(r"-?\d+", u) for u in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def prepare(raw: RawData, five_core: bool = True) -> Dataset:
    """Stable time sort per user, k-core filtering until nothing changes, contiguous ids."""
    if not raw.users:
        raise ValueError("dataset: no interactions")
    users, items = np.array(raw.users, dtype=object), np.array(raw.items, dtype=object)
    times = np.array(raw.times, dtype=np.float64)
    keep = np.ones(len(users), bool)
    if five_core and not raw.time_ordered:
        while True:
            _, u_inv, u_cnt = np.unique(users[keep], return_inverse=True, return_counts=True)
            _, i_inv, i_cnt = np.unique(items[keep], return_inverse=True, return_counts=True)
            ok = (u_cnt[u_inv] >= 5) & (i_cnt[i_inv] >= 5)
            if ok.all():
                break
            keep[np.flatnonzero(keep)[~ok]] = False
    users, items, times = users[keep], items[keep], times[keep]
    if len(users) == 0:
        raise ValueError("dataset: empty after 5-core filtering (every user or item had fewer than 5 interactions)")
    user_raw, item_raw = _sorted_ids(users), _sorted_ids(items)
    user_id = {u: k for k, u in enumerate(user_raw)}
    item_id = {i: k for k, i in enumerate(item_raw)}
    uid = np.array([user_id[u] for u in users])
    iid = np.array([item_id[i] for i in items])
    # stable: equal timestamps keep file order (PROTOCOL.md), never an item-id tie-break
    order = np.lexsort((np.arange(len(uid)), times, uid))
    bounds = np.searchsorted(uid[order], np.arange(len(user_raw) + 1))
    sequences = [iid[order[bounds[u]:bounds[u + 1]]] for u in range(len(user_raw))]
    return Dataset(sequences, user_raw, item_raw, int(len(uid)))


@dataclass
class Split:
    history: np.ndarray              # (E, max_history) item ids, left-padded with -1
    target: np.ndarray               # (E,) item ids
    user: np.ndarray                 # (E,) user index


def _windows(sequences: list, user_ids: list, target_pos: list, max_history: int) -> Split:
    """One example per (user, position): the items before it, the last max_history, oldest first."""
    n = len(target_pos)
    history = np.full((n, max_history), -1, dtype=np.int64)
    for row, (u, t) in enumerate(zip(user_ids, target_pos)):  # data preparation, done once
        window = sequences[u][max(0, t - max_history):t]
        if len(window):
            history[row, max_history - len(window):] = window
    target = np.array([sequences[u][t] for u, t in zip(user_ids, target_pos)], dtype=np.int64)
    return Split(history, target, np.array(user_ids, dtype=np.int64))


def leave_one_out(data: Dataset, max_history: int) -> dict:
    """train: every position 1..n-3; valid: position n-2; test: position n-1 (per user)."""
    short = [u for u, s in enumerate(data.sequences) if len(s) < 3]
    if short:
        raise ValueError(f"user {data.user_raw[short[0]]!r}: expected at least 3 interactions for "
                         f"leave-one-out, got {len(data.sequences[short[0]])}")
    train_u, train_t = [], []
    for u, s in enumerate(data.sequences):
        train_u.extend([u] * (len(s) - 3)); train_t.extend(range(1, len(s) - 2))
    users = list(range(len(data.sequences)))
    return {"train": _windows(data.sequences, train_u, train_t, max_history),
            "valid": _windows(data.sequences, users, [len(s) - 2 for s in data.sequences], max_history),
            "test": _windows(data.sequences, users, [len(s) - 1 for s in data.sequences], max_history)}


# ----------------------------------------------------------------------------------------------
# Item embeddings (numpy only): text TF-IDF + SVD, or co-occurrence PPMI + SVD (train split only)
# ----------------------------------------------------------------------------------------------

def truncated_svd(matrix: np.ndarray, k: int, seed: int = 0, n_power: int = 4):
    """Randomised SVD (Halko et al. 2011): U (n, k), S (k,)."""
    rng = np.random.default_rng(seed)
    k = min(k, *matrix.shape)
    q = matrix @ rng.standard_normal((matrix.shape[1], k + 10))
    for _ in range(n_power):
        q, _ = np.linalg.qr(matrix @ (matrix.T @ q))
    u, s, _ = np.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ u)[:, :k], s[:k]


def text_embeddings(data: Dataset, item_text: dict, dim: int, seed: int) -> np.ndarray:
    """TF-IDF over title/genre/attribute words (words in >= 2 items), then a truncated SVD."""
    docs = [re.findall(r"[a-z0-9']+", item_text.get(i, "").lower()) for i in data.item_raw]
    df: dict = {}
    for doc in docs:
        for w in set(doc):
            df[w] = df.get(w, 0) + 1
    vocab = {w: k for k, w in enumerate(sorted(w for w, c in df.items() if c >= 2)[:8192])}
    if not vocab:
        raise ValueError("item text: no word occurs in two items; use --emb_source=cf or --item_emb")
    tfidf = np.zeros((len(docs), len(vocab)), np.float32)
    for row, doc in enumerate(docs):
        for w in doc:
            if w in vocab:
                tfidf[row, vocab[w]] += 1.0
    tfidf *= np.log(len(docs) / np.array([df[w] for w in sorted(vocab, key=vocab.get)])) + 1.0
    tfidf /= np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-12)
    u, s = truncated_svd(tfidf, dim, seed)
    return (u * s).astype(np.float32)


def cf_embeddings(train: Split, n_items: int, dim: int, seed: int, window: int = 5) -> np.ndarray:
    """PPMI of item co-occurrence within `window` steps in TRAIN histories only, then an SVD.

    Each training example's last `window` history items co-occur with its target, so every
    counted pair comes from the train split (validation and test targets never appear).
    """
    hist = train.history[:, -window:]
    pairs_a = np.repeat(train.target, window)
    pairs_b = hist.reshape(-1)
    real = pairs_b >= 0
    counts = np.zeros((n_items, n_items), np.float32)
    np.add.at(counts, (pairs_a[real], pairs_b[real]), 1.0)
    counts += counts.T
    total, row = counts.sum(), counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts * total / np.outer(row, row))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)
    u, s = truncated_svd(ppmi, dim, seed)
    return (u * np.sqrt(s)).astype(np.float32)


def item_embeddings(cfg: TrainConfig, data: Dataset, item_text: dict, train: Split) -> tuple[np.ndarray, str]:
    n_items = len(data.item_raw)
    if cfg.item_emb:
        try:
            emb = np.load(cfg.item_emb, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"--item_emb: {cfg.item_emb} is not a readable .npy array ({e})") from None
        if emb.ndim != 2 or emb.shape[0] != n_items:
            raise ValueError(f"--item_emb: expected shape [{n_items} items, D], got {emb.shape} from {cfg.item_emb}")
        return emb.astype(np.float32), f"file {cfg.item_emb}"
    parts = []
    if cfg.emb_source in ("text", "both"):
        parts.append(text_embeddings(data, item_text, cfg.emb_dim, cfg.seed))
    if cfg.emb_source in ("cf", "both"):
        parts.append(cf_embeddings(train, n_items, cfg.emb_dim, cfg.seed))
    parts = [p / max(np.linalg.norm(p, axis=1).mean(), 1e-12) for p in parts]  # equal weight in "both"
    return np.concatenate(parts, axis=1), cfg.emb_source


# ----------------------------------------------------------------------------------------------
# Batches, metrics, baselines
# ----------------------------------------------------------------------------------------------

def make_batch(split: Split, rows: np.ndarray, item_tokens: torch.Tensor, user_buckets: torch.Tensor,
               device: torch.device, with_target: bool = True) -> dict:
    """Rows of a split -> the model's batch. History is trimmed to the longest real one in the batch
    (left padding, right-aligned positions: trimming leading padding changes nothing)."""
    history = torch.from_numpy(split.history[rows])                            # (b, H), -1 = padding
    real = history >= 0
    width = int(real.sum(1).max()) if len(rows) else 0
    history = history[:, history.shape[1] - width:]
    n_items = item_tokens.shape[0] - 1
    batch = {"user_ids": user_buckets[split.user[rows]],
             "history_sid": item_tokens[torch.where(history >= 0, history, n_items)]}  # (b, w, 4)
    if with_target:
        target = item_tokens[torch.from_numpy(split.target[rows])]            # (b, 4)
        b = len(rows)
        batch["decoder_input_ids"] = torch.cat([torch.full((b, 1), sid.BOS), target], 1)
        batch["decoder_labels"] = torch.cat([target, torch.full((b, 1), sid.EOS)], 1)
    return {k: v.to(device) for k, v in batch.items()}


def rank_metrics(ranked: np.ndarray, target: np.ndarray, ks=(5, 10)) -> dict:
    """ranked (U, >=max k) item ids best first, target (U,) -> mean Recall@k and NDCG@k."""
    hits = ranked == target[:, None]
    rank = np.where(hits.any(1), hits.argmax(1) + 1, 0)                      # 1-based, 0 = miss
    out = {}
    for k in ks:
        hit = (rank >= 1) & (rank <= k)
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.maximum(rank, 1) + 1.0), 0.0).mean())
    return out


def baseline_rankings(data: Dataset, splits: dict, which: str, k: int = 10) -> dict:
    """Popularity and first-order Markov (last-item transition counts, popularity breaks ties).

    Both are fitted on the training split only, like the model; the test ranking starts from
    each user's validation item, which is the last item of the test history.
    """
    n_items = len(data.item_raw)
    seqs = [s[:-2] for s in data.sequences]                                     # train parts
    pop = np.bincount(np.concatenate(seqs), minlength=n_items).astype(np.float64)
    by_pop = np.argsort(-pop, kind="stable")
    src = np.concatenate([s[:-1] for s in seqs])
    dst = np.concatenate([s[1:] for s in seqs])
    keys, counts = np.unique(src * n_items + dst, return_counts=True)
    last = splits[which].history[:, -1]                                         # item before the target
    tiebreak = pop / (pop.max() + 1.0)                                          # < 1: only breaks ties
    markov = np.empty((len(seqs), k), np.int64)
    starts = np.searchsorted(keys, np.arange(n_items + 1) * n_items)
    for u, item in enumerate(last):  # baseline, once per user
        row = tiebreak.copy()
        lo, hi = starts[item], starts[item + 1]
        row[keys[lo:hi] % n_items] += counts[lo:hi]
        markov[u] = np.argsort(-row, kind="stable")[:k]
    target = splits[which].target
    return {"popularity": rank_metrics(np.tile(by_pop[:k], (len(seqs), 1)), target),
            "markov": rank_metrics(markov, target)}


@torch.no_grad()
def evaluate(model, split: Split, index: sid.SIDIndex, item_tokens, user_buckets, cfg: TrainConfig,
             device) -> dict:
    """Beam search (beam_size from the model config, 10 returned) over real SIDs -> metrics."""
    model.eval()
    ranked = []
    for start in range(0, len(split.target), cfg.eval_batch_size):
        rows = np.arange(start, min(start + cfg.eval_batch_size, len(split.target)))
        batch = make_batch(split, rows, item_tokens, user_buckets, device, with_target=False)
        result = beam.beam_search(model, batch, model.config.beam_size, 10, index)
        ranked.append(result.items.cpu().numpy())
    model.train()
    return rank_metrics(np.concatenate(ranked), split.target)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: str, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    sid._atomic_write(path, buf.getvalue())


def main(argv: list) -> dict:
    start_time = time.time()
    cfg, mcfg = parse_args(argv)
    name = cfg.data if cfg.data == "ml-100k" else os.path.basename(os.path.normpath(cfg.data)).split(".")[0]
    out_dir = cfg.out_dir or os.path.join("out", name)
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    resolved = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg)}
    print("config:", json.dumps(resolved))
    sid._atomic_write(os.path.join(out_dir, "config.json"), json.dumps(resolved, indent=2).encode())

    raw = load_data(cfg)
    print(f"data: {raw.source}")
    data = prepare(raw, cfg.five_core)
    splits = leave_one_out(data, mcfg.max_history)
    stats = {"users": len(data.user_raw), "items": len(data.item_raw), "interactions": data.n_interactions,
             "train_examples": len(splits["train"].target)}
    print("dataset: " + ", ".join(f"{k} {v:,}" for k, v in stats.items()))

    emb, emb_name = item_embeddings(cfg, data, raw.item_text, splits["train"])
    t0 = time.time()
    index, moved = sid.build_index(emb, seed=cfg.seed)
    index.save(out_dir)
    print(f"SIDs: from {emb_name} embeddings {emb.shape}, OPQ error {index.quantizer.errors[0]:.4g} -> "
          f"{index.quantizer.errors[-1]:.4g}, {moved} items moved by collision resolution, "
          f"{time.time() - t0:.1f} s, saved to {out_dir}")

    item_tokens = torch.cat([torch.from_numpy(sid.codes_to_tokens(index.item_codes, mcfg.n_user_buckets)),
                             torch.full((1, mcfg.n_digit), sid.PAD)])            # (n_items + 1, 4); last = PAD
    user_buckets = torch.tensor([sid.user_bucket(u, mcfg.n_user_buckets) for u in data.user_raw])
    model = RPG_ED(mcfg).to(device)
    print(f"model: {model.num_parameters():,} parameters on {device}")
    train_model = torch.compile(model) if cfg.compile else model
    # weight decay on weight matrices only: not on embeddings, positions, norms or biases
    decayed = {n for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n and "pos" not in n}
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    train = splits["train"]
    steps_per_epoch = math.ceil(len(train.target) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(cfg.seed)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    best, best_epoch, bad_evals, step = -1.0, 0, 0, 0
    history = []
    train_start = time.time()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(train.target), generator=generator).numpy()
        seen, tick = 0, time.time()
        for b in range(steps_per_epoch):
            rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            batch = make_batch(train, rows, item_tokens, user_buckets, device)
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = train_model(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            seen += len(rows)
            if step % cfg.log_every == 0 or b == steps_per_epoch - 1:
                elapsed = time.time() - train_start
                speed = seen / (time.time() - tick)
                eta = elapsed / step * (total_steps - step)
                print(f"epoch {epoch} step {step}/{total_steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                      f"{speed:.0f} ex/s | eta {eta / 60:.1f} min", flush=True)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            metrics = evaluate(model, splits["valid"], index, item_tokens, user_buckets, cfg, device)
            history.append({"epoch": epoch, **metrics})
            print(f"valid epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
            if metrics["ndcg@10"] > best:
                best, best_epoch, bad_evals = metrics["ndcg@10"], epoch, 0
                save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                            "config": resolved, "step": step, "epoch": epoch, "best": best})
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    print(f"early stop: no better validation NDCG@10 in {cfg.patience} evaluations")
                    break
    train_time = time.time() - train_start

    state = torch.load(ckpt_path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    results = {"config": resolved, "dataset": {**stats, "source": raw.source},
               "best_epoch": best_epoch, "valid_history": history,
               "valid": evaluate(model, splits["valid"], index, item_tokens, user_buckets, cfg, device),
               "test": evaluate(model, splits["test"], index, item_tokens, user_buckets, cfg, device),
               "baselines": {split: baseline_rankings(data, splits, split) for split in ("valid", "test")},
               "train_seconds": round(train_time, 1)}
    results["total_seconds"] = round(time.time() - start_time, 1)
    sid._atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2).encode())
    print_table(results)
    print(f"wrote {out_dir}/results.json; total {results['total_seconds'] / 60:.1f} min")
    return results


def print_table(results: dict) -> None:
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    print(f"\n| model | split | {' | '.join(k.replace('recall', 'R').replace('ndcg', 'N') for k in keys)} |")
    print("|---|---|" + "---|" * len(keys))
    for split in ("valid", "test"):
        rows = [("RPG_ED", results[split])] + [(n, m) for n, m in results["baselines"][split].items()]
        for name, m in rows:
            print(f"| {name} | {split} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        raise SystemExit(f"error: {e}")
