# Copyright (c) fairseq_dp contributors. MIT license.
"""``fairseq-dp-audit``: one training run with canaries, and an empirical lower
bound on its ε beside the accountant's upper bound.

    fairseq-dp-audit --canaries 500 --out audit/ -- fairseq-train DATA --user-dir fairseq_dp ...

It copies DATA (as links) to ``OUT/data`` with the canaries added
(:mod:`.canaries`), runs the training command on it with ``--save-dir
OUT/checkpoints``, scores every canary with ``checkpoint_last.pt``
(:mod:`.scoring`), and tests "this run is (ε, δ)-DP" against how well the
scores tell included canaries from excluded ones (:mod:`.statistics`). It
prints and writes ``OUT/audit.json`` and a histogram ``OUT/scores.png``.

The lower bound holds whatever the implementation does; if it exceeds the
accountant's ε, the run was not as private as reported (a bug), and the
command exits with status 3. A bound far below the accountant's is the usual
outcome, not a sign of extra privacy: a one-run, black-box audit is loose.
"""

import argparse
import datetime
import json
import logging
import math
import os
import subprocess
import sys
from typing import List, Optional, Tuple

from ..errors import DPConfigError

VIOLATION_EXIT = 3
DP_TASKS = ("dp_sentence_prediction", "dp_language_modeling")
# flags that would leave no final checkpoint to score, or write it elsewhere
DROPPED_FLAGS = {"--no-save": 0, "--no-last-checkpoints": 0, "--save-dir": 1}


def training_args(command: List[str]) -> List[str]:
    """fairseq-train's arguments from a command line given as ``fairseq-train
    ARGS``, ``python -m fairseq_cli.train ARGS`` or ``ARGS``."""
    if not command:
        raise DPConfigError("give the training command after --, e.g. -- fairseq-train DATA --task ...")
    if os.path.basename(command[0]) in ("fairseq-train", "fairseq_cli.train"):
        return command[1:]
    if "-m" in command[:3] and "fairseq_cli.train" in command[:4]:
        return command[command.index("fairseq_cli.train") + 1:]
    if os.path.basename(command[0]).startswith("fairseq-hydra-train"):
        raise DPConfigError("the audit runs fairseq-train command lines; write the hydra config's "
                            "settings as fairseq-train flags")
    if os.path.basename(command[0]).startswith("python"):
        raise DPConfigError(f"cannot find fairseq_cli.train in {' '.join(command[:4])}: give "
                            "fairseq-train ARGS or python -m fairseq_cli.train ARGS")
    return list(command)


def parse_training(args: List[str]):
    """fairseq's own parse of the training flags (the plugin's included)."""
    from fairseq import options

    parser = options.get_training_parser()
    try:
        return options.parse_args_and_arch(parser, args)
    except RuntimeError:  # fairseq's bare error for an --arch it does not know
        raise DPConfigError("fairseq could not read the training flags: give an --arch it knows (with "
                            "--user-dir for the plugin's) and the flags fairseq-train takes") from None


def audited_command(args: List[str], data: str, audit_data: str, save_dir: str) -> List[str]:
    """The user's flags with the audit's data directory and save directory."""
    out, i, replaced = [], 0, False
    while i < len(args):
        token = args[i]
        name = token.split("=", 1)[0]
        if name in DROPPED_FLAGS:
            i += 1 + (DROPPED_FLAGS[name] if "=" not in token else 0)
            continue
        if not replaced and token == data:
            out.append(audit_data)
            replaced = True
        else:
            out.append(token)
        i += 1
    if not replaced:
        raise DPConfigError(f"could not find the data directory {data} among the training flags")
    return [sys.executable, "-m", "fairseq_cli.train", *out, "--save-dir", save_dir]


def run_training(command: List[str], log_path: str) -> None:
    """Runs ``command``, its output shown and kept in ``log_path``."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = process.wait()
    if code != 0:
        raise DPConfigError(f"the training run failed (exit status {code}); its output is in {log_path}")


def accountant_epsilon(checkpoint: str, delta: float, mechanism: str) -> Tuple[float, list]:
    """The accountant's ε at ``delta`` from the checkpoint's own ledger, and the ledger."""
    from ..accounting import PrivacyAccountant, restore_ledger
    from ..checkpoint_ledger import read_ledger

    entries = read_ledger(checkpoint)
    if entries is None:
        raise DPConfigError(f"{checkpoint} has no privacy ledger: was it trained by a DP task?")
    accountant = PrivacyAccountant(mechanism)
    restore_ledger(accountant, entries)
    return accountant.get_epsilon(delta), [list(entry) for entry in accountant.history]


def plot_scores(scores, included, path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger verbose
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"trained on ({int(included.sum())})")
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"left out ({int((~included).sum())})")
    ax.set_xlabel("canary score (log-probability under the final model)")
    ax.set_ylabel("canaries")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fairseq-dp-audit",
        description="Train once with canaries and report an empirical lower bound on epsilon "
                    "(Steinke, Nasr, Jagielski 2023) beside the accountant's upper bound.",
        usage="fairseq-dp-audit [options] -- fairseq-train DATA --user-dir ... --task dp_... ...",
    )
    p.add_argument("--canaries", type=int, default=500,
                   help="canaries m, each trained on with probability 1/2 (more: a tighter bound, and "
                        "more examples that are not the user's)")
    p.add_argument("--out", required=True, help="new directory for the audit's data, checkpoints, log and results")
    p.add_argument("--significance", type=float, default=0.05,
                   help="the bound holds with confidence 1 - significance (default 0.05)")
    p.add_argument("--canary-tokens", type=int, default=None,
                   help="tokens per canary, end of sentence included (default: the median training example)")
    p.add_argument("--seed", type=int, default=None,
                   help="draw canaries and their inclusion from this seed (reproducible, for tests) instead "
                        "of the operating system's secret randomness")
    return p


def split_argv(argv: List[str]) -> Tuple[List[str], List[str]]:
    if "--" not in argv:
        raise DPConfigError("give the training command after --, e.g. fairseq-dp-audit --out audit -- "
                            "fairseq-train DATA --user-dir fairseq_dp --task dp_sentence_prediction ...")
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def audit(options, command: List[str]) -> dict:
    import numpy as np

    from .canaries import describe, write_audit_data
    from .scoring import canary_scores
    from .statistics import audit_scores

    if not 0 < options.significance < 1:
        raise DPConfigError(f"--significance must be in (0, 1), got {options.significance}")
    args = training_args(command)
    parsed = parse_training(args)
    task = parsed.task
    if task not in DP_TASKS:
        raise DPConfigError(f"--task {task}: the audit checks private training; use one of {', '.join(DP_TASKS)}")
    if os.path.exists(options.out):
        raise DPConfigError(f"--out {options.out} exists: give the audit a new directory")
    os.makedirs(options.out)
    audit_data = os.path.join(options.out, "data")
    canaries = write_audit_data(task, parsed.data, audit_data, options.canaries,
                                train_subset=parsed.train_subset, num_classes=getattr(parsed, "num_classes", None),
                                seed=options.seed, length=options.canary_tokens)
    save_dir = os.path.join(options.out, "checkpoints")
    command = audited_command(args, parsed.data, audit_data, save_dir)
    print(f"[audit] {len(canaries.included)} canaries, {int(canaries.included.sum())} of them in the training "
          f"set of {canaries.train_examples} examples; training: {' '.join(command)}", flush=True)
    run_training(command, os.path.join(options.out, "train.log"))

    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.exists(checkpoint):
        raise DPConfigError(f"the training run left no {checkpoint}")
    delta = float(parsed.dp_delta)
    epsilon, ledger = accountant_epsilon(checkpoint, delta, str(parsed.dp_accountant))
    scores = canary_scores(checkpoint, audit_data)
    result = audit_scores(scores, canaries.included, delta=delta, significance=options.significance)
    violation = result.epsilon_lower_bound > epsilon
    inc, exc = scores[canaries.included], scores[~canaries.included]
    report = {
        "accountant_epsilon": epsilon if math.isfinite(epsilon) else "inf",
        "audited_epsilon_lower_bound": result.epsilon_lower_bound,
        "delta": delta,
        "confidence": 1 - options.significance,
        "violation": violation,
        **describe(canaries),
        "guesses": result.best.guesses, "correct": result.best.correct,
        "best_guess": {"top_in": result.best.k_in, "bottom_out": result.best.k_out},
        "tried": [vars(g) for g in result.all_tried],
        "scores": {"included_mean": float(inc.mean()) if len(inc) else None,
                   "excluded_mean": float(exc.mean()) if len(exc) else None,
                   "included_std": float(inc.std()) if len(inc) else None,
                   "excluded_std": float(exc.std()) if len(exc) else None,
                   "all": [float(s) for s in scores], "included": [bool(b) for b in canaries.included]},
        "ledger": ledger,
        "checkpoint": checkpoint,
        "training_command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    with open(os.path.join(options.out, "audit.json"), "w") as f:
        json.dump(report, f, indent=2)
    shown_eps = f"{epsilon:.3f}" if math.isfinite(epsilon) else "inf (no noise)"
    report["plot"] = plot_scores(np.asarray(scores), canaries.included, os.path.join(options.out, "scores.png"),
                                 f"accountant ε ≤ {shown_eps}, audited ε ≥ {result.epsilon_lower_bound:.3f} "
                                 f"({100 * (1 - options.significance):g} % confidence)")
    print(f"[audit] accountant: ε = {shown_eps} at δ = {delta:g} (upper bound)")
    print(f"[audit] audit: ε ≥ {result.epsilon_lower_bound:.3f} with {100 * (1 - options.significance):g} % "
          f"confidence ({result.best.correct} of {result.best.guesses} guesses right: top {result.best.k_in} "
          f"'in', bottom {result.best.k_out} 'out', of {len(scores)} canaries; {result.tried} guess sizes tried, "
          "Bonferroni-corrected)")
    print(f"[audit] mean canary score: trained on {report['scores']['included_mean']:.3f}, "
          f"left out {report['scores']['excluded_mean']:.3f}; {os.path.join(options.out, 'audit.json')}")
    if violation:
        print("[audit] VIOLATION: the audited lower bound exceeds the accountant's ε. This run was less "
              "private than reported: a bug (please report it with audit.json)", file=sys.stderr)
    return report


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "--" not in argv:
        parser.parse_args(argv)  # --help, or the missing --out, as argparse reports them
    try:
        ours, command = split_argv(argv)
        options = parser.parse_args(ours)
        report = audit(options, command)
    except DPConfigError as e:
        print(f"fairseq-dp-audit: error: {e}", file=sys.stderr)
        sys.exit(2)
    if report["violation"]:
        sys.exit(VIOLATION_EXIT)


if __name__ == "__main__":
    main()
