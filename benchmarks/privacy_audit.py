# Copyright (c) fairseq_dp contributors. MIT license.
"""Privacy audit benchmark: the audited ε lower bound beside the accountant's ε.

    python benchmarks/privacy_audit.py --work-dir /work/audit_bench

For each method (RGP, DP-LoRA, DP full fine-tuning with ghost clipping) and each
target ε (1, 4, 8, and ∞: no noise, clipping only) it runs ``fairseq-dp-audit``
on SST-2 sentence classification: canaries (random WordPiece tokens, a random
label) are added to a subset of SST-2's training set, each with probability ½,
the model is trained once, and the audit bounds ε from below with 95 %
confidence. The lower bound must never exceed the accountant's ε (that would be
a privacy bug); how far below it stays says how loose a one-run black-box
audit is, not how private the run "really" is.

The default model is tiny and trained from scratch (MiniLM's vocabulary, 2
layers, width 128): the twelve runs took 7 minutes of one CPU core here (28–42 s each);
``--model minilm`` fine-tunes the converted all-MiniLM-L6-v2 instead (hours).
Writes ``benchmarks/results/privacy_audit.json`` and a plot next to it.
"""

import argparse
import datetime
import json
import logging
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.sst2_minilm import commit  # noqa: E402

PLUGIN_DIR = os.path.join(ROOT, "fairseq_dp")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "privacy_audit.json")
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2")
BIN = os.path.dirname(sys.executable)

TINY = ["--encoder-layers", "2", "--encoder-embed-dim", "128", "--encoder-ffn-embed-dim", "256",
        "--encoder-attention-heads", "4"]
# (arch of the tiny model, arch of MiniLM, method flags)
METHODS = {
    "rgp": ("roberta_rgp", "roberta_rgp_minilm", ["--rgp-rank", "8"]),
    "lora": ("roberta_lora", "roberta_lora_minilm", ["--lora-rank", "16"]),
    "full": ("roberta", "roberta_pooled_minilm", ["--dp-clipping", "ghost"]),
}


def prepare(args) -> tuple:
    from fairseq_dp.convert import convert, minilm_dir
    from fairseq_dp.prepare_glue import Tokenizer, copy_glue_dir, prepare as prepare_glue

    ckpt_dir = os.path.join(args.work_dir, "minilm")
    if not os.path.exists(os.path.join(ckpt_dir, "model.pt")):
        convert(minilm_dir(), ckpt_dir)
    bin_dir = os.path.join(args.work_dir, "bin")
    if not os.path.exists(os.path.join(bin_dir, "label", "dict.txt")):
        tsv_dir = os.path.join(args.work_dir, "tsv")
        copy_glue_dir(args.data, tsv_dir, args.train_examples, args.seed)
        prepare_glue(tsv_dir, bin_dir, os.path.join(ckpt_dir, "dict.txt"), Tokenizer(minilm_dir()), args.max_length)
    return ckpt_dir, bin_dir


def train_flags(args, data: str, ckpt_dir: str, method: str, epsilon: float) -> list:
    tiny_arch, minilm_arch, method_flags = METHODS[method]
    if args.model == "tiny":
        model = ["--arch", tiny_arch, *TINY]
    else:
        model = ["--arch", minilm_arch, "--finetune-from-model", os.path.join(ckpt_dir, "model.pt")]
    privacy = (["--dp-noise-multiplier", "0"] if math.isinf(epsilon)
               else ["--dp-target-epsilon", str(epsilon)])
    return [
        data, "--user-dir", PLUGIN_DIR, "--cpu", "--num-workers", "0", "--seed", str(args.seed),
        "--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction",
        "--num-classes", "2", "--init-token", "0", "--separator-token", "2", "--max-positions", "512",
        *model, *method_flags,
        "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--lr", str(args.lr), "--lr-scheduler", "fixed",
        "--batch-size", str(args.batch_size), "--max-epoch", str(args.epochs),
        "--dp-clip-norm", str(args.clip), *privacy, "--dp-delta", str(args.delta),
        "--log-format", "simple", "--log-interval", "50", "--no-epoch-checkpoints", "--disable-validation",
    ]


def launch(args, data, ckpt_dir, method, epsilon) -> tuple:
    name = f"{method}_eps{'inf' if math.isinf(epsilon) else f'{epsilon:g}'}"
    out = os.path.join(args.work_dir, "runs", name)
    if os.path.exists(os.path.join(out, "audit.json")):
        return name, out, None
    if os.path.exists(out):  # an interrupted run: start it again
        subprocess.run(["rm", "-rf", out], check=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [os.path.join(BIN, "fairseq-dp-audit"), "--canaries", str(args.canaries), "--out", out,
           "--", "fairseq-train", *train_flags(args, data, ckpt_dir, method, epsilon)]
    print("[audit-bench] " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    log = open(out + ".log", "w")
    return name, out, (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())


def run_all(args, data, ckpt_dir) -> dict:
    queue = [(m, e) for m in args.methods for e in args.epsilons]
    running, rows = [], {}
    while queue or running:
        while queue and len(running) < args.parallel:
            name, out, proc = launch(args, data, ckpt_dir, *queue.pop(0))
            if proc is None:
                rows[name] = read_row(out, None)
            else:
                running.append((name, out, proc))
        time.sleep(2)
        for item in list(running):
            name, out, (proc, start) = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if not os.path.exists(os.path.join(out, "audit.json")):
                raise RuntimeError(f"{name} failed (exit {proc.returncode}): see {out}.log")
            rows[name] = read_row(out, time.time() - start)
            print(f"[audit-bench] {name}: accountant ε {rows[name]['accountant_epsilon']}, audited ε ≥ "
                  f"{rows[name]['audited_epsilon_lower_bound']:.3f}", flush=True)
    return rows


def read_row(out: str, wall) -> dict:
    with open(os.path.join(out, "audit.json")) as f:
        report = json.load(f)
    row = {k: report[k] for k in ("accountant_epsilon", "audited_epsilon_lower_bound", "delta", "confidence",
                                  "violation", "canaries", "included", "canary_tokens", "user_train_examples",
                                  "guesses", "correct", "best_guess", "ledger")}
    row["score_means"] = {k: report["scores"][k] for k in ("included_mean", "excluded_mean")}
    row["wall_s"] = round(wall, 1) if wall is not None else None
    return row


def table(result: dict) -> str:
    lines = ["| method | target ε | accountant ε | audited ε ≥ (95 %) | correct / guesses | mean score in / out |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in result["rows"].items():
        method, target = name.split("_eps")
        acc = row["accountant_epsilon"]
        acc = acc if isinstance(acc, str) else f"{acc:.3f}"
        means = row["score_means"]
        lines.append(f"| {method} | {target} | {acc} | {row['audited_epsilon_lower_bound']:.3f} | "
                     f"{row['correct']} / {row['guesses']} | {means['included_mean']:.3f} / "
                     f"{means['excluded_mean']:.3f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger verbose
        import matplotlib.pyplot as plt
    except ImportError:
        print("[audit-bench] matplotlib missing: no plot (pip install -e '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    finite = [r["accountant_epsilon"] for r in result["rows"].values() if not isinstance(r["accountant_epsilon"], str)]
    top = max(finite + [1.0]) * 1.25
    for method in dict.fromkeys(n.split("_eps")[0] for n in result["rows"]):
        rows = [(r["accountant_epsilon"], r["audited_epsilon_lower_bound"]) for n, r in result["rows"].items()
                if n.split("_eps")[0] == method]
        xs = [top if isinstance(a, str) else a for a, _ in rows]
        ax.plot(xs, [b for _, b in rows], "o-", label=method)
    ax.plot([0, top], [0, top], "k--", lw=1, label="audited = accountant")
    ax.set_xlabel("accountant ε (upper bound; rightmost: no noise)")
    ax.set_ylabel("audited ε lower bound (95 %)")
    ax.set_title("One-run audit, SST-2 " + result["settings"]["model"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="SST-2 train.tsv and dev.tsv (GLUE format)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "benchmarks", "work", "privacy_audit"))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    p.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0, math.inf])
    p.add_argument("--train-examples", type=int, default=1000, help="fixed random subset of train.tsv")
    p.add_argument("--canaries", type=int, default=500)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6, help="several passes: memorizing canaries needs them")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)))
        return
    args.work_dir, args.out, args.data = (os.path.abspath(x) for x in (args.work_dir, args.out, args.data))
    start = time.time()
    ckpt_dir, data = prepare(args)
    rows = run_all(args, data, ckpt_dir)
    order = [f"{m}_eps{'inf' if math.isinf(e) else f'{e:g}'}" for m in args.methods for e in args.epsilons]
    result = {
        "command": " ".join(["python", "benchmarks/privacy_audit.py", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_s": round(time.time() - start, 1),
        "settings": {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
                     for k, v in vars(args).items() if k not in ("table",)}
                    | {"epsilons": [e if math.isfinite(e) else "inf" for e in args.epsilons]},
        "rows": {name: rows[name] for name in order},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(table(result))
    violations = [n for n, r in result["rows"].items() if r["violation"]]
    if violations:
        print(f"[audit-bench] VIOLATION in {violations}: the audited bound exceeds the accountant's ε")
        sys.exit(3)


if __name__ == "__main__":
    main()
