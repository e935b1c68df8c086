"""Train and evaluate RPG_ED end to end: data -> item embeddings -> SIDs -> model -> Recall/NDCG.

    python train.py                                   # MovieLens-100K: --preset=auto picks cpu
    python train.py --data=PATH/Beauty.txt            # Amazon Beauty: --preset=auto picks sparse
    python train.py --key=value ...                   # any field of TrainConfig or RPGEDConfig
    python train.py --help                            # every flag, its default and what it does
    python train.py --data=NEWER --init_from=out/RUN --out_dir=out/NEXT   # continue a finished run
    torchrun --standalone --nproc_per_node=N train.py ...   # N processes, DistributedDataParallel

The run in stages: read and split the data (dataset.py), item embeddings (embeddings.py) and SIDs
(sid.py), train the model (rpg_ed.py), validating every eval_every epochs, then evaluate the best
checkpoint (evaluate.py): the model's beam alone (the protocol's numbers), and beside it the beam
ranked with training transitions, its weight chosen on validation. Files go into out_dir through
the run store (runs.py). Ctrl-C or SIGTERM stops between steps and says how to go on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import time
from array import array
from dataclasses import dataclass

import numpy as np
import torch

import sid
from cli import (Dist, Interrupted, Progress, as_flag, autocast, check_types, init_distributed, parse_flags, pick_dtype,
                 run_main, stop_at_safe_points, stop_requested)
from dataset import Dataset, extend_catalogue, leave_one_out, load_data, prepare, sample_users
from embeddings import item_embeddings
from evaluate import (EVAL_BATCH_SIZE, TRANSITION_WEIGHTS, TransitionRanker, Transitions, baseline_rankings, best_of,
                      curves_svg, evaluate_split, evaluation_seconds, item_token_table, length_batches, make_batch,
                      print_table, user_bucket_table)
from rpg_ed import RPG_ED, RPGEDConfig
from runs import (RunFolder, check_out_dir, check_sizes, checkpoint_bytes, extend_index, load_index, load_run,
                  load_weights, read_checkpoint, resume, run_data_bytes, sids_digest)


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
    seed: int = 0                    # model initialisation, dropout, batch order and the SIDs' k-means
    device: str = "auto"             # auto (cuda, mps, cpu) | cpu | cuda | mps
    epochs: int = 7                  # maximum epochs
    batch_size: int = 512            # most rows in a training batch (grouped by history length: no padding)
    dtype: str = "auto"              # auto (bf16 where a timed matmul is clearly faster in it) | bf16 | fp32:
                                     # the autocast dtype; weights and optimizer state stay fp32
    lr: float = 4e-3                 # peak learning rate
    warmup_steps: int = 100          # steps of linear warmup to lr (at most a tenth of the run), then cosine
    eval_every: int = 2              # epochs between validation runs (and the last epoch)
    patience: int = 3                # validation runs without improvement before stopping
    log_every: int = 100             # steps between log lines
    report_beam_size: int = 20       # also report the chosen model with this many beams (0: no); protocol: 10
    five_core: bool = True           # 5-core filtering (never for the s3rec format)
    resume: bool = False             # continue from out_dir/last.pt (same config, same SIDs on disk)
    eval_only: bool = False          # evaluate out_dir/checkpoint.pt on valid and test, no training
    max_steps: int = 0               # stop after this many steps, where the lr schedule ends (0: epochs decide)
    eval_users: int = 0              # score this many users, a fixed random sample (0: all users)
    overwrite: bool = False          # allow a new run into an out_dir that holds another run's files
    item_id_emb: bool = False        # each history item also adds an embedding of its own id (model.n_items)
    init_from: str = ""              # a finished run's folder: go on from its weights and SIDs on this data

    def __post_init__(self):
        check_types(self)
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
        for name in ("epochs", "batch_size", "eval_every", "patience", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: expected a positive int, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr: expected > 0, got {self.lr}")
        if self.resume and self.eval_only:
            raise ValueError("--resume and --eval_only: expected at most one of them")


# Fixed settings (each was a flag; docs/results.md has what other values gave)
WEIGHT_DECAY = 0.05                  # AdamW, on weight matrices only
MIN_LR_RATIO = 0.05                  # the cosine schedule ends at lr * MIN_LR_RATIO
GRAD_CLIP = 1.0                      # gradient-norm clipping
# flags a resume (or a restart of an unfinished run) may change: they do not change what is trained
RESUME_MAY_CHANGE = ("resume", "eval_only", "device", "log_every", "out_dir", "report_beam_size")

PRESETS = {
    # sized for `python train.py` on MovieLens-100K within 10 minutes on a 2-core CPU; each choice
    # won on validation (docs/results.md): no user token, 7 epochs of batch 512 at lr 4e-3,
    # 20 history items, width 96 with MLP 384, fp32 (bf16 lost on validation even where faster)
    "cpu": dict(n_embd=96, n_head=4, n_inner=384, encoder_n_layer=2, decoder_n_layer=1, max_history=20,
                attn_pdrop=0.0, n_user_buckets=0, dtype="fp32"),
    # short histories (under 20 items a user on average, as on Amazon) cost little with batches
    # grouped by length, so the same CPU time buys a model 4x as wide and deep (TIGER's width, MLP
    # and depth) trained for longer; each history item also adds its own id embedding
    "sparse": dict(n_embd=128, n_head=4, n_inner=1024, encoder_n_layer=4, decoder_n_layer=4, max_history=20,
                   attn_pdrop=0.1, n_user_buckets=0, epochs=32, eval_every=4, patience=3, batch_size=512,
                   lr=2e-3, warmup_steps=500, emb_source="both", item_id_emb=True),
    # the seed config (RPGEDConfig's defaults, the original design's size), for a GPU
    "seed": dict(epochs=200, eval_every=5, patience=4, batch_size=256, lr=1e-3, warmup_steps=2000),
}


# ----------------------------------------------------------------------------------------------
# The run, in stages: data -> configs -> split -> SIDs -> model -> training -> report
# ----------------------------------------------------------------------------------------------

def main(argv: list) -> dict:
    start_time = time.time()
    given = parse_flags(argv, TrainConfig, RPGEDConfig, usage=__doc__, presets=PRESETS)   # the only parse
    cfg, _ = make_configs(given)               # checks every flag before anything is read or written
    dist = init_distributed(cfg.device)
    out_dir = cfg.out_dir or os.path.join("out", os.path.basename(os.path.normpath(cfg.data)).split(".")[0])
    try:
        with RunFolder(out_dir).lock() if dist.is_main else contextlib.nullcontext():   # the one writer
            results = train_and_evaluate(given, dist, out_dir, start_time)
        dist.barrier()   # no process tears gloo/nccl down while another still talks to it
        return results
    finally:
        if dist.world > 1:
            torch.distributed.destroy_process_group()


def train_and_evaluate(given: dict, dist: Dist, out_dir: str, start_time: float) -> dict:
    log = print if dist.is_main else (lambda *args, **kwargs: None)
    seconds = {}                               # per stage, into results.json (bench.py --scale reads them)
    raw, data = load_stage(make_configs(given)[0], dist, log, seconds)
    cfg, mcfg, base, index, data = config_stage(given, raw, data, log)
    resolved = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg)}
    log("config:", json.dumps(resolved))
    dtype, why = pick_dtype(cfg.dtype, dist.device, mcfg.n_embd, mcfg.n_inner)
    dtype = dtype if dist.world == 1 else dist.gather(dtype)[0]               # rank 0's choice, everywhere
    log(f"processes: {dist.world}, device {dist.device}, {why}")
    mode = check_out_dir(out_dir, cfg, resolved, raw.fingerprint, RESUME_MAY_CHANGE, raw.inputs)   # reads only
    check_sizes(mcfg, len(data.item_raw), {"--beam_size": mcfg.beam_size, "--report_beam_size": cfg.report_beam_size},
                EVAL_BATCH_SIZE)
    splits, stats = split_stage(cfg, mcfg, data, log, seconds)
    index = sids_stage(cfg, dist, raw, data, splits, base, index, log, seconds)
    if dist.is_main:                           # every check has passed: write, after finishing or undoing
        RunFolder(out_dir).recover(raw.inputs)  # what a killed writer left, if anything
    if dist.is_main and mode in ("new", "restart"):
        start_stage(out_dir, mode, resolved, raw, data, index, base, log)
    dist.barrier()
    if not dist.is_main or mode in ("resume", "eval"):
        index = load_index(out_dir, len(data.item_raw))
        log(f"SIDs: loaded from {out_dir}")
    item_tokens = item_token_table(index, mcfg)
    user_buckets = user_bucket_table(data.user_raw, mcfg.n_user_buckets)
    transitions = Transitions.fit(splits["train"], index.n_items)
    run = Run(cfg, resolved, dist, out_dir, splits, index, item_tokens, user_buckets, transitions, given, dtype)
    model = model_stage(mcfg, run, base, log)
    with stop_at_safe_points():                # Ctrl-C and SIGTERM stop between steps, saying how to go on
        trained = None if cfg.eval_only else train_model(model, run)
    return report_stage(model, run, data, trained, stats, raw.source, seconds, start_time)


def start_stage(out_dir: str, mode: str, resolved: dict, raw, data: Dataset, index: sid.SIDIndex, base, log) -> None:
    """The run's first state, published in one step: config.json, the SIDs, data.npz, and in
    run.json the data's fingerprint. A new run replaces whatever state out_dir held."""
    if mode == "restart":
        log(f"{out_dir}: an unfinished attempt of this same run is there (killed?); starting it over "
            "(--resume=true continues it instead)")
    emb_source = resolved["train"]["emb_source"]
    content_sids = base.content_sids if base else bool(raw.item_emb) and emb_source != "both"
    if not content_sids:                       # --add_items places new items by an embeddings file alone
        log("new items: recommend.py --add_items will refuse them (allowed with --item_emb=FILE, not 'both')")
    files = {"config.json": json.dumps(resolved, indent=2).encode(), **index.files(),
             "data.npz": run_data_bytes(data, raw.item_text, content_sids)}
    RunFolder(out_dir).publish(files, data=raw.fingerprint, keep=False)


def load_stage(cfg: TrainConfig, dist: Dist, log, seconds: dict) -> tuple:
    """Read and 5-core the interactions (rank 0 first: it may fetch the data) -> (RawData, Dataset)."""
    tick = time.time()
    with dist.main_first():
        raw = load_data(cfg)
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
        index, moved = extend_index(base, raw.item_emb, n_own, new_rows)
        log(f"init from {cfg.init_from}: its weights and SIDs; {len(new_rows)} new items in this data get "
            f"SIDs from their embeddings ({moved} moved by collision resolution)")
        return cfg, mcfg, base, index, data
    preset, why = choose_preset(data) if cfg.preset == "auto" else (None, "")
    if preset:
        log(f"preset: {preset}, chosen from the data: {why}")
    cfg, mcfg = make_configs(given, auto_preset=preset)
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
    sample = "; eval_users: a sample fixed by the data alone, not by --seed" if "eval_users" in stats else ""
    log("dataset: " + ", ".join(f"{k} {v:,}" for k, v in stats.items()) + f" ({seconds['split']:.1f} s){sample}")
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
    state = read_checkpoint(run.out_dir, "checkpoint.pt", run.resolved, sids_digest(run.index))
    load_weights(model, state, run.path("checkpoint.pt"))
    tick = time.time()
    results = {"config": run.resolved, "dataset": {**stats, "source": source}, "processes": dist.world,
               "compute_dtype": str(run.dtype).removeprefix("torch."),
               "best_epoch": state["best_epoch"], "valid_history": (trained or state)["valid_history"],
               "loss_history": (trained or state)["loss_history"],
               "train_seconds": round((trained or state)["train_seconds"], 1)}
    results.update(rank_splits(model, run, cfg.report_beam_size))
    seconds["eval_valid_and_test"] = time.time() - tick
    results["seconds"] = {k: round(v, 2) for k, v in {**seconds, "train": results["train_seconds"]}.items()}
    if dist.is_main:
        results["baselines"] = {split: baseline_rankings(data, run.splits, split) for split in ("valid", "test")}
        results["total_seconds"] = round(time.time() - start_time, 1)
        out_name = "eval.json" if cfg.eval_only else "results.json"
        files = {out_name: json.dumps(results, indent=2).encode()}
        if trained:
            title = f"{os.path.basename(run.out_dir)}, preset {cfg.preset}, seed {cfg.seed}"
            files["curves.svg"] = curves_svg(trained, title).encode()
        RunFolder(run.out_dir).publish(files)
        print_table(results)
        print(f"wrote {run.path(out_name)}; total {results['total_seconds'] / 60:.1f} min")
    return results


def rank_splits(model: RPG_ED, run: Run, report_beam_size: int) -> dict:
    """Valid and test metrics of the model alone (the protocol's numbers); the transition weight
    chosen on validation NDCG@10 among TRANSITION_WEIGHTS, with its metrics; both again with
    report_beam_size beams (0: not)."""
    results = {}
    for beams in (0, report_beam_size) if report_beam_size else (0,):
        by_split = {split: run.evaluate(model, split, TRANSITION_WEIGHTS, beams) for split in ("valid", "test")}
        best = best_of(by_split["valid"])
        alone = {split: m[0] for split, m in by_split.items()}
        ranked = {"weight": TRANSITION_WEIGHTS[best], **{split: m[best] for split, m in by_split.items()},
                  "valid_ndcg@10_by_weight": {f"{w:g}": m["ndcg@10"] for w, m in zip(TRANSITION_WEIGHTS,
                                                                                     by_split["valid"])}}
        if beams:
            results[f"beam{beams}"], results[f"transitions_beam{beams}"] = alone, ranked
        else:
            results.update(alone, transitions=ranked)
    return results


def train_model(model: RPG_ED, run: Run) -> dict:
    """Epochs of training with validation and early stopping. After every epoch: checkpoint.pt
    when validation improved, and last.pt (everything --resume needs). Returns the progress record."""
    cfg, dist = run.cfg, run.dist
    optimizer = make_optimizer(model, cfg)
    progress = {"epoch": 0, "step": 0, "examples": 0, "best": -1.0, "best_epoch": 0, "bad_evals": 0, "done": False,
                "loss_history": [], "valid_history": [], "train_seconds": 0.0}
    if cfg.resume:
        progress = resume(model, optimizer, run, progress, RESUME_MAY_CHANGE)
    net = model if dist.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    lengths = run.splits["train"].lengths()
    max_history = run.resolved["model"]["max_history"]
    steps_per_epoch = len(epoch_batches(lengths, cfg, max_history, 1))   # the same for every epoch
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)      # --max_steps: fewer
    first_step, session_start, seconds_before = progress["step"], time.time(), progress["train_seconds"]
    clock = RunTime(run, model, first_step, total_steps, steps_per_epoch)
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        if progress["done"] or progress["step"] >= total_steps:
            break
        batches = epoch_batches(lengths, cfg, max_history, epoch)
        seen, tick, loss_sum, loss_rows = 0, time.time(), 0.0, 0
        for b, rows in enumerate(batches):                                     # rows: the global batch
            if progress["step"] >= total_steps:                                # --max_steps
                break
            local, weight = dist.shard(rows)
            lr = lr_at(progress["step"], total_steps, cfg)
            loss = train_step(net, optimizer, run.batch("train", local), weight, lr, dist.device, run.dtype)
            progress["step"] += 1
            finite, stop = dist.sum(torch.tensor([float(math.isfinite(loss.item())), float(bool(stop_requested()))]))
            if finite < dist.world:                                            # every process stops together
                raise ValueError(f"training loss is not finite at step {progress['step']} (epoch {epoch}): "
                                 f"{loss.item()} on this process; lower --lr (now {cfg.lr}) or check the data")
            if stop:
                raise Interrupted(stopped(run, progress))
            seen, progress["examples"] = seen + len(rows), progress["examples"] + len(rows)
            loss_sum, loss_rows = loss_sum + loss.item() * len(local), loss_rows + len(local)
            recorded = progress["step"] % cfg.log_every == 0 or b == len(batches) - 1 or progress["step"] == total_steps
            if recorded or clock.steps.due():                # the mean since the last recorded line: less noisy
                clock.log(epoch, progress["step"], f"loss {loss_sum / loss_rows:.4f} | lr {lr:.2e} | "
                          f"{seen / (time.time() - tick):.0f} ex/s", end_of_epoch=b == len(batches) - 1)
            if recorded:
                progress["loss_history"].append({"step": progress["step"], "examples": progress["examples"],
                                                 "loss": round(loss_sum / loss_rows, 5)})   # this process's rows
                loss_sum, loss_rows = 0.0, 0
        paused = time.time()                                 # validation and checkpoints: not training steps
        improved = validate(model, run, progress, epoch, last=progress["step"] >= total_steps)
        progress["epoch"], progress["train_seconds"] = epoch, seconds_before + time.time() - session_start
        save_epoch(model, optimizer, run, progress, improved)
        clock.steps.start += time.time() - paused
    if stop_requested():                                                       # during the last validation
        raise Interrupted(stopped(run, progress))
    return progress


class RunTime:
    """The run's time as it goes: the steps left at the rate so far, plus the validations and the
    final evaluation to come, timed on a few validation batches before training."""

    def __init__(self, run: Run, model: RPG_ED, first_step: int, total_steps: int, steps_per_epoch: int):
        self.run, self.first_step, self.steps_per_epoch, self.told = run, first_step, steps_per_epoch, False
        self.steps = Progress(total_steps - first_step, every=30)          # besides every log_every steps
        self.evaluation = evaluation_seconds(model, run.splits["valid"], run.index, run.item_tokens, run.user_buckets,
                                             model.config.beam_size, run.dtype, run.dist)
        self.report = 2 * (1 + run.cfg.report_beam_size / model.config.beam_size)   # valid and test, 10 and 20 beams

    def left(self, step: int, epoch: int) -> float:
        """Seconds left after `step`: steps, then validations from `epoch` on, then the final evaluation."""
        cfg = self.run.cfg
        validations = sum(e % cfg.eval_every == 0 or e == cfg.epochs for e in range(epoch, cfg.epochs + 1))
        return self.steps.left(step - self.first_step, self.evaluation * (validations + self.report))

    def log(self, epoch: int, step: int, figures: str, end_of_epoch: bool) -> None:
        """A progress line with the time left; once, after a minute or the first epoch, the whole run's."""
        self.steps.last = time.time()
        self.run.log(f"epoch {epoch} step {step}/{self.first_step + self.steps.total} | {figures} | "
                     f"eta {self.left(step, epoch) / 60:.1f} min", flush=True)
        if self.told or not (end_of_epoch or time.time() - self.steps.start >= 60):
            return
        self.told, cfg, total = True, self.run.cfg, time.time() - self.steps.start + self.left(step, epoch)
        epoch_min = self.steps_per_epoch * (time.time() - self.steps.start) / (step - self.first_step) / 60
        self.run.log(f"time: this run takes about {total / 60:.0f} min here (an epoch {epoch_min:.1f} min, a validation "
                     f"{self.evaluation:.0f} s); shorter: --epochs (now {cfg.epochs}), --eval_every (now "
                     f"{cfg.eval_every}), --eval_users=N, --report_beam_size=0 (now {cfg.report_beam_size})", flush=True)


def stopped(run: Run, progress: dict) -> str:
    """The one line of a run stopped by Ctrl-C or SIGTERM: what out_dir holds, how to go on."""
    command = "python train.py " + " ".join(shlex.quote(as_flag(k, v)) for k, v in run.given.items() if k != "resume")
    saved = (f"{run.path('last.pt')} holds the end of epoch {progress['epoch']}; go on with: {command} --resume=true"
             if progress["epoch"] else f"no checkpoint yet; start again with: {command}")
    return f"stopped by {stop_requested()} at step {progress['step']}; {saved}"


def validate(model: RPG_ED, run: Run, progress: dict, epoch: int, last: bool) -> bool:
    """Every eval_every epochs and at the end: validation metrics into progress, early stopping;
    whether validation NDCG@10 improved."""
    cfg = run.cfg
    if not (epoch % cfg.eval_every == 0 or epoch == cfg.epochs or last):
        return False
    eval_start = time.time()
    metrics = run.evaluate(model, "valid")[0]                           # weight 0: the model alone selects
    progress["valid_history"].append({"epoch": epoch, "examples": progress["examples"], **metrics})
    run.log(f"valid epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) +
            f" | {time.time() - eval_start:.0f} s", flush=True)
    if metrics["ndcg@10"] > progress["best"]:
        progress.update(best=metrics["ndcg@10"], best_epoch=epoch, bad_evals=0)
        return True
    progress["bad_evals"] += 1
    progress["done"] = progress["bad_evals"] >= cfg.patience
    return False


def save_epoch(model: RPG_ED, optimizer: torch.optim.Optimizer, run: Run, progress: dict, improved: bool) -> None:
    """last.pt after every epoch (everything --resume needs), checkpoint.pt when validation improved."""
    cfg, dist = run.cfg, run.dist
    rng = dist.gather({"cpu": torch.get_rng_state(),                    # dropout's streams, to resume exactly
                       "cuda": torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else None})
    if dist.is_main:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": run.resolved,
                 "sids_sha256": sids_digest(run.index), "sids_items": run.index.n_items, "rng": rng, **progress}
        blob = checkpoint_bytes(state)
        try:
            RunFolder(run.out_dir).publish({"last.pt": blob, **({"checkpoint.pt": blob} if improved else {})})
        except ValueError as e:                             # a full disk, say: what was lost, how to go on
            raise ValueError(f"{e}; epoch {progress['epoch']} is lost, --resume=true goes on from the last one saved")
    dist.barrier()
    if progress["done"]:
        run.log(f"early stop: no better validation NDCG@10 in {cfg.patience} evaluations")


# ----------------------------------------------------------------------------------------------
# Training steps: batch order, precision, learning rate, optimiser
# ----------------------------------------------------------------------------------------------

def epoch_batches(lengths: np.ndarray, cfg: TrainConfig, max_history: int, epoch: int) -> list:
    """The global batches of one epoch, a function of (seed, epoch) only: the same on every
    process and after a resume (torch's DistributedSampler seeds the same way)."""
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    return length_batches(lengths, cfg.batch_size, cfg.batch_size * max_history, generator)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, at most a tenth of the run's `total` steps (so a short run
    reaches its peak), then cosine decay to lr * MIN_LR_RATIO. A function of the step, so the step
    is the whole scheduler state."""
    warmup = min(cfg.warmup_steps, total // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
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
    given: dict                      # the flags as given (a stopped run says how to go on with them)
    dtype: torch.dtype               # autocast: bf16 or fp32 (pick_dtype)

    def log(self, *args, **kwargs) -> None:
        if self.dist.is_main:
            print(*args, **kwargs)

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def batch(self, split_name: str, rows: np.ndarray) -> dict:
        return make_batch(self.splits[split_name], rows, self.item_tokens, self.user_buckets, self.dist.device)

    def evaluate(self, model: RPG_ED, split_name: str, weights: tuple = (0.0,), beam_size: int = 0) -> list:
        """Metrics of the beam (beam_size, 0: the model's) ranked with each transition weight."""
        rankers = [TransitionRanker(self.transitions, w) for w in weights]
        return evaluate_split(model, self.splits[split_name], self.index, self.item_tokens, self.user_buckets, rankers,
                              beam_size or model.config.beam_size, self.dtype, self.dist, log=self.log)


# ----------------------------------------------------------------------------------------------
# Command line: --key=value for every field of TrainConfig and RPGEDConfig; presets; --init_from
# ----------------------------------------------------------------------------------------------

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
    sizes = {"--n_digit": (mcfg.n_digit, sid.N_DIGIT), "--codebook_size": (mcfg.codebook_size, sid.CODEBOOK_SIZE)}
    for flag, (value, served) in sizes.items():
        if value != served:
            raise ValueError(f"{flag}: expected {served}: sid.py builds SIDs of {sid.N_DIGIT} digits of "
                             f"{sid.CODEBOOK_SIZE} codes (one uint8 each, packed into a uint32 key), got {value}")
    if mcfg.beam_size < 10:
        raise ValueError(f"--beam_size: expected at least 10 (evaluation ranks 10 items), got {mcfg.beam_size}")
    return tcfg, mcfg


SPARSE_BELOW = 20   # mean interactions per user under which --preset=auto picks "sparse"


def choose_preset(data: Dataset) -> tuple[str, str]:
    """--preset=auto: the preset for this data, and why. What separates the two CPU presets is history
    length, which sets the cost of every example."""
    per_user = data.n_interactions / len(data.user_raw)
    if per_user < SPARSE_BELOW:
        return "sparse", (f"{per_user:.1f} interactions per user (< {SPARSE_BELOW}): short histories are cheap "
                          "with dynamic batches, so a wider, deeper model with item-id embeddings, trained longer")
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


if __name__ == "__main__":
    run_main(main)
