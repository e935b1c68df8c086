"""Process and file operations of RPG_ED: end-to-end runs, checkpoints, kills and resume, several
processes (DDP, torchrun), the run folder and recommend.py, the experiments, bad input and the
command lines. The oracle tests of each module are in test_rpg_ed.py, whose `python test_rpg_ed.py`
runs this file too; its helpers (tiny models, generated interactions) are imported from there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.dom.minidom
from collections import Counter

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import beam
import bench
import cli
import dataset
import embeddings
import evaluate
import experiments
import recommend
import rpg_ed
import runs
import sid
import train
from test_rpg_ed import (FAST, HERE, INTER_HEADER, TINY, _Bomb, _run_steps, _step_setup, _write, interactions, make_batch,
                         re_escape, small_index, tiny_model, write_formats)


# ----------------------------------------------------------------------------------------------
# train.py: end-to-end runs, checkpoints, resume, several processes, flags and presets, the run folder
# ----------------------------------------------------------------------------------------------

def configs(argv: list, auto_preset: str | None = None) -> tuple:
    """train.py's flags -> (TrainConfig, RPGEDConfig), as train.main makes them."""
    return train.make_configs(cli.parse_flags(argv, train.TrainConfig, rpg_ed.RPGEDConfig), auto_preset)


TINY_RUN = ["--epochs=2", "--eval_every=1", "--n_embd=16", "--n_head=2", "--n_inner=32", "--encoder_n_layer=1",
            "--decoder_n_layer=1", "--max_history=5", "--batch_size=32", "--warmup_steps=5", "--n_user_buckets=50",
            "--log_every=1000", "--emb_source=both", "--dtype=fp32"]


@FAST
@given(st.integers(1, 3000), st.integers(0, 2500))
def test_warmup_is_at_most_a_tenth_of_the_run_and_the_peak_is_reached(total, warmup_steps):
    cfg = train.TrainConfig(lr=1e-3, warmup_steps=warmup_steps)
    lrs = [train.lr_at(step, total, cfg) for step in range(total)]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1e-3) and peak <= total // 10              # a short run reaches its lr
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))              # rising until then
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))              # then never rising
    assert lrs[-1] >= 1e-3 * train.MIN_LR_RATIO - 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_end_to_end_run_is_deterministic(tmp_path, dtype):
    rows = interactions(1, n_users=40, n_items=15)
    data_path = write_formats(tmp_path, rows)["inter"]
    (tmp_path / "d.item").write_text("item_id:token\tmovie_title:token_seq\n" +
                                     "".join(f"{100 + i}\tfilm {'red blue'[i % 2 * 4:]} {i % 3}\n" for i in range(15)))
    results = []
    for run in ("a", "b"):
        out = tmp_path / run
        results.append(train.main([f"--data={data_path}", f"--out_dir={out}"] + TINY_RUN + [f"--dtype={dtype}"]))
        assert {"config.json", "checkpoint.pt", "results.json", "item_id2tokens.npy", "tokens2item.pkl"} <= set(os.listdir(out))
    assert results[0]["test"] == results[1]["test"] and results[0]["valid"] == results[1]["valid"]
    assert np.array_equal(np.load(tmp_path / "a" / "item_id2tokens.npy"), np.load(tmp_path / "b" / "item_id2tokens.npy"))
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(saved["test"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert set(saved["baselines"]["test"]) == {"popularity", "markov"}
    # the curves: one loss point per log line and one NDCG point per evaluation, against examples seen
    losses, valids = saved["loss_history"], saved["valid_history"]
    assert len(losses) >= 1 and len(valids) >= 1
    assert all(a["examples"] < b["examples"] and a["step"] < b["step"] for a, b in zip(losses, losses[1:]))
    assert losses[-1]["examples"] == valids[-1]["examples"]                 # the last epoch is evaluated
    svg = (tmp_path / "a" / "curves.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<polyline") == 2 and svg.count("<circle") == len(valids)
    xml.dom.minidom.parseString(svg)                                           # well-formed XML


@pytest.mark.slow
def test_max_steps_and_eval_users(tmp_path):
    data_path = write_formats(tmp_path, interactions(1, n_users=40, n_items=15))["inter"]
    results = [train.main([f"--data={data_path}", f"--out_dir={tmp_path / str(seed)}", f"--seed={seed}", "--max_steps=3",
                           "--eval_users=25"] + TINY_RUN) for seed in (0, 1)]
    for run in results:
        state = load_ckpt(str(tmp_path / str(run["config"]["train"]["seed"]) / "last.pt"))
        assert state["step"] == 3 and state["epoch"] == 1 and len(state["valid_history"]) == 1
        assert run["dataset"]["eval_users"] == 25 and set(run["seconds"]) >= {"load", "split", "sids", "train"}
    assert results[0]["baselines"] == results[1]["baselines"]                   # the same users whatever the seed
    every = train.main([f"--data={data_path}", f"--out_dir={tmp_path / 'all'}", "--max_steps=1"] + TINY_RUN)
    assert every["baselines"] != results[0]["baselines"] and "eval_users" not in every["dataset"]
    with pytest.raises(ValueError, match="--max_steps: expected 0 .* got -1"):
        configs(["--max_steps=-1"])


@pytest.mark.slow
def test_fewer_than_ten_items_trains_and_evaluates(tmp_path):
    rows = [(f"u{u}", str(100 + (u + t) % 6), t) for u in range(30) for t in range(6)]   # 6 items
    data_path = write_formats(tmp_path, rows)["inter"]
    results = train.main([f"--data={data_path}", f"--out_dir={tmp_path / 'run'}"] + TINY_RUN + ["--epochs=1"])
    assert results["dataset"]["items"] == 6 and 0 <= results["test"]["recall@10"] <= 1
    assert results["baselines"]["test"]["popularity"]["recall@10"] == 1.0   # all 6 items ranked


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_names_the_step(tmp_path, monkeypatch):
    data_path = write_formats(tmp_path, interactions(1, n_users=40, n_items=15))["inter"]
    real_step = train.train_step
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(ValueError, match="training loss is not finite at step 3 \\(epoch 1\\)"):
        train.main([f"--data={data_path}", f"--out_dir={tmp_path / 'run'}"] + TINY_RUN)


def _tiny_checkpoint(folder, **changes) -> tuple[str, dict]:
    """A checkpoint file of a tiny config, and the `resolved` config of a run that uses it."""
    resolved = {"train": dataclasses.asdict(train.TrainConfig()), "model": dataclasses.asdict(rpg_ed.RPGEDConfig(**TINY))}
    state = {"model": {}, "config": resolved, "sids_sha256": "0" * 64, **changes}
    path = os.path.join(str(folder), "checkpoint.pt")
    with open(path, "wb") as f:
        f.write(runs.checkpoint_bytes(state))
    return path, resolved


CHECKPOINT_BYTES = None


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_truncated_checkpoint_is_a_clear_error(data):
    global CHECKPOINT_BYTES
    with tempfile.TemporaryDirectory() as folder:
        if CHECKPOINT_BYTES is None:
            path, _ = _tiny_checkpoint(folder, model=tiny_model().state_dict())
            CHECKPOINT_BYTES = open(path, "rb").read()
        n = data.draw(st.integers(0, len(CHECKPOINT_BYTES) - 1))
        with pytest.raises(ValueError, match="not a readable checkpoint, truncated or corrupt"):
            load_ckpt(_write(folder, "c.pt", CHECKPOINT_BYTES[:n]))


def test_crafted_checkpoint_is_refused_and_its_payload_does_not_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"version": 1, "model": _Bomb(str(target))}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_ckpt(str(path))
    assert not target.exists()


RESUME_RUN = ["--epochs=3", "--eval_every=1", "--n_embd=16", "--n_head=2", "--n_inner=32", "--encoder_n_layer=1",
              "--decoder_n_layer=1", "--max_history=5", "--batch_size=16", "--warmup_steps=5", "--n_user_buckets=50",
              "--log_every=1000", "--patience=5", "--dropout=0.3",   # dropout uses the RNG
              "--dtype=fp32"]


# the run that is killed sleeps after writing its first last.pt, so SIGKILL always lands there
_SLEEP_AFTER_FIRST_CHECKPOINT = """
import sys, time, runs, train
publish = runs.RunFolder.publish
def publish_then_sleep(self, files, *args, **kwargs):
    publish(self, files, *args, **kwargs)
    if "last.pt" in files:
        print("checkpoint written", flush=True)
        time.sleep(600)
runs.RunFolder.publish = publish_then_sleep
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    data_path = write_formats(tmp_path, interactions(2, n_users=30, n_items=12))["inter"]
    args = [f"--data={data_path}"] + RESUME_RUN
    whole = train.main(args + [f"--out_dir={tmp_path / 'whole'}"])

    proc = subprocess.Popen([sys.executable, "-c", _SLEEP_AFTER_FIRST_CHECKPOINT] + args +
                            [f"--out_dir={tmp_path / 'killed'}"], cwd=HERE, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:                              # wait for the first checkpoint, then kill
        if line.startswith("checkpoint written"):
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    first = load_ckpt(str(tmp_path / "killed" / "last.pt"))
    assert first["epoch"] == 1 and not (tmp_path / "killed" / "results.json").exists()

    resumed = train.main(args + [f"--out_dir={tmp_path / 'killed'}", "--resume=true"])
    a = load_ckpt(str(tmp_path / "whole" / "last.pt"))
    b = load_ckpt(str(tmp_path / "killed" / "last.pt"))
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert resumed["valid"] == whole["valid"] and resumed["test"] == whole["test"]
    with pytest.raises(ValueError, match="model.n_embd is 16 there, 32 here"):   # another config, same index
        train.main(args + [f"--out_dir={tmp_path / 'killed'}", "--resume=true", "--n_embd=32"])


# the run that is stopped pauses after its first last.pt, so the signal always lands in epoch 2
_PAUSE_AFTER_FIRST_CHECKPOINT = """
import sys, time, cli, runs, train
publish, paused = runs.RunFolder.publish, []
def publish_then_pause(self, files, *args, **kwargs):
    publish(self, files, *args, **kwargs)
    if "last.pt" in files and not paused:
        paused.append(True)
        print("checkpoint written", flush=True)
        time.sleep(3)
runs.RunFolder.publish = publish_then_pause
cli.run_main(train.main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_in_one_line_and_resume_ends_as_an_uninterrupted_run(tmp_path, signum):
    data_path = write_formats(tmp_path, interactions(2, n_users=30, n_items=12))["inter"]
    args = [f"--data={data_path}"] + RESUME_RUN
    whole = train.main(args + [f"--out_dir={tmp_path / 'whole'}"])
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_AFTER_FIRST_CHECKPOINT] + args +
                            [f"--out_dir={tmp_path / 'stopped'}"], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("checkpoint written"):
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"stopped by {signum.name} at step ") and "holds the end of epoch 1" in err, err
    assert err.rstrip().endswith(" --resume=true") and f"--out_dir={tmp_path / 'stopped'}" in err, err
    assert load_ckpt(str(tmp_path / "stopped" / "last.pt"))["epoch"] == 1
    resumed = train.main(args + [f"--out_dir={tmp_path / 'stopped'}", "--resume=true"])
    assert resumed["valid"] == whole["valid"] and resumed["test"] == whole["test"]
    assert resumed["transitions"] == whole["transitions"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_step_worker(rank: int, port: int, out_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    dist = cli.init_distributed("cpu")
    model, optimizer, split, item_tokens, buckets = _step_setup()
    net = torch.nn.parallel.DistributedDataParallel(model)
    _run_steps(model, optimizer, split, item_tokens, buckets, net, dist)
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    torch.distributed.destroy_process_group()


def test_ddp_steps_equal_single_process_steps_on_the_union_batch(tmp_path):
    """2 processes, each on its half of a global batch (and 2 + 1 rows of an uneven one), end with
    the parameters of one process that trains on the whole batches."""
    out = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_step_worker, args=(_free_port(), out), nprocs=2, start_method="spawn")
    model, optimizer, split, item_tokens, buckets = _step_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run_steps(model, optimizer, split, item_tokens, buckets, model, cli.Dist(0, 1, torch.device("cpu")))
    ddp = torch.load(out, weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp[key], value, rtol=0, atol=1e-5, msg=key)   # Adam amplifies float noise in ~0 gradients
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())   # it did train


def _torchrun(n: int, args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           os.path.join(HERE, "train.py")] + args, cwd=HERE, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_torchrun_bad_input_is_one_line_per_process(tmp_path):
    run = _torchrun(2, [f"--data={tmp_path / 'nowhere.csv'}", f"--out_dir={tmp_path / 'run'}"])
    # the two processes share stderr, so their lines may interleave; process 1 prints one line, or
    # none when torchrun stops it first; neither prints a traceback ("[rank1]: Traceback ...")
    assert run.returncode != 0 and f"error: --data: {tmp_path / 'nowhere.csv'} does not exist" in run.stderr
    assert run.stderr.count("error: ") - run.stderr.count("error: process 1 stopped: another process failed") == 1
    assert "[rank" not in run.stderr, run.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluate_exactly_like_one(tmp_path):
    data_path = write_formats(tmp_path, interactions(1, n_users=40, n_items=15))["inter"]
    args = [f"--data={data_path}", f"--out_dir={tmp_path / 'out'}"] + TINY_RUN + ["--emb_source=cf"]
    run = _torchrun(2, args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("dataset:") == 1                              # only rank 0 logs
    state = load_ckpt(str(tmp_path / "out" / "checkpoint.pt"))
    model = rpg_ed.RPG_ED(rpg_ed.RPGEDConfig(**state["config"]["model"]))
    model.load_state_dict(state["model"])                                 # the unwrapped module's state_dict
    trained = json.loads((tmp_path / "out" / "results.json").read_text())
    assert trained["processes"] == 2

    eval_args = args + ["--eval_only=true"]                               # histories of many lengths: many batches
    run = _torchrun(2, eval_args)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "out" / "eval.json").read_text())
    one = train.main(eval_args)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["valid"] == one["valid"] and two["test"] == one["test"]
    assert one["test"] == trained["test"]


@pytest.mark.parametrize("argv, fragment", [
    (["--no_such_key=1"], "unknown option --no_such_key"),
    (["--epochs=two"], "--epochs: expected int, got 'two'"),
    (["--overwrite=maybe"], "--overwrite: expected bool"),
    (["--preset=huge"], "--preset: expected one of"),
    (["epochs=2"], "expected --key=value"),
    (["--n_embd=30", "--n_head=4"], "--n_embd (30) must be divisible by n_head (4)"),
    (["--emb_source=image"], "--emb_source: expected one of"),
    (["--dtype=fp16"], "--dtype: expected one of ('auto', 'bf16', 'fp32'), got 'fp16'"),
    (["--seed=-1"], "--seed: expected 0 or a positive int, got -1"),
    (["--batch_size=0"], "--batch_size: expected a positive int, got 0"),
    (["--beam_size=5"], "--beam_size: expected at least 10 (evaluation ranks 10 items), got 5"),   # before any epoch
    (["--report_beam_size=5"], "--report_beam_size: expected 0 (off) or at least 10"),
    (["--dropout=1.0"], "--dropout: expected a probability in [0, 1), got 1.0"),
    (["--n_digit=3"], "--n_digit: expected 4: sid.py builds SIDs of 4 digits of 256 codes"),
    (["--codebook_size=128"], "--codebook_size: expected 256"),
])
def test_cli_rejects_bad_arguments(argv, fragment):
    with pytest.raises(ValueError, match=re_escape(fragment)):
        configs(argv)


@pytest.mark.parametrize("make, fragment", [
    (lambda: train.TrainConfig(dtype="fp64"), "--dtype: expected one of"),
    (lambda: train.TrainConfig(epochs="7"), "--epochs: expected int, got '7'"),
    (lambda: train.TrainConfig(lr=float("nan")), "--lr: expected a finite number"),
    (lambda: recommend.RecommendConfig(run_dir="r", user="u", transition_weight=-2.0),
     "--transition_weight: expected -1 (the run's) or a number >= 0, got -2.0"),
    (lambda: train.TrainConfig(preset="huge"), "--preset: expected one of"),
])
def test_configs_check_their_fields(make, fragment):
    with pytest.raises(ValueError, match=re_escape(fragment)):
        make()


@pytest.mark.parametrize("bf16_seconds, auto_picks", [(10.0, torch.float32), (0.5, torch.bfloat16), (0.8, torch.float32)])
def test_dtype_auto_takes_bf16_only_where_it_is_measured_clearly_faster(monkeypatch, bf16_seconds, auto_picks):
    timed = []
    def fake_seconds(dtype, device, m, k, n, budget=0.3):           # fp32 takes 1 s, bf16 `bf16_seconds`
        timed.append(dtype)
        return bf16_seconds if dtype == torch.bfloat16 else 1.0
    monkeypatch.setattr(cli, "matmul_seconds", fake_seconds)
    cpu = torch.device("cpu")
    assert cli.pick_dtype("fp32", cpu, 8, 16) == (torch.float32, "compute dtype float32") and not timed
    dtype, why = cli.pick_dtype("auto", cpu, 8, 16)
    assert dtype == auto_picks and f"{1 / bf16_seconds:.2f}x as fast in bf16" in why
    dtype, why = cli.pick_dtype("bf16", cpu, 8, 16)                  # asked for: runs, warns when slower
    assert dtype == torch.bfloat16 and (f"bf16 is {bf16_seconds:.1f}x slower" in why) == (bf16_seconds > 1)


def test_progress_is_due_by_time_and_says_the_rate_and_the_time_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(cli.time, "time", lambda: now[0])
    progress = cli.Progress(total=100, every=30)
    now[0] = 110.0
    assert not progress.due()
    now[0] = 130.0                                                     # 25 units in 30 s: 75 more take 90 s
    assert progress.due() and progress.left(25, later=60) == pytest.approx(90 + 60)
    assert progress.line(25, "users", later=60) == "25/100 users | 1 users/s | 30 s so far, about 2.5 min left"
    assert not progress.due()                                          # a line was just written


def test_cli_overrides_and_presets():
    cfg, mcfg = configs(["--preset=seed", "--lr=0.5", "--n_embd=64", "--attn_pdrop=0"])
    assert cfg.lr == 0.5 and cfg.epochs == 200 and mcfg.n_embd == 64 and mcfg.attn_pdrop == 0
    assert mcfg.encoder_n_layer == 4 and mcfg.n_inner == 1024                 # seed architecture
    cfg, mcfg = configs(["--epochs=3"], auto_preset="sparse")         # auto: the data's preset, flags win
    assert cfg.preset == "sparse" and cfg.epochs == 3 and mcfg.n_embd == 128 and cfg.dtype == "auto"
    cfg, _ = configs(["--preset=cpu"], auto_preset="sparse")          # an explicit preset wins
    assert cfg.preset == "cpu" and cfg.epochs == 7 and cfg.dtype == "fp32"


def test_auto_preset_follows_interactions_per_user():
    def four_users(per_user: int) -> dataset.Dataset:
        return dataset.Dataset.from_sequences([np.arange(per_user)] * 4, list("abcd"), [str(i) for i in range(per_user)])
    assert train.choose_preset(four_users(9))[0] == "sparse"
    assert train.choose_preset(four_users(train.SPARSE_BELOW))[0] == "cpu"


def _files(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def load_ckpt(path) -> dict:
    """A checkpoint file's dict (runs.load_checkpoint parses bytes already read)."""
    return runs.load_checkpoint(open(path, "rb").read(), str(path), needs=())


@pytest.mark.slow
def test_a_new_run_into_another_runs_folder_changes_nothing(tmp_path):
    data_path = write_formats(tmp_path, interactions(1, n_users=40, n_items=15))["inter"]
    out = tmp_path / "run"
    train.main([f"--data={data_path}", f"--out_dir={out}"] + TINY_RUN + ["--epochs=1"])
    before = _files(out)
    for other in (["--seed=1"], ["--n_embd=32"], ["--emb_source=cf"]):
        with pytest.raises(ValueError, match="holds another run .*--overwrite=true"):
            train.main([f"--data={data_path}", f"--out_dir={out}"] + TINY_RUN + ["--epochs=1"] + other)
        assert _files(out) == before
    (out / ".tmp-.pending-checkpoint.ptabc").write_bytes(b"half a checkpoint")  # a killed writer's leftover
    (out / "notes.txt").write_text("mine")                                      # not ours: kept
    train.main([f"--data={data_path}", f"--out_dir={out}", "--overwrite=true", "--seed=1"] + TINY_RUN + ["--epochs=1"])
    assert not (out / ".tmp-.pending-checkpoint.ptabc").exists() and (out / "notes.txt").read_text() == "mine"
    assert _files(out)["config.json"] != before["config.json"]
    mask = cli._umask()
    for name in ("config.json", "checkpoint.pt", "item_id2tokens.npy", "results.json"):
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~mask            # the umask's, not mkstemp's 0600


@pytest.mark.slow
def test_bad_input_at_any_stage_leaves_the_run_folder_byte_for_byte(tmp_path):
    data_path = write_formats(tmp_path, interactions(1, n_users=40, n_items=15))["inter"]
    out = tmp_path / "run"
    base = [f"--data={data_path}", f"--out_dir={out}"] + TINY_RUN + ["--epochs=1"]
    train.main(base)
    before = _files(out)
    np.save(tmp_path / "short.npy", np.ones((3, 4), np.float32))              # 3 rows for 15 items
    (tmp_path / "other.inter").write_text("".join(open(data_path).readlines()[:-1]))    # one row less
    (tmp_path / "empty").mkdir()
    cases = [(["--lr=-1"], "--lr: expected > 0"),                                            # flags
             ([f"--data={tmp_path / 'nowhere.csv'}"], "does not exist"),                       # data
             (["--report_beam_size=200000"], "--report_beam_size: expected at most 100"),      # sizes
             (["--n_user_buckets=2000000000"], "parameters need about"),                       # memory
             ([f"--item_emb={tmp_path / 'short.npy'}"], "expected shape [15 items, D]"),        # embeddings
             ([f"--init_from={tmp_path / 'empty'}"], "not a run folder"),                      # --init_from
             ([f"--data={tmp_path / 'other.inter'}", "--resume=true"], "sha256 changed"),      # other data
             ([f"--data={tmp_path / 'other.inter'}", "--eval_only=true"], "sha256 changed")]
    for extra, fragment in cases:
        again = "--resume=true" not in extra and "--eval_only=true" not in extra
        with pytest.raises(ValueError, match=re_escape(fragment)):
            train.main(base + extra + (["--overwrite=true"] if again else []))
        assert _files(out) == before, extra
        with pytest.raises(ValueError):                                   # without --overwrite: refused too
            train.main(base + extra)
        assert _files(out) == before, extra
    shutil.copy(data_path, tmp_path / "moved.inter")                      # the same bytes elsewhere: accepted
    train.main([f"--data={tmp_path / 'moved.inter'}", f"--out_dir={out}", "--eval_only=true"] + TINY_RUN + ["--epochs=1"])
    assert "eval.json" in runs.RunFolder(str(out)).read(("eval.json",))[0]["files"]


def test_item_id_embeddings_are_saved_with_the_run_and_n_items_is_not_a_flag(tmp_path):
    data_path = write_formats(tmp_path, interactions(2, n_users=30, n_items=12))["inter"]
    args = [f"--data={data_path}", f"--out_dir={tmp_path / 'out'}"] + TINY_RUN + ["--emb_source=cf", "--item_id_emb=true"]
    trained = train.main(args)
    assert trained["config"]["model"]["n_items"] == trained["dataset"]["items"]
    assert train.main(args + ["--eval_only=true"])["test"] == trained["test"]
    run = runs.load_run(str(tmp_path / "out"))                # no set_items here: the keys come from the checkpoint
    codes = torch.from_numpy(run.index.item_codes.astype(np.int64))
    assert torch.equal(run.model.item_rows(codes[None] + run.model.digit_offsets)[0], torch.arange(len(codes)))
    with pytest.raises(ValueError, match="--n_items: expected no value"):
        train.make_configs({"n_items": 5})
    with pytest.raises(ValueError, match="--item_id_emb: the model of --init_from has n_items=12"):
        train.continue_config({"item_id_emb": False}, trained["config"])
    assert train.continue_config({"preset": "cpu"}, trained["config"])[0].item_id_emb    # as the model has


class Killed(BaseException):
    """A kill -9 at a file operation: nothing after it runs, not even a cleanup handler."""


@contextlib.contextmanager
def killed_at(k: int, under: str):
    """The k-th os.replace / os.remove / os.unlink (0-based) of a path under `under` raises Killed,
    and so does every later one, as if the process had died there. Yields {"ops": operations done}."""
    real = {name: getattr(os, name) for name in ("replace", "remove", "unlink")}
    seen = {"ops": 0, "killed": False}

    def guarded(op):
        def run(*args, **kwargs):
            if any(str(a).startswith(under) for a in args[:2]):
                if seen["killed"] or seen["ops"] == k:
                    seen["killed"] = True
                    raise Killed()
                seen["ops"] += 1
            return op(*args, **kwargs)
        return run
    for name, op in real.items():
        setattr(os, name, guarded(op))
    try:
        yield seen
    finally:
        for name, op in real.items():
            setattr(os, name, op)


def _state(out: str):
    """What a reader sees after a kill: None (no run) or the verified manifest."""
    folder = runs.RunFolder(out)
    with folder.lock():                         # the next writer finishes or undoes the killed one's step
        manifest = folder.recover({})
    if manifest is not None:
        folder.read(tuple(manifest["files"]))
        assert not [f for f in os.listdir(out) if f.startswith((".tmp-", runs.PENDING))]
    return manifest


@pytest.mark.slow
def test_a_kill_at_any_file_operation_of_train_leaves_the_old_run_or_the_new(tmp_path):
    """A new run over a finished one (--overwrite=true), killed at each file operation in turn:
    the folder is the old run, or the new run at some step (which a rerun of the command starts
    over, or which is finished and loads)."""
    data_path = write_formats(tmp_path, interactions(1, n_users=40, n_items=15))["inter"]
    old = str(tmp_path / "old")
    train.main([f"--data={data_path}", f"--out_dir={old}"] + TINY_RUN + ["--epochs=1"])
    old_manifest = runs.RunFolder(old).manifest()
    out = str(tmp_path / "run")
    argv = [f"--data={data_path}", f"--out_dir={out}", "--overwrite=true", "--seed=3"] + TINY_RUN
    states, k = set(), 0
    while True:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(old, out)
        with killed_at(k, out) as seen:
            try:
                train.main(argv)
            except Killed:
                pass
        manifest = _state(out)
        if manifest == old_manifest:
            states.add("old")
            assert runs.load_run(out).config["train"]["seed"] == 0
        else:
            assert json.load(open(os.path.join(out, "config.json")))["train"]["seed"] == 3
            states.add("finished" if "results.json" in manifest["files"] else "unfinished")
            if "results.json" in manifest["files"]:
                runs.load_run(out)
            elif k % 4 == 0:                                          # a rerun starts it over (a sample of k)
                train.main(argv[:2] + argv[3:])
                assert "results.json" in runs.RunFolder(out).read(("results.json",))[0]["files"]
        if not seen["killed"]:
            break
        k += 1
    assert states == {"old", "unfinished", "finished"} and k > 10, (states, k)


@pytest.mark.slow
def test_a_kill_at_any_file_operation_of_add_items_or_out_leaves_the_old_state_or_the_new(group_run, tmp_path):
    good = group_run["out"]
    old_manifest = runs.RunFolder(good).manifest()
    emb, ids = group_run["emb"][:3], ["n1", "n2", "n3"]
    k, states = 0, set()
    while True:
        out = _copy_run(group_run, tmp_path / f"add{k}")
        with killed_at(k, out) as seen:
            try:
                recommend.add_items(out, emb, ids)
            except Killed:
                pass
        manifest = _state(out)
        run = runs.load_run(out)
        states.add("old" if manifest == old_manifest else "new")
        assert run.index.n_items == (36 if manifest == old_manifest else 39)
        if manifest == old_manifest:
            recommend.add_items(out, emb, ids)                          # the rerun
            assert runs.load_run(out).index.n_items == 39
        if not seen["killed"]:
            break
        k += 1
    assert states == {"old", "new"}
    recs = tmp_path / "recs.jsonl"
    for overwrite in (False, True):
        k = 0
        while True:
            temporary = lambda: {f for f in os.listdir(tmp_path) if f.startswith(".tmp-")}
            left = temporary()                                   # killed writes' files: not this one's to remove
            with killed_at(k, str(tmp_path)) as seen:
                try:
                    recommend.main([f"--run_dir={good}", "--all=true", f"--out={recs}", f"--overwrite={overwrite}"])
                except Killed:
                    pass
            text = recs.read_text() if recs.exists() else ""
            assert text == "" or text.endswith("\n") and len(text.splitlines()) == len(runs.load_run(good).user_raw)
            assert temporary() == left or seen["killed"] and temporary() >= left
            if not seen["killed"]:
                break
            k += 1


@pytest.mark.slow
def test_out_dir_that_is_a_file_is_one_error_line(tmp_path):
    data_path = write_formats(tmp_path, interactions(1, n_users=40, n_items=15))["inter"]
    (tmp_path / "a_file").write_text("x")
    run = subprocess.run([sys.executable, "train.py", f"--data={data_path}", f"--out_dir={tmp_path / 'a_file'}"] + TINY_RUN,
                         cwd=HERE, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.strip().endswith("as a folder (File exists)"), run.stderr[-500:]
    assert (tmp_path / "a_file").read_text() == "x"


# ----------------------------------------------------------------------------------------------
# recommend.py: load a finished run, recommend, add items, continue training
# ----------------------------------------------------------------------------------------------

N_GROUPS, N_SLOTS = 12, 4


GROUP_RUN = ["--preset=cpu", "--epochs=8", "--eval_every=4", "--n_embd=16", "--n_head=2", "--n_inner=32",
             "--encoder_n_layer=1", "--decoder_n_layer=1", "--max_history=5", "--batch_size=32", "--warmup_steps=5",
             "--n_user_buckets=50", "--log_every=1000", "--lr=1e-2", "--report_beam_size=0", "--emb_source=cf",
             "--dtype=fp32"]


def group_embeddings(seed: int = 0) -> np.ndarray:
    """Item (g, s) of N_GROUPS x N_SLOTS: dims 0-5 say its group, dims 6-7 its slot. OPQ keeps the
    identity rotation on such data, so the first three SID digits name the group, the last the slot."""
    rng = np.random.default_rng(seed)
    groups, slots = rng.standard_normal((N_GROUPS, 6)) * 10, rng.standard_normal((N_SLOTS, 2))
    return np.concatenate([np.repeat(groups, N_SLOTS, 0), np.tile(slots, (N_GROUPS, 1))], 1).astype(np.float32)


def group_raw(g: int, s: int) -> str:
    return f"i{g:02d}{s}"


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    """A tiny trained run whose SIDs come from an embeddings file alone. Every user stays within one
    group of items, so the model learns "the next item is in the group of the history". Slot
    g % N_SLOTS of group g is left out of the data: the held-out items, to add later."""
    folder = tmp_path_factory.mktemp("group_run")
    rng = np.random.default_rng(0)
    emb = group_embeddings()
    kept = [(g, s) for g in range(N_GROUPS) for s in range(N_SLOTS) if s != g % N_SLOTS]
    rows = []
    for u in range(120):
        g = u % N_GROUPS
        slots = [s for s in range(N_SLOTS) if s != g % N_SLOTS]
        rows += [(f"u{u:03d}", group_raw(g, int(rng.choice(slots))), t) for t in range(6)]
    (folder / "d.inter").write_text(INTER_HEADER + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    order = sorted(range(len(kept)), key=lambda k: group_raw(*kept[k]))           # rows in sorted id order
    np.save(folder / "d_content.npy", emb[[kept[k][0] * N_SLOTS + kept[k][1] for k in order]])
    out = folder / "run"
    train.main([f"--data={folder / 'd.inter'}", f"--out_dir={out}"] + GROUP_RUN)
    held_out = [(g, g % N_SLOTS) for g in range(N_GROUPS)]
    return {"folder": folder, "out": str(out), "emb": emb, "held_out": held_out}


def _copy_run(run: dict, dest) -> str:
    shutil.copytree(run["out"], dest)
    return str(dest)


@pytest.mark.slow
def test_added_items_are_recommended_when_the_history_points_to_their_group(group_run, tmp_path):
    out = _copy_run(group_run, tmp_path / "run")
    before = runs.load_run(out)
    new_ids = [group_raw(g, s) for g, s in group_run["held_out"]]
    new_emb = group_run["emb"][[g * N_SLOTS + s for g, s in group_run["held_out"]]]
    histories = [before.item_ids([group_raw(g, (s + 1) % N_SLOTS), group_raw(g, (s + 2) % N_SLOTS)])
                 for g, s in group_run["held_out"]]
    users = [f"new{g}" for g in range(N_GROUPS)]
    old_items, old_scores = recommend.recommend(before, histories, users, new_share=0.3)
    assert "no item was added after training" in recommend.new_share_note(before, 0.3, old_scores)
    assert recommend.add_items(out, new_emb, new_ids, [f"added {i}" for i in new_ids]) == 0
    after = runs.load_run(out)
    assert after.index.n_items == before.index.n_items + N_GROUPS
    assert np.array_equal(after.index.item_codes[:before.index.n_items], before.index.item_codes)  # old SIDs kept
    assert (after.index.item_codes[before.index.n_items:, :3] ==
            before.index.item_codes[before.item_ids([group_raw(g, (s + 1) % N_SLOTS) for g, s in group_run["held_out"]]), :3]).all()
    items, scores = recommend.recommend(after, histories, users)
    new_item = after.item_ids(new_ids)
    assert not np.isin(old_items, new_item).any()
    hits = (items == new_item[:, None]).any(1)            # in the top 10 of 48 items, for every group
    assert hits.all(), after.item_raw[items]
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    assert after.item_title[new_item[0]] == f"added {new_ids[0]}"
    mixed, mixed_scores = recommend.recommend(after, histories, users, new_share=0.3, transition_weight=0.0)
    plain, plain_scores = recommend.recommend(after, histories, users, transition_weight=0.0)
    assert not np.array_equal(mixed, plain) and recommend.new_share_note(after, 0.3, mixed_scores) == ""
    for row, row_scores, beam_row, beam_scores in zip(mixed.tolist(), mixed_scores, plain.tolist(), plain_scores):
        for item, score in zip(row, row_scores):             # a generated item keeps its score, an inserted one NaN
            assert np.isnan(score) if item not in beam_row else score == beam_scores[beam_row.index(item)]


def slow_with_new_items(items, codes, item_codes, first_new, n_new):
    """TIGER's cold-start rule one user and one generated SID at a time (the oracle)."""
    out = []
    for row, row_codes in zip(items.tolist(), codes.tolist()):
        merged, used = [], 0
        for item, code in zip(row, row_codes):
            merged.append(item)
            if item < 0:
                continue
            for added in range(first_new, len(item_codes)):
                if (used < n_new and list(item_codes[added, :3]) == code[:3] and added not in row
                        and added not in merged):
                    merged.append(added)
                    used += 1
        out.append(merged[:len(row)])
    return np.array(out)


@FAST
@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(0, 4))
def test_new_item_rule_equals_the_per_user_loop(seed, k, n_new):
    rng = np.random.default_rng(seed)
    codes = np.unique(np.concatenate([rng.integers(0, 2, (40, 3)), rng.integers(0, 8, (40, 1))], 1), axis=0)
    codes = codes[rng.permutation(len(codes))]                           # 8 prefixes: many shared
    index = sid.SIDIndex(codes)
    first_new = int(rng.integers(0, index.n_items // 2 + 1))
    U = int(rng.integers(1, 5))
    pool = first_new if first_new >= k and rng.random() < 0.8 else index.n_items   # mostly trained items
    items = np.stack([rng.permutation(pool)[:k] for _ in range(U)])
    items[:, k - int(rng.integers(0, 2)):] = -1                          # sometimes padding at the end
    sids = np.where(items[..., None] >= 0, index.item_codes[np.maximum(items, 0)].astype(np.int64), -1)
    fast = recommend.with_new_items(items, sids, index, first_new, n_new)
    assert np.array_equal(fast, slow_with_new_items(items, sids, index.item_codes, first_new, n_new))


@pytest.mark.slow
def test_recommend_a_batch_equals_its_rows_one_at_a_time(group_run):
    run = runs.load_run(group_run["out"])
    rng = np.random.default_rng(1)
    histories = [rng.integers(0, run.index.n_items, rng.integers(1, 9)) for _ in range(13)]
    users = [f"u{k}" for k in range(13)]
    run.transition_weight = 2.0                           # as if training had chosen it
    items, scores = recommend.recommend(run, histories, users, batch_size=4)
    for k in range(13):
        one_items, one_scores = recommend.recommend(run, [histories[k]], [users[k]])
        assert np.array_equal(one_items[0], items[k])
        np.testing.assert_allclose(one_scores[0], scores[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_recommend_ranks_the_beam_by_the_runs_training_transitions(group_run):
    run = runs.load_run(group_run["out"])
    users = run.user_raw[:20].tolist()
    histories = [run.sequence(u) for u in users]          # real users: their last items have successors
    beam_items, beam_scores = recommend.recommend(run, histories, users, n_return=run.model.config.beam_size,
                                                  transition_weight=0.0)                # the beam's own order
    items, scores = recommend.recommend(run, histories, users, transition_weight=3.0)
    seqs = [run.items[a:b][:-2] for a, b in zip(run.offsets[:-1], run.offsets[1:])]     # the training parts
    pairs = Counter((int(a), int(b)) for s in seqs for a, b in zip(s[:-1], s[1:]))
    changed = 0
    for k, history in enumerate(histories):
        value = [sc + 3.0 * np.log1p(pairs[(int(history[-1]), int(it))]) for it, sc in zip(beam_items[k], beam_scores[k])]
        by_hand = sorted(range(len(value)), key=lambda j: (-value[j], j))[:10]
        assert items[k].tolist() == beam_items[k, by_hand].tolist()
        np.testing.assert_allclose(scores[k], np.array(value)[by_hand], rtol=1e-6)
        changed += by_hand != list(range(10))
    assert changed > 0


@given(st.lists(st.lists(st.integers(0, 50), min_size=0, max_size=12), min_size=0, max_size=6), st.integers(1, 7))
@FAST
def test_request_windows_keep_the_last_items_left_padded(histories, width):
    split = recommend.request_split([np.array(h, np.int64) for h in histories], width)
    for row, h in zip(split.history, histories):
        tail = h[-width:] if h else []
        assert row.tolist() == [-1] * (width - len(tail)) + list(tail)


@pytest.mark.slow
def _reseal(folder) -> None:
    """Rewrite run.json to vouch for the files as they are now: a consistent folder of wrong files,
    to reach the checks that run after the manifest's."""
    path = os.path.join(folder, runs.MANIFEST)
    manifest = json.loads(open(path).read())
    for name in manifest["files"]:
        blob = open(os.path.join(folder, name), "rb").read()
        manifest["files"][name] = {"size": len(blob), "sha256": runs.sha256(blob)}
    open(path, "w").write(json.dumps(manifest))


def test_load_run_refuses_missing_or_mismatched_files(group_run, tmp_path):
    good = group_run["out"]
    for name in ("data.npz", "checkpoint.pt", "config.json"):
        out = _copy_run(group_run, tmp_path / f"no_{name}")
        os.remove(os.path.join(out, name))
        with pytest.raises(ValueError, match=f"{name}: does not match run.json"):
            runs.load_run(out)
    for name, change in (("checkpoint.pt", lambda b: b + b"\0"), ("item_id2tokens.npy", lambda b: b[:-4] + b[-4:][::-1])):
        out = _copy_run(group_run, tmp_path / f"edited_{name}")               # one byte more, or swapped codes
        blob = open(os.path.join(out, name), "rb").read()
        open(os.path.join(out, name), "wb").write(change(blob))
        with pytest.raises(ValueError, match=f"{name}: does not match run.json"):
            runs.load_run(out)
    out = _copy_run(group_run, tmp_path / "fewer_items")                    # the item map of another run
    z = dict(np.load(os.path.join(out, "data.npz")))
    z["item_raw"], z["item_title"] = z["item_raw"][:-1], z["item_title"][:-1]
    np.savez(os.path.join(out, "data.npz"), **z)
    with pytest.raises(ValueError, match="data.npz: does not match run.json"):
        runs.load_run(out)
    _reseal(out)
    with pytest.raises(ValueError, match="its arrays disagree .*36 item ids and titles, the index.s count.*found 35 ids"):
        runs.load_run(out)
    out = _copy_run(group_run, tmp_path / "other_sids")                      # SIDs the model was not trained on
    codes = np.load(os.path.join(good, "item_id2tokens.npy"))
    sid.SIDIndex(codes[::-1].copy()).save(out)
    _reseal(out)
    with pytest.raises(ValueError, match="opq.npz: belongs to another index"):
        runs.load_run(out)
    os.remove(os.path.join(out, "opq.npz"))                                 # then the checkpoint's digest says it
    manifest = json.loads(open(os.path.join(out, runs.MANIFEST)).read())
    del manifest["files"]["opq.npz"]
    open(os.path.join(out, runs.MANIFEST), "w").write(json.dumps(manifest))
    with pytest.raises(ValueError, match="other SIDs"):
        runs.load_run(out)
    out = _copy_run(group_run, tmp_path / "other_model")                     # config.json of another model
    config = json.loads(open(os.path.join(out, "config.json")).read())
    config["model"]["n_embd"] = 32
    open(os.path.join(out, "config.json"), "w").write(json.dumps(config))
    _reseal(out)
    with pytest.raises(ValueError, match="model.n_embd is 16 there, 32 here"):
        runs.load_run(out)
    out = _copy_run(group_run, tmp_path / "pickled")                         # an object array needs a pickle
    np.savez(os.path.join(out, "data.npz"), **{**z, "item_raw": np.array([object()] * 36, dtype=object)})
    _reseal(out)
    with pytest.raises(ValueError, match="data.npz: not a readable run data file"):
        runs.load_run(out)
    out = _copy_run(group_run, tmp_path / "no_manifest")
    os.remove(os.path.join(out, runs.MANIFEST))
    with pytest.raises(ValueError, match="not a run folder \\(no run.json"):
        runs.load_run(out)


@pytest.mark.slow
def test_bad_ids_and_new_items_are_refused_and_change_no_file(group_run, tmp_path):
    out = _copy_run(group_run, tmp_path / "run")
    run = runs.load_run(out)
    with pytest.raises(ValueError, match="'nobody' is not a user"):
        run.sequence("nobody")
    with pytest.raises(ValueError, match="item 'x9' is not an item"):
        run.item_ids(["i000" if "i000" in run.item_id else "i001", "x9"])
    before = _files(out)
    emb = group_run["emb"][:2]
    for ids, array, match in ((["n1", "n2"], emb[:, :5], r"expected shape \[n, 8\]"),
                              ([str(run.item_raw[0]), "n2"], emb, "already exists in the run"),
                              (["n1", "n1"], emb, "expected each item id once, got 'n1' more than once"),
                              (["\ufeffn1", "n2"], emb, r"got the character '\\ufeff' \(U\+FEFF\)"),
                              (["n\x1b[31m", "n2"], emb, r"got the character '\\x1b'"),
                              (["n1", "n\u202egnp.exe"], emb, r"got the character '\\u202e'"),
                              (["n" * 5000, "n2"], emb, "got 5000 characters"),
                              (["n1,n2", "n3"], emb, "got the character ','"),
                              ([" n1", "n2"], emb, "got spaces at an end"),
                              (["n1"], emb, "one id .* per embedding row"),
                              (["n1", "n2"], np.where(np.eye(2, 8) > 0, np.nan, emb), "finite")):
        with pytest.raises(ValueError, match=match):
            recommend.add_items(out, array, ids)
        assert _files(out) == before
    for argv, match in ((["--run_dir=" + out, "--user=nobody"], "'nobody' is not a user"),
                        (["--run_dir=" + out, "--history=i001,zz"], "'zz' is not an item"),
                        (["--run_dir=" + out, "--all=true"], "--all: expected --out"),
                        (["--run_dir=" + out, "--user=u000", "--all=true"], "exactly one of"),
                        (["--run_dir=" + str(tmp_path / "none"), "--user=u000"], "not a run folder (no run.json")):
        done = subprocess.run([sys.executable, os.path.join(HERE, "recommend.py")] + argv, capture_output=True,
                              text=True, cwd=HERE, timeout=120)
        assert done.returncode == 1 and done.stderr.startswith("error: ") and match.replace("\\", "") in done.stderr, \
            done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_outputs_never_overwrite_unasked_nor_a_file_the_run_reads(group_run, tmp_path):
    out = _copy_run(group_run, tmp_path / "run")
    before = _files(out)
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    args = [f"--run_dir={out}", "--all=true"]
    with pytest.raises(ValueError, match="exists; choose another path, or replace it with --overwrite=true"):
        recommend.main(args + [f"--out={mine}"])
    assert mine.read_text() == "mine"
    data_path = runs.RunFolder(out).manifest()["data"]["path"]
    for name in ("checkpoint.pt", "run.json", "data.npz", "new.jsonl"):             # inside the run folder
        with pytest.raises(ValueError, match="is inside a run folder"):
            recommend.main(args + [f"--out={os.path.join(out, name)}", "--overwrite=true"])
    with pytest.raises(ValueError, match="is one of its inputs \\(the run's training data: "):  # the data it was trained on
        recommend.main(args + [f"--out={data_path}", "--overwrite=true"])
    assert _files(out) == before and open(data_path).read()
    recommend.main(args + [f"--out={mine}", "--overwrite=true"])                   # asked: replaced
    assert mine.read_text().count("\n") == len(runs.load_run(out).user_raw)
    np.save(tmp_path / "e.npy", group_run["emb"])
    for argv, fragment in (([f"--out={out}", "--overwrite=true"], "is a run folder"),
                           ([f"--out={mine}"], "is a file; expected a folder")):
        with pytest.raises(ValueError, match=fragment):
            sid.main([f"--emb={tmp_path / 'e.npy'}"] + argv)
    assert _files(out) == before
    with pytest.raises(ValueError, match="is not an empty folder"):
        experiments.main(["--experiment=continue", f"--out={out}"])


@pytest.mark.slow
def test_recommend_output_into_a_closed_pipe_ends_quietly_and_escapes_control_characters(group_run, tmp_path):
    out = _copy_run(group_run, tmp_path / "run")
    args = [sys.executable, os.path.join(HERE, "recommend.py"), f"--run_dir={out}", "--user=u000", "--n_return=10"]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE)
    child.stdout.close()                                                # `| head -0`: the reader is gone
    assert child.wait(timeout=120) == 1 and child.stderr.read() == b""
    child.stderr.close()
    with pytest.raises(ValueError, match="--batch_size: expected a positive int, got 0"):
        recommend.main([f"--run_dir={out}", "--all=true", f"--out={tmp_path / 'r.jsonl'}", "--batch_size=0"])
    assert recommend.printable("x\x1b[2Jy\x00") == "x\\x1b[2Jy\\x00"
    assert recommend.printable("evil \u202etxt.exe\u200b") == "evil \\u202etxt.exe\\u200b"   # format characters too


@pytest.mark.slow
def test_a_cf_run_cannot_place_items_without_interactions(tmp_path):
    data_path = write_formats(tmp_path, interactions(1, n_users=40, n_items=15))["inter"]
    out = tmp_path / "cf"
    train.main([f"--data={data_path}", f"--out_dir={out}", "--item_emb=none"] + TINY_RUN + ["--emb_source=cf", "--epochs=1"])
    before = _files(out)
    with pytest.raises(ValueError, match="not built from an embeddings file alone"):
        recommend.add_items(str(out), np.ones((1, 64), np.float32), ["new"])
    assert _files(out) == before


@pytest.mark.slow
def test_recommend_all_under_torchrun_writes_the_file_of_one_process(group_run, tmp_path):
    args = [f"--run_dir={group_run['out']}", "--all=true", "--batch_size=7"]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}        # as torchrun gives each process: same arithmetic
    one = subprocess.run([sys.executable, os.path.join(HERE, "recommend.py")] + args + [f"--out={tmp_path / 'one.jsonl'}"],
                         capture_output=True, text=True, cwd=HERE, timeout=300, env=one_thread)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(HERE, "recommend.py")] + args + [f"--out={tmp_path / 'two.jsonl'}"],
                         capture_output=True, text=True, cwd=HERE, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    first = (tmp_path / "one.jsonl").read_bytes()
    assert first == (tmp_path / "two.jsonl").read_bytes()
    lines = [json.loads(line) for line in first.decode().splitlines()]
    assert len(lines) == 120 and lines[0]["user"] == "u000" and len(lines[0]["items"]) == 10


@pytest.mark.slow
def test_init_from_continues_with_the_weights_and_adds_the_new_items(group_run, tmp_path):
    folder, emb = group_run["folder"], group_run["emb"]
    newer = tmp_path / "newer"
    newer.mkdir()
    rows = (folder / "d.inter").read_text().splitlines()[1:]
    rows += [f"v{g}{c}\t{group_raw(g, s)}\t{t}" for g in range(N_GROUPS) for c in "ab" for t in range(6)
             for s in [g % N_SLOTS if t % 2 else (g + 1) % N_SLOTS]]              # the held-out items appear
    (newer / "d.inter").write_text(INTER_HEADER + "\n".join(rows) + "\n")
    every = sorted((g, s) for g in range(N_GROUPS) for s in range(N_SLOTS))
    np.save(newer / "d_content.npy", emb[[g * N_SLOTS + s for g, s in sorted(every, key=lambda p: group_raw(*p))]])
    base = runs.load_run(group_run["out"])
    out = tmp_path / "continued"
    args = [f"--data={newer / 'd.inter'}", f"--init_from={group_run['out']}", f"--out_dir={out}"]
    with pytest.raises(ValueError, match="--n_embd: the model of --init_from has n_embd=16, got 32"):
        train.main(args + ["--n_embd=32"])
    with pytest.raises(ValueError, match="run.json: this command would replace it, and it is one of its inputs \\(--init_from"):
        train.main(args[:2] + [f"--out_dir={group_run['out']}"])
    results = train.main(args + ["--epochs=1", "--lr=1e-9", "--warmup_steps=0", "--log_every=1000"])
    cont = runs.load_run(str(out))
    assert cont.item_raw[:base.index.n_items].tolist() == base.item_raw.tolist()     # old items keep their ids ...
    assert np.array_equal(cont.index.item_codes[:base.index.n_items], base.index.item_codes)  # ... and SIDs
    assert sorted(cont.item_raw[base.index.n_items:].tolist()) == sorted(group_raw(g, s) for g, s in group_run["held_out"])
    for name, weight in base.model.state_dict().items():                   # a learning rate of 1e-9: unchanged
        torch.testing.assert_close(cont.model.state_dict()[name], weight, atol=1e-6, rtol=0)
    assert results["valid"]["ndcg@10"] > 0.3


# ----------------------------------------------------------------------------------------------
# The run store: one writer, readers that never write, names never paths, inputs never outputs
# ----------------------------------------------------------------------------------------------

HOLD_LOCK = "import sys, time, runs\nwith runs.RunFolder(sys.argv[1]).lock():\n    print('locked', flush=True)\n    time.sleep(120)\n"


@pytest.mark.slow
def test_a_second_writer_is_refused_at_once_before_any_write_and_readers_take_no_lock(group_run, tmp_path):
    out = _copy_run(group_run, tmp_path / "run")
    np.save(tmp_path / "e.npy", group_run["emb"][:1])
    (tmp_path / "ids.txt").write_text("n1\n")
    add = [f"--run_dir={out}", f"--add_items={tmp_path / 'e.npy'}", f"--item_ids={tmp_path / 'ids.txt'}"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, out], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        left = [os.path.join(out, name) for name in (".tmp-.pending-last.ptk1ll3d", runs.PENDING + "last.pt")]
        for path in left:                       # the holder's files in the middle of a step
            open(path, "wb").write(b"half a checkpoint")
        before = _files(out)
        for main, argv in ((train.main, [f"--data={group_run['folder'] / 'd.inter'}", f"--out_dir={out}",
                                         "--overwrite=true"] + GROUP_RUN),
                           (train.main, [f"--data={group_run['folder'] / 'd.inter'}", f"--out_dir={out}",
                                         "--eval_only=true"] + GROUP_RUN),
                           (recommend.main, add)):
            with pytest.raises(ValueError, match=f"is being written by process {holder.pid} \\(.*-c"):
                main(argv)
            assert _files(out) == before
        assert runs.load_run(out).index.n_items == 36                      # a reader takes no lock ...
        assert _files(out) == before                                        # ... and removes nothing
    finally:
        holder.kill()
        holder.wait()
    recommend.main(add)                                                     # the OS released the dead one's lock
    assert runs.load_run(out).index.n_items == 37
    assert not any(os.path.exists(path) for path in left)                  # the next writer cleans up the dead one's


@pytest.mark.slow
def test_readers_in_a_loop_during_a_training_get_the_old_state_or_the_new_and_the_training_ends(tmp_path):
    data_path = write_formats(tmp_path, interactions(1, n_users=300, n_items=30))["inter"]
    out = tmp_path / "run"
    args = [f"--data={data_path}", f"--out_dir={out}"] + TINY_RUN + ["--epochs=8", "--patience=20"]
    writer = subprocess.Popen([sys.executable, "train.py"] + args, cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    states, refused = set(), False
    while writer.poll() is None:
        time.sleep(0.05)                        # a reader at a time, the writer on its own core
        try:
            manifest, blobs = runs.RunFolder(str(out)).read(("last.pt",), optional=runs.RUN_FILES)
        except ValueError as e:                 # before the first epoch: no run yet, or none finished
            assert "not a run folder" in str(e) or "has no last.pt yet" in str(e), e
            continue
        assert set(blobs) == set(manifest["files"])                          # every file of one state
        states.add(manifest["files"]["last.pt"]["sha256"])
        if "checkpoint.pt" in blobs:
            runs.load_run(str(out))
        if not refused:                                                      # and a second writer
            with pytest.raises(ValueError, match=f"is being written by process {writer.pid} \\(.*train.py"):
                train.main(args + ["--overwrite=true"])
            refused = True
    out_text, err_text = writer.communicate()
    assert writer.returncode == 0, err_text[-2000:]
    assert len(states) >= 3 and refused, (len(states), refused)
    assert not [f for f in os.listdir(out) if f.startswith((".tmp-", runs.PENDING))]
    assert runs.load_run(str(out)).config["train"]["epochs"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("how", ["../outside.txt", "absolute", "symlink"])
def test_run_json_names_only_the_runs_own_files_and_nothing_outside_is_read_or_removed(group_run, tmp_path, how):
    out = _copy_run(group_run, tmp_path / "run")
    outside = tmp_path / "outside.txt"
    if how == "symlink":                        # the right bytes, through a link to a file outside the folder
        shutil.move(os.path.join(out, "checkpoint.pt"), outside)
        os.symlink(outside, os.path.join(out, "checkpoint.pt"))
        fragment = "checkpoint.pt: cannot read it \\(a symbolic link, which is not followed\\)"
    else:
        outside.write_text("precious")
        name = str(outside) if how == "absolute" else how
        blob = outside.read_bytes()
        manifest = json.loads(open(os.path.join(out, runs.MANIFEST)).read())
        manifest["files"][name] = {"size": len(blob), "sha256": runs.sha256(blob)}
        open(os.path.join(out, runs.MANIFEST), "w").write(json.dumps(manifest))
        fragment = f"not a run manifest \\(it lists {re_escape(repr(name))}"
    kept = outside.read_bytes()
    with pytest.raises(ValueError, match=fragment):
        runs.load_run(out)
    for flags in ([], ["--overwrite=true"], ["--resume=true"]):
        with pytest.raises(ValueError, match=fragment if how != "symlink" else "checkpoint.pt: this command would "
                           "replace it, and it is a symbolic link, not a regular file"):
            train.main([f"--data={group_run['folder'] / 'd.inter'}", f"--out_dir={out}"] + GROUP_RUN + flags)
        assert outside.read_bytes() == kept
    assert os.path.islink(os.path.join(out, "checkpoint.pt")) == (how == "symlink")


@pytest.mark.slow
def test_a_writer_never_removes_an_input_nor_writes_into_a_folder_moved_away(group_run, tmp_path, monkeypatch):
    out = _copy_run(group_run, tmp_path / "run")
    data = os.path.join(out, runs.PENDING + "curves.svg")                   # named like a killed writer's file
    shutil.copy(group_run["folder"] / "d.inter", data)
    with pytest.raises(ValueError, match="is one of its inputs \\(--data: "):
        train.main([f"--data={data}", "--format=inter", f"--out_dir={out}", "--overwrite=true"] + GROUP_RUN)
    assert os.path.exists(data)
    emb, ids = os.path.join(out, ".tmp-run.json.npy"), os.path.join(out, runs.PENDING + "eval.json")
    np.save(emb, group_run["emb"][:1])
    open(ids, "w").write("n1\n")
    with pytest.raises(ValueError, match="is one of its inputs \\(--(add_items|item_ids): "):
        recommend.main([f"--run_dir={out}", f"--add_items={emb}", f"--item_ids={ids}"])
    assert os.path.exists(emb) and os.path.exists(ids)
    folder = runs.RunFolder(out)
    with folder.lock():
        os.rename(out, tmp_path / "moved")                                  # the folder leaves its path ...
        os.mkdir(out)                                                       # ... and another takes it
        with pytest.raises(RuntimeError, match="written without its lock"):
            folder.publish({"curves.svg": b"<svg/>"})
    assert os.listdir(out) == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--add_items: expected one process"):
        recommend.main([f"--run_dir={tmp_path / 'moved'}", "--add_items=e.npy", "--item_ids=i.txt"])


def test_a_file_replaced_between_its_check_and_its_parse_is_never_served(group_run, tmp_path, monkeypatch):
    out = _copy_run(group_run, tmp_path / "run")
    checked = runs.load_run(out).model.state_dict()
    other = load_ckpt(os.path.join(out, "checkpoint.pt"))
    other["model"] = {k: torch.zeros_like(v) for k, v in other["model"].items()}
    read = cli.read_regular

    def read_then_replace(path: str, limit: int) -> bytes:
        blob = read(path, limit)
        if path.endswith("checkpoint.pt"):      # the file changes right after its bytes were read and hashed
            torch.save(other, path)
        return blob

    monkeypatch.setattr(cli, "read_regular", read_then_replace)
    served = runs.load_run(out).model.state_dict()
    assert all(torch.equal(served[k], checked[k]) for k in checked)         # the bytes checked are the bytes used
    assert not torch.equal(load_ckpt(os.path.join(out, "checkpoint.pt"))["model"][next(iter(checked))],
                           checked[next(iter(checked))])                    # (and the file was replaced)


@pytest.mark.slow
def test_an_input_in_the_output_folder_is_refused_with_or_without_overwrite_and_stays(group_run, tmp_path):
    out = _copy_run(group_run, tmp_path / "run")
    data = group_run["folder"] / "d.inter"
    shutil.copy(data, os.path.join(out, "results.json"))                    # the data under a name the run writes
    os.remove(os.path.join(out, "curves.svg"))
    os.link(group_run["folder"] / "d_content.npy", os.path.join(out, "curves.svg"))   # a hard link of an input
    os.mkfifo(tmp_path / "fifo")
    before = _files(out)
    for argv, fragment in (([f"--data={out}/results.json", "--format=inter"], "is one of its inputs \\(--data: "),
                           ([f"--data={data}", f"--item_emb={group_run['folder'] / 'd_content.npy'}"],
                            "curves.svg: this command would replace it, and it is one of its inputs \\(--item_emb: ")):
        for overwrite in ("false", "true"):
            with pytest.raises(ValueError, match=fragment):
                train.main(argv + [f"--out_dir={out}", f"--overwrite={overwrite}"] + GROUP_RUN)
            assert _files(out) == before
    os.remove(os.path.join(out, "curves.svg"))
    os.mkfifo(os.path.join(out, "curves.svg"))                               # --overwrite replaces regular files only
    with pytest.raises(ValueError, match="curves.svg: this command would replace it, and it is a FIFO"):
        train.main([f"--data={data}", f"--out_dir={out}", "--overwrite=true"] + GROUP_RUN)
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    np.save(index_dir / "item_id2tokens.npy", group_run["emb"])
    kept = (index_dir / "item_id2tokens.npy").read_bytes()
    with pytest.raises(ValueError, match="item_id2tokens.npy: this command would replace it, and it is one of its inputs \\(--emb: "):
        sid.main([f"--emb={index_dir / 'item_id2tokens.npy'}", f"--out={index_dir}", "--overwrite=true"])
    assert (index_dir / "item_id2tokens.npy").read_bytes() == kept


def _npy_header(shape: tuple, descr: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()                       # magic, version 1.0 and the header, no data


@pytest.mark.slow
def test_loaded_files_are_validated_whatever_their_hashes_say(group_run, tmp_path, monkeypatch):
    def crafted(name: str, edit) -> str:
        out = _copy_run(group_run, tmp_path / name)
        edit(out)
        _reseal(out)
        return out

    def checkpoint(edit):
        def apply(out):
            path = os.path.join(out, "checkpoint.pt")
            state = load_ckpt(path)
            edit(state)
            torch.save(state, path)
        return apply

    def config(edit):                           # config.json and the checkpoint's copy, kept in agreement
        def apply(out):
            path = os.path.join(out, "config.json")
            resolved = json.loads(open(path).read())
            edit(resolved)
            open(path, "w").write(json.dumps(resolved))
            checkpoint(lambda state: edit(state["config"]))(out)
        return apply

    def data(edit):
        def apply(out):
            z = dict(np.load(os.path.join(out, "data.npz")))
            edit(z)
            np.savez(os.path.join(out, "data.npz"), **z)
        return apply

    first = lambda state: next(iter(state["model"]))
    for name, edit, fragment in (
            ("no_model", checkpoint(lambda s: s.pop("model")), "expected model \\(dict\\), got nothing"),
            ("wrong_shape", checkpoint(lambda s: s["model"].__setitem__(first(s), torch.zeros(3, 3))),
             "its weights do not fit its config's model .*\\(\\(3, 3\\), torch.float32\\) there"),
            ("nan_weight", checkpoint(lambda s: s["model"][first(s)].fill_(float("nan"))), "a dense, finite tensor"),
            ("int_key", checkpoint(lambda s: s["model"].__setitem__(7, s["model"].pop(first(s)))), "weight '7': expected a name"),
            ("float64", checkpoint(lambda s: s["model"].__setitem__(first(s), s["model"][first(s)].double())),
             "torch.float64\\) there"),
            ("nan_rotation", lambda out: np.savez(os.path.join(out, "opq.npz"), **{**np.load(os.path.join(out, "opq.npz")),
                                                  "rotation": np.full_like(np.load(os.path.join(out, "opq.npz"))["rotation"], np.nan)}),
             "opq.npz: expected finite float arrays"),
            ("compressed_bomb", lambda out: np.savez_compressed(os.path.join(out, "data.npz"), **{
                **np.load(os.path.join(out, "data.npz")), "items": np.zeros(10 ** 7, np.int32)}),
             "items.npy is not an .npy array stored whole"),
            ("header_asks_too_much", lambda out: open(os.path.join(out, "item_id2tokens.npy"), "wb").write(
                _npy_header((2 ** 42, 4), "|u1") + bytes(64)), "its header asks for \\(4398046511104, 4\\) of uint8"),
            ("user_without_items", data(lambda z: (z.__setitem__("user_raw", np.append(z["user_raw"], "u_new")),
                                                   z.__setitem__("offsets", np.append(z["offsets"], z["offsets"][-1])))),
             "its arrays disagree"),
            ("missing_weight", checkpoint(lambda s: s["model"].pop(first(s))), "missing there"),
            ("items_as_text", checkpoint(lambda s: s.__setitem__("sids_items", "36")), "trained on '36' items"),
            ("n_embd_as_text", config(lambda c: c["model"].__setitem__("n_embd", "16")), "config.n_embd: expected int"),
            ("model_not_a_dict", config(lambda c: c.__setitem__("model", 5)), "not a run config"),
            ("many_layers", config(lambda c: c["model"].__setitem__("encoder_n_layer", 100_000)),
             "weights cannot hold the 100001 layers"),
            ("huge_buckets", config(lambda c: c["model"].__setitem__("n_user_buckets", 10 ** 12)),
             "parameters need about .* GiB to train, this process may use"),
            ("repeated_users", data(lambda z: z["user_raw"].__setitem__(1, z["user_raw"][2])),
             "user_raw: expected each user id once"),
            ("offsets_backwards", data(lambda z: z.__setitem__("offsets", z["offsets"][::-1].copy())),
             "its arrays disagree"),
            ("item_out_of_range", data(lambda z: z["items"].__setitem__(0, 10 ** 6)), "item ids below 36"),
            ("offsets_2d", data(lambda z: z.__setitem__("offsets", z["offsets"][:, None])), "offsets: expected a 1-d"),
            ("escape_in_an_id", data(lambda z: z.__setitem__("item_raw", np.array(["\x1b[2J"] + z["item_raw"][1:].tolist()))),
             "item_raw: expected each item id .* got the character '\\\\x1b'"),
            ("weight_as_text", lambda out: open(os.path.join(out, "results.json"), "w").write('{"transitions": {"weight": "x"}}'),
             "transitions.weight: expected a number >= 0, got 'x'")):
        with pytest.raises(ValueError, match=fragment):
            runs.load_run(crafted(name, edit))
    out = _copy_run(group_run, tmp_path / "manifest_types")
    for manifest, fragment in (('{"version": 1, "files": {"config.json": {"size": "x", "sha256": "0"}}, "data": null}',
                                'config.json: expected {"size": bytes'), ("[" * 100_000 + "]" * 100_000, "not a run manifest")):
        open(os.path.join(out, runs.MANIFEST), "w").write(manifest)
        with pytest.raises(ValueError, match=fragment):
            runs.load_run(out)
    os.remove(os.path.join(out, runs.MANIFEST))
    os.mkfifo(os.path.join(out, runs.MANIFEST))                              # a reader neither blocks nor reads it
    with pytest.raises(ValueError, match="run.json: expected a regular file, found a FIFO"):
        runs.load_run(out)
    os.remove(os.path.join(out, runs.MANIFEST))
    os.mkdir(os.path.join(out, runs.MANIFEST))
    with pytest.raises(ValueError, match="run.json: expected a regular file, found a folder"):
        runs.load_run(out)
    monkeypatch.setattr(cli, "memory_limit", lambda: 1_000_000)             # the process's limit, not the RAM
    with pytest.raises(ValueError, match="model.beam_size: .* a beam search that fits in memory \\(0.0 GiB of 0.0\\)"):
        runs.load_run(group_run["out"])


def test_an_embeddings_file_is_read_once_so_a_fifo_works(tmp_path):
    emb = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, emb)
    os.mkfifo(tmp_path / "emb.npy")

    def write() -> None:                        # a pipe gives its bytes once: a second open would wait, or get none
        with open(tmp_path / "emb.npy", "wb") as f:
            f.write(buf.getvalue())

    def waited(signum, frame):
        raise TimeoutError("the FIFO was opened a second time, and nothing will ever write to it again")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(30)
    try:
        assert np.array_equal(embeddings.read_item_emb(str(tmp_path / "emb.npy"), 20), emb)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    writer.join(timeout=10)


def test_a_publish_checks_free_disk_first_and_a_failed_write_names_its_path(group_run, tmp_path, monkeypatch):
    out = _copy_run(group_run, tmp_path / "run")
    before = _files(out)
    folder = runs.RunFolder(out)
    with pytest.raises(RuntimeError, match="written without its lock"):
        folder.publish({"curves.svg": b"<svg/>"})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    with folder.lock(), pytest.raises(ValueError, match=f"{re_escape(out)}: 1,048,582 bytes to write, 1,000 bytes free on "
                                                          "its disk; nothing was written"):
        folder.publish({"curves.svg": b"<svg/>"})
    assert _files(out) == before
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 0, 1 << 30))

    def disk_full(fd):
        raise OSError(28, "No space left on device")        # as a write to a full disk fails: no path

    monkeypatch.setattr(os, "fsync", disk_full)
    with folder.lock(), pytest.raises(ValueError, match=f"{re_escape(out)}/.pending-curves.svg: No space left on "
                                                          "device; nothing was published"):
        folder.publish({"curves.svg": b"<svg/>"})
    assert _files(out) == before


def test_a_writer_that_fails_leaves_no_folder_it_created_and_names_the_file_it_meant(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="bad input"), cli.exclusive(str(tmp_path / "a" / "b" / "c"), "--out"):
        raise ValueError("bad input")
    assert os.listdir(tmp_path) == []

    def read_only(**kwargs):
        raise OSError(30, "Read-only file system", os.path.join(kwargs["dir"], ".tmp-out.jsonk3x9"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as failed:
        cli.atomic_write(str(tmp_path / "out.json"), b"{}")
    assert failed.value.filename == str(tmp_path / "out.json")              # not the temporary name


def test_every_error_is_one_line_even_a_bug(monkeypatch, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "argv", ["x"])
    try:
        for error, line, status in ((MemoryError(), "error: out of memory", 1),
                                    (KeyError("x"), "error: unexpected KeyError: 'x' (a bug: please report it", 1),
                                    (FileNotFoundError(2, "No such file or directory", "/a/b"),
                                     "error: /a/b: No such file or directory", 1),
                                    (IsADirectoryError(21, "Is a directory", 3), "error: 3: Is a directory", 1),
                                    (ValueError("/a\nb: not a run folder"), "error: /a\\nb: not a run folder", 1),
                                    (KeyboardInterrupt(), None, 130)):
            def main(argv, error=error):
                raise error
            with pytest.raises(SystemExit) as stop:
                cli.run_main(main)
            assert stop.value.code == status if line is None else str(stop.value.code).startswith(line), stop.value.code
            assert "\n" not in str(stop.value.code)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_experiments_check_the_training_flags_before_any_write(tmp_path):
    for argv, fragment in ((["--train_args=--epochs=0"], "--train_args: --epochs: expected a positive int"),
                           (["--continue_args=--n_embdd=3"], "--continue_args: unknown option --n_embdd"),
                           (["--train_args=--out_dir=x"], "--train_args: --out_dir is set by the experiment")):
        with pytest.raises(ValueError, match=fragment):
            experiments.main(["--experiment=continue", f"--out={tmp_path / 'exp'}"] + argv)
        assert not (tmp_path / "exp").exists()


# ----------------------------------------------------------------------------------------------
# experiments.py: the cold-start and continued-training experiments
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cold_start_experiment_adds_the_held_out_items_and_scores_their_users(tmp_path):
    rng = np.random.default_rng(0)
    emb = group_embeddings()
    lines = [f"u{u} " + " ".join(group_raw(u % N_GROUPS, int(rng.integers(N_SLOTS))) for _ in range(7)) for u in range(150)]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    np.save(tmp_path / "d_content.npy", emb[np.argsort([group_raw(g, s) for g in range(N_GROUPS) for s in range(N_SLOTS)])])
    out = tmp_path / "cold"
    results = experiments.cold_start(str(tmp_path / "d.txt"), str(out), fraction=0.1, train_args=GROUP_RUN)
    warm = (out / "warm" / "d.txt").read_text()
    run = runs.load_run(str(out / "run"))
    added = run.item_raw[run.index.n_items - results["held_out_items"]:].tolist()
    assert results["held_out_items"] == 5 and not any(f" {i} " in f" {line} " for i in added for line in warm.splitlines())
    assert results["items"] == N_GROUPS * N_SLOTS and results["users"] > 0
    assert results["popularity"]["recall@10"] == 0.0          # held-out items have no training interactions
    assert results["model, new_share 0.0"]["held_out_slots"] <= results["model, new_share 0.3"]["held_out_slots"] <= 0.3
    assert results["model, new_share 0.3"]["held_out_slots"] > 0           # the prefix rule reaches them
    assert json.loads((out / "cold_start.json").read_text()) == results


@pytest.mark.slow
def test_continue_experiment_runs_base_continued_and_scratch(tmp_path):
    rows = interactions(4, n_users=40, n_items=15)
    rows = [(u, i, t + 10 * (int(u[1:]) % 3)) for u, i, t in rows]          # spread users over time
    data_path = write_formats(tmp_path, rows)["inter"]
    (tmp_path / "d.item").write_text("item_id:token\tmovie_title:token_seq\n" +
                                     "".join(f"{100 + i}\tfilm {'red blue green'.split()[i % 3]} {i % 4}\n" for i in range(15)))
    out = tmp_path / "continue"
    args = [a for a in TINY_RUN if not a.startswith("--emb_source")] + ["--epochs=1"]
    results = experiments.continue_experiment(str(out), cut=0.7, train_args=args, data_path=str(data_path))
    assert results["interactions"]["early"] < results["interactions"]["all"]
    for name in ("continued", "scratch"):
        assert set(results[name]["later"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    base, cont = runs.load_run(str(out / "base")), runs.load_run(str(out / "continued"))
    assert np.array_equal(cont.index.item_codes[:base.index.n_items], base.index.item_codes)


# ----------------------------------------------------------------------------------------------
# bench.py: the synthetic interactions
# ----------------------------------------------------------------------------------------------

def test_synthetic_interactions_are_deterministic_and_train_reads_them(tmp_path):
    a, b = bench.synthetic_interactions(300, 200, 12, seed=3), bench.synthetic_interactions(300, 200, 12, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    user, item, when = a
    assert item.min() >= 0 and item.max() < 200 and (np.diff(when)[np.diff(user) == 0] == 1).all()
    bench.write_csv(str(tmp_path / "s.csv"), user, item, when, chunk=1000)
    raw = dataset.load_data(train.TrainConfig(data=str(tmp_path / "s.csv")))
    assert raw.users[:3] == [f"u{u}" for u in user[:3]] and list(raw.times[:3]) == when[:3].tolist()
    assert len(raw.users) == len(user) and raw.users[0] is raw.users[1]   # one str object per distinct id


# ----------------------------------------------------------------------------------------------
# The whole repository: bad input to every module, command lines and --help
# ----------------------------------------------------------------------------------------------

def _load(folder, name: str, content, fmt: str = "auto"):
    return dataset.load_data(train.TrainConfig(data=_write(folder, name, content), format=fmt))


def _emb(folder, array) -> np.ndarray:
    """item_embeddings() for a 4-item dataset with `array` as --item_emb."""
    data = dataset.Dataset.from_sequences([np.arange(4)], ["u"], ["a", "b", "c", "d"])
    path = os.path.join(str(folder), "e.npy")
    np.save(path, array)
    return embeddings.item_embeddings(train.TrainConfig(item_emb=path), data, dataset.RawData([], [], [], item_emb=path), None)


def _check_other_config(folder):
    path, resolved = _tiny_checkpoint(folder)
    here = {**resolved, "model": {**resolved["model"], "n_embd": 32}}
    runs.check_checkpoint(load_ckpt(path), path, here, "0" * 64)


def _check_other_sids(folder):
    path, resolved = _tiny_checkpoint(folder)
    runs.check_checkpoint(load_ckpt(path), path, resolved, "1" * 64)


def _old_index(folder):
    index, _ = small_index(np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32))
    index.save(str(folder))
    with np.load(os.path.join(str(folder), "opq.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(os.path.join(str(folder), "opq.npz"), **{**arrays, "version": 99})
    sid.SIDIndex.load(str(folder))


def _train_batch_with_unknown_item(folder):
    split = dataset.Split.from_windows(history=np.array([[-1, 0, 7]]), target=np.array([1]), user=np.array([0]))
    item_tokens = torch.zeros(4, 4, dtype=torch.long)                    # 3 items + the PAD row
    evaluate.make_batch(split, np.array([0]), item_tokens, torch.zeros(1, dtype=torch.long), torch.device("cpu"))


def _generate_with_unknown_sid(folder):
    model = tiny_model()
    index = sid.SIDIndex(np.array([[1, 2, 3, 4]]))
    model.generate(make_batch(model, [3], seed=1), index)


# bad input to every module in one table: data files, sid.py, the model, beam search, checkpoints, CLI
# (what is wrong, how to trigger it in a temporary folder, a fragment of the expected message)
BAD_INPUTS = [
    ("empty data file", lambda d: dataset.prepare(_load(d, "d.inter", INTER_HEADER)), "no interactions"),
    ("nothing left after 5-core", lambda d: dataset.prepare(_load(d, "d.inter", INTER_HEADER + "u1\ti1\t1\n")),
     "empty after 5-core"),
    (".inter without a timestamp column", lambda d: _load(d, "d.inter", "user_id:token\titem_id:token\nu\ti\n"),
     "expected a timestamp column"),
    (".inter line with 2 of 3 fields", lambda d: _load(d, "d.inter", INTER_HEADER + "u1\ti1\t5\nu1\ti2\n"),
     "d.inter:3: expected 3 tab-separated fields, got 2"),
    (".inter non-numeric timestamp", lambda d: _load(d, "d.inter", INTER_HEADER + "u1\ti1\tyesterday\n"),
     "d.inter:2: expected a numeric timestamp (ASCII digits, sign, point, exponent), got 'yesterday'"),
    (".inter infinite timestamp", lambda d: _load(d, "d.inter", INTER_HEADER + "u1\ti1\t1e999\n"),
     "d.inter:2: expected a finite timestamp"),
    (".inter timestamp inf", lambda d: _load(d, "d.inter", INTER_HEADER + "u1\ti1\tinf\n"), "d.inter:2: expected a numeric"),
    (".inter timestamp 1_000", lambda d: _load(d, "d.inter", INTER_HEADER + "u1\ti1\t1_000\n"), "d.inter:2: expected a numeric"),
    (".inter timestamp in Arabic-Indic digits", lambda d: _load(d, "d.inter", INTER_HEADER + "u1\ti1\t\u0661\u0662\n"),
     "d.inter:2: expected a numeric"),
    ("csv id with a NUL", lambda d: _load(d, "d.csv", "user,item,timestamp\nu\x000,i,1\n"),
     "d.csv:2: expected the user id to be 1 to 1000 printable characters, got the character '\\x00' (U+0000)"),
    ("csv id with an escape", lambda d: _load(d, "d.csv", "user,item,timestamp\nu,i\x1b[2J,1\n"),
     "d.csv:2: expected the item id to be 1 to 1000 printable characters, got the character '\\x1b' (U+001B)"),
    ("csv id of 5000 digits", lambda d: _load(d, "d.csv", "user,item,timestamp\n" + "9" * 5000 + ",i,1\n"),
     "d.csv:2: expected the user id to be 1 to 1000 printable characters, got 5000 characters"),
    ("s3rec header line", lambda d: _load(d, "d.txt", "user_id item_ids\nu1 a b c\n", fmt="s3rec"),
     "d.txt:1: 'user_id item_ids' looks like a header"),
    ("s3rec user on two lines", lambda d: _load(d, "d.txt", "u1 a b c\nu2 a b\nu1 c d\n", fmt="s3rec"),
     "d.txt:3: user 'u1' again (first on line 1)"),
    ("amazon JSON with a key twice", lambda d: _load(d, "d.json", '{"reviewerID": "u", "asin": "a", "asin": "b", '
                                                                  '"unixReviewTime": 1}\n'),
     "d.json:1: not a JSON object (the key 'asin' appears twice"),
    ("item text JSON with a key twice", lambda d: dataset.load_item_text(_write(d, "t.jsonl", '{"asin": "a", "title": "x", '
                                                                                              '"title": "y"}\n')),
     "t.jsonl:1: the key 'title' appears twice"),
    ("a text file as .npy", lambda d: embeddings.read_item_emb(_write(d, "e.npy", "1 2 3\n"), 2),
     "e.npy is not a .npy file (it does not start with the .npy header)"),
    ("csv without an item column", lambda d: _load(d, "d.csv", "user,thing,timestamp\nu,i,1\n"),
     "d.csv:1: expected the item column"),
    ("csv empty user id", lambda d: _load(d, "d.csv", "user,item,timestamp\n,i,1\n"),
     "d.csv:2: expected the user id to be 1 to 1000 printable characters, got empty"),
    ("amazon line that is not JSON", lambda d: _load(d, "d.json", '{"reviewerID": "u"\n'), "d.json:1: not a JSON object"),
    ("amazon review without asin", lambda d: _load(d, "d.json", '{"reviewerID": "u", "unixReviewTime": 1}\n'),
     "d.json:1: expected a JSON object with keys"),
    ("s3rec user without items", lambda d: _load(d, "d.txt", "u1 i1 i2\nu2\n", fmt="s3rec"),
     "d.txt:2: expected `user item item ...`"),
    (".json.gz that is not gzip", lambda d: _load(d, "d.json.gz", b"not gzip at all"), "d.json.gz: cannot read it (BadGzipFile"),
    ("bytes that are not UTF-8", lambda d: _load(d, "d.csv", b"user,item,timestamp\n\xff\xfe,i,1\n"), "d.csv: not UTF-8 text"),
    ("item text line that is not a dict", lambda d: dataset.load_item_text(_write(d, "m.jsonl", "[1, 2]\n")),
     "m.jsonl:1: expected a JSON object or Python dict"),
    ("item text with an item twice", lambda d: dataset.load_item_text(_write(d, "m.jsonl", '{"asin": "a"}\n{"asin": "a"}\n')),
     "m.jsonl:2: item 'a' appears a second time"),
    ("--item_emb with NaN", lambda d: _emb(d, np.array([[0.0], [np.nan], [1.0], [2.0]])), "got NaN or inf in row 1"),
    ("--item_emb with 3 rows for 4 items", lambda d: _emb(d, np.zeros((3, 8))), "expected shape [4 items, D], got (3, 8)"),
    ("--item_emb of strings", lambda d: _emb(d, np.array([["a"]] * 4)), "expected a numeric array, got dtype <U1"),
    ("embeddings with inf (sid.py)", lambda d: sid.build_index(np.array([[0.0, np.inf]])), "finite"),
    ("codes of the wrong dtype (sid.py)", lambda d: sid.SIDIndex(np.zeros((3, 4))), "integer"),
    ("history item id with no SID (train batch)", _train_batch_with_unknown_item, "history: item 7 has no SID (the index has 3 items)"),
    ("history SID of no item (generate)", _generate_with_unknown_sid, "expected the SID of an item in the index"),
    ("history_sid of floats (model)", lambda d: tiny_model().check_batch(dict(make_batch(tiny_model(), [2]),
                                                                  history_sid=torch.zeros(1, 2, 4))), "expected integer ids"),
    ("user id out of range (model)", lambda d: tiny_model().check_batch(dict(make_batch(tiny_model(), [2]), user_ids=torch.tensor([7]))),
     "user_ids: expected bucket indices in [0, 7)"),
    ("beam_size 0 (beam search)", lambda d: beam.beam_search(tiny_model(), make_batch(tiny_model(), [2]), 0, 1, None),
     "beam_size: expected a positive int"),
    ("checkpoint config != this run's", _check_other_config, "model.n_embd is 16 there, 32 here"),
    ("checkpoint SIDs != the index on disk", _check_other_sids, "made with other SIDs than the index on disk"),
    ("checkpoint of another version", lambda d: load_ckpt(_tiny_checkpoint(d, version=0)[0]),
     "checkpoint version 0, this code reads version 3"),
    ("truncated checkpoint", lambda d: load_ckpt(_write(d, "c.pt", open(_tiny_checkpoint(d)[0], "rb").read()[:300])),
     "not a readable checkpoint, truncated or corrupt"),
    ("opq.npz of another version", _old_index, "index version 99, this code reads 1"),
    ("CLI unknown --key", lambda d: configs(["--learning_rate=1"]), "unknown option --learning_rate"),
    ("CLI value of the wrong type", lambda d: configs(["--batch_size=1.5"]), "--batch_size: expected int, got '1.5'"),
    ("CLI zero epochs", lambda d: configs(["--epochs=0"]), "--epochs: expected a positive int, got 0"),
    ("CLI --resume with --eval_only", lambda d: configs(["--resume=true", "--eval_only=true"]), "at most one"),
    # every numeric flag finite, null ids, .npz for .npy, empty batches, dtypes, devices
    ("CLI --lr=inf", lambda d: configs(["--lr=inf"]), "--lr: expected a finite number, got inf"),
    ("CLI --attn_pdrop=nan", lambda d: configs(["--attn_pdrop=nan"]), "--attn_pdrop: expected a finite number"),
    ("Amazon reviewerID null", lambda d: _load(d, "d.json", '{"reviewerID": null, "asin": "a", "unixReviewTime": 1}\n'),
     "d.json:1: expected reviewerID to be a string or a number, got null"),
    ("Amazon asin a list", lambda d: _load(d, "d.json", '{"reviewerID": "u", "asin": ["a"], "unixReviewTime": 1}\n'),
     "d.json:1: expected asin to be a string or a number"),
    ("csv line number after a quoted newline", lambda d: _load(d, "d.csv", 'user,item,timestamp,title\nu0,i0,1,"a\nb"\n'
                                                                            'u1,i1\n'),
     "d.csv:4: expected 4 fields, got 2"),
    ("csv field over the size limit", lambda d: _load(d, "d.csv", "user,item,timestamp\nu,i,1\nu," + "x" * 200_000 + ",2\n"),
     "d.csv:3: not a readable CSV row (field larger than field limit"),
    ("csv id of spaces only", lambda d: _load(d, "d.csv", "user,item,timestamp\n  ,i0,1\n"), "d.csv:2: expected the user id to be 1 to 1000 printable characters, got empty"),
    ("--item_emb given a .npz", lambda d: embeddings.read_item_emb(_npz(d), 2), "expected one .npy array, got a .npz archive"),
    ("bool embeddings (sid)", lambda d: sid.build_index(np.ones((4, 2), bool)), "expected a numeric array, got dtype"),
    ("complex embeddings (sid)", lambda d: sid.build_index(np.ones((4, 2), complex)), "expected a numeric array, got dtype"),
    ("numeric strings as embeddings (sid)", lambda d: sid.build_index(np.array([["1", "2"]] * 4)), "expected a numeric array, got dtype"),
    ("huge embeddings (sid)", lambda d: sid.build_index(np.full((4, 2), 1e25, np.float32)), "expected values of a usable scale"),
    ("tiny embeddings (sid)", lambda d: sid.build_index(np.full((4, 2), 1e-30)), "expected values of a usable scale"),
    ("complex codes (lookup)", lambda d: sid.SIDIndex(np.zeros((1, 4), np.uint8)).lookup(np.zeros((1, 4), complex)),
     "expected an integer array"),
    ("batch of 0 users (model)", lambda d: tiny_model().check_batch({k: v[:0] for k, v in make_batch(tiny_model(), [2]).items()}),
     "expected at least one user in the batch, got 0"),
    ("batch of 0 users (generate)", lambda d: beam.beam_search(tiny_model(), {k: v[:0] for k, v in make_batch(tiny_model(), [2]).items()},
                                                               2, 1, None), "expected at least one user"),
    ("index folder without tokens2item.pkl", lambda d: (sid.SIDIndex(np.eye(2, 4, dtype=np.uint8)).save(str(d)),
                                                        os.remove(os.path.join(str(d), "tokens2item.pkl")),
                                                        sid.SIDIndex.load(str(d))), "tokens2item.pkl: missing"),
    ("opq.npz of another index", lambda d: _opq_of_another_index(d), "opq.npz: belongs to another index"),
    ("model codebook_size != the index's (beam search)",
     lambda d: beam.beam_search(tiny_model(codebook_size=16), make_batch(tiny_model(codebook_size=16), [2]), 2, 1,
                                sid.SIDIndex(np.eye(2, 4, dtype=np.uint8))),
     "the index and the model disagree on codebook_size"),
    ("header-only data file names the file", lambda d: dataset.prepare(_load(d, "empty.csv", "user,item,timestamp\n")),
     "empty.csv: no interactions"),
    ("timestamp beyond 64 bits", lambda d: _load(d, "d.inter", INTER_HEADER + "u1\ti1\t99999999999999999999\n"),
     "expected a timestamp that fits in 64 bits"),
    ("--device=mps where there is none", lambda d: cli.pick_device("mps") if not torch.backends.mps.is_available()
     else (_ for _ in ()).throw(ValueError("--device: mps is not available")), "--device: mps is not available"),
]


def _opq_of_another_index(folder):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        sid.build_index(rng.normal(size=(30, 4)).astype(np.float32))[0].save(os.path.join(str(folder), name))
    os.replace(os.path.join(str(folder), "b", "opq.npz"), os.path.join(str(folder), "a", "opq.npz"))
    return sid.SIDIndex.load(os.path.join(str(folder), "a"))


def _npz(folder) -> str:
    path = os.path.join(str(folder), "e.npz")
    np.savez(path, emb=np.ones((2, 3), np.float32))
    return path


@pytest.mark.parametrize("what, make, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_value_error(tmp_path, what, make, fragment):
    with pytest.raises(ValueError, match=re_escape(fragment)):
        make(tmp_path)


def test_clis_print_one_error_line(tmp_path):
    np.savez(tmp_path / "e.npz", emb=np.ones((5, 4), np.float32))
    np.save(tmp_path / "e.npy", np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    sid.build_index(np.load(tmp_path / "e.npy"))[0].save(str(tmp_path / "idx"))   # an index already there
    cases = [(["sid.py", f"--emb={tmp_path / 'e.npz'}", f"--out={tmp_path / 'x'}"], "expected one .npy array"),
             (["sid.py", f"--emb={tmp_path / 'none.npy'}", f"--out={tmp_path / 'x'}"], "is not a readable .npy array"),
             (["train.py", "--lr=nan"], "--lr: expected a finite number"),
             (["sid.py", f"--emb={tmp_path / 'e.npy'}", f"--out={tmp_path / 'idx'}"], "already holds an index"),
             (["train.py", f"--data={tmp_path / 'nowhere.csv'}"], "does not exist")]
    for argv, fragment in cases:
        run = subprocess.run([sys.executable] + argv, cwd=HERE, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and run.stderr.startswith("error: ") and fragment in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


@pytest.mark.parametrize("script, configs", [("train.py", ["TrainConfig", "RPGEDConfig"]),
                                             ("recommend.py", ["RecommendConfig"]), ("sid.py", ["IndexConfig"]),
                                             ("experiments.py", ["ExperimentConfig"]), ("bench.py", ["BenchConfig"]),
                                             ("rpg_ed.py", [])])
def test_help_lists_every_flag_with_its_default_and_comment_and_exits_0(script, configs):
    done = subprocess.run([sys.executable, script, "--help"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr, done.stderr
    modules = {"TrainConfig": train, "RPGEDConfig": rpg_ed, "RecommendConfig": recommend, "IndexConfig": sid,
               "ExperimentConfig": experiments, "BenchConfig": bench}
    for name in configs:
        cls = getattr(modules[name], name)
        comments = cli.field_comments(cls)
        for f in dataclasses.fields(cls):
            default = str(f.default).lower() if isinstance(f.default, bool) else f.default
            line = next((l for l in done.stdout.splitlines() if l.strip().startswith(f"--{f.name}=")), "")
            assert line.split()[0] == f"--{f.name}={default}", (f.name, line)
            assert comments.get(f.name) and comments[f.name] in line, (f.name, line)
