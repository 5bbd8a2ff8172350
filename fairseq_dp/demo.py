# Copyright (c) fairseq_dp contributors. MIT license.
"""``make demo``: RGP DP fine-tuning end to end on a task the project generates.

Writes the data, trains a small ``roberta_rgp`` with fairseq's own training
command under a target ε, streams fairseq's log, and prints the validation
accuracy and the ε spent. ``--data DIR`` takes an already binarized
sentence-prediction directory (``input0/``, ``label/``) instead.
"""

import argparse
import os
import re
import subprocess
import sys
import time

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))

# a small encoder that trains in a few minutes on 2 CPU cores
DEMO_MODEL = [
    "--arch", "roberta_rgp", "--encoder-layers", "2", "--encoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--encoder-attention-heads", "4",
]


def train_command(data: str, out: str, args) -> list:
    return [
        sys.executable, "-m", "fairseq_cli.train", data,
        "--user-dir", PLUGIN_DIR, "--cpu", "--num-workers", "0", "--seed", "1",
        "--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction",
        "--num-classes", "2", "--init-token", "0", "--separator-token", "2",
        "--max-positions", "64", "--shorten-method", "truncate", *DEMO_MODEL,
        "--rgp-rank", str(args.rank),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--lr", str(args.lr),
        "--lr-scheduler", "fixed", "--clip-norm", "0",
        "--batch-size", str(args.batch_size), "--max-epoch", str(args.epochs),
        "--dp-clip-norm", str(args.clip_norm), "--dp-target-epsilon", str(args.epsilon),
        "--dp-delta", str(args.delta), "--dp-accountant", "prv",
        "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric",
        "--no-epoch-checkpoints", "--save-dir", os.path.join(out, "checkpoints"),
        "--log-format", "simple", "--log-interval", "20",
        "--log-file", os.path.join(out, "train.log"),
    ]


def last_value(lines, tag: str, key: str):
    pattern = re.compile(rf"\| {tag} \|.*\| {key} ([0-9.e+-]+|inf)")
    values = [m.group(1) for line in lines for m in [pattern.search(line)] if m]
    return float(values[-1]) if values else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", help="binarized sentence-prediction data (default: generate a task)")
    p.add_argument("--out", default="demo_output", help="where data, checkpoints and logs go")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--n-train", type=int, default=8000)
    args = p.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    data = args.data
    if data is None:
        from fairseq_dp.data.synthetic import make_synthetic_dataset

        data = os.path.join(args.out, "data")
        print(f"[demo] writing a generated classification task to {data}", flush=True)
        make_synthetic_dataset(data, n_train=args.n_train, n_valid=1000)

    cmd = train_command(data, args.out, args)
    print("[demo] " + " ".join(cmd[1:]), flush=True)
    start = time.time()
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if "| INFO |" in line and any(t in line for t in ("| train", "| valid", "fairseq_dp")):
                print(line, end="", flush=True)
    if proc.returncode != 0:
        sys.stdout.writelines(lines[-40:])
        sys.exit(f"[demo] training failed (exit {proc.returncode})")

    accuracy = last_value(lines, "valid", "best_accuracy") or last_value(lines, "valid", "accuracy")
    epsilon = last_value(lines, "train", "dp_epsilon")
    print(
        f"\n[demo] done in {time.time() - start:.0f} s: best validation accuracy {accuracy:.1f}% "
        f"with ε = {epsilon} spent at δ = {args.delta} (target ε = {args.epsilon})\n"
        f"[demo] checkpoints: {os.path.join(args.out, 'checkpoints')}\n"
        f"[demo] training log: {os.path.join(args.out, 'train.log')}",
        flush=True,
    )


if __name__ == "__main__":
    main()
