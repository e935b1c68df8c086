"""The run folder as a store: what train.py writes and recommend.py reads (and extends with new
items), checked at every step. Its anchors are git's and SQLite's: one writer holds a lock,
readers never write, names are never paths, a crash leaves the last committed state.

    folder = RunFolder(out_dir)
    with folder.lock():                              # the one writer (an OS lock on the folder)
        folder.recover(inputs)                       # finish or undo a killed writer's step
        folder.publish({"checkpoint.pt": blob})      # one step: every file, then run.json commits them
    manifest, blobs = folder.read(("checkpoint.pt",))    # a reader: each file once, checked, in memory
    run = load_run(out_dir)                          # a finished run: model, SIDs, id maps, sequences

A run folder holds config.json, the SID index (item_id2tokens.npy, tokens2item.pkl, opq.npz),
data.npz (id maps, titles, sequences), checkpoint.pt (the best weights), last.pt (to resume),
results.json (with the ranker's weight chosen on validation; eval.json for --eval_only),
curves.svg, and run.json, which lists them all with their sha256 and the fingerprint of the
training data. Readers trust run.json and nothing else, and parse the bytes they checked.
Checkpoints load with weights_only=True: a crafted pickle is refused, never run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

import cli
import sid
from dataset import Dataset, check_ids, train_split, unique_keys
from embeddings import read_item_emb
from evaluate import EVAL_BATCH_SIZE, Transitions
from opq import read_npz
from rpg_ed import RPG_ED, RPGEDConfig

# ----------------------------------------------------------------------------------------------
# The run folder: one state, published by its manifest (run.json)
# ----------------------------------------------------------------------------------------------

MANIFEST = "run.json"
PENDING = ".pending-"
# every file a run folder may hold besides run.json: the only names run.json may list
RUN_FILES = ("config.json", "item_id2tokens.npy", "tokens2item.pkl", "opq.npz", "data.npz", "checkpoint.pt",
             "last.pt", "results.json", "curves.svg", "eval.json")
TEXT_FILES = ("config.json", "results.json", "eval.json", "curves.svg")
TEXT_LIMIT = 64 << 20          # bytes of a text file of a run (run.json: 1 MiB); others: half the memory limit
SHA256 = re.compile(r"[0-9a-f]{64}")


def size_limit(name: str) -> int:
    return 1 << 20 if name == MANIFEST else TEXT_LIMIT if name in TEXT_FILES else cli.memory_limit() // 2


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class RunFolder:
    """A run folder as one state. run.json lists every file of the run with its size and sha256,
    and the fingerprint of the data the run was trained on; readers trust it and nothing else.

    One writer at a time: a command that writes holds `lock()` (cli.exclusive) for all its run, and
    only it recovers (before its first write) and publishes. A step (the start of a run, an epoch's checkpoints, the
    results, new items) writes its files beside the old ones as .pending-NAME, then publishes them
    by writing run.json (one atomic rename: the commit point), then renames each .pending-NAME over
    NAME. A kill before the commit leaves the old state, a kill after it the new one, which the
    next writer's recover() finishes. Readers take no lock and write nothing: read() gives the
    state before a publish or after it (see there).
    """

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def lock(self, flag: str = "--out_dir"):
        """The one writer's lock on the folder (cli.exclusive) while the block runs."""
        return cli.exclusive(self.path, flag)

    def manifest(self) -> dict | None:
        """run.json, read once and checked: it lists only names of RUN_FILES, each with its size and
        sha256, and the data's fingerprint; None when there is none."""
        path = self.file(MANIFEST)
        try:
            blob = cli.read_regular(path, size_limit(MANIFEST))
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(blob, object_pairs_hook=unique_keys)
            if not (isinstance(manifest, dict) and set(manifest) == {"version", "files", "data"}
                    and manifest["version"] == 1 and isinstance(manifest["files"], dict)):
                raise ValueError("expected {\"version\": 1, \"files\": {...}, \"data\": ...}")
            for name, entry in manifest["files"].items():
                if name not in RUN_FILES:
                    raise ValueError(f"it lists {name!r}; a run's files are {', '.join(RUN_FILES)}")
                if not (isinstance(entry, dict) and set(entry) == {"size", "sha256"} and type(entry["size"]) is int
                        and entry["size"] >= 0 and isinstance(entry["sha256"], str) and SHA256.fullmatch(entry["sha256"])):
                    raise ValueError(f"{name}: expected {{\"size\": bytes, \"sha256\": 64 hex digits}}, got {entry!r:.80}")
            data = manifest["data"]
            if data is not None and not (isinstance(data, dict) and set(data) == {"path", "size", "sha256"}
                                         and isinstance(data["path"], str) and "\0" not in data["path"]
                                         and type(data["size"]) is int and isinstance(data["sha256"], str)
                                         and SHA256.fullmatch(data["sha256"])):
                raise ValueError(f"data: expected null or {{\"path\", \"size\", \"sha256\"}}, got {data!r:.80}")
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not a run manifest ({e}); nothing in this folder is trusted or touched: "
                             "move the folder away, or remove its run.json") from None
        return manifest

    def read(self, needs: tuple, optional: tuple = ()) -> tuple[dict, dict]:
        """(run.json, {name: bytes}) of the files `needs` (run.json must list them) and of those in
        `optional` it lists. Each file is read once and its bytes are checked against run.json: the
        bytes a caller parses are the bytes checked. Reads only. A publish meanwhile (a new run.json,
        a file renamed) makes it read again, so the result is the state before or after it."""
        for attempt in range(50):
            manifest = self.manifest()
            if manifest is None:
                raise ValueError(f"{self.path}: not a run folder (no {MANIFEST}; train.py writes it)")
            missing = [n for n in needs if n not in manifest["files"]]
            if missing:
                raise ValueError(f"{self.path}: the run has no {', '.join(missing)} yet (unfinished, or killed "
                                 "before its first epoch ended)")
            names = tuple(needs) + tuple(n for n in optional if n in manifest["files"])
            blobs = {name: self._read_listed(name, manifest["files"][name]) for name in names}
            wrong = next((name for name in names if blobs[name] is None), None)
            if wrong is None:
                return manifest, blobs
            if self.manifest() == manifest:             # no publish in between: the file itself is wrong
                entry = manifest["files"][wrong]
                raise ValueError(f"{self.file(wrong)}: does not match {MANIFEST} (expected {entry['size']} bytes, "
                                 f"sha256 {entry['sha256'][:12]}); the file was edited, swapped or comes from "
                                 "another run")
            time.sleep(0.01 * attempt)
        raise ValueError(f"{self.path}: its files changed under each of {attempt + 1} reads")

    def _read_listed(self, name: str, entry: dict) -> bytes | None:
        """NAME's bytes when they match its entry; else those of .pending-NAME (published, not yet
        renamed), else of NAME again (renamed meanwhile); None when none matches."""
        if entry["size"] > size_limit(name):
            raise ValueError(f"{self.file(MANIFEST)}: lists {name} of {entry['size']:,} bytes, more than this "
                             f"process may read ({size_limit(name):,})")
        for candidate in (name, PENDING + name, name):
            try:
                blob = cli.read_regular(self.file(candidate), size_limit(name))
            except FileNotFoundError:
                continue
            if len(blob) == entry["size"] and sha256(blob) == entry["sha256"]:
                return blob
        return None

    def _writer(self) -> None:
        if not cli.holds_lock(self.path):
            raise RuntimeError(f"{self.path}: written without its lock (RunFolder.lock)")

    def recover(self, inputs: dict) -> dict | None:
        """The writer, under its lock, before its first write: finish (after the commit) or undo
        (before it) a step that a killed writer left, and remove that writer's temporary files
        (only writers make names .tmp-.pending-* and .tmp-run.json*, and this one holds the lock),
        never one of `inputs` ({flag: path}, cli.check_outputs); return the manifest."""
        self._writer()
        manifest = self.manifest()
        entries = manifest["files"] if manifest else {}
        names = sorted(n for n in os.listdir(self.path) if n.startswith((".tmp-" + PENDING, ".tmp-" + MANIFEST))
                       or n.startswith(PENDING) and n[len(PENDING):] in RUN_FILES)
        cli.check_outputs([self.file(name) for name in names], inputs)
        for name in names:
            path = self.file(name)
            if name.startswith(".tmp-"):
                os.remove(path)                                               # a write cut before its rename
            else:
                target = name[len(PENDING):]
                blob, entry = cli.read_regular(path, size_limit(target)), entries.get(target)
                if entry and (len(blob), sha256(blob)) == (entry["size"], entry["sha256"]):
                    os.replace(path, self.file(target))                      # committed: roll forward
                else:
                    os.remove(path)                                           # not committed: roll back
        return manifest

    def publish(self, files: dict, data: dict | None = None, keep: bool = True) -> None:
        """The writer, under its lock: one step. `files` {name: bytes} join (or replace) the run's
        files, then run.json commits them. keep=False starts a new state: files of the old manifest
        not in `files` leave it. Free disk is checked first; a failed write names its path."""
        self._writer()
        old = self.manifest() or {"files": {}, "data": None}
        need, free = sum(map(len, files.values())) + (1 << 20), shutil.disk_usage(self.path).free
        if free < need:
            raise ValueError(f"{self.path}: {need:,} bytes to write, {free:,} bytes free on its disk; nothing was "
                             "written, the folder holds its last published state")
        entries = dict(old["files"]) if keep else {}
        try:
            for name, blob in files.items():
                cli.atomic_write(self.file(PENDING + name), blob)
                entries[name] = {"size": len(blob), "sha256": sha256(blob)}
            manifest = {"version": 1, "files": entries, "data": data if data is not None else old["data"]}
            cli.atomic_write(self.file(MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        except OSError as e:
            raise ValueError(f"{e.filename or self.path}: {e.strerror}; nothing was published, {self.path} "
                             "holds its last published state") from None
        try:                                                              # committed: readers see the new state
            for name in files:
                os.replace(self.file(PENDING + name), self.file(name))
            for name in (set(old["files"]) | set(RUN_FILES)) - set(entries):   # files of the state replaced
                if os.path.isfile(self.file(name)) and not os.path.islink(self.file(name)) \
                        and (not keep or name in old["files"]):
                    os.remove(self.file(name))
        except OSError as e:
            raise ValueError(f"{e.filename or self.path}: {e.strerror}; the new state is published in {MANIFEST} "
                             "and the next writer there (this command again, or --resume=true) finishes it") from None


def check_out_dir(out_dir: str, cfg, resolved: dict, fingerprint: dict, may_change: tuple, inputs: dict) -> str:
    """Everything about out_dir that can fail, checked before anything is written (its writer holds
    the lock; under torchrun the other processes check too). cfg: resume, eval_only, overwrite
    and init_from, as in train.TrainConfig; may_change: the training settings that do not make
    another run; inputs: {flag: path} of the files the run reads, never replaced, --overwrite or not.
    Returns what the run will do there: "new", "restart" (an unfinished attempt of this same run),
    "resume" or "eval"."""
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out_dir: {out_dir} cannot be written (not a writable folder)")
    if os.path.isdir(cfg.data) and os.path.samefile(cfg.data, out_dir):     # its files would become "data files"
        raise ValueError(f"--out_dir: {out_dir} is the --data folder; choose another folder for the run")
    folder, base = RunFolder(out_dir), cfg.init_from
    inputs = {**inputs, **{f"--init_from ({n})": os.path.join(base, n) for n in (MANIFEST, *RUN_FILES) if base}}
    cli.check_outputs([folder.file(n) for n in (MANIFEST, *RUN_FILES)] +
                      [folder.file(PENDING + n) for n in RUN_FILES], inputs)
    manifest = folder.manifest()
    if cfg.resume or cfg.eval_only:
        flag, needs = ("--resume", ("last.pt",)) if cfg.resume else ("--eval_only", ("checkpoint.pt",))
        if manifest is None:
            raise ValueError(f"{flag}: {out_dir} holds no run ({MANIFEST} is missing)")
        folder.read(needs)
        check_fingerprint(manifest["data"], fingerprint, flag)
        return "resume" if cfg.resume else "eval"
    found = [f for f in RUN_FILES if os.path.lexists(folder.file(f))]
    if (manifest is None and not found) or cfg.overwrite:
        return "new"
    if manifest is not None and "results.json" not in manifest["files"] and same_data(manifest["data"], fingerprint) \
            and "config.json" in manifest["files"]:
        config = parse_json(folder.read(("config.json",))[1]["config.json"], folder.file("config.json"))
        if _settings(config, may_change) == _settings(json.loads(json.dumps(resolved)), may_change):
            return "restart"
    raise ValueError(f"--out_dir: {out_dir} holds another run ({', '.join(found) or MANIFEST}); continue it with "
                     "--resume=true, evaluate it with --eval_only=true, replace it with --overwrite=true, "
                     "or choose another --out_dir")


def _settings(resolved, may_change: tuple) -> dict | None:
    """What makes two runs the same run: the config without the flags that a resume may change."""
    if not isinstance(resolved, dict) or not isinstance(resolved.get("train"), dict):
        return None
    return {**resolved, "train": {k: v for k, v in resolved["train"].items()
                                  if k not in may_change + ("overwrite",)}}


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
    ram = cli.memory_limit()                       # RAM, or this process's lower limit
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
                         f"process may use {ram / 2 ** 30:.1f} GiB; lower --n_user_buckets, --n_embd or the layers")


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

CHECKPOINT_VERSION = 3       # checkpoints of another version are refused, not misread


def checkpoint_bytes(state: dict) -> bytes:
    """torch.save's bytes of a checkpoint (published by RunFolder, never written in place)."""
    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    return buf.getvalue()


def parse_json(blob: bytes, path: str):
    try:
        return json.loads(blob, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not readable JSON ({type(e).__name__}: {str(e)[:200]})") from None


# what a checkpoint of train.py holds (checkpoint.pt and last.pt alike), with the type of each
CHECKPOINT_KINDS = {"model": dict, "config": dict, "sids_sha256": str, "sids_items": int, "optimizer": dict,
                    "rng": list, "epoch": int, "step": int, "best": float, "best_epoch": int, "bad_evals": int,
                    "done": bool, "examples": int, "train_seconds": float, "valid_history": list, "loss_history": list}


def load_checkpoint(blob: bytes, path: str, needs: tuple = ("model", "config", "sids_sha256")) -> dict:
    """A checkpoint's bytes -> its dict, with the keys `needs` of the types this code writes.
    Tensors and plain containers only (weights_only=True): a crafted pickle is refused, never run."""
    if not zipfile.is_zipfile(io.BytesIO(blob)):  # torch.save writes a zip archive; a cut one loses its directory
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt (expected the zip "
                         "archive torch.save writes)")
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refusing to load: it holds something other than tensors and plain "
                         f"containers ({str(e).splitlines()[-1][:200]})") from None
    except Exception as e:  # truncated or corrupt: RuntimeError from the zip reader, EOFError, ...
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    version = state.get("version") if isinstance(state, dict) else None
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {version}, this code reads version {CHECKPOINT_VERSION}")
    kinds = CHECKPOINT_KINDS
    wrong = [k for k in needs if not isinstance(state.get(k), (kinds[k], int) if kinds[k] is float else kinds[k])]
    if "model" in needs and "model" not in wrong and not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        wrong.append("model")
    if "config" in needs and "config" not in wrong and not all(isinstance(state["config"].get(k), dict)
                                                               for k in ("train", "model")):
        wrong.append("config")
    for key in ("valid_history", "loss_history"):      # copied into results.json
        if key in needs and key not in wrong and not all(isinstance(r, dict) and all(
                isinstance(v, (int, float)) for v in r.values()) for r in state[key]):
            wrong.append(key)
    if wrong:
        raise ValueError(f"{path}: expected {', '.join(f'{k} ({kinds[k].__name__})' for k in wrong)}, got "
                         f"{', '.join(type(state.get(k)).__name__ if k in state else 'nothing' for k in wrong)}")
    return state


def load_weights(model: RPG_ED, state: dict, path: str) -> None:
    """The checkpoint's weights into `model`, once their names and shapes are the model's."""
    want = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    got = {str(k): (tuple(v.shape), v.dtype) for k, v in state["model"].items()}
    bad = next((k for k, v in state["model"].items() if not isinstance(k, str) or v.layout != torch.strided
                or v.device.type != "cpu" or v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{path}: weight {str(bad)!r}: expected a name, and a dense, finite tensor in memory")
    if want != got:
        key = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
        raise ValueError(f"{path}: its weights do not fit its config's model ({key}: shape and dtype "
                         f"{got.get(key, 'missing')} there, {want.get(key, 'no such weight')} in the model)")
    model.load_state_dict(state["model"])


def read_checkpoint(folder: str, name: str, resolved: dict, digest: str, may_change: tuple | None = None) -> dict:
    """A run's checkpoint (checkpoint.pt or last.pt), read once and checked against run.json, then
    for every key of CHECKPOINT_KINDS, then against the run's config and SIDs (check_checkpoint)."""
    path = os.path.join(folder, name)
    state = load_checkpoint(RunFolder(folder).read((name,))[1][name], path, tuple(CHECKPOINT_KINDS))
    check_checkpoint(state, path, resolved, digest, may_change)
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
    state = read_checkpoint(run.out_dir, "last.pt", run.resolved, sids_digest(run.index), may_change)
    load_weights(model, state, path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        if not all(s["exp_avg"].shape == p.shape for p, s in optimizer.state.items()):
            raise ValueError("moment shapes differ from the weights'")
        if len(state["rng"]) == run.dist.world:
            torch.set_rng_state(state["rng"][run.dist.rank]["cpu"])
            if run.dist.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"][run.dist.rank]["cuda"], run.dist.device)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: its optimizer or random state does not fit this run ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    progress = {k: state[k] for k in progress}
    if len(state["rng"]) != run.dist.world:
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


RUN_DATA_KEYS = ("version", "item_raw", "user_raw", "item_title", "offsets", "items", "content_sids")


def parse_run_data(blob: bytes, path: str, n_items: int) -> dict:
    """data.npz's bytes -> {name: array}, refusing pickled objects, and checked: ids unique and
    valid (dataset.check_ids), one title per item, offsets from 0 that rise (every user has an item) to the
    end of the sequences, item ids below n_items (the index's)."""
    try:
        arrays = read_npz(blob, path)               # no pickled objects, no member larger than the file
    except ValueError as e:
        raise ValueError(f"{path}: not a readable run data file ({e})") from None
    if sorted(arrays) != sorted(RUN_DATA_KEYS):
        raise ValueError(f"{path}: expected the arrays {list(RUN_DATA_KEYS)}, found {sorted(arrays)}")
    kinds = {"version": "iu", "item_raw": "U", "user_raw": "U", "item_title": "U", "offsets": "iu", "items": "iu",
             "content_sids": "b"}
    for key, kind in kinds.items():
        if arrays[key].dtype.kind not in kind or arrays[key].ndim != (0 if key in ("version", "content_sids") else 1):
            raise ValueError(f"{path}: {key}: expected a {'scalar' if key in ('version', 'content_sids') else '1-d'} "
                             f"array of kind {kind}, got {arrays[key].dtype} of shape {arrays[key].shape}")
    offsets, items = arrays["offsets"].astype(np.int64), arrays["items"].astype(np.int64)
    if int(arrays["version"]) != 1 or len(arrays["item_raw"]) != n_items or len(arrays["item_title"]) != n_items \
            or len(offsets) != len(arrays["user_raw"]) + 1 or offsets[0] != 0 or offsets[-1] != len(items) \
            or (np.diff(offsets) < 1).any() or (items.size and not 0 <= items.min() <= items.max() < n_items):
        raise ValueError(f"{path}: its arrays disagree (version 1; {n_items} item ids and titles, the index's "
                         "count; offsets from 0, rising (an item or more a user), to the end of the sequences; item ids below "
                         f"{n_items}); found {len(arrays['item_raw'])} ids, {len(arrays['item_title'])} titles, "
                         f"{len(offsets)} offsets for {len(arrays['user_raw'])} users")
    for kind in ("item", "user"):
        check_ids(arrays[f"{kind}_raw"], f"{path}: {kind}_raw", kind)
    return {**arrays, "offsets": offsets, "items": items.astype(np.int32)}


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


RUN_NEEDS = ("config.json", "checkpoint.pt", "item_id2tokens.npy", "tokens2item.pkl", "data.npz")


def load_run(folder: str, device: str | torch.device = "cpu") -> TrainedRun:
    """A run folder -> TrainedRun: the model with the best weights, its SIDs and id maps. Reads
    only: each file once (RunFolder.read), checked against run.json, then parsed from those bytes
    and checked again (types, shapes, ranges, sizes against memory). Errors are ValueErrors that
    name the file."""
    manifest, blobs = RunFolder(folder).read(RUN_NEEDS, optional=("opq.npz", "results.json"))
    path = lambda name: os.path.join(folder, name)
    config = parse_json(blobs["config.json"], path("config.json"))
    try:
        if not isinstance(config, dict) or not isinstance(config.get("train"), dict) \
                or not isinstance(config["train"].get("preset"), str):
            raise TypeError("expected {\"train\": {\"preset\": ..., ...}, \"model\": {...}}")
        mcfg = RPGEDConfig(**config["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path('config.json')}: not a run config ({type(e).__name__}: {e})") from None
    index = sid.SIDIndex.from_files(blobs, folder)
    data = parse_run_data(blobs["data.npz"], path("data.npz"), index.n_items)
    if (mcfg.n_digit, mcfg.codebook_size) != (index.item_codes.shape[1], sid.CODEBOOK_SIZE):
        raise ValueError(f"{folder}: the model has {mcfg.n_digit} digits of {mcfg.codebook_size} codes, the index "
                         f"{index.item_codes.shape[1]} of {sid.CODEBOOK_SIZE}")
    state = load_checkpoint(blobs["checkpoint.pt"], path("checkpoint.pt"))
    trained_items = state.get("sids_items", index.n_items)             # items added later keep the digest
    if type(trained_items) is not int or not 0 < trained_items <= index.n_items:
        raise ValueError(f"{path('checkpoint.pt')}: trained on {trained_items!r} items, the index has {index.n_items}")
    check_checkpoint(state, path("checkpoint.pt"), config, sids_digest(index, trained_items))
    if mcfg.encoder_n_layer + mcfg.decoder_n_layer > len(state["model"]):   # before building the model
        raise ValueError(f"{path('checkpoint.pt')}: {len(state['model'])} weights cannot hold the "
                         f"{mcfg.encoder_n_layer + mcfg.decoder_n_layer} layers of its config")
    check_sizes(mcfg, index.n_items, {f"{path('config.json')}: model.beam_size": mcfg.beam_size}, EVAL_BATCH_SIZE)
    model = RPG_ED(mcfg)
    load_weights(model, state, path("checkpoint.pt"))
    weight = chosen_weight(blobs["results.json"], path("results.json")) if "results.json" in blobs else 0.0
    return TrainedRun(folder, config, model.to(device).eval(), index, data["item_raw"], data["item_title"],
                      data["user_raw"], data["offsets"], data["items"], bool(data["content_sids"]), trained_items,
                      weight)


def chosen_weight(blob: bytes, path: str) -> float:
    """The transition ranker's weight that training chose on validation, from results.json."""
    results = parse_json(blob, path)
    transitions = results.get("transitions", {}) if isinstance(results, dict) else None
    weight = transitions.get("weight", 0.0) if isinstance(transitions, dict) else None
    if type(weight) not in (int, float) or not 0 <= weight < float("inf"):
        raise ValueError(f"{path}: transitions.weight: expected a number >= 0, got {weight!r}")
    return float(weight)


def load_index(out_dir: str, n_items: int) -> sid.SIDIndex:
    """The SIDs of out_dir, each file read once and checked against run.json (a reader)."""
    _, blobs = RunFolder(out_dir).read(("item_id2tokens.npy", "tokens2item.pkl"), optional=("opq.npz",))
    index = sid.SIDIndex.from_files(blobs, out_dir)
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
