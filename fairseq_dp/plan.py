# Copyright (c) fairseq_dp contributors. MIT license.
"""``fairseq-dp-plan``: the privacy plan of a DP run, before running it.

From the number of training examples (or the binarized data directory that
``fairseq-train`` would read), the expected logical batch, the length of the
run and δ, with either σ or a target ε, it prints σ, the sampling rate q, the
number of updates, and ε after each epoch and at the end, by the PRV and the
RDP accountant side by side. It loads no model and reads only the index of
the training set. The numbers are those of the training run's own plan lines
(``DP: N=... q=... planned updates ... σ=...`` and ``DP: ε after the planned
N updates: ...``): both come from :mod:`fairseq_dp.planning`.

Example::

    fairseq-dp-plan --num-examples 67349 --batch-size 2000 --epochs 30 \\
        --target-epsilon 8 --delta 1e-5
"""

import argparse
import logging
import math
import os
import sys
from typing import List, Optional

from . import planning
from .accounting import ACCOUNTANTS
from .errors import DPConfigError

PROG = "fairseq-dp-plan"
# the largest ε (by RDP) for which the PRV accountant is run
PRV_LIMIT = 200


def count_examples(data: str, subset: str = "train") -> int:
    """Training examples in a ``dp_sentence_prediction`` data directory, as the
    task counts them (``input0/<subset>``, with fairseq's ``<subset>1``, ...
    shards), from the index alone."""
    from fairseq.data import data_utils

    if not os.path.isdir(data):
        raise DPConfigError(f"--data {data}: no such directory")
    path = os.path.join(data, "input0", subset)
    # the same call (combine=True, as fairseq-train loads the training set)
    # that SentencePredictionTask.load_dataset makes; it memory-maps the index
    dataset = data_utils.load_indexed_dataset(path, None, None, combine=True)
    if dataset is None:
        raise DPConfigError(
            f"--data {data}: no binarized training set {path}.idx/.bin; give the directory "
            "that fairseq-train gets for --task dp_sentence_prediction (the one holding "
            "input0/ and label/), or --num-examples"
        )
    return len(dataset)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print the privacy plan of a DP run (σ, q, updates, ε per epoch by the PRV "
        "and RDP accountants) without loading a model. The numbers are the ones the training "
        "run logs in its 'DP: ...' plan lines for the same settings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--num-examples", type=_positive_int, metavar="N", help="training examples N")
    size.add_argument(
        "--data", metavar="DIR",
        help="the data directory fairseq-train reads (with input0/); N is counted from its index",
    )
    parser.add_argument("--train-subset", default="train", help="training split under --data (fairseq's --train-subset)")
    parser.add_argument(
        "--batch-size", type=_positive_int, required=True, metavar="B",
        help="expected logical batch: --batch-size × --update-freq × workers of the training run",
    )
    parser.add_argument("--epochs", type=_positive_int, metavar="E", help="fairseq's --max-epoch")
    parser.add_argument("--max-update", type=_positive_int, metavar="U", help="fairseq's --max-update (the first limit reached ends the run)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-epsilon", type=_float, metavar="EPS", help="calibrate σ so that ε at the end is at most EPS (--dp-target-epsilon)")
    budget.add_argument("--noise-multiplier", type=_float, metavar="S", help="σ of the run (--dp-noise-multiplier)")
    parser.add_argument("--delta", type=_float, default=1e-5, help="δ of the (ε, δ) guarantee (--dp-delta)")
    parser.add_argument(
        "--accountant", choices=sorted(ACCOUNTANTS), default="prv",
        help="the accountant that calibrates σ and that the training run reports (--dp-accountant); "
        "the table shows both",
    )
    parser.add_argument(
        "--sampling", choices=planning.SAMPLINGS, default="poisson",
        help="--dp-sampling of the run; with shuffle, the updates per epoch depend on the "
        "micro-batch layout (--update-freq, --workers)",
    )
    parser.add_argument("--update-freq", type=_positive_int, default=1, help="fairseq's --update-freq (for --sampling shuffle)")
    parser.add_argument("--workers", type=_positive_int, default=1, help="data-parallel workers (for --sampling shuffle)")
    parser.add_argument("--every", type=_positive_int, metavar="K", help="one table row every K epochs (default: about 20 rows)")
    return parser


def check(args, num_examples: int) -> None:
    errors = []
    if args.epochs is None and args.max_update is None:
        errors.append("give the length of the run: --epochs and/or --max-update")
    if not 0 < args.delta < 1:
        errors.append(f"--delta must be in (0, 1), got {args.delta}")
    if args.target_epsilon is not None and not args.target_epsilon > 0:
        errors.append(f"--target-epsilon must be > 0, got {args.target_epsilon}")
    if args.noise_multiplier is not None and not args.noise_multiplier >= 0:
        errors.append(f"--noise-multiplier must be >= 0, got {args.noise_multiplier}")
    if args.batch_size > num_examples:
        errors.append(
            f"the expected logical batch --batch-size {args.batch_size} is larger than the "
            f"training set ({num_examples} examples)"
        )
    if args.sampling == "shuffle" and args.batch_size % (args.update_freq * args.workers):
        errors.append(
            f"with --sampling shuffle, --batch-size {args.batch_size} must be --update-freq × "
            f"--workers ({args.update_freq} × {args.workers}) × the micro-batch size"
        )
    if errors:
        raise DPConfigError("invalid plan:\n  - " + "\n  - ".join(errors))


def plan(args) -> List[str]:
    """The lines to print, headline first."""
    num_examples = args.num_examples if args.data is None else count_examples(args.data, args.train_subset)
    check(args, num_examples)
    q = planning.sample_rate(num_examples, args.batch_size)
    per_epoch = planning.updates_per_epoch(
        num_examples, expected_batch_size=args.batch_size, sampling=args.sampling,
        update_freq=args.update_freq, world_size=args.workers,
    )
    updates = planning.planned_updates(per_epoch, args.epochs or 0, args.max_update or 0)
    try:
        sigma = planning.noise_multiplier(
            sample_rate=q, updates=updates, delta=args.delta, mechanism=args.accountant,
            target_epsilon=args.target_epsilon, given=args.noise_multiplier,
        )
    except ValueError as e:  # opacus: "The privacy budget is too low." (σ above 1e6)
        raise DPConfigError(
            f"no σ reaches ε = {args.target_epsilon} at δ = {args.delta} after {updates} updates "
            f"at q = {q:.6g} ({e}); allow a larger ε, fewer updates or a smaller batch"
        )
    mechanisms = [args.accountant] + [m for m in sorted(ACCOUNTANTS) if m != args.accountant]
    notes = []
    if sigma > 0 and "prv" in mechanisms:
        # opacus sizes the PRV grid from an RDP bound: about 1 GB of memory at
        # ε ≈ 170, and far more beyond (measured), for an ε that means nothing
        rdp_final = planning.epsilon(sigma, q, updates, args.delta, "rdp")
        if rdp_final > PRV_LIMIT:
            if args.accountant == "prv":
                raise DPConfigError(
                    f"ε would be {rdp_final:.4g} (RDP) after {updates} updates at σ = {sigma:.6g}, "
                    f"q = {q:.6g}: no meaningful guarantee, and beyond ε = {PRV_LIMIT} the PRV "
                    "accountant needs gigabytes of memory. Use more noise, fewer updates or a "
                    "smaller batch (or --accountant rdp to see the numbers)"
                )
            mechanisms.remove("prv")
            notes.append(f"PRV not computed: ε > {PRV_LIMIT} (its grid would need gigabytes of memory)")
    final = planning.epsilon(sigma, q, updates, args.delta, args.accountant)
    source = f"--data {args.data}" if args.data is not None else "--num-examples"
    lines = [
        # the summary first: what the outside checks and a reader look for
        f"sigma={sigma:.6g} q={q:.6g} updates={updates} epsilon={final:.4g} "
        f"delta={args.delta:g} accountant={args.accountant}",
        f"DP plan: N={num_examples} examples ({source}), expected logical batch {args.batch_size}, "
        f"q={q:.6g}, {per_epoch} updates per epoch ({args.sampling} sampling), planned updates "
        f"{updates}, σ={sigma:.6g}"
        + (f" (calibrated by {args.accountant} for ε ≤ {args.target_epsilon:g})" if args.target_epsilon is not None else "")
        + f", δ={args.delta:g}",
    ]
    if sigma == 0:
        lines.append("σ = 0: clipping without noise; THIS RUN WOULD NOT BE PRIVATE (ε = inf)")
        return lines
    every = args.every or max(1, math.ceil(math.ceil(updates / per_epoch) / 20))
    rows = planning.epsilon_table(sigma, q, planning.epoch_ends(per_epoch, updates, every), args.delta, mechanisms)
    header = ["epoch", "updates"] + [f"ε ({m.upper()})" for m in mechanisms]
    lines.append("  ".join(f"{h:>10}" for h in header))
    for epoch, n, eps in rows:
        lines.append("  ".join([f"{epoch:>10}", f"{n:>10}"] + [f"{e:>10.4g}" for e in eps]))
    if len(mechanisms) > 1:
        lines.append(
            f"Both columns bound the same run (σ, q, updates); the training run reports the "
            f"{args.accountant.upper()} one (--dp-accountant {args.accountant}). RDP is usually the looser bound."
        )
    lines += notes
    if num_examples * args.delta >= 1:
        lines.append(
            f"warning: δ = {args.delta:g} ≥ 1/N = {1 / num_examples:.3g}: a mechanism that publishes "
            "one random example meets such a δ; choose δ well below 1/N"
        )
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the accountant explains opacus's RDP order warning in a log line; it
    # goes after the plan, not before it. The loggers are restored afterwards
    # (main also runs in-process, e.g. from tests).
    notes = _Notes()
    plugin_log, fairseq_log = logging.getLogger("fairseq_dp"), logging.getLogger("fairseq")
    saved = (plugin_log.level, plugin_log.propagate, fairseq_log.level)
    plugin_log.addHandler(notes)
    plugin_log.setLevel(logging.INFO)
    plugin_log.propagate = False
    fairseq_log.setLevel(logging.WARNING)  # "loaded N examples from ..."
    try:
        lines = plan(args)
    except DPConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        plugin_log.removeHandler(notes)
        plugin_log.setLevel(saved[0])
        plugin_log.propagate = saved[1]
        fairseq_log.setLevel(saved[2])
    for line in lines + [f"note: {note}" for note in notes.messages]:
        print(line)


class _Notes(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


if __name__ == "__main__":
    main()
