# Copyright (c) fairseq_dp contributors. MIT license.
"""Pre-train a tiny BERT-style encoder from scratch on a selected corpus.

Step 3 of selective pre-training (Yu et al., TMLR 2024): a DP domain classifier
chose public sentences that resemble the private data (``fairseq-dp-select``),
and a small encoder is pre-trained on them with fairseq's masked language
model, before DP fine-tuning on the private data.

Usage::

    fairseq-dp-pretrain SELECTED_DIR OUT_DIR --dict MINILM/dict.txt --max-update 10000
    # (python -m fairseq_dp.pretrain ... without the console script)

``SELECTED_DIR`` is ``fairseq-dp-select``'s output directory (``selected.txt``,
one sentence a line, and ``dp_ledger.pt``), or a text file of one sentence a
line (a ``dp_ledger.pt`` beside it is used the same way). ``--dict`` is the
``dict.txt`` that ``fairseq-dp-convert minilm CONVERTED`` writes: the tiny
model uses MiniLM's WordPiece vocabulary, and sentences are tokenized with
MiniLM's tokenizer (``--tokenizer``, default the installed all-MiniLM-L6-v2).

What it writes:

- ``OUT_DIR/data/``: the binarized corpus for fairseq (``dict.txt``,
  ``train.{bin,idx}``, ``valid.{bin,idx}``), ``prepare.json`` (line counts)
  and a copy of ``dp_ledger.pt``. ``valid`` is a held-out slice of the corpus
  (``--valid-fraction`` 1%, at most ``--max-valid-lines`` 2000 lines, drawn
  with ``--seed``), left out of ``train``.
- ``OUT_DIR/checkpoints/``: fairseq's checkpoints of ``--arch roberta_tiny``
  (4 layers, hidden 312, 12 heads, FFN 1200, 512 positions), trained with
  ``--task masked_lm_selected`` and the paper's recipe scaled down: Adam
  (β₂ 0.98, ε 1e-6), weight decay 0.01, 6% linear warm-up then linear decay,
  ``--lr`` 3e-4, ``--tokens-per-sample`` 128 of whole sentences
  (``--sample-break-mode complete``). As with ``fairseq-train``, running the
  command again continues from ``checkpoint_last.pt`` there.

Any other flag goes to ``fairseq-train`` after the recipe's own and overrides
them (e.g. ``--encoder-layers 2`` for a smaller model; the printed
fine-tuning command repeats ``--encoder-*`` flags).

The privacy ledger: pre-training reads public text only, but the choice of
that text used the private data, so the weights have spent the classifier's
ε. ``masked_lm_selected`` refuses a data directory without ``dp_ledger.pt``,
logs the ε the selection spent, and keeps that ledger in every checkpoint
(in fairseq's ``task_state``, so stock fairseq still loads the weights
strictly). DP fine-tuning from the checkpoint (``dp_sentence_prediction
--finetune-from-model OUT_DIR/checkpoints/checkpoint_last.pt``, arch
``roberta_pooled_tiny``, ``roberta_lora_tiny`` or ``roberta_rgp_tiny``) adopts
it: its ``dp_epsilon`` is the composed ε of selection and fine-tuning, and
``--dp-target-epsilon`` is the total budget for both. A corpus without a
ledger (public, not chosen with private data) is pre-trained with fairseq's
plain ``--task masked_lm``, and this command says so; a ``fairseq-dp-select``
directory whose ledger is missing (and not ``--random``) is refused, and so
is continuing, in the same OUT_DIR, weights pre-trained on a corpus with
another ledger.
"""

import argparse
import json
import logging
import os
import random
import shlex
import shutil
import subprocess
import sys
from typing import Callable, List, Optional, Sequence

from .checkpoint_ledger import LEDGER_FILE, read_ledger_file
from .errors import DPConfigError

logger = logging.getLogger(__name__)

PROG = "fairseq-dp-pretrain"
PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))
# fairseq-dp-select's output: one sentence a line
SELECTED_FILE = "selected.txt"
VALID_FRACTION = 0.01
MAX_VALID_LINES = 2000
TOKENS_PER_SAMPLE = 128
WARMUP_FRACTION = 0.06

Tokenize = Callable[[List[str]], List[List[str]]]


def corpus_paths(corpus: str) -> tuple:
    """(the corpus text file, the ledger beside it or None) for a
    ``fairseq-dp-select`` output directory or a text file."""
    if os.path.isdir(corpus):
        text = os.path.join(corpus, SELECTED_FILE)
        if not os.path.isfile(text):
            raise DPConfigError(f"{corpus} has no {SELECTED_FILE} (fairseq-dp-select writes it; "
                                "or give the text file itself, one sentence a line)")
    elif os.path.isfile(corpus):
        text = corpus
    else:
        raise DPConfigError(f"corpus {corpus}: no such file or directory (want fairseq-dp-select's "
                            f"output directory or a text file of one sentence a line)")
    ledger = os.path.join(os.path.dirname(os.path.abspath(text)), LEDGER_FILE)
    if not os.path.isfile(ledger) and os.path.isdir(corpus) and not chosen_at_random(corpus):
        # a selection whose ledger is gone (an interrupted rerun, a copy without
        # it) would otherwise pass for public text
        raise DPConfigError(
            f"{corpus} has {SELECTED_FILE} but no {LEDGER_FILE}, and its selection.json does not say "
            "it was drawn at random (--random): a corpus chosen by a DP classifier needs the "
            "classifier's ledger. Rerun fairseq-dp-select to completion"
        )
    return text, ledger if os.path.isfile(ledger) else None


def chosen_at_random(corpus_dir: str) -> bool:
    """Whether fairseq-dp-select's summary in ``corpus_dir`` says --random."""
    try:
        with open(os.path.join(corpus_dir, "selection.json")) as f:
            return json.load(f).get("mode") == "random"
    except (OSError, ValueError):
        return False


def read_sentences(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise DPConfigError(f"{path} is not UTF-8 text: {e}") from e


def held_out_count(n_lines: int, valid_fraction: float, max_valid_lines: int) -> int:
    return max(1, min(max_valid_lines, round(n_lines * valid_fraction)))


def prepare_corpus(
    corpus: str,
    out_dir: str,
    dict_path: str,
    tokenizer: Tokenize,
    tokens_per_sample: int = TOKENS_PER_SAMPLE,
    valid_fraction: float = VALID_FRACTION,
    max_valid_lines: int = MAX_VALID_LINES,
    seed: int = 0,
) -> dict:
    """Tokenize ``corpus`` (a ``fairseq-dp-select`` directory or a text file)
    with ``tokenizer`` (texts -> token strings of ``dict_path``, e.g.
    ``prepare_glue.Tokenizer(minilm_dir())``), hold out a validation slice,
    and binarize both with fairseq-preprocess against ``dict_path`` into
    ``out_dir``; copy the selection's ``dp_ledger.pt`` there. Sentences
    longer than ``tokens_per_sample`` (with ``<s>`` and ``</s>``) are cut.
    Returns the summary written to ``prepare.json``."""
    from .prepare_glue import write_lines

    text, ledger = corpus_paths(corpus)
    if not os.path.isfile(dict_path):
        raise DPConfigError(f"--dict {dict_path}: no such file (fairseq-dp-convert minilm DIR writes DIR/dict.txt)")
    if not 0 < valid_fraction < 1:
        raise DPConfigError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    if tokens_per_sample < 4:
        raise DPConfigError(f"--tokens-per-sample must be at least 4, got {tokens_per_sample}")
    selection = None
    if ledger is not None:
        selection, what = read_ledger_file(ledger)  # refuses an edited or foreign file now, not at fine-tuning
    sentences = read_sentences(text)
    if len(sentences) < 2:
        raise DPConfigError(f"{text} has {len(sentences)} non-empty lines: pre-training needs a corpus "
                            "(and at least one line to hold out for validation)")
    n_valid = held_out_count(len(sentences), valid_fraction, max_valid_lines)
    valid_ids = set(random.Random(seed).sample(range(len(sentences)), n_valid))
    splits = {
        "train": [s for i, s in enumerate(sentences) if i not in valid_ids],
        "valid": [s for i, s in enumerate(sentences) if i in valid_ids],
    }
    os.makedirs(out_dir, exist_ok=True)
    raw = os.path.join(out_dir, "raw")
    os.makedirs(raw, exist_ok=True)
    summary = {"corpus": os.path.abspath(text), "dict": os.path.abspath(dict_path),
               "tokens_per_sample": tokens_per_sample, "splits": {}}
    longest = tokens_per_sample - 2  # <s> and </s> around every sentence
    for split, lines in splits.items():
        tokens = tokenizer(lines)
        cut = sum(len(t) > longest for t in tokens)
        write_lines(os.path.join(raw, f"{split}.txt"), (" ".join(t[:longest]) for t in tokens))
        summary["splits"][split] = {"lines": len(lines), "truncated": cut,
                                    "tokens": sum(min(len(t), longest) + 1 for t in tokens)}
    binarize(raw, out_dir, dict_path)
    if ledger is not None:
        shutil.copyfile(ledger, os.path.join(out_dir, LEDGER_FILE))
        summary["selection_ledger"] = {"from": os.path.abspath(ledger), "what": what,
                                       "steps": selection.steps, "delta": selection.delta}
    else:
        # a stale copy from an earlier preparation would be wrong for this corpus
        if os.path.exists(os.path.join(out_dir, LEDGER_FILE)):
            os.remove(os.path.join(out_dir, LEDGER_FILE))
        summary["selection_ledger"] = None
    with open(os.path.join(out_dir, "prepare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def binarize(raw_dir: str, out_dir: str, dict_path: str) -> None:
    from fairseq import options
    from fairseq_cli import preprocess

    # fairseq-preprocess refuses to overwrite a dictionary; a rerun rebuilds everything
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    argv = ["--only-source", "--srcdict", dict_path, "--destdir", out_dir, "--workers", "1",
            "--trainpref", os.path.join(raw_dir, "train.txt"), "--validpref", os.path.join(raw_dir, "valid.txt")]
    preprocess.main(options.get_preprocessing_parser().parse_args(argv))


def pretrain_command(
    data_dir: str,
    save_dir: str,
    max_update: int,
    batch_size: int = 32,
    lr: float = 3e-4,
    tokens_per_sample: int = TOKENS_PER_SAMPLE,
    arch: str = "roberta_tiny",
    cpu: bool = False,
    extra: Sequence[str] = (),
) -> List[str]:
    """The ``fairseq-train`` arguments (without the program) that pre-train
    ``arch`` on ``data_dir`` (as ``prepare_corpus`` writes it): task
    ``masked_lm_selected`` when the directory holds a selection's ledger,
    else ``masked_lm``. ``extra`` goes last, so it overrides (e.g. smaller
    sizes: ``--encoder-layers 1 --encoder-embed-dim 24``)."""
    if max_update < 1:
        raise DPConfigError(f"--max-update must be at least 1, got {max_update}")
    task = "masked_lm_selected" if os.path.isfile(os.path.join(data_dir, LEDGER_FILE)) else "masked_lm"
    argv = [
        data_dir, "--user-dir", PLUGIN_DIR, "--task", task, "--criterion", "masked_lm", "--arch", arch,
        "--sample-break-mode", "complete", "--tokens-per-sample", str(tokens_per_sample),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--adam-eps", "1e-6", "--weight-decay", "0.01",
        "--clip-norm", "0.0", "--lr-scheduler", "polynomial_decay", "--lr", str(lr),
        "--warmup-updates", str(max(1, round(WARMUP_FRACTION * max_update))),
        "--total-num-update", str(max_update), "--max-update", str(max_update),
        "--batch-size", str(batch_size), "--required-batch-size-multiple", "1",
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--skip-invalid-size-inputs-valid-test",
        "--log-format", "simple", "--log-interval", "10",
    ]
    if cpu:
        argv.append("--cpu")
    return argv + list(extra)


def encoder_size_flags(extra: Sequence[str]) -> List[str]:
    """The ``--encoder-*`` flags (with their values) among fairseq flags
    passed through: fine-tuning must rebuild the encoder with the same sizes."""
    flags, extra = [], list(extra)
    for i, flag in enumerate(extra):
        if flag.startswith("--encoder-"):
            takes_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
            flags += extra[i:i + 2] if takes_value else [flag]
    return flags


def finetune_command(checkpoint: str, arch: str = "roberta_pooled_tiny", size_flags: Sequence[str] = (),
                     delta: Optional[float] = None) -> str:
    """A DP fine-tuning command line that starts from ``checkpoint`` and
    counts its selection ledger (GLUE data from fairseq-dp-prepare-glue with
    the same dict.txt); ``size_flags``: the encoder sizes pre-training used
    where they are not the arch's; ``delta``: the selection's δ (the
    fine-tuning's may not be larger). ``--finetune-from-model``, not
    ``--restore-file``: relaunched, the run resumes its own checkpoint_last.pt
    (and ledger) instead of starting over from the pre-trained weights."""
    sizes = "".join(f" {shlex.quote(f)}" for f in size_flags)
    return (
        f"fairseq-train GLUE-BIN --user-dir {shlex.quote(PLUGIN_DIR)} --task dp_sentence_prediction "
        f"--criterion dp_sentence_prediction --arch {arch}{sizes} --finetune-from-model {shlex.quote(checkpoint)} "
        "--num-classes 2 --init-token 0 --separator-token 2 --max-positions 512 "
        "--dp-clipping ghost --dp-clip-norm 0.1 --batch-size 50 --update-freq 20 --max-epoch 1 "
        "--optimizer adam --adam-betas '(0.9,0.999)' --adam-eps 1e-6 --lr 1e-3 "
        "--lr-scheduler polynomial_decay --warmup-updates 6 --clip-norm 0 "
        f"--dp-delta {delta if delta is not None else 1e-5:g} --dp-target-epsilon 3  "
        "# the total ε, the selection's included"
    )


def check_resumed_ledger(save_dir: str, data_dir: str) -> None:
    """fairseq continues from ``save_dir/checkpoint_last.pt`` when it exists.
    Weights pre-trained on one selection have spent its classifier's
    privacy: continuing them on a corpus with another ledger, or none, would
    leave checkpoints that carry the wrong one (fairseq's Trainer never loads
    a task's state), so that is refused."""
    import torch

    from .accounting import LEDGER_KEY, ledger_entries
    from .checkpoint_ledger import read_checkpoint_history

    last = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.exists(last):
        return
    restored, _, _ = read_checkpoint_history(last)
    corpus_ledger = os.path.join(data_dir, LEDGER_FILE)
    current = None
    if os.path.isfile(corpus_ledger):
        current = ledger_entries(read_ledger_file(corpus_ledger)[0])
    same = (restored is None and current is None) or (
        restored is not None and current is not None
        and torch.equal(restored[LEDGER_KEY].to(torch.float64), current[LEDGER_KEY].to(torch.float64)))
    if not same:
        raise DPConfigError(
            f"{last} exists and was pre-trained on a corpus with "
            f"{'a selection ledger' if restored is not None else 'no selection ledger'}, while this corpus has "
            f"{'another one' if current is not None and restored is not None else 'one' if current is not None else 'none'}: "
            "fairseq would continue those weights, and their privacy cost would be misstated. Use a new "
            "OUT_DIR for a new corpus"
        )


def run_fairseq_train(argv: Sequence[str]) -> None:
    """``python -m fairseq_cli.train ARGV`` in a process of its own, whose
    output goes to this one's; exits with its status if it fails."""
    done = subprocess.run([sys.executable, "-m", "fairseq_cli.train", *argv])
    if done.returncode != 0:
        raise SystemExit(done.returncode)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other flag goes to fairseq-train after the recipe's own, and overrides them "
        "(e.g. --encoder-layers 2, --save-interval-updates 1000, --fp16)",
    )
    p.add_argument("corpus", help=f"fairseq-dp-select's output directory ({SELECTED_FILE} and {LEDGER_FILE}), "
                   "or a text file of one sentence a line")
    p.add_argument("out_dir", help="writes OUT_DIR/data (binarized corpus) and OUT_DIR/checkpoints")
    p.add_argument("--dict", required=True, metavar="DICT_TXT",
                   help="the vocabulary: dict.txt of fairseq-dp-convert minilm DIR (MiniLM's WordPiece)")
    p.add_argument("--tokenizer", default="minilm", metavar="HF_DIR",
                   help="HuggingFace tokenizer directory matching --dict (default: 'minilm', the installed "
                   "all-MiniLM-L6-v2's)")
    p.add_argument("--max-update", type=int, required=True, help="pre-training updates")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per update (default 32)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate after the 6%% warm-up (default 3e-4)")
    p.add_argument("--tokens-per-sample", type=int, default=TOKENS_PER_SAMPLE,
                   help="most tokens per sequence, whole sentences packed together; longer sentences are "
                   f"cut (default {TOKENS_PER_SAMPLE})")
    p.add_argument("--valid-fraction", type=float, default=VALID_FRACTION,
                   help=f"share of the corpus held out for validation (default {VALID_FRACTION}), "
                   f"at most --max-valid-lines")
    p.add_argument("--max-valid-lines", type=int, default=MAX_VALID_LINES,
                   help=f"most held-out validation lines (default {MAX_VALID_LINES})")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default 0)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    p.add_argument("--prepare-only", action="store_true", help="binarize the corpus and stop")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    a, fairseq_extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_dir = os.path.join(a.out_dir, "data")
    save_dir = os.path.join(a.out_dir, "checkpoints")
    try:
        from .prepare_glue import Tokenizer

        tokenizer_dir = a.tokenizer
        if tokenizer_dir == "minilm":
            from .convert import minilm_dir

            tokenizer_dir = minilm_dir()
        summary = prepare_corpus(a.corpus, data_dir, a.dict, Tokenizer(tokenizer_dir), a.tokens_per_sample,
                                 a.valid_fraction, a.max_valid_lines, a.seed)
        if summary["selection_ledger"] is None:
            print(f"{PROG}: no {LEDGER_FILE} beside the corpus: pre-training it as a public corpus "
                  "(--task masked_lm), which no private data chose", file=sys.stderr)
        if a.prepare_only:
            print(f"wrote {data_dir}: {json.dumps(summary['splits'])}")
            return
        check_resumed_ledger(save_dir, data_dir)
        command = pretrain_command(data_dir, save_dir, a.max_update, a.batch_size, a.lr, a.tokens_per_sample,
                                   cpu=a.cpu, extra=fairseq_extra)
    except DPConfigError as e:
        # a user mistake: its message alone, no traceback
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{PROG}: fairseq-train {shlex.join(command)}", file=sys.stderr)
    run_fairseq_train(command)
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    print(f"pre-trained checkpoint: {checkpoint}")
    print("DP fine-tuning from it (its ε includes the selection's):")
    ledger = summary["selection_ledger"]
    print("  " + finetune_command(checkpoint, size_flags=encoder_size_flags(fairseq_extra),
                                  delta=ledger["delta"] if ledger else None))


if __name__ == "__main__":
    main()
