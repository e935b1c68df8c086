"""Two experiments on a trained run, built on the public functions of train.py, recommend.py and the
modules below them.

    python experiments.py --experiment=cold_start --data=PATH/Beauty.txt --out=out/cold
    python experiments.py --experiment=continue --out=out/continue      # MovieLens-100K

Cold start (TIGER, section 4.4): hold out some items with all their interactions, train on the
rest, add the held-out items to the run by their content embeddings (recommend.add_items), and
score the users whose last item was held out, with 0, 1 or 3 of the top 10 open to added items.

Continued training: cut the data at a point in time, train on the part before it, continue that
run on all the data (train.py --init_from, new items placed by their text embeddings), and
compare it with a run trained on all the data from nothing.

`--train_args="--epochs=3 ..."` passes flags to every training run; `--continue_args` to the
continued one only.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np

import cli
import dataset
import embeddings
import evaluate
import runs
import recommend
import train


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
    raw = dataset.load_data(cfg)
    if not raw.item_emb:
        raise ValueError(f"--data: the cold-start experiment expects content embeddings beside {data_path} (NAME_*.npy), found none")
    data = dataset.prepare(raw, not raw.time_ordered)
    emb = embeddings.read_item_emb(raw.item_emb, len(data.item_raw))
    rng = np.random.default_rng(seed)
    n_items = len(data.item_raw)
    cold = np.zeros(n_items, bool)
    cold[rng.choice(n_items, max(1, round(fraction * n_items)), replace=False)] = True
    warm_dir, stem = os.path.join(out, "warm"), os.path.basename(data_path).split(".")[0]
    cli.check_outputs([os.path.join(warm_dir, stem + e) for e in (".txt", "_content.npy")] +
                      [os.path.join(out, "cold_start.json")], raw.inputs)
    os.makedirs(warm_dir, exist_ok=True)
    lines = []
    for user, seq in zip(data.user_raw, data.sequences):          # data preparation, once per user
        kept = seq[~cold[seq]]
        if len(kept) >= 3:
            lines.append(" ".join([user] + [data.item_raw[i] for i in kept]))
    cli.atomic_write(os.path.join(warm_dir, stem + ".txt"), ("\n".join(lines) + "\n").encode())
    warm_items = {i for line in lines for i in line.split()[1:]}
    warm_items = sorted(warm_items, key=dataset.sort_key(warm_items))       # the warm run's item order
    row = {raw_id: k for k, raw_id in enumerate(data.item_raw)}
    buf = io.BytesIO()
    np.save(buf, emb[[row[i] for i in warm_items]])
    cli.atomic_write(os.path.join(warm_dir, stem + "_content.npy"), buf.getvalue())
    run_dir = os.path.join(out, "run")
    train.main([f"--data={os.path.join(warm_dir, stem + '.txt')}", "--format=s3rec", "--emb_source=text",
                f"--out_dir={run_dir}", f"--seed={seed}"] + list(train_args))

    run = runs.load_run(run_dir)
    new = [i for i in range(n_items) if cold[i] and data.item_raw[i] not in run.item_id]
    recommend.add_items(run_dir, emb[new], [data.item_raw[i] for i in new])
    return score_cold_start(out, data, new, seed)


def score_cold_start(out: str, data: dataset.Dataset, new: list, seed: int = 0) -> dict:
    """The users of `data` whose last item is one of `new` (added to OUT/run after training):
    the model with 0, 1 or 3 of the top 10 open to added items, random and popularity rankings."""
    run_dir, rng = os.path.join(out, "run"), np.random.default_rng(seed + 1)
    run, cold = runs.load_run(run_dir), np.isin(np.arange(len(data.item_raw)), new)
    users = [u for u, seq in enumerate(data.sequences) if cold[seq[-1]] and len(seq) > 1]
    histories = [run.item_ids([data.item_raw[i] for i in data.sequences[u][:-1]]) for u in users]
    target = run.item_ids([data.item_raw[data.sequences[u][-1]] for u in users])
    popular = np.argsort(-np.bincount(run.items, minlength=run.index.n_items), kind="stable")[:10]
    random_top = np.argsort(rng.random((len(users), run.index.n_items)), axis=1)[:, :10]
    results = {"held_out_items": len(new), "users": len(users), "items": run.index.n_items,
               "random": evaluate.rank_metrics(random_top, target),
               "popularity": evaluate.rank_metrics(np.tile(popular, (len(users), 1)), target)}
    is_new = run.item_ids([data.item_raw[i] for i in new])
    for share in NEW_SHARES:
        items, _ = recommend.recommend(run, histories, [data.user_raw[u] for u in users], new_share=share)
        results[f"model, new_share {share}"] = {**evaluate.rank_metrics(items, target),
                                                "held_out_slots": float(np.isin(items, is_new).mean())}
    cli.atomic_write(os.path.join(out, "cold_start.json"), json.dumps(results, indent=2).encode())
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
    cli.atomic_write(path, text.encode())


def _text_emb_file(path: str, data: dataset.Dataset, vectors: dict) -> None:
    buf = io.BytesIO()
    np.save(buf, np.stack([vectors[i] for i in data.item_raw]))
    cli.atomic_write(path, buf.getvalue())


def continue_experiment(out: str, cut: float = 0.8, train_args: list = (), continue_args: list = (),
                        data_path: str = "ml-100k") -> dict:
    """MovieLens-100K (or `data_path`) cut at the `cut` quantile of time. base: trained on what came before the cut.
    continued: --init_from=base on all the data (new items added by their text embeddings).
    scratch: trained on all the data from nothing. All three build SIDs from the same text embeddings
    (TF-IDF of title and genres, fitted on the whole catalogue: content, no interactions), because a
    run must place items it never saw. Scores both final runs on every test user and on the later
    period's (test item after the cut); writes OUT/continue.json."""
    raw = dataset.load_data(train.TrainConfig(data=data_path))          # timestamps and item text
    cut_time = float(np.quantile(raw.times, cut))
    rows = list(zip(raw.users, raw.items, raw.times))
    early = [r for r in rows if r[2] < cut_time]
    data = {"early": dataset.prepare(dataset.RawData(*map(list, zip(*early)))),
            "all": dataset.prepare(dataset.RawData(list(raw.users), list(raw.items), list(raw.times)))}
    catalogue = dataset.Dataset.from_sequences([], [], data["all"].item_raw)
    vectors = dict(zip(catalogue.item_raw, embeddings.text_embeddings(catalogue, raw.item_text, 64, 0)))
    trained = {}
    cli.check_outputs([os.path.join(out, n, n + e) for n in ("early", "all") for e in (".inter", "_text.npy")] +
                      [os.path.join(out, "continue.json")], raw.inputs)
    for name, part in (("early", early), ("all", rows)):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        _write_inter(os.path.join(out, name, f"{name}.inter"), part)
        _text_emb_file(os.path.join(out, name, f"{name}_text.npy"), data[name], vectors)
    common = ["--emb_source=text", "--report_beam_size=0"] + list(train_args)
    for name, args in (("base", [f"--data={out}/early/early.inter"]),
                       ("continued", [f"--data={out}/all/all.inter", f"--init_from={out}/base"] + list(continue_args)),
                       ("scratch", [f"--data={out}/all/all.inter"])):
        start = time.time()
        trained[name] = {"results": train.main(args + common + [f"--out_dir={out}/{name}"]),
                      "minutes": round((time.time() - start) / 60, 2)}
    time_of = {(u, i): t for u, i, t in rows}          # ML-100K: a user rates an item once
    results = {"cut_time": cut_time, "interactions": {"early": len(early), "all": len(rows)}}
    for name in ("continued", "scratch"):
        run = runs.load_run(os.path.join(out, name))
        seqs = [run.items[run.offsets[u]:run.offsets[u + 1]] for u in range(len(run.user_raw))]
        later = np.array([time_of[(run.user_raw[u], run.item_raw[s[-1]])] >= cut_time for u, s in enumerate(seqs)])
        items, _ = recommend.recommend(run, [s[:-1] for s in seqs], run.user_raw.tolist())
        target = np.array([s[-1] for s in seqs])
        results[name] = {"minutes": trained[name]["minutes"], "test": trained[name]["results"]["test"],
                         "later_users": int(later.sum()), "later": evaluate.rank_metrics(items[later], target[later])}
    results["base_minutes"] = trained["base"]["minutes"]
    cli.atomic_write(os.path.join(out, "continue.json"), json.dumps(results, indent=2).encode())
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

@dataclass
class ExperimentConfig:
    """One experiment, its data and its output folder."""
    experiment: str = ""             # cold_start | continue
    out: str = ""                    # folder for the experiment's data, runs and results
    data: str = "ml-100k"            # the data (cold_start: a file with NAME_*.npy content embeddings beside it)
    train_args: str = ""             # flags for every training run, space-separated
    continue_args: str = ""          # flags for the continued run only (continue)
    seed: int = 0                    # cold_start: the sample of new items and the training run's --seed
    overwrite: bool = False          # write into an --out folder that is not empty

    def __post_init__(self):
        if self.experiment not in ("cold_start", "continue"):
            raise ValueError(f"--experiment: expected cold_start or continue, got {self.experiment!r}")
        if not self.out:
            raise ValueError("--out: expected a folder for the experiment's data, runs and results")
        if self.seed < 0:
            raise ValueError(f"--seed: expected 0 or a positive int, got {self.seed}")


SETS = ("data", "out_dir", "init_from")      # flags each experiment sets for its training runs


def check_train_args(name: str, argv: list) -> None:
    """Flags for training runs, checked as train.py checks them, before the experiment writes
    anything; a flag the experiment sets itself is refused."""
    try:
        given = cli.parse_flags(argv, train.TrainConfig, train.RPGEDConfig)
        train.make_configs(given)
    except ValueError as e:
        raise ValueError(f"--{name}: {e}") from None
    if own := [k for k in given if k in SETS]:
        raise ValueError(f"--{name}: --{own[0]} is set by the experiment itself; expected other training flags")


def main(argv: list) -> dict:
    args = ExperimentConfig(**cli.parse_flags(argv, ExperimentConfig, usage=__doc__))
    check_train_args("train_args", args.train_args.split())
    check_train_args("continue_args", args.continue_args.split())
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)) and not args.overwrite:
        raise ValueError(f"--out: {args.out} exists and is not an empty folder; choose another, or write into it "
                         "with --overwrite=true")
    with cli.exclusive(args.out, "--out"):                # one experiment at a time in a folder
        if args.experiment == "cold_start":
            return cold_start(args.data, args.out, seed=args.seed, train_args=args.train_args.split())
        return continue_experiment(args.out, train_args=args.train_args.split(),
                                   continue_args=args.continue_args.split(), data_path=args.data)


if __name__ == "__main__":
    cli.run_main(main)
