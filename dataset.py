"""Data for RPG_ED: files -> interactions -> 5-core sequences -> leave-one-out split.

    raw = load_data(cfg)                   # any supported file -> (user, item, timestamp) rows
    data = prepare(raw)                    # stable time order, 5-core, ids 0..n-1 (Dataset)
    splits = leave_one_out(data, 50)       # {"train", "valid", "test"}: Split, windows as positions

The protocol: each user's interactions sorted by timestamp (stable: ties keep file order); users
and items with fewer than 5 interactions removed until none remain (5-core); per user, the last
item is the test target, the one before it the validation target, and every earlier position a
training target; the history of a target is the (at most) max_history items before it.

Formats: RecBole .inter (ML-100K), CSV/TSV with a header (user, item, timestamp), Amazon review
JSON lines (optionally .gz), and the S3Rec "user item item ..." lines (Beauty.txt). Every bad row
is a ValueError naming the file and line. (The module is dataset.py, not data.py: data/ is the
folder that datasets are downloaded into.)
"""
from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

import cli

ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}


# ----------------------------------------------------------------------------------------------
# Data: loaders for each format -> (user, item, timestamp) rows in file order
# ----------------------------------------------------------------------------------------------

@dataclass
class RawData:
    users: list                      # raw user id per interaction (str; one object per distinct id)
    items: list                      # raw item id per interaction (str)
    times: Sequence[float]           # timestamp per interaction: array('q') of exact integers, or
                                     # array('d') once any is fractional (8 bytes each); file position for s3rec
    time_ordered: bool = False       # s3rec: file order is time order, already 5-core
    item_text: dict = field(default_factory=dict)   # raw item id -> text
    item_emb: str = ""               # item-embedding file: --item_emb, or the one found beside the data
    inputs: dict = field(default_factory=dict)  # {flag: path} of every file read (never to be overwritten)
    source: str = ""
    path: str = ""                   # the data file, for messages
    fingerprint: dict = field(default_factory=dict)  # {"path", "size", "sha256"} of the bytes read
    names: dict = field(default_factory=dict, repr=False)  # id -> the one str object kept for it


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
                    cli.atomic_write(path, z.read(f"recbole/dataset_example/ml-100k/{name}"))
        source = f"extracted from the PyPI wheel recbole==1.2.1 into {folder}/"
    for name, path in paths.items():
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != ML100K_SHA256[name]:
            raise ValueError(f"{path}: sha256 {digest}, expected {ML100K_SHA256[name]} (the README's evaluation protocol)")
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


MAX_ID_CHARS = 1000
TIMESTAMP = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")   # ASCII only, no "1_000"


def id_problem(raw_id: str) -> str:
    """What breaks the id rules ("" when nothing does): every id, wherever it comes from (a data
    file, data.npz, recommend.py --add_items), is 1 to MAX_ID_CHARS printable characters (no
    control or format character such as a BOM or a bidi override: it would print as something
    else, or change on save), with no comma (recommend.py --history separates ids with commas)
    and no space at either end."""
    if not raw_id or len(raw_id) > MAX_ID_CHARS:
        return "empty" if not raw_id else f"{len(raw_id)} characters"
    if not raw_id.isprintable() or "," in raw_id:                   # the fast test first: it runs per line
        bad = next(c for c in raw_id if c == "," or not c.isprintable())
        return f"the character {bad!r} (U+{ord(bad):04X})"
    return "spaces at an end" if raw_id != raw_id.strip() else ""


def check_id(where: str, kind: str, raw_id: str) -> str:
    """A raw id, stripped of surrounding whitespace, or a ValueError naming `where` (id_problem)."""
    raw_id = raw_id.strip()
    if problem := id_problem(raw_id):
        raise ValueError(f"{where}: expected the {kind} id to be 1 to {MAX_ID_CHARS} printable characters, got "
                         f"{problem}")
    return raw_id


def check_ids(ids: np.ndarray, where: str, kind: str) -> None:
    """Many ids at once (a str array): each one valid (id_problem), no two the same."""
    joined = "".join(ids.tolist())
    lengths = np.char.str_len(ids) if ids.size else np.zeros(0, int)
    if not joined.isprintable() or "," in joined or (lengths == 0).any() or (lengths > MAX_ID_CHARS).any() \
            or (np.char.strip(ids) != ids).any():
        raw_id = next(r for r in ids.tolist() if id_problem(r))
        raise ValueError(f"{where}: expected each {kind} id to be 1 to {MAX_ID_CHARS} printable characters, got "
                         f"{id_problem(raw_id)} in {raw_id[:40]!r}")
    if len(np.unique(ids)) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        raise ValueError(f"{where}: expected each {kind} id once, got {str(values[counts > 1][0])!r} more than once")


def _append(raw: RawData, where: str, user: str, item: str, timestamp: str) -> None:
    """Add one interaction after checking it. Ids are stripped of surrounding whitespace (so
    `u0, i0` is `u0`,`i0` in every format) and checked (check_id); the timestamp must be a finite
    number written in ASCII digits, sign, point and exponent."""
    user, item = check_id(where, "user", user), check_id(where, "item", item)
    timestamp = timestamp.strip()
    if not TIMESTAMP.fullmatch(timestamp):
        raise ValueError(f"{where}: expected a numeric timestamp (ASCII digits, sign, point, exponent), "
                         f"got {timestamp[:40]!r}")
    try:                                        # integers exactly (nanoseconds 1 apart stay apart)
        value = int(timestamp)
    except ValueError:
        value = float(timestamp)
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite timestamp, got {timestamp!r}")
        if raw.times.typecode == "q":           # a fractional timestamp: the file is compared as float64
            raw.times = array("d", raw.times)
    if raw.times.typecode == "q" and not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"{where}: expected a timestamp that fits in 64 bits, got {timestamp!r}")
    # one object per distinct id: 20M rows hold 20M pointers, not 40M strings
    raw.users.append(raw.names.setdefault(user, user)); raw.items.append(raw.names.setdefault(item, item))
    raw.times.append(value)


def load_inter(path: str) -> RawData:
    """RecBole atomic file: a header of name:type fields, tab-separated."""
    raw = RawData([], [], array("q"))
    with _open_text(path) as f:
        header = f.readline().rstrip("\r\n").split("\t")
        names = [h.split(":")[0] for h in header]
        for need in ("user_id", "item_id", "timestamp"):
            if need not in names:
                raise ValueError(f"{path}:1: expected a {need} column in the header, got {header}")
        u, i, t = (names.index(n) for n in ("user_id", "item_id", "timestamp"))
        for line_no, line in enumerate(f, start=2):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != len(names):
                raise ValueError(f"{path}:{line_no}: expected {len(names)} tab-separated fields, got {len(parts)}")
            _append(raw, f"{path}:{line_no}", parts[u], parts[i], parts[t])
    return raw


def load_csv(path: str) -> RawData:
    """CSV or TSV with a header naming user, item and timestamp columns."""
    aliases = {"user": ("user", "user_id", "userid", "reviewerid"),
               "item": ("item", "item_id", "itemid", "movieid", "asin"),
               "time": ("timestamp", "time", "ts", "unixreviewtime")}
    raw = RawData([], [], array("q"))
    with _open_text(path) as f:
        first = f.readline()
        delimiter = "\t" if "\t" in first else ","
        header = [h.strip().lower().split(":")[0] for h in next(csv.reader([first], delimiter=delimiter), [])]
        cols = {}
        for key, names in aliases.items():
            found = [header.index(n) for n in names if n in header]
            if not found:
                raise ValueError(f"{path}:1: expected the {key} column (one of {names}), got {header}")
            cols[key] = found[0]
        reader = csv.reader(f, delimiter=delimiter)
        try:
            for row in reader:
                line_no = reader.line_num + 1       # the file's line where the row ends (quoted newlines count)
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}:{line_no}: expected {len(header)} fields, got {len(row)}")
                _append(raw, f"{path}:{line_no}", row[cols["user"]], row[cols["item"]], row[cols["time"]])
        except csv.Error as e:                      # e.g. a field over the csv module's size limit
            raise ValueError(f"{path}:{reader.line_num + 1}: not a readable CSV row ({e})") from None
    return raw


def unique_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook: a key given twice is an error, not a silent last-one-wins."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def load_amazon(path: str) -> RawData:
    """Amazon 2014 reviews: one JSON object per line with reviewerID, asin, unixReviewTime."""
    raw = RawData([], [], array("q"))
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                review = json.loads(line, object_pairs_hook=unique_keys)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({e})") from None
            if not isinstance(review, dict) or any(k not in review for k in ("reviewerID", "asin", "unixReviewTime")):
                raise ValueError(f"{path}:{line_no}: expected a JSON object with keys reviewerID, asin, unixReviewTime")
            for key in ("reviewerID", "asin", "unixReviewTime"):       # null, true, [..] or {..} is no id
                if isinstance(review[key], bool) or not isinstance(review[key], (str, int, float)):
                    raise ValueError(f"{path}:{line_no}: expected {key} to be a string or a number, got "
                                     f"{json.dumps(review[key])[:50]}")
            _append(raw, f"{path}:{line_no}", str(review["reviewerID"]), str(review["asin"]),
                    str(review["unixReviewTime"]))
    return raw


def load_s3rec(path: str) -> RawData:
    """`user item item ...` per line, oldest first (the S3Rec / ICLRec files): no timestamps."""
    raw = RawData([], [], array("q"), time_ordered=True)
    first_line = {}                                            # user -> the line that holds it
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"{path}:{line_no}: expected `user item item ...`, got {line.strip()[:80]!r}")
            if line_no == 1 and parts[0].lower().split(":")[0] in ("user", "user_id", "userid", "uid", "reviewerid"):
                raise ValueError(f"{path}:1: {line.strip()[:80]!r} looks like a header; this format (`user item "
                                 "item ...` per line) has none: remove the line, or pass another --format")
            if parts[0] in first_line:
                raise ValueError(f"{path}:{line_no}: user {parts[0][:80]!r} again (first on line "
                                 f"{first_line[parts[0]]}); expected one line per user")
            first_line[parts[0]] = line_no
            for item in parts[1:]:                             # the file position is the timestamp
                _append(raw, f"{path}:{line_no}", parts[0], item, str(len(raw.times)))
    return raw


def _text_of(obj: dict) -> str:
    parts = [str(obj.get("title", "")), str(obj.get("brand", ""))]
    for extra in (obj.get("attributes", []), obj.get("categories", [])):
        parts.extend(str(x) for x in (extra if isinstance(extra, list) else [extra]))
    return " ".join(parts)


def load_item_text(path: str) -> dict:
    """Raw item id -> text, from a RecBole .item file, an items .jsonl, or Amazon metadata."""
    text = {}
    with _open_text(path) as f:
        if path.removesuffix(".gz").endswith(".item"):
            header = [h.split(":")[0] for h in f.readline().rstrip("\r\n").split("\t")]
            if "item_id" not in header:
                raise ValueError(f"{path}:1: expected an item_id column in the header, got {header}")
            for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}:{line_no}: expected {len(header)} tab-separated fields, got {len(row)}")
                fields_ = dict(zip(header, row))
                _add_text(text, f"{path}:{line_no}", fields_.pop("item_id"), " ".join(fields_.values()))
            return text
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=unique_keys)
            except ValueError as e:
                if "appears twice" in str(e):
                    raise ValueError(f"{path}:{line_no}: {e}") from None
                obj = None
            except RecursionError:
                obj = None
            if obj is None:
                try:
                    obj = ast.literal_eval(line)  # the 2014 metadata is Python literals; literal_eval runs no code
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    obj = None
            if not isinstance(obj, dict) or not str(obj.get("item_id", obj.get("asin", ""))).strip():
                raise ValueError(f"{path}:{line_no}: expected a JSON object or Python dict with item_id or asin")
            _add_text(text, f"{path}:{line_no}", str(obj.get("item_id", obj.get("asin"))), _text_of(obj))
    return text


def _add_text(text: dict, where: str, item: str, words: str) -> None:
    if item in text:
        raise ValueError(f"{where}: item {item!r} appears a second time")
    text[item] = words


LOADERS = {"inter": load_inter, "csv": load_csv, "amazon": load_amazon, "s3rec": load_s3rec}


def read_file(path: str, read, shown: str = ""):
    """Run a loader, turning undecodable bytes and broken compression into a ValueError that names
    the file (`shown`, when `path` is a copy of it)."""
    shown = shown or path
    try:
        return read(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError, zlib.error, csv.Error) as e:   # gzip.BadGzipFile is an OSError
        raise ValueError(f"{shown}: cannot read it ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(str(e).replace(path, shown)) from None


MAX_LINE_BYTES = 1 << 24   # a longer line is refused: a stream without newlines (/dev/zero) is not data


def snapshot(path: str, scratch: str) -> tuple[str, dict]:
    """Read `path` once, start to end: its size and sha256 (the fingerprint a run records of its
    data), and a check that no line is longer than MAX_LINE_BYTES. A pipe or FIFO can be read
    only once, so it is copied into the folder `scratch` as it is read; the loaders read the copy.
    Returns (the path to read, the fingerprint)."""
    regular = os.path.isfile(path)
    copy = path if regular else os.path.join(scratch, os.path.basename(path) or "data")
    digest, size, line, run = hashlib.sha256(), 0, 1, 0
    try:
        with open(path, "rb") as f, (open(os.devnull, "wb") if regular else open(copy, "wb")) as out:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
                if not regular:
                    out.write(block)
                first = block.find(b"\n")                 # lines inside one block are shorter than it
                longest = run + (len(block) if first < 0 else first)   # the line open at the block's start
                run = longest if first < 0 else len(block) - block.rfind(b"\n") - 1
                if longest > MAX_LINE_BYTES and not path.endswith(".gz"):
                    raise ValueError(f"{path}:{line}: a line longer than {MAX_LINE_BYTES:,} bytes; expected "
                                     "text data with one record per line")
                line += block.count(b"\n")
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    return copy, {"path": os.path.abspath(path), "size": size, "sha256": digest.hexdigest()}


def _item_emb_file(cfg, data_path: str) -> str:
    """--item_emb, else the one NAME_*.npy beside data file NAME.ext (e.g. Beauty_minilm.f16.npy),
    else none; "none" skips the search."""
    if cfg.item_emb:
        return "" if cfg.item_emb == "none" else cfg.item_emb
    folder, stem = os.path.dirname(data_path), os.path.basename(data_path).split(".")[0]
    found = sorted(f for f in os.listdir(folder or ".") if f.startswith(stem + "_") and f.endswith(".npy"))
    if len(found) > 1:
        raise ValueError(f"{folder}: found several item-embedding files {found}; choose one with "
                         "--item_emb=FILE, or none with --item_emb=none")
    return os.path.join(folder, found[0]) if found else ""


def load_data(cfg) -> RawData:
    """Read the interactions named by cfg.data (and cfg.format, cfg.item_text, cfg.item_emb: the
    fields of train.TrainConfig; any object with them will do). Each file is read once from start
    to end before it is parsed (see snapshot), so a pipe gives the same data as the file."""
    with tempfile.TemporaryDirectory() as scratch:
        if cfg.data == "ml-100k":
            path, source = fetch_ml100k()
            fmt, item_text = "inter", path.replace(".inter", ".item")
        else:
            path, source, fmt, item_text = data_file(cfg.data), "", cfg.format, cfg.item_text
            if not item_text:                  # look beside the data file: NAME.item, or NAME_items.jsonl
                stem = os.path.join(os.path.dirname(path), os.path.basename(path).split(".")[0])
                item_text = next((c for c in (stem + ".item", stem + "_items.jsonl") if os.path.exists(c)), "")
            item_text = "" if item_text == "none" else item_text           # "none": no text, no search
        copy, fingerprint = snapshot(path, scratch)
        fmt = read_file(copy, detect_format, path) if fmt == "auto" else fmt
        raw = read_file(copy, LOADERS[fmt], path)
        if item_text:
            raw.item_text = read_file(snapshot(item_text, scratch)[0], load_item_text, item_text)
    raw.path, raw.fingerprint, raw.item_emb = path, fingerprint, _item_emb_file(cfg, path)
    raw.inputs = {k: v for k, v in (("--data", path), ("--item_text", item_text), ("--item_emb", raw.item_emb)) if v}
    raw.source = ((source or f"read {fmt} from {path}") + (f", item text from {item_text}" if item_text else "") +
                  (f", item embeddings from {raw.item_emb}" if raw.item_emb else ""))
    return raw


DATA_SUFFIXES = (".inter", ".csv", ".tsv", ".txt", ".json", ".jsonl")


def data_file(path: str) -> str:
    """--data: a file, or a folder that holds exactly one data file (compressed with .gz or not)."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.removesuffix(".gz").endswith(DATA_SUFFIXES))
        if len(found) != 1:
            raise ValueError(f"--data: expected exactly one data file ({', '.join(DATA_SUFFIXES)}, optionally "
                             f".gz) in the folder {path}, found {found}")
        path = os.path.join(path, found[0])
    if not os.path.exists(path):
        raise ValueError(f"--data: {path} does not exist")
    return path


# ----------------------------------------------------------------------------------------------
# Preparation: time order, 5-core, id maps, leave-one-out split
# ----------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    """Every user's items, oldest first, in one flat array: user u's are items[offsets[u]:offsets[u + 1]].
    Memory grows with interactions (4 bytes each), never with users x history."""
    items: np.ndarray                # (N,) int32 item ids
    offsets: np.ndarray              # (U + 1,) int64
    user_raw: list                   # raw user id of each user
    item_raw: list                   # raw item id of each item

    @classmethod
    def from_sequences(cls, sequences: list, user_raw: list, item_raw: list) -> "Dataset":
        lengths = np.array([len(s) for s in sequences], np.int64)
        items = np.concatenate([np.asarray(s, np.int32) for s in sequences]) if sequences else np.zeros(0, np.int32)
        return cls(items, np.concatenate([[0], np.cumsum(lengths)]), list(user_raw), list(item_raw))

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def sequences(self) -> list:
        """Per user, a view of their items (for small data and tests; the data path uses the flat array)."""
        return np.split(self.items, self.offsets[1:-1]) if len(self.user_raw) else []


def _numeric_key(raw_id: str) -> tuple:
    return int(raw_id), raw_id           # "7" before "07": equal numbers never tie on hash order


def sort_key(raw_ids):
    """The order of item and user ids: numeric when every id is an integer, else by string."""
    return _numeric_key if all(re.fullmatch(r"-?\d+", u) for u in raw_ids) else str


def _codes(raw_ids) -> tuple[np.ndarray, list]:
    """Raw ids per interaction -> (int64 code per interaction, the distinct ids in sorted order)."""
    names = set(raw_ids)
    names = sorted(names, key=sort_key(names))
    code = {name: k for k, name in enumerate(names)}
    return np.fromiter(map(code.__getitem__, raw_ids), np.int64, len(raw_ids)), names


def _renumber(codes: np.ndarray, names: list) -> tuple[np.ndarray, list]:
    """Keep the ids that occur in `codes`, numbered 0.. in their own sorted order (numeric only
    if all of the kept ones are integers, as for a file holding just them)."""
    kept, codes = np.unique(codes, return_inverse=True)
    raw = [names[k] for k in kept]
    key = sort_key(raw)
    if key is sort_key(names):
        return codes, raw
    order = sorted(range(len(raw)), key=lambda k: key(raw[k]))
    rank = np.empty(len(raw), np.int64)
    rank[order] = np.arange(len(raw))
    return rank[codes], [raw[k] for k in order]


def prepare(raw: RawData, five_core: bool = True) -> Dataset:
    """Stable time sort per user, k-core filtering until nothing changes, contiguous ids (sorted
    raw-id order). Works on integer codes: no Python loop over interactions."""
    if not len(raw.users):
        raise ValueError(f"{raw.path or 'dataset'}: no interactions")
    uid, user_names = _codes(raw.users)
    iid, item_names = _codes(raw.items)
    times = np.asarray(raw.times)                      # int64 (exact) or float64
    keep = np.ones(len(uid), bool)
    if five_core and not raw.time_ordered:
        while True:
            u_cnt = np.bincount(uid[keep], minlength=len(user_names))
            i_cnt = np.bincount(iid[keep], minlength=len(item_names))
            ok = (u_cnt[uid[keep]] >= 5) & (i_cnt[iid[keep]] >= 5)
            if ok.all():
                break
            keep[np.flatnonzero(keep)[~ok]] = False
    if not keep.any():
        raise ValueError(f"{raw.path or 'dataset'}: empty after 5-core filtering (every user or item had fewer "
                         "than 5 interactions)")
    (uid, user_raw), (iid, item_raw) = _renumber(uid[keep], user_names), _renumber(iid[keep], item_names)
    times = times[keep]
    # stable: equal timestamps keep file order (the protocol), never an item-id tie-break
    order = np.lexsort((np.arange(len(uid)), times, uid))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(uid, minlength=len(user_raw)))])
    return Dataset(iid[order].astype(np.int32), offsets, user_raw, item_raw)


@dataclass
class Split:
    """Examples as positions in the dataset's flat item array. A window (the last max_history items
    before the target) is cut only when a batch is made, so memory is 24 bytes per example."""
    items: np.ndarray                # (N,) the dataset's flat item ids (shared, not copied)
    start: np.ndarray                # (E,) where the example's user begins in `items`
    pos: np.ndarray                  # (E,) the target's position in `items`; history = items[start:pos][-H:]
    user: np.ndarray                 # (E,) user index
    max_history: int

    @classmethod
    def from_windows(cls, history: np.ndarray, target: np.ndarray, user: np.ndarray) -> "Split":
        """From explicit (E, H) histories (left-padded with -1) and targets, e.g. a request's."""
        history, target = np.asarray(history, np.int64), np.asarray(target, np.int64)
        real = history >= 0
        lengths = real.sum(1)
        rows = np.concatenate([history, target[:, None]], 1)
        keep = np.concatenate([real, np.ones((len(target), 1), bool)], 1)
        start = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64) if len(target) else np.zeros(0, np.int64)
        return cls(rows[keep].astype(np.int64), start, start + lengths, np.asarray(user, np.int64), history.shape[1])

    @property
    def target(self) -> np.ndarray:
        return self.items[self.pos].astype(np.int64)

    def lengths(self) -> np.ndarray:
        """(E,) real (non-padding) history items of each example."""
        return np.minimum(self.pos - self.start, self.max_history)

    def windows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), max_history) item ids before each target, oldest first, left-padded with -1."""
        idx = self.pos[rows, None] - self.max_history + np.arange(self.max_history)[None, :]
        real = idx >= self.start[rows, None]
        return np.where(real, self.items[np.maximum(idx, 0)], -1).astype(np.int64)

    @property
    def history(self) -> np.ndarray:
        """Every window at once, (E, max_history): for small data and tests only."""
        return self.windows(np.arange(len(self.pos)))


def ragged_arange(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated: ragged_arange([2, 0, 3]) = [0, 1, 0, 1, 2]."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


EVAL_SAMPLE_SEED = 0   # --eval_users: the sample depends on the data alone, not on --seed


def sample_users(splits: dict, n_users: int) -> dict:
    """--eval_users: validation and test restricted to a fixed random sample of users (in user order)."""
    users = np.sort(np.random.default_rng(EVAL_SAMPLE_SEED).choice(len(splits["valid"].pos), n_users, replace=False))
    pick = lambda sp: Split(sp.items, sp.start[users], sp.pos[users], sp.user[users], sp.max_history)
    return {"train": splits["train"], "valid": pick(splits["valid"]), "test": pick(splits["test"])}


def leave_one_out(data: Dataset, max_history: int) -> dict:
    """train: every position 1..n-3; valid: position n-2; test: position n-1 (per user)."""
    lengths = data.lengths
    short = np.flatnonzero(lengths < 3)
    if len(short):
        raise ValueError(f"user {data.user_raw[short[0]]!r}: expected at least 3 interactions for "
                         f"leave-one-out, got {lengths[short[0]]}")
    users = np.arange(len(lengths))
    split = lambda pos: Split(data.items, data.offsets[:-1], pos, users, max_history)
    return {"train": train_split(data.offsets, data.items, max_history), "valid": split(data.offsets[1:] - 2),
            "test": split(data.offsets[1:] - 1)}


def train_split(offsets: np.ndarray, items: np.ndarray, max_history: int) -> Split:
    """The training targets: positions 1 .. n-3 of each user's items (0-based, n = their count), so
    never the validation (n-2) or the test (n-1) item."""
    n_train = np.maximum(np.diff(offsets) - 3, 0)
    user = np.repeat(np.arange(len(n_train)), n_train)
    start = offsets[:-1][user]
    return Split(items, start, start + 1 + ragged_arange(n_train), user, max_history)



def extend_catalogue(data: Dataset, known: list) -> tuple[Dataset, np.ndarray]:
    """Renumber items so that `known` (a trained run's items, in its id order) keep their ids and the
    data's other items follow in sorted order. Known items absent from the data stay in the catalogue.
    Returns the dataset and, per new item, its row in the data's own sorted order (the row an
    embeddings file for this data has for it)."""
    known_set = set(known)
    new = [i for i in data.item_raw if i not in known_set]
    row_of = {item: k for k, item in enumerate(data.item_raw)}
    item_raw = list(known) + new
    new_id = {item: k for k, item in enumerate(item_raw)}
    remap = np.array([new_id[i] for i in data.item_raw], np.int64)
    return (Dataset(remap[data.items].astype(np.int32), data.offsets, data.user_raw, item_raw),
            np.array([row_of[i] for i in new], np.int64))


