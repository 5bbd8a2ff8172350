# Copyright (c) fairseq_dp contributors. MIT license.
"""``fairseq-dp-select``: choose public pre-training text with a DP domain classifier.

Selective pre-training (Yu et al., "Selective Pre-training for Private
Fine-tuning", TMLR 2024): a small model is pre-trained on the part of a public
corpus that looks like the private data, then fine-tuned with DP. This command
does the first two stages::

    fairseq-dp-select --private glue_data/SST-2 --pool public_pool/pool.tsv.gz \\
        --words 1000000 --epsilon 0.5 --delta 1e-6 --out selection

1. **DP domain classifier.** Positives: the private training sentences
   (``--private``: a GLUE-format directory whose ``train.tsv`` has a
   ``sentence`` column, a ``.tsv`` file, or a text file with one sentence a
   line). Negatives: ``--negatives-per-positive`` (5, as published) times as
   many pool sentences drawn at random. The converted all-MiniLM-L6-v2 is
   fine-tuned on them with this plugin's DP task (``dp_sentence_prediction``,
   DP-LoRA by default, ``--method full`` for DP full fine-tuning with ghost
   clipping), with Poisson sampling, σ calibrated for ``--epsilon`` at
   ``--delta``, and the secret randomness of every DP run. The positives are
   private, so this stage spends privacy: its ledger is saved with the
   classifier and copied into the selection (``dp_ledger.pt``).
   A labelled held-out split (the private ``dev.tsv`` when there is one, plus
   as many times more held-out pool sentences) measures the classifier.
2. **Scoring and selection.** Every pool sentence is scored with the
   classifier's P(in-domain), tokenized and batched exactly as its validation
   saw sentences. Sentences of at least ``--min-words`` words are taken in
   order of score until the next one would exceed ``--words`` words. Scoring
   public data spends no further privacy: it is post-processing of the DP
   classifier. ``--random`` takes a uniformly random sample of the same size
   with the same filter instead (the baseline; no classifier, no privacy).

``--classifier CHECKPOINT`` skips stage 1 and scores with an existing
classifier; it must carry its ledger (a DP run's checkpoint does).

Output (``--out``): ``selected.txt`` (the corpus, one sentence a line, shuffled:
what ``fairseq-dp-pretrain`` reads), ``selected.tsv`` (rank order: score,
source, sentence), ``selection.json`` (settings, the classifier's held-out
precision, sentences and words selected from each pool source, the privacy
spent), ``dp_ledger.pt`` (the classifier's privacy ledger) and ``scores.npy`` (every
pool sentence's score, reused by a rerun with another ``--words``). A model
pre-trained on this corpus with ``fairseq-dp-pretrain`` carries the ledger,
and a DP fine-tuning run that starts from it reports the composed ε of both
stages; its ``--dp-target-epsilon`` is the total budget.
"""

import argparse
import gzip
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DPConfigError

PROG = "fairseq-dp-select"
PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))
SELECTION_FILE = "selection.json"
CORPUS_FILE = "selected.txt"
RANKED_FILE = "selected.tsv"
SCORES_FILE = "scores.npy"
# what the classifier was trained with: reused only for the same settings and data
CLASSIFIER_SETTINGS_FILE = "settings.json"

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- input text

def clean(sentence: str) -> str:
    """One line of text: no tabs or line breaks (the TSV and corpus formats)."""
    return " ".join(sentence.split())


def read_private(path: str) -> Tuple[List[str], Optional[List[str]]]:
    """(training sentences, held-out sentences or None) of ``--private``."""
    from .prepare_glue import DEV_FILES, read_tsv

    if os.path.isdir(path):
        train = os.path.join(path, "train.tsv")
        if not os.path.isfile(train):
            raise DPConfigError(f"--private {path}: a directory needs a GLUE-format train.tsv")
        dev = next((os.path.join(path, f) for f in DEV_FILES if os.path.isfile(os.path.join(path, f))), None)
        return [clean(s) for s in read_tsv(train)[0]], [clean(s) for s in read_tsv(dev)[0]] if dev else None
    if not os.path.isfile(path):
        raise DPConfigError(f"--private {path}: no such file or directory")
    if path.endswith(".tsv"):
        return [clean(s) for s in read_tsv(path)[0]], None
    with open(path, encoding="utf-8") as f:
        return [clean(line) for line in f if line.strip()], None


def read_pool(path: str) -> Tuple[List[str], List[str]]:
    """(source of each sentence, sentences) of a ``source<TAB>sentence`` file
    (``.gz`` or plain), or of a text file with one sentence a line (source ``-``)."""
    if not os.path.isfile(path):
        raise DPConfigError(f"--pool {path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    sources, sentences = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            source, tab, sentence = line.partition("\t")
            if not tab:
                source, sentence = "-", source
            sources.append(source)
            sentences.append(clean(sentence))
    if not sentences:
        raise DPConfigError(f"--pool {path} holds no sentences")
    return sources, sentences


def word_count(sentence: str) -> int:
    return len(sentence.split())


# ---------------------------------------------------------------- selection

def select_by_score(scores: Sequence[float], words: Sequence[int], budget: int, min_words: int) -> List[int]:
    """Indices of the highest-scoring items of at least ``min_words`` words,
    best first, until the next one would take the total above ``budget``
    (ties broken by position, so the result is deterministic)."""
    order = sorted((i for i in range(len(scores)) if words[i] >= min_words), key=lambda i: (-scores[i], i))
    return _prefix_within(order, words, budget)


def select_at_random(words: Sequence[int], budget: int, min_words: int, seed: int) -> List[int]:
    """The baseline: the same rule on a uniformly random order."""
    eligible = [i for i in range(len(words)) if words[i] >= min_words]
    random.Random(seed).shuffle(eligible)
    return _prefix_within(eligible, words, budget)


def _prefix_within(order: Sequence[int], words: Sequence[int], budget: int) -> List[int]:
    chosen, total = [], 0
    for i in order:
        if total + words[i] > budget:
            break
        chosen.append(i)
        total += words[i]
    return chosen


def source_summary(sources: Sequence[str], words: Sequence[int], chosen: Sequence[int]) -> Dict[str, dict]:
    """Per pool source: sentences and words in the pool and selected."""
    out: Dict[str, dict] = {}
    for i, source in enumerate(sources):
        entry = out.setdefault(source, {"pool_sentences": 0, "pool_words": 0, "sentences": 0, "words": 0})
        entry["pool_sentences"] += 1
        entry["pool_words"] += words[i]
    for i in chosen:
        out[sources[i]]["sentences"] += 1
        out[sources[i]]["words"] += words[i]
    total = sum(e["words"] for e in out.values()) or 1
    for entry in out.values():
        entry["share_of_selected_words"] = round(entry["words"] / total, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["words"]))


# ---------------------------------------------------------------- stage 1: the classifier

def write_classifier_tsvs(out_dir: str, positives: Sequence[str], negatives: Sequence[str],
                          dev_positives: Sequence[str], dev_negatives: Sequence[str], seed: int) -> None:
    """GLUE-format train.tsv and dev.tsv: label 1 in-domain (private), 0 public."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    for name, pos, neg in (("train.tsv", positives, negatives), ("dev.tsv", dev_positives, dev_negatives)):
        rows = [(s, "1") for s in pos] + [(s, "0") for s in neg]
        rng.shuffle(rows)
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{s}\t{label}\n" for s, label in rows)


def classifier_command(args, data_bin: str, save_dir: str, model_pt: Optional[str]) -> List[str]:
    method = {
        "lora": ["--arch", args.arch or "roberta_lora_minilm", "--lora-rank", str(args.lora_rank),
                 "--lora-targets", "q,k,v,out,fc1,fc2"],
        "full": ["--arch", args.arch or "roberta_pooled_minilm", "--dp-clipping", "ghost"],
    }[args.method]
    warmup = max(1, args.updates // 10)
    return [
        sys.executable, "-m", "fairseq_cli.train", data_bin, "--user-dir", PLUGIN_DIR, "--cpu",
        "--num-workers", "0", "--seed", str(args.seed),
        "--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction", *method,
        *(["--finetune-from-model", model_pt] if model_pt else []),
        "--num-classes", "2", "--init-token", "0", "--separator-token", "2", "--max-positions", "512",
        "--dp-clip-norm", str(args.clip_norm), "--dp-target-epsilon", str(args.epsilon),
        "--dp-delta", str(args.delta), "--dp-accountant", "prv",
        "--batch-size", str(args.micro_batch), "--update-freq", str(args.batch_size // args.micro_batch),
        "--max-update", str(args.updates),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--adam-eps", "1e-6", "--lr", str(args.lr),
        "--lr-scheduler", "polynomial_decay", "--warmup-updates", str(warmup),
        "--total-num-update", str(args.updates), "--clip-norm", "0",
        "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric",
        "--no-epoch-checkpoints", "--save-dir", save_dir,
        "--log-format", "simple", "--log-interval", "10", *args.train_flags,
    ]


def run_logged(cmd: List[str], log_path: str) -> None:
    """Runs a training command, its output in ``log_path``, its DP and
    progress lines on the console."""
    print(f"[{PROG}] " + " ".join(cmd[1:]) + f"\n[{PROG}]   log: {log_path}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            if "| INFO |" in line and any(t in line for t in ("| train", "| valid", "fairseq_dp")):
                print(line, end="", flush=True)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.readlines()[-30:]
        sys.stdout.writelines(tail)
        raise DPConfigError(f"the classifier's training failed (exit {proc.returncode}); log: {log_path}")


def train_classifier(args, private_train: List[str], private_dev: Optional[List[str]],
                     pool: List[str]) -> str:
    """Stage 1; returns the classifier checkpoint (``checkpoint_last.pt``:
    the last update, never one chosen by validation)."""
    from .prepare_glue import Tokenizer, prepare

    from .checkpoint_ledger import finished_updates

    work = os.path.join(args.out, "classifier")
    save_dir = os.path.join(work, "checkpoints")
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    settings = classifier_settings(args, private_train, private_dev)
    settings_path = os.path.join(work, CLASSIFIER_SETTINGS_FILE)
    if os.path.exists(checkpoint):
        try:
            with open(settings_path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
        if saved != settings:
            raise DPConfigError(
                f"{work} holds a classifier trained (or being trained) with other settings or other "
                "private data. Use another --out, remove that directory, or score with it as it is "
                f"(--classifier {checkpoint})"
            )
        if finished_updates(checkpoint) >= args.updates:
            print(f"[{PROG}] the classifier in {checkpoint} has finished its {args.updates} updates "
                  "with these settings: reusing it")
            return checkpoint
        # else fairseq continues the interrupted run from checkpoint_last.pt
    encoder = args.encoder or os.path.join(args.out, "minilm")
    if args.encoder is None and not os.path.exists(os.path.join(encoder, "model.pt")):
        from .convert import convert, minilm_dir

        convert(minilm_dir(), encoder)
    dict_path = os.path.join(encoder, "dict.txt")
    if not os.path.isfile(dict_path):
        raise DPConfigError(f"--encoder {encoder} has no dict.txt (fairseq-dp-convert writes it)")
    model_pt = os.path.join(encoder, "model.pt")
    model_pt = model_pt if os.path.exists(model_pt) else None

    # negatives drawn from the pool with a public seed: the pool is public
    rng = random.Random(args.seed)
    k = args.negatives_per_positive
    dev_positives = private_dev or []
    wanted = k * (len(private_train) + len(dev_positives))
    drawn = rng.sample(range(len(pool)), min(wanted, len(pool)))
    if len(drawn) < wanted:
        logger.warning(f"{PROG}: the pool has {len(pool)} sentences, fewer than the {wanted} negatives asked for")
    n_train_neg = min(len(drawn), k * len(private_train))
    negatives = [pool[i] for i in drawn[:n_train_neg]]
    dev_negatives = [pool[i] for i in drawn[n_train_neg:]]
    if not dev_positives:  # no private dev split: hold out public sentences only
        dev_negatives = dev_negatives[:1000]
    tsv_dir = os.path.join(work, "tsv")
    write_classifier_tsvs(tsv_dir, private_train, negatives, dev_positives, dev_negatives or negatives[:100],
                          args.seed)
    data_bin = os.path.join(work, "bin")
    prepare(tsv_dir, data_bin, dict_path, Tokenizer(args.tokenizer), args.max_length)
    os.makedirs(save_dir, exist_ok=True)
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    run_logged(classifier_command(args, data_bin, save_dir, model_pt), os.path.join(work, "train.log"))
    return checkpoint


def classifier_settings(args, private_train: Sequence[str], private_dev: Optional[Sequence[str]]) -> dict:
    """Everything the classifier's training depends on, the private data by digest."""
    def digest(lines) -> str:
        return hashlib.sha256("\n".join(lines or []).encode("utf-8")).hexdigest()

    keys = ("method", "arch", "lora_rank", "negatives_per_positive", "epsilon", "delta", "updates",
            "batch_size", "micro_batch", "lr", "clip_norm", "max_length", "seed", "train_flags", "encoder",
            "tokenizer")
    settings = {k: getattr(args, k) for k in keys}
    settings.update(private_train=digest(private_train), private_dev=digest(private_dev),
                    pool=_file_key(args.pool))
    return settings


def _file_key(path: str) -> dict:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime": stat.st_mtime}


# ---------------------------------------------------------------- stage 2: scoring

class Classifier:
    """A trained classifier loaded as fairseq loads it for validation, and
    P(in-domain) for raw sentences, tokenized, truncated and batched exactly as
    the classifier's binarized data was (``<s>`` + tokens + ``</s>``)."""

    def __init__(self, checkpoint: str, data_bin: Optional[str] = None):
        from fairseq import checkpoint_utils

        import fairseq_dp  # noqa: F401  (registers the plugin)

        if not os.path.isfile(checkpoint):
            raise DPConfigError(f"--classifier {checkpoint}: no such file")
        overrides = {"data": data_bin} if data_bin else {}
        try:
            models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides=overrides)
        except FileNotFoundError as e:
            raise DPConfigError(
                f"cannot load {checkpoint}: {e}. The classifier's saved config names its data "
                "directory (for the dictionaries): pass it with --classifier-data"
            ) from e
        if not hasattr(task, "label_dictionary"):
            raise DPConfigError(f"{checkpoint} is not a sentence classifier")
        self.model = models[0].eval().float()
        self.task = task
        self.dictionary = task.source_dictionary
        self.head = getattr(cfg.criterion, "classification_head_name", "sentence_classification_head")
        labels = task.label_dictionary
        if labels.index("1") == labels.unk():
            raise DPConfigError(f"{checkpoint}: its labels are not the 0/1 of a domain classifier")
        self.positive = labels.index("1") - labels.nspecial
        self.init_token = getattr(cfg.task, "init_token", None)

    def encode(self, tokens: List[str]):
        import torch

        ids = self.dictionary.encode_line(" ".join(tokens), add_if_not_exist=False, append_eos=True).long()
        if self.init_token is not None:
            ids = torch.cat([ids.new_tensor([self.init_token]), ids])
        return ids

    def probabilities(self, batches: Sequence[List]) -> List:
        import torch

        out = []
        with torch.inference_mode():
            for batch in batches:
                tokens = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=self.dictionary.pad())
                logits, _ = self.model(tokens, features_only=True, classification_head_name=self.head)
                # float64, as held_out_precision: the same probability for the same sentence
                out.append(torch.softmax(logits.double(), dim=-1)[:, self.positive])
        return out

    def score(self, sentences: Sequence[str], tokenizer, max_length: Optional[int], batch_size: int = 256,
              progress_every: int = 0) -> np.ndarray:
        """P(in-domain) of each sentence, in input order."""
        import torch

        from .prepare_glue import truncate

        scores = np.zeros(len(sentences))
        chunk = 8192  # tokenize and score in chunks: a large pool need not fit in memory as tensors
        start_time = time.time()
        for start in range(0, len(sentences), chunk):
            texts = list(sentences[start:start + chunk])
            tokens, _ = truncate(tokenizer(texts), None, max_length)
            ids = [self.encode(t) for t in tokens]
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # little padding
            batches = [[ids[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
            probs = torch.cat(self.probabilities(batches)).numpy()
            scores[[start + i for i in order]] = probs
            done = min(start + chunk, len(sentences))
            if progress_every and (done // chunk) % progress_every == 0:
                rate = done / max(1e-9, time.time() - start_time)
                print(f"[{PROG}] scored {done} of {len(sentences)} sentences ({rate:.0f}/s)", flush=True)
        return scores


def held_out_precision(classifier: Classifier) -> Optional[dict]:
    """How well the classifier separates the binarized held-out split it was
    validated on: precision and recall at P > 0.5, and, since selection uses
    the ranking and not the threshold, the precision of the top-k scored
    examples for k = the number of positives (R-precision) and the ROC AUC."""
    import torch
    from sklearn.metrics import roc_auc_score

    task = classifier.task
    try:
        task.load_dataset("valid")
    except (FileNotFoundError, OSError):
        return None
    dataset = task.dataset("valid")
    probs, truth = [], []
    with torch.inference_mode():
        for start in range(0, len(dataset), 256):
            sample = dataset.collater([dataset[i] for i in range(start, min(start + 256, len(dataset)))])
            logits, _ = classifier.model(**sample["net_input"], features_only=True,
                                         classification_head_name=classifier.head)
            probs.append(torch.softmax(logits.double(), -1)[:, classifier.positive])
            truth.append(sample["target"].view(-1) == classifier.positive)
    probs, truth = torch.cat(probs), torch.cat(truth)
    predicted = probs > 0.5
    positives = int(truth.sum())
    tp = int((predicted & truth).sum())
    top = torch.argsort(probs, descending=True)[:positives]
    both = 0 < positives < len(truth)
    return {
        "examples": int(len(truth)), "positives": positives,
        "precision": round(tp / max(1, int(predicted.sum())), 4),
        "recall": round(tp / max(1, positives), 4),
        "r_precision": round(float(truth[top].double().mean()), 4) if positives else None,
        "roc_auc": round(float(roc_auc_score(truth.numpy(), probs.numpy())), 4) if both else None,
    }


def classifier_ledger(checkpoint: str):
    """The classifier's privacy ledger, as an accountant; refuses a
    classifier without one (its privacy cost would be lost)."""
    from .accounting import PrivacyAccountant, restore_ledger
    from .checkpoint_ledger import read_ledger

    if not os.path.isfile(checkpoint):
        raise DPConfigError(f"--classifier {checkpoint}: no such file")
    try:
        entries = read_ledger(checkpoint)
    except Exception as e:  # not a checkpoint: torch.load's errors vary with the file
        raise DPConfigError(f"--classifier {checkpoint} is not a fairseq checkpoint ({type(e).__name__}: {e})") from e
    if entries is None:
        raise DPConfigError(
            f"--classifier {checkpoint} carries no privacy ledger: it was not trained with DP (or its "
            "ledger was removed), so choosing public data with it could leak the private examples it "
            "saw, at an unknown cost. Train the classifier with fairseq-dp-select (or a DP task)"
        )
    accountant = PrivacyAccountant("prv")
    restore_ledger(accountant, entries)
    if accountant.delta is None:
        raise DPConfigError(f"{checkpoint}: its ledger states no δ")
    return accountant


# ---------------------------------------------------------------- the command


def _scores_key(args, checkpoint: str, n: int) -> dict:
    return {"classifier": _file_key(checkpoint), "pool": _file_key(args.pool), "sentences": n,
            "max_length": args.max_length, "tokenizer": os.path.abspath(args.tokenizer),
            "classifier_data": args.classifier_data}


def cached_scores(args, checkpoint: str, n: int) -> Optional[np.ndarray]:
    """The pool's scores from an earlier run with the same classifier file,
    pool and tokenization (scoring a large pool takes long; a new budget
    needs only a new selection)."""
    path = os.path.join(args.out, SCORES_FILE)
    try:
        with open(path + ".json") as f:
            key = json.load(f)
    except (OSError, ValueError):
        return None
    if key != _scores_key(args, checkpoint, n):
        return None
    print(f"[{PROG}] reusing the pool's scores in {path} (same classifier, pool and tokenization)")
    return np.load(path)


def save_scores(args, checkpoint: str, scores: np.ndarray) -> None:
    path = os.path.join(args.out, SCORES_FILE)
    np.save(path, scores)
    with open(path + ".json", "w") as f:
        json.dump(_scores_key(args, checkpoint, len(scores)), f)


def write_selection(out: str, sources: Sequence[str], sentences: Sequence[str], chosen: Sequence[int],
                    scores: Optional[np.ndarray], seed: int) -> None:
    with open(os.path.join(out, RANKED_FILE), "w", encoding="utf-8") as f:
        for i in chosen:
            score = f"{scores[i]:.6f}" if scores is not None else "-"
            f.write(f"{score}\t{sources[i]}\t{sentences[i]}\n")
    shuffled = list(chosen)
    random.Random(seed).shuffle(shuffled)  # pre-training reads blocks of neighbours: mix the ranking
    with open(os.path.join(out, CORPUS_FILE), "w", encoding="utf-8") as f:
        f.writelines(sentences[i] + "\n" for i in shuffled)


def run(args) -> dict:
    from .checkpoint_ledger import LEDGER_FILE, write_ledger_file

    os.makedirs(args.out, exist_ok=True)
    # a rerun, even one that fails, must not leave an old corpus without its
    # ledger (it would pass for public text) or beside another's: all go first,
    # and the ledger is written before the corpus
    for name in (CORPUS_FILE, RANKED_FILE, SELECTION_FILE, LEDGER_FILE):
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    sources, pool = read_pool(args.pool)
    words = [word_count(s) for s in pool]
    summary = {
        "command": " ".join([PROG] + args.argv), "pool": args.pool, "pool_sentences": len(pool),
        "pool_words": int(sum(words)), "words_budget": args.words, "min_words": args.min_words,
        "mode": "random" if args.random else "classifier",
    }
    started = time.time()
    scores = None
    if args.random:
        chosen = select_at_random(words, args.words, args.min_words, args.seed)
        print(f"[{PROG}] --random: no classifier, no privacy spent")
    else:
        checkpoint = args.classifier
        if checkpoint is None:
            if args.private is None:
                raise DPConfigError("give --private (to train the classifier) or --classifier")
            private_train, private_dev = read_private(args.private)
            if not private_train:
                raise DPConfigError(f"--private {args.private} holds no sentences")
            checkpoint = train_classifier(args, private_train, private_dev, pool)
            summary["classifier_training"] = {
                "private_sentences": len(private_train), "negatives_per_positive": args.negatives_per_positive,
                "method": args.method, "updates": args.updates, "batch_size": args.batch_size,
                "lr": args.lr, "clip_norm": args.clip_norm, "max_length": args.max_length,
                "target_epsilon": args.epsilon, "delta": args.delta,
            }
        accountant = classifier_ledger(checkpoint)
        classifier = Classifier(checkpoint, args.classifier_data)
        summary["classifier"] = checkpoint
        summary["held_out"] = held_out_precision(classifier)
        from .prepare_glue import Tokenizer

        score_started = time.time()
        scores = cached_scores(args, checkpoint, len(pool))
        if scores is None:
            scores = classifier.score(pool, Tokenizer(args.tokenizer), args.max_length, progress_every=4)
            save_scores(args, checkpoint, scores)
        summary["scoring_s"] = round(time.time() - score_started, 1)
        chosen = select_by_score(scores, words, args.words, args.min_words)
        epsilon = accountant.get_epsilon(accountant.delta)
        write_ledger_file(os.path.join(args.out, LEDGER_FILE), accountant,
                          f"the DP domain classifier {checkpoint} that fairseq-dp-select chose this corpus with")
        summary["privacy"] = {
            "epsilon": round(epsilon, 4), "delta": accountant.delta, "ledger": [list(e) for e in accountant.history],
            "note": "spent by the classifier on the private positives; scoring public text with it is "
                    "post-processing and spends nothing more",
        }
        print(f"[{PROG}] the classifier spent ε = {epsilon:.4g} at δ = {accountant.delta} on the private "
              f"data; its ledger is {os.path.join(args.out, LEDGER_FILE)}: a model pre-trained on this "
              "corpus with fairseq-dp-pretrain carries it into fine-tuning")
    write_selection(args.out, sources, pool, chosen, scores, args.seed)
    summary["selected_sentences"] = len(chosen)
    summary["selected_words"] = int(sum(words[i] for i in chosen))
    summary["sources"] = source_summary(sources, words, chosen)
    summary["wall_s"] = round(time.time() - started, 1)
    with open(os.path.join(args.out, SELECTION_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[{PROG}] {len(chosen)} sentences, {summary['selected_words']} words -> "
          f"{os.path.join(args.out, CORPUS_FILE)}; by source:")
    for source, entry in summary["sources"].items():
        if entry["words"]:
            print(f"[{PROG}]   {source:<18} {entry['words']:>9} words ({100 * entry['share_of_selected_words']:.1f} %)")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", required=True, help="public text: source<TAB>sentence rows (.tsv or .tsv.gz), "
                   "or one sentence a line")
    p.add_argument("--out", required=True, help="output directory (the classifier's files go to OUT/classifier)")
    p.add_argument("--words", type=int, required=True, help="word budget of the selection (whitespace words)")
    p.add_argument("--min-words", type=int, default=6, help="shortest sentence kept, in words (published: 6)")
    p.add_argument("--random", action="store_true", help="the baseline: a random sample of the same size and "
                   "filter, without a classifier (spends no privacy)")
    p.add_argument("--seed", type=int, default=1, help="seed of the public randomness (negatives drawn from "
                   "the pool, the random baseline, the corpus order); the DP run's own noise and sampling "
                   "use secret randomness whatever the seed")
    g = p.add_argument_group("stage 1: the DP domain classifier")
    g.add_argument("--private", help="private training text: a GLUE-format directory (train.tsv, and dev.tsv "
                   "for the held-out measurement), a .tsv with a sentence column, or one sentence a line")
    g.add_argument("--classifier", help="an existing classifier checkpoint (skips stage 1); it must carry "
                   "its privacy ledger")
    g.add_argument("--classifier-data", help="with --classifier: its binarized data directory, if not where "
                   "its saved config says")
    g.add_argument("--encoder", help="converted checkpoint directory (model.pt, dict.txt) to fine-tune; "
                   "default: all-MiniLM-L6-v2, converted into OUT/minilm. A directory with dict.txt alone "
                   "trains from scratch (for tests)")
    g.add_argument("--tokenizer", default="minilm", metavar="HF_DIR", help="HuggingFace tokenizer directory "
                   "matching the encoder's dict.txt ('minilm', the default: the installed all-MiniLM-L6-v2's)")
    g.add_argument("--method", choices=["lora", "full"], default="lora",
                   help="DP-LoRA (default) or DP full fine-tuning with ghost clipping")
    g.add_argument("--arch", help="override the architecture (default: roberta_lora_minilm, or "
                   "roberta_pooled_minilm for --method full)")
    g.add_argument("--lora-rank", type=int, default=16)
    g.add_argument("--negatives-per-positive", type=int, default=5, help="public negatives per private "
                   "positive (published: 5)")
    g.add_argument("--epsilon", type=float, default=0.5, help="the classifier's target ε (it is part of the "
                   "final model's total: keep it small)")
    g.add_argument("--delta", type=float, default=1e-6, help="δ of the classifier's guarantee; the fine-tuning "
                   "run must use a δ no larger. It must be below 1/N for the N = positives + negatives")
    g.add_argument("--updates", type=int, default=60, help="DP updates of the classifier")
    g.add_argument("--batch-size", type=int, default=1024, help="expected logical batch (Poisson sampling)")
    g.add_argument("--micro-batch", type=int, default=64, help="examples per forward pass")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warm-up, then linear decay)")
    g.add_argument("--clip-norm", type=float, default=1.0, help="per-example clipping norm C")
    g.add_argument("--max-length", type=int, default=32, help="tokens per sentence, <s> and </s> included, "
                   "in training and in scoring (the domain shows in the first words)")
    g.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[],
                   help="everything after it goes to fairseq-train as it is (e.g. model sizes)")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.random and (args.classifier or args.private):
        parser.error("--random selects without a classifier: drop --private/--classifier")
    for flag, value, least in (("--words", args.words, 1), ("--updates", args.updates, 1),
                               ("--micro-batch", args.micro_batch, 1), ("--batch-size", args.batch_size, 1),
                               ("--negatives-per-positive", args.negatives_per_positive, 1),
                               ("--min-words", args.min_words, 0), ("--max-length", args.max_length, 6)):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if not args.epsilon > 0:
        parser.error(f"--epsilon must be > 0, got {args.epsilon}")
    if not 0 < args.delta < 1:
        parser.error(f"--delta must be in (0, 1), got {args.delta}")
    if args.classifier and args.private:
        parser.error("--classifier scores with an existing classifier: drop --private (it would not be used)")
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    try:
        if args.tokenizer == "minilm":
            from .convert import minilm_dir

            args.tokenizer = minilm_dir()
        run(args)
    except DPConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
