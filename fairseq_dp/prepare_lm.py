# Copyright (c) fairseq_dp contributors. MIT license.
"""Text, prompt/target TSV or E2E CSV files to the binaries of ``--task dp_language_modeling``.

``fairseq-dp-prepare-lm --format {text,tsv,e2e} --train FILE [--valid FILE ...]
[--test FILE ...] --destdir DIR`` (also ``python -m fairseq_dp.prepare_lm``)
tokenizes with GPT-2's byte-level BPE (fairseq's own encoder; from
``--gpt2-encoder-json``/``--gpt2-vocab-bpe``, else from the ranks that the
``openai-whisper`` package ships; nothing is downloaded) and writes one item per
example, the privacy unit:

- ``--format text``: one example per line, the line as it is without its line
  end (``\\n`` or ``\\r\\n``); its item is ``tokens </s>`` and the loss covers
  every token.
- ``--format tsv``: ``prompt<TAB>target`` per line, exactly one tab; the item is
  ``prompt </s> target </s>`` and the loss covers the target and its ``</s>``.
- ``--format e2e``: the E2E NLG CSV (header ``mr,ref``): prompt = mr, target = ref.

DESTDIR gets ``dict.txt`` (GPT-2 ids in order after fairseq's specials; or a
copy of ``--srcdict``), ``{split}.bin``/``{split}.idx`` (fairseq mmap indexed
dataset), ``loss_start/{split}.npy`` (per example, the item position of the
first token the loss covers; in a folder of its own, since fairseq takes every
``valid<N>.*`` file beside the data for a validation subset) and
``prepare_lm.json``. Splits: ``train``;
``valid``, ``valid1``, ... and ``test``, ``test1``, ... as fairseq-preprocess
names several files.

Nothing is dropped or cut silently: an empty line, a row without a target, or an
example longer than ``--max-length`` tokens (separators and ``</s>`` included)
is refused with its line numbers, unless ``--skip-empty`` / ``--truncate``.
"""

import argparse
import csv
import json
import os
import shutil
import sys
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .data.lm_examples import loss_start_path
from .errors import DPConfigError
from .gpt2_bpe import (
    FAIRSEQ_EOS,
    check_gpt2_dictionary,
    gpt2_bpe_files,
    gpt2_ids_to_fairseq,
    load_gpt2_bpe,
    sha256_file,
    write_gpt2_dict,
)

PROG = "fairseq-dp-prepare-lm"
FORMATS = ("text", "tsv", "e2e")
E2E_COLUMNS = ("mr", "ref")
SHOW_LINES = 10  # line numbers quoted in an error message
# smallest item for a pair: prompt, </s>, one target token, </s>
MIN_PAIR_TAIL = 3


class Record(NamedTuple):
    """One example as read: where it starts in its file, prompt (None for plain text), text."""

    line: int
    prompt: Optional[str]
    text: str


def _lines_quoted(lines: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:SHOW_LINES])
    return shown + (f" (and {len(lines) - SHOW_LINES} more)" if len(lines) > SHOW_LINES else "")


def _open(path: str, newline: str = "\n"):
    if not os.path.isfile(path):
        raise DPConfigError(f"{path}: no such file")
    # utf-8-sig: a byte-order mark is not part of the first example;
    # newline="\n": only \n ends a line (a lone \r or U+2028 inside a line is text,
    # and \r\n is stripped by _strip_line_end); the csv module wants newline=""
    return open(path, encoding="utf-8-sig", newline=newline)


def _decode_error(path: str, e: UnicodeDecodeError) -> DPConfigError:
    # the text reader decodes in blocks, so e.start is no file position: find the line again
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
        where = ""
    except UnicodeDecodeError as whole:
        where = " at line %d" % (data[: whole.start].count(b"\n") + 1)
    return DPConfigError(f"{path}: not UTF-8 text{where} ({e.reason}); re-encode the file as UTF-8")


def _strip_line_end(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith("\n") else line


def _numbered_lines(path: str) -> Iterator[Tuple[int, str]]:
    """(line number, line without its end) of a text or TSV file."""
    try:
        with _open(path) as f:
            for number, line in enumerate(f, 1):
                yield number, _strip_line_end(line)
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None


def read_text(path: str, skip_empty: bool) -> Tuple[List[Record], int]:
    """(examples, number of empty lines skipped)."""
    records, empty = [], []
    for number, line in _numbered_lines(path):
        if line == "":
            empty.append(number)
        else:
            records.append(Record(number, None, line))
    if empty and not skip_empty:
        raise DPConfigError(
            f"{path}: {len(empty)} empty line(s) at line {_lines_quoted(empty)}; an empty example has nothing "
            "to learn. Remove them, or pass --skip-empty to leave them out"
        )
    return records, len(empty)


def read_tsv(path: str, skip_empty: bool) -> Tuple[List[Record], int]:
    """``prompt<TAB>target`` lines; (examples, number of empty lines skipped)."""
    records, empty, bad_tabs, prompt_only = [], [], [], []
    for number, line in _numbered_lines(path):
        if line == "":
            empty.append(number)
        elif line.count("\t") != 1:
            bad_tabs.append(number)
        else:
            prompt, target = line.split("\t")
            if target == "":
                prompt_only.append(number)
            else:
                records.append(Record(number, prompt, target))
    problems = []
    if bad_tabs:
        problems.append(
            f"{len(bad_tabs)} line(s) without exactly one tab (want prompt<TAB>target) at line {_lines_quoted(bad_tabs)}"
        )
    if prompt_only:
        problems.append(
            f"{len(prompt_only)} prompt-only row(s) (empty target: nothing for the loss to cover) at line "
            f"{_lines_quoted(prompt_only)}"
        )
    if empty and not skip_empty:
        problems.append(f"{len(empty)} empty line(s) at line {_lines_quoted(empty)} (--skip-empty leaves them out)")
    if problems:
        raise DPConfigError(f"{path}: " + "; ".join(problems))
    return records, len(empty)


def read_e2e(path: str, skip_empty: bool) -> Tuple[List[Record], int]:
    """The E2E NLG CSV (``mr,ref`` header, quoted fields); (examples, blank rows skipped)."""
    csv.field_size_limit(sys.maxsize)
    records, empty, bad_width, prompt_only = [], [], [], []
    try:
        with _open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DPConfigError(f"{path}: empty file (want the E2E CSV with the header 'mr,ref')")
            if [c.strip() for c in header] != list(E2E_COLUMNS):
                raise DPConfigError(
                    f"{path}: the header is {','.join(header)!r}, want 'mr,ref' (the E2E NLG CSV); "
                    "for other prompt/target data use --format tsv"
                )
            start = reader.line_num + 1
            for row in reader:
                if not row or row == [""]:
                    empty.append(start)
                elif len(row) != 2:
                    bad_width.append(start)
                elif row[1] == "":
                    prompt_only.append(start)
                else:
                    records.append(Record(start, row[0], row[1]))
                start = reader.line_num + 1
    except csv.Error as e:
        raise DPConfigError(f"{path}: not a valid CSV file ({e})") from None
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None
    problems = []
    if bad_width:
        problems.append(f"{len(bad_width)} row(s) without exactly 2 fields (mr,ref) at line {_lines_quoted(bad_width)}")
    if prompt_only:
        problems.append(f"{len(prompt_only)} prompt-only row(s) (empty ref) at line {_lines_quoted(prompt_only)}")
    if empty and not skip_empty:
        problems.append(f"{len(empty)} empty line(s) at line {_lines_quoted(empty)} (--skip-empty leaves them out)")
    if problems:
        raise DPConfigError(f"{path}: " + "; ".join(problems))
    return records, len(empty)


READERS = {"text": read_text, "tsv": read_tsv, "e2e": read_e2e}


# ---------------------------------------------------------------- tokenization


_worker_encoder = None


def _init_worker(encoder_json: str, vocab_bpe: str) -> None:
    global _worker_encoder
    _worker_encoder = load_gpt2_bpe(encoder_json, vocab_bpe)


def _encode_chunk(texts: List[str]) -> List[List[int]]:
    return [gpt2_ids_to_fairseq(_worker_encoder.encode(t)) for t in texts]


def encode_all(texts: List[str], bpe_files: Tuple[str, str], workers: int) -> List[List[int]]:
    """fairseq indices of each text (GPT-2 ids + 4), in order."""
    if workers <= 1 or len(texts) < 1000:
        _init_worker(*bpe_files)
        return _encode_chunk(texts)
    import multiprocessing

    chunk = 1000
    chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    # fork where there is one: a spawned worker would import torch and fairseq again (seconds each)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, bpe_files) as pool:
        return [ids for part in pool.imap(_encode_chunk, chunks) for ids in part]


def build_items(
    records: List[Record], bpe_files: Tuple[str, str], workers: int
) -> Tuple[List[List[int]], List[int]]:
    """Items (fairseq indices, ``</s>`` included) and loss starts, untruncated."""
    pairs = records and records[0].prompt is not None
    texts = [r.text for r in records]
    if pairs:
        texts += [r.prompt for r in records]
    encoded = encode_all(texts, bpe_files, workers)
    n = len(records)
    items, loss_starts = [], []
    for i in range(n):
        if pairs:
            prompt, target = encoded[n + i], encoded[i]
            items.append(prompt + [FAIRSEQ_EOS] + target + [FAIRSEQ_EOS])
            loss_starts.append(len(prompt) + 1)
        else:
            items.append(encoded[i] + [FAIRSEQ_EOS])
            loss_starts.append(0)
    return items, loss_starts


def fit_length(
    path: str, records: List[Record], items: List[List[int]], loss_starts: List[int], max_length: int, truncate: bool
) -> int:
    """Refuses (or, with ``truncate``, cuts to ``max_length`` keeping the final
    ``</s>``) items longer than ``max_length``; returns how many were cut.
    A pair is never cut into its prompt: one whose prompt, ``</s>``, one target
    token and ``</s>`` do not fit is refused even with ``truncate``."""
    too_long = [i for i, item in enumerate(items) if len(item) > max_length]
    if not too_long:
        return 0
    longest = max(len(items[i]) for i in too_long)
    lines = [records[i].line for i in too_long]
    if not truncate:
        raise DPConfigError(
            f"{path}: {len(too_long)} example(s) longer than --max-length {max_length} tokens (the longest has "
            f"{longest}, separators and </s> included) at line {_lines_quoted(lines)}. Pass --max-length {longest} "
            "(and train with --tokens-per-sample at least that), or --truncate to cut them to the limit"
        )
    unfit = [records[i].line for i in too_long if loss_starts[i] > 0 and loss_starts[i] + 2 > max_length]
    if unfit:
        raise DPConfigError(
            f"{path}: {len(unfit)} example(s) whose prompt alone does not fit in --max-length {max_length} "
            f"(prompt, </s>, one target token and </s>) at line {_lines_quoted(unfit)}; --truncate never cuts a "
            "prompt. Raise --max-length or shorten those prompts"
        )
    for i in too_long:
        items[i] = items[i][: max_length - 1] + [FAIRSEQ_EOS]
    return len(too_long)


# ---------------------------------------------------------------- writing


def write_split(destdir: str, split: str, items: List[List[int]], loss_starts: List[int], vocab_size: int) -> None:
    """``{split}.bin``/``.idx`` (mmap indexed dataset) and ``loss_start/{split}.npy``,
    each written under a temporary name and moved into place."""
    import torch
    from fairseq.data import indexed_dataset

    tmp = os.path.join(destdir, f".{split}.tmp")
    builder = indexed_dataset.make_builder(tmp + ".bin", impl="mmap", vocab_size=vocab_size)
    for item in items:
        builder.add_item(torch.tensor(item, dtype=torch.int64))
    builder.finalize(tmp + ".idx")
    with open(tmp + ".loss_start.npy", "wb") as f:
        np.save(f, np.asarray(loss_starts, dtype=np.int64))
    for suffix in (".bin", ".idx"):
        os.replace(tmp + suffix, os.path.join(destdir, split + suffix))
    os.makedirs(os.path.dirname(loss_start_path(destdir, split)), exist_ok=True)
    os.replace(tmp + ".loss_start.npy", loss_start_path(destdir, split))


def split_names(prefix: str, files: Optional[Sequence[str]]) -> List[Tuple[str, str]]:
    """valid, valid1, valid2... as fairseq-preprocess names several --validpref files."""
    return [(prefix if i == 0 else f"{prefix}{i}", path) for i, path in enumerate(files or [])]


def load_srcdict(path: str):
    from fairseq.data import Dictionary

    if not os.path.isfile(path):
        raise DPConfigError(f"--srcdict {path}: no such file")
    try:
        d = Dictionary.load(path)
    except (ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise DPConfigError(f"--srcdict {path}: not a fairseq dict.txt ({e})") from None
    check_gpt2_dictionary(d, path)
    return d


def prepare(
    fmt: str,
    train: str,
    destdir: str,
    valid: Optional[Sequence[str]] = None,
    test: Optional[Sequence[str]] = None,
    gpt2_encoder_json: Optional[str] = None,
    gpt2_vocab_bpe: Optional[str] = None,
    srcdict: Optional[str] = None,
    max_length: int = 1024,
    truncate: bool = False,
    skip_empty: bool = False,
    workers: int = 1,
    log=print,
) -> dict:
    """Reads and checks every split before writing anything; returns the metadata."""
    if fmt not in READERS:
        raise DPConfigError(f"--format {fmt!r}: want one of {', '.join(FORMATS)}")
    if max_length < MIN_PAIR_TAIL:
        raise DPConfigError(f"--max-length {max_length}: want at least {MIN_PAIR_TAIL}")
    splits = [("train", train)] + split_names("valid", valid) + split_names("test", test)
    if os.path.exists(destdir) and not os.path.isdir(destdir):
        raise DPConfigError(f"--destdir {destdir} is a file, want a directory")
    bpe_files = gpt2_bpe_files(gpt2_encoder_json, gpt2_vocab_bpe)
    load_gpt2_bpe(*bpe_files)  # refuses files that are not GPT-2's before reading any data
    if srcdict is not None:
        dictionary_size = len(load_srcdict(srcdict))
    else:
        from .gpt2_bpe import gpt2_dictionary

        dictionary_size = len(gpt2_dictionary())

    prepared = []
    for split, path in splits:
        records, skipped = READERS[fmt](path, skip_empty)
        if not records:
            raise DPConfigError(f"{path}: no examples (the {split} split would be empty)")
        items, loss_starts = build_items(records, bpe_files, workers)
        truncated = fit_length(path, records, items, loss_starts, max_length, truncate)
        prepared.append((split, path, items, loss_starts, skipped, truncated))

    os.makedirs(destdir, exist_ok=True)
    dict_path = os.path.join(destdir, "dict.txt")
    if srcdict is None:
        write_gpt2_dict(dict_path)
    elif os.path.abspath(srcdict) != os.path.abspath(dict_path):
        shutil.copyfile(srcdict, dict_path)
    meta = {
        "format": fmt,
        "bpe": "gpt2",
        "max_length": max_length,
        "truncate": truncate,
        "skip_empty": skip_empty,
        "item_layout": "tokens </s>" if fmt == "text" else "prompt </s> target </s>",
        "dictionary": {"size": dictionary_size, "srcdict": srcdict, "sha256": sha256_file(dict_path)},
        "tokenizer": {
            "encoder_json": {"path": os.path.abspath(bpe_files[0]), "sha256": sha256_file(bpe_files[0])},
            "vocab_bpe": {"path": os.path.abspath(bpe_files[1]), "sha256": sha256_file(bpe_files[1])},
        },
        "splits": {},
    }
    for split, path, items, loss_starts, skipped, truncated in prepared:
        write_split(destdir, split, items, loss_starts, dictionary_size)
        lengths = np.asarray([len(item) for item in items])
        loss_tokens = int(lengths.sum() - np.sum(loss_starts))
        info = {
            "file": os.path.abspath(path),
            "examples": len(items),
            "tokens": int(lengths.sum()),
            "loss_tokens": loss_tokens,
            "max_item_length": int(lengths.max()),
            "mean_item_length": float(lengths.mean()),
            "truncated": truncated,
            "skipped_empty": skipped,
        }
        meta["splits"][split] = info
        log(
            f"{split}: {info['examples']} examples from {path}, {info['tokens']} tokens ({loss_tokens} in the loss), "
            f"longest {info['max_item_length']}, {truncated} truncated, {skipped} empty lines skipped"
        )
    with open(os.path.join(destdir, "prepare_lm.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="text: one example a line; tsv: prompt<TAB>target a line; e2e: the E2E NLG CSV (mr,ref)")
    p.add_argument("--train", required=True, metavar="FILE", help="training examples (split 'train')")
    p.add_argument("--valid", nargs="+", metavar="FILE",
                   help="validation files (splits 'valid', 'valid1', ...)")
    p.add_argument("--test", nargs="+", metavar="FILE", help="test files (splits 'test', 'test1', ...)")
    p.add_argument("--destdir", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--gpt2-encoder-json", metavar="PATH",
                   help="GPT-2's encoder.json (with --gpt2-vocab-bpe); default: converted from the "
                   "openai-whisper package's gpt2.tiktoken, cached under $FAIRSEQ_DP_CACHE/gpt2_bpe "
                   "(default ~/.cache/fairseq_dp/gpt2_bpe)")
    p.add_argument("--gpt2-vocab-bpe", metavar="PATH", help="GPT-2's vocab.bpe (with --gpt2-encoder-json)")
    p.add_argument("--srcdict", metavar="DICT",
                   help="use this dict.txt (e.g. the one fairseq-dp-convert wrote next to a converted GPT-2 "
                   "checkpoint; must be in GPT-2 id order) instead of writing GPT-2's")
    p.add_argument("--max-length", type=int, default=1024,
                   help="most tokens in one example's item, separators and </s> included (default 1024, "
                   "GPT-2's context); longer examples are refused unless --truncate")
    p.add_argument("--truncate", action="store_true",
                   help="cut examples longer than --max-length to it, keeping the final </s> (never into a prompt)")
    p.add_argument("--skip-empty", action="store_true", help="leave out empty lines instead of refusing them")
    p.add_argument("--workers", type=int, default=1, help="processes for tokenization (default 1)")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        prepare(
            a.format, a.train, a.destdir, valid=a.valid, test=a.test, gpt2_encoder_json=a.gpt2_encoder_json,
            gpt2_vocab_bpe=a.gpt2_vocab_bpe, srcdict=a.srcdict, max_length=a.max_length, truncate=a.truncate,
            skip_empty=a.skip_empty, workers=a.workers,
        )
    except DPConfigError as e:
        # a user mistake: its message alone, no traceback (also when main runs in-process)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
