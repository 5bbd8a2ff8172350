# Copyright (c) fairseq_dp contributors. MIT license.
"""``fairseq-dp-report``: ε and the validation metric of DP runs, from their logs.

Reads the log that ``fairseq-train --log-file FILE`` (or ``fairseq-hydra-train``)
writes, in fairseq's ``simple``, ``tqdm`` or ``json`` log format, for one or
more runs; prints a table of the validations (update, ε, metric) and writes a
PNG with ε and the metric over updates, and the metric against ε for every
run. Validation lines carry ``dp_epsilon`` since the task adds it; for older
logs the ε of the train line logged at the same update is used.

A run is given as the log file itself or as a directory holding it:
``train.log``, else ``hydra_train.log``, else the only ``*.log`` file there.

Example::

    fairseq-dp-report runs/eps8 runs/eps3/train.log --out privacy.png
"""

import argparse
import glob
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import DPConfigError

PROG = "fairseq-dp-report"
LOG_NAMES = ("train.log", "hydra_train.log")

# fairseq's log lines, with or without the "| INFO | <tag> | " of the console
# ("--log-file" writes the bare message):
# "epoch 001 | valid on 'valid' subset | loss 0.998 | ... | num_updates 16"
SIMPLE_VALID = re.compile(r"epoch (\d+) \| valid on '([^']+)' subset \| (.*)$")
# "epoch 001:      4 / 16 loss=1.014, ..., num_updates=4, ..." (train_inner)
SIMPLE_TRAIN_INNER = re.compile(r"epoch (\d+):\s+\d+ / \d+ (.*)$")
# "epoch 001 | loss 1.003 | ... | num_updates 16 | ..." (end-of-epoch train summary)
SIMPLE_TRAIN = re.compile(r"epoch (\d+) \| (.*)$")


@dataclass
class Run:
    name: str
    path: str
    # update -> ε from train lines (train_inner and end-of-epoch summaries)
    train_epsilon: Dict[int, float] = field(default_factory=dict)
    # (subset, update) -> {"epoch": ..., metric: value, ...}; a later line for
    # the same validation (a resumed run logs it again) replaces an earlier one
    valid: Dict[Tuple[str, int], Dict[str, float]] = field(default_factory=dict)

    def validations(self, subset: str) -> List[Dict[str, float]]:
        rows = []
        for (sub, update), stats in sorted(self.valid.items(), key=lambda item: item[0][1]):
            if sub != subset:
                continue
            row = dict(stats)
            row["num_updates"] = update
            if "dp_epsilon" not in row and update in self.train_epsilon:
                row["dp_epsilon"] = self.train_epsilon[update]
            rows.append(row)
        return rows


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _pairs(text: str, sep: str, kv: str) -> Dict[str, float]:
    stats = {}
    for item in text.split(sep):
        key, _, value = item.strip().partition(kv)
        number = _number(value.strip())
        if key and number is not None:
            stats[key.strip()] = number
    return stats


def _parse_json_line(run: Run, record: dict) -> None:
    stats = {k: _number(v) for k, v in record.items()}
    if stats.get("num_updates") is not None:  # train_inner: keys without a prefix
        if stats.get("dp_epsilon") is not None:
            run.train_epsilon[int(stats["num_updates"])] = stats["dp_epsilon"]
        return
    prefixes = [k[: -len("_num_updates")] for k in record if k.endswith("_num_updates")]
    if len(prefixes) != 1:
        return
    prefix = prefixes[0]
    fields = {k[len(prefix) + 1:]: v for k, v in stats.items() if k.startswith(prefix + "_") and v is not None}
    update = int(fields["num_updates"])
    if prefix == "train":
        if "dp_epsilon" in fields:
            run.train_epsilon[update] = fields["dp_epsilon"]
        return
    fields.pop("num_updates")
    if stats.get("epoch") is not None:
        fields["epoch"] = stats["epoch"]
    run.valid[(prefix, update)] = fields


def parse_log(path: str, name: Optional[str] = None) -> Run:
    """Train ε and validation stats of one fairseq log (simple, tqdm or json format)."""
    run = Run(name=name or run_name(path), path=path)
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            brace = line.find('{"')
            if brace >= 0 and line.endswith("}"):
                try:
                    record = json.loads(line[brace:])
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    _parse_json_line(run, record)
                    continue
            m = SIMPLE_VALID.search(line)
            if m:
                stats = _pairs(m.group(3), " | ", " ")
                if "num_updates" in stats:
                    update = int(stats.pop("num_updates"))
                    stats["epoch"] = float(m.group(1))
                    run.valid[(m.group(2), update)] = stats
                continue
            m = SIMPLE_TRAIN_INNER.search(line)
            if m:
                stats = _pairs(m.group(2), ", ", "=")
            else:
                m = SIMPLE_TRAIN.search(line)
                stats = _pairs(m.group(2), " | ", " ") if m else {}
            if "num_updates" in stats and "dp_epsilon" in stats:
                run.train_epsilon[int(stats["num_updates"])] = stats["dp_epsilon"]
    return run


def find_log(path: str) -> str:
    """The log file of a run given as a file or a directory (see the module doc)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise DPConfigError(f"{path}: no such file or directory")
    for name in LOG_NAMES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    logs = sorted(glob.glob(os.path.join(path, "*.log")))
    if len(logs) == 1:
        return logs[0]
    if not logs:
        raise DPConfigError(
            f"{path}: no log file in this directory (looked for {', '.join(LOG_NAMES)} and *.log); "
            "train with --log-file DIR/train.log, or give the log file itself"
        )
    raise DPConfigError(
        f"{path}: several *.log files ({', '.join(os.path.basename(p) for p in logs)}) and no "
        f"{' or '.join(LOG_NAMES)}; give the log file itself"
    )


def run_name(log_path: str) -> str:
    base = os.path.basename(log_path)
    if base in LOG_NAMES:
        return os.path.basename(os.path.dirname(os.path.abspath(log_path))) or base
    return os.path.splitext(base)[0]


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def table(runs: List[Run], subset: str, metric: str) -> List[str]:
    width = max([len("run")] + [len(r.name) for r in runs])
    lines = [f"{'run':<{width}}  {'epoch':>5}  {'updates':>8}  {'epsilon':>9}  {metric:>10}"]
    for run in runs:
        for row in run.validations(subset):
            epoch = row.get("epoch")
            lines.append(
                f"{run.name:<{width}}  {_fmt(epoch and int(epoch), 'd'):>5}  {int(row['num_updates']):>8d}  "
                f"{_fmt(row.get('dp_epsilon'), '.4f'):>9}  {_fmt(row.get(metric), 'g'):>10}"
            )
    return lines


def plot(runs: List[Run], subset: str, metric: str, out: str) -> None:
    # importing fairseq leaves the root logger at DEBUG; matplotlib's font
    # search would fill the terminal
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (ax_eps, ax_metric, ax_tradeoff) = plt.subplots(1, 3, figsize=(15, 4.5))
    for run in runs:
        rows = run.validations(subset)
        if run.train_epsilon:
            updates = sorted(run.train_epsilon)
            ax_eps.plot(updates, [run.train_epsilon[u] for u in updates], label=run.name)
        with_metric = [r for r in rows if metric in r]
        ax_metric.plot([r["num_updates"] for r in with_metric], [r[metric] for r in with_metric],
                       marker="o", label=run.name)
        both = [r for r in with_metric if r.get("dp_epsilon") is not None and math.isfinite(r["dp_epsilon"])]
        line, = ax_tradeoff.plot([r["dp_epsilon"] for r in both], [r[metric] for r in both],
                                 marker="o", alpha=0.6, label=run.name)
        if both:  # the run's final model: what it releases at its final ε
            ax_tradeoff.plot(both[-1]["dp_epsilon"], both[-1][metric], marker="*", markersize=14,
                             color=line.get_color())
    ax_eps.set(xlabel="updates", ylabel="ε (train log)", title="privacy spent")
    ax_metric.set(xlabel="updates", ylabel=f"{subset} {metric}", title=f"{subset} {metric}")
    ax_tradeoff.set(xlabel="ε", ylabel=f"{subset} {metric}", title=f"{metric} vs ε (★ = last validation)")
    for ax in (ax_eps, ax_metric, ax_tradeoff):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Table and plot of ε and the validation metric of DP runs, from fairseq "
        "logs (simple, tqdm or json --log-format). A run is its log file, or a directory "
        f"holding {' or '.join(LOG_NAMES)} or a single *.log.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_LOG")
    parser.add_argument("--out", metavar="PNG", default="dp_report.png", help="where to write the plot")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--metric", default="accuracy", help="validation metric to report")
    parser.add_argument("--subset", default="valid", help="validation subset (fairseq's --valid-subset)")
    parser.add_argument("--labels", help="comma-separated run names, in the order of the runs")
    return parser


def report(args) -> List[str]:
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.runs):
        raise DPConfigError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    runs, lines = [], []
    for i, path in enumerate(args.runs):
        log = find_log(path)
        # a run given as a directory is named after it, a log file after its stem
        name = os.path.basename(os.path.abspath(path)) if os.path.isdir(path) else None
        run = parse_log(log, labels[i] if labels else name)
        lines.append(f"{run.name}: {log}")
        if not run.validations(args.subset):
            subsets = sorted({sub for sub, _ in run.valid})
            raise DPConfigError(
                f"{log}: no validation lines for subset '{args.subset}'"
                + (f" (found: {', '.join(subsets)}; use --subset)" if subsets else
                   " (is it a fairseq-train log with --log-format simple or json?)")
            )
        found = {k for row in run.validations(args.subset) for k in row}
        if args.metric not in found:
            names = sorted(found - {"epoch", "num_updates", "dp_epsilon"})
            raise DPConfigError(f"{log}: no '{args.metric}' in its validation lines; use --metric with one of {', '.join(names)}")
        runs.append(run)
    names = [r.name for r in runs]
    for run in runs:  # two runs named "checkpoints" would be indistinguishable
        if names.count(run.name) > 1:
            run.name = f"{run.name}#{runs.index(run) + 1}"
    lines += [""] + table(runs, args.subset, args.metric)
    if not args.no_plot:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise DPConfigError(f"--out {args.out}: directory {out_dir} does not exist")
        plot(runs, args.subset, args.metric, args.out)
        lines.append(f"\nwrote {args.out}")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        lines = report(args)
    except DPConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
