"""The run folder as a store: what train.py writes and recommend.py reads (and extends with new
items), checked at every step.

    folder = RunFolder(out_dir)
    folder.publish({"checkpoint.pt": blob, ...})     # one step: every file, then run.json commits them
    folder.verify(needs=("checkpoint.pt",))          # every listed file matches its size and sha256
    run = load_run(out_dir)                          # a finished run: model, SIDs, id maps, sequences

A run folder holds config.json, the SID index (item_id2tokens.npy, tokens2item.pkl, opq.npz),
data.npz (id maps, titles, sequences), checkpoint.pt (the best weights), last.pt (to resume),
results.json (with the ranker's weight chosen on validation; eval.json for --eval_only),
curves.svg, and run.json, which
lists them all with their sha256 and the fingerprint of the training data. Readers trust run.json
and nothing else; a killed step leaves the state before it or after it. Checkpoints load with
weights_only=True: a crafted pickle is refused, never run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

import cli
import sid
from dataset import Dataset, train_split, unique_keys
from embeddings import read_item_emb
from evaluate import Transitions
from rpg_ed import RPG_ED, RPGEDConfig

# ----------------------------------------------------------------------------------------------
# The run folder: one state, published by its manifest (run.json)
# ----------------------------------------------------------------------------------------------

MANIFEST = "run.json"
PENDING = ".pending-"
# every file a run folder may hold besides run.json
RUN_FILES = ("config.json", "item_id2tokens.npy", "tokens2item.pkl", "opq.npz", "data.npz", "checkpoint.pt",
             "last.pt", "results.json", "curves.svg", "eval.json")


def file_digest(path: str) -> tuple:
    """(size, sha256 hex) of a file's bytes, read in blocks; (None, None) when it is not a file."""
    if not os.path.isfile(path):
        return None, None
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class RunFolder:
    """A run folder as one state. run.json lists every file of the run with its size and sha256,
    and the fingerprint of the data the run was trained on; readers trust it and nothing else.

    A step (the start of a run, an epoch's checkpoints, the results, new items) writes its files
    beside the old ones as .pending-NAME, then publishes them by writing run.json (one atomic
    rename: the commit point), then renames each .pending-NAME over NAME. A kill before the commit
    leaves the old state, a kill after it the new one: recover() removes or finishes what it left.
    """

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def manifest(self) -> dict | None:
        """run.json, checked; None when there is none."""
        path = self.file(MANIFEST)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f, object_pairs_hook=unique_keys)
            if manifest["version"] != 1 or not all(set(e) == {"size", "sha256"} for e in manifest["files"].values()):
                raise ValueError("unknown layout")
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise ValueError(f"{path}: not a run manifest ({type(e).__name__}: {e})") from None
        return manifest

    def recover(self) -> dict | None:
        """Finish (after the commit) or undo (before it) a step that a kill interrupted, and remove
        temporary files; return the manifest (None: no run here)."""
        if not os.path.isdir(self.path):
            return None
        manifest = self.manifest()
        entries = manifest["files"] if manifest else {}
        for name in sorted(os.listdir(self.path)):
            if name.startswith(".tmp-") and name[5:].startswith((PENDING, MANIFEST) + RUN_FILES):
                os.remove(self.file(name))                                    # a write cut before its rename
            elif name.startswith(PENDING):
                target = name[len(PENDING):]
                entry = entries.get(target)
                if entry and file_digest(self.file(name)) == (entry["size"], entry["sha256"]):
                    os.replace(self.file(name), self.file(target))              # committed: roll forward
                else:
                    os.remove(self.file(name))                                # not committed: roll back
        return manifest

    def verify(self, needs: tuple = ()) -> dict:
        """The manifest, once every file it lists matches its size and sha256; `needs`: files the
        caller reads, which the manifest must list. Reads only (see recover)."""
        manifest = self.manifest()
        if manifest is None:
            raise ValueError(f"{self.path}: not a run folder (no {MANIFEST}; train.py writes it)")
        missing = [n for n in needs if n not in manifest["files"]]
        if missing:
            raise ValueError(f"{self.path}: the run has no {', '.join(missing)} yet (unfinished, or killed "
                             "before its first epoch ended)")
        for name, entry in manifest["files"].items():
            size, digest = file_digest(self.file(name))
            if (size, digest) != (entry["size"], entry["sha256"]):
                found = "missing" if size is None else f"{size} bytes, sha256 {digest[:12]}"
                raise ValueError(f"{self.file(name)}: does not match {MANIFEST} (expected {entry['size']} bytes, "
                                 f"sha256 {entry['sha256'][:12]}; found {found}); the file was edited, swapped or "
                                 "comes from another run")
        return manifest

    def publish(self, files: dict, data: dict | None = None, keep: bool = True) -> None:
        """One step: `files` {name: bytes} join (or replace) the run's files, then run.json commits
        them. keep=False starts a new state: files of the old manifest not in `files` leave it."""
        os.makedirs(self.path, exist_ok=True)
        old = self.manifest() or {"files": {}, "data": None}
        entries = dict(old["files"]) if keep else {}
        for name, blob in files.items():
            cli.atomic_write(self.file(PENDING + name), blob)
            entries[name] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        manifest = {"version": 1, "files": entries, "data": data if data is not None else old["data"]}
        cli.atomic_write(self.file(MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        for name in files:
            os.replace(self.file(PENDING + name), self.file(name))
        for name in (set(old["files"]) | set(RUN_FILES)) - set(entries):   # files of the state replaced
            if os.path.exists(self.file(name)) and (not keep or name in old["files"]):
                os.remove(self.file(name))


def check_out_dir(out_dir: str, cfg, resolved: dict, fingerprint: dict, may_change: tuple) -> str:
    """Everything about out_dir that can fail, checked before anything is written (cfg: resume,
    eval_only and overwrite, as in train.TrainConfig; may_change: the training settings that do
    not make another run). Returns what the run will do there: "new", "restart" (an unfinished
    attempt of this same run), "resume" or "eval"."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir: {out_dir} exists and is not a folder")
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
        raise ValueError(f"--out_dir: {out_dir} cannot be written ({parent} is not a writable folder)")
    folder = RunFolder(out_dir)
    manifest = folder.manifest()
    if cfg.resume or cfg.eval_only:
        flag, needs = ("--resume", ("last.pt",)) if cfg.resume else ("--eval_only", ("checkpoint.pt",))
        if manifest is None:
            raise ValueError(f"{flag}: {out_dir} holds no run ({MANIFEST} is missing)")
        folder.verify(needs)
        check_fingerprint(manifest["data"], fingerprint, flag)
        return "resume" if cfg.resume else "eval"
    found = [f for f in RUN_FILES if os.path.exists(folder.file(f))]
    if manifest is None and not found or cfg.overwrite:
        return "new"
    same = manifest is not None and "results.json" not in manifest["files"] and same_data(manifest["data"], fingerprint) \
        and _settings(_read_json_or_none(folder.file("config.json")), may_change) \
        == _settings(json.loads(json.dumps(resolved)), may_change)
    if same:
        return "restart"
    raise ValueError(f"--out_dir: {out_dir} holds another run ({', '.join(found) or MANIFEST}); continue it with "
                     "--resume=true, evaluate it with --eval_only=true, replace it with --overwrite=true, "
                     "or choose another --out_dir")


def _settings(resolved: dict | None, may_change: tuple) -> dict | None:
    """What makes two runs the same run: the config without the flags that a resume may change."""
    if not isinstance(resolved, dict) or "train" not in resolved:
        return None
    return {**resolved, "train": {k: v for k, v in resolved["train"].items()
                                  if k not in may_change + ("overwrite",)}}


def _read_json_or_none(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def same_data(recorded: dict | None, now: dict) -> bool:
    """The same bytes (size and sha256); the path may differ, the file may have moved."""
    return all((recorded or {}).get(k) == now[k] for k in ("size", "sha256"))


def check_fingerprint(recorded: dict | None, now: dict, flag: str) -> None:
    """Refuse to continue or evaluate a run on other data than it was trained on."""
    if not same_data(recorded, now):
        changed = [k for k in ("path", "size", "sha256") if (recorded or {}).get(k) != now.get(k)]
        raise ValueError(f"{flag}: the run was trained on {recorded}, this data is {now} ({', '.join(changed)} "
                         "changed); train a new run on this data, or pass the data the run was trained on")


def check_sizes(mcfg: RPGEDConfig, n_items: int, beam_sizes: dict, batch_size: int) -> None:
    """Memory bounds known before a model is built: beams ({flag: beams}, batch_size users a batch)
    against the catalogue and RAM, parameters (to train them) against RAM."""
    widest = max(100, n_items)                     # a beam wider than the catalogue finds nothing more
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for flag, beams in beam_sizes.items():
        # per beam row: candidate scores over a digit's codes, and the decoder's self-attention cache
        need = batch_size * beams * 4 * (3 * mcfg.codebook_size + 2 * mcfg.decoder_n_layer *
                                                  (mcfg.n_digit + 1) * mcfg.n_embd)
        if beams > widest or need > ram / 2:
            raise ValueError(f"{flag}: expected at most {widest} (the catalogue has {n_items} items) and a beam "
                             f"search that fits in memory ({need / 2 ** 30:.1f} GiB of {ram / 2 ** 30:.1f}), got {beams}")
    with torch.device("meta"):                     # shapes only: nothing is allocated
        n_params = RPG_ED(mcfg).num_parameters()
    need = 16 * n_params                           # fp32 weights, gradients and AdamW's two moments
    if need > ram:
        raise ValueError(f"model: {n_params:,} parameters need about {need / 2 ** 30:.1f} GiB to train, this "
                         f"machine has {ram / 2 ** 30:.1f} GiB; lower --n_user_buckets, --n_embd or the layers")


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

CHECKPOINT_VERSION = 3       # checkpoints of another version are refused, not misread


def checkpoint_bytes(state: dict) -> bytes:
    """torch.save's bytes of a checkpoint (published by RunFolder, never written in place)."""
    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    return buf.getvalue()


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Tensors and plain containers only (weights_only=True): a crafted pickle is refused, never run."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no checkpoint there")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one loses its directory
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt (expected the zip "
                         "archive torch.save writes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refusing to load: it holds something other than tensors and plain "
                         f"containers ({str(e).splitlines()[-1][:200]})") from None
    except Exception as e:  # truncated or corrupt: RuntimeError from the zip reader, EOFError, ...
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    version = state.get("version") if isinstance(state, dict) else None
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {version}, this code reads version {CHECKPOINT_VERSION}")
    return state


def sids_digest(index: sid.SIDIndex, n_items: int | None = None) -> str:
    """sha256 of the first n_items SIDs (default all): items added after training keep it intact."""
    return hashlib.sha256(index.item_codes[:n_items].tobytes()).hexdigest()


def check_checkpoint(state: dict, path: str, resolved: dict, digest: str, may_change: tuple | None = None) -> None:
    """Refuse a checkpoint made for another model config, other SIDs, or (to resume: may_change,
    the training settings a resume may change) other training settings."""
    saved = state["config"]
    diffs = [(f"model.{k}", saved["model"].get(k), v) for k, v in resolved["model"].items()
             if saved["model"].get(k) != v]
    if may_change is not None:
        diffs += [(f"train.{k}", saved["train"].get(k), v) for k, v in resolved["train"].items()
                  if k not in may_change and saved["train"].get(k) != v]
    if diffs:
        raise ValueError(f"{path}: made with another config: " +
                         "; ".join(f"{k} is {a!r} there, {b!r} here" for k, a, b in diffs))
    if state["sids_sha256"] != digest:
        raise ValueError(f"{path}: made with other SIDs than the index on disk (sha256 {state['sids_sha256'][:12]}, "
                         f"index {digest[:12]}); rebuild the index or train again")


def resume(model: RPG_ED, optimizer: torch.optim.Optimizer, run, progress: dict, may_change: tuple) -> dict:
    """--resume: load the run's last.pt into the model and optimizer, restore this process's RNG;
    return the progress record (its keys: those of `progress`). `run`: train.py's Run."""
    path = run.path("last.pt")
    state = load_checkpoint(path, run.dist.device)
    check_checkpoint(state, path, run.resolved, sids_digest(run.index), may_change)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    progress = {k: state[k] for k in progress}
    if len(state["rng"]) == run.dist.world:
        torch.set_rng_state(state["rng"][run.dist.rank]["cpu"])
        if run.dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"][run.dist.rank]["cuda"], run.dist.device)
    else:
        torch.manual_seed(run.cfg.seed + run.dist.rank + 1_000_003 * progress["step"])
        run.log(f"note: the checkpoint comes from {len(state['rng'])} processes, this run has {run.dist.world}; "
                "dropout is re-seeded, so the run will not match an uninterrupted one exactly")
    run.log(f"resumed from {path}: epoch {progress['epoch']}, step {progress['step']}")
    return progress


# ----------------------------------------------------------------------------------------------
# data.npz: what using a run needs beside the model and the SIDs
# ----------------------------------------------------------------------------------------------

TITLE_CHARS = 120   # item text kept per item in data.npz, for recommend.py to show


def run_data_bytes(data: Dataset, item_text: dict, content_sids: bool) -> bytes:
    """data.npz: what using a run needs beside the model and the SIDs (read_run_data reads it
    with allow_pickle=False): raw item and user ids in id order, the start of each item's text
    ("" without text), every user's sequence as one flat int32 array with offsets, and whether
    the SIDs came from an embeddings file alone (then new items can be placed by theirs)."""
    buf = io.BytesIO()
    np.savez(buf, version=1, item_raw=np.array(data.item_raw, dtype=str), user_raw=np.array(data.user_raw, dtype=str),
             item_title=np.array([" ".join(item_text.get(i, "").split())[:TITLE_CHARS] for i in data.item_raw],
                                 dtype=str),
             offsets=data.offsets, items=data.items,
             content_sids=np.array(content_sids))
    return buf.getvalue()


RUN_DATA_KEYS = ("item_raw", "user_raw", "item_title", "offsets", "items", "content_sids")


def read_run_data(folder: str) -> dict:
    """A run folder's data.npz -> {name: array}, refusing pickled objects and disagreeing lengths."""
    path = os.path.join(folder, "data.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:   # missing, truncated, or holding pickled objects
        raise ValueError(f"{path}: not a readable run data file ({type(e).__name__}: {str(e)[:200]})") from None
    missing = [k for k in RUN_DATA_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: expected the arrays {list(RUN_DATA_KEYS)}, missing {missing}")
    if len(arrays["item_title"]) != len(arrays["item_raw"]) or len(arrays["offsets"]) != len(arrays["user_raw"]) + 1 \
            or arrays["offsets"][-1] != len(arrays["items"]):
        raise ValueError(f"{path}: its arrays disagree in length (item ids, titles, users, offsets, sequences)")
    return arrays


# ----------------------------------------------------------------------------------------------
# A finished run, read back from its folder (recommend.py and --init_from)
# ----------------------------------------------------------------------------------------------

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
    transition_weight: float         # the ranker's weight, chosen on validation (results.json; 0 without it)

    def __post_init__(self):
        self.item_id = {raw: i for i, raw in enumerate(self.item_raw.tolist())}
        self.user_id = {raw: u for u, raw in enumerate(self.user_raw.tolist())}
        self.transitions = Transitions.fit(train_split(self.offsets, self.items, 1), self.index.n_items)

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


def load_run(folder: str, device: str | torch.device = "cpu", recover: bool = True) -> TrainedRun:
    """A run folder -> TrainedRun: the model with the best weights, its SIDs and id maps, from the
    files run.json lists, each checked against it. A missing file, or files that disagree, give a
    ValueError naming them. recover=False reads only (another process recovers the folder)."""
    if recover:
        RunFolder(folder).recover()
    manifest = RunFolder(folder).verify(needs=("config.json", "checkpoint.pt", "item_id2tokens.npy", "tokens2item.pkl",
                                               "data.npz"))
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f, object_pairs_hook=unique_keys)
        mcfg = RPGEDConfig(**config["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}/config.json: not a run config ({type(e).__name__}: {e})") from None
    index = sid.SIDIndex.load(folder)
    data = read_run_data(folder)
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
    state = load_checkpoint(path)
    trained_items = state.get("sids_items", index.n_items)             # items added later keep the digest
    if trained_items > index.n_items:
        raise ValueError(f"{path}: trained on {trained_items} items, the index has only {index.n_items}")
    check_checkpoint(state, path, config, sids_digest(index, trained_items))
    model = RPG_ED(mcfg)
    model.load_state_dict(state["model"])
    return TrainedRun(folder, config, model.to(device).eval(), index, data["item_raw"], data["item_title"],
                      data["user_raw"], data["offsets"], data["items"], bool(data["content_sids"]), trained_items,
                      chosen_weight(folder) if "results.json" in manifest["files"] else 0.0)


def chosen_weight(folder: str) -> float:
    """The transition ranker's weight that training chose on validation, from results.json."""
    path = os.path.join(folder, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            weight = json.load(f, object_pairs_hook=unique_keys).get("transitions", {}).get("weight", 0.0)
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a results file ({type(e).__name__}: {e})") from None
    if type(weight) not in (int, float) or not 0 <= weight < float("inf"):
        raise ValueError(f"{path}: transitions.weight: expected a number >= 0, got {weight!r}")
    return float(weight)


def load_index(out_dir: str, n_items: int) -> sid.SIDIndex:
    """The SIDs of out_dir, after run.json vouches for every file (rank 0 recovered the folder first)."""
    RunFolder(out_dir).verify(needs=("item_id2tokens.npy", "tokens2item.pkl"))
    index = sid.SIDIndex.load(out_dir)
    if index.n_items != n_items:
        raise ValueError(f"{out_dir}: the index has {index.n_items} items, the data has {n_items}")
    return index


def extend_index(base: TrainedRun, item_emb: str, n_own: int, new_rows: np.ndarray) -> tuple[sid.SIDIndex, int]:
    """--init_from: the base run's index with the data's new items added (old items keep their SIDs)."""
    if len(new_rows) == 0:
        return base.index, 0
    if not base.content_sids:
        raise ValueError(f"--init_from: this data has {len(new_rows)} items that {base.folder} does not know; "
                         "placing them needs a run whose SIDs came from an embeddings file alone (--item_emb, "
                         "not --emb_source=both), and that run's SIDs did not")
    if not item_emb:
        raise ValueError(f"--init_from: this data has {len(new_rows)} new items; give their embeddings with "
                         "--item_emb (rows in this data's sorted item order), the same kind the run used")
    return base.index.add_items(read_item_emb(item_emb, n_own)[new_rows])
