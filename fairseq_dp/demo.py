# Copyright (c) fairseq_dp contributors. MIT license.
"""``make demo``: RGP DP fine-tuning end to end on a task the project generates.

Until a real pretrained checkpoint is wired in, the demo makes its own
stand-in: (1) non-private "public" pre-training of a small plain fairseq
RoBERTa on public sentences that use only 3 of the 10 cue words per polarity;
(2) RGP DP fine-tuning of ``roberta_rgp``, restored from that plain
checkpoint, on the "private" set (all cues) under a target ε, with a new
classification head. Both stages run fairseq's own training command; the demo
streams their logs and prints accuracy and the ε spent. ``--data DIR`` takes an
already binarized sentence-prediction directory for stage 2 (its dictionary
must match the public checkpoint's).
"""

import argparse
import os
import re
import subprocess
import sys
import time

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))

COMMON = [
    "--cpu", "--num-workers", "0", "--seed", "1", "--num-classes", "2", "--init-token", "0",
    "--separator-token", "2", "--max-positions", "64", "--shorten-method", "truncate",
    "--encoder-layers", "2", "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "4", "--log-format", "simple", "--no-epoch-checkpoints",
    "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric",
]


def public_command(data: str, out: str) -> list:
    """Non-private pre-training with stock fairseq: plain task, arch and criterion.
    The plugin is loaded only so that a rerun can resume from checkpoint_last.pt
    on torch >= 2.6 (it allows the types fairseq pickles)."""
    return [
        sys.executable, "-m", "fairseq_cli.train", data, *COMMON, "--user-dir", PLUGIN_DIR,
        "--task", "sentence_prediction", "--criterion", "sentence_prediction", "--arch", "roberta",
        "--classification-head-name", "public_head",
        "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "fixed",
        "--batch-size", "32", "--max-epoch", "2", "--log-interval", "50",
        "--save-dir", os.path.join(out, "public_checkpoints"),
    ]


def private_command(data: str, restore: str, out: str, args) -> list:
    return [
        sys.executable, "-m", "fairseq_cli.train", data, *COMMON,
        "--user-dir", PLUGIN_DIR,
        "--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction",
        "--arch", "roberta_rgp", "--rgp-rank", str(args.rank),
        "--rgp-carrier-source", args.carrier_source,
        "--restore-file", restore, "--reset-optimizer", "--reset-dataloader",
        "--reset-meters", "--reset-lr-scheduler",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--lr", str(args.lr),
        "--lr-scheduler", "fixed", "--clip-norm", "0",
        "--batch-size", str(args.batch_size), "--max-epoch", str(args.epochs),
        "--dp-clip-norm", str(args.clip_norm), "--dp-target-epsilon", str(args.epsilon),
        "--dp-delta", str(args.delta), "--dp-accountant", "prv",
        "--save-dir", os.path.join(out, "checkpoints"), "--log-interval", "20",
        "--log-file", os.path.join(out, "train.log"), "--seed", str(args.seed),
    ]


def run(cmd: list, stage: str) -> list:
    """Runs one fairseq command, streaming its train/valid/DP lines."""
    print(f"[demo] {stage}: " + " ".join(cmd[1:]), flush=True)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if "| INFO |" in line and any(t in line for t in ("| train", "| valid", "fairseq_dp")):
                print(line, end="", flush=True)
    if proc.returncode != 0:
        sys.stdout.writelines(lines[-40:])
        sys.exit(f"[demo] {stage} failed (exit {proc.returncode})")
    return lines


def last_value(lines, tag: str, key: str):
    pattern = re.compile(rf"\| {tag} \|.*\| {key} ([0-9.e+-]+|inf)")
    values = [m.group(1) for line in lines for m in [pattern.search(line)] if m]
    return float(values[-1]) if values else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", help="binarized private data for stage 2 (default: generated)")
    p.add_argument("--out", default="demo_output", help="where data, checkpoints and logs go")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--carrier-source", choices=["weight", "update"], default="weight")
    p.add_argument("--seed", type=int, default=1, help="seed of the DP stage")
    p.add_argument("--n-train", type=int, default=8000)
    args = p.parse_args(argv)

    from fairseq_dp.data.synthetic import make_synthetic_dataset

    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    public = make_synthetic_dataset(os.path.join(args.out, "public_data"), 2000, 200, seed=7, n_cues=3)
    run(public_command(public, args.out), "stage 1, non-private pre-training on public data")
    restore = os.path.join(args.out, "public_checkpoints", "checkpoint_best.pt")

    data = args.data
    if data is None:
        data = make_synthetic_dataset(os.path.join(args.out, "private_data"), args.n_train, 1000, seed=2)
    lines = run(private_command(data, restore, args.out, args), "stage 2, RGP DP fine-tuning on private data")

    first = last_value(lines[: next(i for i, l in enumerate(lines) if "| valid |" in l) + 1], "valid", "accuracy")
    accuracy = last_value(lines, "valid", "best_accuracy") or last_value(lines, "valid", "accuracy")
    epsilon = last_value(lines, "train", "dp_epsilon")
    print(
        f"\n[demo] done in {time.time() - start:.0f} s. Private validation accuracy: {first:.1f}% after "
        f"the first DP epoch, best {accuracy:.1f}%, with ε = {epsilon} spent at δ = {args.delta} "
        f"(target ε = {args.epsilon}).\n"
        f"[demo] DP checkpoints: {os.path.join(args.out, 'checkpoints')}\n"
        f"[demo] DP training log: {os.path.join(args.out, 'train.log')}",
        flush=True,
    )


if __name__ == "__main__":
    main()
