# Copyright (c) fairseq_dp contributors. MIT license.
"""E2E NLG generation benchmark: public pre-training, then private fine-tuning, decoding, scoring.

    python benchmarks/e2e_generation.py --workdir /work/e2e_bench --stage all

No GPT-2 weights are available offline, so the benchmark pre-trains its own small
GPT-2-shaped ``transformer_lm`` on public text (no privacy cost), then fine-tunes it
on E2E with ``--task dp_language_modeling`` in six rows (non-private full and LoRA;
DP-LoRA and DP full with ghost clipping at two target ε), decodes the test MRs with
beam search and scores them with the E2E metrics. Stages:

1. ``pretrain``: the public pool (``source<TAB>sentence``) minus a held-out
   validation slice, binarized by ``fairseq-dp-prepare-lm --format text`` (GPT-2
   BPE), trained with stock fairseq's ``--task language_modeling``.
2. ``finetune``: ``devset.csv`` split by MR (seeded; never by row) into train and
   valid CSVs, ``fairseq-dp-prepare-lm --format e2e``, one fine-tuning per row from
   the pre-trained checkpoint; every row uses ``checkpoint_last.pt`` (picking a
   checkpoint by validation loss would spend the private validation data outside
   the privacy accounting).
3. ``decode``: the distinct MRs of ``testset_w_refs.csv``, beam search through
   ``fairseq_dp.generate``, scored against all references by ``fairseq_dp.eval_e2e``.

Each stage is cached in ``--workdir`` (a finished stage or row is skipped on a
rerun; delete its folder to redo it). The JSON (``--out``) is rewritten after every
finished step, so an interrupted benchmark keeps what finished; ``--stage decode``
and ``all`` end with the BLEU-versus-ε plot next to it (needs matplotlib).
"""

import argparse
import csv
import datetime
import gzip
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.sst2_minilm import commit  # noqa: E402  (the commit and +dirty, as every benchmark records it)
from fairseq_dp.errors import DPConfigError  # noqa: E402

PLUGIN_DIR = os.path.join(ROOT, "fairseq_dp")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "e2e_generation.json")
# ../shared beside the checkout, as on the project's machines
DEFAULT_POOL = os.path.join(os.path.dirname(ROOT), "shared", "data", "public_pool", "pool.tsv.gz")
DEFAULT_E2E = os.path.join(os.path.dirname(ROOT), "shared", "data", "e2e")


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU threads {torch.get_num_threads()}"


def arch_flags(args) -> list:
    """GPT-2's shape at the benchmark's size; every size flag explicit (fairseq's
    defaults for --decoder-input-dim/--decoder-output-dim are 512 whatever the width)."""
    d = str(args.embed_dim)
    return [
        "--decoder-embed-dim", d, "--decoder-input-dim", d, "--decoder-output-dim", d,
        "--decoder-ffn-embed-dim", str(args.ffn_dim), "--decoder-layers", str(args.layers),
        "--decoder-attention-heads", str(args.heads), "--max-target-positions", str(args.max_positions),
        "--decoder-learned-pos", "--no-scale-embedding", "--activation-fn", "gelu_accurate",
        "--decoder-normalize-before", "--share-decoder-input-output-embed",
    ]


def run_logged(cmd: list, log_path: str, env_extra: dict = None) -> float:
    """Run ``cmd`` with its output appended to ``log_path``; return the wall time.
    A failure raises with the log's tail, since that is where fairseq says why."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    start = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.time() - start
    if proc.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}), log {log_path}:\n{tail}")
    return wall


def prepare_lm(fmt: str, train: str, valid: str, destdir: str, log_path: str, extra=()) -> dict:
    run_logged([sys.executable, "-m", "fairseq_dp.prepare_lm", "--format", fmt, "--train", train,
                "--valid", valid, "--destdir", destdir, *extra], log_path)
    with open(os.path.join(destdir, "prepare_lm.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- results file

def load_results(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save_results(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- stage 1: public pre-training

def write_pool_text(args, text_dir: str) -> dict:
    """Shuffle the pool's sentences (seeded) and hold out ``--pretrain-valid-sentences``
    for validation; write one sentence a line."""
    if not os.path.exists(args.pool):
        raise DPConfigError(f"--pool {args.pool}: no such file (the public pool, source<TAB>sentence, gzip)")
    opener = gzip.open if args.pool.endswith(".gz") else open
    sentences = []
    with opener(args.pool, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if "\t" not in line:
                raise DPConfigError(f"--pool {args.pool}: line {n} has no tab (expected source<TAB>sentence)")
            sentence = line.split("\t", 1)[1].strip()
            if sentence:
                sentences.append(sentence)
    if len(sentences) <= args.pretrain_valid_sentences:
        raise DPConfigError(f"--pool {args.pool}: {len(sentences)} sentences, not more than "
                            f"--pretrain-valid-sentences {args.pretrain_valid_sentences}")
    random.Random(args.seed).shuffle(sentences)
    valid, train = sentences[:args.pretrain_valid_sentences], sentences[args.pretrain_valid_sentences:]
    os.makedirs(text_dir, exist_ok=True)
    for name, rows in (("train.txt", train), ("valid.txt", valid)):
        with open(os.path.join(text_dir, name), "w", encoding="utf-8") as f:
            f.writelines(s + "\n" for s in rows)
    return {"train_sentences": len(train), "valid_sentences": len(valid)}


def pretrain_command(args, data: str, save_dir: str) -> list:
    return [
        sys.executable, "-m", "fairseq_cli.train", data, "--task", "language_modeling",
        "--arch", "transformer_lm", *arch_flags(args), "--dropout", str(args.pretrain_dropout),
        "--tokens-per-sample", str(args.pretrain_tokens_per_sample), "--sample-break-mode", "none",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01", "--clip-norm", "1.0",
        "--lr", str(args.pretrain_lr), "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", str(args.pretrain_warmup), "--warmup-init-lr", "1e-07",
        "--batch-size", str(args.pretrain_batch_size), "--max-update", str(args.pretrain_max_update),
        # wall-clock budget: the cores are shared, so a fixed update count has no fixed duration;
        # fairseq validates and saves when it stops for time
        "--stop-time-hours", str(args.pretrain_hours),
        "--cpu", "--num-workers", "0", "--seed", str(args.seed),
        "--log-format", "simple", "--log-interval", str(args.log_interval),
        "--validate-interval-updates", str(args.pretrain_validate_interval), "--validate-interval", "1000",
        "--save-interval-updates", str(args.pretrain_validate_interval), "--keep-interval-updates", "1",
        "--no-epoch-checkpoints", "--save-dir", save_dir,
    ]


def last_valid_stats(log_path: str) -> dict:
    """The last ``valid on 'valid' subset`` line fairseq logged, as numbers."""
    stats = {}
    with open(log_path) as f:
        for line in f:
            if "valid on 'valid' subset" in line:
                stats = dict(re.findall(r"\| (\w+) ([-\d.e+]+)", line))
    return {k: float(v) for k, v in stats.items()}


def last_num_updates(log_path: str) -> int:
    found = re.findall(r"num_updates[= ](\d+)", open(log_path).read())
    return int(found[-1]) if found else 0


def stage_pretrain(args, results: dict) -> str:
    root = os.path.join(args.workdir, "pretrain")
    ckpt = os.path.join(root, "checkpoints", "checkpoint_last.pt")
    done = os.path.join(root, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            results["pretraining"] = json.load(f)
        return ckpt
    os.makedirs(root, exist_ok=True)
    log_path = os.path.join(root, "train.log")
    data = os.path.join(root, "bin")
    info = {}
    if not os.path.exists(os.path.join(data, "prepare_lm.json")):
        text_dir = os.path.join(root, "text")
        info.update(write_pool_text(args, text_dir))
        start = time.time()
        # --truncate: a pool "sentence" longer than GPT-2's context (a run-on paragraph)
        # only feeds fairseq's token blocks, which cut across lines anyway
        prepare_lm("text", os.path.join(text_dir, "train.txt"), os.path.join(text_dir, "valid.txt"), data,
                   log_path, ["--truncate", "--workers", str(args.prepare_workers)])
        info["prepare_wall_s"] = round(time.time() - start, 1)
        with open(os.path.join(root, "split.json"), "w") as f:
            json.dump(info, f)
    else:
        with open(os.path.join(root, "split.json")) as f:
            info = json.load(f)
    with open(os.path.join(data, "prepare_lm.json")) as f:
        info["prepare_lm"] = json.load(f)
    cmd = pretrain_command(args, data, os.path.join(root, "checkpoints"))
    wall = run_logged(cmd, log_path)
    valid = last_valid_stats(log_path)
    info.update({
        "command": " ".join(cmd[2:]),
        "pool": args.pool,
        "layers": args.layers, "embed_dim": args.embed_dim, "ffn_dim": args.ffn_dim, "heads": args.heads,
        "max_positions": args.max_positions, "tokens_per_sample": args.pretrain_tokens_per_sample,
        "batch_size": args.pretrain_batch_size, "max_update": args.pretrain_max_update,
        "stop_time_hours": args.pretrain_hours, "updates_done": last_num_updates(log_path),
        "lr": args.pretrain_lr, "warmup_updates": args.pretrain_warmup, "dropout": args.pretrain_dropout,
        "train_wall_s": round(wall, 1),
        "valid_loss_base2": valid.get("loss"), "valid_ppl": valid.get("ppl"),
        "valid_stats": valid,
    })
    with open(done, "w") as f:
        json.dump(info, f, indent=2)
    results["pretraining"] = info
    return ckpt


# ---------------------------------------------------------------- stage 2: E2E data and fine-tuning

# (name, arch family, private?, target ε); the same order as the JSON and the plot
ROWS = [
    ("nonprivate_full", "full", None),
    ("nonprivate_lora", "lora", None),
    ("dp_lora_eps3", "lora", 3.0),
    ("dp_lora_eps8", "lora", 8.0),
    ("dp_full_eps3", "full", 3.0),
    ("dp_full_eps8", "full", 8.0),
]
# A clip this large never binds (per-example gradient norms of these models are
# far below it; the JSON records the largest logged norm): the non-private rows then
# take the plain mean gradient through the same task, examples and loss as the DP rows.
NONPRIVATE_CLIP = 1e6


def read_e2e_csv(path: str) -> list:
    """(mr, ref) rows of an E2E CSV with header ``mr,ref``."""
    if not os.path.exists(path):
        raise DPConfigError(f"{path}: no such file (E2E CSV with header mr,ref; see --e2e-dir)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["mr", "ref"]:
            raise DPConfigError(f"{path}: expected the header 'mr,ref', got {header}")
        return [(row[0], row[1]) for row in reader if row]


def write_e2e_csv(path: str, rows: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)


def split_by_mr(rows: list, valid_fraction: float, seed: int) -> tuple:
    """Hold out ``valid_fraction`` of the distinct MRs (seeded), with all their references:
    a split by row would put references of one MR on both sides."""
    mrs = list(dict.fromkeys(mr for mr, _ in rows))
    random.Random(seed).shuffle(mrs)
    n_valid = max(1, round(valid_fraction * len(mrs)))
    if n_valid >= len(mrs):
        raise DPConfigError(f"--e2e-valid-fraction {valid_fraction} leaves no training MR of {len(mrs)}")
    valid_mrs = set(mrs[:n_valid])
    train = [r for r in rows if r[0] not in valid_mrs]
    valid = [r for r in rows if r[0] in valid_mrs]
    return train, valid, len(mrs) - n_valid, n_valid


def stage_e2e_data(args, results: dict) -> str:
    root = os.path.join(args.workdir, "e2e")
    data = os.path.join(root, "bin")
    split_path = os.path.join(root, "split.json")
    if not os.path.exists(split_path):
        os.makedirs(root, exist_ok=True)
        rows = read_e2e_csv(os.path.join(args.e2e_dir, "devset.csv"))
        train, valid, n_train_mrs, n_valid_mrs = split_by_mr(rows, args.e2e_valid_fraction, args.seed)
        write_e2e_csv(os.path.join(root, "train.csv"), train)
        write_e2e_csv(os.path.join(root, "valid.csv"), valid)
        summary = prepare_lm("e2e", os.path.join(root, "train.csv"), os.path.join(root, "valid.csv"), data,
                             os.path.join(root, "prepare.log"), ["--max-length", str(args.max_positions)])
        info = {"source": os.path.join(args.e2e_dir, "devset.csv"), "split": "by MR, seeded",
                "seed": args.seed, "valid_fraction": args.e2e_valid_fraction,
                "train_examples": len(train), "valid_examples": len(valid),
                "train_mrs": n_train_mrs, "valid_mrs": n_valid_mrs, "prepare_lm": summary}
        with open(split_path, "w") as f:
            json.dump(info, f, indent=2)
    with open(split_path) as f:
        results["e2e_data"] = json.load(f)
    return data


def row_hparams(args, family: str, eps) -> dict:
    if family == "lora":
        hp = {"lr": args.lora_lr, "weight_decay": args.lora_weight_decay,
              "clip": args.lora_clip if eps is not None else NONPRIVATE_CLIP,
              "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets}
    else:
        hp = {"lr": args.full_lr, "weight_decay": args.full_weight_decay,
              "clip": args.full_clip if eps is not None else NONPRIVATE_CLIP}
    hp.update({"epochs": None if args.finetune_updates else args.finetune_epochs,
               "updates": args.finetune_updates or None, "logical_batch": args.batch_size * args.update_freq,
               "micro_batch": args.batch_size, "update_freq": args.update_freq, "optimizer": "adam (0.9, 0.999)",
               "lr_scheduler": "fixed", "dropout": args.finetune_dropout, "label_smoothing": args.label_smoothing,
               "delta": args.delta, "sampling": "poisson", "tokens_per_sample": args.max_positions})
    return hp


def finetune_command(args, data: str, init: str, save_dir: str, family: str, eps, hp: dict) -> list:
    if family == "lora":
        model = ["--arch", "transformer_lm_lora", *arch_flags(args), "--lora-rank", str(hp["lora_rank"]),
                 "--lora-alpha", str(hp["lora_alpha"]), "--lora-targets", hp["lora_targets"]]
    else:
        model = ["--arch", "transformer_lm", *arch_flags(args)]
    privacy = (["--dp-target-epsilon", str(eps)] if eps is not None else ["--dp-noise-multiplier", "0"])
    return [
        sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", PLUGIN_DIR, "--cpu",
        "--task", "dp_language_modeling", "--criterion", "dp_language_modeling",
        "--label-smoothing", str(hp["label_smoothing"]), *model, "--dropout", str(hp["dropout"]),
        "--finetune-from-model", init, "--tokens-per-sample", str(args.max_positions),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--weight-decay", str(hp["weight_decay"]),
        "--lr", str(hp["lr"]), "--lr-scheduler", "fixed",
        "--batch-size", str(args.batch_size), "--update-freq", str(args.update_freq),
        *(["--max-update", str(hp["updates"])] if hp.get("updates") else ["--max-epoch", str(hp["epochs"])]),
        "--dp-clip-norm", str(hp["clip"]), *privacy,
        "--dp-delta", str(args.delta), "--num-workers", "0", "--seed", str(args.seed),
        "--log-format", "simple", "--log-interval", str(args.finetune_log_interval),
        "--no-epoch-checkpoints", "--save-dir", save_dir,
        *(["--disable-validation"] if args.skip_finetune_validation else []),
    ]


def ledger_epsilon(ckpt: str, delta: float) -> dict:
    """ε, σ and updates as the checkpoint's own privacy ledger states them (the
    ledger travels in the model state as ``dp_ledger``; its digest is checked)."""
    from fairseq_dp.accounting import PrivacyAccountant, epsilon_of, restore_ledger
    from fairseq_dp.checkpoint_ledger import read_ledger

    entries = read_ledger(ckpt)
    if not entries:
        return {"ledger_updates": 0}
    accountant = PrivacyAccountant("prv")
    restore_ledger(accountant, entries)
    history = accountant.history
    out = {"ledger_updates": sum(n for _, _, n in history),
           "ledger_sigmas": sorted({s for s, _, _ in history}), "ledger_q": sorted({q for _, q, _ in history})}
    if any(s > 0 for s, _, _ in history):
        out["ledger_epsilon"] = epsilon_of(history, accountant.delta or delta, "prv")
    return out


def log_dp_summary(log_path: str) -> dict:
    """ε and σ from the last train line, the planned updates and the largest gnorm logged."""
    out = {}
    text = open(log_path).read()
    eps = re.findall(r"dp_epsilon[= ]([-\d.e+inf]+)", text)
    sigma = re.findall(r"dp_sigma[= ]([-\d.e+]+)", text)
    if eps:
        # JSON has no infinity: a non-private row's ε is the string "inf"
        out["epsilon"] = float(eps[-1]) if math.isfinite(float(eps[-1])) else "inf"
    if sigma:
        out["sigma"] = float(sigma[-1])
    planned = re.findall(r"planned updates (\d+)", text)
    if planned:
        out["planned_updates"] = int(planned[-1])
    n = re.findall(r"num_updates[= ](\d+)", text)
    if n:
        out["updates"] = int(n[-1])
    valid = last_valid_stats(log_path)
    if valid:
        out["valid_loss_base2"] = valid.get("loss")
        out["valid_ppl"] = valid.get("ppl")
    out["not_private_logged"] = "THIS RUN IS NOT PRIVATE" in text
    # the fraction of examples whose gradient was clipped, per logged interval: 0 throughout
    # shows that the non-private rows' huge clip never bound
    clipped = [float(c) for c in re.findall(r"dp_clipped[= ]([-\d.e+]+)", text)]
    if clipped:
        out["max_dp_clipped"] = max(clipped)
    return out


def stage_finetune(args, results: dict, pretrained: str, rows: list) -> dict:
    data = stage_e2e_data(args, results)
    save_results(args.out, results)
    ckpts = {}
    for name, family, eps in ROWS:
        if name not in rows:
            continue
        root = os.path.join(args.workdir, "finetune", name)
        ckpt = os.path.join(root, "checkpoint_last.pt")
        done = os.path.join(root, "done.json")
        ckpts[name] = ckpt
        if os.path.exists(done):
            with open(done) as f:
                info = json.load(f)
            info.update(log_dp_summary(os.path.join(root, "train.log")))  # what later versions read from the log
            results["rows"].setdefault(name, {})["training"] = info
            continue
        if os.path.exists(root):
            shutil.rmtree(root)  # a half-finished run restarts (resuming would mix two runs' noise draws)
        os.makedirs(root)
        hp = row_hparams(args, family, eps)
        cmd = finetune_command(args, data, pretrained, root, family, eps, hp)
        log_path = os.path.join(root, "train.log")
        print(f"[e2e] fine-tuning {name} (log {log_path})", flush=True)
        wall = run_logged(cmd, log_path)
        info = {"family": family, "private": eps is not None, "target_epsilon": eps,
                "hyperparameters": hp, "train_wall_s": round(wall, 1), "command": " ".join(cmd[2:]),
                **log_dp_summary(log_path), **ledger_epsilon(ckpt, args.delta)}
        if eps is None:
            info["note"] = ("non-private inside dp_language_modeling: --dp-noise-multiplier 0 (the task logs "
                            f"THIS RUN IS NOT PRIVATE) and --dp-clip-norm {NONPRIVATE_CLIP:g}, so large that "
                            "clipping never binds: the update is the plain mean gradient of the same examples and loss")
            info["epsilon"] = "inf"
        with open(done, "w") as f:
            json.dump(info, f, indent=2)
        results["rows"].setdefault(name, {})["training"] = info
        save_results(args.out, results)
    return ckpts


# ---------------------------------------------------------------- stage 3: decoding and scoring

def stage_decode(args, results: dict, ckpts: dict) -> None:
    """Decode every row's test MRs (cached in ``decode/<row>/hyps.txt``), then score
    them; decoding does not wait for the scorer, so a row's hypotheses are kept
    even where ``fairseq_dp.eval_e2e`` is missing (its scores are then left out)."""
    from fairseq_dp.generate import GenerationSettings, load_generator, read_prompts

    test_csv = os.path.join(args.e2e_dir, "testset_w_refs.csv")
    if not os.path.exists(test_csv):
        raise DPConfigError(f"{test_csv}: no such file (E2E test CSV with references; see --e2e-dir)")
    prompts = read_prompts(test_csv, "e2e")
    if args.test_mrs:  # toy runs and time-boxed runs: the first MRs only (the JSON says how many)
        prompts = prompts[:args.test_mrs]
    results["test"] = {"source": test_csv, "mrs": len(prompts), "all_mrs": args.test_mrs == 0}
    settings = GenerationSettings(beam=args.beam, lenpen=args.lenpen, no_repeat_ngram_size=args.no_repeat_ngram,
                                  max_new_tokens=args.max_new_tokens)
    data = os.path.join(args.workdir, "e2e", "bin")
    for name, ckpt in ckpts.items():
        # one folder per number of MRs: a time-boxed subset and the full set coexist
        root = os.path.join(args.workdir, "decode", name, f"{len(prompts)}mrs")
        decoded = os.path.join(root, "decode.json")
        hyps_path = os.path.join(root, "hyps.txt")
        if not os.path.exists(decoded):
            os.makedirs(root, exist_ok=True)
            print(f"[e2e] decoding {name}", flush=True)
            start = time.time()
            generator = load_generator(ckpt, data=data, settings=settings)
            hyps = generator.generate(prompts, batch_size=args.decode_batch_size)
            wall = time.time() - start
            with open(hyps_path, "w", encoding="utf-8") as f:
                f.writelines(h.replace("\n", " ") + "\n" for h in hyps)
            info = {"decode_wall_s": round(wall, 1), "mrs": len(prompts),
                    "settings": {"beam": args.beam, "lenpen": args.lenpen,
                                 "no_repeat_ngram_size": args.no_repeat_ngram,
                                 "max_new_tokens": args.max_new_tokens, "batch_size": args.decode_batch_size},
                    "examples": [{"mr": prompts[i], "generated": hyps[i]}
                                 for i in range(0, len(prompts), max(1, len(prompts) // 5))][:5]}
            with open(decoded, "w") as f:
                json.dump(info, f, indent=2)
        with open(decoded) as f:
            results["rows"].setdefault(name, {})["decoding"] = json.load(f)
        save_results(args.out, results)
    score_rows(args, results, ckpts, test_csv, len(prompts))


def score_rows(args, results: dict, ckpts: dict, test_csv: str, n_prompts: int) -> None:
    try:
        from fairseq_dp.eval_e2e import read_e2e_references, score_e2e
    except ImportError:
        print("[e2e] fairseq_dp.eval_e2e is not available: hypotheses kept, scores left out", flush=True)
        return
    mrs, refs = read_e2e_references(test_csv)
    from fairseq_dp.generate import read_prompts
    if list(mrs) != list(read_prompts(test_csv, "e2e")):
        raise RuntimeError("read_prompts and read_e2e_references disagree on the test MRs' order")
    refs = refs[:n_prompts]
    for name in ckpts:
        root = os.path.join(args.workdir, "decode", name, f"{n_prompts}mrs")
        scored = os.path.join(root, "scores.json")
        if not os.path.exists(scored):
            with open(os.path.join(root, "hyps.txt"), encoding="utf-8") as f:
                hyps = [line.rstrip("\n") for line in f]
            start = time.time()
            scores = score_e2e(hyps, refs)
            with open(scored, "w") as f:
                json.dump({"scores": scores, "score_wall_s": round(time.time() - start, 1)}, f, indent=2)
        with open(scored) as f:
            results["rows"][name]["decoding"].update(json.load(f))
        save_results(args.out, results)


def plot(results: dict, out_png: str) -> None:
    """BLEU against ε: DP rows as points/lines per family, non-private rows as
    horizontal lines (ε = inf)."""
    import logging

    import matplotlib
    matplotlib.use("Agg")
    # fairseq's logging setup leaves the root logger at DEBUG: keep matplotlib's font search quiet
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"lora": "tab:blue", "full": "tab:orange"}
    for family, label in (("lora", "DP-LoRA"), ("full", "DP full (ghost clipping)")):
        points = []
        for name, row in results.get("rows", {}).items():
            train, dec = row.get("training", {}), row.get("decoding")
            if dec is None or train.get("family") != family:
                continue
            if "scores" not in dec:
                continue
            bleu = dec["scores"]["BLEU"]
            if train.get("private"):
                points.append((train.get("ledger_epsilon", train.get("epsilon")), bleu))
            else:
                ax.axhline(bleu, color=colors[family], linestyle="--",
                           label=f"non-private {'LoRA' if family == 'lora' else 'full'} (ε = inf)")
        if points:
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colors[family], label=label)
    ax.set_xlabel("ε (δ = 1e-5)")
    test = results.get("test", {})
    which = "all 630 test MRs" if test.get("all_mrs") else f"first {test.get('mrs')} test MRs"
    ax.set_ylabel(f"BLEU ({which}, all references)")
    pre = results.get("pretraining", {})
    ax.set_title(f"E2E, {pre.get('layers')}x{pre.get('embed_dim')} GPT-2-shaped LM pre-trained on public text",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def table(results: dict) -> list:
    """The README's markdown table from a results JSON."""
    lines = ["| row | ε (ledger) | σ | updates | train s | decode s | MRs | BLEU | NIST | METEOR | ROUGE_L | CIDEr |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, _, _ in ROWS:
        row = results.get("rows", {}).get(name)
        if row is None:
            continue
        train, dec = row.get("training", {}), row.get("decoding", {})
        eps = train.get("ledger_epsilon", train.get("epsilon"))
        eps = f"{eps:.3f}" if isinstance(eps, float) else str(eps)
        scores = dec.get("scores", {})

        def fmt(key, spec):
            value = scores.get(key)
            return "–" if value is None else format(value, spec)
        lines.append(
            f"| {name} | {eps} | {train.get('sigma', '–')} | {train.get('updates', '–')} | "
            f"{train.get('train_wall_s', '–')} | {dec.get('decode_wall_s', '–')} | {dec.get('mrs', '–')} | "
            f"{fmt('BLEU', '.4f')} | {fmt('NIST', '.3f')} | {fmt('METEOR', '.4f')} | {fmt('ROUGE_L', '.4f')} | "
            f"{fmt('CIDEr', '.3f')} |"
        )
    return lines


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="folder for data, checkpoints and logs (outside git); required unless --table")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    p.add_argument("--stage", choices=["pretrain", "finetune", "decode", "all"], default="all",
                   help="run up to and including this stage (earlier finished stages are reused)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results JSON (the plot goes next to it)")
    p.add_argument("--pool", default=DEFAULT_POOL, help="public text pool, source<TAB>sentence (gzip or plain)")
    p.add_argument("--e2e-dir", default=DEFAULT_E2E, help="folder with devset.csv and testset_w_refs.csv")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--prepare-workers", type=int, default=2, help="tokenization processes")
    g = p.add_argument_group("model (GPT-2's shape, small)")
    g.add_argument("--layers", type=int, default=4)
    # 128 wide: on 2 CPU cores GPT-2's 50,257-token output layer dominates the cost
    # (256 wide ran at ~350 tokens/s here), so width buys little quality per second
    g.add_argument("--embed-dim", type=int, default=128)
    g.add_argument("--ffn-dim", type=int, default=512)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--max-positions", type=int, default=256,
                   help="learned positions (E2E examples have up to ~142 tokens; decoding adds 64)")
    g = p.add_argument_group("public pre-training")
    g.add_argument("--pretrain-valid-sentences", type=int, default=3000)
    g.add_argument("--pretrain-tokens-per-sample", type=int, default=256,
                   help="token block length (fairseq's --sample-break-mode none)")
    g.add_argument("--pretrain-batch-size", type=int, default=8)
    g.add_argument("--pretrain-max-update", type=int, default=100000,
                   help="most updates (--pretrain-hours usually stops it first)")
    g.add_argument("--pretrain-hours", type=float, default=1.0,
                   help="wall-clock budget of pre-training (fairseq's --stop-time-hours)")
    g.add_argument("--pretrain-lr", type=float, default=2e-3)
    g.add_argument("--pretrain-warmup", type=int, default=200)
    g.add_argument("--pretrain-dropout", type=float, default=0.1)
    g.add_argument("--pretrain-validate-interval", type=int, default=500)
    g = p.add_argument_group("E2E fine-tuning (every row: same data, epochs, batch, loss)")
    g.add_argument("--rows", default=",".join(name for name, _, _ in ROWS), help="comma-separated rows to run")
    g.add_argument("--e2e-valid-fraction", type=float, default=0.1, help="fraction of devset.csv's MRs held out")
    # sized with the pre-training hour to keep the whole benchmark within 2.5 hours on
    # 2 idle CPU cores: DP full fine-tuning takes ~2.5 s per 32 E2E examples there
    g.add_argument("--finetune-epochs", type=int, default=2)
    g.add_argument("--finetune-updates", type=int, default=0,
                   help="train every row for exactly this many updates instead of --finetune-epochs "
                        "(a time-boxed run: the same budget for every row, recorded with the examples it covers)")
    g.add_argument("--batch-size", type=int, default=32, help="expected micro-batch (Poisson sampling)")
    g.add_argument("--update-freq", type=int, default=2, help="logical batch = --batch-size x --update-freq")
    g.add_argument("--delta", type=float, default=1e-5)
    g.add_argument("--finetune-dropout", type=float, default=0.0)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--finetune-log-interval", type=int, default=10)
    g.add_argument("--skip-finetune-validation", action="store_true",
                   help="no validation loss on the held-out MRs (it is only reported; no checkpoint is chosen by it)")
    g.add_argument("--lora-lr", type=float, default=5e-3,
                   help="Yu et al. use 4e-4 for 20 epochs of 42k examples; far fewer updates here")
    g.add_argument("--lora-weight-decay", type=float, default=0.01)
    g.add_argument("--lora-clip", type=float, default=1.0)
    g.add_argument("--lora-rank", type=int, default=4)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-targets", default="q,v")
    g.add_argument("--full-lr", type=float, default=1e-3,
                   help="private-transformers use 2e-3 at logical batch 1024")
    g.add_argument("--full-weight-decay", type=float, default=0.0)
    g.add_argument("--full-clip", type=float, default=0.1)
    g = p.add_argument_group("decoding (fairseq_dp.generate) and scoring (fairseq_dp.eval_e2e)")
    g.add_argument("--beam", type=int, default=10)
    g.add_argument("--lenpen", type=float, default=0.8)
    g.add_argument("--no-repeat-ngram", type=int, default=4)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--decode-batch-size", type=int, default=32)
    g.add_argument("--test-mrs", type=int, default=0, help="decode only the first N test MRs (0: all)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.table:
        print("\n".join(table(load_results(args.out))))
        return
    if not args.workdir:
        raise DPConfigError("--workdir is required (a folder outside git for data, checkpoints and logs)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in {name for name, _, _ in ROWS}]
    if unknown:
        raise DPConfigError(f"--rows: unknown {unknown}; choose from {[name for name, _, _ in ROWS]}")
    if args.finetune_updates < 0:
        raise DPConfigError(f"--finetune-updates must be >= 0, got {args.finetune_updates}")
    if args.finetune_epochs < 1:
        raise DPConfigError(f"--finetune-epochs must be at least 1, got {args.finetune_epochs}")
    # the subprocesses run in the repository root: every path absolute
    for name in ("workdir", "out", "pool", "e2e_dir"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    os.makedirs(args.workdir, exist_ok=True)
    results = load_results(args.out)
    results.setdefault("rows", {})
    command = " ".join(["python", "benchmarks/e2e_generation.py", *(argv if argv is not None else sys.argv[1:])])
    # a benchmark run one row at a time is several invocations: keep each
    if command not in results.get("invocations", []):
        results.setdefault("invocations", []).append(command)
    results.update({"command": command,
                    "git_commit": commit(), "machine": machine(),
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "note": ("trained on E2E devset.csv (split by MR; the 42k training set is not available here) "
                             "from a small LM pre-trained here on public text; scored on all 630 test MRs "
                             "with all their references")})
    pretrained = stage_pretrain(args, results)
    save_results(args.out, results)
    if args.stage == "pretrain":
        return
    ckpts = stage_finetune(args, results, pretrained, rows)
    if args.stage == "finetune":
        return
    stage_decode(args, results, ckpts)
    plot(results, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
