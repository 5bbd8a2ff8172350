# Copyright (c) fairseq_dp contributors. MIT license.
"""GPT-2 byte-level BPE, offline: the project's one place for it.

fairseq's ``--bpe gpt2`` reads GPT-2's ``encoder.json`` and ``vocab.bpe`` and
downloads them when no path is given, which fails on a machine without
network. This module finds them locally:

- explicit paths (``--gpt2-encoder-json`` and ``--gpt2-vocab-bpe``), or
- the GPT-2 ranks that the PyPI package ``openai-whisper`` ships as
  ``whisper/assets/gpt2.tiktoken`` (base64 token bytes and rank, one a line),
  converted once into ``encoder.json`` / ``vocab.bpe`` under a cache directory
  (``$FAIRSEQ_DP_CACHE/gpt2_bpe/``, default ``~/.cache/fairseq_dp/gpt2_bpe/``).
  ``whisper`` itself is never imported: importing it imports torch and numba;
  only the file's location is looked up.

The encoder is fairseq's own (``gpt2_bpe_utils.get_encoder``), so text encoded
here equals what fairseq's ``--bpe gpt2`` and hub interface produce.

Dictionary layout (what ``fairseq-dp-prepare-lm`` writes and
``--task dp_language_modeling`` reads): fairseq's four specials ``<s>``=0,
``<pad>``=1, ``</s>``=2, ``<unk>``=3, then the symbols ``"0"`` .. ``"50255"``
(GPT-2 ids as decimal strings, as ``--bpe gpt2`` emits them), so GPT-2 id
``i < 50256`` is fairseq index ``i + 4``; GPT-2's ``<|endoftext|>`` (50256) is
fairseq's ``</s>`` (index 2) and is not listed.
"""

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Tuple

from .errors import DPConfigError

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256  # GPT-2's <|endoftext|>, the last id
N_GPT2_IDS = 50257  # ids 0 .. 50256
N_FAIRSEQ_SPECIALS = 4  # <s>, <pad>, </s>, <unk>, added by fairseq.data.Dictionary
FAIRSEQ_EOS = 2
VOCAB_BPE_HEADER = "#version: 0.2"

WHISPER_DIST = "openai-whisper"
WHISPER_ASSET = ("whisper", "assets", "gpt2.tiktoken")
HOW_TO_GET = (
    "give GPT-2's BPE files with --gpt2-encoder-json PATH --gpt2-vocab-bpe PATH, or install the "
    f"package that ships GPT-2's ranks offline: pip install --no-deps {WHISPER_DIST}"
)


# ---------------------------------------------------------------- file lookup


def whisper_tiktoken_path() -> Optional[str]:
    """Where the installed ``openai-whisper`` keeps ``gpt2.tiktoken``, or None.

    Found without importing ``whisper`` (which imports torch and numba):
    ``find_spec`` of a top-level package only locates it."""
    candidates = []
    try:
        spec = importlib.util.find_spec(WHISPER_ASSET[0])
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(d, *WHISPER_ASSET[1:]) for d in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(WHISPER_DIST)
        candidates.append(str(dist.locate_file(os.path.join(*WHISPER_ASSET))))
    except importlib.metadata.PackageNotFoundError:
        pass
    return next((c for c in candidates if os.path.isfile(c)), None)


def cache_dir() -> str:
    """``$FAIRSEQ_DP_CACHE/gpt2_bpe``, default ``~/.cache/fairseq_dp/gpt2_bpe``."""
    root = os.environ.get("FAIRSEQ_DP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fairseq_dp")
    return os.path.join(root, "gpt2_bpe")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- conversion


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map (fairseq's copy of it)."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode as fairseq_bytes_to_unicode

    return fairseq_bytes_to_unicode()


def read_tiktoken(path: str) -> Dict[bytes, int]:
    """``base64(token bytes) rank`` lines -> {token bytes: rank}."""
    ranks = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise DPConfigError(f"{path}:{line_number}: not a 'base64 rank' line ({e})") from None
    return ranks


def _split_by_lower_ranks(token: bytes, ranks: Dict[bytes, int]) -> Tuple[bytes, bytes]:
    """The two parts whose merge makes ``token``: rank-ordered BPE over the
    ranks below ``token``'s own, run on its bytes until two parts are left."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = None, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            raise DPConfigError(f"gpt2.tiktoken: token {token!r} (rank {limit}) is not made by merging lower ranks")
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def tiktoken_to_gpt2(ranks: Dict[bytes, int]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """GPT-2's ``encoder.json`` dict and ``vocab.bpe`` merges (rank order) from
    tiktoken ranks: the byte tokens are ranks 0..255, every later rank is one merge."""
    byte_encoder = bytes_to_unicode()

    def as_unicode(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    if [rank for _, rank in by_rank] != list(range(len(by_rank))) or len(by_rank) != ENDOFTEXT_ID:
        raise DPConfigError(f"gpt2.tiktoken: want ranks 0..{ENDOFTEXT_ID - 1}, each once")
    if any(len(token) != 1 for token, _ in by_rank[:256]):
        raise DPConfigError("gpt2.tiktoken: ranks 0..255 are not the 256 single bytes")
    encoder = {as_unicode(token): rank for token, rank in by_rank}
    encoder[ENDOFTEXT] = ENDOFTEXT_ID
    merges = []
    for token, _ in by_rank[256:]:
        first, second = _split_by_lower_ranks(token, ranks)
        merges.append((as_unicode(first), as_unicode(second)))
    return encoder, merges


def _write_atomically(path: str, text: str) -> None:
    """Readers never see a half-written file, even with several processes converting at once."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert_tiktoken(tiktoken_path: str, out_dir: str) -> Tuple[str, str]:
    """Writes ``encoder.json`` and ``vocab.bpe`` (in the byte formats of
    GPT-2's own files) converted from ``tiktoken_path`` into ``out_dir``."""
    encoder, merges = tiktoken_to_gpt2(read_tiktoken(tiktoken_path))
    os.makedirs(out_dir, exist_ok=True)
    encoder_json = os.path.join(out_dir, "encoder.json")
    vocab_bpe = os.path.join(out_dir, "vocab.bpe")
    _write_atomically(encoder_json, json.dumps(encoder))
    # fairseq's get_encoder drops the first line (the header) and the last
    # (empty after the final newline)
    _write_atomically(vocab_bpe, "\n".join([VOCAB_BPE_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n")
    return encoder_json, vocab_bpe


def _converted_from_whisper() -> Tuple[str, str]:
    tiktoken_path = whisper_tiktoken_path()
    if tiktoken_path is None:
        raise DPConfigError(f"no GPT-2 BPE files: {HOW_TO_GET}")
    directory = cache_dir()
    encoder_json = os.path.join(directory, "encoder.json")
    vocab_bpe = os.path.join(directory, "vocab.bpe")
    source_json = os.path.join(directory, "source.json")
    source = {"from": tiktoken_path, "sha256": sha256_file(tiktoken_path)}
    try:
        with open(source_json) as f:
            cached = json.load(f)
        if cached.get("sha256") == source["sha256"] and os.path.isfile(encoder_json) and os.path.isfile(vocab_bpe):
            return encoder_json, vocab_bpe
    except (OSError, ValueError):
        pass
    try:
        convert_tiktoken(tiktoken_path, directory)
        # written last: a conversion cut short is redone next time
        _write_atomically(source_json, json.dumps(source))
    except OSError as e:
        raise DPConfigError(
            f"cannot write the converted GPT-2 BPE files into {directory} ({e}); set FAIRSEQ_DP_CACHE "
            "to a writable directory, or give --gpt2-encoder-json and --gpt2-vocab-bpe"
        ) from None
    return encoder_json, vocab_bpe


def gpt2_bpe_files(encoder_json: Optional[str] = None, vocab_bpe: Optional[str] = None) -> Tuple[str, str]:
    """(encoder.json, vocab.bpe): the explicit paths when given (both or
    neither), else files converted once from openai-whisper's gpt2.tiktoken."""
    if (encoder_json is None) != (vocab_bpe is None):
        missing = "--gpt2-vocab-bpe" if vocab_bpe is None else "--gpt2-encoder-json"
        raise DPConfigError(f"give --gpt2-encoder-json and --gpt2-vocab-bpe together ({missing} is missing)")
    if encoder_json is not None:
        for flag, path in (("--gpt2-encoder-json", encoder_json), ("--gpt2-vocab-bpe", vocab_bpe)):
            if not os.path.isfile(path):
                raise DPConfigError(f"{flag} {path}: no such file")
        return encoder_json, vocab_bpe
    return _converted_from_whisper()


@lru_cache(maxsize=4)
def _load(encoder_json: str, vocab_bpe: str):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    try:
        encoder = get_encoder(encoder_json, vocab_bpe)
    except (ValueError, UnicodeDecodeError) as e:
        raise DPConfigError(f"{encoder_json} / {vocab_bpe}: not GPT-2 BPE files ({e})") from None
    if encoder.encoder.get(ENDOFTEXT) != ENDOFTEXT_ID or len(encoder.encoder) != N_GPT2_IDS:
        raise DPConfigError(
            f"{encoder_json}: not GPT-2's encoder.json (want {N_GPT2_IDS} tokens with {ENDOFTEXT} = {ENDOFTEXT_ID})"
        )
    return encoder


def load_gpt2_bpe(encoder_json: Optional[str] = None, vocab_bpe: Optional[str] = None):
    """fairseq's GPT-2 encoder: ``.encode(text) -> List[int]`` (GPT-2 ids),
    ``.decode(ids) -> str``."""
    return _load(*gpt2_bpe_files(encoder_json, vocab_bpe))


# ---------------------------------------------------------------- dictionary


def gpt2_symbols() -> List[str]:
    """dict.txt's symbols after fairseq's specials: GPT-2 ids 0..50255 as decimal strings."""
    return [str(i) for i in range(ENDOFTEXT_ID)]


def gpt2_dictionary():
    """A ``fairseq.data.Dictionary`` in GPT-2 id order (see the module docstring)."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for symbol in gpt2_symbols():
        d.add_symbol(symbol, n=1)
    return d


def write_gpt2_dict(path: str) -> None:
    """``"{i} 1"`` for i = 0..50255, fairseq's ``dict.txt`` format."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _write_atomically(path, "".join(f"{s} 1\n" for s in gpt2_symbols()))


def check_gpt2_dictionary(d, path: str = "dict.txt") -> None:
    """Refuses a dictionary that is not in GPT-2 id order (``--srcdict`` from
    another model): GPT-2 ids would silently become other tokens."""
    problems = []
    if len(d) != N_FAIRSEQ_SPECIALS + ENDOFTEXT_ID:
        problems.append(f"it has {len(d) - N_FAIRSEQ_SPECIALS} symbols, GPT-2 BPE has {ENDOFTEXT_ID}")
    if (d.bos(), d.pad(), d.eos(), d.unk()) != (0, 1, 2, 3):
        problems.append("fairseq's specials are not <s>, <pad>, </s>, <unk> at 0..3")
    wrong = next(
        (i for i in range(N_FAIRSEQ_SPECIALS, len(d)) if d.symbols[i] != str(i - N_FAIRSEQ_SPECIALS)), None
    )
    if wrong is not None:
        problems.append(
            f"symbol {wrong} is {d.symbols[wrong]!r}, want {str(wrong - N_FAIRSEQ_SPECIALS)!r} (GPT-2 ids in order)"
        )
    if problems:
        raise DPConfigError(
            f"--srcdict {path} is not a GPT-2 BPE dictionary: {'; '.join(problems)}. Use the dict.txt that "
            "fairseq-dp-convert wrote next to a converted GPT-2 checkpoint, or leave --srcdict out to write GPT-2's"
        )


def gpt2_ids_to_fairseq(ids: Iterable[int]) -> List[int]:
    """GPT-2 ids -> fairseq indices (``<|endoftext|>`` becomes ``</s>``)."""
    out = []
    for i in ids:
        i = int(i)
        if not 0 <= i < N_GPT2_IDS:
            raise ValueError(f"{i} is not a GPT-2 id")
        out.append(FAIRSEQ_EOS if i == ENDOFTEXT_ID else i + N_FAIRSEQ_SPECIALS)
    return out


def fairseq_ids_to_gpt2(ids: Iterable[int]) -> List[int]:
    """fairseq indices -> GPT-2 ids (``</s>`` becomes ``<|endoftext|>``); the
    other specials (<s>, <pad>, <unk>) have no GPT-2 id."""
    out = []
    for i in ids:
        i = int(i)
        if i == FAIRSEQ_EOS:
            out.append(ENDOFTEXT_ID)
        elif N_FAIRSEQ_SPECIALS <= i < N_FAIRSEQ_SPECIALS + ENDOFTEXT_ID:
            out.append(i - N_FAIRSEQ_SPECIALS)
        else:
            raise ValueError(f"fairseq index {i} has no GPT-2 id")
    return out
