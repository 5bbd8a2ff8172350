# Copyright (c) fairseq_dp contributors. MIT license.
"""Canaries for a one-run audit, written into a copy of the user's data directory.

A canary is an example no real data resembles, so that how well the trained
model fits it says whether it was trained on: random tokens (the length of the
training set's median example) and, for classification, a random label;
for language modeling the random tokens are a "secret" whose likelihood is
the score (Carlini et al.'s secret sharer). Each of the m canaries goes into
the training split independently with probability ½, on top of the user's
examples; all m are also written as a split of their own, ``canaries``, which
the scoring reads (the training never does).

The audit directory links every file of the user's directory except the
training split, which is rewritten as the user's examples followed by the
included canaries. The task counts the larger training set, so the
accountant's q is the one of the run that actually happens.
"""

import os
import secrets
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from fairseq.data import Dictionary, data_utils, indexed_dataset

from ..data.lm_examples import LOSS_START_DIR, loss_start_path
from ..errors import DPConfigError

CANARY_SPLIT = "canaries"


@dataclass
class CanarySet:
    """What the audit knows and the training must not: which canary went in."""
    included: np.ndarray   # (m,) bool
    labels: Optional[np.ndarray]  # (m,) class index (classification), else None
    length: int            # tokens per canary, end of sentence included
    train_examples: int    # the user's examples
    seed: Optional[int]    # None: secret randomness (the default)


def _real_symbols(dictionary: Dictionary) -> np.ndarray:
    """Token ids a canary may use: no special symbol, no mask, no padding words."""
    ids = [i for i in range(dictionary.nspecial, len(dictionary))
           if not dictionary[i].startswith("madeupword") and dictionary[i] != "<mask>"]
    if not ids:
        raise DPConfigError("the dictionary has no ordinary symbols to draw canaries from")
    return np.asarray(ids, dtype=np.int64)


def _link_tree(src: str, dst: str, skip: set) -> None:
    """Symlink every file of ``src`` into ``dst`` (recursively) but those in ``skip``
    (relative paths), which the caller writes."""
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            path = os.path.normpath(os.path.join(rel, name))
            if path in skip:
                continue
            os.symlink(os.path.abspath(os.path.join(root, name)), os.path.join(dst, path))


def _load(prefix: str, dictionary: Dictionary, what: str):
    dataset = data_utils.load_indexed_dataset(prefix, dictionary)
    if dataset is None:
        raise DPConfigError(f"{prefix}.bin/.idx not found: the {what} of the training split")
    return dataset


def _write(prefix: str, items: List[torch.Tensor], base=None, vocab_size: int = 0) -> None:
    """An mmap indexed dataset: ``base``'s items (if any) then ``items``."""
    dtype = base._index.dtype if isinstance(base, indexed_dataset.MMapIndexedDataset) else \
        indexed_dataset.best_fitting_int_dtype(vocab_size)
    builder = indexed_dataset.MMapIndexedDatasetBuilder(indexed_dataset.data_file_path(prefix), dtype=dtype)
    if base is not None:
        for i in range(len(base)):
            builder.add_item(base[i])
    for item in items:
        builder.add_item(item)
    builder.finalize(indexed_dataset.index_file_path(prefix))


def _split_files(prefix_rel: str) -> set:
    return {prefix_rel + ".bin", prefix_rel + ".idx"}


def write_audit_data(task_name: str, data: str, out: str, m: int, train_subset: str = "train",
                     num_classes: Optional[int] = None, seed: Optional[int] = None,
                     length: Optional[int] = None) -> CanarySet:
    """Copy ``data`` (as links) into ``out`` with ``m`` canaries; return which went in.

    ``task_name``: ``dp_sentence_prediction`` (``input0/``, ``label/``, and
    ``input1/`` for sentence pairs) or ``dp_language_modeling`` (splits at the
    top level, ``loss_start/``). ``seed`` None draws the canaries and their
    inclusion from the operating system's secret randomness."""
    if m < 2:
        raise DPConfigError(f"--canaries must be at least 2, got {m}")
    if os.path.exists(out):
        raise DPConfigError(f"{out} exists: give the audit a new output directory")
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    included = rng.random(m) < 0.5

    if task_name == "dp_sentence_prediction":
        return _sentence_prediction(data, out, m, train_subset, num_classes, rng, included, seed, length)
    if task_name == "dp_language_modeling":
        return _language_modeling(data, out, m, train_subset, rng, included, seed, length)
    raise DPConfigError(f"the audit supports --task dp_sentence_prediction and dp_language_modeling, not {task_name}")


def _draw_tokens(rng, symbols: np.ndarray, m: int, length: int, eos: int) -> List[torch.Tensor]:
    body = rng.choice(symbols, size=(m, length - 1))
    return [torch.from_numpy(np.append(row, eos).astype(np.int64)) for row in body]


def _median_length(dataset) -> int:
    return max(2, int(np.median(np.asarray(dataset.sizes))))


def _sentence_prediction(data, out, m, train_subset, num_classes, rng, included, seed, length) -> CanarySet:
    if not num_classes or num_classes < 2:
        raise DPConfigError("auditing classification needs --num-classes of at least 2 (a random label "
                            "per canary); regression is not supported")
    inputs = [name for name in ("input0", "input1") if os.path.isdir(os.path.join(data, name))]
    if "input0" not in inputs or not os.path.isdir(os.path.join(data, "label")):
        raise DPConfigError(f"{data}: a sentence-prediction directory has input0/ and label/")
    skip = set()
    for sub in inputs + ["label"]:
        skip |= _split_files(os.path.join(sub, train_subset)) | _split_files(os.path.join(sub, CANARY_SPLIT))
    _link_tree(data, out, skip)

    label_dict = Dictionary.load(os.path.join(data, "label", "dict.txt"))
    if len(label_dict) - label_dict.nspecial < num_classes:
        raise DPConfigError(f"label/dict.txt has fewer than --num-classes {num_classes} labels")
    labels = rng.integers(0, num_classes, size=m)
    base_labels = _load(os.path.join(data, "label", train_subset), label_dict, "labels")
    with_eos = len(base_labels) > 0 and int(base_labels[0][-1]) == label_dict.eos()
    label_items = [torch.tensor([label_dict.nspecial + int(c)] + ([label_dict.eos()] if with_eos else []))
                   for c in labels]
    for split, chosen in ((train_subset, included), (CANARY_SPLIT, np.ones(m, bool))):
        _write(os.path.join(out, "label", split), [x for x, keep in zip(label_items, chosen) if keep],
               base=base_labels if split == train_subset else None, vocab_size=len(label_dict))

    size = None
    for sub in inputs:
        dictionary = Dictionary.load(os.path.join(data, sub, "dict.txt"))
        base = _load(os.path.join(data, sub, train_subset), dictionary, sub)
        size = len(base)
        canary_length = length or _median_length(base)
        items = _draw_tokens(rng, _real_symbols(dictionary), m, canary_length, dictionary.eos())
        for split, chosen in ((train_subset, included), (CANARY_SPLIT, np.ones(m, bool))):
            _write(os.path.join(out, sub, split), [x for x, keep in zip(items, chosen) if keep],
                   base=base if split == train_subset else None, vocab_size=len(dictionary))
        if sub == "input0":
            first_length = canary_length
    return CanarySet(included=included, labels=labels, length=first_length, train_examples=size, seed=seed)


def _language_modeling(data, out, m, train_subset, rng, included, seed, length) -> CanarySet:
    if not os.path.isfile(os.path.join(data, "dict.txt")):
        raise DPConfigError(f"{data}: a dp_language_modeling directory has dict.txt")
    starts_rel = os.path.relpath(loss_start_path(data, train_subset), data)
    skip = _split_files(train_subset) | _split_files(CANARY_SPLIT) | {starts_rel}
    _link_tree(data, out, skip)
    dictionary = Dictionary.load(os.path.join(data, "dict.txt"))
    base = _load(os.path.join(data, train_subset), dictionary, "tokens")
    canary_length = length or _median_length(base)
    items = _draw_tokens(rng, _real_symbols(dictionary), m, canary_length, dictionary.eos())
    _write(os.path.join(out, train_subset), [x for x, keep in zip(items, included) if keep], base=base,
           vocab_size=len(dictionary))
    _write(os.path.join(out, CANARY_SPLIT), items, vocab_size=len(dictionary))
    starts = loss_start_path(data, train_subset)
    if os.path.exists(starts):  # a canary is plain text: all of it is in the loss
        os.makedirs(os.path.join(out, LOSS_START_DIR), exist_ok=True)
        np.save(loss_start_path(out, train_subset),
                np.concatenate([np.load(starts), np.zeros(int(included.sum()), dtype=np.int64)]))
    return CanarySet(included=included, labels=None, length=canary_length, train_examples=len(base), seed=seed)


def describe(canaries: CanarySet) -> Dict[str, object]:
    return {"canaries": int(len(canaries.included)), "included": int(canaries.included.sum()),
            "canary_tokens": canaries.length, "user_train_examples": canaries.train_examples,
            "randomness": "secret (os)" if canaries.seed is None else f"seeded ({canaries.seed})"}
