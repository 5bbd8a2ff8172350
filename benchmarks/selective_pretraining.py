# Copyright (c) fairseq_dp contributors. MIT license.
"""Selective pre-training benchmark: SST-2 (private) against the public pool.

    python benchmarks/selective_pretraining.py

1. ``fairseq-dp-select``: a DP domain classifier (DP-LoRA on all-MiniLM-L6-v2,
   SST-2 train sentences against 5x as many pool sentences, ``--classifier-epsilon``)
   scores the whole pool (``../shared/data/public_pool``) and the best
   sentences of >= 6 words fill ``--words``; the baseline is a random sample
   of the same size and filter.
2. ``fairseq-dp-pretrain``: the tiny BERT (4 layers, hidden 312, MiniLM's
   WordPiece vocabulary) is pre-trained from scratch with fairseq's masked LM
   on each corpus for the same ``--pretrain-updates``.
3. SST-2 fine-tuning of each model (selected, random, and no pre-training at
   all) with DP full fine-tuning (ghost clipping) at total ε in ``--epsilons``
   (δ = ``--delta``; the selected model's ε includes the classifier's, the
   others spent nothing before) and without privacy, all with the same data,
   epochs and maximum length; dev accuracy after each epoch.
4. The bigger public model for reference: all-MiniLM-L6-v2 (22M parameters,
   pre-trained elsewhere) fine-tuned the same way (``--minilm run``), or its
   numbers copied from ``results/sst2_minilm.json`` (``--minilm recorded``:
   RGP and non-private, one epoch, δ = 1e-5; labelled as such).

Every stage is cached in ``--workdir`` (a rerun continues where it stopped:
finished selections, pre-trainings and fine-tuning rows are kept; a
half-finished fine-tuning row restarts). The JSON (``--out``) is rewritten after
each step; the end writes the plot next to it. ``--table`` prints the README's
table from an existing JSON.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.e2e_generation import load_results, machine, save_results  # noqa: E402
from benchmarks.sst2_minilm import commit  # noqa: E402

PLUGIN_DIR = os.path.join(ROOT, "fairseq_dp")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "selective_pretraining.json")
REVIEW_SOURCES = ("movie_reviews", "movie_plots", "product_reviews", "pros_cons")
INITS = ("selected", "random", "none")


def log(msg: str) -> None:
    print(f"[selective] {msg}", flush=True)


def run_logged(cmd: list, log_path: str, threads: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    log(" ".join(cmd[1:]) + f"\n[selective]   log: {log_path}")
    with open(log_path, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def run_parallel(jobs: list, parallel: int) -> None:
    """jobs: (name, cmd, log_path, on_done); ``parallel`` at a time, one thread each
    (two single-threaded runs use two cores better than one run with two threads)."""
    pending = list(jobs)
    running = {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, path, on_done = pending.pop(0)
            running[name] = (run_logged(cmd, path, threads=1), path, on_done, time.time())
        time.sleep(20)
        for name in list(running):
            proc, path, on_done, start = running[name]
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode:
                with open(path, errors="replace") as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"{name} failed (exit {proc.returncode}), log {path}:\n{tail}")
            on_done(time.time() - start)


# ---------------------------------------------------------------- stages 1-2

def stage_select(args, results: dict) -> dict:
    corpora = {}
    for name in ("selected", "random"):
        out = os.path.join(args.workdir, name)
        summary_path = os.path.join(out, "selection.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            if summary.get("words_budget") != args.words:
                os.remove(summary_path)
        if not os.path.exists(summary_path):
            cmd = [sys.executable, "-m", "fairseq_dp.select", "--pool", args.pool, "--out", out,
                   "--words", str(args.words), "--seed", str(args.seed)]
            if name == "random":
                cmd += ["--random"]
            else:
                cmd += ["--private", args.sst2, "--encoder", minilm_checkpoint(args),
                        "--epsilon", str(args.classifier_epsilon), "--delta", str(args.delta),
                        "--updates", str(args.classifier_updates), "--batch-size", str(args.classifier_batch),
                        "--micro-batch", "64", "--lr", str(args.classifier_lr), "--max-length", "32"]
            os.makedirs(out, exist_ok=True)
            path = os.path.join(args.workdir, f"select_{name}.log")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            log(" ".join(cmd[1:]) + f"\n[selective]   log: {path}")
            with open(path, "w") as f:
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode:
                    raise RuntimeError(f"selection {name} failed, log {path}")
            with open(summary_path) as f:
                summary = json.load(f)
        words = summary["selected_words"] or 1
        summary["review_domain_share"] = round(
            sum(summary["sources"].get(s, {}).get("words", 0) for s in REVIEW_SOURCES) / words, 4)
        results["corpora"][name] = summary
        corpora[name] = out
        log(f"{name}: {summary['selected_sentences']} sentences, {summary['selected_words']} words, "
            f"review-domain share {summary['review_domain_share']:.3f}")
    save_results(args.out, results)
    return corpora


def minilm_checkpoint(args) -> str:
    from fairseq_dp.convert import convert, minilm_dir

    path = os.path.join(args.workdir, "minilm")
    if not os.path.exists(os.path.join(path, "model.pt")):
        convert(minilm_dir(), path)
    return path


# ---------------------------------------------------------------- stage 3: pre-training

def finished_updates(checkpoint: str) -> int:
    from fairseq_dp.checkpoint_ledger import finished_updates as updates

    return updates(checkpoint) if os.path.exists(checkpoint) else 0


def stage_pretrain(args, results: dict, corpora: dict, needed) -> dict:
    """Pre-trains the models of ``needed`` (corpus names) that are not done yet."""
    checkpoints, jobs = {}, []
    dict_path = os.path.join(minilm_checkpoint(args), "dict.txt")
    for name, corpus in corpora.items():
        out = os.path.join(args.workdir, f"pretrain_{name}")
        ckpt = os.path.join(out, "checkpoints", "checkpoint_last.pt")
        checkpoints[name] = ckpt
        log_path = os.path.join(args.workdir, f"pretrain_{name}.log")

        def done(wall, name=name, ckpt=ckpt, log_path=log_path):
            results["pretraining"][name] = pretrain_summary(ckpt, log_path, wall)
            save_results(args.out, results)

        if finished_updates(ckpt) >= args.pretrain_updates:
            if name not in results["pretraining"]:
                done(None)
            continue
        if name not in needed:
            continue
        cmd = [sys.executable, "-m", "fairseq_dp.pretrain", corpus, out, "--dict", dict_path,
               "--max-update", str(args.pretrain_updates), "--batch-size", str(args.pretrain_batch),
               "--lr", str(args.pretrain_lr), "--cpu", "--seed", str(args.seed)]
        jobs.append((f"pretrain {name}", cmd, log_path, done))
    run_parallel(jobs, args.parallel)
    return checkpoints


def pretrain_summary(ckpt: str, log_path: str, wall) -> dict:
    from fairseq_dp.demo import values

    with open(log_path, errors="replace") as f:
        lines = f.readlines()
    loss = values(lines, "valid", "loss")
    walls = values(lines, "train", "wall") or values(lines, "train_inner", "wall")
    return {"checkpoint": ckpt, "updates": finished_updates(ckpt), "valid_loss_base2": loss[-1] if loss else None,
            "valid_loss_per_epoch": loss, "wall_s": round(wall if wall else (walls[-1] if walls else 0), 1)}


# ---------------------------------------------------------------- stage 4: fine-tuning

def stage_sst2(args) -> str:
    from fairseq_dp.convert import minilm_dir
    from fairseq_dp.prepare_glue import Tokenizer, prepare

    bin_dir = os.path.join(args.workdir, "sst2-bin")
    if not os.path.exists(os.path.join(bin_dir, "prepare.json")):
        prepare(args.sst2, bin_dir, os.path.join(minilm_checkpoint(args), "dict.txt"), Tokenizer(minilm_dir()),
                args.max_length)
    return bin_dir


def train_examples(bin_dir: str) -> int:
    with open(os.path.join(bin_dir, "prepare.json")) as f:
        return json.load(f)["splits"]["train"]["examples"]


def row_name(init: str, eps) -> str:
    return f"{init}-{'nonprivate' if eps is None else f'eps{eps:g}'}"


def finetune_command(args, data: str, init: str, eps, save_dir: str, n_train: int) -> list:
    cmd = [sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", PLUGIN_DIR, "--cpu",
           "--num-workers", "0", "--seed", str(args.seed),
           "--num-classes", "2", "--init-token", "0", "--separator-token", "2", "--max-positions", "512",
           "--max-epoch", str(args.epochs), "--best-checkpoint-metric", "accuracy",
           "--maximize-best-checkpoint-metric", "--no-epoch-checkpoints", "--save-dir", save_dir,
           "--log-format", "simple", "--log-interval", "10",
           "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--adam-eps", "1e-6", "--clip-norm", "0"]
    if init == "minilm":
        arch = "roberta_lora_minilm" if eps is not None else "roberta_pooled_minilm"
        # converted by stage_sst2 (minilm_checkpoint) before any row runs
        cmd += ["--finetune-from-model", os.path.join(args.workdir, "minilm", "model.pt")]
        if eps is not None:
            cmd += ["--lora-rank", "16", "--lora-targets", "q,k,v,out,fc1,fc2"]
    else:
        arch = "roberta_pooled_tiny"
        if init != "none":
            cmd += ["--finetune-from-model", args.pretrained[init]]
    cmd += ["--arch", arch]
    if eps is None:
        updates = args.epochs * -(-n_train // args.np_batch)
        cmd += ["--task", "sentence_prediction", "--criterion", "sentence_prediction", "--non-private-baseline",
                "--batch-size", str(args.np_batch), "--lr", str(args.np_lr), "--lr-scheduler", "polynomial_decay",
                "--total-num-update", str(updates), "--warmup-updates", str(max(1, updates // 10))]
    else:
        updates = args.epochs * -(-n_train // args.dp_batch)
        lr = args.minilm_lora_lr if init == "minilm" else args.dp_lr
        cmd += ["--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction",
                "--batch-size", str(args.dp_micro_batch), "--update-freq", str(args.dp_batch // args.dp_micro_batch),
                "--lr", str(lr), "--lr-scheduler", "polynomial_decay", "--total-num-update", str(updates),
                "--warmup-updates", str(max(1, updates // 10)),
                "--dp-clip-norm", str(args.minilm_lora_clip if init == "minilm" else args.dp_clip),
                "--dp-target-epsilon", str(eps), "--dp-delta", str(args.delta), "--dp-accountant", "prv"]
        if init != "minilm":
            cmd += ["--dp-clipping", "ghost"]
    return cmd


def finetune_summary(log_path: str, ckpt: str, delta: float) -> dict:
    from fairseq_dp.accounting import PrivacyAccountant, epsilon_of, restore_ledger
    from fairseq_dp.checkpoint_ledger import read_ledger
    from fairseq_dp.demo import values

    with open(log_path, errors="replace") as f:
        lines = f.readlines()
    acc = values(lines, "valid", "accuracy")
    eps = values(lines, "train", "dp_epsilon")
    sigma = values(lines, "train", "dp_sigma")
    updates = values(lines, "train", "num_updates")
    walls = values(lines, "train", "wall")
    out = {"accuracy_final": acc[-1] if acc else None, "accuracy_best": max(acc) if acc else None,
           "accuracy_per_epoch": acc, "epsilon_logged": eps[-1] if eps else None,
           "sigma": sigma[-1] if sigma else None, "updates": int(updates[-1]) if updates else None,
           "wall_s": walls[-1] if walls else None}
    entries = read_ledger(ckpt) if os.path.exists(ckpt) else None
    if entries is not None:
        accountant = PrivacyAccountant("prv")
        restore_ledger(accountant, entries)
        out["ledger"] = [list(e) for e in accountant.history]
        out["epsilon"] = round(epsilon_of(accountant.history, delta, "prv"), 4)
    return out


def stage_finetune(args, results: dict, data: str, inits: list, launch: bool = True) -> None:
    n_train = train_examples(data)
    jobs = []
    # the most informative rows first, so that a run cut short has them: the
    # largest ε of every model, then without privacy, then smaller ε
    by_eps = sorted(args.epsilons, reverse=True)
    order = [(init, eps) for eps in by_eps[:1] + [None] + by_eps[1:] for init in inits]
    for init, eps in order:
            name = row_name(init, eps)
            root = os.path.join(args.workdir, "finetune", name)
            done_path = os.path.join(root, "done.json")
            if os.path.exists(done_path):
                with open(done_path) as f:
                    results["rows"][name] = json.load(f)
                continue
            if not launch:
                continue
            shutil.rmtree(root, ignore_errors=True)  # a half-finished row restarts from its start
            os.makedirs(root)
            cmd = finetune_command(args, data, init, eps, root, n_train)
            log_path = os.path.join(root, "train.log")

            def done(wall, name=name, init=init, eps=eps, root=root, log_path=log_path, cmd=cmd):
                row = {"init": init, "target_epsilon": eps, "private": eps is not None,
                       **finetune_summary(log_path, os.path.join(root, "checkpoint_last.pt"), args.delta),
                       "process_wall_s": round(wall, 1), "checkpoint": os.path.join(root, "checkpoint_last.pt"),
                       "command": " ".join(cmd[2:])}
                with open(os.path.join(root, "done.json"), "w") as f:
                    json.dump(row, f, indent=1)
                results["rows"][name] = row
                save_results(args.out, results)
                log(f"{name}: accuracy {row['accuracy_per_epoch']}, ε {row.get('epsilon')}")

            jobs.append((name, cmd, log_path, done))
    run_parallel(jobs, args.parallel)
    save_results(args.out, results)


def recorded_minilm(results: dict) -> None:
    path = os.path.join(ROOT, "benchmarks", "results", "sst2_minilm.json")
    with open(path) as f:
        recorded = json.load(f)
    for run in recorded["runs"]:
        eps = run.get("target_epsilon")
        results["rows"][row_name("minilm", eps)] = {
            "init": "minilm", "target_epsilon": eps, "private": eps is not None,
            "accuracy_final": run["accuracy_final"], "accuracy_best": run["accuracy_best"],
            "epsilon": run.get("epsilon"), "sigma": run.get("sigma"), "updates": run.get("updates"),
            "wall_s": run.get("wall_s"), "method": run["method"],
            "recorded": (f"copied from benchmarks/results/sst2_minilm.json (commit {recorded.get('commit')}): "
                         f"{run['method']}, {recorded['settings'].get('epochs')} epoch(s), "
                         f"δ = {recorded['settings'].get('delta', 1e-5)}, max length "
                         f"{recorded['settings'].get('max_length')}; not re-run by this benchmark"),
        }


# ---------------------------------------------------------------- report

LABELS = {"selected": "tiny, selected pre-training", "random": "tiny, random pre-training",
          "none": "tiny, no pre-training", "minilm": "all-MiniLM-L6-v2 (22M, public pre-training)"}


def table(results: dict) -> str:
    eps_list = results["settings"]["epsilons"]
    head = "| model | " + " | ".join(f"ε = {e:g}" for e in eps_list) + " | non-private |"
    rows = [head, "|" + " --- |" * (len(eps_list) + 2)]
    for init in ("selected", "random", "none", "minilm"):
        cells = []
        for eps in list(eps_list) + [None]:
            row = results["rows"].get(row_name(init, eps))
            if row is None or row.get("accuracy_final") is None:
                cells.append("–")
                continue
            cell = f"{row['accuracy_final']:.1f} %"
            if eps is not None and row.get("epsilon") is not None:
                cell += f" (ε {row['epsilon']:.2f})"
            if row.get("recorded"):
                cell += "*"
            cells.append(cell)
        if any(c != "–" for c in cells):
            rows.append(f"| {LABELS[init]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict, path: str) -> None:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging set-up lets its DEBUG through
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    colors = {"selected": "C0", "random": "C1", "none": "C2", "minilm": "C3"}
    for init in ("selected", "random", "none", "minilm"):
        pts = sorted((r["epsilon"], r["accuracy_final"]) for r in results["rows"].values()
                     if r["init"] == init and r["private"] and r.get("epsilon") is not None
                     and r.get("accuracy_final") is not None)
        label = LABELS[init] + (" (recorded)" if any(r.get("recorded") for r in results["rows"].values()
                                                     if r["init"] == init) else "")
        if pts:
            ax.plot(*zip(*pts), "o-", color=colors[init], label=label)
        nonprivate = results["rows"].get(row_name(init, None))
        if nonprivate and nonprivate.get("accuracy_final") is not None:
            ax.axhline(nonprivate["accuracy_final"], color=colors[init], linestyle=":", linewidth=1)
    ax.set_xlabel(f"total ε (δ = {results['settings']['delta']:g}; selected: classifier included)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("dotted: the same model without privacy", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", "work", "selective"))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--sst2", default=os.path.join(SHARED, "sst2"), help="GLUE SST-2 directory (private)")
    p.add_argument("--pool", default=os.path.join(SHARED, "public_pool", "pool.tsv.gz"))
    p.add_argument("--words", type=int, default=1_000_000, help="word budget of both corpora")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--delta", type=float, default=1e-6, help="δ of every private run (below 1/N for the "
                   "classifier's N = 6 x 67,349)")
    p.add_argument("--classifier-epsilon", type=float, default=0.5)
    p.add_argument("--classifier-updates", type=int, default=60)
    p.add_argument("--classifier-batch", type=int, default=1024)
    p.add_argument("--classifier-lr", type=float, default=2e-3)
    p.add_argument("--pretrain-updates", type=int, default=500)
    p.add_argument("--pretrain-batch", type=int, default=32, help="sequences of up to 128 tokens")
    p.add_argument("--pretrain-lr", type=float, default=5e-4)
    p.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0],
                   help="total target ε of the DP rows (none given: only the non-private rows)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--dp-batch", type=int, default=1000)
    p.add_argument("--dp-micro-batch", type=int, default=50)
    p.add_argument("--dp-lr", type=float, default=1e-3)
    p.add_argument("--dp-clip", type=float, default=0.1)
    p.add_argument("--np-batch", type=int, default=32)
    p.add_argument("--np-lr", type=float, default=1e-4)
    p.add_argument("--minilm", choices=["recorded", "run", "skip"], default="recorded",
                   help="the MiniLM reference rows: copied from results/sst2_minilm.json, run here (DP-LoRA "
                   "rank 16, about 25 min a row on 2 cores), or left out")
    p.add_argument("--minilm-lora-lr", type=float, default=2e-3)
    p.add_argument("--minilm-lora-clip", type=float, default=1.0)
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--threads", type=int, default=2, help="threads of the selection stage")
    p.add_argument("--stages", default="select,pretrain,finetune",
                   help="comma-separated; 'collect' alone gathers the finished rows of --workdir into the "
                   "JSON, plot and table without running anything")
    p.add_argument("--inits", nargs="+", default=list(INITS) + ["minilm"],
                   choices=list(INITS) + ["minilm"], help="the fine-tuning rows' starting models ('minilm' "
                   "needs --minilm run); two invocations with disjoint --inits may share the cores")
    p.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)))
        return
    os.makedirs(args.workdir, exist_ok=True)
    results = load_results(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("table", "out", "workdir", "stages")}
    settings["sst2"] = os.path.relpath(args.sst2, ROOT)
    settings["pool"] = os.path.relpath(args.pool, ROOT)
    results.update({"benchmark": "selective_pretraining", "commit": commit(),
                    "date": datetime.date.today().isoformat(), "machine": machine(),
                    "command": "python benchmarks/selective_pretraining.py " + " ".join(argv or sys.argv[1:]),
                    "settings": settings})
    for key in ("corpora", "pretraining", "rows"):
        results.setdefault(key, {})
    started = time.time()
    stages = args.stages.split(",")
    inits = [i for i in args.inits if i != "minilm" or args.minilm == "run"]
    if stages == ["collect"]:
        args.pretrained = stage_pretrain(args, results, stage_select(args, results), needed=())
        stage_finetune(args, results, os.path.join(args.workdir, "sst2-bin"), list(INITS) + ["minilm"],
                       launch=False)
    else:
        corpora = stage_select(args, results)
        if "pretrain" in stages or "finetune" in stages:
            needed = corpora if "finetune" not in stages else [c for c in corpora if c in inits]
            args.pretrained = stage_pretrain(args, results, corpora, needed)
        if "finetune" in stages:
            stage_finetune(args, results, stage_sst2(args), inits)
    if args.minilm == "recorded":
        recorded_minilm(results)
    results["last_invocation_wall_s"] = round(time.time() - started, 1)
    save_results(args.out, results)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(table(results))


if __name__ == "__main__":
    main()
