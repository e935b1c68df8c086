"""Train and evaluate RPG_ED end to end: data -> item embeddings -> SIDs -> model -> Recall/NDCG.

    python train.py                                   # MovieLens-100K, the cpu preset
    python train.py --data=PATH/Beauty.txt            # Amazon Beauty, the sparse preset
    python train.py --key=value ...                   # any field of TrainConfig or RPGEDConfig

--preset=auto (the default) picks the preset from the data and says why in the log.

Files are read, filtered and split by data.py. Evaluation (README, "The evaluation protocol"):
stable time sort, 5-core, leave-one-out (last item test, second-to-last validation), every
earlier train position a training example, history = the last `max_history` items before the
target, full ranking with beam search over real SIDs, Recall/NDCG@5/10, model selection on
validation NDCG@10. Writes into out_dir: config.json, item_id2tokens.npy, tokens2item.pkl,
opq.npz, data.npz (id maps, titles, sequences: what recommend.py needs), checkpoint.pt (best),
last.pt (to --resume), results.json and curves.svg (loss and validation NDCG@10), and run.json,
which lists them all with their sha256 and is written after each step (RunFolder): readers
trust it, and a killed step leaves the state before it or after it.

    python train.py --data=NEWER --init_from=out/RUN --out_dir=out/NEXT   # continue a finished run

    torchrun --standalone --nproc_per_node=N train.py ...   # N processes, DistributedDataParallel
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import json
import math
import os
import pickle
import sys
import time
import zipfile
from array import array
from dataclasses import dataclass

import numpy as np
import torch

import beam
import sid
from data import (EVAL_SAMPLE_SEED, Dataset, Split, Transitions, extend_catalogue, item_embeddings, leave_one_out,
                  load_data, prepare, ragged_arange, read_item_emb, read_run_data, run_data_bytes, sample_users,
                  train_split, unique_keys)
from rpg_ed import RPG_ED, RPGEDConfig


@dataclass
class TrainConfig:
    """Training settings. The defaults are what plain `python train.py` runs on MovieLens-100K (the
    cpu preset); a preset changes some of them, and --key=value any of them."""
    data: str = "ml-100k"            # "ml-100k" or a path (file, or folder with one data file)
    format: str = "auto"             # auto | inter | csv | amazon | s3rec
    item_text: str = ""              # item-text file (.item, .jsonl, Amazon metadata); default: NAME.item or
                                     # NAME_items.jsonl beside data file NAME.ext, if any; "none": no file
    item_emb: str = ""               # [n_items, D] .npy, rows in sorted original-id order; default: the one
                                     # file NAME_*.npy beside data file NAME.ext, if any; "none": no file
    emb_source: str = "cf"           # text | cf | both (text + cf); with item_emb: both = file + cf,
                                     # anything else = the file alone
    out_dir: str = ""                # default out/<dataset>
    preset: str = "auto"             # auto (chosen from the data: cpu or sparse) | cpu | sparse | seed
    seed: int = 0
    device: str = "auto"             # auto (cuda, mps, cpu) | cpu | cuda | mps
    epochs: int = 7                  # maximum epochs
    batch_size: int = 512            # most rows (examples) in a training batch; rows are grouped by
                                     # history length, so a batch pads (almost) nothing
    dtype: str = "auto"              # auto (bf16 on cuda, fp32 elsewhere) | bf16 | fp32: autocast compute
                                     # dtype; weights and optimizer state stay fp32
    lr: float = 4e-3                 # peak learning rate
    warmup_steps: int = 100
    eval_every: int = 2              # epochs between validation runs (and the last epoch)
    patience: int = 3                # validation runs without improvement before stopping
    eval_batch_size: int = 256       # users per beam-search batch
    log_every: int = 100             # steps between log lines
    report_beam_size: int = 20       # also report the selected model with this beam (0 = no); the
                                     # protocol's numbers stay those of the model's beam_size (10)
    five_core: bool = True           # 5-core filtering (never for the s3rec format)
    resume: bool = False             # continue from out_dir/last.pt (same config, same SIDs on disk)
    eval_only: bool = False          # evaluate out_dir/checkpoint.pt on valid and test, no training
    max_steps: int = 0               # stop after this many training steps (0: epochs decide); the
                                     # learning-rate schedule then ends at max_steps
    eval_users: int = 0              # score this many users, a fixed random sample (0: all users)
    overwrite: bool = False          # allow a new run into an out_dir that holds another run's files
    item_id_emb: bool = False        # each history item also adds an embedding of its own id (model.n_items)
    transition_weight: float = 0.0   # w: the beam's items are ranked by log-prob + w * log(1 + n), n = how
                                     # often the user's last item came directly before the item in training;
                                     # evaluation and serving only (validation during training uses 0)
    init_from: str = ""              # a finished run's folder: start from its weights and SIDs, add the
                                     # data's new items to its index, train on this data (recommend.py)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, expected = getattr(self, f.name), {"int": int, "float": float, "bool": bool, "str": str}[f.type]
            if type(value) is not expected and not (expected is float and type(value) is int):
                raise ValueError(f"--{f.name}: expected {f.type}, got {value!r}")
            if expected is float and not math.isfinite(value):
                raise ValueError(f"--{f.name}: expected a finite number, got {value}")
        for name, allowed in (("format", ("auto", "inter", "csv", "amazon", "s3rec")),
                              ("emb_source", ("text", "cf", "both")), ("device", ("auto", "cpu", "cuda", "mps")),
                              ("dtype", ("auto", "bf16", "fp32")), ("preset", ("auto", *PRESETS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.report_beam_size < 0 or 0 < self.report_beam_size < 10:
            raise ValueError(f"--report_beam_size: expected 0 (off) or at least 10 (10 items are ranked), "
                             f"got {self.report_beam_size}")
        for name in ("max_steps", "eval_users", "warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}: expected 0 or a positive int, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "eval_every", "patience", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: expected a positive int, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr: expected > 0, got {self.lr}")
        if self.transition_weight < 0:
            raise ValueError(f"--transition_weight: expected >= 0 (0: the model alone), got {self.transition_weight}")
        if self.resume and self.eval_only:
            raise ValueError("--resume and --eval_only: expected at most one of them")


# Fixed settings (each was a flag; docs/results.md has what other values gave)
WEIGHT_DECAY = 0.05                  # AdamW, on weight matrices only
MIN_LR_RATIO = 0.05                  # the cosine schedule ends at lr * MIN_LR_RATIO
GRAD_CLIP = 1.0                      # gradient-norm clipping

PRESETS = {
    # sized for `python train.py` on MovieLens-100K within 10 minutes on a 2-core CPU; each choice
    # won on validation (docs/results.md): no user token, 7 epochs of batch 512 at lr 4e-3,
    # 20 history items, width 96 with MLP 384
    "cpu": dict(n_embd=96, n_head=4, n_inner=384, encoder_n_layer=2, decoder_n_layer=1, max_history=20,
                attn_pdrop=0.0, n_user_buckets=0),
    # short histories (under 20 items a user on average, as on Amazon) cost little with batches
    # grouped by length, so the same CPU time buys a model 4x as wide and deep (TIGER's width, MLP
    # and depth) trained for longer; each history item also adds its own id embedding; and the
    # beam is ranked with the training transitions from the user's last item
    "sparse": dict(n_embd=128, n_head=4, n_inner=1024, encoder_n_layer=4, decoder_n_layer=4, max_history=20,
                   attn_pdrop=0.1, n_user_buckets=0, epochs=32, eval_every=4, patience=3, batch_size=512,
                   lr=2e-3, warmup_steps=500, dtype="bf16", emb_source="both", item_id_emb=True,
                   transition_weight=3.0),
    # the seed config (RPGEDConfig's defaults, the original design's size), for a GPU
    "seed": dict(epochs=200, eval_every=5, patience=4, batch_size=256, lr=1e-3, warmup_steps=2000),
}


# ----------------------------------------------------------------------------------------------
# The run, in stages: data -> configs -> split -> SIDs -> model -> training -> report
# ----------------------------------------------------------------------------------------------

def main(argv: list) -> dict:
    start_time = time.time()
    given = parse_args(argv)                   # the only parse of argv in this process
    cfg, _ = make_configs(given)               # checks every flag before anything is read or written
    dist = init_distributed(cfg.device)
    try:
        results = train_and_evaluate(given, dist, start_time)
        dist.barrier()   # no process tears gloo/nccl down while another still talks to it
        return results
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


def train_and_evaluate(given: dict, dist: Dist, start_time: float) -> dict:
    log = print if dist.is_main else (lambda *args, **kwargs: None)
    seconds = {}                               # per stage, into results.json (bench.py --scale reads them)
    raw, data = load_stage(make_configs(given)[0], dist, log, seconds)
    cfg, mcfg, base, index, data = config_stage(given, raw, data, log)
    out_dir = cfg.out_dir or os.path.join("out", run_name(cfg))
    if base is not None and os.path.realpath(out_dir) == os.path.realpath(cfg.init_from):
        raise ValueError(f"--out_dir: expected a folder other than --init_from ({cfg.init_from}), which it "
                         "would overwrite")
    resolved = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg)}
    log("config:", json.dumps(resolved))
    log(f"processes: {dist.world}, device {dist.device}, compute dtype "
        f"{str(compute_dtype(cfg, dist.device)).removeprefix('torch.')}")
    if dist.is_main:
        RunFolder(out_dir).recover()           # finish or undo what a killed step left (nothing, usually)
    dist.barrier()
    mode = check_out_dir(out_dir, cfg, resolved, raw.fingerprint)          # reads only
    check_sizes(cfg, mcfg, len(data.item_raw))
    splits, stats = split_stage(cfg, mcfg, data, log, seconds)
    index = sids_stage(cfg, dist, raw, data, splits, base, index, log, seconds)
    if dist.is_main and mode in ("new", "restart"):                        # every check has passed: write
        start_stage(out_dir, mode, resolved, raw, data, index, base, log)
    dist.barrier()
    if not dist.is_main or mode in ("resume", "eval"):
        index = load_verified_index(out_dir, len(data.item_raw), log)
    item_tokens = item_token_table(index, mcfg)
    user_buckets = user_bucket_table(data.user_raw, mcfg.n_user_buckets)
    transitions = Transitions.fit(splits["train"], index.n_items)
    run = Run(cfg, resolved, dist, out_dir, splits, index, item_tokens, user_buckets, transitions)
    model = model_stage(mcfg, run, base, log)
    trained = None if cfg.eval_only else train_model(model, run)
    return report_stage(model, run, data, trained, stats, raw.source, seconds, start_time)


def start_stage(out_dir: str, mode: str, resolved: dict, raw, data: Dataset, index: sid.SIDIndex, base,
                log) -> None:
    """The run's first state, published in one step: config.json, the SIDs, data.npz, and in
    run.json the data's fingerprint. A new run replaces whatever state out_dir held."""
    if mode == "restart":
        log(f"{out_dir}: an unfinished attempt of this same run is there (killed?); starting it over "
            "(--resume=true continues it instead)")
    emb_source = resolved["train"]["emb_source"]
    content_sids = base.content_sids if base else bool(raw.item_emb) and emb_source != "both"
    files = {"config.json": json.dumps(resolved, indent=2).encode(), **index.files(),
             "data.npz": run_data_bytes(data, raw.item_text, content_sids)}
    RunFolder(out_dir).publish(files, data=raw.fingerprint, keep=False)


def run_name(cfg: TrainConfig) -> str:
    return cfg.data if cfg.data == "ml-100k" else os.path.basename(os.path.normpath(cfg.data)).split(".")[0]


def load_stage(cfg: TrainConfig, dist: Dist, log, seconds: dict) -> tuple:
    """Read and 5-core the interactions (rank 0 first: it may fetch the data) -> (RawData, Dataset)."""
    tick = time.time()
    if not dist.is_main:
        dist.barrier()
    raw = load_data(cfg)
    if dist.is_main:
        dist.barrier()
    seconds["load"] = time.time() - tick
    log(f"data: {raw.source} ({seconds['load']:.1f} s)")
    data = prepare(raw, cfg.five_core)
    raw.users, raw.items, raw.times, raw.names = [], [], array("d"), {}   # now in `data`: free them
    return raw, data


def config_stage(given: dict, raw, data: Dataset, log) -> tuple:
    """The run's configs: the preset chosen from the data, or (--init_from) the base run's model,
    with its catalogue extended by this data's new items -> (cfg, mcfg, base, index, data)."""
    cfg, _ = make_configs(given)
    if cfg.init_from:
        try:
            base = load_run(cfg.init_from)
        except ValueError as e:
            raise ValueError(f"--init_from: {e}") from None
        cfg, mcfg = continue_config(given, base.config)
        n_own = len(data.item_raw)             # rows of an embeddings file for this data
        data, new_rows = extend_catalogue(data, list(base.item_raw))
        index, moved = add_new_items(base, raw.item_emb, n_own, new_rows)
        log(f"init from {cfg.init_from}: its weights and SIDs; {len(new_rows)} new items in this data get "
            f"SIDs from their embeddings ({moved} moved by collision resolution)")
        return cfg, mcfg, base, index, data
    if cfg.preset == "auto":
        preset, why = choose_preset(data)
        log(f"preset: {preset}, chosen from the data: {why}")
        cfg, mcfg = make_configs(given, auto_preset=preset)
    else:
        cfg, mcfg = make_configs(given)
    if cfg.item_id_emb:
        mcfg = dataclasses.replace(mcfg, n_items=len(data.item_raw))
    return cfg, mcfg, None, None, data


def split_stage(cfg: TrainConfig, mcfg: RPGEDConfig, data: Dataset, log, seconds: dict) -> tuple:
    """Leave-one-out split (and the --eval_users sample) -> (splits, dataset stats)."""
    tick = time.time()
    splits = leave_one_out(data, mcfg.max_history)
    stats = {"users": len(data.user_raw), "items": len(data.item_raw), "interactions": data.n_interactions,
             "train_examples": len(splits["train"].pos)}
    if cfg.eval_users and cfg.eval_users < len(data.user_raw):
        splits, stats["eval_users"] = sample_users(splits, cfg.eval_users), cfg.eval_users
    seconds["split"] = time.time() - tick
    log("dataset: " + ", ".join(f"{k} {v:,}" for k, v in stats.items()) + f" ({seconds['split']:.1f} s)")
    if "eval_users" in stats:
        log(f"evaluation: {cfg.eval_users:,} of {len(data.user_raw):,} users, a random sample fixed by "
            f"EVAL_SAMPLE_SEED={EVAL_SAMPLE_SEED} (the same for the model and the baselines, whatever --seed)")
    return splits, stats


def sids_stage(cfg: TrainConfig, dist: Dist, raw, data: Dataset, splits: dict, base, index, log,
               seconds: dict) -> sid.SIDIndex | None:
    """Rank 0 builds the SIDs of a new run (in memory: nothing is written yet); with --init_from they
    are the base run's, extended. The other processes, --resume and --eval_only get None here and
    load them from out_dir later."""
    if dist.is_main and not (cfg.resume or cfg.eval_only):
        if base is None:
            tick = time.time()
            emb, emb_name = item_embeddings(cfg, data, raw, splits["train"])
            seconds["embeddings"], tick = time.time() - tick, time.time()
            index, moved = sid.build_index(emb, seed=cfg.seed)
            seconds["sids"] = time.time() - tick
            log(f"SIDs: from {emb_name} embeddings {emb.shape} ({seconds['embeddings']:.1f} s), OPQ error "
                f"{index.quantizer.errors[0]:.4g} -> {index.quantizer.errors[-1]:.4g}, {moved} items moved by "
                f"collision resolution, {seconds['sids']:.1f} s")
        return index
    return None


def load_verified_index(out_dir: str, n_items: int, log) -> sid.SIDIndex:
    """The SIDs of out_dir, after run.json vouches for every file (rank 0 recovered the folder first)."""
    RunFolder(out_dir).verify(needs=("item_id2tokens.npy", "tokens2item.pkl"))
    index = sid.SIDIndex.load(out_dir)
    if index.n_items != n_items:
        raise ValueError(f"{out_dir}: the index has {index.n_items} items, the data has {n_items}")
    log(f"SIDs: loaded from {out_dir}")
    return index


def check_sizes(cfg: TrainConfig, mcfg: RPGEDConfig, n_items: int) -> None:
    """Memory bounds known before training: beams against the catalogue, parameters against RAM."""
    widest = max(100, n_items)                     # a beam wider than the catalogue finds nothing more
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for flag, beams in (("--beam_size", mcfg.beam_size), ("--report_beam_size", cfg.report_beam_size)):
        # per beam row: candidate scores over a digit's codes, and the decoder's self-attention cache
        need = cfg.eval_batch_size * beams * 4 * (3 * mcfg.codebook_size + 2 * mcfg.decoder_n_layer *
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


def model_stage(mcfg: RPGEDConfig, run: "Run", base, log) -> RPG_ED:
    """The model, initialised from cfg.seed (or from --init_from's weights), on the run's device."""
    cfg, dist = run.cfg, run.dist
    torch.manual_seed(cfg.seed)
    model = RPG_ED(mcfg).to(dist.device)
    if mcfg.n_items:
        model.set_items(torch.from_numpy(run.index.item_codes[:mcfg.n_items].astype(np.int64)))
    if base is not None and not (cfg.resume or cfg.eval_only):
        model.load_state_dict(base.model.state_dict())
    torch.manual_seed(cfg.seed + dist.rank)    # dropout: one random stream per process
    log(f"model: {model.num_parameters():,} parameters on {dist.device}")
    return model


def report_stage(model: RPG_ED, run: "Run", data: Dataset, trained: dict | None, stats: dict, source: str,
                 seconds: dict, start_time: float) -> dict:
    """Evaluate the selected checkpoint on valid and test (and the baselines); write results.json
    (eval.json for --eval_only) and curves.svg; print the table."""
    cfg, dist = run.cfg, run.dist
    state = load_checkpoint(run.path("checkpoint.pt"), dist.device)
    check_checkpoint(state, run.path("checkpoint.pt"), run.resolved, sids_digest(run.index), to_resume=False)
    model.load_state_dict(state["model"])
    tick = time.time()
    results = {"config": run.resolved, "dataset": {**stats, "source": source}, "processes": dist.world,
               "best_epoch": state["best_epoch"], "valid_history": (trained or state)["valid_history"],
               "loss_history": (trained or state)["loss_history"],
               "train_seconds": round((trained or state)["train_seconds"], 1)}
    weight = cfg.transition_weight
    weights = (0.0, weight) if weight else (0.0,)                      # [0]: the model alone, [1]: ranked
    by_split = {split: evaluate(model, run, split, None, weights) for split in ("valid", "test")}
    seconds["eval_valid_and_test"] = time.time() - tick
    results.update(valid=by_split["valid"][0], test=by_split["test"][0])
    if weight:
        results["transitions"] = {"weight": weight, **{split: m[1] for split, m in by_split.items()}}
    if cfg.report_beam_size:
        by_split = {split: evaluate(model, run, split, cfg.report_beam_size, weights) for split in ("valid", "test")}
        results[f"beam{cfg.report_beam_size}"] = {split: m[0] for split, m in by_split.items()}
        if weight:
            results[f"transitions_beam{cfg.report_beam_size}"] = {"weight": weight,
                                                                  **{split: m[1] for split, m in by_split.items()}}
    results["seconds"] = {k: round(v, 2) for k, v in {**seconds, "train": results["train_seconds"]}.items()}
    if dist.is_main:
        results["baselines"] = {split: baseline_rankings(data, run.splits, split) for split in ("valid", "test")}
        results["total_seconds"] = round(time.time() - start_time, 1)
        out_name = "eval.json" if cfg.eval_only else "results.json"
        files = {out_name: json.dumps(results, indent=2).encode()}
        if trained:
            files["curves.svg"] = curves_svg(trained, f"{run_name(cfg)}, preset {cfg.preset}, seed {cfg.seed}").encode()
        RunFolder(run.out_dir).publish(files)
        print_table(results)
        print(f"wrote {run.path(out_name)}; total {results['total_seconds'] / 60:.1f} min")
    return results


def train_model(model: RPG_ED, run: Run) -> dict:
    """Epochs of training with validation and early stopping. After every epoch: checkpoint.pt
    when validation improved, and last.pt (everything --resume needs). Returns the progress record."""
    cfg, dist = run.cfg, run.dist
    optimizer = make_optimizer(model, cfg)
    progress = {"epoch": 0, "step": 0, "examples": 0, "best": -1.0, "best_epoch": 0, "bad_evals": 0, "done": False,
                "loss_history": [], "valid_history": [], "train_seconds": 0.0}
    if cfg.resume:
        progress = resume(model, optimizer, run, progress)
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    lengths = run.splits["train"].lengths()
    max_history = run.resolved["model"]["max_history"]
    steps_per_epoch = len(epoch_batches(lengths, cfg, max_history, 1))   # the same for every epoch
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    dtype = compute_dtype(cfg, dist.device)
    first_step, session_start, seconds_before = progress["step"], time.time(), progress["train_seconds"]
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        if progress["done"] or progress["step"] >= total_steps:
            break
        batches = epoch_batches(lengths, cfg, max_history, epoch)
        seen, tick, loss_sum, loss_rows = 0, time.time(), 0.0, 0
        for b, rows in enumerate(batches):                                     # rows: the global batch
            if progress["step"] >= total_steps:                                # --max_steps
                break
            local, weight = shard(rows, dist)
            lr = lr_at(progress["step"], total_steps, cfg)
            loss = train_step(net, optimizer, run.batch("train", local), weight, lr, dist.device, dtype)
            progress["step"] += 1
            finite = torch.tensor([float(math.isfinite(loss.item()))])
            if dist.sum(finite).item() < dist.world:                           # every process stops together
                raise ValueError(f"training loss is not finite at step {progress['step']} (epoch {epoch}): "
                                 f"{loss.item()} on this process; lower --lr (now {cfg.lr}) or check the data")
            seen, progress["examples"] = seen + len(rows), progress["examples"] + len(rows)
            loss_sum, loss_rows = loss_sum + loss.item() * len(local), loss_rows + len(local)
            if progress["step"] % cfg.log_every == 0 or b == steps_per_epoch - 1 or progress["step"] == total_steps:
                eta = (time.time() - session_start) / (progress["step"] - first_step) * (total_steps - progress["step"])
                # the mean since the last line: one length-grouped batch alone is a noisy figure
                run.log(f"epoch {epoch} step {progress['step']}/{total_steps} | loss {loss_sum / loss_rows:.4f} | "
                        f"lr {lr:.2e} | {seen / (time.time() - tick):.0f} ex/s | eta {eta / 60:.1f} min", flush=True)
                progress["loss_history"].append({"step": progress["step"], "examples": progress["examples"],
                                                 "loss": round(loss_sum / loss_rows, 5)})   # this process's rows
                loss_sum, loss_rows = 0.0, 0
        improved = validate(model, run, progress, epoch, last=progress["step"] >= total_steps)
        progress["epoch"], progress["train_seconds"] = epoch, seconds_before + time.time() - session_start
        save_epoch(model, optimizer, run, progress, improved)
    return progress


def validate(model: RPG_ED, run: Run, progress: dict, epoch: int, last: bool) -> bool:
    """Every eval_every epochs and at the end: validation metrics into progress, early stopping.
    Returns whether validation NDCG@10 improved."""
    cfg = run.cfg
    improved = False
    if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or last:
        eval_start = time.time()
        metrics = evaluate(model, run, "valid")[0]                      # weight 0: the model alone selects
        progress["valid_history"].append({"epoch": epoch, "examples": progress["examples"], **metrics})
        run.log(f"valid epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) +
                f" | {time.time() - eval_start:.0f} s", flush=True)
        if metrics["ndcg@10"] > progress["best"]:
            progress.update(best=metrics["ndcg@10"], best_epoch=epoch, bad_evals=0)
            improved = True
        else:
            progress["bad_evals"] += 1
            progress["done"] = progress["bad_evals"] >= cfg.patience
    return improved


def save_epoch(model: RPG_ED, optimizer: torch.optim.Optimizer, run: Run, progress: dict, improved: bool) -> None:
    """last.pt after every epoch (everything --resume needs), checkpoint.pt when validation improved."""
    cfg, dist = run.cfg, run.dist
    rng = dist.gather(rng_state(dist.device))
    if dist.is_main:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": run.resolved,
                 "sids_sha256": sids_digest(run.index), "sids_items": run.index.n_items, "rng": rng, **progress}
        blob = checkpoint_bytes(state)
        RunFolder(run.out_dir).publish({"last.pt": blob, **({"checkpoint.pt": blob} if improved else {})})
    dist.barrier()
    if progress["done"]:
        run.log(f"early stop: no better validation NDCG@10 in {cfg.patience} evaluations")


# ----------------------------------------------------------------------------------------------
# Around the loop: the output folder, resuming, the results table
# ----------------------------------------------------------------------------------------------

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
            sid.atomic_write(self.file(PENDING + name), blob)
            entries[name] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        manifest = {"version": 1, "files": entries, "data": data if data is not None else old["data"]}
        sid.atomic_write(self.file(MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        for name in files:
            os.replace(self.file(PENDING + name), self.file(name))
        for name in (set(old["files"]) | set(RUN_FILES)) - set(entries):   # files of the state replaced
            if os.path.exists(self.file(name)) and (not keep or name in old["files"]):
                os.remove(self.file(name))


def check_out_dir(out_dir: str, cfg: TrainConfig, resolved: dict, fingerprint: dict) -> str:
    """Everything about out_dir that can fail, checked before anything is written. Returns what
    the run will do there: "new", "restart" (an unfinished attempt of this same run), "resume"
    or "eval"."""
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
        and _settings(_read_json_or_none(folder.file("config.json"))) == _settings(json.loads(json.dumps(resolved)))
    if same:
        return "restart"
    raise ValueError(f"--out_dir: {out_dir} holds another run ({', '.join(found) or MANIFEST}); continue it with "
                     "--resume=true, evaluate it with --eval_only=true, replace it with --overwrite=true, "
                     "or choose another --out_dir")


def _settings(resolved: dict | None) -> dict | None:
    """What makes two runs the same run: the config without the flags that a resume may change."""
    if not isinstance(resolved, dict) or "train" not in resolved:
        return None
    return {**resolved, "train": {k: v for k, v in resolved["train"].items()
                                  if k not in RESUME_MAY_CHANGE + ("overwrite",)}}


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


def resume(model: RPG_ED, optimizer: torch.optim.Optimizer, run: Run, progress: dict) -> dict:
    """Load last.pt into the model and optimizer, restore this process's RNG; return the progress record."""
    path = run.path("last.pt")
    state = load_checkpoint(path, run.dist.device)
    check_checkpoint(state, path, run.resolved, sids_digest(run.index), to_resume=True)
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
            rows.append((f"RPG_ED + transitions (weight {results[key]['weight']:g})" +
                         (f", {beams} beams" if beams else ""), results[key][split]))
        rows += [(n, m) for n, m in results["baselines"][split].items()]
        for name, m in rows:
            print(f"| {name} | {split} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")


# ----------------------------------------------------------------------------------------------
# Training steps: batch order, precision, learning rate, optimiser
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


def epoch_batches(lengths: np.ndarray, cfg: TrainConfig, max_history: int, epoch: int) -> list:
    """The global batches of one epoch, a function of (seed, epoch) only: the same on every
    process and after a resume (torch's DistributedSampler seeds the same way)."""
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    return length_batches(lengths, cfg.batch_size, cfg.batch_size * max_history, generator)


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 or fp32 (fp32 = autocast off)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Matmuls in bf16 when asked (CPUs with AVX512-BF16 or AMX run them about twice as fast);
    weights, optimizer state, LayerNorm, softmax and the loss stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * MIN_LR_RATIO. A function of the step, so the
    step is the whole scheduler state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: RPG_ED, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices only (not on embeddings, positions, norms or biases)."""
    decayed = {n for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n and "pos" not in n}
    decay = [p for n, p in model.named_parameters() if n in decayed]
    no_decay = [p for n, p in model.named_parameters() if n not in decayed]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def train_step(model, optimizer, batch: dict, weight: float, lr: float, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """One optimiser step on this process's batch; `weight` comes from shard(). Returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device, dtype):
        loss = model(batch)
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

CHECKPOINT_VERSION = 3       # checkpoints of another version are refused, not misread
RESUME_MAY_CHANGE = ("resume", "eval_only", "device", "log_every", "eval_batch_size", "out_dir", "report_beam_size",
                     "transition_weight")


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


def check_checkpoint(state: dict, path: str, resolved: dict, digest: str, to_resume: bool) -> None:
    """Refuse a checkpoint made for another model config, other SIDs, or (to resume) other training settings."""
    saved = state["config"]
    diffs = [(f"model.{k}", saved["model"].get(k), v) for k, v in resolved["model"].items()
             if saved["model"].get(k) != v]
    if to_resume:
        diffs += [(f"train.{k}", saved["train"].get(k), v) for k, v in resolved["train"].items()
                  if k not in RESUME_MAY_CHANGE and saved["train"].get(k) != v]
    if diffs:
        raise ValueError(f"{path}: made with another config: " +
                         "; ".join(f"{k} is {a!r} there, {b!r} here" for k, a, b in diffs))
    if state["sids_sha256"] != digest:
        raise ValueError(f"{path}: made with other SIDs than the index on disk (sha256 {state['sids_sha256'][:12]}, "
                         f"index {digest[:12]}); rebuild the index or train again")


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


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

    def __post_init__(self):
        self.item_id = {raw: i for i, raw in enumerate(self.item_raw.tolist())}
        self.user_id = {raw: u for u, raw in enumerate(self.user_raw.tolist())}
        self.transitions = Transitions.fit(train_split(self.offsets, self.items, 1), self.index.n_items)
        self.transition_weight = float(self.config["train"].get("transition_weight", 0.0))

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
    RunFolder(folder).verify(needs=("config.json", "checkpoint.pt", "item_id2tokens.npy", "tokens2item.pkl", "data.npz"))
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
    check_checkpoint(state, path, config, sids_digest(index, trained_items), to_resume=False)
    model = RPG_ED(mcfg)
    model.load_state_dict(state["model"])
    return TrainedRun(folder, config, model.to(device).eval(), index, data["item_raw"], data["item_title"],
                      data["user_raw"], data["offsets"], data["items"], bool(data["content_sids"]), trained_items)


# ----------------------------------------------------------------------------------------------
# Evaluation: batches, metrics, baselines, beam search over the split
# ----------------------------------------------------------------------------------------------

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


def rerank(scores: np.ndarray, counts: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """A beam's (B, K) scores and transition counts -> (order, fused), (B, K): positions in the beam,
    best first by fused = score + weight * log(1 + count), ties in beam order. That is the order of
    p_model(item) * (1 + count) ** weight. Weight 0 keeps the beam's own order; padding (score -inf)
    stays last."""
    fused = scores + weight * np.log1p(counts)
    order = np.argsort(-fused, axis=1, kind="stable")
    return order, np.take_along_axis(fused, order, 1)


@torch.no_grad()
def evaluate(model: RPG_ED, run: "Run", split_name: str, beam_size: int | None = None,
             transition_weights: tuple = (0.0,)) -> list:
    """Beam search (beam_size, default the model config's) over real SIDs; the whole beam ranked
    with each transition weight (rerank; 0 = the model alone) -> metrics of its top 10, one dict
    per weight. With 10 beams the ranking reorders the same 10 items: only @5 and NDCG can move.

    With several processes, evaluation batch j runs on rank j % world and the target's rank of
    each user is summed over processes with all_reduce (each user is filled in by exactly one
    rank, zeros elsewhere). Every batch is the one a single process would run, so the metrics
    are identical to a single-process evaluation.
    """
    model.eval()
    split, cfg = run.splits[split_name], run.cfg
    target, last = split.target, split.items[split.pos - 1]                     # every history has an item
    beam_size = beam_size or model.config.beam_size
    rank = np.zeros((len(transition_weights), len(target)), np.int64)           # 0 = not in the top 10
    batches = length_batches(split.lengths(), cfg.eval_batch_size,   # users grouped by history length
                             cfg.eval_batch_size * model.config.max_history)
    dtype = compute_dtype(cfg, run.dist.device)
    for j, rows in enumerate(batches):
        if j % run.dist.world != run.dist.rank:
            continue
        batch = run.batch(split_name, rows, with_target=False)
        with autocast(run.dist.device, dtype):
            result = beam.beam_search(model, batch, beam_size, beam_size, run.index)
        items, scores = result.items.cpu().numpy(), result.scores.float().cpu().numpy()   # (b, beam)
        counts = run.transitions.count(last[rows], items)
        for w, weight in enumerate(transition_weights):
            top = np.take_along_axis(items, rerank(scores, counts, weight)[0][:, :10], 1)
            rank[w, rows] = hit_ranks(top, target[rows])
    model.train()
    return [metrics_from_ranks(r) for r in run.dist.sum(torch.from_numpy(rank)).numpy()]


# ----------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node=N train.py` (DistributedDataParallel).
# With one process (plain `python train.py`) every helper below is a no-op.
# ----------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    """--device: auto picks cuda, then mps, then cpu; an explicit one must be present here."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if name != "auto":
        if not available.get(name, False):
            raise ValueError(f"--device: {name} is not available on this machine (available: "
                             f"{', '.join(k for k, ok in available.items() if ok)})")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Dist:
    rank: int                        # this process, 0..world-1; rank 0 logs and writes files
    world: int                       # number of processes
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (all_reduce)."""
        if self.world == 1:
            return tensor
        tensor = tensor.to(self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.cpu()

    def gather(self, obj) -> list:
        """One object per process, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def init_distributed(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; plain `python train.py` sets none of them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return Dist(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), world, device)


def shard(rows: np.ndarray, dist: Dist) -> tuple[np.ndarray, float]:
    """This process's part of a global batch, and the loss weight that makes DDP's average of the
    per-process gradients equal the gradient of the mean loss over all `rows`:
    (1/W) sum_r (n_r W / N) grad(mean_r) = grad(sum of losses) / N.
    A process left without rows (a last batch smaller than W) runs one row at weight 0, because
    every process must take part in each backward pass."""
    local = rows[dist.rank::dist.world]
    if len(local) == 0:
        return rows[:1], 0.0
    return local, len(local) * dist.world / len(rows)


@dataclass
class Run:
    """What the stages of one run share: settings, processes, the split data and the SIDs."""
    cfg: TrainConfig
    resolved: dict                   # {"train": ..., "model": ...}: saved in config.json and in checkpoints
    dist: Dist
    out_dir: str
    splits: dict                     # "train" | "valid" | "test" -> Split
    index: sid.SIDIndex
    item_tokens: torch.Tensor        # (n_items + 1, 4) SID tokens of each item; the last row is PAD
    user_buckets: torch.Tensor       # (n_users,) hashed user-token bucket of each user
    transitions: Transitions         # adjacent item pairs of the training targets, counted

    def log(self, *args, **kwargs) -> None:
        if self.dist.is_main:
            print(*args, **kwargs)

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def batch(self, split_name: str, rows: np.ndarray, with_target: bool = True) -> dict:
        return make_batch(self.splits[split_name], rows, self.item_tokens, self.user_buckets, self.dist.device,
                          with_target)


# ----------------------------------------------------------------------------------------------
# Command line: --key=value for every field of TrainConfig and RPGEDConfig; presets; --init_from
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list) -> dict:
    """--key=value pairs -> {key: typed value} for fields of TrainConfig and RPGEDConfig."""
    return sid.parse_flags(argv, TrainConfig, RPGEDConfig)


def make_configs(given: dict, auto_preset: str | None = None) -> tuple[TrainConfig, RPGEDConfig]:
    """Flags -> (TrainConfig, RPGEDConfig): the preset's values, then the flags'. `--preset=auto` (the
    default) stands for `auto_preset`, which the run picks from the data (choose_preset), and the
    config records the preset used; before the data is read (auto_preset None) it keeps the name
    "auto" with the cpu preset's values. Each dataclass checks its own values."""
    given = dict(given)
    preset = given.get("preset", TrainConfig.preset)
    if preset == "auto":
        preset = "cpu" if auto_preset is None else auto_preset
        given["preset"] = "auto" if auto_preset is None else auto_preset
    if preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {['auto'] + sorted(PRESETS)}, got {preset!r}")
    if "n_items" in given:
        raise ValueError("--n_items: expected no value: it is the data's item count, set by --item_id_emb=true")
    values = {**PRESETS[preset], **given}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in values.items() if k in train_keys})
    try:
        mcfg = RPGEDConfig(**{k: v for k, v in values.items() if k not in train_keys})
    except ValueError as e:              # "config.n_embd: ..." -> "--n_embd: ...", the flag the user typed
        raise ValueError(str(e).replace("config.", "--", 1)) from None
    for flag, value, served in (("--n_digit", mcfg.n_digit, sid.N_DIGIT), ("--codebook_size", mcfg.codebook_size,
                                                                            sid.CODEBOOK_SIZE)):
        if value != served:
            raise ValueError(f"{flag}: expected {served}: sid.py builds SIDs of {sid.N_DIGIT} digits of "
                             f"{sid.CODEBOOK_SIZE} codes (one uint8 each, packed into a uint32 key), got {value}")
    if mcfg.beam_size < 10:
        raise ValueError(f"--beam_size: expected at least 10 (evaluation ranks 10 items), got {mcfg.beam_size}")
    return tcfg, mcfg


SPARSE_BELOW = 20   # mean interactions per user under which --preset=auto picks "sparse"


def choose_preset(data: Dataset) -> tuple[str, str]:
    """--preset=auto: the preset for this data, and why. Both CPU presets fit their data's budget
    on a 2-core CPU (10 min for MovieLens-100K, 90 for Amazon Beauty); what separates them is
    history length, which sets the cost of every example."""
    per_user = data.n_interactions / len(data.user_raw)
    if per_user < SPARSE_BELOW:
        return "sparse", (f"{per_user:.1f} interactions per user (< {SPARSE_BELOW}): short histories are cheap "
                          "with dynamic batches, so a wider, deeper model with item-id embeddings, trained longer; "
                          "and the beam's items are also ranked by how often the last item came before each in "
                          "training, transitions a count recalls better than the model does")
    return "cpu", f"{per_user:.1f} interactions per user (>= {SPARSE_BELOW}): long histories, the small model"


def continue_config(given: dict, base_config: dict) -> tuple[TrainConfig, RPGEDConfig]:
    """--init_from: training settings from the flags (preset auto = the base run's preset); the
    model config is the base run's, and a model flag that contradicts it is an error."""
    cfg, _ = make_configs(given)
    preset = base_config["train"]["preset"] if cfg.preset == "auto" else cfg.preset
    cfg, mcfg = make_configs(given, auto_preset=preset)
    base_model = RPGEDConfig(**base_config["model"])
    for key, value in dataclasses.asdict(mcfg).items():
        if key in given and value != getattr(base_model, key):
            raise ValueError(f"--{key}: the model of --init_from has {key}={getattr(base_model, key)!r}, "
                             f"got {value!r}; a continued run keeps the model's shape")
    if "item_id_emb" in given and cfg.item_id_emb != bool(base_model.n_items):
        raise ValueError(f"--item_id_emb: the model of --init_from has n_items={base_model.n_items}, got "
                         f"{cfg.item_id_emb}; a continued run keeps the model's shape")
    return dataclasses.replace(cfg, item_id_emb=bool(base_model.n_items)), base_model


def add_new_items(base, item_emb: str, n_own: int, new_rows: np.ndarray) -> tuple[sid.SIDIndex, int]:
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


if __name__ == "__main__":
    sid.run_main(main)
